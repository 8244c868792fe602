package hbone

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"net/url"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The tests and benchmarks use the engine through these two functions and
// the Connector, Acceptor and Stream interfaces only, so that another
// engine can be dropped in here.
var (
	newConnector = func(o PoolOptions) Connector { return NewPool(o) }
	newAcceptor  = func(o ServerOptions) Acceptor { return NewServer(o) }
)

const (
	clientID = "spiffe://cluster.local/ns/default/sa/client"
	serverID = "spiffe://cluster.local/ns/default/sa/server"
	otherID  = "spiffe://cluster.local/ns/other/sa/client"
)

// pki is a test mesh CA issuing ECDSA P-256 certificates with SPIFFE URI
// SANs, as the controller's CA does.
type pki struct {
	ca    *x509.Certificate
	key   *ecdsa.PrivateKey
	roots *x509.CertPool

	mu    sync.Mutex
	certs map[string]tls.Certificate
}

var (
	testPKIOnce sync.Once
	testPKI     *pki
)

func getPKI(t testing.TB) *pki {
	testPKIOnce.Do(func() {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			panic(err)
		}
		tmpl := &x509.Certificate{
			SerialNumber:          big.NewInt(1),
			Subject:               pkix.Name{Organization: []string{"cluster.local"}},
			NotBefore:             time.Now().Add(-time.Hour),
			NotAfter:              time.Now().Add(24 * time.Hour),
			IsCA:                  true,
			BasicConstraintsValid: true,
			KeyUsage:              x509.KeyUsageCertSign,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			panic(err)
		}
		ca, _ := x509.ParseCertificate(der)
		roots := x509.NewCertPool()
		roots.AddCert(ca)
		testPKI = &pki{ca: ca, key: key, roots: roots, certs: map[string]tls.Certificate{}}
	})
	return testPKI
}

func (p *pki) cert(id string) tls.Certificate {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.certs[id]; ok {
		return c
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	u, _ := url.Parse(id)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(int64(len(p.certs) + 2)),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		URIs:         []*url.URL{u},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &key.PublicKey, p.key)
	if err != nil {
		panic(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	c := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
	p.certs[id] = c
	return c
}

// verifySPIFFE checks a peer chain against the roots and its SPIFFE ID.
func (p *pki) verifySPIFFE(cs tls.ConnectionState, want string) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("no peer certificate")
	}
	leaf := cs.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: p.roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return err
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != want {
		return fmt.Errorf("peer is %v, want %s", leaf.URIs, want)
	}
	return nil
}

func (p *pki) serverTLS(id string) *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{p.cert(id)},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    p.roots,
		MinVersion:   tls.VersionTLS13,
	}
}

func (p *pki) clientTLS(src, dst string) *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{p.cert(src)},
		// SPIFFE certificates have no DNS names: the chain and the ID are
		// checked in VerifyConnection instead.
		InsecureSkipVerify: true,
		VerifyConnection:   func(cs tls.ConnectionState) error { return p.verifySPIFFE(cs, dst) },
		MinVersion:         tls.VersionTLS13,
	}
}

// countingListener counts and keeps the connections it accepts, so that
// tests can see how many the pool opened, cut them, or see them closed.
type countingListener struct {
	net.Listener
	n     atomic.Int32
	mu    sync.Mutex
	conns []*trackedConn
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.n.Add(1)
	tc := &trackedConn{Conn: c, closed: make(chan struct{})}
	l.mu.Lock()
	l.conns = append(l.conns, tc)
	l.mu.Unlock()
	return tc, nil
}

func (l *countingListener) accepted() []*trackedConn {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.conns)
}

// trackedConn is an accepted connection that tells when it is closed.
type trackedConn struct {
	net.Conn
	once   sync.Once
	closed chan struct{}
}

func (c *trackedConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// chanListener is a listener fed by a channel, to put several servers
// behind one address.
type chanListener struct {
	addr  net.Addr
	conns chan net.Conn
	once  sync.Once
	done  chan struct{}
}

func newChanListener(addr net.Addr) *chanListener {
	return &chanListener{addr: addr, conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return l.addr }

// env is a server and a pool talking over loopback.
type env struct {
	pki  *pki
	srv  Acceptor
	ln   *countingListener
	pool Connector
	key  Key
	logs *syncBuffer
}

type envOptions struct {
	pool   PoolOptions
	server ServerOptions
}

func newEnv(t testing.TB, h Handler, opts ...func(*envOptions)) *env {
	t.Helper()
	p := getPKI(t)
	var o envOptions
	for _, f := range opts {
		f(&o)
	}
	logs := &syncBuffer{}
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := &countingListener{Listener: l}
	so := o.server
	so.TLSConfig, so.Handler, so.Log = p.serverTLS(serverID), h, log
	srv := newAcceptor(so)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(ln)
	}()
	po := o.pool
	po.TLSConfig = func(k Key) (*tls.Config, error) { return p.clientTLS(k.SrcIdentity, k.DstIdentity), nil }
	po.Log = log
	pool := newConnector(po)
	t.Cleanup(func() {
		_ = pool.Close()
		_ = srv.Close()
		<-served
	})
	addr := netip.MustParseAddrPort(ln.Addr().String())
	return &env{pki: p, srv: srv, ln: ln, pool: pool, key: Key{SrcIdentity: clientID, DstIdentity: serverID, Addr: addr}, logs: logs}
}

func (e *env) connect(t testing.TB, target string) Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := e.pool.Connect(ctx, e.key, target, nil)
	if err != nil {
		t.Fatalf("Connect(%s): %v", target, err)
	}
	return s
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// echoHandler accepts every request and sends back what it reads, then
// ends its direction when the client ends its own.
var echoHandler = HandlerFunc(func(ctx context.Context, req *Request, rw Responder) {
	s, err := rw.Accept()
	if err != nil {
		return
	}
	if _, err := io.Copy(s, s); err != nil {
		return
	}
	_ = s.CloseWrite()
})

// checkLeaks fails the test if goroutines started during it are still
// running once its cleanups ran. Call it first, so that its cleanup runs
// last.
func checkLeaks(t testing.TB) {
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			n := runtime.NumGoroutine()
			if n <= before {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("%d goroutines leaked:\n%s", n-before, buf)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// waitFor polls cond until it holds or the test times out.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
