package interop

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	istiohbone "istio.io/istio/pkg/hbone"

	"github.com/ambitmesh/ambit/ztunnel/hbone"
)

const (
	setupTimeout = 10 * time.Second
	ioTimeout    = 30 * time.Second
	// bulkSize exceeds the receive windows the peers start with (Go's
	// server: 1 MiB per stream and per connection; Go's transport: 4 MiB
	// per stream; Ambit: 4 MiB per stream), so a transfer completes only
	// if each side returns credit with WINDOW_UPDATE as it reads and
	// waits for credit as it sends.
	bulkSize = 8 << 20
	// streamSize is what each of several concurrent streams moves: 8 of
	// them exceed Go's server's 1 MiB connection window.
	streamSize = 256 << 10
)

// The headers Ambit's outbound sends on a CONNECT, as Istio's ztunnel does.
var meshHeaders = http.Header{
	"Forwarded": {"for=10.244.1.5"},
	"Baggage":   {"k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=client,service.name=client,service.version=v1"},
}

func randomBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// exchange writes msg and reads as many bytes back from an echo.
func exchange(c net.Conn, msg []byte) error {
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("writing: %w", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("reading the echo: %w", err)
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("echo is %q, want %q", got, msg)
	}
	return nil
}

// echoAll sends payload, then half-closes, and reads the echo until the
// end, concurrently: the way to move more than the windows hold.
func echoAll(s hbone.Stream, payload []byte) error {
	var werr error
	var wg sync.WaitGroup
	wg.Go(func() {
		if _, werr = s.Write(payload); werr == nil {
			werr = s.CloseWrite()
		}
	})
	got, rerr := io.ReadAll(s)
	wg.Wait()
	switch {
	case werr != nil:
		return fmt.Errorf("sending: %w", werr)
	case rerr != nil:
		return fmt.Errorf("reading the echo after %d bytes: %w", len(got), rerr)
	case !bytes.Equal(got, payload):
		return fmt.Errorf("echo differs: %d bytes back for %d sent", len(got), len(payload))
	}
	return nil
}

