//go:build linux

package bpf

import (
	"net"
	"os"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ambitmesh/ambit/internal/netnsexec"
)

// TestKeepConnections checks which sockets ConnectionKeeper marks: both ends
// of an established connection and one being closed, but not a listener
// (its accepted sockets would inherit the mark), not a socket that is not
// connected yet, and nothing in another namespace.
func TestKeepConnections(t *testing.T) {
	requireRoot(t)
	nsPath, other := newNetns(t), newNetns(t)
	ln := listen(t, nsPath, "127.0.0.1:8080", false)
	c := mustDial(t, nsPath, "127.0.0.1:8080")
	s := acceptFrom(t, ln, "listener", c)
	// Half-closed: FIN_WAIT2 on one side, CLOSE_WAIT on the other.
	c2 := mustDial(t, nsPath, "127.0.0.1:8080")
	s2 := acceptFrom(t, ln, "listener", c2)
	if err := c2.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	unconnected := socketIn(t, nsPath)
	otherLn := listen(t, other, "127.0.0.1:8080", false)
	oc := mustDial(t, other, "127.0.0.1:8080")
	osrv := acceptFrom(t, otherLn, "other listener", oc)

	k, err := NewConnectionKeeper(0x539)
	if err != nil {
		t.Fatalf("%+v", err)
	}
	defer func() { _ = k.Close() }()
	n, err := k.Keep(nsPath)
	if err != nil {
		t.Fatalf("%+v", err)
	}
	if n != 4 {
		t.Errorf("marked %d sockets, want 4 (both ends of two connections)", n)
	}
	for _, tc := range []struct {
		name string
		c    syscall.Conn
		want int
	}{
		{"client end", c.(syscall.Conn), 0x539},
		{"accepted end", s.(syscall.Conn), 0x539},
		{"half-closed client end", c2.(syscall.Conn), 0x539},
		{"half-closed accepted end", s2.(syscall.Conn), 0x539},
		{"listener", ln, 0},
		{"socket not connected", unconnected, 0},
		{"connection in another namespace", oc.(syscall.Conn), 0},
		{"accepted in another namespace", osrv.(syscall.Conn), 0},
	} {
		if got := sockoptInt(t, tc.c, "SO_MARK", unix.SO_MARK); got != tc.want {
			t.Errorf("%s: SO_MARK %#x, want %#x", tc.name, got, tc.want)
		}
	}
	// The connections still work.
	exchange(t, c, s)
	// A second run counts afresh.
	if n, err := k.Keep(other); err != nil || n != 2 {
		t.Errorf("Keep in the other namespace = %d, %v; want 2", n, err)
	}
}

// socketIn returns a TCP socket made in the netns at nsPath and never
// connected.
func socketIn(t *testing.T, nsPath string) syscall.Conn {
	t.Helper()
	var fd int
	if err := netnsexec.RunPath(nsPath, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "unconnected socket")
	t.Cleanup(func() { _ = f.Close() })
	return f
}
