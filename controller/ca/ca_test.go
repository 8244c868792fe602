package ca_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/ambitmesh/ambit/controller/ca"
	"github.com/ambitmesh/ambit/controller/ca/catest"
)

func opts(t *testing.T) ca.Options { return ca.Options{Log: catest.Logger(t)} }

func TestLoadOrCreateSelfSigned(t *testing.T) {
	client := fake.NewClientset()
	first, err := ca.LoadOrCreate(t.Context(), client, "istio-system", opts(t))
	if err != nil {
		t.Fatal(err)
	}
	s, err := client.CoreV1().Secrets("istio-system").Get(t.Context(), ca.SelfSignedSecretName, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("istio-ca-secret not created: %v", err)
	}
	if s.Type != "istio.io/ca-root" || len(s.Data[ca.CACertKey]) == 0 || len(s.Data[ca.CAKeyKey]) == 0 {
		t.Fatalf("secret type %q keys %v", s.Type, keys(s.Data))
	}
	if !bytes.Equal(s.Data[ca.CACertKey], first.RootPEM()) {
		t.Fatal("RootPEM is not the stored ca-cert.pem")
	}
	root := first.Roots()[0]
	if pub, ok := root.PublicKey.(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P256() {
		t.Fatalf("root key %T, want ECDSA P-256", root.PublicKey)
	}
	if !root.IsCA || root.CheckSignatureFrom(root) != nil || root.Subject.Organization[0] != "cluster.local" {
		t.Fatalf("root %v is not a self-signed CA for cluster.local", root.Subject)
	}

	again, err := ca.LoadOrCreate(t.Context(), client, "istio-system", opts(t))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(first.RootPEM(), again.RootPEM()) {
		t.Fatal("second start made a new root instead of loading the stored one")
	}
}

// TestLoadOrCreateRace has another replica create istio-ca-secret between
// this one's Get and Create: this one must use the other's root.
func TestLoadOrCreateRace(t *testing.T) {
	otherClient := fake.NewClientset()
	other, err := ca.LoadOrCreate(t.Context(), otherClient, "istio-system", opts(t))
	if err != nil {
		t.Fatal(err)
	}
	theirs, err := otherClient.CoreV1().Secrets("istio-system").Get(t.Context(), ca.SelfSignedSecretName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}

	client := fake.NewClientset()
	var once sync.Once
	client.PrependReactor("create", "secrets", func(k8stesting.Action) (bool, runtime.Object, error) {
		raced := false
		once.Do(func() {
			raced = true
			if err := client.Tracker().Add(theirs.DeepCopy()); err != nil {
				t.Error(err)
			}
		})
		if raced {
			return true, nil, apierrors.NewAlreadyExists(corev1.Resource("secrets"), ca.SelfSignedSecretName)
		}
		return false, nil, nil
	})
	mine, err := ca.LoadOrCreate(t.Context(), client, "istio-system", opts(t))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mine.RootPEM(), other.RootPEM()) {
		t.Fatal("the replica that lost the create race uses its own root")
	}
}

func TestLoadOrCreateConcurrentReplicas(t *testing.T) {
	client := fake.NewClientset()
	var wg sync.WaitGroup
	roots := make([][]byte, 4)
	for i := range roots {
		wg.Go(func() {
			c, err := ca.LoadOrCreate(t.Context(), client, "istio-system", opts(t))
			if err != nil {
				t.Error(err)
				return
			}
			roots[i] = c.RootPEM()
		})
	}
	wg.Wait()
	for i := range roots {
		if !bytes.Equal(roots[i], roots[0]) {
			t.Fatalf("replica %d has a different root", i)
		}
	}
}

// pki is a root and intermediates as a user would make them for cacerts.
type pki struct {
	root, inter1, inter2          *x509.Certificate
	rootKey, inter1Key, inter2Key *ecdsa.PrivateKey
}

func newPKI(t *testing.T) pki {
	t.Helper()
	var p pki
	p.root, p.rootKey = mkCA(t, "Example Root", nil, nil)
	p.inter1, p.inter1Key = mkCA(t, "Example Intermediate 1", p.root, p.rootKey)
	p.inter2, p.inter2Key = mkCA(t, "Example Intermediate 2", p.inter1, p.inter1Key)
	return p
}

func mkCA(t *testing.T, cn string, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: cn, Organization: []string{"example"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(365 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c, key
}

func pemCerts(certs ...*x509.Certificate) []byte {
	var b []byte
	for _, c := range certs {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return b
}

func pemKey(t *testing.T, k *ecdsa.PrivateKey) []byte {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func cacerts(data map[string][]byte) *corev1.Secret {
	return &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: ca.PluginSecretName, Namespace: "istio-system"}, Data: data}
}

func newCSR(t *testing.T, tmpl *x509.CertificateRequest) *x509.CertificateRequest {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatal(err)
	}
	return csr
}

func parseChain(t *testing.T, chain []string) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for _, s := range chain {
		b := []byte(s)
		for {
			var block *pem.Block
			block, b = pem.Decode(b)
			if block == nil {
				break
			}
			c, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, c)
		}
	}
	return out
}

