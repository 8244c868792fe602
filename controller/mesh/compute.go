// Package mesh turns the cluster's objects into the config the ztunnels
// get: workload and service addresses, and L4 authorizations (with the
// problems to report in each policy's status). Compute is pure; the
// reconciler in this package feeds it from controller-runtime's caches and
// hands its result to the xDS server.
package mesh

import (
	"sort"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"

	"github.com/ambitmesh/ambit/api/workloadapi"
	"github.com/ambitmesh/ambit/api/workloadapi/security"
	"github.com/ambitmesh/ambit/controller/authz"
	"github.com/ambitmesh/ambit/controller/xds"
)

// Inputs are the objects the mesh config is made of.
type Inputs struct {
	Namespaces     []*corev1.Namespace
	Pods           []*corev1.Pod
	Services       []*corev1.Service
	EndpointSlices []*discoveryv1.EndpointSlice
	AuthzPolicies  []*securityv1.AuthorizationPolicy
	PeerAuthns     []*securityv1.PeerAuthentication
	RootNamespace  string
	TrustDomain    string
	ClusterID      string
}

// Output is what the ztunnels get, and what the controller reports.
type Output struct {
	Addresses      map[string]*workloadapi.Address
	Authorizations map[string]*security.Authorization
	// Problems by policy key ("AuthorizationPolicy/ns/name" or
	// "PeerAuthentication/ns/name"); a policy with none is fully enforced
	// by ztunnel (or not ztunnel's: waypoint-bound policies).
	Problems map[string][]authz.Problem
	// ZtunnelPolicies lists the keys of AuthorizationPolicies bound to
	// ztunnel (not to a waypoint), for their status.
	ZtunnelPolicies map[string]bool
	// EnrolledNamespaces are the namespaces with at least one pod in the
	// mesh, where the trust bundle must be published.
	EnrolledNamespaces []string
}

// Compute builds the mesh config.
func Compute(in Inputs) Output {
	out := Output{
		Authorizations:  map[string]*security.Authorization{},
		Problems:        map[string][]authz.Problem{},
		ZtunnelPolicies: map[string]bool{},
	}
	for _, p := range in.AuthzPolicies {
		a, problems := authz.TranslateAuthorizationPolicy(p, in.RootNamespace, in.TrustDomain)
		key := "AuthorizationPolicy/" + p.Namespace + "/" + p.Name
		if len(problems) > 0 {
			out.Problems[key] = problems
		}
		if a != nil {
			out.Authorizations[authz.PolicyKey(a.Namespace, a.Name)] = a
			out.ZtunnelPolicies[key] = true
		}
	}
	// STRICT mTLS: the static DENY-plaintext policy, referenced by the
	// workloads whose effective mode is STRICT, plus merged port-level
	// policies.
	out.Authorizations[authz.StaticStrictPolicyKey(in.RootNamespace)] = authz.StaticStrictPolicy(in.RootNamespace)
	for _, p := range in.PeerAuthns {
		inherited := authz.InheritedMTLSMode(in.RootNamespace, p.Namespace, in.PeerAuthns)
		a, problems := authz.TranslatePeerAuthentication(p, in.RootNamespace, inherited)
		if len(problems) > 0 {
			out.Problems["PeerAuthentication/"+p.Namespace+"/"+p.Name] = problems
		}
		if a != nil {
			out.Authorizations[authz.PolicyKey(a.Namespace, a.Name)] = a
		}
	}
	policyKeys := func(pod *corev1.Pod) []string {
		var keys []string
		for _, p := range in.AuthzPolicies {
			if p.Spec.GetSelector() != nil && len(p.Spec.GetTargetRefs()) == 0 && p.Spec.GetTargetRef() == nil &&
				authz.SelectsWorkload(p, in.RootNamespace, pod.Namespace, pod.Labels) {
				keys = append(keys, authz.PolicyKey(p.Namespace, p.Name))
			}
		}
		keys = append(keys, authz.WorkloadPeerAuthenticationKeys(in.RootNamespace, pod.Namespace, pod.Labels, in.PeerAuthns)...)
		sort.Strings(keys)
		return keys
	}
	out.Addresses = xds.BuildAddresses(xds.Inputs{
		Namespaces:     in.Namespaces,
		Pods:           in.Pods,
		Services:       in.Services,
		EndpointSlices: in.EndpointSlices,
		TrustDomain:    in.TrustDomain,
		ClusterID:      in.ClusterID,
		PolicyKeys:     policyKeys,
	})
	nsLabels := map[string]map[string]string{}
	for _, ns := range in.Namespaces {
		nsLabels[ns.Name] = ns.Labels
	}
	enrolled := map[string]bool{}
	for _, p := range in.Pods {
		if xds.Enrolled(nsLabels[p.Namespace], p.Labels) {
			enrolled[p.Namespace] = true
		}
	}
	for ns := range enrolled {
		out.EnrolledNamespaces = append(out.EnrolledNamespaces, ns)
	}
	sort.Strings(out.EnrolledNamespaces)
	return out
}
