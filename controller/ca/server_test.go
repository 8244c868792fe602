package ca_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	crfake "sigs.k8s.io/controller-runtime/pkg/client/fake"

	"github.com/ambitmesh/ambit/controller/ca"
	"github.com/ambitmesh/ambit/controller/ca/catest"
	"github.com/ambitmesh/ambit/ztunnel/identity"
)

// cluster is two nodes: a ztunnel on each, shop/cart on node-1, shop/pay
// on node-2.
func cluster(t *testing.T, o catest.Options) *catest.Env {
	t.Helper()
	env := catest.Start(t, o)
	env.AddPod(t, "istio-system", "ztunnel-1", "ztunnel", "node-1")
	env.AddPod(t, "istio-system", "ztunnel-2", "ztunnel", "node-2")
	env.AddPod(t, "shop", "cart-1", "cart", "node-1")
	env.AddPod(t, "shop", "pay-2", "pay", "node-2")
	env.AddToken("ztunnel-1", catest.Token{Namespace: "istio-system", ServiceAccount: "ztunnel",
		PodName: "ztunnel-1", PodUID: "istio-system-ztunnel-1-uid", NodeName: "node-1"})
	env.AddToken("cart", catest.Token{Namespace: "shop", ServiceAccount: "cart",
		PodName: "cart-1", PodUID: "shop-cart-1-uid", NodeName: "node-1"})
	return env
}

