// Package xds is the controller's side of the controller-to-ztunnel
// protocol: it turns Kubernetes objects into Istio's workload API resources
// and serves them over delta ADS (aggregated delta xDS over gRPC).
//
// Two halves, kept apart:
//
//   - BuildAddresses is pure: plain Pods, Services, EndpointSlices and
//     Namespaces in, istio.workload.Address resources out, named as istiod
//     names them (a workload by its UID "<cluster>//Pod/<ns>/<name>", a
//     service by "<ns>/<hostname>"). No client, no I/O; the reconciler that
//     owns the informers calls it.
//   - Server is the delta ADS server, built on go-control-plane's delta
//     server and one LinearCache per type URL. SetAddresses and
//     SetAuthorizations take the complete desired state, diff it against
//     what is served, and push only the resources that changed (and the
//     names that went away) to every connected ztunnel; a ztunnel that
//     (re)connects gets the full state.
//
// Filtering: every node gets every Address and every Authorization, as
// istiod does for ztunnel without on-demand mode. A ztunnel must resolve any
// destination IP in the cluster, including pods outside the mesh (sent
// TunnelProtocol NONE so that it passes their traffic through), so there is
// little to leave out; policies are small. Per-node filtering would cost a
// cache per node and buy little until clusters are large.
//
// What it does not do: it does not watch Kubernetes, compute policies
// (package controller/authz does; Inputs.PolicyKeys and SetAuthorizations
// carry its output), authenticate callers (the gRPC server's interceptors
// do, as for the CA), or serve state-of-the-world xDS.
package xds
