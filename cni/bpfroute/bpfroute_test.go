package bpfroute

import (
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambitmesh/ambit/bpf"
	"github.com/ambitmesh/ambit/internal/netnsexec"
	"github.com/ambitmesh/ambit/internal/netnstest"
)

func requireRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces): run `make test` as root")
	}
}

// newNetns makes a namespace with lo up and 10.99.0.2/32 on a veth,
// removed at cleanup.
func newNetns(t *testing.T) (name, path string) {
	t.Helper()
	name, path = netnstest.New(t, "ambit-bpfroute")
	ip(t, "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
	ip(t, "-n", name, "link", "set", "eth0", "up")
	ip(t, "-n", name, "addr", "add", "10.99.0.2/32", "dev", "eth0")
	ip(t, "-n", name, "route", "add", "default", "dev", "eth0")
	return name, path
}

func ip(t *testing.T, args ...string) string {
	t.Helper()
	return netnstest.IP(t, args...)
}

func sysctl(t *testing.T, name string) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", name, "cat", fwmarkAccept).CombinedOutput()
	if err != nil {
		t.Fatalf("reading %s: %v: %s", fwmarkAccept, err, out)
	}
	return strings.TrimSpace(string(out))
}

// TestApplyRemove installs the routing twice (idempotent: one copy of each
// rule), checks each rule, route and the sysctl, then removes it all.
func TestApplyRemove(t *testing.T) {
	requireRoot(t)
	name, path := newNetns(t)
	pod := []netip.Addr{netip.MustParseAddr("10.99.0.2")}
	for range 2 {
		if err := Apply(path, pod, nil); err != nil {
			t.Fatal(err)
		}
	}
	rules := ip(t, "-n", name, "-4", "rule", "show")
	for _, want := range []string{
		"32761:\tfrom all fwmark 0x111/0xfff lookup 133",
		"32762:\tfrom all fwmark 0x539/0xfff lookup main",
		"32763:\tfrom all ipproto tcp lookup 134",
	} {
		if strings.Count(rules, want) != 1 {
			t.Errorf("rules:\n%s\nwant exactly one %q", rules, want)
		}
	}
	routes := ip(t, "-n", name, "-4", "route", "show", "table", "all")
	for _, want := range []string{
		"local default dev lo table 133 scope host",
		"local default dev lo table 134 scope host src 10.99.0.2",
	} {
		if !strings.Contains(routes, want) {
			t.Errorf("routes:\n%s\nwant %q", routes, want)
		}
	}
	// Where the pod's packets go: TCP to lo (captured), UDP (DNS) and
	// ztunnel's marked TCP (and the app's replies to probes, whose
	// accepted sockets carry the same mark) out through eth0, the app's
	// replies to transparent dials to lo; TCP to the node is captured
	// too.
	for _, tc := range []struct{ args, want string }{
		{"10.1.2.3 from 10.99.0.2 ipproto tcp", "local 10.1.2.3 "},
		{"10.1.2.3 from 10.99.0.2 ipproto udp", "10.1.2.3 from 10.99.0.2 dev eth0"},
		{"10.1.2.3 from 10.99.0.2 ipproto tcp mark 0x539", "10.1.2.3 from 10.99.0.2 dev eth0"},
		{"10.1.2.3 from 10.99.0.2 ipproto tcp mark 0x111", "local 10.1.2.3 "},
		{"10.99.0.1 from 10.99.0.2 ipproto tcp", "local 10.99.0.1 "},
	} {
		got := ip(t, append([]string{"-n", name, "-4", "route", "get"}, strings.Fields(tc.args)...)...)
		if !strings.HasPrefix(got, tc.want) {
			t.Errorf("route get %s = %q, want prefix %q", tc.args, got, tc.want)
		}
	}
	if got := sysctl(t, name); got != "1" {
		t.Errorf("tcp_fwmark_accept = %s, want 1", got)
	}
	if ok, err := Installed(path); err != nil || !ok {
		t.Fatalf("Installed = %v, %v after Apply", ok, err)
	}
	for range 2 {
		if err := Remove(path); err != nil {
			t.Fatal(err)
		}
	}
	if ok, err := Installed(path); err != nil || ok {
		t.Fatalf("Installed = %v, %v after Remove", ok, err)
	}
	if rules := ip(t, "-n", name, "-4", "rule", "show"); strings.Contains(rules, "lookup 13") || strings.Contains(rules, "0x539") {
		t.Errorf("rules left:\n%s", rules)
	}
	if got := sysctl(t, name); got != "0" {
		t.Errorf("tcp_fwmark_accept = %s after Remove, want 0", got)
	}
}

