// Package interop tests Ambit's HBONE engine (ztunnel/hbone) against
// Istio's own Go implementation of HBONE: the server and dialer of
// istio.io/istio/pkg/hbone, and Istio's echo client, the binary the lab
// runs, built from e2e/apps.
//
// Every test speaks real TLS 1.3 over loopback with ECDSA P-256
// certificates carrying SPIFFE URI SANs from one test CA, with client
// certificates on both sides, as meshed workloads do.
//
// It is a module of its own (github.com/ambitmesh/ambit/e2e/interop) so
// that Ambit's product module never depends on istio.io/istio, and so that
// Ambit's requirements stay out of e2e/apps: there, Minimal Version
// Selection moves grpc to a release that does not compile against Istio's
// go-control-plane pin. The root module's `go test ./...` does not see
// this module; run it with
//
//	go -C e2e/interop test ./...
//
// What it deliberately does not do: it does not test against Istio's Rust
// ztunnel, and it does not test Ambit's engine on its own (ztunnel/hbone's
// tests do).
package interop
