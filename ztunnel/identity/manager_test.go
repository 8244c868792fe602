package identity_test

// These tests run the real mesh CA (controller/ca, through its catest
// harness with client-go's fake clientset) on a loopback listener. Only the
// tests import Kubernetes packages; the identity package itself talks to
// nothing but the CA.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambitmesh/ambit/controller/ca/catest"
	"github.com/ambitmesh/ambit/ztunnel/identity"
)

var (
	cart   = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
	pay    = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/pay")
	tunnel = spiffeid.RequireFromString("spiffe://cluster.local/ns/istio-system/sa/ztunnel")
)

// cluster is two nodes, each with a ztunnel; shop/cart runs on node-1 and
// shop/pay on node-2.
func cluster(t *testing.T) *catest.Env {
	t.Helper()
	env := catest.Start(t, catest.Options{})
	env.AddPod(t, "shop", "cart-1", "cart", "node-1")
	env.AddPod(t, "shop", "pay-2", "pay", "node-2")
	for _, node := range []string{"node-1", "node-2"} {
		env.AddToken("ztunnel-"+node, catest.Token{Namespace: "istio-system", ServiceAccount: "ztunnel",
			PodName: "ztunnel-" + node, PodUID: "uid-" + node, NodeName: node})
	}
	return env
}

