package pki

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"k8s.io/client-go/tools/clientcmd"
)

func newCA(t *testing.T) *CA {
	t.Helper()
	ca, err := NewCA("lab-ca", 24*time.Hour)
	if err != nil {
		t.Fatalf("NewCA: %v", err)
	}
	return ca
}

func parseCert(t *testing.T, certPEM []byte) *x509.Certificate {
	t.Helper()
	block, _ := pem.Decode(certPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		t.Fatalf("no CERTIFICATE block in %q", certPEM)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatalf("parsing certificate: %v", err)
	}
	return cert
}

func TestNewCA(t *testing.T) {
	ca := newCA(t)
	c := ca.Cert
	if !c.IsCA || !c.BasicConstraintsValid {
		t.Errorf("IsCA=%v BasicConstraintsValid=%v, want both true", c.IsCA, c.BasicConstraintsValid)
	}
	if want := x509.KeyUsageCertSign | x509.KeyUsageCRLSign; c.KeyUsage&want != want {
		t.Errorf("KeyUsage = %b, want CertSign|CRLSign set", c.KeyUsage)
	}
	if err := c.CheckSignatureFrom(c); err != nil {
		t.Errorf("CA is not self-signed: %v", err)
	}
	if len(c.SubjectKeyId) == 0 {
		t.Error("SubjectKeyId is empty")
	}
	if !bytes.Equal(parseCert(t, ca.CertPEM).Raw, c.Raw) {
		t.Error("CertPEM does not hold Cert")
	}
	if d := time.Until(c.NotBefore); d > -50*time.Minute {
		t.Errorf("NotBefore is %v from now, want about an hour in the past", d)
	}
}

func TestIssueVerify(t *testing.T) {
	ca := newCA(t)
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	other := newCA(t)
	otherPool := x509.NewCertPool()
	otherPool.AddCert(other.Cert)

	server, err := ca.Issue(Request{
		CommonName: "kube-apiserver",
		DNSNames:   []string{"kubernetes", "kubernetes.default.svc"},
		IPs:        []net.IP{net.ParseIP("10.96.0.1"), net.IPv6loopback},
		Server:     true,
	})
	if err != nil {
		t.Fatalf("issuing server: %v", err)
	}
	client, err := ca.Issue(Request{CommonName: "admin", Organization: []string{"system:masters"}, Client: true})
	if err != nil {
		t.Fatalf("issuing client: %v", err)
	}
	both, err := ca.Issue(Request{CommonName: "etcd-peer", DNSNames: []string{"etcd"}, Server: true, Client: true})
	if err != nil {
		t.Fatalf("issuing peer: %v", err)
	}

	tests := []struct {
		name    string
		kp      KeyPair
		roots   *x509.CertPool
		dns     string
		usage   x509.ExtKeyUsage
		wantErr bool
	}{
		{name: "server by DNS name", kp: server, roots: pool, dns: "kubernetes.default.svc", usage: x509.ExtKeyUsageServerAuth},
		{name: "server by IPv4", kp: server, roots: pool, dns: "10.96.0.1", usage: x509.ExtKeyUsageServerAuth},
		{name: "server by IPv6", kp: server, roots: pool, dns: "::1", usage: x509.ExtKeyUsageServerAuth},
		{name: "server wrong name", kp: server, roots: pool, dns: "etcd", usage: x509.ExtKeyUsageServerAuth, wantErr: true},
		{name: "server as client", kp: server, roots: pool, usage: x509.ExtKeyUsageClientAuth, wantErr: true},
		{name: "client as client", kp: client, roots: pool, usage: x509.ExtKeyUsageClientAuth},
		{name: "client as server", kp: client, roots: pool, usage: x509.ExtKeyUsageServerAuth, wantErr: true},
		{name: "peer as server", kp: both, roots: pool, dns: "etcd", usage: x509.ExtKeyUsageServerAuth},
		{name: "peer as client", kp: both, roots: pool, usage: x509.ExtKeyUsageClientAuth},
		{name: "server against other CA", kp: server, roots: otherPool, dns: "kubernetes", usage: x509.ExtKeyUsageServerAuth, wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cert := parseCert(t, tc.kp.CertPEM)
			_, err := cert.Verify(x509.VerifyOptions{
				DNSName:   tc.dns,
				Roots:     tc.roots,
				KeyUsages: []x509.ExtKeyUsage{tc.usage},
			})
			if gotErr := err != nil; gotErr != tc.wantErr {
				t.Errorf("Verify error = %v, want error %v", err, tc.wantErr)
			}
		})
	}
}

