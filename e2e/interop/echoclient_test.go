package interop

import (
	"context"
	"crypto/rand"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// buildEchoClient builds Istio's echo client in e2e/apps, the module the
// lab builds it in.
//
// It runs as a process of its own rather than through its library
// (pkg/test/echo/server/forwarder), although the library could be driven
// in-process: the forwarder imports grpc's xDS support, and this module's
// graph (Istio plus Ambit) selects a grpc that does not compile against
// the go-control-plane Istio pins. Built in e2e/apps, it is also exactly
// the lab's echo client, with Istio's x/net and not the one Ambit's
// requirements select here, so it is a peer independent of this test
// binary in code as well as in process.
func buildEchoClient(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds Istio's echo client")
	}
	gocmd, err := exec.LookPath("go") // go test puts its GOROOT/bin first in PATH
	if err != nil {
		t.Fatalf("finding the go command to build Istio's echo client: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "echo-client")
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, gocmd, "-C", filepath.Join("..", "apps"), "build", "-buildvcs=false", "-o", bin,
		"istio.io/istio/pkg/test/echo/cmd/client")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building Istio's echo client in e2e/apps: %v\n%s", err, out)
	}
	return bin
}

// startHTTPEcho serves HTTP on loopback, answering as Istio's echo server
// does: one "Field=value" line per field (pkg/test/echo/fields.go).
func startHTTPEcho(t *testing.T, version string) netip.AddrPort {
	t.Helper()
	ln := listenLoopback(t)
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			ip, _, _ := net.SplitHostPort(r.RemoteAddr)
			// A failed write shows in the echo client's output.
			_, _ = fmt.Fprintf(w, "ServiceVersion=%s\nServicePort=%d\nMethod=%s\nURL=%s\nHost=%s\nProto=%s\nIP=%s\n",
				version, addrOf(ln).Port(), r.Method, r.URL, r.Host, r.Proto, ip)
		}),
		ReadHeaderTimeout: setupTimeout,
	}
	serveUntilCleanup(t, "the echo server", http.ErrServerClosed, srv.Close, func() error { return srv.Serve(ln) })
	return addrOf(ln)
}

// TestIstioEchoClientToAmbitServer sends HTTP requests with Istio's echo
// client through its HBONE mode (--hbone) to Ambit's Server, which
// forwards them to an in-process echo server.
func TestIstioEchoClientToAmbitServer(t *testing.T) {
	client := buildEchoClient(t)
	ca := newTestCA(t)
	version := "interop-" + rand.Text()[:8]
	backend := startHTTPEcho(t, version)
	done := make(chan served, 4)
	// The echo client checks the HBONE server's certificate as an HTTPS
	// client checks a web server's: against the address it dials (Go's
	// http2.Transport sets ServerName to it), with no SPIFFE check. So
	// this server's certificate also names 127.0.0.1. Mesh certificates
	// name no IP: against a real ztunnel the echo client needs
	// --hbone-insecure-skip-verify.
	srv := startAmbitServer(t, ca.serverTLS(t, serverID, clientID, net.IPv4(127, 0, 0, 1)), forward(done))
	files := ca.writePEM(t, ca.issue(t, clientID))

	const count = 2
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, client,
		"http://"+backend.String()+"/interop",
		fmt.Sprintf("--count=%d", count),
		"--timeout=10s",
		"--hbone="+srv.addr.String(),
		"--hbone-ca="+files.CA,
		"--hbone-client-cert="+files.Cert,
		"--hbone-client-key="+files.Key,
		"--hbone-header=baggage: service.name=echo-client",
	)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("Istio's echo client through Ambit's server: %v\n%s", err, out)
	}
	for i := range count {
		for _, want := range []string{
			fmt.Sprintf("[%d] StatusCode=200", i),
			fmt.Sprintf("[%d body] ServiceVersion=%s", i, version),
		} {
			if !strings.Contains(string(out), want) {
				t.Errorf("the echo client's output lacks %q:\n%s", want, out)
			}
		}
	}

	// The requests share one HTTP/1.1 connection, so one tunnel; it ends
	// when the client exits.
	got := wait(t, done, setupTimeout, "Ambit's handler to finish")
	if got.req.Target != backend {
		t.Errorf("Ambit's server saw target %v, want %v", got.req.Target, backend)
	}
	if id := peerID(got.req.PeerCertificates); id != clientID {
		t.Errorf("Ambit's server saw client %q, want %q", id, clientID)
	}
	// The echo client passes --hbone-header to Istio's dialer as
	// Config.Headers, which the dialer does not send.
	t.Logf("Istio's echo client sent header fields %v; the tunnel ended with %v", got.req.Header, got.err)
}
