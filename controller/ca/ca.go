package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/url"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// The names Istio uses, so that a user's `cacerts` Secret and Istio's own
// self-signed `istio-ca-secret` work unchanged
// (https://istio.io/latest/docs/tasks/security/cert-management/plugin-ca-cert/).
const (
	// PluginSecretName is the Secret holding a user's own CA. It takes
	// precedence over the self-signed root.
	PluginSecretName = "cacerts"
	// SelfSignedSecretName is the Secret the self-signed root is kept in.
	SelfSignedSecretName = "istio-ca-secret"

	CACertKey    = "ca-cert.pem"    // the signing certificate
	CAKeyKey     = "ca-key.pem"     // its private key
	RootCertKey  = "root-cert.pem"  // the root(s): the trust bundle
	CertChainKey = "cert-chain.pem" // the signing certificate's chain up to the root

	// selfSignedSecretType is the type Istio gives istio-ca-secret.
	selfSignedSecretType corev1.SecretType = "istio.io/ca-root"

	// DefaultTrustDomain is Istio's default trust domain.
	DefaultTrustDomain = "cluster.local"
	// DefaultRootTTL is the lifetime of a newly made self-signed root, as
	// Istio's (10 years).
	DefaultRootTTL = 10 * 365 * 24 * time.Hour

	// backdate moves a leaf's NotBefore into the past so that a verifier
	// whose clock is slightly behind the CA's accepts a fresh certificate.
	backdate = time.Minute
)

// Sentinel errors of Sign; the gRPC server maps them to InvalidArgument.
var (
	// ErrInvalidCSR means the CSR's signature does not verify with the
	// public key it carries: whoever sent it does not hold the key.
	ErrInvalidCSR = errors.New("CSR signature does not verify")
	// ErrUnsupportedKey means the CSR's public key is of a type or size the
	// CA does not sign (ECDSA P-256/P-384, RSA of 2048 bits or more, and
	// Ed25519 are signed).
	ErrUnsupportedKey = errors.New("unsupported public key")
)

// Options configure LoadOrCreate.
type Options struct {
	// TrustDomain of the identities signed; "cluster.local" if empty.
	TrustDomain string
	// RootTTL is the lifetime of a self-signed root made on first start;
	// DefaultRootTTL if zero.
	RootTTL time.Duration
	// Log receives one line naming where the CA came from; slog.Default()
	// if nil.
	Log *slog.Logger
	// Now is the clock; time.Now if nil. For tests.
	Now func() time.Time
}

func (o Options) withDefaults() (Options, spiffeid.TrustDomain, error) {
	if o.TrustDomain == "" {
		o.TrustDomain = DefaultTrustDomain
	}
	td, err := spiffeid.TrustDomainFromString(o.TrustDomain)
	if err != nil {
		return o, td, fmt.Errorf("trust domain %q: %w", o.TrustDomain, err)
	}
	if o.RootTTL <= 0 {
		o.RootTTL = DefaultRootTTL
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return o, td, nil
}

// CA is a loaded signing certificate and key. It is safe for concurrent use.
type CA struct {
	td     spiffeid.TrustDomain
	now    func() time.Time
	source string // the Secret it came from, for logs and errors

	cert   *x509.Certificate
	signer crypto.Signer
	// intermediates run from the signing certificate (unless it is itself a
	// root) up to, not including, a root.
	intermediates []*x509.Certificate
	roots         []*x509.Certificate
	rootPEM       []byte
	// chainTail is what follows a leaf in a CreateCertificate response: one
	// PEM string per intermediate, then the whole root bundle as one string.
	chainTail []string
}

// LoadOrCreate loads the mesh CA from the Secrets in namespace: the
// plug-in CA `cacerts` if it exists, else the self-signed root in
// `istio-ca-secret`, which it creates on first start. Two replicas starting
// at once both try to create it; the loser reads the winner's.
func LoadOrCreate(ctx context.Context, client kubernetes.Interface, namespace string, opts Options) (*CA, error) {
	opts, td, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	secrets := client.CoreV1().Secrets(namespace)

	s, err := secrets.Get(ctx, PluginSecretName, metav1.GetOptions{})
	switch {
	case err == nil:
		c, err := fromSecret(td, opts.Now, s)
		if err != nil {
			return nil, fmt.Errorf("loading plug-in CA from Secret %s/%s (fix or delete it): %w", namespace, PluginSecretName, err)
		}
		opts.Log.Info("mesh CA loaded", "source", c.source, "subject", c.cert.Subject.String(), "not_after", c.cert.NotAfter)
		return c, nil
	case !apierrors.IsNotFound(err):
		return nil, fmt.Errorf("reading Secret %s/%s (check the controller's RBAC): %w", namespace, PluginSecretName, err)
	}

	s, err = secrets.Get(ctx, SelfSignedSecretName, metav1.GetOptions{})
	switch {
	case err == nil:
		return loadSelfSigned(td, opts, s)
	case !apierrors.IsNotFound(err):
		return nil, fmt.Errorf("reading Secret %s/%s (check the controller's RBAC): %w", namespace, SelfSignedSecretName, err)
	}

	certPEM, keyPEM, err := newRoot(td, opts.RootTTL, opts.Now())
	if err != nil {
		return nil, err
	}
	mine := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: SelfSignedSecretName, Namespace: namespace},
		Type:       selfSignedSecretType,
		Data: map[string][]byte{
			CACertKey:   certPEM,
			CAKeyKey:    keyPEM,
			RootCertKey: certPEM,
		},
	}
	created, err := secrets.Create(ctx, mine, metav1.CreateOptions{})
	switch {
	case err == nil:
		opts.Log.Info("mesh CA created a self-signed root", "secret", namespace+"/"+SelfSignedSecretName)
		return loadSelfSigned(td, opts, created)
	case apierrors.IsAlreadyExists(err):
		// Another replica made one between our Get and Create: use theirs,
		// or the two replicas would sign with different roots.
		s, err := secrets.Get(ctx, SelfSignedSecretName, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("reading Secret %s/%s after losing the race to create it: %w", namespace, SelfSignedSecretName, err)
		}
		return loadSelfSigned(td, opts, s)
	default:
		return nil, fmt.Errorf("creating Secret %s/%s (check the controller's RBAC): %w", namespace, SelfSignedSecretName, err)
	}
}

