package interop

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	istiohbone "istio.io/istio/pkg/hbone"

	"github.com/ambitmesh/ambit/ztunnel/hbone"
)

// caseHeader names the subtest a CONNECT belongs to, so that a server
// shared by subtests can tell their requests apart.
const caseHeader = "X-Interop-Case"

// countingListener counts the connections it accepts: a pooled client
// multiplexes its streams on as few as it can.
type countingListener struct {
	net.Listener
	accepted atomic.Int32
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.accepted.Add(1)
	}
	return c, err
}

func listenLoopback(t testing.TB) *countingListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return &countingListener{Listener: ln}
}

func addrOf(ln net.Listener) netip.AddrPort {
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// startTCP runs serve for every connection to a loopback listener: the
// destination behind the HBONE server. serve owns the connection's
// directions; startTCP closes it when serve returns.
func startTCP(t testing.TB, serve func(*net.TCPConn)) netip.AddrPort {
	t.Helper()
	ln := listenLoopback(t)
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
	)
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = struct{}{}
			mu.Unlock()
			wg.Go(func() {
				serve(c.(*net.TCPConn))
				mu.Lock()
				delete(conns, c)
				mu.Unlock()
				_ = c.Close() // see "Destinations" below
			})
		}
	})
	t.Cleanup(func() {
		_ = ln.Close() // only stops the accept loop
		mu.Lock()
		for c := range conns {
			_ = c.Close() // unblocks serve
		}
		mu.Unlock()
		wg.Wait()
	})
	return addrOf(ln)
}

// Destinations. They ignore their own I/O errors on purpose: each test
// judges what reaches its client, which is where a fault shows.

// echoTCP sends back what it reads and passes on the end of it.
func echoTCP(c *net.TCPConn) {
	_, _ = io.Copy(c, c)
	_ = c.CloseWrite()
}

// countTCP reads until the client's FIN and only then answers how much it
// read: it gets an answer through only if a half-close reaches it as a FIN
// while the way back stays open.
func countTCP(c *net.TCPConn) {
	n, _ := io.Copy(io.Discard, c)
	_, _ = fmt.Fprintf(c, "read %d bytes", n)
}

// byeTCP closes first: it says bye and closes without reading.
func byeTCP(c *net.TCPConn) {
	_, _ = io.WriteString(c, "bye")
}

// resetTCP aborts: once the client's first byte arrives it closes with
// SO_LINGER 0, which sends a TCP RST.
func resetTCP(c *net.TCPConn) {
	_, _ = c.Read(make([]byte, 1))
	_ = c.SetLinger(0)
}

// closedAddr is a loopback address nothing listens on.
func closedAddr(t testing.TB) netip.AddrPort {
	ln := listenLoopback(t)
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	return addrOf(ln)
}

// istioServer is Istio's Go HBONE server (istio.io/istio/pkg/hbone), set up
// as Istio's echo server sets up its HBONE port
// (pkg/test/echo/server/endpoint/hbone.go): http.Server from NewServer on a
// TLS listener offering ALPN "h2". Its handler answers a CONNECT by
// dialing the :authority and copying both ways.
type istioServer struct {
	*http.Server
	addr netip.AddrPort
	ln   *countingListener

	mu   sync.Mutex
	seen map[string]chan *istioRequest
}

// istioRequest is a CONNECT that reached Istio's handler.
type istioRequest struct {
	host   string
	header http.Header
	tls    tls.ConnectionState
	done   chan struct{} // closed when Istio's handler has returned
}

