//go:build linux

package bpf

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambitmesh/ambit/internal/netnsexec"
)

// TestOutboundTraffic dials from inside a netns through the policy route
// the node agent installs and checks that ztunnel's outbound listener gets
// the connection with the original destination, that nothing gets through
// once the listener is gone, and that Detach leaves nothing attached.
func TestOutboundTraffic(t *testing.T) {
	requireRoot(t)
	// Attach puts the tc program on the interface that holds the pod's
	// address, and fails without one.
	nsPath, pinDir := podNetns(t, "10.99.0.2/32")

	r, err := Attach(nsPath, pinDir, Config{PodIPs: []netip.Addr{netip.MustParseAddr("10.99.0.2")}})
	if err != nil {
		t.Fatalf("%+v", err)
	}
	out := listen(t, nsPath, "127.0.0.1:15001", true)
	in := listen(t, nsPath, "127.0.0.1:15006", false)
	if err := RegisterListener(r.SockMap(), SlotOutbound, out); err != nil {
		t.Fatal(err)
	}
	if err := RegisterListener(r.SockMap(), SlotInbound, in); err != nil {
		t.Fatal(err)
	}
	// The pins keep the program attached and the maps alive.
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	ipNetns(t, nsPath, "rule", "add", "not", "fwmark", "0x539/0xfff", "ipproto", "tcp", "lookup", "134")
	ipNetns(t, nsPath, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "src", "10.99.0.2", "table", "134")
	// What a connection the program passed would reach: a listener on the
	// port for every address. Without it, a passed SYN would time out too
	// (the RST from a non-local address is not routable), and the
	// fail-closed check below would prove nothing.
	direct := listen(t, nsPath, "0.0.0.0:80", true)

	dialed := make(chan error, 1)
	go func() {
		c, err := dial(nsPath, "192.0.2.1:80", 5*time.Second)
		if err == nil {
			_, err = c.Write([]byte("ping"))
			if err == nil {
				_, err = io.ReadFull(c, make([]byte, 4))
			}
			_ = c.Close()
		}
		dialed <- err
	}()
	if err := out.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	c, err := out.Accept()
	if err != nil {
		t.Fatalf("outbound listener: %v", err)
	}
	if got, want := c.LocalAddr().String(), "192.0.2.1:80"; got != want {
		t.Errorf("accepted LocalAddr = %s, want %s (the original destination)", got, want)
	}
	if got := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr(); got != netip.MustParseAddr("10.99.0.2") {
		t.Errorf("accepted RemoteAddr IP = %s, want the pod IP 10.99.0.2", got)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("reading from the client: %v", err)
	}
	if _, err := c.Write(buf); err != nil {
		t.Fatalf("writing to the client: %v", err)
	}
	if err := <-dialed; err != nil {
		t.Fatalf("client: %v", err)
	}
	_ = c.Close()

	// Closing the listener takes it out of the SOCKMAP: the SYN is now
	// dropped (and retransmitted), where without the program it would be
	// refused.
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = dial(nsPath, "192.0.2.1:80", 300*time.Millisecond)
	var nerr net.Error
	if !errors.As(err, &nerr) || !nerr.Timeout() {
		t.Errorf("dial with no outbound listener: %v, want a timeout (fail closed)", err)
	}

	if err := Detach(pinDir); err != nil {
		t.Fatal(err)
	}
	if attached, err := AttachedTo(nsPath); err != nil || attached {
		t.Errorf("AttachedTo after Detach = %v, %v, want false", attached, err)
	}
	// The control: with the program gone, the same dial gets through to
	// the direct listener.
	c, err = dial(nsPath, "192.0.2.1:80", 5*time.Second)
	if err != nil {
		t.Fatalf("dial after Detach: %v, want it to reach the direct listener", err)
	}
	_ = c.Close()
	if err := direct.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	c, err = direct.Accept()
	if err != nil {
		t.Fatalf("direct listener after Detach: %v", err)
	}
	_ = c.Close()
	if _, err := os.Stat(pinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin directory after Detach: %v, want it gone", err)
	}
	if err := Detach(pinDir); err != nil {
		t.Errorf("Detach of a missing pin directory: %v", err)
	}
}