// TestPluginCA loads cacerts in the layouts users write (cert-chain.pem
// with and without the root, two intermediates) and checks that what it
// issues verifies up to root-cert.pem alone.
func TestPluginCA(t *testing.T) {
	p := newPKI(t)
	tests := []struct {
		name          string
		data          map[string][]byte
		intermediates []*x509.Certificate
	}{
		{
			name: "intermediate, cert-chain with the root (Istio's docs)",
			data: map[string][]byte{
				ca.CACertKey: pemCerts(p.inter1), ca.CAKeyKey: pemKey(t, p.inter1Key),
				ca.RootCertKey: pemCerts(p.root), ca.CertChainKey: pemCerts(p.inter1, p.root),
			},
			intermediates: []*x509.Certificate{p.inter1},
		},
		{
			name: "intermediate, no cert-chain",
			data: map[string][]byte{
				ca.CACertKey: pemCerts(p.inter1), ca.CAKeyKey: pemKey(t, p.inter1Key), ca.RootCertKey: pemCerts(p.root),
			},
			intermediates: []*x509.Certificate{p.inter1},
		},
		{
			name: "two intermediates",
			data: map[string][]byte{
				ca.CACertKey: pemCerts(p.inter2), ca.CAKeyKey: pemKey(t, p.inter2Key),
				ca.RootCertKey: pemCerts(p.root), ca.CertChainKey: pemCerts(p.inter2, p.inter1, p.root),
			},
			intermediates: []*x509.Certificate{p.inter2, p.inter1},
		},
		{
			name: "the root itself",
			data: map[string][]byte{
				ca.CACertKey: pemCerts(p.root), ca.CAKeyKey: pemKey(t, p.rootKey),
				ca.RootCertKey: pemCerts(p.root), ca.CertChainKey: pemCerts(p.root),
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			client := fake.NewClientset(cacerts(tc.data))
			c, err := ca.LoadOrCreate(t.Context(), client, "istio-system", opts(t))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(c.RootPEM(), pemCerts(p.root)) {
				t.Fatalf("RootPEM is not root-cert.pem:\n%s", c.RootPEM())
			}
			if _, err := client.CoreV1().Secrets("istio-system").Get(t.Context(), ca.SelfSignedSecretName, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				t.Fatalf("a self-signed root was made although cacerts exists: %v", err)
			}
			id := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
			chain, err := c.Sign(newCSR(t, &x509.CertificateRequest{}), id, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			if len(chain) != 2+len(tc.intermediates) {
				t.Fatalf("chain has %d elements, want leaf, %d intermediates, root", len(chain), len(tc.intermediates))
			}
			certs := parseChain(t, chain)
			for i, want := range tc.intermediates {
				if !certs[1+i].Equal(want) {
					t.Fatalf("chain[%d] is %s, want %s", 1+i, certs[1+i].Subject, want.Subject)
				}
			}
			if last := chain[len(chain)-1]; last != string(pemCerts(p.root)) {
				t.Fatalf("last element is not root-cert.pem: %s", last)
			}
			verifyLeaf(t, certs[0], certs[1:len(certs)-1], p.root)
		})
	}
}

func verifyLeaf(t *testing.T, leaf *x509.Certificate, intermediates []*x509.Certificate, root *x509.Certificate) {
	t.Helper()
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(root)
	for _, c := range intermediates {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("leaf does not verify to root-cert.pem: %v", err)
	}
}

func TestPluginCARefused(t *testing.T) {
	p := newPKI(t)
	other, otherKey := mkCA(t, "Other Root", nil, nil)
	_, strayKey := mkCA(t, "Stray", nil, nil)
	tests := []struct {
		name, wantErr string
		data          map[string][]byte
	}{
		{"key of another certificate", "does not hold the private key", map[string][]byte{
			ca.CACertKey: pemCerts(p.inter1), ca.CAKeyKey: pemKey(t, strayKey), ca.RootCertKey: pemCerts(p.root)}},
		{"intermediate of another root", "does not chain", map[string][]byte{
			ca.CACertKey: pemCerts(p.inter1), ca.CAKeyKey: pemKey(t, p.inter1Key), ca.RootCertKey: pemCerts(other)}},
		{"missing link", "does not chain", map[string][]byte{
			ca.CACertKey: pemCerts(p.inter2), ca.CAKeyKey: pemKey(t, p.inter2Key), ca.RootCertKey: pemCerts(p.root)}},
		{"no root-cert.pem for an intermediate", "not self-signed", map[string][]byte{
			ca.CACertKey: pemCerts(p.inter1), ca.CAKeyKey: pemKey(t, p.inter1Key)}},
		{"no key", "no PEM private key", map[string][]byte{
			ca.CACertKey: pemCerts(other), ca.RootCertKey: pemCerts(other)}},
		{"garbage certificate", "no PEM CERTIFICATE", map[string][]byte{
			ca.CACertKey: []byte("nope"), ca.CAKeyKey: pemKey(t, otherKey)}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ca.LoadOrCreate(t.Context(), fake.NewClientset(cacerts(tc.data)), "istio-system", opts(t))
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "cacerts") {
				t.Fatalf("got %v, want an error about cacerts containing %q", err, tc.wantErr)
			}
		})
	}
}

