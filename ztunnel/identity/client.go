package identity

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
)

const (
	// DefaultTrustDomain is Istio's default trust domain.
	DefaultTrustDomain = "cluster.local"
	// DefaultTTL is the certificate lifetime asked for, as istio/ztunnel's
	// SECRET_TTL.
	DefaultTTL = 24 * time.Hour

	// impersonatedIdentityKey is the IstioCertificateRequest metadata key
	// naming the identity asked for on a workload's behalf: Istio's
	// pkg/security.ImpersonatedIdentity, the one istio/ztunnel's CA client
	// sends (src/identity/caclient.rs), next to the same identity in the
	// CSR's URI SAN.
	impersonatedIdentityKey = "ImpersonatedIdentity"
)

// ErrWrongTrustDomain is returned for an identity outside the configured
// trust domain; the CA would refuse it.
var ErrWrongTrustDomain = errors.New("identity is not in the trust domain")

// Options configure NewClient and NewManager.
type Options struct {
	// CAAddr is the CA's gRPC address, host:port, e.g.
	// ambit-controller.istio-system.svc:15012.
	CAAddr string
	// CAServerName is the name the CA's certificate is checked for; the
	// host of CAAddr if empty.
	CAServerName string
	// CARoots verify the CA's serving certificate: the mounted
	// istio-ca-root-cert ConfigMap's root-cert.pem.
	CARoots *x509.CertPool
	// TokenFile is the projected service-account token (audience
	// istio-ca), read again for every request because the kubelet rotates
	// it.
	TokenFile string
	// TrustDomain of the identities; DefaultTrustDomain if empty.
	TrustDomain string
	// TTL is the certificate lifetime asked for; DefaultTTL if zero. The CA
	// may give less.
	TTL time.Duration

	// TrustBundle optionally seeds the roots peers are verified against
	// before the first certificate arrives; the roots the CA returns with
	// each certificate are added to it.
	TrustBundle []*x509.Certificate
	// RequestTimeout bounds one CA request; 30s if zero.
	RequestTimeout time.Duration
	// RetryMin and RetryMax bound the exponential back-off between failed
	// requests for one identity; 1s and 1m if zero.
	RetryMin, RetryMax time.Duration
	// Log; slog.Default() if nil.
	Log *slog.Logger
	// Clock; the real one if nil.
	Clock Clock
}

func (o Options) withDefaults() (Options, spiffeid.TrustDomain, error) {
	if o.CAAddr == "" {
		return o, spiffeid.TrustDomain{}, errors.New("no CA address")
	}
	if o.CAServerName == "" {
		host, _, err := net.SplitHostPort(o.CAAddr)
		if err != nil {
			return o, spiffeid.TrustDomain{}, fmt.Errorf("CA address %q: %w", o.CAAddr, err)
		}
		o.CAServerName = host
	}
	if o.CARoots == nil {
		return o, spiffeid.TrustDomain{}, errors.New("no CA roots: mount the istio-ca-root-cert ConfigMap")
	}
	if o.TokenFile == "" {
		return o, spiffeid.TrustDomain{}, errors.New("no token file: mount a projected service-account token with audience istio-ca")
	}
	if o.TrustDomain == "" {
		o.TrustDomain = DefaultTrustDomain
	}
	td, err := spiffeid.TrustDomainFromString(o.TrustDomain)
	if err != nil {
		return o, td, fmt.Errorf("trust domain %q: %w", o.TrustDomain, err)
	}
	if o.TTL <= 0 {
		o.TTL = DefaultTTL
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = 30 * time.Second
	}
	if o.RetryMin <= 0 {
		o.RetryMin = time.Second
	}
	if o.RetryMax <= 0 {
		o.RetryMax = time.Minute
	}
	if o.RetryMax < o.RetryMin {
		o.RetryMax = o.RetryMin
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.Clock == nil {
		o.Clock = realClock{}
	}
	return o, td, nil
}

// Issued is one certificate from the CA.
type Issued struct {
	ID spiffeid.ID
	// Certificate is the leaf and intermediates with the private key, for
	// a tls.Config; Leaf is set.
	Certificate *tls.Certificate
	// Roots are the roots the CA sent with it: the trust bundle.
	Roots []*x509.Certificate
}

// Client asks the CA for certificates: one request per Fetch, no cache, no
// retry. Manager adds those.
type Client struct {
	conn  *grpc.ClientConn
	certs pb.IstioCertificateServiceClient
	td    spiffeid.TrustDomain
	ttl   time.Duration
	clock Clock
}

// NewClient returns a Client for the CA at opts.CAAddr. It does not
// connect until the first Fetch.
func NewClient(opts Options) (*Client, error) {
	opts, td, err := opts.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("configuring CA client: %w", err)
	}
	conn, err := grpc.NewClient(opts.CAAddr,
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
			RootCAs:    opts.CARoots,
			ServerName: opts.CAServerName,
			MinVersion: tls.VersionTLS12,
		})),
		grpc.WithPerRPCCredentials(tokenFile(opts.TokenFile)),
		// As ztunnel's xDS client: a connection to a controller whose
		// node vanished is dropped within 40 s, not reused (every request
		// timing out) for the kernel's 15-minute retransmission timeout.
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second, PermitWithoutStream: true}),
	)
	if err != nil {
		return nil, fmt.Errorf("configuring CA client for %s: %w", opts.CAAddr, err)
	}
	return &Client{
		conn:  conn,
		certs: pb.NewIstioCertificateServiceClient(conn),
		td:    td,
		ttl:   opts.TTL,
		clock: opts.Clock,
	}, nil
}

