package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"net"
	"net/url"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	authnv1 "k8s.io/api/authentication/v1"
)

var testPolicy = policy{
	td:           spiffeid.RequireTrustDomainFromString("cluster.local"),
	audience:     "istio-ca",
	nodeAccounts: DefaultNodeAccounts,
}

// review is what the API server answers for a pod-bound token of ns/sa in
// pod on node.
func review(ns, sa, pod, node string) authnv1.TokenReviewStatus {
	extra := map[string]authnv1.ExtraValue{}
	if pod != "" {
		extra[extraPodName] = authnv1.ExtraValue{pod}
		extra[extraPodUID] = authnv1.ExtraValue{pod + "-uid"}
	}
	if node != "" {
		extra[extraNodeName] = authnv1.ExtraValue{node}
	}
	return authnv1.TokenReviewStatus{
		Authenticated: true,
		Audiences:     []string{"istio-ca"},
		User: authnv1.UserInfo{
			Username: "system:serviceaccount:" + ns + ":" + sa,
			Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
			Extra:    extra,
		},
	}
}

func ztunnel(node string) authnv1.TokenReviewStatus {
	return review("istio-system", "ztunnel", "ztunnel-"+node, node)
}

func app() authnv1.TokenReviewStatus { return review("shop", "cart", "cart-1", "node-1") }

func with(st authnv1.TokenReviewStatus, f func(*authnv1.TokenReviewStatus)) authnv1.TokenReviewStatus {
	f(&st)
	return st
}

var testKey = func() *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	return k
}()

func mustURL(s string) *url.URL {
	u, err := url.Parse(s)
	if err != nil {
		panic(err)
	}
	return u
}

func csrPEM(t *testing.T, tmpl *x509.CertificateRequest, key crypto.Signer) string {
	t.Helper()
	if key == nil {
		key = testKey
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

func csrFor(t *testing.T, uris ...string) string {
	t.Helper()
	tmpl := &x509.CertificateRequest{}
	for _, u := range uris {
		tmpl.URIs = append(tmpl.URIs, mustURL(u))
	}
	return csrPEM(t, tmpl, nil)
}

// tamper flips a bit in the CSR's signature.
func tamper(t *testing.T, p string) string {
	t.Helper()
	block, _ := pem.Decode([]byte(p))
	der := block.Bytes
	der[len(der)-3] ^= 0x01
	return string(pem.EncodeToMemory(&pem.Block{Type: block.Type, Bytes: der}))
}

// otherNameCSR asks for the URI and, next to it, an otherName SAN, which
// crypto/x509 does not parse into any field.
func otherNameCSR(t *testing.T, uri string) string {
	t.Helper()
	utf8, _ := asn1.Marshal("x")
	otherName, _ := asn1.Marshal(struct {
		ID    asn1.ObjectIdentifier
		Value asn1.RawValue `asn1:"tag:0,explicit"`
	}{asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 311, 20, 2, 3}, asn1.RawValue{FullBytes: utf8}})
	// [0] IMPLICIT: retag the SEQUENCE as context-specific constructed 0.
	otherName[0] = 0xa0
	uriName, _ := asn1.Marshal(asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 6, Bytes: []byte(uri)})
	san, _ := asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true,
		Bytes: append(uriName, otherName...)})
	return csrPEM(t, &x509.CertificateRequest{
		ExtraExtensions: []pkix.Extension{{Id: oidSubjectAltName, Value: san}},
	}, nil)
}

const (
	cartID  = "spiffe://cluster.local/ns/shop/sa/cart"
	payID   = "spiffe://cluster.local/ns/shop/sa/pay"
	tunnel1 = "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
)

