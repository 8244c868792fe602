// Package pki makes the TLS material the lab needs: a certificate
// authority, server and client certificates signed by it, the service
// account signing key pair, and kubeconfig files that embed a client
// certificate.
//
// Everything is generated in memory with the standard library and written
// to files that kube-apiserver, etcd, kube-controller-manager,
// kube-scheduler, kube-proxy and the node agents read with their usual
// flags (--client-ca-file, --tls-cert-file, --kubeconfig, ...).
//
// It deliberately does not rotate or renew anything, keep a serial number
// registry, publish revocation lists, or talk to the Kubernetes CSR API: a
// lab lives for one run, so its certificates are made once at start-up
// with a validity long enough to outlast it.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// DefaultValidity is how long an issued certificate is valid when
// Request.Validity is zero.
const DefaultValidity = 365 * 24 * time.Hour

// clockSkew backdates NotBefore so that a certificate made a moment ago
// is already valid on a peer whose clock runs a little behind.
const clockSkew = time.Hour

// ErrNoPEM is returned (wrapped) when a file or buffer holds no PEM block
// of the expected kind.
var ErrNoPEM = errors.New("no PEM block found")

// CA is a certificate authority held in memory.
type CA struct {
	Cert    *x509.Certificate
	Key     crypto.Signer
	CertPEM []byte
}

// NewCA returns a self-signed CA with an ECDSA P-256 key, valid for
// validity (DefaultValidity if zero) from one hour ago.
func NewCA(commonName string, validity time.Duration) (*CA, error) {
	if validity == 0 {
		validity = DefaultValidity
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating key for CA %s: %w", commonName, err)
	}
	tmpl, err := template(commonName, nil, validity, key.Public())
	if err != nil {
		return nil, fmt.Errorf("making template for CA %s: %w", commonName, err)
	}
	tmpl.IsCA = true
	tmpl.BasicConstraintsValid = true
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature
	// A self-signed certificate's authority key id is its own subject key id.
	tmpl.AuthorityKeyId = tmpl.SubjectKeyId
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("signing CA %s: %w", commonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing CA %s: %w", commonName, err)
	}
	return &CA{Cert: cert, Key: key, CertPEM: encodeCert(der)}, nil
}

// LoadCA reads a CA written by CA.WriteFiles (or any PEM certificate with
// a PKCS#8, PKCS#1 or SEC 1 private key).
func LoadCA(certFile, keyFile string) (*CA, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("reading CA certificate: %w", err)
	}
	block, _ := pem.Decode(certPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("decoding CA certificate %s: %w", certFile, ErrNoPEM)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parsing CA certificate %s: %w", certFile, err)
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("loading CA certificate %s: not a CA (basic constraints CA:FALSE)", certFile)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, fmt.Errorf("reading CA key: %w", err)
	}
	key, err := parseKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("parsing CA key %s: %w", keyFile, err)
	}
	if !publicKeysEqual(cert.PublicKey, key.Public()) {
		return nil, fmt.Errorf("loading CA: key %s does not match certificate %s", keyFile, certFile)
	}
	return &CA{Cert: cert, Key: key, CertPEM: encodeCert(block.Bytes)}, nil
}

// WriteFiles writes the CA certificate (mode 0644) and its private key
// (mode 0600, PKCS#8) as PEM, creating parent directories.
func (ca *CA) WriteFiles(certFile, keyFile string) error {
	keyDER, err := x509.MarshalPKCS8PrivateKey(ca.Key)
	if err != nil {
		return fmt.Errorf("encoding CA key: %w", err)
	}
	return KeyPair{CertPEM: ca.CertPEM, KeyPEM: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})}.WriteFiles(certFile, keyFile)
}

// Request describes a leaf certificate for CA.Issue.
type Request struct {
	CommonName string
	// Organization becomes the subject O; the apiserver maps it to the
	// groups of a client certificate (system:nodes, system:masters).
	Organization []string
	DNSNames     []string
	IPs          []net.IP
	// Server and Client select ExtKeyUsageServerAuth and
	// ExtKeyUsageClientAuth. At least one must be set.
	Server, Client bool
	// Validity defaults to DefaultValidity if zero.
	Validity time.Duration
}

// KeyPair is a PEM certificate and its PEM (PKCS#8) private key.
type KeyPair struct {
	CertPEM, KeyPEM []byte
}