// Close closes the connection to the CA.
func (c *Client) Close() error { return c.conn.Close() }

// Fetch asks the CA for a certificate for id, with a new ECDSA P-256 key,
// and checks that what comes back is a valid SVID for id that chains to the
// roots sent with it. A refusal by the CA is returned as its gRPC status
// (status.Code works on the error).
func (c *Client) Fetch(ctx context.Context, id spiffeid.ID) (*Issued, error) {
	if !id.MemberOf(c.td) {
		return nil, fmt.Errorf("fetching certificate for %s: %w %s", id, ErrWrongTrustDomain, c.td)
	}
	key, csrPEM, err := newCSR(id)
	if err != nil {
		return nil, fmt.Errorf("fetching certificate for %s: %w", id, err)
	}
	resp, err := c.certs.CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr:              string(csrPEM),
		ValidityDuration: int64(c.ttl / time.Second),
		Metadata: &structpb.Struct{Fields: map[string]*structpb.Value{
			impersonatedIdentityKey: structpb.NewStringValue(id.String()),
		}},
	})
	if err != nil {
		return nil, fmt.Errorf("fetching certificate for %s from the CA: %w", id, err)
	}
	issued, err := parseResponse(id, key, resp.GetCertChain(), c.clock.Now())
	if err != nil {
		return nil, fmt.Errorf("fetching certificate for %s: CA response: %w", id, err)
	}
	return issued, nil
}

// newCSR makes a key and a CSR whose only SAN is id's URI.
func newCSR(id spiffeid.ID) (crypto.Signer, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generating key: %w", err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		URIs: []*url.URL{id.URL()},
	}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("creating CSR: %w", err)
	}
	return key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// parseResponse reads a CreateCertificateResponse chain: the leaf first,
// then intermediates, and last the root bundle, which Istio sends as one
// element that may hold several roots (Istio's server flattens every other
// element to one certificate each).
func parseResponse(id spiffeid.ID, key crypto.Signer, chain []string, now time.Time) (*Issued, error) {
	if len(chain) < 2 {
		return nil, fmt.Errorf("%d certificates, want at least a leaf and a root", len(chain))
	}
	var certs []*x509.Certificate
	for i, p := range chain[:len(chain)-1] {
		c, err := parseCerts([]byte(p))
		if err != nil {
			return nil, fmt.Errorf("element %d: %w", i, err)
		}
		certs = append(certs, c...)
	}
	roots, err := parseCerts([]byte(chain[len(chain)-1]))
	if err != nil {
		return nil, fmt.Errorf("root bundle: %w", err)
	}
	// The CA must have signed what was asked for, to the key sent; a
	// mismatch is a CA bug or an attack, never something to serve.
	got, _, err := x509svid.Verify(certs, x509bundle.FromX509Authorities(id.TrustDomain(), roots), x509svid.WithTime(now))
	if err != nil {
		return nil, err
	}
	if got != id {
		return nil, fmt.Errorf("certificate is for %s, not %s", got, id)
	}
	if pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(certs[0].PublicKey) {
		return nil, errors.New("certificate is not for the key in the CSR")
	}
	tc := &tls.Certificate{PrivateKey: key, Leaf: certs[0]}
	for _, c := range certs {
		tc.Certificate = append(tc.Certificate, c.Raw)
	}
	return &Issued{ID: id, Certificate: tc, Roots: roots}, nil
}

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
		return nil, errors.New("no PEM certificate")
	}
	return out, nil
}

// tokenFile sends the token in path as `authorization: Bearer <token>`,
// reading the file for every request: the kubelet rewrites a projected
// token before it expires.
type tokenFile string

func (f tokenFile) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	b, err := os.ReadFile(string(f))
	if err != nil {
		return nil, status.Errorf(codes.Unauthenticated, "reading service-account token: %v", err)
	}
	t := strings.TrimSpace(string(b))
	if t == "" {
		return nil, status.Errorf(codes.Unauthenticated, "service-account token file %s is empty", string(f))
	}
	return map[string]string{"authorization": "Bearer " + t}, nil
}

// RequireTransportSecurity keeps the token off a plaintext connection.
func (tokenFile) RequireTransportSecurity() bool { return true }
