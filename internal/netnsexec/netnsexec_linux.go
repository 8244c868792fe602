// Package netnsexec runs a function inside another network namespace: on an
// OS thread that enters the namespace for the call and goes back to the
// process's own afterwards. Sockets made in the function belong to that
// namespace for good; so do interface indexes resolved there. ztunnel uses
// it on every dial into a pod, the node agent to attach and configure
// capture inside pods.
package netnsexec

import (
	"fmt"
	"os"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// own is the process's own network namespace, opened once (the thread
// group leader never leaves it).
var own = sync.OnceValues(func() (*os.File, error) {
	f, err := os.Open("/proc/self/ns/net")
	if err != nil {
		return nil, fmt.Errorf("opening own netns: %w", err)
	}
	return f, nil
})

// Run runs f on an OS thread inside the namespace open as nsFD. The thread
// returns to the scheduler only if it could be moved back to the process's
// namespace; otherwise it stays locked and exits with the goroutine.
func Run(nsFD int, f func() error) error {
	self, err := own()
	if err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(nsFD, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering netns: %w", err)
			return
		}
		ferr := f()
		if unix.Setns(int(self.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		errc <- ferr
	}()
	return <-errc
}

// RunPath is Run for the namespace at path (/proc/<pid>/ns/net,
// /run/netns/<name>).
func RunPath(path string, f func() error) error {
	ns, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("opening netns %s: %w", path, err)
	}
	defer func() { _ = ns.Close() }() // read-only
	return Run(int(ns.Fd()), f)
}
