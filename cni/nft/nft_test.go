package nft

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
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
	name := fmt.Sprintf("ambit-nft-test-%d-%d", os.Getpid(), time.Now().UnixNano()%100000)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "delete", name).Run() })
	path := "/run/netns/" + name
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
	if err := Remove(path); err != nil {
		t.Fatal(err)
	}
	if ok, err := Installed(path); err != nil || ok {
		t.Fatalf("after remove: installed %v %v", ok, err)
	}
}
