// Package xds is ztunnel's delta ADS client: it subscribes to the
// controller's istio.workload.Address and istio.security.Authorization
// resources (wildcard, so every resource of both types), applies each
// response to a state.Store, and acknowledges it, or rejects the resources
// it cannot use while keeping the last good copy of each.
//
// The stream is the whole truth for the node: ztunnel never asks Kubernetes.
// When the stream breaks the client reconnects with exponential backoff and
// jitter, and the store keeps serving the last good configuration meanwhile.
// On reconnect the client tells the server every resource name it holds
// (initial_resource_versions, with empty versions), so the server resends
// every resource that exists and names, as removals, the ones that went away
// while it was disconnected: after the first response the store matches the
// server again, whichever replica answered.
//
// It does not do on-demand (lazy) xDS, does not talk state-of-the-world
// xDS, and does not evaluate or interpret the resources beyond checking
// that they decode.
package xds