// TestAmbitClientToIstioServer connects Ambit's Pool to Istio's Go HBONE
// server, which dials each CONNECT's :authority.
func TestAmbitClientToIstioServer(t *testing.T) {
	ca := newTestCA(t)
	istio := startIstioServer(t, ca)
	echo := startTCP(t, echoTCP)
	cfg := ca.clientTLS(t, clientID, serverID)
	key := hbone.Key{SrcIdentity: clientID, DstIdentity: serverID, Addr: istio.addr}

	newPool := func(t *testing.T) *hbone.Pool {
		p := hbone.NewPool(hbone.PoolOptions{TLSConfig: func(k hbone.Key) (*tls.Config, error) {
			if k.SrcIdentity != clientID {
				return nil, fmt.Errorf("no certificate for %s", k.SrcIdentity)
			}
			return cfg, nil
		}})
		t.Cleanup(func() {
			if err := p.Close(); err != nil {
				t.Errorf("closing the pool: %v", err)
			}
		})
		return p
	}
	pool := newPool(t)
	// connect opens a tunnel to target through k marked with the
	// subtest's name.
	connect := func(t *testing.T, p *hbone.Pool, k hbone.Key, target netip.AddrPort, h http.Header) (hbone.Stream, error) {
		h = h.Clone()
		if h == nil {
			h = http.Header{}
		}
		h.Set(caseHeader, t.Name())
		ctx, cancel := context.WithTimeout(t.Context(), setupTimeout)
		defer cancel()
		s, err := p.Connect(ctx, k, target.String(), h)
		if err != nil {
			return nil, fmt.Errorf("connecting to %s through Istio's server: %w", target, err)
		}
		if err := s.SetDeadline(time.Now().Add(ioTimeout)); err != nil {
			_ = s.Close() // the deadline's error says it all
			return nil, err
		}
		return s, nil
	}
	mustConnect := func(t *testing.T, target netip.AddrPort, h http.Header) hbone.Stream {
		t.Helper()
		s, err := connect(t, pool, key, target, h)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.Close() }) // many subtests close it first
		return s
	}

	t.Run("round trip with mesh headers", func(t *testing.T) {
		seen := istio.expect(t.Name())
		s := mustConnect(t, echo, meshHeaders)
		req := wait(t, seen, setupTimeout, "the CONNECT at Istio's handler")

		if req.host != echo.String() {
			t.Errorf("Istio's server saw authority %q, want %q", req.host, echo)
		}
		for _, name := range []string{"Forwarded", "Baggage"} {
			if got, want := req.header.Values(name), meshHeaders.Values(name); !slices.Equal(got, want) {
				t.Errorf("Istio's server saw %s %q, want %q", name, got, want)
			}
		}
		if req.tls.Version != tls.VersionTLS13 || req.tls.NegotiatedProtocol != "h2" {
			t.Errorf("Istio's server negotiated %s with ALPN %q, want TLS 1.3 and h2", tls.VersionName(req.tls.Version), req.tls.NegotiatedProtocol)
		}
		if got := peerID(req.tls.PeerCertificates); got != clientID {
			t.Errorf("Istio's server saw client %q, want %q", got, clientID)
		}

		if err := exchange(s, []byte("ping through Istio's HBONE server")); err != nil {
			t.Fatal(err)
		}
		if err := s.CloseWrite(); err != nil {
			t.Fatalf("half-closing: %v", err)
		}
		if rest, err := io.ReadAll(s); err != nil || len(rest) != 0 {
			t.Fatalf("after the half-close, read %q and %v, want the end of the echo", rest, err)
		}
	})

	t.Run("half-close reaches the destination", func(t *testing.T) {
		count := startTCP(t, countTCP)
		s := mustConnect(t, count, nil)
		payload := randomBytes(t, 256<<10)
		if _, err := s.Write(payload); err != nil {
			t.Fatal(err)
		}
		if err := s.CloseWrite(); err != nil {
			t.Fatalf("half-closing: %v", err)
		}
		got, err := io.ReadAll(s)
		if want := fmt.Sprintf("read %d bytes", len(payload)); err != nil || string(got) != want {
			t.Fatalf("destination answered %q and %v, want %q: the half-close (END_STREAM) must reach it as a FIN while the way back stays open", got, err, want)
		}
	})

	t.Run("destination closes first", func(t *testing.T) {
		bye := startTCP(t, byeTCP)
		seen := istio.expect(t.Name())
		s := mustConnect(t, bye, nil)
		req := wait(t, seen, setupTimeout, "the CONNECT at Istio's handler")
		wait(t, req.done, setupTimeout, "Istio's handler to return")
		// Go's HTTP/2 server ends the response (END_STREAM) when the
		// handler returns and, as the client has not ended the request,
		// then sends RST_STREAM(NO_ERROR) (RFC 9113 section 8.1: the
		// server "MAY request that the client abort transmission of a
		// request without error"). Give those frames time to arrive
		// before reading: a client must still deliver the complete
		// response it buffered, not an error.
		time.Sleep(100 * time.Millisecond)
		got, err := io.ReadAll(s)
		if err != nil || string(got) != "bye" {
			t.Fatalf("read %q and %v, want %q and the end of the stream", got, err, "bye")
		}
	})

	t.Run("closing the stream resets it", func(t *testing.T) {
		seen := istio.expect(t.Name())
		s := mustConnect(t, echo, nil)
		req := wait(t, seen, setupTimeout, "the CONNECT at Istio's handler")
		if err := exchange(s, []byte("then gone")); err != nil {
			t.Fatal(err)
		}
		// Closing before the peer's direction has ended is an abort:
		// RST_STREAM(CANCEL), which must end Istio's copy loops.
		mustClose(t, s)
		wait(t, req.done, setupTimeout, "Istio's handler to return after the reset")
	})

	t.Run("streams share one pooled connection", func(t *testing.T) {
		p := newPool(t) // a fresh pool, so that one connection is all it has
		before := istio.ln.accepted.Load()
		const streams = 8
		errs := make(chan error, streams)
		var wg sync.WaitGroup
		for i := range streams {
			wg.Go(func() {
				s, err := connect(t, p, key, echo, meshHeaders)
				if err != nil {
					errs <- err
					return
				}
				err = echoAll(s, randomBytes(t, streamSize))
				if cerr := s.Close(); err == nil {
					err = cerr
				}
				if err != nil {
					errs <- fmt.Errorf("stream %d: %w", i, err)
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if got := istio.ln.accepted.Load() - before; got != 1 {
			t.Errorf("Istio's server accepted %d connections for %d concurrent streams, want 1", got, streams)
		}
	})

	t.Run("bulk transfer both ways", func(t *testing.T) {
		s := mustConnect(t, echo, nil)
		if err := echoAll(s, randomBytes(t, bulkSize)); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("unreachable destination", func(t *testing.T) {
		s, err := connect(t, pool, key, closedAddr(t), nil)
		var se *hbone.StatusError
		switch {
		case errors.As(err, &se):
			if se.Code != http.StatusServiceUnavailable {
				t.Errorf("Istio's server answered %d, want 503", se.Code)
			}
		case err != nil:
			t.Fatal(err)
		default:
			// Istio's handleConnect flushes 200 before it dials, so its
			// later 503 is never sent: the failure can only show as a
			// tunnel that ends at once.
			got, err := io.ReadAll(s)
			mustClose(t, s)
			if len(got) != 0 {
				t.Errorf("read %q from a tunnel to nowhere", got)
			}
			t.Logf("Istio's server answered 200, then ended the tunnel (%v)", err)
		}
	})

	t.Run("GOAWAY drains the connection", func(t *testing.T) {
		draining := startIstioServer(t, ca)
		p := newPool(t)
		k := hbone.Key{SrcIdentity: clientID, DstIdentity: serverID, Addr: draining.addr}
		s, err := connect(t, p, k, echo, nil) // the pool's cleanup closes it if the test fails
		if err != nil {
			t.Fatal(err)
		}
		if err := exchange(s, []byte("before GOAWAY")); err != nil {
			t.Fatal(err)
		}
		shutdown := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*setupTimeout)
			defer cancel()
			shutdown <- draining.Shutdown(ctx)
		}()
		// Shutdown sends GOAWAY on the connection and closes the
		// listener. Whether or not the GOAWAY has arrived when the
		// next lines run, their outcome must be the same.
		time.Sleep(100 * time.Millisecond)
		if err := exchange(s, []byte("after GOAWAY")); err != nil {
			t.Fatalf("the stream opened before GOAWAY: %v", err)
		}
		// A new stream may not go on the draining connection, and
		// there is no other to open.
		if s2, err := connect(t, p, k, echo, nil); err == nil {
			mustClose(t, s2)
			t.Error("a stream opened after GOAWAY")
		} else if errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("a stream after GOAWAY neither opened nor failed: %v", err)
		} else {
			t.Logf("after GOAWAY, Connect failed as it should: %v", err)
		}
		if err := s.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if rest, err := io.ReadAll(s); err != nil || len(rest) != 0 {
			t.Fatalf("after the half-close, read %q and %v, want the end of the echo", rest, err)
		}
		mustClose(t, s)
		if err := wait(t, shutdown, 2*setupTimeout, "Istio's server to shut down"); err != nil {
			t.Errorf("Istio's server shut down with %v, want it to drain", err)
		}
	})
}

// TestIstioClientToAmbitServer connects Istio's Go HBONE dialer to Ambit's
// Server.
func TestIstioClientToAmbitServer(t *testing.T) {
	ca := newTestCA(t)
	echo := startTCP(t, echoTCP)
	serverCfg := ca.serverTLS(t, serverID, clientID)
	clientCfg := ca.clientTLS(t, clientID, serverID)
	// Each Dialer has its own http2.Transport, hence its own connections.
	newDialer := func(srv *ambitServer) istiohbone.Dialer {
		return istiohbone.NewDialer(istiohbone.Config{ProxyAddress: srv.addr.String(), TLS: clientCfg})
	}
	// dial opens a tunnel to target. Istio's dialer returns one end of a
	// net.Pipe whose other end it copies to the CONNECT stream, so the
	// tunnel has no half-close: Close ends both directions.
	// Istio's dialer ignores its context ("TODO: use context"), so dial
	// bounds the wait itself.
	dial := func(t *testing.T, d istiohbone.Dialer, target string) (net.Conn, error) {
		type result struct {
			c   net.Conn
			err error
		}
		done := make(chan result, 1)
		go func() {
			c, err := d.DialContext(t.Context(), "tcp", target)
			done <- result{c, err}
		}()
		select {
		case r := <-done:
			if r.err != nil {
				return nil, r.err
			}
			// Closing twice is harmless; tests close explicitly where
			// the close is what they test.
			t.Cleanup(func() { _ = r.c.Close() })
			return r.c, r.c.SetDeadline(time.Now().Add(ioTimeout))
		case <-time.After(setupTimeout):
			return nil, fmt.Errorf("dialing %s: no answer in %v", target, setupTimeout)
		}
	}

	t.Run("round trip", func(t *testing.T) {
		done := make(chan served, 1)
		srv := startAmbitServer(t, serverCfg, forward(done))
		c, err := dial(t, newDialer(srv), echo.String())
		if err != nil {
			t.Fatalf("Istio's dialer through Ambit's server: %v", err)
		}
		msg := []byte("ping from Istio's HBONE dialer")
		if err := exchange(c, msg); err != nil {
			t.Fatal(err)
		}
		mustClose(t, c)

		got := wait(t, done, setupTimeout, "Ambit's handler to finish")
		if got.req.Authority != echo.String() || got.req.Target != echo {
			t.Errorf("Ambit's server saw authority %q (target %v), want %v", got.req.Authority, got.req.Target, echo)
		}
		if id := peerID(got.req.PeerCertificates); id != clientID {
			t.Errorf("Ambit's server saw client %q, want %q", id, clientID)
		}
		if got.err != nil || got.up != int64(len(msg)) || got.down != int64(len(msg)) {
			t.Errorf("proxy moved %d bytes up and %d down, ending with %v; want %d each way and a clean end", got.up, got.down, got.err, len(msg))
		}
		// Istio's dialer never sends Config.Headers (hbone() builds the
		// request without them), so there is no Forwarded or baggage.
		t.Logf("Istio's dialer sent header fields %v", got.req.Header)
	})

	t.Run("bulk transfer both ways", func(t *testing.T) {
		done := make(chan served, 1)
		srv := startAmbitServer(t, serverCfg, forward(done))
		c, err := dial(t, newDialer(srv), echo.String())
		if err != nil {
			t.Fatal(err)
		}
		payload := randomBytes(t, bulkSize)
		var werr error
		var wg sync.WaitGroup
		wg.Go(func() { _, werr = c.Write(payload) })
		got := make([]byte, len(payload))
		_, rerr := io.ReadFull(c, got)
		wg.Wait()
		mustClose(t, c)
		if werr != nil || rerr != nil {
			t.Fatalf("sending: %v; reading the echo: %v", werr, rerr)
		}
		if !bytes.Equal(got, payload) {
			t.Fatal("echo differs from what was sent")
		}
		if s := wait(t, done, setupTimeout, "Ambit's handler to finish"); s.up != bulkSize || s.down != bulkSize {
			t.Errorf("proxy moved %d bytes up and %d down, want %d each way (%v)", s.up, s.down, bulkSize, s.err)
		}
	})

	t.Run("streams share one connection", func(t *testing.T) {
		const streams = 8
		done := make(chan served, streams)
		srv := startAmbitServer(t, serverCfg, forward(done))
		d := newDialer(srv)
		errs := make(chan error, streams)
		var wg sync.WaitGroup
		for i := range streams {
			wg.Go(func() {
				c, err := dial(t, d, echo.String())
				if err != nil {
					errs <- err
					return
				}
				err = exchange(c, randomBytes(t, streamSize))
				mustClose(t, c)
				if err != nil {
					errs <- fmt.Errorf("stream %d: %w", i, err)
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if got := srv.ln.accepted.Load(); got != 1 {
			t.Errorf("Ambit's server accepted %d connections for %d concurrent streams of one dialer, want 1", got, streams)
		}
	})

	t.Run("destination reset ends the tunnel", func(t *testing.T) {
		done := make(chan served, 1)
		srv := startAmbitServer(t, serverCfg, forward(done))
		c, err := dial(t, newDialer(srv), startTCP(t, resetTCP).String())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		// Ambit resets the stream (CONNECT_ERROR); Istio's dialer can
		// only pass that on as the end of its net.Pipe.
		got, err := io.ReadAll(c)
		if len(got) != 0 || err != nil {
			t.Errorf("read %q and %v from a reset tunnel, want its end", got, err)
		}
		if s := wait(t, done, setupTimeout, "Ambit's handler to finish"); s.err == nil {
			t.Error("the proxy reported no error for a destination that reset")
		} else {
			t.Logf("the proxy ended with %v", s.err)
		}
	})

	t.Run("policy denies with 401", func(t *testing.T) {
		srv := startAmbitServer(t, serverCfg, hbone.HandlerFunc(func(_ context.Context, _ *hbone.Request, rw hbone.Responder) {
			_ = rw.Reject(http.StatusUnauthorized) // the dialer's error says whether it arrived
		}))
		c, err := dial(t, newDialer(srv), echo.String())
		if err == nil {
			mustClose(t, c)
			t.Fatal("Istio's dialer opened a tunnel that Ambit's handler rejected")
		}
		if !strings.Contains(err.Error(), "401") {
			t.Errorf("Istio's dialer failed with %q, want it to report 401", err)
		}
	})

	t.Run("malformed requests get 400", func(t *testing.T) {
		srv := startAmbitServer(t, serverCfg, forward(make(chan served, 8)))
		tests := []struct {
			name      string
			authority string
		}{
			{name: "host name", authority: "echo.default.svc.cluster.local:80"},
			{name: "no port", authority: "127.0.0.1"},
			{name: "port zero", authority: "127.0.0.1:0"},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				c, err := dial(t, newDialer(srv), tc.authority)
				if err == nil {
					mustClose(t, c)
					t.Fatalf("Istio's dialer opened a tunnel to %q", tc.authority)
				}
				if !strings.Contains(err.Error(), "400") {
					t.Errorf("Istio's dialer failed with %q, want it to report 400", err)
				}
			})
		}
		// Go's HTTP/2 client, on which Istio's dialer is built, sends
		// other methods as they are: an HBONE server answers them 400 too.
		t.Run("GET", func(t *testing.T) {
			var h2only http.Protocols
			h2only.SetHTTP2(true)
			tr := &http.Transport{TLSClientConfig: clientCfg, Protocols: &h2only}
			defer tr.CloseIdleConnections()
			ctx, cancel := context.WithTimeout(t.Context(), setupTimeout)
			defer cancel()
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+srv.addr.String()+"/", nil)
			if err != nil {
				t.Fatal(err)
			}
			resp, err := tr.RoundTrip(req)
			if err != nil {
				t.Fatal(err)
			}
			if err := resp.Body.Close(); err != nil {
				t.Errorf("closing the body: %v", err)
			}
			if resp.StatusCode != http.StatusBadRequest {
				t.Errorf("GET answered %s, want 400", resp.Status)
			}
		})
		if n := srv.calls.Load(); n != 0 {
			t.Errorf("the handler saw %d malformed requests, want none", n)
		}
	})

	t.Run("GOAWAY drains the connection", func(t *testing.T) {
		done := make(chan served, 2)
		srv := startAmbitServer(t, serverCfg, forward(done))
		d := newDialer(srv)
		c, err := dial(t, d, echo.String())
		if err != nil {
			t.Fatal(err)
		}
		if err := exchange(c, []byte("before GOAWAY")); err != nil {
			t.Fatal(err)
		}
		shutdown := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*setupTimeout)
			defer cancel()
			shutdown <- srv.Shutdown(ctx)
		}()
		// As in TestAmbitClientToIstioServer: the outcome must not depend
		// on whether the GOAWAY has arrived yet.
		time.Sleep(100 * time.Millisecond)
		if err := exchange(c, []byte("after GOAWAY")); err != nil {
			t.Fatalf("the tunnel opened before GOAWAY: %v", err)
		}
		if c2, err := dial(t, d, echo.String()); err == nil {
			mustClose(t, c2)
			t.Error("a tunnel opened after GOAWAY")
		} else {
			t.Logf("after GOAWAY, Istio's dialer failed as it should: %v", err)
		}
		mustClose(t, c)
		if s := wait(t, done, setupTimeout, "Ambit's handler to finish"); s.err != nil {
			t.Errorf("the drained tunnel ended with %v, want a clean end", s.err)
		}
		if err := wait(t, shutdown, 2*setupTimeout, "Ambit's server to shut down"); err != nil {
			t.Errorf("Ambit's server shut down with %v, want it to drain", err)
		}
	})
}