func client(t *testing.T, env *catest.Env, token string) *identity.Client {
	t.Helper()
	c, err := identity.NewClient(identity.Options{
		CAAddr:       env.Addr,
		CAServerName: catest.ServerName,
		CARoots:      env.Roots,
		TokenFile:    catest.TokenFile(t, token),
		Log:          catest.Logger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

const (
	cart    = "spiffe://cluster.local/ns/shop/sa/cart"
	pay     = "spiffe://cluster.local/ns/shop/sa/pay"
	tunnel  = "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
	foreign = "spiffe://example.org/ns/shop/sa/cart"
)

// TestCreateCertificate drives the server with ztunnel/identity's client,
// the way a node tunnel does.
func TestCreateCertificate(t *testing.T) {
	env := cluster(t, catest.Options{})
	env.AddToken("ztunnel-2-no-node", catest.Token{Namespace: "istio-system", ServiceAccount: "ztunnel",
		PodName: "ztunnel-2", PodUID: "istio-system-ztunnel-2-uid", NodeName: "node-2", OmitNode: true})
	env.AddToken("ztunnel-stale", catest.Token{Namespace: "istio-system", ServiceAccount: "ztunnel",
		PodName: "ztunnel-2", PodUID: "an-older-pod", OmitNode: true})
	env.AddToken("expired", catest.Token{Namespace: "shop", ServiceAccount: "cart", Invalid: true})
	env.AddToken("kube-api-audience", catest.Token{Namespace: "shop", ServiceAccount: "cart", Audiences: []string{"https://kubernetes.default.svc"}})

	tests := []struct {
		name, token, id string
		wantCode        codes.Code
		wantReason      string
	}{
		{name: "own service account", token: "cart", id: cart},
		{name: "ztunnel for a pod on its node", token: "ztunnel-1", id: cart},
		{name: "ztunnel for itself", token: "ztunnel-1", id: tunnel},
		{name: "ztunnel, node looked up from its pod", token: "ztunnel-2-no-node", id: pay},
		{name: "ztunnel for a pod on another node", token: "ztunnel-1", id: pay, wantCode: codes.PermissionDenied, wantReason: ca.ReasonNotOnNode},
		{name: "ztunnel whose pod was recreated", token: "ztunnel-stale", id: pay, wantCode: codes.PermissionDenied, wantReason: ca.ReasonCallerNodeUnknown},
		{name: "workload for another service account on its node", token: "cart", id: pay, wantCode: codes.PermissionDenied, wantReason: ca.ReasonNotNodeAccount},
		{name: "workload for the ztunnel identity", token: "cart", id: tunnel, wantCode: codes.PermissionDenied, wantReason: ca.ReasonNotNodeAccount},
		{name: "expired token", token: "expired", id: cart, wantCode: codes.Unauthenticated, wantReason: ca.ReasonUnauthenticated},
		{name: "token for the API server's audience", token: "kube-api-audience", id: cart, wantCode: codes.Unauthenticated, wantReason: ca.ReasonUnauthenticated},
		{name: "unknown token", token: "forged", id: cart, wantCode: codes.Unauthenticated, wantReason: ca.ReasonUnauthenticated},
	}
	issued := 0
	refused := map[string]float64{}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := client(t, env, tc.token).Fetch(t.Context(), spiffeid.RequireFromString(tc.id))
			if tc.wantCode == codes.OK {
				if err != nil {
					t.Fatal(err)
				}
				issued++
				leaf := got.Certificate.Leaf
				if len(leaf.URIs) != 1 || leaf.URIs[0].String() != tc.id {
					t.Fatalf("leaf URIs %v, want %s", leaf.URIs, tc.id)
				}
				if lifetime := leaf.NotAfter.Sub(leaf.NotBefore); lifetime < 24*time.Hour || lifetime > 24*time.Hour+2*time.Minute {
					t.Fatalf("lifetime %s, want 24h", lifetime)
				}
				if _, err := leaf.Verify(x509.VerifyOptions{Roots: env.Roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
					t.Fatal(err)
				}
				return
			}
			if status.Code(err) != tc.wantCode {
				t.Fatalf("got %v, want %s", err, tc.wantCode)
			}
			refused[tc.wantReason]++
			t.Logf("refused as expected: %v", err)
		})
	}
	if got := counter(t, env.Metrics, "ambit_ca_certificates_issued_total", ""); got != float64(issued) {
		t.Errorf("issued counter %v, want %d", got, issued)
	}
	for reason, n := range refused {
		if got := counter(t, env.Metrics, "ambit_ca_refusals_total", reason); got != n {
			t.Errorf("refusals{reason=%q} = %v, want %v", reason, got, n)
		}
	}
}

// TestCreateCertificateRaw sends what ztunnel/identity never would.
func TestCreateCertificateRaw(t *testing.T) {
	env := cluster(t, catest.Options{})
	certs := rawClient(t, env)
	bearer := func(token string) context.Context {
		return metadata.AppendToOutgoingContext(t.Context(), "authorization", "Bearer "+token)
	}
	impersonate := func(id string) *structpb.Struct {
		return &structpb.Struct{Fields: map[string]*structpb.Value{ca.ImpersonatedIdentityKey: structpb.NewStringValue(id)}}
	}

	tests := []struct {
		name       string
		ctx        context.Context
		req        *pb.IstioCertificateRequest
		wantCode   codes.Code
		wantReason string
	}{
		{name: "no token", ctx: t.Context(), req: &pb.IstioCertificateRequest{Csr: rawCSR(t, cart)},
			wantCode: codes.Unauthenticated, wantReason: ca.ReasonMissingToken},
		{name: "not a bearer token", ctx: metadata.AppendToOutgoingContext(t.Context(), "authorization", "Basic Y2FydA=="),
			req: &pb.IstioCertificateRequest{Csr: rawCSR(t, cart)}, wantCode: codes.Unauthenticated, wantReason: ca.ReasonMissingToken},
		{name: "lower-case bearer scheme", ctx: metadata.AppendToOutgoingContext(t.Context(), "authorization", "bearer cart"),
			req: &pb.IstioCertificateRequest{Csr: rawCSR(t, cart)}},
		{name: "no impersonation metadata, as a sidecar asks", ctx: bearer("cart"), req: &pb.IstioCertificateRequest{Csr: rawCSR(t, cart)}},
		{name: "extra SAN", ctx: bearer("cart"), req: &pb.IstioCertificateRequest{Csr: rawCSR(t, cart, "cart.shop.svc")},
			wantCode: codes.InvalidArgument, wantReason: ca.ReasonInvalidSAN},
		{name: "malformed CSR", ctx: bearer("cart"), req: &pb.IstioCertificateRequest{Csr: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"},
			wantCode: codes.InvalidArgument, wantReason: ca.ReasonMalformedCSR},
		{name: "wrong trust domain", ctx: bearer("cart"), req: &pb.IstioCertificateRequest{Csr: rawCSR(t, foreign)},
			wantCode: codes.InvalidArgument, wantReason: ca.ReasonWrongTrustDomain},
		{name: "impersonated identity differs from the CSR", ctx: bearer("ztunnel-1"),
			req:      &pb.IstioCertificateRequest{Csr: rawCSR(t, tunnel), Metadata: impersonate(cart)},
			wantCode: codes.InvalidArgument, wantReason: ca.ReasonIdentityMismatch},
		{name: "impersonation by a workload", ctx: bearer("cart"),
			req:      &pb.IstioCertificateRequest{Csr: rawCSR(t, pay), Metadata: impersonate(pay)},
			wantCode: codes.PermissionDenied, wantReason: ca.ReasonNotNodeAccount},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := counter(t, env.Metrics, "ambit_ca_refusals_total", tc.wantReason)
			resp, err := certs.CreateCertificate(tc.ctx, tc.req)
			if status.Code(err) != tc.wantCode {
				t.Fatalf("got %v, want %s", err, tc.wantCode)
			}
			if tc.wantCode == codes.OK {
				if len(resp.CertChain) != 2 {
					t.Fatalf("%d certificates", len(resp.CertChain))
				}
				return
			}
			t.Logf("refused as expected: %v", err)
			if after := counter(t, env.Metrics, "ambit_ca_refusals_total", tc.wantReason); after != before+1 {
				t.Fatalf("refusals{reason=%q} went from %v to %v", tc.wantReason, before, after)
			}
		})
	}
}

