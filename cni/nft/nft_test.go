package nft

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/netnstest"
	"github.com/ambitmesh/ambit/ztunnel/inpod"
)

func TestRulesetGolden(t *testing.T) {
	got := Ruleset([]netip.Addr{netip.MustParseAddr("10.200.0.11")})
	golden := filepath.Join("testdata", "ruleset.golden")
	if os.Getenv("UPDATE_GOLDEN") != "" {
		if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Errorf("ruleset changed (UPDATE_GOLDEN=1 to accept):\n%s", got)
	}
}

// TestApplyRemove installs the rules in a real namespace, replaces them,
// and removes them, leaving nothing.
func TestApplyRemove(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make a network namespace")
	}
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("nft not installed: run make deps")
	}
	name, path := netnstest.New(t, "ambit-nft-test")
	if err := Remove(path); err != nil {
		t.Fatalf("removing absent rules: %v", err)
	}
	for i := 0; i < 2; i++ { // the second Apply replaces
		if err := Apply(path, []netip.Addr{netip.MustParseAddr("10.0.0.1")}); err != nil {
			t.Fatal(err)
		}
	}
	if ok, err := Installed(path); err != nil || !ok {
		t.Fatalf("installed: %v %v", ok, err)
	}
	if ok, err := RoutingInstalled(path); err != nil || !ok {
		t.Fatalf("policy routing installed: %v %v", ok, err)
	}
	if rules := ipOut(t, name, "-4", "rule", "list", "pref", "32764"); strings.Count(rules, "lookup 133") != 1 {
		t.Errorf("want exactly one rule after two Applies, got:\n%s", rules)
	}
	if routes := ipOut(t, name, "-4", "route", "show", "table", "133"); !strings.Contains(routes, "local default dev lo") {
		t.Errorf("want the local route in table 133, got:\n%s", routes)
	}
	if err := Remove(path); err != nil {
		t.Fatal(err)
	}
	if ok, err := Installed(path); err != nil || ok {
		t.Fatalf("after remove: installed %v %v", ok, err)
	}
	if ok, err := RoutingInstalled(path); err != nil || ok {
		t.Fatalf("after remove: policy routing installed %v %v", ok, err)
	}
	if routes := ipOut(t, name, "-4", "route", "show", "table", "all"); strings.Contains(routes, "table 133") {
		t.Errorf("after remove: table 133 still has routes:\n%s", routes)
	}
}

// TestTransparentReturnPath checks the kernel behaviour the return path
// relies on, in real namespaces joined by a veth: ztunnel's transparent
// dial from the client's address reaches the app in the pod, the app sees
// the client's address, and its replies come back to ztunnel's socket
// instead of leaving through the veth (the client namespace would answer
// them with a RST and the dial would fail).
func TestTransparentReturnPath(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make network namespaces")
	}
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("nft not installed: run make deps")
	}
	pod, path := netnstest.New(t, "ambit-nft-pod")
	client, _ := netnstest.New(t, "ambit-nft-cli")
	netnstest.IP(t, "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", client)
	netnstest.IP(t, "-n", pod, "addr", "add", "10.99.0.1/24", "dev", "eth0")
	netnstest.IP(t, "-n", client, "addr", "add", "10.99.0.2/24", "dev", "eth0")
	netnstest.IP(t, "-n", pod, "link", "set", "eth0", "up")
	netnstest.IP(t, "-n", client, "link", "set", "eth0", "up")
	if err := Apply(path, nil); err != nil {
		t.Fatal(err)
	}
	ns, err := inpod.OpenNetNS(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ns.Close() }()
	app, err := ns.Listen(context.Background(), "10.99.0.1:8080", true)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = app.Close() }()
	peer := make(chan string, 1)
	go func() {
		c, err := app.Accept()
		if err != nil {
			peer <- err.Error()
			return
		}
		defer func() { _ = c.Close() }()
		peer <- c.RemoteAddr().(*net.TCPAddr).IP.String()
		_, _ = c.Write([]byte("hi"))
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := ns.TransparentDialer(netip.MustParseAddr("10.99.0.2"))(ctx, "tcp", "10.99.0.1:8080")
	if err != nil {
		t.Fatalf("transparent dial: %v", err)
	}
	defer func() { _ = c.Close() }()
	if got := <-peer; got != "10.99.0.2" {
		t.Errorf("app saw peer %s, want the client 10.99.0.2", got)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 2)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hi" {
		t.Errorf("reading the app's reply: %q %v", buf, err)
	}
}

func ipOut(t *testing.T, netns string, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"-n", netns}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}
