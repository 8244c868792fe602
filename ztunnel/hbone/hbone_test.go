package hbone

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestEcho(t *testing.T) {
	checkLeaks(t)
	e := newEnv(t, echoHandler)
	s := e.connect(t, "10.0.0.1:80")
	defer func() { _ = s.Close() }()
	if _, err := s.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 5)
	if _, err := io.ReadFull(s, got); err != nil || string(got) != "hello" {
		t.Fatalf("read %q, %v", got, err)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if rest, err := io.ReadAll(s); err != nil || len(rest) != 0 {
		t.Fatalf("after CloseWrite: %q, %v; want EOF", rest, err)
	}
	if _, err := s.Write([]byte("x")); !errors.Is(err, ErrWriteAfterCloseWrite) {
		t.Fatalf("Write after CloseWrite: %v", err)
	}
}

func TestHalfClose(t *testing.T) {
	checkLeaks(t)
	// The server reads the request to its end, then answers: only works if
	// the client's half-close reaches it while the other direction stays open.
	answerAfterEOF := HandlerFunc(func(ctx context.Context, req *Request, rw Responder) {
		s, err := rw.Accept()
		if err != nil {
			return
		}
		req2, err := io.ReadAll(s)
		if err != nil {
			return
		}
		_, _ = fmt.Fprintf(s, "got %d bytes", len(req2))
		_ = s.CloseWrite()
	})
	// The server says its piece and half-closes first, then reads until the
	// client ends and answers with the count... on a closed direction: so it
	// just records what it read.
	var serverRead atomic.Value
	speakFirst := HandlerFunc(func(ctx context.Context, req *Request, rw Responder) {
		s, err := rw.Accept()
		if err != nil {
			return
		}
		_, _ = s.Write([]byte("banner"))
		_ = s.CloseWrite()
		b, _ := io.ReadAll(s)
		serverRead.Store(string(b))
	})
	t.Run("client closes first", func(t *testing.T) {
		e := newEnv(t, answerAfterEOF)
		s := e.connect(t, "10.0.0.1:80")
		defer func() { _ = s.Close() }()
		_, _ = s.Write(bytes.Repeat([]byte("a"), 100000))
		if err := s.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(s)
		if err != nil || string(got) != "got 100000 bytes" {
			t.Fatalf("got %q, %v", got, err)
		}
	})
	t.Run("server closes first", func(t *testing.T) {
		e := newEnv(t, speakFirst)
		s := e.connect(t, "10.0.0.1:80")
		defer func() { _ = s.Close() }()
		got, err := io.ReadAll(s)
		if err != nil || string(got) != "banner" {
			t.Fatalf("got %q, %v", got, err)
		}
		if _, err := s.Write([]byte("still here")); err != nil {
			t.Fatalf("writing after the server's half-close: %v", err)
		}
		_ = s.CloseWrite()
		waitFor(t, "the server to read", func() bool { v, _ := serverRead.Load().(string); return v == "still here" })
	})
}

