//go:build linux

package bpf

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/netnsexec"
)

// ownCgroup returns the cgroup v2 directory of this process: attaching the
// shortcut there covers the test's sockets (and touches nothing else: the
// programs act on enrolled namespaces only, and the test's are its own).
func ownCgroup(t testing.TB) string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	var rel string
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			rel = p
		}
	}
	if rel == "" {
		t.Skip("no cgroup v2 (no 0:: line in /proc/self/cgroup)")
	}
	mounts, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(bytes.NewReader(mounts))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) > 2 && f[2] == "cgroup2" {
			return filepath.Join(f[1], rel)
		}
	}
	t.Skip("no cgroup2 mount")
	return ""
}

// shortcutNetns makes a netns with a pod address and the shortcut attached
// (enrolled when enrol is set) and returns the netns path and the shortcut.
func shortcutNetns(t testing.TB, enrol bool) (string, *Shortcut) {
	t.Helper()
	nsPath := newNetns(t)
	addPodInterface(t, nsPath, "10.99.0.2/32")
	pinDir := filepath.Join(newBPFFS(t), "shortcut")
	s, err := AttachShortcut(ownCgroup(t), pinDir)
	if err != nil {
		t.Fatalf("%+v", err)
	}
	t.Cleanup(func() {
		_ = s.Close()
		if err := DetachShortcut(pinDir); err != nil {
			t.Error(err)
		}
	})
	if enrol {
		if _, err := s.Enrol(nsPath, []netip.Addr{netip.MustParseAddr("10.99.0.2")}); err != nil {
			t.Fatal(err)
		}
	}
	return nsPath, s
}

func stats(t *testing.T, s *Shortcut) ShortcutStats {
	t.Helper()
	st, err := s.Stats()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestShortcutPairsLocalEnds checks which local connections take the
// shortcut: the app's own connections and ztunnel's deliveries to the app
// in an enrolled namespace do; ztunnel's dials elsewhere and anything in a
// namespace not enrolled do not. Bytes arrive whole and in order both ways,
// half-close works, and a send to a closed peer fails as over TCP.
func TestShortcutPairsLocalEnds(t *testing.T) {
	requireRoot(t)
	nsPath, s := shortcutNetns(t, true)
	ln := listen(t, nsPath, "10.99.0.2:8080", false)

	// The app connects (to itself here; ztunnel's :15001 in a pod): both
	// ends are paired and the bytes take the shortcut.
	c := mustDial(t, nsPath, "10.99.0.2:8080")
	srv := acceptFrom(t, ln, "app listener", c)
	before := stats(t, s)
	if before.Paired != 2 {
		t.Fatalf("paired = %d after the app's connection, want 2 (both ends)", before.Paired)
	}
	transfer(t, c, srv, 8<<20, 1<<20)
	after := stats(t, s)
	if after.Shortcut == before.Shortcut {
		t.Errorf("no send took the shortcut: %+v", after)
	}
	if after.TCP != before.TCP {
		t.Errorf("%d sends went over TCP, want none: %+v", after.TCP-before.TCP, after)
	}

	// ztunnel delivering to the app: with its inbound mark, from the
	// client's address, to the pod's address, and the app's answers
	// routed back through lo as the node agent sets it up.
	ipNetns(t, nsPath, "rule", "add", "fwmark", "0x111/0xfff", "lookup", "133")
	ipNetns(t, nsPath, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "133")
	if err := netnsexec.RunPath(nsPath, func() error {
		return os.WriteFile("/proc/sys/net/ipv4/tcp_fwmark_accept", []byte("1"), 0o644)
	}); err != nil {
		t.Fatal(err)
	}
	d, err := dialTransparent(nsPath, netip.MustParseAddr("10.99.7.7"), 0x111, "10.99.0.2:8080")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close() })
	srv2 := acceptFrom(t, ln, "app listener", d)
	if got := stats(t, s).Paired; got != 4 {
		t.Errorf("paired = %d after ztunnel's delivery, want 4", got)
	}
	before = stats(t, s)
	transfer(t, d, srv2, 1<<20, 64<<10)
	if after := stats(t, s); after.TCP != before.TCP || after.Shortcut == before.Shortcut {
		t.Errorf("delivery: stats %+v → %+v, want shortcut sends only", before, after)
	}

	// ztunnel's own dial to another address (HBONE, passthrough): not
	// paired, and so neither is the end that accepts it.
	other := listen(t, nsPath, "127.0.0.1:8081", false)
	before = stats(t, s)
	e, err := dialTransparent(nsPath, netip.MustParseAddr("127.0.0.1"), 0x539, "127.0.0.1:8081")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close() })
	srv3 := acceptFrom(t, other, "other listener", e)
	exchange(t, e, srv3)
	if after := stats(t, s); after.Paired != before.Paired || after.Shortcut != before.Shortcut {
		t.Errorf("ztunnel's dial elsewhere: stats %+v → %+v, want it left on TCP", before, after)
	}

	// The peer closes: the sender gets TCP's errors, not the program's.
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	var werr error
	for range 100 {
		if _, werr = c.Write(make([]byte, 64<<10)); werr != nil {
			break
		}
	}
	if !errors.Is(werr, syscall.EPIPE) && !errors.Is(werr, syscall.ECONNRESET) {
		t.Errorf("writing to a closed peer: %v, want EPIPE or ECONNRESET", werr)
	}
}