// manager is the ztunnel of node.
func manager(t *testing.T, env *catest.Env, node string, clock identity.Clock) *identity.Manager {
	t.Helper()
	m, err := identity.NewManager(identity.Options{
		CAAddr:       env.Addr,
		CAServerName: catest.ServerName,
		CARoots:      env.Roots,
		TokenFile:    catest.TokenFile(t, "ztunnel-"+node),
		RetryMin:     time.Second,
		RetryMax:     4 * time.Second,
		Log:          catest.Logger(t).With("node", node),
		Clock:        clock,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	return m
}

func TestFirstFetch(t *testing.T) {
	env := cluster(t)
	m := manager(t, env, "node-1", nil)

	if got := m.Snapshot(); len(got) != 0 {
		t.Fatalf("snapshot before any request: %+v", got)
	}
	cert, err := m.Certificate(t.Context(), cart)
	if err != nil {
		t.Fatal(err)
	}
	if id, err := identity.PeerID(tls.ConnectionState{PeerCertificates: []*x509.Certificate{cert.Leaf}}); err != nil || id != cart {
		t.Fatalf("certificate for %v (%v), want %s", id, err, cart)
	}
	again, err := m.Certificate(t.Context(), cart)
	if err != nil || again != cert {
		t.Fatalf("second call: %v, same certificate %v", err, again == cert)
	}
	if n := env.Calls.Load(); n != 1 {
		t.Fatalf("%d requests to the CA, want 1", n)
	}
	snap := m.Snapshot()
	if len(snap) != 1 || snap[0].Identity != cart.String() || snap[0].State != identity.StateAvailable ||
		snap[0].Serial != cert.Leaf.SerialNumber.Text(16) || !snap[0].NotAfter.Equal(cert.Leaf.NotAfter) || snap[0].Error != "" {
		t.Fatalf("snapshot %+v", snap)
	}
	if len(m.TrustBundle()) != 1 {
		t.Fatalf("trust bundle has %d roots, want the CA's one", len(m.TrustBundle()))
	}

	if _, err := m.Certificate(t.Context(), spiffeid.RequireFromString("spiffe://example.org/ns/shop/sa/cart")); !errors.Is(err, identity.ErrWrongTrustDomain) {
		t.Fatalf("other trust domain: %v", err)
	}
	// The CA refuses a workload that is not on this node; the error says so.
	if _, err := m.Certificate(t.Context(), pay); err == nil {
		t.Fatal("got a certificate for a workload on another node")
	} else {
		t.Logf("refused as expected: %v", err)
	}
}

func TestConcurrentFetchesShareOneRequest(t *testing.T) {
	env := cluster(t)
	release := make(chan struct{})
	env.SetHook(func(ctx context.Context) error {
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil
	})
	m := manager(t, env, "node-1", nil)

	const n = 32
	var (
		wg    sync.WaitGroup
		certs [n]*tls.Certificate
		errs  [n]error
	)
	for i := range n {
		wg.Go(func() { certs[i], errs[i] = m.Certificate(t.Context(), cart) })
	}
	eventually(t, func() bool { return env.Calls.Load() == 1 })
	if s := m.Snapshot(); s[0].State != identity.StateInitializing {
		t.Fatalf("state %s while the first request is in flight", s[0].State)
	}
	time.Sleep(50 * time.Millisecond) // let the stragglers reach the wait
	close(release)
	wg.Wait()
	for i := range n {
		if errs[i] != nil || certs[i] != certs[0] {
			t.Fatalf("caller %d: %v, same certificate %v", i, errs[i], certs[i] == certs[0])
		}
	}
	if got := env.Calls.Load(); got != 1 {
		t.Fatalf("%d requests to the CA for %d concurrent callers, want 1", got, n)
	}

	// A caller that gives up does not cancel the request for the others.
	release2 := make(chan struct{})
	env.SetHook(func(context.Context) error { <-release2; return nil })
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { _, err := m.Certificate(ctx, pay); done <- err }()
	eventually(t, func() bool { return env.Calls.Load() == 2 })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled caller got %v", err)
	}
	close(release2)
	eventually(t, func() bool { return stateOf(m, pay) == identity.StateUnavailable }) // the CA refuses pay on node-1, but the request ran
}

// TestRenewal renews at half-life on a fake clock: new handshakes get the
// new certificate, and a connection made with the old one keeps working.
func TestRenewal(t *testing.T) {
	env := cluster(t)
	clock := newFakeClock()
	client := manager(t, env, "node-1", clock)
	server := manager(t, env, "node-2", nil)
	srv := serve(t, server.ServerTLSConfig(pay))

	c1 := dial(t, srv.addr, client.ClientTLSConfig(cart, pay))
	old := srv.peerSerial(t, 0)
	if want := mustCert(t, client, cart).Leaf.SerialNumber.Text(16); old != want {
		t.Fatalf("server saw serial %s, want %s", old, want)
	}
	snap := client.Snapshot()[0]
	halfLife := snap.NotBefore.Add(snap.NotAfter.Sub(snap.NotBefore) / 2)
	if !snap.NextRequest.Equal(halfLife) {
		t.Fatalf("renewal at %s, want half-life %s", snap.NextRequest, halfLife)
	}

	clock.Advance(halfLife.Sub(clock.Now()) - time.Second)
	time.Sleep(20 * time.Millisecond)
	if n := env.Calls.Load(); n != 2 { // one certificate per manager so far
		t.Fatalf("%d requests before half-life, want 2", n)
	}
	clock.Advance(time.Second)
	eventually(t, func() bool { return client.Snapshot()[0].Serial != old })
	if n := env.Calls.Load(); n != 3 {
		t.Fatalf("%d requests after half-life, want 3", n)
	}
	if s := client.Snapshot()[0]; s.State != identity.StateAvailable || !s.NextRequest.After(clock.Now()) {
		t.Fatalf("after renewal: %+v (now %s)", s, clock.Now())
	}

	dial(t, srv.addr, client.ClientTLSConfig(cart, pay))
	if got := srv.peerSerial(t, 1); got == old || got != client.Snapshot()[0].Serial {
		t.Fatalf("new handshake used serial %s; old %s, current %s", got, old, client.Snapshot()[0].Serial)
	}
	// The connection made before the renewal still carries data.
	echo(t, c1, "still here")
}

// TestBackoff has the CA fail: requests are retried with capped,
// jittered exponential back-off, callers fail fast in between, and the
// manager recovers when the CA does.
func TestBackoff(t *testing.T) {
	env := cluster(t)
	env.SetHook(func(context.Context) error { return catest.Unavailable })
	clock := newFakeClock()
	m := manager(t, env, "node-1", clock) // RetryMin 1s, RetryMax 4s

	if _, err := m.Certificate(t.Context(), cart); err == nil {
		t.Fatal("got a certificate from a failing CA")
	}
	// Back-off after the n-th failure: [d/2, d] with d = min(1s * 2^(n-1), 4s).
	for n, d := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 4 * time.Second, 4 * time.Second} {
		s := waitNext(t, m, cart)
		wait := s.NextRequest.Sub(clock.Now())
		if wait < d/2 || wait > d {
			t.Fatalf("after failure %d: retry in %s, want between %s and %s", n+1, wait, d/2, d)
		}
		if s.State != identity.StateUnavailable || s.Error == "" {
			t.Fatalf("after failure %d: %+v", n+1, s)
		}
		// In between, callers fail at once, without asking the CA.
		if _, err := m.Certificate(t.Context(), cart); err == nil {
			t.Fatal("got a certificate while the CA is failing")
		}
		calls := env.Calls.Load()
		clock.Advance(wait - time.Millisecond)
		time.Sleep(20 * time.Millisecond)
		if env.Calls.Load() != calls {
			t.Fatalf("retried before the back-off of %s had passed", wait)
		}
		if n == 4 {
			env.SetHook(nil) // the CA is back
		}
		clock.Advance(time.Millisecond)
		eventually(t, func() bool { return env.Calls.Load() == calls+1 })
	}
	eventually(t, func() bool { return stateOf(m, cart) == identity.StateAvailable })
	if _, err := m.Certificate(t.Context(), cart); err != nil {
		t.Fatal(err)
	}
	if s := m.Snapshot()[0]; s.Error != "" {
		t.Fatalf("error kept after recovery: %s", s.Error)
	}
}