func TestPoolReuse(t *testing.T) {
	checkLeaks(t)
	t.Run("sequential", func(t *testing.T) {
		e := newEnv(t, echoHandler)
		for i := range 20 {
			s := e.connect(t, "10.0.0.1:80")
			_, _ = fmt.Fprintf(s, "%d", i)
			_ = s.CloseWrite()
			_, _ = io.ReadAll(s)
			_ = s.Close()
		}
		if n := e.ln.n.Load(); n != 1 {
			t.Fatalf("%d TCP connections for 20 sequential streams, want 1", n)
		}
	})
	t.Run("concurrent", func(t *testing.T) {
		e := newEnv(t, echoHandler)
		const n = 50
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for i := range n {
			wg.Go(func() {
				s, err := e.pool.Connect(context.Background(), e.key, "10.0.0.1:80", nil)
				if err != nil {
					errs <- err
					return
				}
				defer func() { _ = s.Close() }()
				msg := fmt.Sprintf("stream %d", i)
				_, _ = io.WriteString(s, msg)
				_ = s.CloseWrite()
				if got, err := io.ReadAll(s); err != nil || string(got) != msg {
					errs <- fmt.Errorf("echo %q: got %q, %v", msg, got, err) //nolint:errorlint // err may be nil here: printed, not wrapped
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if got := e.ln.n.Load(); got != 1 {
			t.Fatalf("%d TCP connections for %d concurrent streams, want 1", got, n)
		}
	})
	t.Run("keys", func(t *testing.T) {
		e := newEnv(t, echoHandler)
		keys := []Key{e.key, e.key, {SrcIdentity: otherID, DstIdentity: serverID, Addr: e.key.Addr}, {SrcIdentity: otherID, DstIdentity: serverID, Addr: e.key.Addr}}
		var streams []Stream
		for _, k := range keys {
			s, err := e.pool.Connect(context.Background(), k, "10.0.0.1:80", nil)
			if err != nil {
				t.Fatal(err)
			}
			streams = append(streams, s)
		}
		for _, s := range streams {
			_ = s.Close()
		}
		if got := e.ln.n.Load(); got != 2 {
			t.Fatalf("%d TCP connections for 2 keys, want 2", got)
		}
	})
	t.Run("stream limit", func(t *testing.T) {
		e := newEnv(t, echoHandler, func(o *envOptions) { o.pool.MaxStreamsPerConn = 2 })
		var streams []Stream
		for range 5 {
			streams = append(streams, e.connect(t, "10.0.0.1:80"))
		}
		for _, s := range streams {
			_ = s.Close()
		}
		if got := e.ln.n.Load(); got != 3 {
			t.Fatalf("%d TCP connections for 5 streams at 2 per connection, want 3", got)
		}
	})
	t.Run("peer stream limit", func(t *testing.T) {
		e := newEnv(t, echoHandler, func(o *envOptions) { o.server.MaxConcurrentStreams = 3 })
		// The first stream learns the peer's SETTINGS.
		s := e.connect(t, "10.0.0.1:80")
		streams := []Stream{s}
		for range 6 {
			streams = append(streams, e.connect(t, "10.0.0.1:80"))
		}
		for _, s := range streams {
			_ = s.Close()
		}
		if got := e.ln.n.Load(); got != 3 {
			t.Fatalf("%d TCP connections for 7 streams at 3 per connection, want 3", got)
		}
	})
}

func TestStatusCodes(t *testing.T) {
	checkLeaks(t)
	// The handler answers with the status code that is the target's port.
	h := HandlerFunc(func(ctx context.Context, req *Request, rw Responder) {
		code := int(req.Target.Port())
		if code == http.StatusOK {
			s, err := rw.Accept()
			if err == nil {
				_, _ = s.Write([]byte("ok"))
			}
			return
		}
		_ = rw.Reject(code)
	})
	e := newEnv(t, h)
	tests := []struct {
		name string
		code int
	}{
		{"ok", 200},
		{"policy denial", 401},
		{"bad request", 400},
		{"unreachable", 503},
		{"forbidden", 403},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := e.pool.Connect(context.Background(), e.key, fmt.Sprintf("10.0.0.1:%d", tc.code), nil)
			if tc.code == 200 {
				if err != nil {
					t.Fatal(err)
				}
				defer func() { _ = s.Close() }()
				if b, err := io.ReadAll(s); err != nil || string(b) != "ok" {
					t.Fatalf("read %q, %v", b, err)
				}
				return
			}
			var se *StatusError
			if !errors.As(err, &se) || se.Code != tc.code {
				t.Fatalf("Connect: %v, want *StatusError{%d}", err, tc.code)
			}
		})
	}
	// The rejected streams left the connection usable.
	s := e.connect(t, "10.0.0.1:200")
	_ = s.Close()
	if got := e.ln.n.Load(); got != 1 {
		t.Fatalf("%d connections, want 1", got)
	}
}

func TestHeadersAndPeerCertificate(t *testing.T) {
	checkLeaks(t)
	got := make(chan *Request, 1)
	h := HandlerFunc(func(ctx context.Context, req *Request, rw Responder) {
		got <- req
		_ = rw.Reject(http.StatusServiceUnavailable)
	})
	e := newEnv(t, h)
	hdr := http.Header{"Forwarded": {`for="10.0.0.9:4242"`}, "Baggage": {"k8s.namespace.name=default"}}
	_, err := e.pool.Connect(context.Background(), e.key, "[fd00::1]:8080", hdr)
	var se *StatusError
	if !errors.As(err, &se) || se.Code != 503 {
		t.Fatalf("Connect: %v", err)
	}
	req := <-got
	if req.Authority != "[fd00::1]:8080" || req.Target != netip.MustParseAddrPort("[fd00::1]:8080") {
		t.Errorf("authority %q target %v", req.Authority, req.Target)
	}
	if req.Header.Get("Forwarded") != `for="10.0.0.9:4242"` || req.Header.Get("Baggage") != "k8s.namespace.name=default" {
		t.Errorf("headers %v", req.Header)
	}
	if len(req.PeerCertificates) == 0 || req.PeerCertificates[0].URIs[0].String() != clientID {
		t.Errorf("peer certificates %v, want %s", req.PeerCertificates, clientID)
	}
	if req.RemoteAddr == nil || req.LocalAddr.String() != e.key.Addr.String() {
		t.Errorf("addresses %v %v", req.RemoteAddr, req.LocalAddr)
	}
}

func TestLargeTransfer(t *testing.T) {
	checkLeaks(t)
	size := 64 << 20
	if testing.Short() && raceEnabled {
		size = 16 << 20
	}
	e := newEnv(t, echoHandler)
	s := e.connect(t, "10.0.0.1:80")
	defer func() { _ = s.Close() }()
	src := rand.New(rand.NewPCG(1, 2))
	sent := sha256.New()
	writeErr := make(chan error, 1)
	go func() {
		buf := make([]byte, 300<<10) // not a multiple of any frame or block size
		for left := size; left > 0; {
			b := buf[:min(left, len(buf))]
			for i := range b {
				b[i] = byte(src.Uint32())
			}
			sent.Write(b)
			if _, err := s.Write(b); err != nil {
				writeErr <- err
				return
			}
			left -= len(b)
		}
		writeErr <- s.CloseWrite()
	}()
	recv := sha256.New()
	n, err := io.Copy(recv, s)
	if err != nil || n != int64(size) {
		t.Fatalf("echoed %d bytes, %v; want %d", n, err, size)
	}
	if err := <-writeErr; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(sent.Sum(nil), recv.Sum(nil)) {
		t.Fatal("checksum mismatch")
	}
}

func TestSlowReader(t *testing.T) {
	checkLeaks(t)
	var written atomic.Int64
	h := HandlerFunc(func(ctx context.Context, req *Request, rw Responder) {
		s, err := rw.Accept()
		if err != nil {
			return
		}
		if req.Target.Port() == 1 { // the fire hose
			buf := make([]byte, 1<<20)
			for {
				n, err := s.Write(buf)
				written.Add(int64(n))
				if err != nil {
					return
				}
			}
		}
		_, _ = io.Copy(s, s)
		_ = s.CloseWrite()
	})
	e := newEnv(t, h)
	hose := e.connect(t, "10.0.0.1:1")
	var read int64
	buf := make([]byte, 64<<10)
	for range 20 {
		n, err := hose.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		read += int64(n)
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	// The sender is held by flow control: it has written at most one
	// stream window beyond what was read.
	if ahead := written.Load() - read; ahead > streamWindow {
		t.Fatalf("sender is %d bytes ahead of a slow reader, want <= %d", ahead, streamWindow)
	}
	// Other streams on the same connection are not held up by it.
	s := e.connect(t, "10.0.0.1:2")
	_, _ = io.WriteString(s, "ping")
	_ = s.CloseWrite()
	if b, err := io.ReadAll(s); err != nil || string(b) != "ping" {
		t.Fatalf("second stream: %q, %v", b, err)
	}
	_ = s.Close()
	// Reading on drains the hose at full speed again.
	for range 64 {
		if _, err := io.ReadFull(hose, buf); err != nil {
			t.Fatal(err)
		}
	}
	_ = hose.Close()
	if got := e.ln.n.Load(); got != 1 {
		t.Fatalf("%d connections, want 1", got)
	}
}

func TestShutdown(t *testing.T) {
	checkLeaks(t)
	e := newEnv(t, echoHandler)
	s := e.connect(t, "10.0.0.1:80")
	done := make(chan error, 1)
	go func() { done <- e.srv.Shutdown(context.Background()) }()
	// New streams are refused: the listener is closed and the connection
	// is draining.
	waitFor(t, "Connect to fail", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		s2, err := e.pool.Connect(ctx, e.key, "10.0.0.1:80", nil)
		if err == nil {
			_ = s2.Close()
		}
		return err != nil
	})
	// The open stream still works, and Shutdown waits for it.
	_, _ = io.WriteString(s, "still open")
	b := make([]byte, len("still open"))
	if _, err := io.ReadFull(s, b); err != nil || string(b) != "still open" {
		t.Fatalf("open stream during shutdown: %q, %v", b, err)
	}
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned %v before the last stream ended", err)
	case <-time.After(50 * time.Millisecond):
	}
	_ = s.CloseWrite()
	if rest, err := io.ReadAll(s); err != nil || len(rest) != 0 {
		t.Fatalf("end of stream during shutdown: %q, %v", rest, err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	_ = s.Close()
}

func TestShutdownTimeout(t *testing.T) {
	checkLeaks(t)
	e := newEnv(t, echoHandler)
	s := e.connect(t, "10.0.0.1:80")
	defer func() { _ = s.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := e.srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown: %v, want deadline exceeded", err)
	}
	if _, err := io.ReadAll(s); err == nil {
		t.Fatal("stream survived a forced shutdown")
	}
}

// TestGoAway checks that the pool puts no new stream on a connection whose
// peer sent GOAWAY, while the streams already on it carry on. Two servers
// share the address: the first one shuts down (GOAWAY), the second takes
// the new connections.
func TestGoAway(t *testing.T) {
	checkLeaks(t)
	p := getPKI(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := &countingListener{Listener: l}
	first, second := newChanListener(l.Addr()), newChanListener(l.Addr())
	var current atomic.Pointer[chanListener]
	current.Store(first)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer func() { _ = ln.Close() }()
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			select {
			case current.Load().conns <- c:
			case <-current.Load().done:
				_ = c.Close()
			}
		}
	})
	servers := []Acceptor{
		newAcceptor(ServerOptions{TLSConfig: p.serverTLS(serverID), Handler: echoHandler}),
		newAcceptor(ServerOptions{TLSConfig: p.serverTLS(serverID), Handler: echoHandler}),
	}
	for i, cl := range []*chanListener{first, second} {
		wg.Go(func() { _ = servers[i].Serve(cl) })
		defer func() { _ = servers[i].Close() }() //nolint:gocritic // both servers run until the test ends
	}
	pool := newConnector(PoolOptions{TLSConfig: func(k Key) (*tls.Config, error) { return p.clientTLS(k.SrcIdentity, k.DstIdentity), nil }})
	defer func() { _ = pool.Close() }()
	k := Key{SrcIdentity: clientID, DstIdentity: serverID, Addr: netip.MustParseAddrPort(l.Addr().String())}
	connect := func() Stream {
		s, err := pool.Connect(context.Background(), k, "10.0.0.1:80", nil)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}

	s := connect()
	defer func() { _ = s.Close() }()
	current.Store(second)
	shutdown := make(chan error, 1)
	go func() { shutdown <- servers[0].Shutdown(context.Background()) }()
	// Once the first server has sent its GOAWAY, whether the pool has
	// read it yet or the draining server refuses the stream, the new
	// stream lands on a new connection.
	waitFor(t, "the first server's GOAWAY", func() bool { return goneAway(servers[0].(*Server)) })
	s2 := connect()
	defer func() { _ = s2.Close() }()
	if got := ln.n.Load(); got != 2 {
		t.Fatalf("%d connections, want a second one after GOAWAY", got)
	}
	for _, st := range []Stream{s, s2} {
		_, _ = io.WriteString(st, "x")
		_ = st.CloseWrite()
		if b, err := io.ReadAll(st); err != nil || string(b) != "x" {
			t.Fatalf("echo: %q, %v", b, err)
		}
	}
	if err := <-shutdown; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	s3 := connect() // reuses the second connection
	_ = s3.Close()
	if got := ln.n.Load(); got != 2 {
		t.Fatalf("%d connections, want 2", got)
	}
}

// goneAway reports whether srv is shutting down and has sent GOAWAY on
// every connection.
func goneAway(srv *Server) bool {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if !srv.shutting {
		return false
	}
	for c := range srv.conns {
		c.mu.Lock()
		draining := c.draining
		c.mu.Unlock()
		if !draining {
			return false
		}
	}
	return true
}

// TestConnectionError checks that losing a connection fails all its
// streams, and that the pool then dials a new one.
func TestConnectionError(t *testing.T) {
	checkLeaks(t)
	e := newEnv(t, echoHandler)
	var streams []Stream
	for range 3 {
		streams = append(streams, e.connect(t, "10.0.0.1:80"))
	}
	for _, c := range e.ln.accepted() {
		_ = c.Conn.Close() // under the server's feet
	}
	for _, s := range streams {
		if _, err := io.ReadAll(s); err == nil {
			t.Fatal("stream read EOF, want an error")
		}
		if _, err := s.Write([]byte("x")); err == nil {
			t.Fatal("write on a dead connection succeeded")
		}
		_ = s.Close()
	}
	s := e.connect(t, "10.0.0.1:80")
	_ = s.Close()
	if got := e.ln.n.Load(); got != 2 {
		t.Fatalf("%d connections, want 2", got)
	}
}

func TestHandlerContextAndReset(t *testing.T) {
	checkLeaks(t)
	cancelled := make(chan struct{})
	h := HandlerFunc(func(ctx context.Context, req *Request, rw Responder) {
		s, err := rw.Accept()
		if err != nil {
			return
		}
		<-ctx.Done()
		// The client's Close sent END_STREAM, then RST_STREAM CANCEL: what
		// it sent ends cleanly, and this side can no longer send.
		if _, err := io.ReadAll(s); err != nil {
			t.Errorf("read after END_STREAM and reset: %v", err)
		}
		var re *ResetError
		if _, err := s.Write([]byte("x")); !errors.As(err, &re) || re.Code != 0x8 || !re.Remote {
			t.Errorf("write after reset: %v, want CANCEL from the peer", err)
		}
		close(cancelled)
	})
	e := newEnv(t, h)
	s := e.connect(t, "10.0.0.1:80")
	_ = s.Close() // the server has not ended its side: this resets the stream
	select {
	case <-cancelled:
	case <-time.After(5 * time.Second):
		t.Fatal("handler context not cancelled by RST_STREAM")
	}
}

func TestIdleTimeout(t *testing.T) {
	checkLeaks(t)
	e := newEnv(t, echoHandler, func(o *envOptions) { o.pool.IdleTimeout = 50 * time.Millisecond })
	s := e.connect(t, "10.0.0.1:80")
	time.Sleep(100 * time.Millisecond) // an open stream keeps the connection
	s2 := e.connect(t, "10.0.0.1:80")
	_ = s.Close()
	_ = s2.Close()
	select {
	case <-e.ln.accepted()[0].closed:
	case <-time.After(5 * time.Second):
		t.Fatal("idle connection not closed")
	}
	_ = e.connect(t, "10.0.0.1:80").Close()
	if got := e.ln.n.Load(); got != 2 {
		t.Fatalf("%d connections, want a second one after the idle timeout", got)
	}
}

func TestDeadlines(t *testing.T) {
	checkLeaks(t)
	h := HandlerFunc(func(ctx context.Context, req *Request, rw Responder) {
		s, err := rw.Accept()
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, s) // reads but never writes
	})
	e := newEnv(t, h)
	s := e.connect(t, "10.0.0.1:80")
	defer func() { _ = s.Close() }()
	_ = s.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, err := s.Read(make([]byte, 10))
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("Read: %v, want a timeout", err)
	}
	_ = s.SetReadDeadline(time.Time{})
	if _, err := s.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}

	// A peer that does not read: writes stop at the stream window, and
	// the write deadline ends the wait for more.
	stalled := make(chan Stream, 1)
	e2 := newEnv(t, acceptStream(stalled, nil))
	w := e2.connect(t, "10.0.0.1:80")
	defer func() { _ = w.Close() }()
	_ = w.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
	n, err := w.Write(make([]byte, 2*streamWindow))
	if !errors.As(err, &ne) || !ne.Timeout() || n != streamWindow {
		t.Fatalf("Write to a stalled peer: %d bytes, %v; want %d bytes and a timeout", n, err, streamWindow)
	}
	_ = (<-stalled).Close()
}

