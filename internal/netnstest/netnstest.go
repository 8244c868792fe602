// Package netnstest makes network namespaces for tests: named, with lo up,
// and removed when the test ends, also when it fails.
package netnstest

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// RequireRoot skips the test, saying why, when not run as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces): run `make test` as root")
	}
}

// New makes a network namespace named prefix-<random> with lo up, removed
// when the test ends, and returns its name and path (/run/netns/<name>).
func New(t testing.TB, prefix string) (name, path string) {
	t.Helper()
	name = fmt.Sprintf("%s-%08x", prefix, rand.Uint32())
	IP(t, "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "delete", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns delete %s: %v: %s", name, err, out)
		}
	})
	IP(t, "-n", name, "link", "set", "lo", "up")
	return name, "/run/netns/" + name
}

// IP runs ip(8) with args and fails the test if it fails.
func IP(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}
