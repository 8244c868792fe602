package kubeletapi

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"runtime"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

const dialTimeout = 5 * time.Second

// dialInNetNS connects to port on the loopback of the network namespace at
// nsPath: 127.0.0.1 first, then ::1, as the CRI runtimes do.
//
// A socket belongs to the network namespace of the thread that creates it,
// so the dial runs on a locked thread moved into the pod's namespace. The
// thread goes back to the Go scheduler only if it could be moved back;
// otherwise it stays locked and exits with its goroutine.
func dialInNetNS(ctx context.Context, nsPath string, port int32) (net.Conn, error) {
	target, err := os.Open(nsPath)
	if errors.Is(err, fs.ErrNotExist) {
		err = fmt.Errorf("%w: %w", ErrNotFound, err)
	}
	if err != nil {
		return nil, fmt.Errorf("opening pod network namespace: %w", err)
	}
	defer func() { _ = target.Close() }() // read-only

	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		self, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			ch <- result{err: fmt.Errorf("opening own network namespace: %w", err)}
			return
		}
		defer func() { _ = self.Close() }() // read-only
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("entering network namespace %s: %w", nsPath, err)}
			return
		}
		c, err := dialLoopback(ctx, port)
		if unix.Setns(int(self.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

func dialLoopback(ctx context.Context, port int32) (net.Conn, error) {
	d := net.Dialer{Timeout: dialTimeout}
	p := strconv.Itoa(int(port))
	c, err := d.DialContext(ctx, "tcp4", net.JoinHostPort("127.0.0.1", p))
	if err == nil {
		return c, nil
	}
	if c6, err6 := d.DialContext(ctx, "tcp6", net.JoinHostPort("::1", p)); err6 == nil {
		return c6, nil
	}
	return nil, err
}
