// Package catest runs the mesh CA for tests: a real ca.Server behind a
// real gRPC server on a TLS loopback listener, in front of client-go's fake
// clientset, whose TokenReviews a reactor answers the way the API server
// does (audiences intersected, pod and node in status.user.extra). It is
// for the tests of the CA and of its clients; the lab's end-to-end tests
// use the real API server.
package catest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/ambitmesh/ambit/controller/ca"
)

// ServerName is the name in the CA's serving certificate.
const ServerName = "ambit-controller.istio-system.svc"

// Namespace is where the CA keeps its Secret.
const Namespace = "istio-system"

// Token is what the fake API server knows of a bearer token.
type Token struct {
	Namespace, ServiceAccount string
	// PodName, PodUID and NodeName are the objects the token is bound to;
	// NodeName is left out of the review if OmitNode is set, as an API
	// server older than 1.30 would.
	PodName, PodUID, NodeName string
	OmitNode                  bool
	// Audiences the token was issued for; ["istio-ca"] if nil.
	Audiences []string
	// Invalid makes the review say "not authenticated", as for an expired
	// or revoked token.
	Invalid bool
}

// Options configure Start.
type Options struct {
	// CA signs; ca.LoadOrCreate against the fake clientset if nil.
	CA *ca.CA
	// Server options; Registerer defaults to a fresh registry (Env.Metrics)
	// and Log to the test's log.
	Server ca.ServerOptions
}

// Env is a running CA.
type Env struct {
	Client  *fake.Clientset
	CA      *ca.CA
	Server  *ca.Server
	Metrics *prometheus.Registry
	// Addr is the gRPC listener, 127.0.0.1:port.
	Addr string
	// Roots verify the serving certificate (for ServerName) and every
	// certificate issued: the CA's trust bundle.
	Roots *x509.CertPool

	// Calls counts CreateCertificate requests that reached the server.
	Calls atomic.Int64

	mu     sync.Mutex
	tokens map[string]Token
	hook   func(context.Context) error
}

// Start runs a CA until the test ends.
func Start(t testing.TB, opts Options) *Env {
	t.Helper()
	e := &Env{Client: fake.NewClientset(), tokens: map[string]Token{}}
	e.Client.PrependReactor("create", "tokenreviews", e.review)

	var err error
	e.CA = opts.CA
	if e.CA == nil {
		if e.CA, err = ca.LoadOrCreate(t.Context(), e.Client, Namespace, ca.Options{Log: Logger(t)}); err != nil {
			t.Fatalf("LoadOrCreate: %v", err)
		}
	}
	e.Roots = x509.NewCertPool()
	for _, r := range e.CA.Roots() {
		e.Roots.AddCert(r)
	}

	so := opts.Server
	if so.Registerer == nil {
		e.Metrics = prometheus.NewRegistry()
		so.Registerer = e.Metrics
	}
	if so.Log == nil {
		so.Log = Logger(t)
	}
	if e.Server, err = ca.NewServer(e.CA, e.Client, so); err != nil {
		t.Fatalf("NewServer: %v", err)
	}

	cfg := credentials.NewTLS(&tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: e.CA.GetServingCertificate(time.Hour, ServerName),
	})
	g := grpc.NewServer(grpc.Creds(cfg), grpc.UnaryInterceptor(e.intercept))
	e.Server.Register(g)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listening: %v", err)
	}
	e.Addr = ln.Addr().String()
	go func() { _ = g.Serve(ln) }()
	t.Cleanup(g.Stop)
	return e
}

// AddToken makes token known to the fake API server.
func (e *Env) AddToken(token string, tk Token) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.tokens[token] = tk
}

// TokenFile writes token to a file in the test's temporary directory.
func TokenFile(t testing.TB, token string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(p, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// AddPod creates a running pod of service account sa on node.
func (e *Env) AddPod(t testing.TB, namespace, name, sa, node string) *corev1.Pod {
	t.Helper()
	pod, err := e.Client.CoreV1().Pods(namespace).Create(t.Context(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, UID: types.UID(namespace + "-" + name + "-uid")},
		Spec:       corev1.PodSpec{ServiceAccountName: sa, NodeName: node},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating pod %s/%s: %v", namespace, name, err)
	}
	return pod
}

// SetHook runs hook before each CreateCertificate; an error it returns is
// the response (use a gRPC status). nil removes it.
func (e *Env) SetHook(hook func(context.Context) error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.hook = hook
}

// Unavailable is a hook error: the CA "down".
var Unavailable = status.Error(codes.Unavailable, "catest: CA unavailable")

func (e *Env) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	e.Calls.Add(1)
	e.mu.Lock()
	hook := e.hook
	e.mu.Unlock()
	if hook != nil {
		if err := hook(ctx); err != nil {
			return nil, err
		}
	}
	return handler(ctx, req)
}

// review answers a TokenReview as the API server's service-account
// authenticator does.
func (e *Env) review(action k8stesting.Action) (bool, runtime.Object, error) {
	tr := action.(k8stesting.CreateAction).GetObject().(*authnv1.TokenReview).DeepCopy()
	e.mu.Lock()
	tk, ok := e.tokens[tr.Spec.Token]
	e.mu.Unlock()
	switch {
	case !ok:
		tr.Status = authnv1.TokenReviewStatus{Error: "[invalid bearer token, square/go-jose: error in cryptographic primitive]"}
		return true, tr, nil
	case tk.Invalid:
		tr.Status = authnv1.TokenReviewStatus{Error: "[invalid bearer token, service account token has expired]"}
		return true, tr, nil
	}
	auds := tk.Audiences
	if auds == nil {
		auds = []string{ca.DefaultAudience}
	}
	granted := auds
	if len(tr.Spec.Audiences) > 0 {
		granted = nil
		for _, a := range tr.Spec.Audiences {
			if slices.Contains(auds, a) {
				granted = append(granted, a)
			}
		}
		if len(granted) == 0 {
			tr.Status = authnv1.TokenReviewStatus{Error: "[invalid bearer token, token audiences " + fmt.Sprint(auds) + " is invalid for the target audiences " + fmt.Sprint(tr.Spec.Audiences) + "]"}
			return true, tr, nil
		}
	}
	extra := map[string]authnv1.ExtraValue{}
	if tk.PodName != "" {
		extra["authentication.kubernetes.io/pod-name"] = authnv1.ExtraValue{tk.PodName}
		extra["authentication.kubernetes.io/pod-uid"] = authnv1.ExtraValue{tk.PodUID}
	}
	if tk.NodeName != "" && !tk.OmitNode {
		extra["authentication.kubernetes.io/node-name"] = authnv1.ExtraValue{tk.NodeName}
	}
	tr.Status = authnv1.TokenReviewStatus{
		Authenticated: true,
		Audiences:     granted,
		User: authnv1.UserInfo{
			Username: "system:serviceaccount:" + tk.Namespace + ":" + tk.ServiceAccount,
			Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:" + tk.Namespace, "system:authenticated"},
			Extra:    extra,
		},
	}
	return true, tr, nil
}

// Logger logs to t until the test ends, and drops what comes after (a
// late renewal or a server goroutine winding down) instead of panicking.
func Logger(t testing.TB) *slog.Logger {
	w := &testWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		w.done = true
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct {
	t    testing.TB
	mu   sync.Mutex
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimSuffix(string(p), "\n"))
	}
	return len(p), nil
}
