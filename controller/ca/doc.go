// Package ca is Ambit's mesh certificate authority.
//
// It holds the signing key (a user's plug-in CA from the Secret `cacerts`, or
// a self-signed ECDSA P-256 root kept in the Secret `istio-ca-secret`, both in
// Istio's format), publishes the trust bundle as the ConfigMap
// `istio-ca-root-cert`, and serves Istio's
// `istio.v1.auth.IstioCertificateService/CreateCertificate` so that Istio's
// own ztunnel and Ambit's can ask it for workload certificates.
//
// Who may have which certificate is decided in one pure place
// (policy.authorize and its helpers in authz.go): a caller authenticated by a
// TokenReview of its service-account token (audience `istio-ca`) may have a
// certificate for its own service account; the node tunnel's service account
// (istio-system/ztunnel) may also have one for any service account that has
// a pod scheduled on the tunnel's own node, which is the Kubernetes Node
// authorizer's rule applied to identities.
//
// The package does not rotate the root, does not revoke, and does not watch
// the `cacerts` Secret for changes: a new root or intermediate takes effect
// when the controller restarts. It does not serve gRPC itself: Register adds
// the service to the controller's one gRPC server on port 15012.
package ca