func TestSign(t *testing.T) {
	now := time.Now()
	client := fake.NewClientset()
	c, err := ca.LoadOrCreate(t.Context(), client, "istio-system", ca.Options{Log: catest.Logger(t), RootTTL: 48 * time.Hour, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
	// The CSR asks for more than it may have; Sign uses id only.
	csr := newCSR(t, &x509.CertificateRequest{
		Subject:  pkix.Name{CommonName: "admin"},
		DNSNames: []string{"kubernetes.default.svc"},
		URIs:     []*url.URL{{Scheme: "spiffe", Host: "cluster.local", Path: "/ns/istio-system/sa/ztunnel"}},
	})
	chain, err := c.Sign(csr, id, 2*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 || chain[1] != string(c.RootPEM()) {
		t.Fatalf("chain %d elements, want leaf and root", len(chain))
	}
	leaf := parseChain(t, chain[:1])[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() || len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
		t.Fatalf("SANs: URIs %v DNS %v IPs %v emails %v; want exactly %s", leaf.URIs, leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses, id)
	}
	if leaf.Subject.CommonName != "" {
		t.Fatalf("subject %q copied from the CSR", leaf.Subject)
	}
	if leaf.IsCA || leaf.KeyUsage&x509.KeyUsageCertSign != 0 || leaf.KeyUsage&x509.KeyUsageDigitalSignature == 0 {
		t.Fatalf("leaf IsCA %v key usage %b", leaf.IsCA, leaf.KeyUsage)
	}
	if len(leaf.ExtKeyUsage) != 2 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || leaf.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth {
		t.Fatalf("ext key usage %v, want server and client auth", leaf.ExtKeyUsage)
	}
	if !leaf.NotAfter.Equal(now.Add(2*time.Hour).Truncate(time.Second)) || leaf.NotBefore.After(now) {
		t.Fatalf("valid %s to %s, want until %s", leaf.NotBefore, leaf.NotAfter, now.Add(2*time.Hour))
	}
	verifyLeaf(t, leaf, nil, c.Roots()[0])

	// Never beyond the CA's own lifetime.
	chain, err = c.Sign(csr, id, 365*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if leaf := parseChain(t, chain[:1])[0]; leaf.NotAfter.After(c.Roots()[0].NotAfter) {
		t.Fatalf("leaf outlives its root: %s > %s", leaf.NotAfter, c.Roots()[0].NotAfter)
	}

	if _, err := c.Sign(csr, spiffeid.RequireFromString("spiffe://example.org/ns/a/sa/b"), time.Hour); err == nil {
		t.Fatal("signed for another trust domain")
	}
	bad := *csr
	bad.Signature = bytes.Clone(csr.Signature)
	bad.Signature[len(bad.Signature)-1] ^= 1
	if _, err := c.Sign(&bad, id, time.Hour); err == nil {
		t.Fatal("signed a CSR whose signature does not verify")
	}
}

func TestServingCertificate(t *testing.T) {
	c, err := ca.LoadOrCreate(t.Context(), fake.NewClientset(), "istio-system", opts(t))
	if err != nil {
		t.Fatal(err)
	}
	get := c.GetServingCertificate(time.Hour, catest.ServerName)
	cert, err := get(nil)
	if err != nil {
		t.Fatal(err)
	}
	again, _ := get(nil)
	if cert != again {
		t.Fatal("serving certificate reissued before half-life")
	}
	roots := x509.NewCertPool()
	roots.AddCert(c.Roots()[0])
	if _, err := cert.Leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: catest.ServerName}); err != nil {
		t.Fatal(err)
	}
}

func TestPublishRootCert(t *testing.T) {
	client := fake.NewClientset()
	get := func() *corev1.ConfigMap {
		cm, err := client.CoreV1().ConfigMaps("shop").Get(t.Context(), ca.RootCertConfigMap, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return cm
	}
	if err := ca.PublishRootCert(t.Context(), client, "shop", []byte("one")); err != nil {
		t.Fatal(err)
	}
	if cm := get(); cm.Data["root-cert.pem"] != "one" {
		t.Fatalf("data %v", cm.Data)
	}
	cm := get()
	cm.Data["extra"] = "kept"
	if _, err := client.CoreV1().ConfigMaps("shop").Update(t.Context(), cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := ca.PublishRootCert(t.Context(), client, "shop", []byte("two")); err != nil {
		t.Fatal(err)
	}
	if cm := get(); cm.Data["root-cert.pem"] != "two" || cm.Data["extra"] != "kept" {
		t.Fatalf("data %v", cm.Data)
	}
	// Unchanged: no write.
	client.ClearActions()
	if err := ca.PublishRootCert(t.Context(), client, "shop", []byte("two")); err != nil {
		t.Fatal(err)
	}
	for _, a := range client.Actions() {
		if a.GetVerb() != "get" {
			t.Fatalf("unexpected %s of an up-to-date ConfigMap", a.GetVerb())
		}
	}
}

func keys(m map[string][]byte) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