func loadSelfSigned(td spiffeid.TrustDomain, opts Options, s *corev1.Secret) (*CA, error) {
	c, err := fromSecret(td, opts.Now, s)
	if err != nil {
		return nil, fmt.Errorf("loading self-signed CA from Secret %s/%s (delete it to make a new root): %w", s.Namespace, s.Name, err)
	}
	opts.Log.Info("mesh CA loaded", "source", c.source, "subject", c.cert.Subject.String(), "not_after", c.cert.NotAfter)
	return c, nil
}

func fromSecret(td spiffeid.TrustDomain, now func() time.Time, s *corev1.Secret) (*CA, error) {
	c, err := New(td, s.Data[CACertKey], s.Data[CAKeyKey], s.Data[CertChainKey], s.Data[RootCertKey], now)
	if err != nil {
		return nil, err
	}
	c.source = s.Namespace + "/" + s.Name
	return c, nil
}

// New makes a CA from PEM in Istio's plug-in layout: the signing
// certificate and its key, the chain from the signing certificate up to the
// root (may be empty; may include the signing certificate and the root),
// and the root bundle. An empty rootPEM means the signing certificate is
// the root and must be self-signed. now may be nil.
func New(td spiffeid.TrustDomain, caCertPEM, caKeyPEM, chainPEM, rootPEM []byte, now func() time.Time) (*CA, error) {
	if now == nil {
		now = time.Now
	}
	certs, err := parseCerts(caCertPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", CACertKey, err)
	}
	cert := certs[0]
	if !cert.IsCA || !cert.BasicConstraintsValid {
		return nil, fmt.Errorf("%s: certificate %q is not a CA (basicConstraints CA:TRUE is missing)", CACertKey, cert.Subject)
	}
	if cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("%s: certificate %q may not sign certificates (keyUsage keyCertSign is missing)", CACertKey, cert.Subject)
	}
	t := now()
	if t.Before(cert.NotBefore) || t.After(cert.NotAfter) {
		return nil, fmt.Errorf("%s: certificate %q is valid from %s to %s, not now", CACertKey, cert.Subject, cert.NotBefore, cert.NotAfter)
	}
	signer, err := parseKey(caKeyPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", CAKeyKey, err)
	}
	if pub, ok := signer.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("%s does not hold the private key of %s", CAKeyKey, CACertKey)
	}

	var roots []*x509.Certificate
	if len(bytes.TrimSpace(rootPEM)) == 0 {
		if cert.CheckSignatureFrom(cert) != nil {
			return nil, fmt.Errorf("%s is missing and %s is not self-signed", RootCertKey, CACertKey)
		}
		roots = []*x509.Certificate{cert}
	} else if roots, err = parseCerts(rootPEM); err != nil {
		return nil, fmt.Errorf("%s: %w", RootCertKey, err)
	}
	isRoot := func(c *x509.Certificate) bool {
		for _, r := range roots {
			if r.Equal(c) {
				return true
			}
		}
		return false
	}

	// The intermediates start at the signing certificate and take, in
	// order, whatever else cert-chain.pem (or ca-cert.pem) holds that is not
	// a root: the root goes last in a response, as its own element.
	var candidates []*x509.Certificate
	candidates = append(candidates, certs...)
	if len(bytes.TrimSpace(chainPEM)) > 0 {
		chain, err := parseCerts(chainPEM)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", CertChainKey, err)
		}
		candidates = append(candidates, chain...)
	}
	var intermediates []*x509.Certificate
	for _, c := range candidates {
		dup := isRoot(c)
		for _, i := range intermediates {
			dup = dup || i.Equal(c)
		}
		if !dup {
			intermediates = append(intermediates, c)
		}
	}
	verifyIntermediates := x509.NewCertPool()
	for _, c := range intermediates {
		verifyIntermediates.AddCert(c)
	}
	rootPool := x509.NewCertPool()
	for _, r := range roots {
		rootPool.AddCert(r)
	}
	if _, err := cert.Verify(x509.VerifyOptions{
		Roots:         rootPool,
		Intermediates: verifyIntermediates,
		CurrentTime:   t,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return nil, fmt.Errorf("%s does not chain to %s through %s: %w", CACertKey, RootCertKey, CertChainKey, err)
	}

	c := &CA{
		td:            td,
		now:           now,
		source:        "PEM",
		cert:          cert,
		signer:        signer,
		intermediates: intermediates,
		roots:         roots,
	}
	for _, r := range roots {
		c.rootPEM = append(c.rootPEM, encodeCert(r)...)
	}
	for _, i := range intermediates {
		c.chainTail = append(c.chainTail, string(encodeCert(i)))
	}
	c.chainTail = append(c.chainTail, string(c.rootPEM))
	return c, nil
}

