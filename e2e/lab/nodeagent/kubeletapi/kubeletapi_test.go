//go:build linux

package kubeletapi

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/client-go/transport/spdy"
)

// fakeRuntime is the node agent, reduced to what the tests point it at.
type fakeRuntime struct {
	container func(ns, pod, ctr string) (Container, error)
	logPath   func(ns, pod, ctr string, previous bool) (string, error)
	podNetNS  func(ns, pod string) (string, error)
}

var _ Runtime = (*fakeRuntime)(nil)

func (f *fakeRuntime) Container(ns, pod, ctr string) (Container, error) {
	if f.container == nil {
		return Container{}, fmt.Errorf("container %s/%s/%s: %w", ns, pod, ctr, ErrNotFound)
	}
	return f.container(ns, pod, ctr)
}

func (f *fakeRuntime) LogPath(ns, pod, ctr string, previous bool) (string, error) {
	if f.logPath == nil {
		return "", fmt.Errorf("log of %s/%s/%s: %w", ns, pod, ctr, ErrNotFound)
	}
	return f.logPath(ns, pod, ctr, previous)
}

func (f *fakeRuntime) PodNetNS(ns, pod string) (string, error) {
	if f.podNetNS == nil {
		return "", fmt.Errorf("pod %s/%s: %w", ns, pod, ErrNotFound)
	}
	return f.podNetNS(ns, pod)
}

// --- pure cores -------------------------------------------------------------

