// Package ztunnel will be Ambit's per-node tunnel: it carries captured pod
// traffic over HBONE (TLS 1.3 mTLS with SPIFFE identities, HTTP/2 CONNECT on
// port 15008) and enforces L4 AuthorizationPolicy.
//
// Nothing is implemented yet; see the node tunnel issue.
package ztunnel