func TestProxy(t *testing.T) {
	checkLeaks(t)
	// backend: reads the request to EOF, answers with its length and its
	// SHA-256, then closes.
	backend, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = backend.Close() }()
	go func() {
		for {
			c, err := backend.Accept()
			if err != nil {
				return
			}
			go func() {
				defer func() { _ = c.Close() }()
				h := sha256.New()
				n, _ := io.Copy(h, c)
				_, _ = fmt.Fprintf(c, "%d %x", n, h.Sum(nil))
			}()
		}
	}()
	var counts atomic.Value
	h := HandlerFunc(func(ctx context.Context, req *Request, rw Responder) {
		dst, err := net.Dial("tcp", req.Authority)
		if err != nil {
			_ = rw.Reject(http.StatusServiceUnavailable)
			return
		}
		s, err := rw.Accept()
		if err != nil {
			_ = dst.Close()
			return
		}
		in, out, err := Proxy(s, dst)
		counts.Store([3]any{in, out, err})
	})
	e := newEnv(t, h)

	// client app <-> (Proxy) <-> HBONE stream <-> (Proxy) <-> backend
	front, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = front.Close() }()
	go func() {
		c, err := front.Accept()
		if err != nil {
			return
		}
		s, err := e.pool.Connect(context.Background(), e.key, backend.Addr().String(), nil)
		if err != nil {
			_ = c.Close()
			return
		}
		_, _, _ = Proxy(c, s)
	}()
	app, err := net.Dial("tcp", front.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = app.Close() }()
	payload := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	if _, err := app.Write(payload); err != nil {
		t.Fatal(err)
	}
	_ = app.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(app)
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("%d %x", len(payload), sha256.Sum256(payload))
	if string(got) != want {
		t.Fatalf("got %q, want %q", got, want)
	}
	waitFor(t, "the server's Proxy to return", func() bool { return counts.Load() != nil })
	c := counts.Load().([3]any)
	if c[0].(int64) != int64(len(payload)) || c[1].(int64) != int64(len(want)) || c[2] != nil {
		t.Fatalf("server Proxy returned %v", c)
	}
}

