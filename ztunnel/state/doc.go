// Package state is the configuration store ztunnel resolves against: the
// workloads, services and L4 authorization policies the controller pushes
// over xDS (Istio's istio.workload.Address and istio.security.Authorization
// resources), indexed for the proxy's hot path.
//
// Reads are lock-free and allocation-free: the Store publishes an immutable
// View through an atomic pointer, and every change builds a new View. A
// connection handler that needs several lookups to agree with each other
// takes one View (Store.View) and asks it; the Store's own lookup methods are
// shorthands for a single lookup against the current View. Writes (one xDS
// response at a time) are serialized and cost O(resources), which is the
// right trade for configuration that changes per pod event but is read per
// connection.
//
// The store keeps whatever it was last given: when the controller is
// unreachable ztunnel keeps resolving against the last good configuration.
//
// What it deliberately does not do: it does not talk xDS (package
// ztunnel/xds feeds it), does not evaluate policy (package ztunnel/rbac
// does, from the Authorizations a View returns), and knows one network
// only: addresses are indexed by IP, not by Istio's "network/IP" alias,
// because Ambit runs a single network.
package state