func startIstioServer(t testing.TB, ca *testCA) *istioServer {
	t.Helper()
	cfg := ca.serverTLS(t, serverID, clientID)
	cfg.NextProtos = []string{"h2"}
	s := &istioServer{ln: listenLoopback(t), seen: map[string]chan *istioRequest{}}
	s.addr = addrOf(s.ln)
	s.Server = istiohbone.NewServer()
	connect := s.Handler
	// Wrapped only to observe: Istio's handler answers every request.
	s.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		req := &istioRequest{host: r.Host, header: r.Header.Clone(), done: make(chan struct{})}
		if r.TLS != nil {
			req.tls = *r.TLS
		}
		s.mu.Lock()
		ch := s.seen[r.Header.Get(caseHeader)]
		s.mu.Unlock()
		if ch != nil {
			select {
			case ch <- req:
			default:
			}
		}
		defer close(req.done)
		connect.ServeHTTP(w, r)
	})
	serveUntilCleanup(t, "Istio's server", http.ErrServerClosed, s.Close, func() error {
		return s.Serve(tls.NewListener(s.ln, cfg))
	})
	return s
}

// expect returns the CONNECTs carrying caseHeader name, as they arrive.
func (s *istioServer) expect(name string) <-chan *istioRequest {
	ch := make(chan *istioRequest, 16)
	s.mu.Lock()
	s.seen[name] = ch
	s.mu.Unlock()
	return ch
}

// ambitServer is Ambit's hbone.Server on a loopback listener.
type ambitServer struct {
	*hbone.Server
	addr  netip.AddrPort
	ln    *countingListener
	calls atomic.Int32 // Handler invocations
}

func startAmbitServer(t testing.TB, cfg *tls.Config, h hbone.Handler) *ambitServer {
	t.Helper()
	s := &ambitServer{ln: listenLoopback(t)}
	s.addr = addrOf(s.ln)
	s.Server = hbone.NewServer(hbone.ServerOptions{
		TLSConfig: cfg,
		Handler: hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
			s.calls.Add(1)
			h.ServeHBONE(ctx, req, rw)
		}),
	})
	serveUntilCleanup(t, "Ambit's server", hbone.ErrServerClosed, s.Close, func() error { return s.Serve(s.ln) })
	return s
}

// served is one CONNECT that Ambit's forwarding handler proxied.
type served struct {
	req      *hbone.Request
	up, down int64 // bytes client -> destination, destination -> client
	err      error
}

// forward is the Handler of an inbound ztunnel without policy: it dials
// the CONNECT's target and proxies, then reports on done.
func forward(done chan<- served) hbone.Handler {
	return hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
		var d net.Dialer
		dst, err := d.DialContext(ctx, "tcp", req.Target.String())
		if err != nil {
			// An error here would only repeat that the stream is gone;
			// the client sees the answer or its absence.
			_ = rw.Reject(http.StatusServiceUnavailable)
			done <- served{req: req, err: err}
			return
		}
		s, err := rw.Accept()
		if err != nil {
			_ = dst.Close() // nothing was sent on it
			done <- served{req: req, err: err}
			return
		}
		up, down, err := hbone.Proxy(s, dst)
		done <- served{req: req, up: up, down: down, err: err}
	})
}

// serveUntilCleanup runs serve in the background and, at cleanup, calls
// closeFn and checks that serve ended with closed, the error a server
// returns once closed, and nothing else.
func serveUntilCleanup(t testing.TB, name string, closed error, closeFn func() error, serve func() error) {
	result := make(chan error, 1)
	go func() { result <- serve() }()
	t.Cleanup(func() {
		if err := closeFn(); err != nil {
			t.Errorf("closing %s: %v", name, err)
		}
		if err := <-result; !errors.Is(err, closed) {
			t.Errorf("%s stopped serving with %v", name, err)
		}
	})
}

// mustClose closes c, the step under test.
func mustClose(t testing.TB, c io.Closer) {
	t.Helper()
	if err := c.Close(); err != nil {
		t.Errorf("closing: %v", err)
	}
}

// wait returns the next value from ch or fails the test after d.
func wait[T any](t testing.TB, ch <-chan T, d time.Duration, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(d):
		t.Fatalf("timed out after %v waiting for %s", d, what)
		panic("unreachable")
	}
}

// peerID is the SPIFFE ID of a chain's leaf.
func peerID(chain []*x509.Certificate) string {
	if len(chain) == 0 || len(chain[0].URIs) != 1 {
		return ""
	}
	return chain[0].URIs[0].String()
}