// TestShortcutNotEnrolled checks that a namespace that is not enrolled is
// left alone.
func TestShortcutNotEnrolled(t *testing.T) {
	requireRoot(t)
	nsPath, s := shortcutNetns(t, false)
	ln := listen(t, nsPath, "10.99.0.2:8080", false)
	c := mustDial(t, nsPath, "10.99.0.2:8080")
	srv := acceptFrom(t, ln, "listener", c)
	transfer(t, c, srv, 1<<20, 1<<20)
	if st := stats(t, s); st != (ShortcutStats{}) {
		t.Errorf("stats %+v in a namespace not enrolled, want none", st)
	}
}

// TestShortcutForget checks that after Forget new connections stay on TCP
// while those already paired keep working.
func TestShortcutForget(t *testing.T) {
	requireRoot(t)
	nsPath, s := shortcutNetns(t, false)
	cookie, err := s.Enrol(nsPath, []netip.Addr{netip.MustParseAddr("10.99.0.2")})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := s.Enrolled(); err != nil || len(got) != 1 || got[0] != cookie {
		t.Fatalf("Enrolled = %v, %v, want [%d]", got, err, cookie)
	}
	ln := listen(t, nsPath, "10.99.0.2:8080", false)
	c := mustDial(t, nsPath, "10.99.0.2:8080")
	srv := acceptFrom(t, ln, "listener", c)
	if err := s.Forget(cookie); err != nil {
		t.Fatal(err)
	}
	if err := s.Forget(cookie); err != nil {
		t.Errorf("second Forget: %v, want nil", err)
	}
	c2 := mustDial(t, nsPath, "10.99.0.2:8080")
	srv2 := acceptFrom(t, ln, "listener", c2)
	if got := stats(t, s).Paired; got != 2 {
		t.Errorf("paired = %d, want 2 (the connection from before Forget only)", got)
	}
	transfer(t, c, srv, 1<<20, 1<<20)
	transfer(t, c2, srv2, 1<<20, 1<<20)
}

