package inpod

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/ambitmesh/ambit/internal/netnsexec"
)

// Mark is the SO_MARK ztunnel puts on its own sockets so that the capture
// rules inside a pod's network namespace let them through instead of
// redirecting them to ztunnel again (Istio uses the same value).
const Mark = 0x539

// InboundMark is the SO_MARK on ztunnel's transparent sockets to the app in
// the pod (TransparentDialer). The capture rules (cni/nft) let them through,
// copy the mark into the connection's ct mark, and route the app's replies,
// which are addressed to the client, back to ztunnel. Istio's in-pod mode
// uses the same value; it differs from Mark so that ztunnel's outbound
// sockets are not caught by that return path.
const InboundMark = 0x111

// NetNS is a network namespace held open by a file descriptor (the one the
// node agent passed over ZDS). Sockets belong to the namespace of the thread
// that creates them, so listeners and dials run on a thread that entered it.
type NetNS struct {
	f       *os.File
	sockmap *os.File // eBPF capture mode: where the listeners go; nil otherwise
}

// OpenNetNS opens a network namespace by path (for tests and the node
// agent; ztunnel gets fds over ZDS).
func OpenNetNS(path string) (*NetNS, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening netns %s: %w", path, err)
	}
	return &NetNS{f: f}, nil
}

// NetNSFromFD takes ownership of a namespace fd.
func NetNSFromFD(fd int) *NetNS { return &NetNS{f: os.NewFile(uintptr(fd), "netns")} }

// Close releases the namespace fd (and the SOCKMAP's, if any). Sockets
// already made stay in the namespace.
func (n *NetNS) Close() error {
	if n.sockmap != nil {
		_ = n.sockmap.Close() // a map fd: closing loses nothing
	}
	return n.f.Close()
}

// SameNamespace reports whether n and o hold the same network namespace
// (the node agent sends a pod again when ztunnel or the agent reconnects).
func (n *NetNS) SameNamespace(o *NetNS) bool {
	var a, b unix.Stat_t
	if unix.Fstat(int(n.f.Fd()), &a) != nil || unix.Fstat(int(o.f.Fd()), &b) != nil {
		return false
	}
	return a.Dev == b.Dev && a.Ino == b.Ino
}

// Adopt takes o's SOCKMAP, if it has one, in place of n's, and closes o.
func (n *NetNS) Adopt(o *NetNS) {
	if o.sockmap != nil {
		if n.sockmap != nil {
			_ = n.sockmap.Close() // a map fd: closing loses nothing
		}
		n.sockmap, o.sockmap = o.sockmap, nil
	}
	_ = o.Close() // read-only
}

// SockMap is the pod's listener SOCKMAP when the node agent captures the
// pod with eBPF (ztunnel puts its outbound and inbound listeners in it),
// nil in nftables mode.
func (n *NetNS) SockMap() *os.File { return n.sockmap }

// FD returns the namespace's file descriptor.
func (n *NetNS) FD() int { return int(n.f.Fd()) }

// Do runs f on an OS thread inside the namespace (netnsexec.Run).
func (n *NetNS) Do(f func() error) error { return netnsexec.Run(int(n.f.Fd()), f) }

// Listen opens a TCP listener inside the namespace. MPTCP is off: Go 1.24+
// listeners default to it, and an MPTCP socket cannot go into a SOCKMAP,
// which the eBPF capture mode uses. IP_TRANSPARENT is set so that the
// listener can take connections addressed elsewhere (TPROXY, and sk_lookup
// in eBPF mode, where an outbound connection's local address is its
// original destination). The listener carries Mark, and so do the
// connections it accepts: their packets are ztunnel's and are never
// captured again.
//
// keepAlive false turns TCP keepalive off on accepted connections (for
// connections from the pod itself, which cannot lose their peer).
func (n *NetNS) Listen(ctx context.Context, addr string, keepAlive bool) (net.Listener, error) {
	var ln net.Listener
	err := n.Do(func() error {
		lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = errors.Join(
					unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1),
					unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, Mark))
			})
			return errors.Join(err, serr)
		}}
		lc.SetMultipathTCP(false)
		var err error
		network := "tcp"
		if strings.HasPrefix(addr, "0.0.0.0:") {
			network = "tcp4" // "tcp" would listen on [::], dual-stack
		}
		ln, err = lc.Listen(ctx, network, addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listening on %s in pod netns: %w", addr, err)
	}
	return ln, nil
}

// Dialer returns a dial function whose sockets are created inside the
// namespace and carry Mark.
func (n *NetNS) Dialer() func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := n.Do(func() error {
			var err error
			c, err = MarkedDialer().DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
}

// TransparentDialer returns a dial function whose sockets are created inside
// the namespace with IP_TRANSPARENT and InboundMark, bound to src (port 0),
// so that the app sees src, the real client, as the peer. A zero or
// non-IPv4 src falls back to Dialer: the return path is IPv4 only.
func (n *NetNS) TransparentDialer(src netip.Addr) func(ctx context.Context, network, addr string) (net.Conn, error) {
	if !src.IsValid() || !src.Unmap().Is4() {
		return n.Dialer()
	}
	d := &net.Dialer{
		LocalAddr: &net.TCPAddr{IP: src.Unmap().AsSlice()},
		Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				// IP_TRANSPARENT lets the socket bind to an address
				// that is not local (ip(7)); it must be set before bind.
				// IP_BIND_ADDRESS_NO_PORT leaves the port to connect,
				// which picks it for the whole 4-tuple (and may reuse a
				// TIME_WAIT one, the pod having tcp_tw_reuse=1), where
				// bind with port 0 would take a port of the client's
				// address for itself, whatever the destination, as
				// Envoy's source-address binding does.
				serr = errors.Join(
					unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1),
					unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1),
					unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, InboundMark))
			})
			return errors.Join(err, serr)
		},
	}
	d.SetMultipathTCP(false)
	d.KeepAlive = -1 // the app is in the same pod: no peer to lose
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := n.Do(func() error {
			var err error
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
}

// MarkedDialer is a dialer whose sockets carry Mark, in the caller's
// namespace.
func MarkedDialer() *net.Dialer {
	d := &net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, Mark)
		})
		return errors.Join(err, serr)
	}}
	d.SetMultipathTCP(false)
	return d
}

// OriginalDst returns the destination a REDIRECTed connection was sent to
// before the redirect (SO_ORIGINAL_DST), or the local address when the
// socket was not redirected (TPROXY and sk_lookup keep it as the local
// address).
func OriginalDst(c net.Conn) (net.Addr, error) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c.LocalAddr(), nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil, err
	}
	var addr *net.TCPAddr
	var serr error
	err = rc.Control(func(fd uintptr) {
		mreq, err := unix.GetsockoptIPv6Mreq(int(fd), unix.SOL_IP, unix.SO_ORIGINAL_DST)
		if err != nil {
			serr = err
			return
		}
		// struct sockaddr_in: family(2) port(2, network order) addr(4)
		b := mreq.Multiaddr
		addr = &net.TCPAddr{IP: net.IPv4(b[4], b[5], b[6], b[7]), Port: int(b[2])<<8 | int(b[3])}
	})
	if err != nil {
		return nil, err
	}
	if serr != nil {
		if errors.Is(serr, unix.ENOENT) {
			return c.LocalAddr(), nil
		}
		return nil, fmt.Errorf("reading SO_ORIGINAL_DST: %w", serr)
	}
	return addr, nil
}
