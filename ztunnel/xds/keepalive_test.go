package xds_test

import (
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	xdsserver "github.com/ambitmesh/ambit/controller/xds"
	"github.com/ambitmesh/ambit/ztunnel/state"
	"github.com/ambitmesh/ambit/ztunnel/xds"
)

// relay forwards TCP connections to a server until it is told to go
// silent: the connections open then stop carrying anything either way
// while staying open, as when the server's node vanishes without a FIN.
// Connections made later are forwarded again (a new controller).
type relay struct {
	ln     net.Listener
	mu     sync.Mutex
	silent map[net.Conn]bool
}

func newRelay(t *testing.T, to string) *relay {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &relay{ln: ln, silent: map[net.Conn]bool{}}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", to)
			if err != nil {
				_ = c.Close()
				continue
			}
			t.Cleanup(func() { _ = c.Close(); _ = s.Close() })
			r.mu.Lock()
			r.silent[c] = false
			r.mu.Unlock()
			go r.pipe(c, s, c)
			go r.pipe(s, c, c)
		}
	}()
	return r
}

// pipe copies src to dst while the client connection key is not silent,
// and discards what arrives after.
func (r *relay) pipe(dst, src, key net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		r.mu.Lock()
		silent := r.silent[key]
		r.mu.Unlock()
		if n > 0 && !silent {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if !silent { // a silent connection stays open
				_ = dst.Close()
			}
			return
		}
	}
}

// silence makes every connection open now silent.
func (r *relay) silence() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for c := range r.silent {
		r.silent[c] = true
	}
}

// TestKeepaliveReconnects checks that the client leaves a connection that
// went silent, thanks to its pings, and opens a new stream, against a server
// with the controller's keepalive settings (which must let the pings
// through). It takes about 20 s: gRPC pings at most every 10 s.
func TestKeepaliveReconnects(t *testing.T) {
	f := &fakeADS{streams: make(chan *fakeStream, 4)}
	addr, tlsConf := serveTLSWith(t, f, xdsserver.ServerKeepalive()...)
	r := newRelay(t, addr)
	client, err := xds.New(xds.Options{
		Addr:           r.ln.Addr().String(),
		TLS:            tlsConf,
		NodeID:         "node-1",
		Store:          state.New(),
		Log:            slog.New(slog.NewTextHandler(io.Discard, nil)),
		InitialBackoff: 10 * time.Millisecond,
		MaxBackoff:     50 * time.Millisecond,
		Keepalive:      10 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	runClient(t, client)

	first := f.stream(t)
	first.request(t)
	r.silence()
	select {
	case <-f.streams:
	case <-time.After(10*time.Second + xds.KeepaliveTimeout + 15*time.Second):
		t.Fatal("the client kept a connection that went silent: no new stream")
	}
}
