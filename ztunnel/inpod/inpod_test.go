package inpod

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/api/zdsapi"
	"github.com/ambitmesh/ambit/internal/netnstest"
)

// recorder is a Handler that records what it was told.
type recorder struct {
	mu      sync.Mutex
	added   map[string]*NetNS
	deleted []string
	present map[string]bool
	events  chan string
}

var _ Handler = (*recorder)(nil)

func newRecorder() *recorder {
	return &recorder{added: map[string]*NetNS{}, events: make(chan string, 100)}
}

func (r *recorder) Add(_ context.Context, uid string, info *zdsapi.WorkloadInfo, ns *NetNS) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if old := r.added[uid]; old != nil {
		_ = old.Close()
	}
	r.added[uid] = ns
	ev := "add " + uid + " " + info.GetNamespace() + "/" + info.GetName()
	if m := ns.SockMap(); m != nil {
		ev += " sockmap=" + inode(m)
	}
	r.events <- ev
	return nil
}

func (r *recorder) Del(uid string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if ns := r.added[uid]; ns != nil {
		_ = ns.Close()
	}
	delete(r.added, uid)
	r.deleted = append(r.deleted, uid)
	r.events <- "del " + uid
	return nil
}

func (r *recorder) Reconcile(present map[string]bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.present = present
	for uid, ns := range r.added {
		if !present[uid] {
			_ = ns.Close()
			delete(r.added, uid)
		}
	}
	r.events <- fmt.Sprintf("snapshot %d", len(present))
}

func expect(t *testing.T, r *recorder, want ...string) {
	t.Helper()
	for _, w := range want {
		select {
		case got := <-r.events:
			if got != w {
				t.Fatalf("event %q, want %q", got, w)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no event, want %q", w)
		}
	}
}

// inode names the file behind f, to check that an fd passed over ZDS is
// the one sent.
func inode(f *os.File) string {
	fi, err := f.Stat()
	if err != nil {
		return "?"
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return "?"
	}
	return fmt.Sprint(st.Ino)
}

func requireRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make network namespaces")
	}
}

// newNetns makes a named network namespace with lo up, removed at cleanup.
func newNetns(t *testing.T) string {
	t.Helper()
	_, path := netnstest.New(t, "ambit-inpod-test")
	return path
}

// TestZDSSnapshotAndReconnect plays the node agent: pods enrolled before
// ztunnel connects arrive as a snapshot; later changes arrive live; a
// reconnecting ztunnel gets a new snapshot without the removed pod; a
// pod's SOCKMAP fd (eBPF mode; a pipe stands in for it) travels with its
// netns, live and in snapshots.
func TestZDSSnapshotAndReconnect(t *testing.T) {
	requireRoot(t)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	sock := filepath.Join(t.TempDir(), "zds.sock")
	srv, err := NewServer(sock, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Serve's error is not checked: the deferred Close makes it return one
	// after the test is over, and a broken accept loop shows up as missing
	// events below.
	go func() { _ = srv.Serve(ctx) }()
	defer func() { _ = srv.Close() }()
	nsA, nsB := newNetns(t), newNetns(t)
	if err := srv.Upsert("uid-a", &zdsapi.WorkloadInfo{Name: "a", Namespace: "ns"}, nsA, nil); !errors.Is(err, ErrNoZtunnel) {
		t.Fatalf("upsert before ztunnel: %v", err)
	}

	r := newRecorder()
	cctx, ccancel := context.WithCancel(ctx)
	client := &Client{Path: sock, Handler: r, Log: log}
	done := make(chan struct{})
	go func() { _ = client.Run(cctx); close(done) }() // Run returns nil once cctx is done
	expect(t, r, "add uid-a ns/a", "snapshot 1")

	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = pw.Close() }()
	pipe := inode(pr)
	if err := srv.Upsert("uid-b", &zdsapi.WorkloadInfo{Name: "b", Namespace: "ns"}, nsB, pr); err != nil {
		t.Fatal(err)
	}
	expect(t, r, "add uid-b ns/b sockmap="+pipe)
	if err := srv.Remove("uid-a"); err != nil {
		t.Fatal(err)
	}
	expect(t, r, "del uid-a")

	// ztunnel restarts: a new client gets the current state.
	ccancel()
	<-done
	r2 := newRecorder()
	go func() { _ = (&Client{Path: sock, Handler: r2, Log: log}).Run(ctx) }()
	expect(t, r2, "add uid-b ns/b sockmap="+pipe, "snapshot 1")
}

// TestNetNSListenAndDial opens a listener inside a namespace through the fd
// and checks it is there (and not in ours), and that OriginalDst falls back
// to the local address for a connection that was not redirected.
func TestNetNSListenAndDial(t *testing.T) {
	requireRoot(t)
	path := newNetns(t)
	ns, err := OpenNetNS(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ns.Close() }()
	ln, err := ns.Listen(context.Background(), "127.0.0.1:15001", false)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		dst, _ := OriginalDst(c)
		// A failed write shows up as a wrong answer below.
		_, _ = fmt.Fprintf(c, "%s\n", dst)
		_ = c.Close()
	}()
	// Our own namespace has no such listener...
	if c, err := net.DialTimeout("tcp", "127.0.0.1:15001", 200*time.Millisecond); err == nil {
		_ = c.Close()
		t.Fatal("listener leaked into the test's namespace")
	}
	// ...the pod's has.
	c, err := ns.Dialer()(context.Background(), "tcp", "127.0.0.1:15001")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	b, _ := io.ReadAll(c)
	if got := strings.TrimSpace(string(b)); got != "127.0.0.1:15001" {
		t.Errorf("original dst %q", got)
	}
}