func TestProxyReset(t *testing.T) {
	checkLeaks(t)
	// A backend that resets the connection: the client's stream must see a
	// reset, not a clean end.
	backend, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = backend.Close() }()
	go func() {
		c, err := backend.Accept()
		if err != nil {
			return
		}
		_, _ = c.Read(make([]byte, 1))
		_ = c.(*net.TCPConn).SetLinger(0)
		_ = c.Close()
	}()
	h := HandlerFunc(func(ctx context.Context, req *Request, rw Responder) {
		dst, err := net.Dial("tcp", req.Authority)
		if err != nil {
			_ = rw.Reject(http.StatusServiceUnavailable)
			return
		}
		s, _ := rw.Accept()
		_, _, _ = Proxy(s, dst)
	})
	e := newEnv(t, h)
	s := e.connect(t, backend.Addr().String())
	defer func() { _ = s.Close() }()
	_, _ = s.Write([]byte("x"))
	_, err = io.ReadAll(s)
	var re *ResetError
	if !errors.As(err, &re) || re.Code != 0xa || !re.Remote {
		t.Fatalf("read: %v, want a reset with CONNECT_ERROR", err)
	}
}

func TestConnectValidation(t *testing.T) {
	checkLeaks(t)
	e := newEnv(t, echoHandler)
	for _, target := range []string{"example.com:80", "10.0.0.1", "10.0.0.1:0", ""} {
		if _, err := e.pool.Connect(context.Background(), e.key, target, nil); err == nil || !strings.Contains(err.Error(), "ip:port") {
			t.Errorf("Connect(%q): %v", target, err)
		}
	}
	if _, err := e.pool.Connect(context.Background(), e.key, "10.0.0.1:80", http.Header{"Bad": {"a\r\nb"}}); err == nil {
		t.Error("header with CRLF accepted")
	}
}