func TestIssueFields(t *testing.T) {
	ca := newCA(t)
	tests := []struct {
		name         string
		req          Request
		wantValidity time.Duration
		wantErr      bool
	}{
		{
			name:         "node client",
			req:          Request{CommonName: "system:node:node-1", Organization: []string{"system:nodes"}, Client: true},
			wantValidity: DefaultValidity,
		},
		{
			name:         "admin client with validity",
			req:          Request{CommonName: "admin", Organization: []string{"system:masters", "lab"}, Client: true, Validity: 2 * time.Hour},
			wantValidity: 2 * time.Hour,
		},
		{
			name:    "no usage",
			req:     Request{CommonName: "nothing"},
			wantErr: true,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			kp, err := ca.Issue(tc.req)
			if gotErr := err != nil; gotErr != tc.wantErr {
				t.Fatalf("Issue error = %v, want error %v", err, tc.wantErr)
			}
			if tc.wantErr {
				return
			}
			cert := parseCert(t, kp.CertPEM)
			if cert.Subject.CommonName != tc.req.CommonName {
				t.Errorf("CN = %q, want %q", cert.Subject.CommonName, tc.req.CommonName)
			}
			// crypto/x509 puts all O values in one RDN, a DER SET, whose
			// members are sorted; the apiserver reads them as an unordered
			// set of groups anyway.
			if !slices.Equal(slices.Sorted(slices.Values(cert.Subject.Organization)), slices.Sorted(slices.Values(tc.req.Organization))) {
				t.Errorf("O = %q, want %q", cert.Subject.Organization, tc.req.Organization)
			}
			if cert.IsCA {
				t.Error("leaf certificate is a CA")
			}
			if len(cert.SubjectKeyId) == 0 {
				t.Error("SubjectKeyId is empty")
			}
			if !bytes.Equal(cert.AuthorityKeyId, ca.Cert.SubjectKeyId) {
				t.Errorf("AuthorityKeyId = %x, want CA SubjectKeyId %x", cert.AuthorityKeyId, ca.Cert.SubjectKeyId)
			}
			if bits := cert.SerialNumber.BitLen(); bits < 64 || bits > 129 {
				t.Errorf("serial has %d bits, want a random 128-bit number", bits)
			}
			if got := cert.NotAfter.Sub(start); got < tc.wantValidity-time.Minute || got > tc.wantValidity+time.Minute {
				t.Errorf("NotAfter is %v after issue, want about %v", got, tc.wantValidity)
			}
			if _, err := tls.X509KeyPair(kp.CertPEM, kp.KeyPEM); err != nil {
				t.Errorf("certificate and key do not match: %v", err)
			}
		})
	}
}

