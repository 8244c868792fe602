// Package authz translates Istio's security policies into the L4
// Authorization resources that ztunnel enforces, as istiod does for Istio's
// ztunnel (pilot/pkg/serviceregistry/ambient/authorization.go and
// policies.go in istio/istio).
//
// It is a pure core: Kubernetes objects (istio.io/client-go types) in,
// istio.security.Authorization protos and status Problems out. It holds no
// state, talks to no API server and never logs; the controller calls it from
// its reconcilers, pushes the results over xDS and writes the Problems into
// the policies' status.
//
// What it produces, and how ztunnel/rbac reads it back:
//
//   - TranslateAuthorizationPolicy: an AuthorizationPolicy with a selector,
//     or none (namespace-wide, or mesh-wide in the root namespace), becomes
//     one Authorization keyed "<namespace>/<name>". Policies with targetRef
//     or targetRefs are for waypoints and are not translated here.
//   - SelectsWorkload / SelectorMatches: which WORKLOAD_SELECTOR keys go into
//     a Workload's authorization_policies.
//   - StaticStrictPolicy, TranslatePeerAuthentication and
//     WorkloadPeerAuthenticationKeys: PeerAuthentication mTLS modes expressed
//     as DENY policies, Istio's "istio_converted_static_strict" scheme.
//
// Fail closed. ztunnel sees connections, not requests. Whatever it cannot
// evaluate (HTTP attributes, unsupported actions, malformed values) is
// reported as a Problem and translated so that the result is never more
// permissive than what the user wrote: an ALLOW rule that needs something
// ztunnel cannot see is left out (so it allows nothing), a DENY rule is kept
// with that part treated as matching everything (so it denies more). These
// are the semantics Istio documents for ztunnel; see the comments on
// TranslateAuthorizationPolicy for where Ambit is stricter than Istio's code.
//
// What it deliberately does not do: choose which workloads exist, watch
// anything, write status, or translate policies for waypoints (targetRefs);
// the waypoint has its own L7 translation.
package authz
