// Package identity is ztunnel's certificate manager: it holds an X.509
// SPIFFE certificate for each workload identity the node tunnel speaks for,
// asks the mesh CA for it on first use (Istio's
// IstioCertificateService/CreateCertificate, authenticated with the
// tunnel's own projected service-account token and naming the workload in
// ImpersonatedIdentity, as istio/ztunnel does), renews it at half its
// lifetime in the background, and builds the TLS 1.3 configurations HBONE
// uses on both ends.
//
// Renewal never drops a connection: a new certificate is used for new
// handshakes only, and an established TLS connection never looks at its
// certificate again.
//
// The package talks to no one but the CA: it has no Kubernetes client, and
// it does not decide which identities a node needs (its caller does, from
// the workloads in its xDS config, and calls Forget when one leaves).
package identity