func TestLoadCA(t *testing.T) {
	ca := newCA(t)
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "ca", "ca.crt"), filepath.Join(dir, "ca", "ca.key")
	if err := ca.WriteFiles(certFile, keyFile); err != nil {
		t.Fatalf("WriteFiles: %v", err)
	}
	other := newCA(t)
	otherCert, otherKey := filepath.Join(dir, "other.crt"), filepath.Join(dir, "other.key")
	if err := other.WriteFiles(otherCert, otherKey); err != nil {
		t.Fatalf("WriteFiles: %v", err)
	}
	leaf, err := ca.Issue(Request{CommonName: "leaf", Server: true})
	if err != nil {
		t.Fatalf("Issue: %v", err)
	}
	leafCert, leafKey := filepath.Join(dir, "leaf.crt"), filepath.Join(dir, "leaf.key")
	if err := leaf.WriteFiles(leafCert, leafKey); err != nil {
		t.Fatalf("WriteFiles: %v", err)
	}
	garbage := filepath.Join(dir, "garbage")
	if err := os.WriteFile(garbage, []byte("not PEM"), 0o644); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name      string
		cert, key string
		wantErr   bool
		wantErrIs error
	}{
		{name: "round trip", cert: certFile, key: keyFile},
		{name: "key of another CA", cert: certFile, key: otherKey, wantErr: true},
		{name: "leaf is not a CA", cert: leafCert, key: leafKey, wantErr: true},
		{name: "cert not PEM", cert: garbage, key: keyFile, wantErr: true, wantErrIs: ErrNoPEM},
		{name: "key not PEM", cert: certFile, key: garbage, wantErr: true, wantErrIs: ErrNoPEM},
		{name: "missing file", cert: filepath.Join(dir, "nope"), key: keyFile, wantErr: true, wantErrIs: os.ErrNotExist},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			loaded, err := LoadCA(tc.cert, tc.key)
			if gotErr := err != nil; gotErr != tc.wantErr {
				t.Fatalf("LoadCA error = %v, want error %v", err, tc.wantErr)
			}
			if tc.wantErrIs != nil && !errors.Is(err, tc.wantErrIs) {
				t.Errorf("LoadCA error = %v, want errors.Is %v", err, tc.wantErrIs)
			}
			if tc.wantErr {
				return
			}
			if !loaded.Cert.Equal(ca.Cert) || !bytes.Equal(loaded.CertPEM, ca.CertPEM) {
				t.Error("loaded certificate differs from the written one")
			}
			if !publicKeysEqual(loaded.Key.Public(), ca.Key.Public()) {
				t.Error("loaded key differs from the written one")
			}
			// The loaded CA must still be able to issue certificates that
			// chain to the original.
			kp, err := loaded.Issue(Request{CommonName: "after-load", Client: true})
			if err != nil {
				t.Fatalf("Issue after load: %v", err)
			}
			if err := parseCert(t, kp.CertPEM).CheckSignatureFrom(ca.Cert); err != nil {
				t.Errorf("certificate from loaded CA does not chain to original: %v", err)
			}
		})
	}

	fi, err := os.Stat(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	if mode := fi.Mode().Perm(); mode != 0o600 {
		t.Errorf("key file mode = %o, want 600", mode)
	}
}

func TestWriteFilesTightensMode(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "k.key")
	if err := os.WriteFile(keyFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := (KeyPair{CertPEM: []byte("c"), KeyPEM: []byte("k")}).WriteFiles(filepath.Join(dir, "k.crt"), keyFile); err != nil {
		t.Fatalf("WriteFiles: %v", err)
	}
	fi, err := os.Stat(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	if mode := fi.Mode().Perm(); mode != 0o600 {
		t.Errorf("key file mode = %o, want 600", mode)
	}
}

func TestNewServiceAccountKey(t *testing.T) {
	privPEM, pubPEM, err := NewServiceAccountKey()
	if err != nil {
		t.Fatalf("NewServiceAccountKey: %v", err)
	}
	priv, err := parseKey(privPEM)
	if err != nil {
		t.Fatalf("parsing private key: %v", err)
	}
	block, _ := pem.Decode(pubPEM)
	if block == nil || block.Type != "PUBLIC KEY" {
		t.Fatalf("no PUBLIC KEY block in %q", pubPEM)
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		t.Fatalf("parsing public key: %v", err)
	}
	if !publicKeysEqual(pub, priv.Public()) {
		t.Error("public key does not belong to private key")
	}
}

func TestWriteKubeconfig(t *testing.T) {
	ca := newCA(t)
	kp, err := ca.Issue(Request{CommonName: "system:kube-scheduler", Client: true})
	if err != nil {
		t.Fatalf("Issue: %v", err)
	}
	tests := []struct {
		name   string
		server string
		user   string
	}{
		{name: "ipv4", server: "https://127.0.0.1:6443", user: "system:kube-scheduler"},
		{name: "ipv6", server: "https://[::1]:6443", user: "admin"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "sub", "kubeconfig")
			if err := WriteKubeconfig(path, tc.server, ca.CertPEM, tc.user, kp); err != nil {
				t.Fatalf("WriteKubeconfig: %v", err)
			}
			cfg, err := clientcmd.BuildConfigFromFlags("", path)
			if err != nil {
				t.Fatalf("BuildConfigFromFlags: %v", err)
			}
			if cfg.Host != tc.server {
				t.Errorf("Host = %q, want %q", cfg.Host, tc.server)
			}
			if !bytes.Equal(cfg.CAData, ca.CertPEM) {
				t.Error("CAData differs from CA certificate")
			}
			if !bytes.Equal(cfg.CertData, kp.CertPEM) {
				t.Error("CertData differs from client certificate")
			}
			if !bytes.Equal(cfg.KeyData, kp.KeyPEM) {
				t.Error("KeyData differs from client key")
			}
			if cfg.Insecure {
				t.Error("Insecure is set")
			}
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if mode := fi.Mode().Perm(); mode != 0o600 {
				t.Errorf("kubeconfig mode = %o, want 600", mode)
			}
		})
	}
}

