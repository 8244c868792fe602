package nodeagent

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/netnsexec"
	"github.com/ambitmesh/ambit/internal/netnstest"
)

func TestEnrolled(t *testing.T) {
	amb := map[string]string{LabelDataplaneMode: DataplaneModeAmbient}
	none := map[string]string{LabelDataplaneMode: DataplaneModeNone}
	other := map[string]string{LabelDataplaneMode: "sidecar"}
	tests := []struct {
		name    string
		ns, pod map[string]string
		want    bool
	}{
		{"namespace enrols", amb, nil, true},
		{"pod opts out", amb, none, false},
		{"pod opts in", nil, amb, true},
		{"pod opts in, namespace none", none, amb, true},
		{"no labels", nil, nil, false},
		{"other namespace mode", other, nil, false},
		{"other pod mode defers to namespace", amb, other, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := Enrolled(tc.ns, tc.pod); got != tc.want {
				t.Errorf("Enrolled = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestFindNetns puts an address in a fresh namespace with a process in it
// and finds the namespace from the address, as for a running pod.
func TestFindNetns(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make a network namespace")
	}
	name, _ := netnstest.New(t, "ambit-findns")
	netnstest.IP(t, "-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
	netnstest.IP(t, "-n", name, "addr", "add", "192.0.2.77/32", "dev", "d0")
	sleeper := exec.Command("nsenter", "--net=/run/netns/"+name, "--", "sleep", "60")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sleeper.Process.Kill(); _ = sleeper.Wait() })
	var path string
	var err error
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if path, err = FindNetns(netip.MustParseAddr("192.0.2.77")); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("FindNetns: %v", err)
	}
	want, _ := os.Stat("/run/netns/" + name)
	got, _ := os.Stat(path)
	if !os.SameFile(want, got) {
		t.Errorf("found %s, not the namespace holding the address", path)
	}
	if filepath.Base(path) != name {
		t.Errorf("found %s, want its bind mount (/run/netns/%s: a path that lasts as long as the namespace)", path, name)
	}
	if _, err := FindNetns(netip.MustParseAddr("192.0.2.78")); err == nil {
		t.Error("found a namespace for an address nobody has")
	}
}

// TestStablePath checks that a namespace without a bind mount is named
// through its oldest process, not through the one the search happened to
// meet (a kubectl exec that ends in a second).
func TestStablePath(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make a network namespace")
	}
	start := func(args ...string) int {
		t.Helper()
		c := exec.Command(args[0], args[1:]...)
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Process.Kill(); _ = c.Wait() })
		return c.Process.Pid
	}
	first := start("unshare", "--net", "sleep", "60")
	ns := fmt.Sprintf("/proc/%d/ns/net", first)
	self, _ := os.Stat("/proc/self/ns/net")
	var st os.FileInfo
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		// unshare has made the namespace once its own differs from ours.
		if s, err := os.Stat(ns); err == nil && !os.SameFile(s, self) {
			st = s
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("unshare made no namespace")
		}
	}
	later := start("nsenter", "--net="+ns, "--", "sleep", "60")
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if s, err := os.Stat(fmt.Sprintf("/proc/%d/ns/net", later)); err == nil && os.SameFile(s, st) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("nsenter did not enter the namespace")
		}
	}
	if got := stablePath(st, later); got != ns {
		t.Errorf("stablePath from the later process = %s, want the first's %s", got, ns)
	}
}

// TestSetTWReuse checks that enrolment's tcp_tw_reuse goes into the pod's
// namespace only, and that release puts the kernel's default back.
func TestSetTWReuse(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make a network namespace")
	}
	_, path := netnstest.New(t, "ambit-twreuse")
	read := func(ns string) string {
		t.Helper()
		var v string
		if err := netnsexec.RunPath(ns, func() error {
			b, err := os.ReadFile(twReusePath)
			v = strings.TrimSpace(string(b))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return v
	}
	own := read("/proc/self/ns/net")
	if err := setTWReuse(path, twReuseEnrolled); err != nil {
		t.Fatal(err)
	}
	if got := read(path); got != "1" {
		t.Errorf("tcp_tw_reuse in the pod = %s after enrolment, want 1", got)
	}
	if got := read("/proc/self/ns/net"); got != own {
		t.Errorf("tcp_tw_reuse here changed from %s to %s", own, got)
	}
	if err := setTWReuse(path, twReuseDefault); err != nil {
		t.Fatal(err)
	}
	if got := read(path); got != "2" {
		t.Errorf("tcp_tw_reuse in the pod = %s after release, want the default 2", got)
	}
}