// TestInboundTraffic sends real connections to a pod netns over a veth pair
// from a client netns, and from inside the pod, and checks where each lands:
// ztunnel's inbound listener for a connection from outside; the listener it
// was addressed to for HBONE, a probe, ztunnel's own transparent dial to the
// app and the pod's connection to itself; nowhere once the inbound listener
// is gone (fail closed); and the app again after Detach.
func TestInboundTraffic(t *testing.T) {
	requireRoot(t)
	client, pod := newNetns(t), newNetns(t)
	// An eth0 in each, the two ends of one veth pair: the pod and a peer on
	// its network.
	ipNetns(t, pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", filepath.Base(client))
	ipNetns(t, client, "addr", "add", "10.99.0.1/24", "dev", "eth0")
	ipNetns(t, pod, "addr", "add", "10.99.0.2/24", "dev", "eth0")
	ipNetns(t, client, "link", "set", "eth0", "up")
	ipNetns(t, pod, "link", "set", "eth0", "up")
	podIP, clientIP := netip.MustParseAddr("10.99.0.2"), netip.MustParseAddr("10.99.0.1")
	const appAddr = "10.99.0.2:8080"

	pinDir := filepath.Join(newBPFFS(t), "pod")
	t.Cleanup(func() { _ = Detach(pinDir) })
	attach := func(t *testing.T, probes ...netip.Addr) *Redirection {
		t.Helper()
		r, err := Attach(pod, pinDir, Config{PodIPs: []netip.Addr{podIP}, ProbeSources: probes})
		if err != nil {
			t.Fatalf("%+v", err)
		}
		return r
	}
	r := attach(t)
	// ztunnel's inbound listener is bound to an address and port that no
	// client dials: a connection reaches it only through the program.
	in := listen(t, pod, "127.0.0.1:15006", true)
	if err := RegisterListener(r.SockMap(), SlotInbound, in); err != nil {
		t.Fatal(err)
	}
	// The pins keep the program attached and the maps alive.
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	app := listen(t, pod, "0.0.0.0:8080", false)
	hbone := listen(t, pod, "0.0.0.0:15008", false)

	// What ztunnel's transparent dials need, as the node agent installs it:
	// the app's SYN-ACK to the client's address takes the SYN's mark
	// (tcp_fwmark_accept), and the rule routes it back through lo to
	// ztunnel's socket instead of out of eth0 to the real client.
	ipNetns(t, pod, "rule", "add", "fwmark", "0x111/0xfff", "lookup", "133")
	ipNetns(t, pod, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "133")
	if err := netnsexec.RunPath(pod, func() error {
		// /proc/sys/net is the opening thread's netns.
		return os.WriteFile("/proc/sys/net/ipv4/tcp_fwmark_accept", []byte("1"), 0o644)
	}); err != nil {
		t.Fatalf("setting net.ipv4.tcp_fwmark_accept: %v", err)
	}

	// Each step builds on the state the ones before it left.
	step := func(name string, fn func(t *testing.T)) {
		t.Helper()
		if !t.Run(name, fn) {
			t.FailNow()
		}
	}
	step("from outside: ztunnel's inbound listener", func(t *testing.T) {
		c := mustDial(t, client, appAddr)
		s := acceptFrom(t, in, "inbound listener", c)
		if got := s.LocalAddr().String(); got != appAddr {
			t.Errorf("accepted LocalAddr = %s, want %s (the original destination)", got, appAddr)
		}
		if got := s.RemoteAddr().(*net.TCPAddr).AddrPort().Addr(); got != clientIP {
			t.Errorf("accepted RemoteAddr IP = %s, want the client's %s", got, clientIP)
		}
		exchange(t, c, s)
	})
	step("HBONE: its own listener", func(t *testing.T) {
		c := mustDial(t, client, "10.99.0.2:15008")
		exchange(t, c, acceptFrom(t, hbone, "15008 listener", c))
	})
	step("from a probe source: the app", func(t *testing.T) {
		// Attach again rewrites the config of the pinned attachment.
		if err := attach(t, clientIP).Close(); err != nil {
			t.Fatal(err)
		}
		c := mustDial(t, client, appAddr)
		s := acceptFrom(t, app, "app listener", c)
		// The probe's SYN carried ztunnel's mark, which
		// tcp_fwmark_accept gave the app's socket: its replies are
		// not captured by the policy routing.
		if got := sockoptInt(t, s.(syscall.Conn), "SO_MARK", unix.SO_MARK); got != 0x539 {
			t.Errorf("the app's socket for a probe has mark %#x, want 0x539", got)
		}
		exchange(t, c, s)
	})
	step("probe source removed: ztunnel's inbound listener again", func(t *testing.T) {
		if err := attach(t).Close(); err != nil {
			t.Fatal(err)
		}
		c := mustDial(t, client, appAddr)
		exchange(t, c, acceptFrom(t, in, "inbound listener", c))
	})
	// The loop this design fixes: the kernel reports eth0 as the
	// ingress_ifindex of this SYN to sk_lookup, although it travels over
	// lo, so an sk_lookup program cannot tell it from a client's.
	step("ztunnel's transparent dial from the client's address: the app", func(t *testing.T) {
		c, err := dialTransparent(pod, clientIP, 0x111, appAddr)
		if err != nil {
			t.Fatalf("transparent dial to %s: %v", appAddr, err)
		}
		t.Cleanup(func() { _ = c.Close() })
		s := acceptFrom(t, app, "app listener", c)
		if got := s.RemoteAddr().(*net.TCPAddr).AddrPort().Addr(); got != clientIP {
			t.Errorf("app's RemoteAddr IP = %s, want the client's %s", got, clientIP)
		}
		exchange(t, c, s)
	})
	step("the pod to itself: the app", func(t *testing.T) {
		c := mustDial(t, pod, appAddr)
		s := acceptFrom(t, app, "app listener", c)
		if got := s.RemoteAddr().(*net.TCPAddr).AddrPort().Addr(); got != podIP {
			t.Errorf("app's RemoteAddr IP = %s, want the pod's %s", got, podIP)
		}
		exchange(t, c, s)
	})
	step("inbound listener closed: dropped", func(t *testing.T) {
		// Closing the listener takes it out of the SOCKMAP: the SYN is
		// now dropped (and retransmitted) where without the program it
		// would reach the app.
		if err := in.Close(); err != nil {
			t.Fatal(err)
		}
		c, err := dial(client, appAddr, 500*time.Millisecond)
		if err == nil {
			_ = c.Close()
		}
		var nerr net.Error
		if !errors.As(err, &nerr) || !nerr.Timeout() {
			t.Errorf("dial with no inbound listener: %v, want a timeout (fail closed)", err)
		}
	})
	step("detached: the app", func(t *testing.T) {
		if err := Detach(pinDir); err != nil {
			t.Fatal(err)
		}
		if attached, err := AttachedTo(pod); err != nil || attached {
			t.Errorf("AttachedTo after Detach = %v, %v, want false", attached, err)
		}
		// The control for the step before: the same dial, without the
		// program, reaches the app. Had the dropped SYN reached it, that
		// connection would be the first accepted here and not match.
		c := mustDial(t, client, appAddr)
		exchange(t, c, acceptFrom(t, app, "app listener", c))
	})
}

// mustDial opens a TCP connection from inside the netns at nsPath, closed
// when the test ends.
func mustDial(t *testing.T, nsPath, addr string) net.Conn {
	t.Helper()
	c, err := dial(nsPath, addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dialing %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// dialTransparent dials addr from inside the netns at nsPath as ztunnel
// dials an app: from the address from (not local to the netns), with
// IP_TRANSPARENT and SO_MARK mark.
func dialTransparent(nsPath string, from netip.Addr, mark int, addr string) (net.Conn, error) {
	var c net.Conn
	err := netnsexec.RunPath(nsPath, func() error {
		d := net.Dialer{
			Timeout:   5 * time.Second,
			LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0)),
			Control: setSockopts(
				sockopt{unix.SOL_IP, unix.IP_TRANSPARENT, 1},
				sockopt{unix.SOL_SOCKET, unix.SO_MARK, mark},
			),
		}
		d.SetMultipathTCP(false)
		var err error
		c, err = d.Dial("tcp4", addr)
		return err
	})
	return c, err
}

// acceptFrom accepts a connection on ln (named what in messages) and checks
// that it is c's: that its peer is c's local address. The accepted
// connection is closed when the test ends.
func acceptFrom(t *testing.T, ln *net.TCPListener, what string, c net.Conn) net.Conn {
	t.Helper()
	if err := ln.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatalf("%s: %v, want the connection from %s", what, err, c.LocalAddr())
	}
	t.Cleanup(func() { _ = s.Close() })
	if got, want := s.RemoteAddr().String(), c.LocalAddr().String(); got != want {
		t.Fatalf("%s accepted a connection from %s, want the one from %s", what, got, want)
	}
	return s
}

// exchange checks that data flows both ways between c and the accepted s.
func exchange(t *testing.T, c, s net.Conn) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	if err := errors.Join(c.SetDeadline(deadline), s.SetDeadline(deadline)); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []struct {
		name     string
		from, to net.Conn
		msg      string
	}{
		{"client to server", c, s, "ping"},
		{"server to client", s, c, "pong"},
	} {
		if _, err := dir.from.Write([]byte(dir.msg)); err != nil {
			t.Fatalf("%s: writing: %v", dir.name, err)
		}
		buf := make([]byte, len(dir.msg))
		if _, err := io.ReadFull(dir.to, buf); err != nil {
			t.Fatalf("%s: reading: %v", dir.name, err)
		}
		if string(buf) != dir.msg {
			t.Fatalf("%s: read %q, want %q", dir.name, buf, dir.msg)
		}
	}
}
