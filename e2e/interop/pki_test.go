package interop

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// The identities of the two ends, in Istio's SPIFFE form
// (spiffe://<trust-domain>/ns/<ns>/sa/<sa>).
const (
	clientID = "spiffe://cluster.local/ns/default/sa/client"
	serverID = "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
)

// testCA is a mesh CA for one test: ECDSA P-256, issuing leaf certificates
// with one SPIFFE URI SAN and both TLS usages, as Istio's CA and Ambit's do.
type testCA struct {
	cert  *x509.Certificate
	key   *ecdsa.PrivateKey
	roots *x509.CertPool
}

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Organization: []string{"cluster.local"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(cert)
	return &testCA{cert: cert, key: key, roots: roots}
}

// issue returns a certificate for the SPIFFE ID id. ips adds IP SANs, which
// mesh certificates do not have; see TestIstioEchoClientToAmbitServer for
// the one peer that needs them.
func (ca *testCA) issue(t testing.TB, id string, ips ...net.IP) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(id)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		URIs:         []*url.URL{u},
		IPAddresses:  ips,
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// verifyPeer checks the peer's chain against the CA and that its SPIFFE ID
// is want. It runs as tls.Config.VerifyConnection, which TLS calls on both
// sides and also when InsecureSkipVerify turns off Go's name checks.
func (ca *testCA) verifyPeer(want string) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("peer presented no certificate")
		}
		leaf := cs.PeerCertificates[0]
		inter := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		opts := x509.VerifyOptions{Roots: ca.roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}
		if _, err := leaf.Verify(opts); err != nil {
			return fmt.Errorf("verifying peer certificate: %w", err)
		}
		if len(leaf.URIs) != 1 || leaf.URIs[0].String() != want {
			return fmt.Errorf("peer identity is %v, want %s", leaf.URIs, want)
		}
		return nil
	}
}

// clientTLS is the configuration of a client that is id and expects the
// server to prove wantServer.
//
// Mesh certificates name a SPIFFE ID, not a host, so Go's host name check
// cannot apply: InsecureSkipVerify turns it off and VerifyConnection does
// the chain and identity check instead, as Istio's and Ambit's clients do.
func (ca *testCA) clientTLS(t testing.TB, id, wantServer string) *tls.Config {
	return &tls.Config{
		Certificates:       []tls.Certificate{ca.issue(t, id)},
		InsecureSkipVerify: true,
		VerifyConnection:   ca.verifyPeer(wantServer),
		MinVersion:         tls.VersionTLS13,
	}
}

// serverTLS is the configuration of a server that is id and requires a
// client certificate from the CA naming wantClient.
func (ca *testCA) serverTLS(t testing.TB, id, wantClient string, ips ...net.IP) *tls.Config {
	return &tls.Config{
		Certificates:     []tls.Certificate{ca.issue(t, id, ips...)},
		ClientAuth:       tls.RequireAndVerifyClientCert,
		ClientCAs:        ca.roots,
		VerifyConnection: ca.verifyPeer(wantClient),
		MinVersion:       tls.VersionTLS13,
	}
}

// pemFiles are a certificate, its key and the CA as files, for peers
// configured by flags.
type pemFiles struct {
	Cert, Key, CA string
}

func (ca *testCA) writePEM(t testing.TB, c tls.Certificate) pemFiles {
	t.Helper()
	dir := t.TempDir()
	keyDER, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	f := pemFiles{
		Cert: filepath.Join(dir, "cert.pem"),
		Key:  filepath.Join(dir, "key.pem"),
		CA:   filepath.Join(dir, "root-cert.pem"),
	}
	for path, block := range map[string]*pem.Block{
		f.Cert: {Type: "CERTIFICATE", Bytes: c.Certificate[0]},
		f.Key:  {Type: "PRIVATE KEY", Bytes: keyDER},
		f.CA:   {Type: "CERTIFICATE", Bytes: ca.cert.Raw},
	} {
		if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return f
}
