package identity

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ALPN is the protocol HBONE negotiates: HTTP/2.
const ALPN = "h2"

// ServerTLSConfig is the HBONE server's TLS: TLS 1.3 only, ALPN h2, local's
// certificate (fetched on the first handshake, the newest one for every
// handshake after), and a client certificate required from any identity
// in the trust domain, verified against the trust bundle. PeerID tells
// which identity the client proved; authorization is the caller's.
func (m *Manager) ServerTLSConfig(local spiffeid.ID) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{ALPN},
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			return m.Certificate(hello.Context(), local)
		},
		// Go's own verification wants a DNS or IP name; SPIFFE
		// verification (the chain to the bundle, and the one URI SAN)
		// replaces it.
		ClientAuth:            tls.RequireAnyClientCert,
		VerifyPeerCertificate: tlsconfig.VerifyPeerCertificate(bundleSource{m}, tlsconfig.AuthorizeMemberOf(m.td)),
		// A resumed session skips VerifyPeerCertificate and would keep a
		// peer certificate that has since expired or lost its root; HBONE
		// connections are long-lived and pooled, so full handshakes cost
		// little.
		SessionTicketsDisabled: true,
	}
}

// ClientTLSConfig is the HBONE client's TLS, dialing as src to a peer that
// must prove dst: TLS 1.3 only, ALPN h2, src's newest certificate, and the
// server's verified against the trust bundle and dst.
func (m *Manager) ClientTLSConfig(src, dst spiffeid.ID) *tls.Config {
	verify := tlsconfig.VerifyPeerCertificate(bundleSource{m}, tlsconfig.AuthorizeID(dst))
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{ALPN},
		GetClientCertificate: func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return m.Certificate(cri.Context(), src)
		},
		// Hostname verification is replaced by SPIFFE verification below,
		// which Go still calls with InsecureSkipVerify set.
		InsecureSkipVerify: true, //nolint:gosec // see above
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			// The server's certificate is verified before ours is asked
			// for, so src's certificate, and the roots that come with it,
			// may not be here yet.
			ctx, cancel := context.WithTimeout(m.ctx, m.opts.RequestTimeout)
			_, err := m.Certificate(ctx, src)
			cancel()
			if err != nil {
				return fmt.Errorf("verifying %s: %w", dst, err)
			}
			return verify(raw, nil)
		},
	}
}

// PeerID is the SPIFFE ID the peer of a connection made with
// ServerTLSConfig or ClientTLSConfig proved.
func PeerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("peer presented no certificate")
	}
	return x509svid.IDFromCert(cs.PeerCertificates[0])
}

// bundleSource is the Manager's trust bundle as go-spiffe wants it.
type bundleSource struct{ m *Manager }

func (s bundleSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td != s.m.td {
		return nil, fmt.Errorf("no trust bundle for trust domain %q: only %q is trusted", td, s.m.td)
	}
	b := s.m.bundle.Load()
	if b.Empty() {
		return nil, errors.New("no trust bundle yet: no certificate has come from the CA")
	}
	return b, nil
}