// TestProxySlowBackend sends 32 MiB through Proxy to a backend that reads
// slowly at first: the frame reader's direct writes to the socket fill it,
// the rest queues for Proxy's goroutine, and the bytes arrive intact and
// in order, while another stream on the same connection is not held up.
func TestProxySlowBackend(t *testing.T) {
	checkLeaks(t)
	const size = 32 << 20
	type result struct {
		n   int64
		sum []byte
	}
	results := make(chan result, 1)
	slow, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = slow.Close() }()
	go func() {
		c, err := slow.Accept()
		if err != nil {
			return
		}
		defer func() { _ = c.Close() }()
		_ = c.(*net.TCPConn).SetReadBuffer(32 << 10)
		h := sha256.New()
		buf := make([]byte, 16<<10)
		var n int64
		for i := 0; ; i++ {
			if i < 100 {
				time.Sleep(2 * time.Millisecond)
			}
			m, err := c.Read(buf)
			h.Write(buf[:m])
			n += int64(m)
			if err != nil {
				break
			}
		}
		results <- result{n, h.Sum(nil)}
	}()
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = echo.Close() }()
	go func() {
		c, err := echo.Accept()
		if err != nil {
			return
		}
		defer func() { _ = c.Close() }()
		_, _ = io.Copy(c, c)
	}()
	h := HandlerFunc(func(ctx context.Context, req *Request, rw Responder) {
		dst, err := net.Dial("tcp", req.Authority)
		if err != nil {
			_ = rw.Reject(http.StatusServiceUnavailable)
			return
		}
		// Small socket buffers, so that the frame reader's non-blocking
		// writes find the socket full.
		_ = dst.(*net.TCPConn).SetWriteBuffer(32 << 10)
		s, err := rw.Accept()
		if err != nil {
			_ = dst.Close()
			return
		}
		_, _, _ = Proxy(s, dst)
	})
	e := newEnv(t, h)
	s := e.connect(t, slow.Addr().String())
	defer func() { _ = s.Close() }()
	sent := sha256.New()
	go func() {
		src := rand.New(rand.NewPCG(3, 4))
		buf := make([]byte, 1<<20)
		for range size / len(buf) {
			for i := range buf {
				buf[i] = byte(src.Uint32())
			}
			sent.Write(buf)
			if _, err := s.Write(buf); err != nil {
				return
			}
		}
		_ = s.CloseWrite()
	}()
	// Meanwhile, on the same connection:
	time.Sleep(20 * time.Millisecond)
	s2 := e.connect(t, echo.Addr().String())
	_, _ = io.WriteString(s2, "not held up")
	b := make([]byte, len("not held up"))
	if _, err := io.ReadFull(s2, b); err != nil || string(b) != "not held up" {
		t.Fatalf("second stream: %q, %v", b, err)
	}
	_ = s2.Close()
	select {
	case r := <-results:
		if r.n != size || !bytes.Equal(r.sum, sent.Sum(nil)) {
			t.Fatalf("backend got %d bytes, checksum match %v; want %d", r.n, bytes.Equal(r.sum, sent.Sum(nil)), size)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("timed out")
	}
	if got := e.ln.n.Load(); got != 1 {
		t.Fatalf("%d connections, want 1", got)
	}
}