// TestDecision runs authenticate, parseRequest and authorize in the order
// the server does, over every way a request can be accepted or refused.
func TestDecision(t *testing.T) {
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	payOnNode1 := []PodRef{{Namespace: "shop", Name: "pay-1", ServiceAccount: "pay", NodeName: "node-1"}}
	payOnNode2 := []PodRef{{Namespace: "shop", Name: "pay-2", ServiceAccount: "pay", NodeName: "node-2"}}

	tests := []struct {
		name         string
		review       authnv1.TokenReviewStatus
		csr          string
		impersonated string
		podsOnNode   []PodRef
		wantReason   string // "" means issued
		wantCode     codes.Code
	}{
		{name: "own service account", review: app(), csr: csrFor(t, cartID)},
		{name: "own service account, impersonation metadata naming itself", review: app(), csr: csrFor(t, cartID), impersonated: cartID},
		{name: "own service account, token not bound to a pod", review: review("shop", "cart", "", ""), csr: csrFor(t, cartID)},
		{name: "ztunnel for its own identity", review: ztunnel("node-1"), csr: csrFor(t, tunnel1), impersonated: tunnel1},
		{name: "ztunnel for a service account with a pod on its node", review: ztunnel("node-1"), csr: csrFor(t, payID), impersonated: payID, podsOnNode: payOnNode1},
		{name: "ztunnel for a service account with a pod on its node, among others", review: ztunnel("node-1"), csr: csrFor(t, payID), impersonated: payID,
			podsOnNode: append([]PodRef{{Namespace: "shop", Name: "cart-1", ServiceAccount: "cart", NodeName: "node-1"}}, payOnNode1...)},
		{name: "ztunnel for another node's service account", review: ztunnel("node-1"), csr: csrFor(t, payID), impersonated: payID,
			podsOnNode: payOnNode2, wantReason: ReasonNotOnNode, wantCode: codes.PermissionDenied},
		{name: "ztunnel for a service account with no pod on its node", review: ztunnel("node-1"), csr: csrFor(t, payID), impersonated: payID,
			wantReason: ReasonNotOnNode, wantCode: codes.PermissionDenied},
		{name: "ztunnel for a same-named service account in another namespace", review: ztunnel("node-1"), csr: csrFor(t, payID), impersonated: payID,
			podsOnNode: []PodRef{{Namespace: "other", Name: "pay-1", ServiceAccount: "pay", NodeName: "node-1"}}, wantReason: ReasonNotOnNode, wantCode: codes.PermissionDenied},
		{name: "ztunnel with a token bound to no pod or node", review: review("istio-system", "ztunnel", "", ""), csr: csrFor(t, payID), impersonated: payID,
			podsOnNode: payOnNode1, wantReason: ReasonCallerNodeUnknown, wantCode: codes.PermissionDenied},
		{name: "not the ztunnel account, asking for another service account", review: app(), csr: csrFor(t, payID), impersonated: payID,
			podsOnNode: payOnNode1, wantReason: ReasonNotNodeAccount, wantCode: codes.PermissionDenied},
		{name: "ztunnel name in another namespace, asking for another service account", review: review("shop", "ztunnel", "z-1", "node-1"), csr: csrFor(t, payID),
			podsOnNode: payOnNode1, wantReason: ReasonNotNodeAccount, wantCode: codes.PermissionDenied},
		{name: "expired or invalid token", review: authnv1.TokenReviewStatus{Error: "[invalid bearer token, service account token has expired]"},
			csr: csrFor(t, cartID), wantReason: ReasonUnauthenticated, wantCode: codes.Unauthenticated},
		{name: "token not authenticated, no error given", review: with(app(), func(s *authnv1.TokenReviewStatus) { s.Authenticated = false }),
			csr: csrFor(t, cartID), wantReason: ReasonUnauthenticated, wantCode: codes.Unauthenticated},
		{name: "wrong audience", review: with(app(), func(s *authnv1.TokenReviewStatus) { s.Audiences = []string{"https://kubernetes.default.svc"} }),
			csr: csrFor(t, cartID), wantReason: ReasonWrongAudience, wantCode: codes.Unauthenticated},
		{name: "no audience in the review", review: with(app(), func(s *authnv1.TokenReviewStatus) { s.Audiences = nil }),
			csr: csrFor(t, cartID), wantReason: ReasonWrongAudience, wantCode: codes.Unauthenticated},
		{name: "not a service account", review: with(app(), func(s *authnv1.TokenReviewStatus) {
			s.User.Username = "jane@example.com"
			s.User.Groups = []string{"system:authenticated"}
		}), csr: csrFor(t, cartID), wantReason: ReasonNotServiceAccount, wantCode: codes.Unauthenticated},
		{name: "service-account name without the service-accounts group", review: with(app(), func(s *authnv1.TokenReviewStatus) {
			s.User.Groups = []string{"system:authenticated"}
		}), csr: csrFor(t, cartID), wantReason: ReasonNotServiceAccount, wantCode: codes.Unauthenticated},
		{name: "malformed CSR: not PEM", review: app(), csr: "hello", wantReason: ReasonMalformedCSR, wantCode: codes.InvalidArgument},
		{name: "malformed CSR: not PKCS #10", review: app(),
			csr:        string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: []byte{0x30, 0x03, 0x02, 0x01, 0x01}})),
			wantReason: ReasonMalformedCSR, wantCode: codes.InvalidArgument},
		{name: "malformed CSR: a certificate", review: app(),
			csr:        string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{0x30, 0x00}})),
			wantReason: ReasonMalformedCSR, wantCode: codes.InvalidArgument},
		{name: "CSR signature invalid", review: app(), csr: tamper(t, csrFor(t, cartID)), wantReason: ReasonInvalidCSRSignature, wantCode: codes.InvalidArgument},
		{name: "CSR key on a weak curve", review: app(), csr: csrPEM(t, &x509.CertificateRequest{URIs: []*url.URL{mustURL(cartID)}}, p224),
			wantReason: ReasonUnsupportedKey, wantCode: codes.InvalidArgument},
		{name: "extra DNS SAN", review: app(),
			csr:        csrPEM(t, &x509.CertificateRequest{URIs: []*url.URL{mustURL(cartID)}, DNSNames: []string{"cart.shop.svc"}}, nil),
			wantReason: ReasonInvalidSAN, wantCode: codes.InvalidArgument},
		{name: "extra IP SAN", review: app(),
			csr:        csrPEM(t, &x509.CertificateRequest{URIs: []*url.URL{mustURL(cartID)}, IPAddresses: []net.IP{net.IPv4(10, 0, 0, 1)}}, nil),
			wantReason: ReasonInvalidSAN, wantCode: codes.InvalidArgument},
		{name: "extra email SAN", review: app(),
			csr:        csrPEM(t, &x509.CertificateRequest{URIs: []*url.URL{mustURL(cartID)}, EmailAddresses: []string{"cart@shop"}}, nil),
			wantReason: ReasonInvalidSAN, wantCode: codes.InvalidArgument},
		{name: "extra URI SAN", review: app(), csr: csrFor(t, cartID, payID), wantReason: ReasonInvalidSAN, wantCode: codes.InvalidArgument},
		{name: "extra otherName SAN", review: app(), csr: otherNameCSR(t, cartID), wantReason: ReasonInvalidSAN, wantCode: codes.InvalidArgument},
		{name: "no SAN", review: app(), csr: csrFor(t), wantReason: ReasonInvalidSAN, wantCode: codes.InvalidArgument},
		{name: "only a DNS SAN", review: app(), csr: csrPEM(t, &x509.CertificateRequest{DNSNames: []string{"cart.shop.svc"}}, nil),
			wantReason: ReasonInvalidSAN, wantCode: codes.InvalidArgument},
		{name: "URI that is not a SPIFFE ID", review: app(), csr: csrFor(t, "https://cluster.local/ns/shop/sa/cart"),
			wantReason: ReasonInvalidIdentity, wantCode: codes.InvalidArgument},
		{name: "SPIFFE ID not of a service account", review: app(), csr: csrFor(t, "spiffe://cluster.local/ns/shop"),
			wantReason: ReasonInvalidIdentity, wantCode: codes.InvalidArgument},
		{name: "SPIFFE ID with a trailing segment", review: app(), csr: csrFor(t, cartID+"/extra"),
			wantReason: ReasonInvalidIdentity, wantCode: codes.InvalidArgument},
		{name: "wrong trust domain", review: app(), csr: csrFor(t, "spiffe://evil.example/ns/shop/sa/cart"),
			wantReason: ReasonWrongTrustDomain, wantCode: codes.InvalidArgument},
		{name: "ztunnel, wrong trust domain", review: ztunnel("node-1"), csr: csrFor(t, "spiffe://evil.example/ns/shop/sa/pay"),
			impersonated: "spiffe://evil.example/ns/shop/sa/pay", podsOnNode: payOnNode1, wantReason: ReasonWrongTrustDomain, wantCode: codes.InvalidArgument},
		{name: "impersonated identity is not the CSR's", review: ztunnel("node-1"), csr: csrFor(t, tunnel1), impersonated: payID,
			podsOnNode: payOnNode1, wantReason: ReasonIdentityMismatch, wantCode: codes.InvalidArgument},
		{name: "authentication comes before the CSR", review: authnv1.TokenReviewStatus{}, csr: "hello",
			wantReason: ReasonUnauthenticated, wantCode: codes.Unauthenticated},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := decide(testPolicy, tc.review, tc.csr, tc.impersonated, tc.podsOnNode)
			if tc.wantReason == "" {
				if err != nil {
					t.Fatalf("refused, want issued: %v", err)
				}
				return
			}
			var r *Refusal
			if !errors.As(err, &r) {
				t.Fatalf("got %v, want refusal %s", err, tc.wantReason)
			}
			if r.Reason != tc.wantReason || r.Code != tc.wantCode {
				t.Fatalf("refused with %s/%s (%s), want %s/%s", r.Code, r.Reason, r.Msg, tc.wantCode, tc.wantReason)
			}
			if r.Msg == "" {
				t.Fatal("refusal without a message")
			}
			t.Logf("%s: %s", r.Reason, r.Msg)
		})
	}
}

// decide is the server's pipeline without the I/O.
func decide(p policy, st authnv1.TokenReviewStatus, csrPEM, impersonated string, podsOnNode []PodRef) error {
	caller, err := p.authenticate(st)
	if err != nil {
		return err
	}
	_, id, err := p.parseRequest(csrPEM, impersonated)
	if err != nil {
		return err
	}
	if !p.needsNode(caller, id) {
		podsOnNode = nil // the server does not look them up
	}
	return p.authorize(caller, id, podsOnNode)
}

func TestCallerFromReview(t *testing.T) {
	c, err := testPolicy.authenticate(ztunnel("node-1"))
	if err != nil {
		t.Fatal(err)
	}
	want := Caller{Namespace: "istio-system", ServiceAccount: "ztunnel", PodName: "ztunnel-node-1", PodUID: "ztunnel-node-1-uid", NodeName: "node-1"}
	if c != want {
		t.Fatalf("got %+v, want %+v", c, want)
	}
}