// TestAttachShortcutIdempotent checks that attaching again reuses the
// pinned maps (the enrolled namespaces survive an agent restart) and that
// DetachShortcut removes the pins.
func TestAttachShortcutIdempotent(t *testing.T) {
	requireRoot(t)
	nsPath := newNetns(t)
	addPodInterface(t, nsPath, "10.99.0.2/32")
	pinDir := filepath.Join(newBPFFS(t), "shortcut")
	cg := ownCgroup(t)
	s, err := AttachShortcut(cg, pinDir)
	if err != nil {
		t.Fatal(err)
	}
	cookie, err := s.Enrol(nsPath, []netip.Addr{netip.MustParseAddr("10.99.0.2")})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = AttachShortcut(cg, pinDir)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := s.Enrolled(); err != nil || len(got) != 1 || got[0] != cookie {
		t.Errorf("Enrolled after re-attach = %v, %v, want [%d]", got, err, cookie)
	}
	ln := listen(t, nsPath, "10.99.0.2:8080", false)
	c := mustDial(t, nsPath, "10.99.0.2:8080")
	srv := acceptFrom(t, ln, "listener", c)
	transfer(t, c, srv, 1<<20, 1<<20)
	if st := stats(t, s); st.Paired != 2 || st.Shortcut == 0 {
		t.Errorf("stats after re-attach %+v, want 2 paired and shortcut sends", st)
	}
	_ = s.Close()
	if err := DetachShortcut(pinDir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(pinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin directory after DetachShortcut: %v, want it gone", err)
	}
}

// transfer sends n random bytes from a to b and m back after a half-closes,
// as a proxy does, and checks both arrive whole and in order and that each
// side then reads EOF.
func transfer(t *testing.T, a, b net.Conn, n, m int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	if err := errors.Join(a.SetDeadline(deadline), b.SetDeadline(deadline)); err != nil {
		t.Fatal(err)
	}
	up, down := randomBytes(n), randomBytes(m)
	errc := make(chan error, 1)
	go func() {
		got, err := io.ReadAll(b) // until a's half-close
		if err == nil && sha256.Sum256(got) != sha256.Sum256(up) {
			err = errors.New("bytes from the client differ from those sent")
		}
		if err == nil {
			_, err = b.Write(down)
		}
		if err == nil {
			err = b.(*net.TCPConn).CloseWrite()
		}
		errc <- err
	}()
	if _, err := a.Write(up); err != nil {
		t.Fatalf("sending: %v", err)
	}
	if err := a.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(a)
	if err != nil {
		t.Fatalf("reading the answer: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("server side: %v", err)
	}
	if sha256.Sum256(got) != sha256.Sum256(down) {
		t.Fatalf("answer differs from what was sent (%d bytes, want %d)", len(got), len(down))
	}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{1})
	_, _ = r.Read(b)
	return b
}

// BenchmarkLocalHop measures one TCP connection inside a namespace with and
// without the shortcut: bulk throughput (256 KiB writes, as ztunnel's copy
// buffers) and 1 KB request/response round trips.
func BenchmarkLocalHop(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	for _, mode := range []string{"tcp", "shortcut"} {
		b.Run(mode+"/bulk", func(b *testing.B) {
			c, s := benchConn(b, mode == "shortcut")
			buf := make([]byte, bulkSize)
			go func() { _, _ = io.Copy(io.Discard, s) }()
			b.SetBytes(int64(len(buf)))
			b.ReportAllocs()
			b.ResetTimer()
			cpu := cpuTime(b)
			for range b.N {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(cpuTime(b)-cpu)/float64(b.N)/float64(len(buf)/1024), "cpu-ns/KiB")
		})
		b.Run(mode+"/rr1k", func(b *testing.B) {
			c, s := benchConn(b, mode == "shortcut")
			go func() {
				buf := make([]byte, 1024)
				for {
					if _, err := io.ReadFull(s, buf); err != nil {
						return
					}
					if _, err := s.Write(buf); err != nil {
						return
					}
				}
			}()
			buf := make([]byte, 1024)
			b.ReportAllocs()
			b.ResetTimer()
			cpu := cpuTime(b)
			for range b.N {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, buf); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(cpuTime(b)-cpu)/float64(b.N), "cpu-ns/op")
		})
	}
}

func benchConn(b *testing.B, shortcut bool) (net.Conn, net.Conn) {
	nsPath, _ := shortcutNetns(b, shortcut)
	ln := listen(b, nsPath, "10.99.0.2:8080", false)
	c, err := dial(nsPath, "10.99.0.2:8080", 5*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = c.Close(); _ = s.Close() })
	return c, s
}

// cpuTime is the process's user and system CPU time so far, in ns: both
// ends of the connection are in this process, so this is the whole cost of
// the hop, kernel included (softirq work is charged to the process it
// interrupts, which is one of the two ends here).
func cpuTime(b *testing.B) int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}

var bulkSize = func() int {
	if v, err := strconv.Atoi(os.Getenv("BULK")); err == nil {
		return v
	}
	return 256 << 10
}()
