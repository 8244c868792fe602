package authz

import (
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
)

// SelectorMatches reports whether a workload selector's matchLabels select a
// pod with the given labels: every key must be present with the same value
// ("matchLabels: one or more labels that indicate a specific set of
// pods/VMs"). An empty selector selects every pod, as a Kubernetes label
// selector does.
func SelectorMatches(selector, podLabels map[string]string) bool {
	for k, v := range selector {
		got, ok := podLabels[k]
		if !ok || got != v {
			return false
		}
	}
	return true
}

// PolicyKey is the key of an Authorization, "<namespace>/<name>", as
// ztunnel's Authorization::to_key builds it and as
// Workload.authorization_policies lists it.
func PolicyKey(namespace, name string) string {
	return namespace + "/" + name
}

// SelectsWorkload reports whether the key of the Authorization translated
// from p belongs in Workload.authorization_policies of a pod in namespace
// with podLabels. Only WORKLOAD_SELECTOR policies are listed there (ztunnel
// finds NAMESPACE and GLOBAL ones by itself); as in istiod, a selector policy
// applies to pods of its own namespace, or of every namespace when it is in
// the root namespace. Call it only for policies whose translation returned an
// Authorization; a listed key with no Authorization is skipped by ztunnel.
func SelectsWorkload(p *securityv1.AuthorizationPolicy, rootNamespace, namespace string, podLabels map[string]string) bool {
	if p == nil {
		return false
	}
	spec := &p.Spec
	if spec.GetTargetRef() != nil || len(spec.GetTargetRefs()) > 0 {
		return false
	}
	selector := spec.GetSelector().GetMatchLabels()
	if len(selector) == 0 {
		return false
	}
	if p.Namespace != namespace && p.Namespace != rootNamespace {
		return false
	}
	return SelectorMatches(selector, podLabels)
}
