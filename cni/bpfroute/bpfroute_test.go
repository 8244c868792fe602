package bpfroute

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
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
	name = fmt.Sprintf("ambit-bpfroute-%d-%d", os.Getpid(), time.Now().UnixNano()%1000000)
	ip(t, "netns", "add", name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "delete", name).Run() })
	ip(t, "-n", name, "link", "set", "lo", "up")
	ip(t, "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
	ip(t, "-n", name, "link", "set", "eth0", "up")
	ip(t, "-n", name, "addr", "add", "10.99.0.2/32", "dev", "eth0")
	ip(t, "-n", name, "route", "add", "default", "dev", "eth0")
	return name, "/run/netns/" + name
}

func ip(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
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
		if err := Apply(path, pod); err != nil {
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
	err := Apply(path, []netip.Addr{netip.MustParseAddr("fd00::2")})
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
		if err := Apply(path, pod); err != nil {
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
