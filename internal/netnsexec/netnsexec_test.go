package netnsexec

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ambitmesh/ambit/internal/netnstest"
)

func statIno(path string) (uint64, error) {
	var st unix.Stat_t
	err := unix.Stat(path, &st)
	return st.Ino, err
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	ino, err := statIno(path)
	if err != nil {
		t.Fatal(err)
	}
	return ino
}

// TestRunPath runs in a fresh namespace, sees it, and leaves the caller's
// threads in their own; a missing namespace is an error.
func TestRunPath(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces): run `make test` as root")
	}
	_, path := netnstest.New(t, "ambit-netnsexec")
	want, self := inode(t, path), inode(t, "/proc/self/ns/net")
	for range 3 { // the thread goes back each time
		var got uint64
		err := RunPath(path, func() error {
			var err error
			got, err = statIno("/proc/thread-self/ns/net")
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Fatalf("inside: netns %d, want %d", got, want)
		}
		if now := inode(t, "/proc/thread-self/ns/net"); now != self {
			t.Fatalf("caller's thread in netns %d afterwards, want its own %d", now, self)
		}
	}
	if err := RunPath("/run/netns/ambit-no-such-netns", func() error { return nil }); err == nil {
		t.Error("RunPath of a missing namespace succeeded")
	}
}