func TestCreateCertificateTTL(t *testing.T) {
	env := cluster(t, catest.Options{Server: ca.ServerOptions{MaxTTL: 48 * time.Hour}})
	certs := rawClient(t, env)
	ctx := metadata.AppendToOutgoingContext(t.Context(), "authorization", "Bearer cart")
	for _, tc := range []struct {
		name      string
		requested int64
		want      time.Duration
	}{
		{"no preference: the default", 0, 24 * time.Hour},
		{"less than the default", 3600, time.Hour},
		{"more than the default, within the max", 36 * 3600, 36 * time.Hour},
		{"more than the max: capped", 30 * 24 * 3600, 48 * time.Hour},
		{"absurd: capped", 1 << 62, 48 * time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := certs.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: rawCSR(t, cart), ValidityDuration: tc.requested})
			if err != nil {
				t.Fatal(err)
			}
			leaf := parseChain(t, resp.CertChain[:1])[0]
			// NotBefore is backdated a minute for clock skew.
			if got := leaf.NotAfter.Sub(leaf.NotBefore) - time.Minute; got != tc.want {
				t.Fatalf("lifetime %s, want %s", got, tc.want)
			}
		})
	}
}

// TestPluginIntermediateEndToEnd issues through a plug-in intermediate and
// verifies the result with the root of root-cert.pem only, as a peer with
// the published trust bundle does.
func TestPluginIntermediateEndToEnd(t *testing.T) {
	p := newPKI(t)
	plugin, err := ca.LoadOrCreate(t.Context(), fake.NewClientset(cacerts(map[string][]byte{
		ca.CACertKey: pemCerts(p.inter1), ca.CAKeyKey: pemKey(t, p.inter1Key),
		ca.RootCertKey: pemCerts(p.root), ca.CertChainKey: pemCerts(p.inter1, p.root),
	})), "istio-system", opts(t))
	if err != nil {
		t.Fatal(err)
	}
	env := cluster(t, catest.Options{CA: plugin})
	got, err := client(t, env, "cart").Fetch(t.Context(), spiffeid.RequireFromString(cart))
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Roots) != 1 || !got.Roots[0].Equal(p.root) {
		t.Fatalf("roots sent %v, want root-cert.pem", got.Roots)
	}
	if len(got.Certificate.Certificate) != 2 {
		t.Fatalf("TLS chain has %d certificates, want leaf and intermediate", len(got.Certificate.Certificate))
	}
	inter, err := x509.ParseCertificate(got.Certificate.Certificate[1])
	if err != nil {
		t.Fatal(err)
	}
	verifyLeaf(t, got.Certificate.Leaf, []*x509.Certificate{inter}, p.root)
}