func TestParseLogOptions(t *testing.T) {
	tests := []struct {
		name    string
		query   string
		want    logOptions
		wantErr string
	}{
		{name: "none", query: "", want: logOptions{tailLines: -1, limitBytes: -1}},
		{name: "all set", query: "follow=true&previous=false&tailLines=10&limitBytes=5&stream=All",
			want: logOptions{follow: true, tailLines: 10, limitBytes: 5}},
		{name: "legacy tail", query: "tail=3", want: logOptions{tailLines: 3, limitBytes: -1}},
		{name: "legacy tail all", query: "tail=all", want: logOptions{tailLines: -1, limitBytes: -1}},
		{name: "tailLines zero", query: "tailLines=0", want: logOptions{tailLines: 0, limitBytes: -1}},
		{name: "negative tail", query: "tailLines=-1", wantErr: "tailLines"},
		{name: "zero limit", query: "limitBytes=0", wantErr: "limitBytes"},
		{name: "bad bool", query: "follow=yes", wantErr: "follow"},
		{name: "timestamps", query: "timestamps=true", wantErr: "not supported in the lab"},
		{name: "timestamps false", query: "timestamps=false", want: logOptions{tailLines: -1, limitBytes: -1}},
		{name: "since", query: "sinceSeconds=10", wantErr: "sinceSeconds"},
		{name: "split stream", query: "stream=Stderr", wantErr: "stream=Stderr"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			q, err := url.ParseQuery(tc.query)
			if err != nil {
				t.Fatal(err)
			}
			got, err := parseLogOptions(q)
			if tc.wantErr != "" {
				var br badRequest
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !errors.As(err, &br) {
					t.Fatalf("err = %v, want a badRequest containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func TestTailOffset(t *testing.T) {
	long := strings.Repeat("x", 70000) + "\n"
	tests := []struct {
		name string
		data string
		n    int64
		want string
	}{
		{name: "empty", data: "", n: 3, want: ""},
		{name: "zero lines", data: "a\nb\n", n: 0, want: ""},
		{name: "last one", data: "a\nb\nc\n", n: 1, want: "c\n"},
		{name: "last two", data: "a\nb\nc\n", n: 2, want: "b\nc\n"},
		{name: "more than there are", data: "a\nb\n", n: 10, want: "a\nb\n"},
		{name: "exactly all", data: "a\nb\n", n: 2, want: "a\nb\n"},
		{name: "unterminated last line", data: "a\nb\nc", n: 2, want: "b\nc"},
		{name: "empty lines", data: "a\n\n\n", n: 2, want: "\n\n"},
		{name: "across chunks", data: "first\n" + long + long + "end\n", n: 2, want: long + "end\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := strings.NewReader(tc.data)
			off, err := tailOffset(r, int64(len(tc.data)), tc.n)
			if err != nil {
				t.Fatal(err)
			}
			if got := tc.data[off:]; got != tc.want {
				t.Fatalf("tail %d of %q = %q, want %q", tc.n, shorten(tc.data), shorten(got), shorten(tc.want))
			}
		})
	}
}

func shorten(s string) string {
	if len(s) > 40 {
		return fmt.Sprintf("%s...(%d bytes)", s[:20], len(s))
	}
	return s
}

// --- a server over loopback TLS ---------------------------------------------

// testPKI is a CA and the files a server and its clients need.
type testPKI struct {
	dir                   string
	caPEM                 []byte
	clientCert, clientKey []byte // signed by the CA, for the "apiserver"
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	dir := t.TempDir()
	caKey, caCert, caPEM := newCA(t, "lab-test-ca")
	serverCert, serverKey := issue(t, caCert, caKey, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "node-a"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	clientCert, clientKey := issue(t, caCert, caKey, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"kubeadm:cluster-admins"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	for name, b := range map[string][]byte{"ca.crt": caPEM, "server.crt": serverCert, "server.key": serverKey} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return &testPKI{dir: dir, caPEM: caPEM, clientCert: clientCert, clientKey: clientKey}
}

func newCA(t *testing.T, cn string) (*ecdsa.PrivateKey, *x509.Certificate, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return key, cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func issue(t *testing.T, ca *x509.Certificate, caKey *ecdsa.PrivateKey, tmpl *x509.Certificate) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		t.Fatal(err)
	}
	tmpl.SerialNumber = serial
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(time.Hour)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
}

// testServer is a Server on 127.0.0.1 and what a client needs to reach it.
type testServer struct {
	base   string // https://127.0.0.1:port
	pki    *testPKI
	cancel context.CancelFunc
	done   chan error
}

func startServer(t *testing.T, rt Runtime) *testServer {
	t.Helper()
	pki := newTestPKI(t)
	tw := &testWriter{t: t}
	s, err := New(Options{
		TLSCertFile:  filepath.Join(pki.dir, "server.crt"),
		TLSKeyFile:   filepath.Join(pki.dir, "server.key"),
		ClientCAFile: filepath.Join(pki.dir, "ca.crt"),
		Runtime:      rt,
		Log:          slog.New(slog.NewTextHandler(tw, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ts := &testServer{base: "https://" + ln.Addr().String(), pki: pki, cancel: cancel, done: make(chan error, 1)}
	go func() { ts.done <- s.ServeListener(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		defer tw.stop()
		select {
		case err := <-ts.done:
			if err != nil {
				t.Errorf("ServeListener: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("ServeListener did not return 10s after its context was cancelled")
		}
	})
	return ts
}

// testWriter sends the server's access log to the test log, until the
// test is over: a streaming handler may log after that.
type testWriter struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
}

func (w *testWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimSpace(string(b)))
	}
	return len(b), nil
}

func (w *testWriter) stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.done = true
}

// restConfig is what the apiserver would hold: the CA and its kubelet
// client certificate.
func (ts *testServer) restConfig() *rest.Config {
	return &rest.Config{
		Host: ts.base,
		TLSClientConfig: rest.TLSClientConfig{
			CAData:   ts.pki.caPEM,
			CertData: ts.pki.clientCert,
			KeyData:  ts.pki.clientKey,
		},
	}
}

func (ts *testServer) httpClient(t *testing.T, withCert bool) *http.Client {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ts.pki.caPEM)
	cfg := &tls.Config{RootCAs: pool}
	if withCert {
		cert, err := tls.X509KeyPair(ts.pki.clientCert, ts.pki.clientKey)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	tr := &http.Transport{TLSClientConfig: cfg}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

func get(t *testing.T, c *http.Client, u string) (int, string) {
	t.Helper()
	resp, err := c.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// startProcess starts a real process to stand in for a container; it is
// killed by its pid when the test ends.
func startProcess(t *testing.T, attr *syscall.SysProcAttr, name string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.SysProcAttr = attr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { killProcess(cmd) })
	return cmd
}

func killProcess(cmd *exec.Cmd) {
	_ = syscall.Kill(cmd.Process.Pid, syscall.SIGKILL)
	_ = cmd.Wait()
}

func requireRoot(t *testing.T, what string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skipf("%s needs root (nsenter, setns, ip netns); run the tests as root", what)
	}
}

func TestNewChecksOptions(t *testing.T) {
	pki := newTestPKI(t)
	notPEM := filepath.Join(pki.dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	good := Options{
		TLSCertFile:  filepath.Join(pki.dir, "server.crt"),
		TLSKeyFile:   filepath.Join(pki.dir, "server.key"),
		ClientCAFile: filepath.Join(pki.dir, "ca.crt"),
		Runtime:      &fakeRuntime{},
	}
	tests := []struct {
		name    string
		edit    func(*Options)
		wantErr string
	}{
		{name: "good", edit: func(*Options) {}},
		{name: "no runtime", edit: func(o *Options) { o.Runtime = nil }, wantErr: "Runtime"},
		{name: "no client CA", edit: func(o *Options) { o.ClientCAFile = "" }, wantErr: "ClientCAFile"},
		{name: "missing cert", edit: func(o *Options) { o.TLSCertFile = filepath.Join(pki.dir, "nope") }, wantErr: "serving certificate"},
		{name: "CA not PEM", edit: func(o *Options) { o.ClientCAFile = notPEM }, wantErr: "no PEM certificate"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := good
			tc.edit(&o)
			_, err := New(o)
			if tc.wantErr == "" && err != nil {
				t.Fatal(err)
			}
			if tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("err = %v, want one about %q", err, tc.wantErr)
			}
		})
	}
}

// --- authentication ---------------------------------------------------------

func TestHealthzNeedsAClientCertOfTheCA(t *testing.T) {
	ts := startServer(t, &fakeRuntime{})

	code, body := get(t, ts.httpClient(t, true), ts.base+"/healthz")
	if code != http.StatusOK || body != "ok" {
		t.Fatalf("healthz with the apiserver's cert = %d %q, want 200 ok", code, body)
	}

	if resp, err := ts.httpClient(t, false).Get(ts.base + "/healthz"); err == nil {
		_ = resp.Body.Close()
		t.Fatal("healthz without a client certificate succeeded; want the TLS handshake refused")
	}

	// A certificate from another CA is refused too.
	otherKey, otherCA, _ := newCA(t, "not-the-lab")
	cert, key := issue(t, otherCA, otherKey, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "intruder"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	c := ts.httpClient(t, false)
	kp, err := tls.X509KeyPair(cert, key)
	if err != nil {
		t.Fatal(err)
	}
	c.Transport.(*http.Transport).TLSClientConfig.Certificates = []tls.Certificate{kp}
	if resp, err := c.Get(ts.base + "/healthz"); err == nil {
		_ = resp.Body.Close()
		t.Fatal("healthz with a certificate of another CA succeeded; want it refused")
	}
}

func TestAttachIsNotImplemented(t *testing.T) {
	ts := startServer(t, &fakeRuntime{})
	code, body := get(t, ts.httpClient(t, true), ts.base+"/attach/default/p/c?output=1")
	if code != http.StatusNotImplemented || !strings.Contains(body, "kubectl logs") {
		t.Fatalf("attach = %d %q, want 501 pointing at kubectl logs", code, body)
	}
}

// --- logs -------------------------------------------------------------------

func TestContainerLogs(t *testing.T) {
	dir := t.TempDir()
	cur, prev := filepath.Join(dir, "1.log"), filepath.Join(dir, "0.log")
	if err := os.WriteFile(cur, []byte("one\ntwo\nthree\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(prev, []byte("before the restart\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	rt := &fakeRuntime{logPath: func(ns, pod, ctr string, previous bool) (string, error) {
		if ns != "default" || pod != "web" || ctr != "app" {
			return "", ErrNotFound
		}
		if previous {
			return prev, nil
		}
		return cur, nil
	}}
	ts := startServer(t, rt)
	c := ts.httpClient(t, true)

	tests := []struct {
		name     string
		path     string
		wantCode int
		want     string // body, or a part of it for errors
	}{
		{name: "full", path: "/containerLogs/default/web/app", wantCode: 200, want: "one\ntwo\nthree\n"},
		{name: "tailLines", path: "/containerLogs/default/web/app?tailLines=2", wantCode: 200, want: "two\nthree\n"},
		{name: "tailLines 0", path: "/containerLogs/default/web/app?tailLines=0", wantCode: 200, want: ""},
		{name: "limitBytes", path: "/containerLogs/default/web/app?limitBytes=5", wantCode: 200, want: "one\nt"},
		{name: "tail and limit", path: "/containerLogs/default/web/app?tailLines=1&limitBytes=3", wantCode: 200, want: "thr"},
		{name: "previous", path: "/containerLogs/default/web/app?previous=true", wantCode: 200, want: "before the restart\n"},
		// The container is not running (Container says not found): follow
		// sends what there is and ends.
		{name: "follow a stopped container", path: "/containerLogs/default/web/app?follow=true", wantCode: 200, want: "one\ntwo\nthree\n"},
		{name: "unknown container", path: "/containerLogs/default/web/nope", wantCode: 404, want: "not found"},
		{name: "timestamps", path: "/containerLogs/default/web/app?timestamps=true", wantCode: 400, want: "not supported in the lab"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, body := get(t, c, ts.base+tc.path)
			if code != tc.wantCode {
				t.Fatalf("GET %s = %d %q, want %d", tc.path, code, body, tc.wantCode)
			}
			if (code == 200 && body != tc.want) || (code != 200 && !strings.Contains(body, tc.want)) {
				t.Fatalf("GET %s body = %q, want %q", tc.path, body, tc.want)
			}
		})
	}
}

func TestContainerLogsFollow(t *testing.T) {
	log := filepath.Join(t.TempDir(), "0.log")
	if err := os.WriteFile(log, []byte("started\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	proc := startProcess(t, nil, "sleep", "60")
	pid := proc.Process.Pid
	rt := &fakeRuntime{
		logPath: func(_, _, _ string, _ bool) (string, error) { return log, nil },
		container: func(_, _, _ string) (Container, error) {
			// Running as long as the process is alive: signal 0 probes it.
			if syscall.Kill(pid, 0) != nil {
				return Container{}, ErrNotFound
			}
			return Container{PID: pid}, nil
		},
	}
	ts := startServer(t, rt)
	resp, err := ts.httpClient(t, true).Get(ts.base + "/containerLogs/default/web/app?follow=true")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	r := bufio.NewReader(resp.Body)
	readLine := func(want string) {
		t.Helper()
		line, err := r.ReadString('\n')
		if err != nil || line != want {
			t.Fatalf("read %q, %v; want %q", line, err, want)
		}
	}
	readLine("started\n")

	// Bytes appended after the request started reach the client.
	appendTo(t, log, "appended\n")
	readLine("appended\n")
	appendTo(t, log, "partial line, then ")
	appendTo(t, log, "the rest\n")
	readLine("partial line, then the rest\n")

	// The container stops: what it wrote last is sent, then the stream ends.
	appendTo(t, log, "last words\n")
	killProcess(proc)
	readLine("last words\n")
	done := make(chan error, 1)
	go func() { _, err := r.ReadByte(); done <- err }()
	select {
	case err := <-done:
		if !errors.Is(err, io.EOF) {
			t.Fatalf("after the container stopped: %v, want EOF", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("follow did not end 5s after the container stopped")
	}
}

func TestContainerLogsFollowLimitAndShutdown(t *testing.T) {
	log := filepath.Join(t.TempDir(), "0.log")
	if err := os.WriteFile(log, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	proc := startProcess(t, nil, "sleep", "60")
	rt := &fakeRuntime{
		logPath:   func(_, _, _ string, _ bool) (string, error) { return log, nil },
		container: func(_, _, _ string) (Container, error) { return Container{PID: proc.Process.Pid}, nil },
	}
	ts := startServer(t, rt)
	c := ts.httpClient(t, true)

	t.Run("limitBytes ends a follow", func(t *testing.T) {
		resp, err := c.Get(ts.base + "/containerLogs/default/web/app?follow=true&limitBytes=6")
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = resp.Body.Close() }()
		appendTo(t, log, "abc")
		appendTo(t, log, "defghi")
		b, err := io.ReadAll(resp.Body)
		if err != nil || string(b) != "abcdef" {
			t.Fatalf("read %q, %v; want abcdef", b, err)
		}
	})

	t.Run("shutdown ends a follow", func(t *testing.T) {
		resp, err := c.Get(ts.base + "/containerLogs/default/web/app?follow=true&tailLines=0")
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = resp.Body.Close() }()
		ts.cancel()
		done := make(chan error, 1)
		go func() { _, err := io.ReadAll(resp.Body); done <- err }()
		select {
		case err := <-done:
			t.Logf("follow ended: %v", err) // how it ends (EOF or not) is up to the transport
		case <-time.After(10 * time.Second):
			t.Fatal("follow did not end 10s after the server was told to stop")
		}
	})
}

func appendTo(t *testing.T, path, s string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.WriteString(s)
	if err := errors.Join(err, f.Close()); err != nil {
		t.Fatal(err)
	}
	// Let a poll see this write on its own.
	time.Sleep(2 * followPoll)
}

// --- exec -------------------------------------------------------------------

// execURL is the location the apiserver builds for `kubectl exec`.
func execURL(base string, stdin, tty bool, command ...string) *url.URL {
	q := url.Values{"command": command, "output": {"1"}}
	if !tty {
		q.Set("error", "1")
	}
	if stdin {
		q.Set("input", "1")
	}
	if tty {
		q.Set("tty", "1")
	}
	u, _ := url.Parse(base + "/exec/default/web/app?" + q.Encode())
	return u
}

type execResult struct {
	stdout, stderr string
	code           int // -1: no exit code
	err            error
}

func runExec(t *testing.T, e remotecommand.Executor, stdin io.Reader, tty bool) execResult {
	t.Helper()
	var out, errb bytes.Buffer
	opts := remotecommand.StreamOptions{Stdin: stdin, Stdout: &out, Tty: tty}
	if !tty {
		opts.Stderr = &errb
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err := e.StreamWithContext(ctx, opts)
	res := execResult{stdout: out.String(), stderr: errb.String(), code: -1, err: err}
	var ee interface{ ExitStatus() int }
	if err == nil {
		res.code = 0
	} else if errors.As(err, &ee) {
		res.code = ee.ExitStatus()
	}
	return res
}

func TestExec(t *testing.T) {
	requireRoot(t, "exec (nsenter)")
	proc := startProcess(t, nil, "sleep", "60")
	rt := &fakeRuntime{container: func(ns, pod, ctr string) (Container, error) {
		if ctr != "app" {
			return Container{}, ErrNotFound
		}
		return Container{PID: proc.Process.Pid, Env: []string{"GREETING=hello from the container env"}}, nil
	}}
	ts := startServer(t, rt)
	cfg := ts.restConfig()

	tests := []struct {
		name       string
		command    []string
		stdin      string // sent, then closed, when not ""
		stdinOpen  bool   // stdin that is never closed
		tty        bool
		wantOut    string
		wantErrOut string
		wantCode   int
	}{
		{name: "echo", command: []string{"echo", "hello"}, wantOut: "hello\n"},
		{name: "exit code", command: []string{"sh", "-c", "exit 3"}, wantCode: 3},
		{name: "stderr", command: []string{"sh", "-c", "echo oops >&2"}, wantErrOut: "oops\n"},
		{name: "stdin", command: []string{"cat"}, stdin: "through stdin\n", wantOut: "through stdin\n"},
		// kubectl exec -i pod -- true: the command ends while the client
		// still holds stdin open.
		{name: "stdin open but unused", command: []string{"true"}, stdinOpen: true},
		{name: "container env", command: []string{"sh", "-c", `echo "$GREETING"; echo "${HOME:-no HOME}"`},
			wantOut: "hello from the container env\nno HOME\n"},
		{name: "not found", command: []string{"whatever-is-not-installed"}, wantCode: 127},
		{name: "killed by a signal", command: []string{"sh", "-c", "kill -TERM $$"}, wantCode: 128 + 15},
		{name: "tty", command: []string{"sh", "-c", "test -t 0 && test -t 1 && echo on a tty"}, tty: true,
			wantOut: "on a tty\r\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e, err := remotecommand.NewSPDYExecutor(cfg, "POST", execURL(ts.base, tc.stdin != "" || tc.stdinOpen, tc.tty, tc.command...))
			if err != nil {
				t.Fatal(err)
			}
			var stdin io.Reader
			if tc.stdin != "" {
				stdin = strings.NewReader(tc.stdin)
			}
			if tc.stdinOpen {
				r, w := io.Pipe()
				t.Cleanup(func() { _ = w.Close() })
				stdin = r
			}
			res := runExec(t, e, stdin, tc.tty)
			if res.code != tc.wantCode {
				t.Fatalf("exit code %d (err %v), want %d; stderr %q", res.code, res.err, tc.wantCode, res.stderr)
			}
			if res.stdout != tc.wantOut {
				t.Fatalf("stdout %q, want %q", res.stdout, tc.wantOut)
			}
			if tc.wantErrOut != "" && res.stderr != tc.wantErrOut {
				t.Fatalf("stderr %q, want %q", res.stderr, tc.wantErrOut)
			}
		})
	}

	t.Run("websocket", func(t *testing.T) {
		// v4 over websockets (the kubelet's own websocket protocol). The
		// apiserver translates kubectl's v5 websockets to SPDY unless the
		// node declares ExtendWebSocketsToKubelet, which the lab does not.
		e, err := remotecommand.NewWebSocketExecutorForProtocols(cfg, "GET",
			execURL(ts.base, false, false, "sh", "-c", "echo over websocket; exit 4").String(), "v4.channel.k8s.io")
		if err != nil {
			t.Fatal(err)
		}
		res := runExec(t, e, nil, false)
		if res.stdout != "over websocket\n" || res.code != 4 {
			t.Fatalf("got %q, exit %d (%v); want %q, exit 4", res.stdout, res.code, res.err, "over websocket\n")
		}
	})

	t.Run("unknown container", func(t *testing.T) {
		u := execURL(ts.base, false, false, "true")
		u.Path = "/exec/default/web/nope"
		e, err := remotecommand.NewSPDYExecutor(cfg, "POST", u)
		if err != nil {
			t.Fatal(err)
		}
		if res := runExec(t, e, nil, false); res.err == nil || !strings.Contains(res.err.Error(), "not found") {
			t.Fatalf("exec in an unknown container: %v, want a not found error", res.err)
		}
	})
}

func TestShutdownKillsARunningExec(t *testing.T) {
	requireRoot(t, "exec (nsenter)")
	proc := startProcess(t, nil, "sleep", "60")
	ts := startServer(t, &fakeRuntime{container: func(_, _, _ string) (Container, error) {
		return Container{PID: proc.Process.Pid}, nil
	}})
	e, err := remotecommand.NewSPDYExecutor(ts.restConfig(), "POST",
		execURL(ts.base, false, false, "sh", "-c", "echo $$; exec sleep 60"))
	if err != nil {
		t.Fatal(err)
	}
	r, w := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- e.StreamWithContext(context.Background(), remotecommand.StreamOptions{Stdout: w, Stderr: io.Discard})
		_ = w.Close() // a PipeWriter's Close never fails
	}()
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil {
		t.Fatalf("reading the exec'd pid: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatal(err)
	}
	go func() { _, _ = io.Copy(io.Discard, r) }()

	ts.cancel()
	waitFor(t, "the exec'd command to be killed", func() bool {
		// Reaped by the server, so the pid is gone, not a zombie.
		return syscall.Kill(pid, 0) != nil
	})
	select {
	case err := <-done:
		t.Logf("exec session ended: %v", err) // an error or not, depending on which side closed first
	case <-time.After(10 * time.Second):
		t.Fatal("the exec session did not end 10s after shutdown")
	}
}

// TestExecInTheContainersNamespacesAndCgroup starts the "container" in new
// UTS, mount and network namespaces (and a cgroup, where cgroup v2 is
// writable) and checks that an exec'd command lands in all of them.
func TestExecInTheContainersNamespacesAndCgroup(t *testing.T) {
	requireRoot(t, "exec into namespaces")
	mnt := t.TempDir()
	// The container makes its mounts private first, so that its tmpfs does
	// not propagate to the host.
	script := fmt.Sprintf(`mount --make-rprivate / && mount -t tmpfs lab %s && echo only in the container > %s/marker && hostname lab-pod-uts && exec sleep 60`, mnt, mnt)
	attr := &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWUTS | syscall.CLONE_NEWNS | syscall.CLONE_NEWNET}
	cgroup := testCgroup(t)
	if cgroup != "" {
		fd, err := unix.Open(cgroup, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = unix.Close(fd) }()
		attr.UseCgroupFD, attr.CgroupFD = true, fd
	}
	proc := startProcess(t, attr, "sh", "-c", script)
	pid := proc.Process.Pid
	waitFor(t, "the container to set up", func() bool {
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		return string(comm) == "sleep\n"
	})

	rt := &fakeRuntime{container: func(_, _, _ string) (Container, error) {
		return Container{PID: pid, CgroupPath: cgroup}, nil
	}}
	ts := startServer(t, rt)
	run := func(command ...string) string {
		t.Helper()
		e, err := remotecommand.NewSPDYExecutor(ts.restConfig(), "POST", execURL(ts.base, false, false, command...))
		if err != nil {
			t.Fatal(err)
		}
		res := runExec(t, e, nil, false)
		if res.code != 0 {
			t.Fatalf("%v: exit %d (%v), stderr %q", command, res.code, res.err, res.stderr)
		}
		return res.stdout
	}

	if got := run("hostname"); got != "lab-pod-uts\n" {
		t.Errorf("hostname through exec = %q, want the container's lab-pod-uts", got)
	}
	if got := run("cat", mnt+"/marker"); got != "only in the container\n" {
		t.Errorf("a file on the container's own mount = %q", got)
	}
	if _, err := os.Stat(mnt + "/marker"); err == nil {
		t.Errorf("the container's mount is visible on the host: the test set-up leaked it")
	}
	for _, ns := range []string{"net", "uts", "mnt"} {
		want, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", pid, ns))
		if err != nil {
			t.Fatal(err)
		}
		if got := run("readlink", "/proc/self/ns/"+ns); got != want+"\n" {
			t.Errorf("%s namespace of the exec'd command = %q, want the container's %q", ns, got, want)
		}
	}
	// The container's working directory is the exec's.
	cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
	if err != nil {
		t.Fatal(err)
	}
	if got := run("pwd"); got != cwd+"\n" {
		t.Errorf("pwd = %q, want the container's %q", got, cwd)
	}
	if cgroup == "" {
		t.Log("no writable cgroup v2 hierarchy: the cgroup part is not tested")
		return
	}
	rel := "/" + filepath.Base(cgroup)
	if got := run("cat", "/proc/self/cgroup"); !strings.Contains(got, "0::"+rel+"\n") {
		t.Errorf("/proc/self/cgroup of the exec'd command = %q, want it in %s", got, rel)
	}
}

// testCgroup makes a cgroup v2 directory for the test, or returns "" when
// there is no writable cgroup2 mount.
func testCgroup(t *testing.T) string {
	t.Helper()
	root := cgroup2Mount()
	if root == "" {
		return ""
	}
	dir := filepath.Join(root, fmt.Sprintf("kubeletapi-test-%d", os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Logf("making a test cgroup: %v", err)
		return ""
	}
	t.Cleanup(func() {
		// Runs after the processes are killed (cleanups run last first).
		waitFor(t, "the test cgroup to empty", func() bool { return os.Remove(dir) == nil })
	})
	return dir
}

func cgroup2Mount() string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		// ... mountpoint ... - fstype source options
		pre, post, ok := strings.Cut(line, " - ")
		if !ok || !strings.HasPrefix(post, "cgroup2 ") {
			continue
		}
		if f := strings.Fields(pre); len(f) > 4 {
			return f[4]
		}
	}
	return ""
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// --- port-forward -----------------------------------------------------------

func TestPortForward(t *testing.T) {
	requireRoot(t, "port-forward into a network namespace")
	name := fmt.Sprintf("kubeletapi-test-%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "delete", name).Run() })
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("bringing lo up in %s: %v: %s", name, err, out)
	}
	nsPath := "/run/netns/" + name
	podPort := echoServerIn(t, nsPath)

	// The pod's port is not reachable from the test's own namespace, so a
	// working forward proves the dial happened in the pod's.
	if c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(podPort)), time.Second); err == nil {
		_ = c.Close()
		t.Logf("note: port %d also answers in the host netns; the forward test proves less", podPort)
	}

	rt := &fakeRuntime{podNetNS: func(ns, pod string) (string, error) {
		if pod != "web" {
			return "", ErrNotFound
		}
		return nsPath, nil
	}}
	ts := startServer(t, rt)

	local := forwardPorts(t, ts, "/portForward/default/web", fmt.Sprint(podPort), "1") // port 1: nothing listens

	t.Run("echo", func(t *testing.T) {
		c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(local[0])))
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = c.Close() }()
		r := bufio.NewReader(c)
		for _, msg := range []string{"ping\n", "pong\n"} {
			if _, err := c.Write([]byte(msg)); err != nil {
				t.Fatal(err)
			}
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			got, err := r.ReadString('\n')
			if err != nil || got != msg {
				t.Fatalf("echo of %q = %q, %v", msg, got, err)
			}
		}
	})

	t.Run("half close", func(t *testing.T) {
		c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(local[0])))
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = c.Close() }()
		if _, err := c.Write([]byte("all of it")); err != nil {
			t.Fatal(err)
		}
		if err := c.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(c)
		if err != nil || string(got) != "all of it" {
			t.Fatalf("after a half close read %q, %v; want the whole echo then EOF", got, err)
		}
	})

	t.Run("nothing listening", func(t *testing.T) {
		c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(local[1])))
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = c.Close() }()
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatalf("read %d bytes from a port nothing listens on", n)
		}
	})

	t.Run("unknown pod", func(t *testing.T) {
		req, err := http.NewRequest("POST", ts.base+"/portForward/default/nope", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := ts.httpClient(t, true).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Fatalf("port-forward to an unknown pod = %d, want 404", resp.StatusCode)
		}
	})
}

