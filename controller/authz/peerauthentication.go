package authz

import (
	"fmt"
	"slices"

	"istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"

	"github.com/ambitmesh/ambit/api/workloadapi/security"
)

// PeerAuthentication in ambient mode, as istiod does it for ztunnel
// (pilot/pkg/serviceregistry/ambient/policies.go, authorization.go).
//
// ztunnel has no notion of mTLS modes: it always speaks HBONE between
// enrolled workloads and accepts plaintext from outside the mesh. STRICT is
// therefore expressed as an L4 DENY policy that matches connections whose
// peer has no identity: NotPrincipals: [presence]. Because DENY policies add
// up and cannot be overridden, the mode inheritance of PeerAuthentication
// (mesh, then namespace, then workload, then port; UNSET inherits) cannot be
// expressed with NAMESPACE or GLOBAL scoped policies. Istio, and Ambit,
// resolve it in the controller instead:
//
//   - one static policy, StaticStrictPolicy, "<root>/istio_converted_static_strict",
//     scoped WORKLOAD_SELECTOR so that it applies only where referenced;
//   - for a workload-level policy whose portLevelMtls differs from its base
//     mode, a merged policy "<ns>/converted_peer_authentication_<name>" from
//     TranslatePeerAuthentication;
//   - per workload, WorkloadPeerAuthenticationKeys: the one key (or none) to
//     add to Workload.authorization_policies.

// MTLSMode is a PeerAuthentication mutual TLS mode.
type MTLSMode = v1beta1.PeerAuthentication_MutualTLS_Mode

const (
	// StaticStrictPolicyName is the name of the policy every STRICT workload
	// references. It has '_' characters, illegal in Kubernetes names, so it
	// cannot collide with a user's AuthorizationPolicy.
	StaticStrictPolicyName = "istio_converted_static_strict"
	// ConvertedPeerAuthenticationPrefix prefixes the name of the policy
	// converted from a workload-level PeerAuthentication with port-level
	// exceptions.
	ConvertedPeerAuthenticationPrefix = "converted_peer_authentication_"
)

// StaticStrictPolicy returns the DENY policy for STRICT mTLS: it denies every
// connection whose peer presents no identity. The controller always
// publishes it; workloads whose effective mode is STRICT reference it by
// StaticStrictPolicyKey.
func StaticStrictPolicy(rootNamespace string) *security.Authorization {
	return &security.Authorization{
		Name:      StaticStrictPolicyName,
		Namespace: rootNamespace,
		Scope:     security.Scope_WORKLOAD_SELECTOR,
		Action:    security.Action_DENY,
		Groups: []*security.Group{{Rules: []*security.Rules{{
			Matches: []*security.Match{{NotPrincipals: []*security.StringMatch{presence()}}},
		}}}},
	}
}

// StaticStrictPolicyKey is the key of StaticStrictPolicy.
func StaticStrictPolicyKey(rootNamespace string) string {
	return PolicyKey(rootNamespace, StaticStrictPolicyName)
}

// InheritedMTLSMode returns the mode that workload-level PeerAuthentications
// in namespace inherit, and that its workloads without one get: the mode of
// the namespace-wide policy if it is set, else the mode of the mesh-wide
// policy (root namespace, no selector) if set, else PERMISSIVE. policies may
// hold PeerAuthentications of any namespace; where several namespace-wide (or
// mesh-wide) ones exist, the oldest wins, as in Istio. DISABLE is returned
// as is: ztunnel treats it as PERMISSIVE.
func InheritedMTLSMode(rootNamespace, namespace string, policies []*securityv1.PeerAuthentication) MTLSMode {
	mode := v1beta1.PeerAuthentication_MutualTLS_PERMISSIVE
	if m := modeOf(oldest(policies, func(p *securityv1.PeerAuthentication) bool {
		return p.Namespace == rootNamespace && len(p.Spec.GetSelector().GetMatchLabels()) == 0
	})); m != v1beta1.PeerAuthentication_MutualTLS_UNSET {
		mode = m
	}
	if namespace == rootNamespace {
		return mode
	}
	if m := modeOf(oldest(policies, func(p *securityv1.PeerAuthentication) bool {
		return p.Namespace == namespace && len(p.Spec.GetSelector().GetMatchLabels()) == 0
	})); m != v1beta1.PeerAuthentication_MutualTLS_UNSET {
		mode = m
	}
	return mode
}

// WorkloadPeerAuthenticationKeys returns the policy keys that
// PeerAuthentication adds to Workload.authorization_policies for a pod in
// namespace with podLabels: StaticStrictPolicyKey when its effective mode is
// STRICT on every port, the key of its workload-level policy's converted form
// when port-level modes differ from the base mode, or nothing. The workload
// level policy is the oldest in the pod's namespace whose selector matches;
// selector policies in the root namespace are ignored, as in Istio.
func WorkloadPeerAuthenticationKeys(rootNamespace, namespace string, podLabels map[string]string, policies []*securityv1.PeerAuthentication) []string {
	inherited := InheritedMTLSMode(rootNamespace, namespace, policies)
	var w *securityv1.PeerAuthentication
	if namespace != rootNamespace {
		w = oldest(policies, func(p *securityv1.PeerAuthentication) bool {
			sel := p.Spec.GetSelector().GetMatchLabels()
			return p.Namespace == namespace && len(sel) > 0 && SelectorMatches(sel, podLabels)
		})
	}
	if w == nil {
		if inherited == v1beta1.PeerAuthentication_MutualTLS_STRICT {
			return []string{StaticStrictPolicyKey(rootNamespace)}
		}
		return nil
	}
	baseStrict, exceptions, _ := portPlan(w, inherited)
	switch {
	case len(exceptions) > 0:
		return []string{PolicyKey(w.Namespace, ConvertedPeerAuthenticationPrefix+w.Name)}
	case baseStrict:
		return []string{StaticStrictPolicyKey(rootNamespace)}
	default:
		return nil
	}
}