func rawClient(t *testing.T, env *catest.Env) pb.IstioCertificateServiceClient {
	t.Helper()
	conn, err := grpc.NewClient(env.Addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: env.Roots, ServerName: catest.ServerName, MinVersion: tls.VersionTLS12,
	})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return pb.NewIstioCertificateServiceClient(conn)
}

func rawCSR(t *testing.T, uri string, dnsNames ...string) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(uri)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}, DNSNames: dnsNames}, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

// counter reads a counter from reg; reason "" for an unlabelled one.
func counter(t *testing.T, reg *prometheus.Registry, name, reason string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			match := reason == ""
			for _, l := range m.GetLabel() {
				if l.GetName() == "reason" && l.GetValue() == reason {
					match = true
				}
			}
			if match {
				return m.GetCounter().GetValue()
			}
		}
	}
	if reason == "" {
		t.Fatalf("no metric %s", name)
	}
	return 0
}

// countingPods is the live Pods behind a cache, counting its node lists.
type countingPods struct {
	ca.Pods
	onNode atomic.Int32
}

func (c *countingPods) OnNode(ctx context.Context, node string) ([]ca.PodRef, error) {
	c.onNode.Add(1)
	return c.Pods.OnNode(ctx, node)
}

// TestCachedPods checks the node check read from a cache: a pod the cache
// has costs no API call, a pod it does not have yet is found live before a
// refusal, and a refusal stays one.
func TestCachedPods(t *testing.T) {
	live := &countingPods{}
	// The cache lacks shop/pay-2, as an informer would for a pod
	// scheduled a moment ago.
	pod := func(ns, name, sa, node string) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(ns + "-" + name + "-uid")},
			Spec:       corev1.PodSpec{ServiceAccountName: sa, NodeName: node},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning},
		}
	}
	cache := crfake.NewClientBuilder().
		WithIndex(&corev1.Pod{}, ca.NodeNameField, ca.PodNodeName).
		WithObjects(pod("istio-system", "ztunnel-1", "ztunnel", "node-1"), pod("istio-system", "ztunnel-2", "ztunnel", "node-2"),
			pod("shop", "cart-1", "cart", "node-1")).
		Build()
	env := cluster(t, catest.Options{Server: ca.ServerOptions{Pods: ca.CachedPods(cache, live)}})
	live.Pods = ca.APIPods(env.Client)
	env.AddToken("ztunnel-2", catest.Token{Namespace: "istio-system", ServiceAccount: "ztunnel",
		PodName: "ztunnel-2", PodUID: "istio-system-ztunnel-2-uid", NodeName: "node-2"})

	fetch := func(token, id string) error {
		_, err := client(t, env, token).Fetch(t.Context(), spiffeid.RequireFromString(id))
		return err
	}
	if err := fetch("ztunnel-1", cart); err != nil {
		t.Fatalf("ztunnel-1 for cart (in the cache): %v", err)
	}
	if n := live.onNode.Load(); n != 0 {
		t.Errorf("%d live lists for a pod in the cache, want 0", n)
	}
	if err := fetch("ztunnel-2", pay); err != nil {
		t.Fatalf("ztunnel-2 for pay (not yet in the cache): %v", err)
	}
	if n := live.onNode.Load(); n != 1 {
		t.Errorf("%d live lists for a pod missing from the cache, want 1", n)
	}
	if err := fetch("ztunnel-1", pay); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("ztunnel-1 for pay (on node-2): %v, want PermissionDenied", err)
	}
	if got := counter(t, env.Metrics, "ambit_ca_refusals_total", ca.ReasonNotOnNode); got != 1 {
		t.Errorf("refusals{reason=%q} = %v, want 1", ca.ReasonNotOnNode, got)
	}
}