// TestApplyNeedsIPv4 refuses a pod without an IPv4 address: the outbound
// route needs a source.
func TestApplyNeedsIPv4(t *testing.T) {
	requireRoot(t)
	_, path := newNetns(t)
	err := Apply(path, []netip.Addr{netip.MustParseAddr("fd00::2")}, nil)
	if err == nil || !strings.Contains(err.Error(), "IPv4") {
		t.Fatalf("Apply with only IPv6: %v, want an IPv4 error", err)
	}
	if ok, _ := Installed(path); ok {
		t.Error("routing installed after a refused Apply")
	}
}

// TestIPv6FailsClosed: the programs steer IPv4 only, so a pod with an IPv6
// address gets its IPv6 TCP refused, not sent in plaintext; ztunnel's
// marked sockets and UDP still go out; Remove takes it all away.
func TestIPv6FailsClosed(t *testing.T) {
	requireRoot(t)
	name, path := newNetns(t)
	ip(t, "-n", name, "-6", "addr", "add", "fd00::2/128", "dev", "eth0", "nodad")
	ip(t, "-n", name, "-6", "route", "add", "default", "dev", "eth0")
	pod := []netip.Addr{netip.MustParseAddr("10.99.0.2"), netip.MustParseAddr("fd00::2")}
	for range 2 {
		if err := Apply(path, pod, nil); err != nil {
			t.Fatal(err)
		}
	}
	rules := ip(t, "-n", name, "-6", "rule", "show")
	for _, want := range []string{
		"32762:\tfrom all fwmark 0x539/0xfff lookup main",
		"32763:\tfrom all ipproto tcp lookup 134",
	} {
		if strings.Count(rules, want) != 1 {
			t.Errorf("IPv6 rules:\n%s\nwant exactly one %q", rules, want)
		}
	}
	for _, tc := range []struct {
		args   string
		refuse bool
	}{
		{"fd00::1 from fd00::2 ipproto tcp", true},
		{"fd00::1 from fd00::2 ipproto udp", false},
		{"fd00::1 from fd00::2 ipproto tcp mark 0x539", false},
	} {
		out, err := exec.Command("ip", append([]string{"-n", name, "-6", "route", "get"}, strings.Fields(tc.args)...)...).CombinedOutput()
		refused := err != nil || strings.HasPrefix(string(out), "prohibit")
		if refused != tc.refuse {
			t.Errorf("route get %s: %q (err %v), want refused=%v", tc.args, out, err, tc.refuse)
		}
	}
	if err := Remove(path); err != nil {
		t.Fatal(err)
	}
	if ok, err := Installed(path); err != nil || ok {
		t.Fatalf("Installed = %v, %v after Remove", ok, err)
	}
	if out, err := exec.Command("ip", "-n", name, "-6", "route", "get", "fd00::1", "from", "fd00::2", "ipproto", "tcp").CombinedOutput(); err != nil {
		t.Errorf("IPv6 TCP still refused after Remove: %v: %s", err, out)
	}
}

// TestApplyKeepsConnections checks that a connection the pod had before its
// first Apply keeps working (it would be reset if its packets were looped
// to lo), that a new one is captured, and that an Apply again leaves the
// connections made since captured.
func TestApplyKeepsConnections(t *testing.T) {
	requireRoot(t)
	_, path, dialRemote, keeper := remoteTopology(t)
	before, peer := dialRemote()

	if err := Apply(path, []netip.Addr{netip.MustParseAddr("10.99.0.2")}, keeper); err != nil {
		t.Fatal(err)
	}
	roundTrip(t, before, peer)

	// A new connection is captured: looped to lo, where nothing listens
	// on the remote's address in this test (ztunnel would).
	_, err := inNetnsErr(path, func() (net.Conn, error) { return net.DialTimeout("tcp4", "10.99.0.1:8080", 500*time.Millisecond) })
	if err == nil {
		t.Fatal("a connection made after Apply reached the remote uncaptured")
	}

	// A connection made while enrolled (to the pod itself, which the
	// routing leaves local) is not marked by a second Apply.
	self := inNetns(t, path, func() (net.Listener, error) { return net.Listen("tcp4", "10.99.0.2:9090") })
	t.Cleanup(func() { _ = self.Close() })
	during := inNetns(t, path, func() (net.Conn, error) { return net.DialTimeout("tcp4", "10.99.0.2:9090", 5*time.Second) })
	t.Cleanup(func() { _ = during.Close() })
	if err := Apply(path, []netip.Addr{netip.MustParseAddr("10.99.0.2")}, keeper); err != nil {
		t.Fatal(err)
	}
	if got := soMark(t, during); got != 0 {
		t.Errorf("SO_MARK of a connection made while enrolled = %#x after a second Apply, want 0", got)
	}
	if got := soMark(t, before); got != Mark {
		t.Errorf("SO_MARK of the connection from before = %#x, want %#x", got, Mark)
	}
	roundTrip(t, before, peer)
}