// forwardPorts runs client-go's port forwarder (what kubectl port-forward
// runs) against path and returns the local ports, in order.
func forwardPorts(t *testing.T, ts *testServer, path string, ports ...string) []int {
	t.Helper()
	transport, upgrader, err := spdy.RoundTripperFor(ts.restConfig())
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(ts.base + path)
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: transport}, "POST", u)
	for i, p := range ports {
		ports[i] = "0:" + p
	}
	stop, ready := make(chan struct{}), make(chan struct{})
	// Its connection goroutines write out and errOut concurrently.
	fw, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, ports, stop, ready, io.Discard, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- fw.ForwardPorts() }()
	t.Cleanup(func() {
		close(stop)
		// ErrLostConnectionToPod if the test already stopped the server.
		if err := <-done; err != nil {
			t.Logf("port-forward ended: %v", err)
		}
	})
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("port-forward ended before it was ready: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("port-forward not ready after 20s")
	}
	fwd, err := fw.GetPorts()
	if err != nil {
		t.Fatal(err)
	}
	local := make([]int, len(fwd))
	for i, p := range fwd {
		local[i] = int(p.Local)
	}
	return local
}

// echoServerIn listens on 127.0.0.1 in the network namespace at nsPath and
// echoes every connection until it is half-closed. It returns the port.
func echoServerIn(t *testing.T, nsPath string) int {
	t.Helper()
	lnc := make(chan net.Listener, 1)
	errc := make(chan error, 1)
	go func() {
		// This thread is never given back: it dies with the goroutine.
		runtime.LockOSThread()
		f, err := os.Open(nsPath)
		if err != nil {
			errc <- err
			return
		}
		defer func() { _ = f.Close() }() // read-only
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", nsPath, err)
			return
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			errc <- err
			return
		}
		lnc <- ln
	}()
	var ln net.Listener
	select {
	case ln = <-lnc:
	case err := <-errc:
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer func() { _ = c.Close() }()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}