// Issue makes a new ECDSA P-256 key and a certificate for it signed by ca.
func (ca *CA) Issue(r Request) (KeyPair, error) {
	if !r.Server && !r.Client {
		return KeyPair{}, fmt.Errorf("issuing %s: request has neither Server nor Client usage", r.CommonName)
	}
	validity := r.Validity
	if validity == 0 {
		validity = DefaultValidity
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return KeyPair{}, fmt.Errorf("issuing %s: generating key: %w", r.CommonName, err)
	}
	tmpl, err := template(r.CommonName, r.Organization, validity, key.Public())
	if err != nil {
		return KeyPair{}, fmt.Errorf("issuing %s: %w", r.CommonName, err)
	}
	tmpl.BasicConstraintsValid = true
	// ECDSA keys sign the handshake; KeyEncipherment only applies to RSA.
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	if r.Server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	if r.Client {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	}
	tmpl.DNSNames = r.DNSNames
	tmpl.IPAddresses = r.IPs
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return KeyPair{}, fmt.Errorf("issuing %s: %w", r.CommonName, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return KeyPair{}, fmt.Errorf("issuing %s: encoding key: %w", r.CommonName, err)
	}
	return KeyPair{
		CertPEM: encodeCert(der),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
	}, nil
}

// WriteFiles writes the certificate (mode 0644) and key (mode 0600),
// creating parent directories.
func (kp KeyPair) WriteFiles(certFile, keyFile string) error {
	if err := writeFile(certFile, kp.CertPEM, 0o644); err != nil {
		return err
	}
	return writeFile(keyFile, kp.KeyPEM, 0o600)
}

// NewServiceAccountKey returns an RSA 2048 private key in PKCS#8 PEM, for
// kube-apiserver --service-account-signing-key-file and
// kube-controller-manager --service-account-private-key-file, and its
// PKIX public key PEM, for --service-account-key-file. RSA rather than
// ECDSA because RS256 is what every token consumer is sure to accept.
func NewServiceAccountKey() (privPEM, pubPEM []byte, err error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, nil, fmt.Errorf("generating service account key: %w", err)
	}
	privDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("encoding service account key: %w", err)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return nil, nil, fmt.Errorf("encoding service account public key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: privDER}),
		pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}),
		nil
}

// WriteKubeconfig writes a kubeconfig with one cluster (server, caPEM),
// one user (kp embedded as client-certificate-data and client-key-data)
// and one current context joining them, all named after user. The file is
// mode 0600 because it holds a private key.
func WriteKubeconfig(path, server string, caPEM []byte, user string, kp KeyPair) error {
	cfg := clientcmdapi.NewConfig()
	const cluster = "lab"
	cfg.Clusters[cluster] = &clientcmdapi.Cluster{
		Server:                   server,
		CertificateAuthorityData: caPEM,
	}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{
		ClientCertificateData: kp.CertPEM,
		ClientKeyData:         kp.KeyPEM,
	}
	cfg.Contexts[user] = &clientcmdapi.Context{Cluster: cluster, AuthInfo: user}
	cfg.CurrentContext = user
	data, err := clientcmd.Write(*cfg)
	if err != nil {
		return fmt.Errorf("encoding kubeconfig for %s: %w", user, err)
	}
	return writeFile(path, data, 0o600)
}

// template returns the fields CA and leaf certificates share: a random
// 128-bit serial, the subject, a backdated validity window and the
// subject key id.
func template(cn string, org []string, validity time.Duration, pub crypto.PublicKey) (*x509.Certificate, error) {
	// RFC 5280 section 4.1.2.2: serials are positive and at most 20 octets.
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("generating serial: %w", err)
	}
	serial.Add(serial, big.NewInt(1)) // never zero
	skid, err := subjectKeyID(pub)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	return &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn, Organization: org},
		NotBefore:    now.Add(-clockSkew),
		NotAfter:     now.Add(validity),
		SubjectKeyId: skid,
	}, nil
}

// subjectKeyID is method 1 of RFC 7093 section 2: the leftmost 160 bits
// of the SHA-256 of the subjectPublicKey bit string (the same length as
// the SHA-1 of RFC 5280 section 4.2.1.2, without SHA-1). It is what
// crypto/x509 itself generates for CA certificates since Go 1.25.
func subjectKeyID(pub crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("encoding public key: %w", err)
	}
	var spki struct {
		Algorithm pkix.AlgorithmIdentifier
		PublicKey asn1.BitString
	}
	if _, err := asn1.Unmarshal(der, &spki); err != nil {
		return nil, fmt.Errorf("decoding public key: %w", err)
	}
	sum := sha256.Sum256(spki.PublicKey.Bytes)
	return sum[:20], nil
}

func parseKey(keyPEM []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(keyPEM)
	if block == nil {
		return nil, ErrNoPEM
	}
	var (
		key any
		err error
	)
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("PEM block type %q: %w", block.Type, ErrNoPEM)
	}
	if err != nil {
		return nil, err
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("key type %T cannot sign", key)
	}
	return signer, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	eq, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && eq.Equal(b)
}

func encodeCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func writeFile(path string, data []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.WriteFile(path, data, mode); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	// WriteFile keeps the mode of a file that already exists; a key
	// written over an old 0644 file must still end up 0600.
	if err := os.Chmod(path, mode); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}
