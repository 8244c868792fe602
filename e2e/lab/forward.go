package lab

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// Forward accepts connections on listen (in the caller's network namespace)
// and relays each to `to` inside the network namespace netnsName: the host
// reaches the API server this way without the lab adding any address or
// route to the host's network.
func Forward(ctx context.Context, listen, netnsName, to string, log *slog.Logger) error {
	dial, err := netnsDialer(netnsName)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", listen, err)
	}
	go func() { <-ctx.Done(); _ = ln.Close() }()
	log.Info("forwarding", "listen", listen, "netns", netnsName, "to", to)
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		go func() {
			defer func() { _ = c.Close() }()
			u, err := dial(to)
			if err != nil {
				log.Warn("dialing through the forwarder", "to", to, "error", err)
				return
			}
			defer func() { _ = u.Close() }()
			var wg sync.WaitGroup
			wg.Add(2)
			pipe := func(dst, src net.Conn) {
				defer wg.Done()
				_, _ = io.Copy(dst, src)
				if tc, ok := dst.(*net.TCPConn); ok {
					_ = tc.CloseWrite()
				}
			}
			go pipe(u, c)
			go pipe(c, u)
			wg.Wait()
		}()
	}
}

// netnsDialer returns a dial function whose sockets are created inside the
// named network namespace: one goroutine, locked to an OS thread that
// entered the namespace, makes every socket (a socket belongs to the
// namespace of the thread that created it).
func netnsDialer(netnsName string) (func(addr string) (net.Conn, error), error) {
	type req struct {
		addr  string
		reply chan dialResult
	}
	reqs := make(chan req)
	ready := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// Never unlocked: the thread dies with the goroutine's end
		// rather than going back to the pool in the wrong namespace.
		fd, err := unix.Open(netnsPath(netnsName), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			ready <- fmt.Errorf("opening netns %s: %w", netnsName, err)
			return
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		_ = unix.Close(fd) // read-only; the thread stays in the namespace without it
		if err != nil {
			ready <- fmt.Errorf("entering netns %s: %w", netnsName, err)
			return
		}
		ready <- nil
		for r := range reqs {
			c, err := net.Dial("tcp", r.addr)
			r.reply <- dialResult{c, err}
		}
	}()
	if err := <-ready; err != nil {
		return nil, err
	}
	return func(addr string) (net.Conn, error) {
		r := req{addr: addr, reply: make(chan dialResult, 1)}
		reqs <- r
		res := <-r.reply
		return res.conn, res.err
	}, nil
}

type dialResult struct {
	conn net.Conn
	err  error
}