// newRoot makes a self-signed ECDSA P-256 root for td.
func newRoot(td spiffeid.TrustDomain, ttl time.Duration, now time.Time) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generating root key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		// Istio's self-signed root names the trust domain as its
		// organization; so does ours.
		Subject:               pkix.Name{Organization: []string{td.Name()}, CommonName: "Ambit mesh root CA"},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(ttl),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, fmt.Errorf("signing root: %w", err)
	}
	// SEC 1 ("EC PRIVATE KEY"), as Istio writes its own ECDSA roots, so
	// that istiod could read this Secret too.
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("encoding root key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), nil
}

// TrustDomain is the trust domain the CA signs identities in.
func (c *CA) TrustDomain() spiffeid.TrustDomain { return c.td }

// RootPEM is the trust bundle: the root certificate(s), PEM. With a
// plug-in intermediate it is the content of root-cert.pem, not the
// intermediate.
func (c *CA) RootPEM() []byte { return bytes.Clone(c.rootPEM) }

// Roots are the parsed root certificates of RootPEM.
func (c *CA) Roots() []*x509.Certificate { return append([]*x509.Certificate(nil), c.roots...) }

// Sign issues a workload certificate for id to the public key of csr,
// valid for ttl (and never beyond the signing certificate). The leaf has
// exactly one SAN, the URI id, whatever the CSR asks for, and may be used
// as a TLS client and server certificate. The result is ordered as
// Istio's CreateCertificateResponse.cert_chain: the leaf, the
// intermediates, and the root bundle last (one element, which holds more
// than one certificate while roots are being rotated).
//
// Sign checks the CSR's signature (ErrInvalidCSR) and key
// (ErrUnsupportedKey) but not who asked: the caller must have authorized id.
func (c *CA) Sign(csr *x509.CertificateRequest, id spiffeid.ID, ttl time.Duration) ([]string, error) {
	if csr == nil {
		return nil, fmt.Errorf("signing %s: no CSR", id)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("signing %s: %w: %w", id, ErrInvalidCSR, err)
	}
	if err := checkPublicKey(csr.PublicKey); err != nil {
		return nil, fmt.Errorf("signing %s: %w", id, err)
	}
	if !id.MemberOf(c.td) {
		return nil, fmt.Errorf("signing %s: not in trust domain %s", id, c.td)
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("signing %s: TTL %s is not positive", id, ttl)
	}
	keyUsage := x509.KeyUsageDigitalSignature
	if _, ok := csr.PublicKey.(*rsa.PublicKey); ok {
		keyUsage |= x509.KeyUsageKeyEncipherment
	}
	leaf, err := c.issue(&x509.Certificate{
		// No subject: the identity is the URI SAN, which Go then marks
		// critical as RFC 5280 section 4.2.1.6 requires.
		URIs:                  []*url.URL{id.URL()},
		KeyUsage:              keyUsage,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}, csr.PublicKey, ttl)
	if err != nil {
		return nil, fmt.Errorf("signing %s: %w", id, err)
	}
	return append([]string{string(encodeCert(leaf))}, c.chainTail...), nil
}