func TestForget(t *testing.T) {
	env := cluster(t)
	clock := newFakeClock()
	m := manager(t, env, "node-1", clock)
	mustCert(t, m, cart)
	m.Forget(cart)
	if s := m.Snapshot(); len(s) != 0 {
		t.Fatalf("snapshot after Forget: %+v", s)
	}
	clock.Advance(13 * time.Hour) // past the half-life, before expiry
	time.Sleep(20 * time.Millisecond)
	if n := env.Calls.Load(); n != 1 {
		t.Fatalf("%d requests: a forgotten identity was renewed", n)
	}
	if len(m.TrustBundle()) != 0 {
		t.Fatal("trust bundle kept the roots of a forgotten certificate")
	}
	// Asking again starts over.
	mustCert(t, m, cart)
	if n := env.Calls.Load(); n != 2 {
		t.Fatalf("%d requests, want 2", n)
	}
}

// TestHandshake connects two node tunnels' configs: each side sees the
// other's identity; a client expecting another identity, or a peer from
// another CA, is refused.
func TestHandshake(t *testing.T) {
	env := cluster(t)
	node1 := manager(t, env, "node-1", nil)
	node2 := manager(t, env, "node-2", nil)
	srv := serve(t, node2.ServerTLSConfig(pay))

	c := dial(t, srv.addr, node1.ClientTLSConfig(cart, pay))
	cs := c.ConnectionState()
	if cs.Version != tls.VersionTLS13 || cs.NegotiatedProtocol != "h2" {
		t.Fatalf("version %x, ALPN %q; want TLS 1.3, h2", cs.Version, cs.NegotiatedProtocol)
	}
	if id, err := identity.PeerID(cs); err != nil || id != pay {
		t.Fatalf("client sees %v (%v), want %s", id, err, pay)
	}
	if got := srv.peerID(t, 0); got != cart {
		t.Fatalf("server sees %s, want %s", got, cart)
	}
	echo(t, c, "hello")

	t.Run("wrong server identity", func(t *testing.T) {
		err := dialErr(srv.addr, node1.ClientTLSConfig(cart, tunnel))
		if err == nil {
			t.Fatal("handshake with a server that is not the expected identity succeeded")
		}
		t.Logf("refused as expected: %v", err)
	})
	t.Run("peer from another CA", func(t *testing.T) {
		other := cluster(t) // a second mesh with its own root
		stranger := manager(t, other, "node-1", nil)
		if err := dialErr(srv.addr, stranger.ClientTLSConfig(cart, pay)); err == nil {
			t.Fatal("handshake with a client of another CA succeeded")
		} else {
			t.Logf("refused as expected: %v", err)
		}
		strangeSrv := serve(t, stranger.ServerTLSConfig(cart))
		if err := dialErr(strangeSrv.addr, node2.ClientTLSConfig(pay, cart)); err == nil {
			t.Fatal("handshake with a server of another CA succeeded")
		} else {
			t.Logf("refused as expected: %v", err)
		}
	})
	t.Run("client without a certificate", func(t *testing.T) {
		cfg := node1.ClientTLSConfig(cart, pay)
		cfg.GetClientCertificate = nil
		if err := dialErr(srv.addr, cfg); err == nil {
			t.Fatal("handshake without a client certificate succeeded")
		}
	})
	t.Run("TLS 1.2 refused", func(t *testing.T) {
		cfg := node1.ClientTLSConfig(cart, pay)
		cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
		if err := dialErr(srv.addr, cfg); err == nil {
			t.Fatal("TLS 1.2 handshake succeeded")
		}
	})
}