func TestHandshake(t *testing.T) {
	ca := newCA(t)
	other := newCA(t)
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)

	serverKP, err := ca.Issue(Request{CommonName: "kube-apiserver", DNSNames: []string{"kubernetes"}, Server: true})
	if err != nil {
		t.Fatalf("Issue server: %v", err)
	}
	goodClient, err := ca.Issue(Request{CommonName: "admin", Organization: []string{"system:masters"}, Client: true})
	if err != nil {
		t.Fatalf("Issue client: %v", err)
	}
	foreignClient, err := other.Issue(Request{CommonName: "admin", Client: true})
	if err != nil {
		t.Fatalf("Issue foreign client: %v", err)
	}
	serverOnly, err := ca.Issue(Request{CommonName: "not-a-client", Server: true})
	if err != nil {
		t.Fatalf("Issue server-only: %v", err)
	}

	tests := []struct {
		name       string
		client     KeyPair
		serverName string
		wantErr    bool
	}{
		{name: "client of same CA", client: goodClient, serverName: "kubernetes"},
		{name: "client of other CA", client: foreignClient, serverName: "kubernetes", wantErr: true},
		{name: "server cert used as client", client: serverOnly, serverName: "kubernetes", wantErr: true},
		{name: "wrong server name", client: goodClient, serverName: "etcd", wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srvCert, err := tls.X509KeyPair(serverKP.CertPEM, serverKP.KeyPEM)
			if err != nil {
				t.Fatal(err)
			}
			cliCert, err := tls.X509KeyPair(tc.client.CertPEM, tc.client.KeyPEM)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			sc, cc := net.Pipe()
			srv := tls.Server(sc, &tls.Config{
				Certificates: []tls.Certificate{srvCert},
				ClientAuth:   tls.RequireAndVerifyClientCert,
				ClientCAs:    pool,
			})
			cli := tls.Client(cc, &tls.Config{
				Certificates: []tls.Certificate{cliCert},
				RootCAs:      pool,
				ServerName:   tc.serverName,
			})
			// Both ends are closed below already; these are for an
			// early return.
			defer func() { _ = srv.Close() }()
			defer func() { _ = cli.Close() }()

			type result struct {
				cn  string
				org []string
				err error
			}
			done := make(chan result, 1)
			go func() {
				err := srv.HandshakeContext(ctx)
				var r result
				r.err = err
				if err == nil {
					peer := srv.ConnectionState().PeerCertificates[0]
					r.cn, r.org = peer.Subject.CommonName, peer.Subject.Organization
					// Echo one byte so the client knows the server
					// accepted it: in TLS 1.3 the client's handshake
					// finishes before the server checks its certificate.
					_, r.err = srv.Write([]byte{1})
				}
				// Unblock a client still waiting on the pipe.
				_ = sc.Close()
				done <- r
			}()
			cliErr := cli.HandshakeContext(ctx)
			if cliErr == nil {
				_, cliErr = io.ReadFull(cli, make([]byte, 1))
			}
			_ = cc.Close()
			r := <-done

			gotErr := cliErr != nil || r.err != nil
			if gotErr != tc.wantErr {
				t.Fatalf("handshake client error = %v, server error = %v, want error %v", cliErr, r.err, tc.wantErr)
			}
			if tc.wantErr {
				return
			}
			if r.cn != "admin" || !slices.Equal(r.org, []string{"system:masters"}) {
				t.Errorf("server saw CN=%q O=%q, want admin [system:masters]", r.cn, r.org)
			}
		})
	}
}