// remoteTopology is newNetns with the veth's other end in a namespace of
// its own (the network) with a server on 10.99.0.1:8080; dialRemote
// connects the pod to it and returns both ends. keeper marks with Mark.
func remoteTopology(t *testing.T) (name, path string, dialRemote func() (net.Conn, net.Conn), keeper *bpf.ConnectionKeeper) {
	t.Helper()
	name, path = newNetns(t)
	remote, remotePath := netnstest.New(t, "ambit-bpfroute-remote")
	ip(t, "-n", name, "link", "set", "eth1", "netns", remote)
	ip(t, "-n", remote, "link", "set", "eth1", "up")
	ip(t, "-n", remote, "addr", "add", "10.99.0.1/32", "dev", "eth1")
	ip(t, "-n", remote, "route", "add", "10.99.0.2/32", "dev", "eth1")
	keeper, err := bpf.NewConnectionKeeper(Mark)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = keeper.Close() })
	ln := inNetns(t, remotePath, func() (net.Listener, error) { return net.Listen("tcp4", "10.99.0.1:8080") })
	t.Cleanup(func() { _ = ln.Close() })
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	dialRemote = func() (net.Conn, net.Conn) {
		c := inNetns(t, path, func() (net.Conn, error) { return net.DialTimeout("tcp4", "10.99.0.1:8080", 5*time.Second) })
		t.Cleanup(func() { _ = c.Close() })
		peer := <-accepted
		t.Cleanup(func() { _ = peer.Close() })
		return c, peer
	}
	return name, path, dialRemote, keeper
}

// TestKeepStragglers checks the run after the routing: a connection opened
// before the routing but not marked (as one opened between the first run
// and the rules) is marked and keeps working; connections routed through
// lo are not marked.
func TestKeepStragglers(t *testing.T) {
	requireRoot(t)
	_, path, dialRemote, keeper := remoteTopology(t)
	straggler, peer := dialRemote()
	if err := Apply(path, []netip.Addr{netip.MustParseAddr("10.99.0.2")}, nil); err != nil {
		t.Fatal(err)
	}
	self := inNetns(t, path, func() (net.Listener, error) { return net.Listen("tcp4", "10.99.0.2:9090") })
	t.Cleanup(func() { _ = self.Close() })
	local := inNetns(t, path, func() (net.Conn, error) { return net.DialTimeout("tcp4", "10.99.0.2:9090", 5*time.Second) })
	t.Cleanup(func() { _ = local.Close() })
	n, err := keeper.KeepStragglers(path)
	if err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Errorf("KeepStragglers marked %d connections, want 1", n)
	}
	if got := soMark(t, straggler); got != Mark {
		t.Errorf("SO_MARK of the straggler = %#x, want %#x", got, Mark)
	}
	if got := soMark(t, local); got != 0 {
		t.Errorf("SO_MARK of a connection through lo = %#x, want 0", got)
	}
	roundTrip(t, straggler, peer)
}

func inNetns[T any](t *testing.T, path string, f func() (T, error)) T {
	t.Helper()
	v, err := inNetnsErr(path, f)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func inNetnsErr[T any](path string, f func() (T, error)) (T, error) {
	var v T
	err := netnsexec.RunPath(path, func() error {
		var err error
		v, err = f()
		return err
	})
	return v, err
}

// roundTrip sends a byte each way between a and b.
func roundTrip(t *testing.T, a, b net.Conn) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	_ = a.SetDeadline(deadline)
	_ = b.SetDeadline(deadline)
	for _, d := range [][2]net.Conn{{a, b}, {b, a}} {
		if _, err := d[0].Write([]byte{'x'}); err != nil {
			t.Fatalf("writing: %v", err)
		}
		if _, err := io.ReadFull(d[1], make([]byte, 1)); err != nil {
			t.Fatalf("reading: %v", err)
		}
	}
}

func soMark(t *testing.T, c net.Conn) int {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var mark int
	var serr error
	if err := rc.Control(func(fd uintptr) { mark, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK) }); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatal(serr)
	}
	return mark
}