// server accepts TLS connections, echoes, and records each peer.
type server struct {
	addr  string
	mu    sync.Mutex
	peers []tls.ConnectionState
	added chan struct{}
}

func serve(t *testing.T, cfg *tls.Config) *server {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	s := &server{addr: ln.Addr().String(), added: make(chan struct{}, 100)}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer func() { _ = c.Close() }()
				tc := c.(*tls.Conn)
				if err := tc.Handshake(); err != nil {
					return
				}
				s.mu.Lock()
				s.peers = append(s.peers, tc.ConnectionState())
				s.mu.Unlock()
				s.added <- struct{}{}
				_, _ = io.Copy(tc, tc)
			}()
		}
	}()
	return s
}

func (s *server) peer(t *testing.T, i int) tls.ConnectionState {
	t.Helper()
	eventually(t, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.peers) > i
	})
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peers[i]
}

func (s *server) peerSerial(t *testing.T, i int) string {
	return s.peer(t, i).PeerCertificates[0].SerialNumber.Text(16)
}

func (s *server) peerID(t *testing.T, i int) spiffeid.ID {
	t.Helper()
	id, err := identity.PeerID(s.peer(t, i))
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func dial(t *testing.T, addr string, cfg *tls.Config) *tls.Conn {
	t.Helper()
	c, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// dialErr dials and exchanges a byte, so that a refusal the server sends
// after the client's handshake completes (TLS 1.3 client certificates) is
// seen.
func dialErr(addr string, cfg *tls.Config) error {
	c, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		return err
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("x")); err != nil {
		return err
	}
	_, err = c.Read(make([]byte, 1))
	return err
}

func echo(t *testing.T, c *tls.Conn, msg string) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo: %q, %v", buf, err)
	}
}

func mustCert(t *testing.T, m *identity.Manager, id spiffeid.ID) *tls.Certificate {
	t.Helper()
	c, err := m.Certificate(t.Context(), id)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func stateOf(m *identity.Manager, id spiffeid.ID) identity.State {
	for _, s := range m.Snapshot() {
		if s.Identity == id.String() {
			return s.State
		}
	}
	return ""
}

// waitNext waits until id's next request is scheduled, and returns its
// snapshot.
func waitNext(t *testing.T, m *identity.Manager, id spiffeid.ID) identity.CertInfo {
	t.Helper()
	var got identity.CertInfo
	eventually(t, func() bool {
		for _, s := range m.Snapshot() {
			if s.Identity == id.String() && !s.NextRequest.IsZero() {
				got = s
				return true
			}
		}
		return false
	})
	return got
}

func eventually(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// fakeClock runs timers when advanced, and only then.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	c    *fakeClock
	at   time.Time
	f    func()
	done bool
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Now()} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) AfterFunc(d time.Duration, f func()) identity.Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	tm := &fakeTimer{c: c, at: c.now.Add(d), f: f}
	c.timers = append(c.timers, tm)
	return tm
}

func (tm *fakeTimer) Stop() bool {
	tm.c.mu.Lock()
	defer tm.c.mu.Unlock()
	was := !tm.done
	tm.done = true
	return was
}

// Advance moves the clock and runs, in order, the timers that came due.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	var due []*fakeTimer
	for _, tm := range c.timers {
		if !tm.done && !tm.at.After(c.now) {
			tm.done = true
			due = append(due, tm)
		}
	}
	c.mu.Unlock()
	for _, tm := range due {
		tm.f()
	}
}

var _ identity.Clock = (*fakeClock)(nil)