// TranslatePeerAuthentication returns the converted policy of a
// workload-level PeerAuthentication whose portLevelMtls differs from its base
// mode (its own mode, or inherited when UNSET; see InheritedMTLSMode for its
// namespace), and nil otherwise: STRICT without port exceptions is covered by
// StaticStrictPolicy, and non-STRICT needs no policy. The controller calls it
// for every PeerAuthentication, to collect the Problems, and recomputes it
// when the namespace-wide or mesh-wide policy changes.
//
// The converted policy is a single DENY match that merges the base mode and
// the exceptions, because an exception cannot be a second policy (any
// matching DENY wins): base STRICT denies plaintext on every port except the
// PERMISSIVE ones, base PERMISSIVE denies plaintext on the STRICT ports only.
// Port keys are the workload's ports, the destination port ztunnel sees.
func TranslatePeerAuthentication(p *securityv1.PeerAuthentication, rootNamespace string, inherited MTLSMode) (*security.Authorization, []Problem) {
	if p == nil {
		return nil, nil
	}
	var problems []Problem
	if modeOf(p) == v1beta1.PeerAuthentication_MutualTLS_DISABLE {
		problems = append(problems, Problem{
			Field: "spec.mtls.mode",
			Message: "ztunnel always uses mTLS between enrolled workloads; DISABLE is treated as PERMISSIVE: " +
				"plaintext from outside the mesh is accepted.",
		})
	}
	if len(p.Spec.GetSelector().GetMatchLabels()) == 0 {
		if len(p.Spec.GetPortLevelMtls()) > 0 {
			problems = append(problems, Problem{
				Field:   "spec.portLevelMtls",
				Message: "portLevelMtls applies only with a selector with labels; it is ignored.",
			})
		}
		return nil, problems
	}
	if p.Namespace == rootNamespace {
		return nil, append(problems, Problem{
			Field:   "spec.selector",
			Message: "a PeerAuthentication with a selector in the root namespace is ignored in ambient mode; put it in the workload's namespace.",
		})
	}
	baseStrict, exceptions, bad := portPlan(p, inherited)
	for _, port := range bad {
		problems = append(problems, Problem{
			Field:   fmt.Sprintf("spec.portLevelMtls[%d]", port),
			Message: "invalid port number; the entry is ignored and the port gets the workload's mode.",
		})
	}
	if len(exceptions) == 0 {
		return nil, problems
	}
	m := &security.Match{NotPrincipals: []*security.StringMatch{presence()}}
	if baseStrict {
		m.NotDestinationPorts = exceptions
	} else {
		m.DestinationPorts = exceptions
	}
	return &security.Authorization{
		Name:      ConvertedPeerAuthenticationPrefix + p.Name,
		Namespace: p.Namespace,
		Scope:     security.Scope_WORKLOAD_SELECTOR,
		Action:    security.Action_DENY,
		Groups:    []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{m}}}}},
	}, problems
}

// portPlan resolves a workload-level policy: whether its base mode is
// STRICT, and the ports whose port-level mode says otherwise (UNSET ports
// inherit the base). DISABLE counts as PERMISSIVE, as in Istio's code.
func portPlan(p *securityv1.PeerAuthentication, inherited MTLSMode) (baseStrict bool, exceptions, bad []uint32) {
	mode := modeOf(p)
	if mode == v1beta1.PeerAuthentication_MutualTLS_UNSET {
		mode = inherited
	}
	baseStrict = mode == v1beta1.PeerAuthentication_MutualTLS_STRICT
	for port, m := range p.Spec.GetPortLevelMtls() {
		pm := m.GetMode()
		if pm == v1beta1.PeerAuthentication_MutualTLS_UNSET {
			continue
		}
		if port == 0 || port > 65535 {
			bad = append(bad, port)
			continue
		}
		if (pm == v1beta1.PeerAuthentication_MutualTLS_STRICT) != baseStrict {
			exceptions = append(exceptions, port)
		}
	}
	slices.Sort(exceptions)
	slices.Sort(bad)
	return baseStrict, exceptions, bad
}

func modeOf(p *securityv1.PeerAuthentication) MTLSMode {
	if p == nil {
		return v1beta1.PeerAuthentication_MutualTLS_UNSET
	}
	return p.Spec.GetMtls().GetMode()
}

// oldest returns the oldest policy that satisfies keep, the name breaking
// ties so that the choice does not depend on list order ("the oldest one
// wins" in the PeerAuthentication reference).
func oldest(policies []*securityv1.PeerAuthentication, keep func(*securityv1.PeerAuthentication) bool) *securityv1.PeerAuthentication {
	var best *securityv1.PeerAuthentication
	for _, p := range policies {
		if p == nil || !keep(p) {
			continue
		}
		if best == nil || p.CreationTimestamp.Before(&best.CreationTimestamp) ||
			(p.CreationTimestamp.Equal(&best.CreationTimestamp) && p.Name < best.Name) {
			best = p
		}
	}
	return best
}