// issue fills in serial and validity and signs tmpl.
func (c *CA) issue(tmpl *x509.Certificate, pub crypto.PublicKey, ttl time.Duration) (*x509.Certificate, error) {
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	now := c.now()
	tmpl.SerialNumber = serial
	tmpl.NotBefore = now.Add(-backdate)
	tmpl.NotAfter = now.Add(ttl)
	if tmpl.NotAfter.After(c.cert.NotAfter) {
		tmpl.NotAfter = c.cert.NotAfter
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, pub, c.signer)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// ServingCertificate issues a TLS server certificate, with a new ECDSA
// P-256 key, for the controller's own gRPC endpoint (DNS names such as
// ambit-controller.istio-system.svc), so that node tunnels can verify it
// against the mounted istio-ca-root-cert. The chain excludes the root.
func (c *CA) ServingCertificate(ttl time.Duration, dnsNames ...string) (*tls.Certificate, error) {
	if len(dnsNames) == 0 {
		return nil, errors.New("issuing serving certificate: no DNS names")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating serving key: %w", err)
	}
	leaf, err := c.issue(&x509.Certificate{
		Subject:               pkix.Name{CommonName: dnsNames[0]},
		DNSNames:              dnsNames,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}, key.Public(), ttl)
	if err != nil {
		return nil, fmt.Errorf("issuing serving certificate for %v: %w", dnsNames, err)
	}
	out := &tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf}
	for _, i := range c.intermediates {
		out.Certificate = append(out.Certificate, i.Raw)
	}
	return out, nil
}

// GetServingCertificate returns a tls.Config.GetCertificate hook serving
// ServingCertificate(ttl, dnsNames...), issued on first use and again once
// half its lifetime has passed, so that the gRPC server never serves an
// expired certificate.
func (c *CA) GetServingCertificate(ttl time.Duration, dnsNames ...string) func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	var (
		mu      sync.Mutex
		current *tls.Certificate
	)
	return func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
		mu.Lock()
		defer mu.Unlock()
		if current != nil {
			l := current.Leaf
			if c.now().Before(l.NotBefore.Add(l.NotAfter.Sub(l.NotBefore) / 2)) {
				return current, nil
			}
		}
		next, err := c.ServingCertificate(ttl, dnsNames...)
		if err != nil {
			if current != nil && c.now().Before(current.Leaf.NotAfter) {
				return current, nil // still valid: try again next handshake
			}
			return nil, err
		}
		current = next
		return current, nil
	}
}

// checkPublicKey refuses keys too weak to sign for.
func checkPublicKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve == elliptic.P256() || k.Curve == elliptic.P384() {
			return nil
		}
		return fmt.Errorf("%w: ECDSA curve %s", ErrUnsupportedKey, k.Curve.Params().Name)
	case *rsa.PublicKey:
		if k.N.BitLen() >= 2048 {
			return nil
		}
		return fmt.Errorf("%w: RSA key of %d bits", ErrUnsupportedKey, k.N.BitLen())
	case ed25519.PublicKey:
		return nil
	default:
		return fmt.Errorf("%w: %T", ErrUnsupportedKey, pub)
	}
}

// newSerial returns a random positive 128-bit serial number (RFC 5280
// section 4.1.2.2 allows up to 20 octets).
func newSerial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("generating serial number: %w", err)
	}
	return n.Add(n, big.NewInt(1)), nil
}

func encodeCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

// parseCerts parses every CERTIFICATE block of b; there must be one.
func parseCerts(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parsing certificate: %w", err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no PEM CERTIFICATE block")
	}
	return out, nil
}

// parseKey reads a private key in any of the encodings Istio writes or
// accepts: PKCS #8, SEC 1 (EC) and PKCS #1 (RSA).
func parseKey(b []byte) (crypto.Signer, error) {
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			return nil, errors.New("no PEM private key block")
		}
		var (
			k   any
			err error
		)
		switch block.Type {
		case "PRIVATE KEY":
			k, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			k, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		default:
			continue // e.g. "EC PARAMETERS" before the key
		}
		if err != nil {
			return nil, fmt.Errorf("parsing %s: %w", block.Type, err)
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("%T cannot sign", k)
		}
		return s, nil
	}
}