func TestPoolClose(t *testing.T) {
	checkLeaks(t)
	dialing := make(chan struct{}, 1)
	e := newEnv(t, echoHandler, func(o *envOptions) {
		o.pool.Dial = func(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
			if addr.Port() == 1 { // a peer that never answers
				dialing <- struct{}{}
				<-ctx.Done()
				return nil, ctx.Err()
			}
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr.String())
		}
	})
	s := e.connect(t, "10.0.0.1:80")
	stuck := make(chan error, 1)
	go func() {
		k := e.key
		k.Addr = netip.AddrPortFrom(k.Addr.Addr(), 1)
		_, err := e.pool.Connect(context.Background(), k, "10.0.0.1:80", nil)
		stuck <- err
	}()
	<-dialing
	if err := e.pool.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-stuck; err == nil {
		t.Fatal("Connect waiting for a dial succeeded after Close")
	}
	if _, err := io.ReadAll(s); err == nil {
		t.Fatal("stream survived Pool.Close")
	}
	_ = s.Close()
	if _, err := e.pool.Connect(context.Background(), e.key, "10.0.0.1:80", nil); !errors.Is(err, ErrPoolClosed) {
		t.Fatalf("Connect after Close: %v, want ErrPoolClosed", err)
	}
}

// TestManyStreams runs 200 streams at once, each echoing 256 KiB: they
// share the connection windows, and spill onto a second connection past
// 100 streams.
func TestManyStreams(t *testing.T) {
	checkLeaks(t)
	e := newEnv(t, echoHandler)
	const streams, size = 200, 256 << 10
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	start := make(chan struct{})
	for i := range streams {
		wg.Go(func() {
			s, err := e.pool.Connect(context.Background(), e.key, "10.0.0.1:80", nil)
			if err != nil {
				errs <- err
				return
			}
			defer func() { _ = s.Close() }()
			<-start // all open before any data flows
			payload := bytes.Repeat([]byte{byte(i)}, size)
			go func() {
				_, _ = s.Write(payload)
				_ = s.CloseWrite()
			}()
			got, err := io.ReadAll(s)
			if err != nil || !bytes.Equal(got, payload) {
				errs <- fmt.Errorf("stream %d: %d bytes, %v", i, len(got), err) //nolint:errorlint // err may be nil here: printed, not wrapped
			}
		})
	}
	waitFor(t, "the streams to open", func() bool { return e.ln.n.Load() == 2 })
	time.Sleep(50 * time.Millisecond)
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := e.ln.n.Load(); got != 2 {
		t.Fatalf("%d connections for %d streams, want 2", got, streams)
	}
}
