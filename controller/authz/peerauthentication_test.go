package authz

import (
	"slices"
	"testing"

	"istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
)

const (
	strict     = v1beta1.PeerAuthentication_MutualTLS_STRICT
	permissive = v1beta1.PeerAuthentication_MutualTLS_PERMISSIVE
	disable    = v1beta1.PeerAuthentication_MutualTLS_DISABLE
)

func TestStaticStrictPolicy(t *testing.T) {
	assertAuthorization(t, StaticStrictPolicy("istio-system"), `
		name: "istio_converted_static_strict" namespace: "istio-system"
		scope: WORKLOAD_SELECTOR action: DENY
		groups { rules { matches { not_principals { presence {} } } } }`)
	if got := StaticStrictPolicyKey("istio-system"); got != "istio-system/istio_converted_static_strict" {
		t.Errorf("StaticStrictPolicyKey = %q", got)
	}
}

// Policies used by the tables below. Timestamps order "oldest wins".
var paYAML = map[string]string{
	"mesh-strict": `
metadata: {name: mesh-strict, namespace: istio-system, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {mtls: {mode: STRICT}}`,
	"mesh-permissive": `
metadata: {name: mesh-permissive, namespace: istio-system, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {mtls: {mode: PERMISSIVE}}`,
	"mesh-strict-newer-permissive": `
metadata: {name: a-newer, namespace: istio-system, creationTimestamp: "2026-02-01T00:00:00Z"}
spec: {mtls: {mode: PERMISSIVE}}`,
	"mesh-unset": `
metadata: {name: mesh-unset, namespace: istio-system, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {}`,
	"ns-permissive": `
metadata: {name: ns-permissive, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {mtls: {mode: PERMISSIVE}}`,
	"ns-strict": `
metadata: {name: ns-strict, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {mtls: {mode: STRICT}}`,
	"ns-disable": `
metadata: {name: ns-disable, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {mtls: {mode: DISABLE}}`,
	"ns-unset": `
metadata: {name: ns-unset, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {mtls: {mode: UNSET}}`,
	"ns-strict-older-same-time": `
metadata: {name: a-ns-permissive, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {mtls: {mode: PERMISSIVE}}`,
	"other-ns-strict": `
metadata: {name: other, namespace: other, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {mtls: {mode: STRICT}}`,
	"empty-selector-strict": `
metadata: {name: empty-selector, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {selector: {matchLabels: {}}, mtls: {mode: STRICT}}`,
	"api-strict": `
metadata: {name: api, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {selector: {matchLabels: {app: api}}, mtls: {mode: STRICT}}`,
	"api-permissive": `
metadata: {name: api, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {selector: {matchLabels: {app: api}}, mtls: {mode: PERMISSIVE}}`,
	"api-strict-except-8080": `
metadata: {name: api, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {selector: {matchLabels: {app: api}}, mtls: {mode: STRICT}, portLevelMtls: {"8080": {mode: PERMISSIVE}, "9090": {mode: DISABLE}, "443": {mode: STRICT}}}`,
	"api-permissive-strict-9090": `
metadata: {name: api, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {selector: {matchLabels: {app: api}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {"9090": {mode: STRICT}, "8080": {mode: PERMISSIVE}}}`,
	"api-unset-permissive-8080": `
metadata: {name: api, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {selector: {matchLabels: {app: api}}, portLevelMtls: {"8080": {mode: PERMISSIVE}}}`,
	"api-unset-strict-9090": `
metadata: {name: api, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {selector: {matchLabels: {app: api}}, portLevelMtls: {"9090": {mode: STRICT}}}`,
	"api-port-unset-only": `
metadata: {name: api, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {selector: {matchLabels: {app: api}}, mtls: {mode: STRICT}, portLevelMtls: {"8080": {mode: UNSET}}}`,
	"api-newer-permissive": `
metadata: {name: api-newer, namespace: shop, creationTimestamp: "2026-03-01T00:00:00Z"}
spec: {selector: {matchLabels: {app: api}}, mtls: {mode: PERMISSIVE}}`,
	"root-selector-strict": `
metadata: {name: root-api, namespace: istio-system, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {selector: {matchLabels: {app: api}}, mtls: {mode: STRICT}}`,
}

func pas(t *testing.T, names ...string) []*securityv1.PeerAuthentication {
	t.Helper()
	out := make([]*securityv1.PeerAuthentication, len(names))
	for i, n := range names {
		y, ok := paYAML[n]
		if !ok {
			t.Fatalf("no PeerAuthentication %q", n)
		}
		out[i] = peerAuthentication(t, y)
	}
	return out
}

func TestInheritedMTLSMode(t *testing.T) {
	tests := []struct {
		name      string
		namespace string
		policies  []string
		want      MTLSMode
	}{
		{"nothing is PERMISSIVE", "shop", nil, permissive},
		{"mesh STRICT", "shop", []string{"mesh-strict"}, strict},
		{"mesh UNSET is PERMISSIVE", "shop", []string{"mesh-unset"}, permissive},
		{"namespace overrides mesh", "shop", []string{"mesh-strict", "ns-permissive"}, permissive},
		{"namespace STRICT over mesh PERMISSIVE", "shop", []string{"mesh-permissive", "ns-strict"}, strict},
		{"namespace UNSET inherits mesh", "shop", []string{"mesh-strict", "ns-unset"}, strict},
		{"namespace DISABLE", "shop", []string{"mesh-strict", "ns-disable"}, disable},
		{"other namespace is ignored", "shop", []string{"other-ns-strict"}, permissive},
		{"selector policies are ignored", "shop", []string{"api-strict", "root-selector-strict"}, permissive},
		{"selector without labels is namespace-wide", "shop", []string{"empty-selector-strict"}, strict},
		{"oldest mesh policy wins", "shop", []string{"mesh-strict-newer-permissive", "mesh-strict"}, strict},
		{"same age: name breaks the tie", "shop", []string{"ns-strict", "ns-strict-older-same-time"}, permissive},
		{"root namespace workloads get the mesh mode", "istio-system", []string{"mesh-strict"}, strict},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := InheritedMTLSMode(root, tc.namespace, pas(t, tc.policies...)); got != tc.want {
				t.Errorf("InheritedMTLSMode = %v, want %v", got, tc.want)
			}
		})
	}
}

const (
	staticKey    = "istio-system/istio_converted_static_strict"
	convertedKey = "shop/converted_peer_authentication_api"
)

func TestWorkloadPeerAuthenticationKeys(t *testing.T) {
	api := map[string]string{"app": "api"}
	web := map[string]string{"app": "web"}
	tests := []struct {
		name      string
		namespace string
		labels    map[string]string
		policies  []string
		want      []string
	}{
		{"no policy", "shop", api, nil, nil},
		{"mesh STRICT", "shop", api, []string{"mesh-strict"}, []string{staticKey}},
		{"mesh STRICT, namespace PERMISSIVE", "shop", api, []string{"mesh-strict", "ns-permissive"}, nil},
		{"mesh STRICT, namespace DISABLE", "shop", api, []string{"mesh-strict", "ns-disable"}, nil},
		{"namespace STRICT", "shop", web, []string{"ns-strict"}, []string{staticKey}},
		{"workload STRICT", "shop", api, []string{"api-strict"}, []string{staticKey}},
		{"workload STRICT does not select others", "shop", web, []string{"api-strict"}, nil},
		{"workload PERMISSIVE under mesh STRICT", "shop", api, []string{"mesh-strict", "api-permissive"}, nil},
		{"oldest workload policy wins", "shop", api, []string{"api-newer-permissive", "api-strict"}, []string{staticKey}},
		{"port exceptions to STRICT", "shop", api, []string{"api-strict-except-8080"}, []string{convertedKey}},
		{"STRICT ports under PERMISSIVE", "shop", api, []string{"api-permissive-strict-9090"}, []string{convertedKey}},
		{"UNSET workload inherits STRICT, with exception", "shop", api, []string{"mesh-strict", "api-unset-permissive-8080"}, []string{convertedKey}},
		{"UNSET workload inherits PERMISSIVE, no exception", "shop", api, []string{"api-unset-permissive-8080"}, nil},
		{"UNSET workload inherits PERMISSIVE, STRICT port", "shop", api, []string{"api-unset-strict-9090"}, []string{convertedKey}},
		{"UNSET workload inherits STRICT, STRICT port is no exception", "shop", api, []string{"ns-strict", "api-unset-strict-9090"}, []string{staticKey}},
		{"UNSET port entries inherit", "shop", api, []string{"api-port-unset-only"}, []string{staticKey}},
		{"selector policy in root namespace is ignored", "shop", api, []string{"root-selector-strict"}, nil},
		{"workload in root namespace gets the mesh mode only", "istio-system", api, []string{"mesh-strict", "root-selector-strict"}, []string{staticKey}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			policies := pas(t, tc.policies...)
			got := WorkloadPeerAuthenticationKeys(root, tc.namespace, tc.labels, policies)
			if !slices.Equal(got, tc.want) {
				t.Errorf("keys = %q, want %q", got, tc.want)
			}
			// Consistency: a referenced converted policy exists, and exists
			// only when referenced.
			referenced := slices.Contains(got, convertedKey)
			for _, p := range policies {
				if p.Name != "api" || p.Namespace != tc.namespace || !SelectorMatches(p.Spec.GetSelector().GetMatchLabels(), tc.labels) {
					continue
				}
				a, _ := TranslatePeerAuthentication(p, root, InheritedMTLSMode(root, p.Namespace, policies))
				if (a != nil) != referenced {
					t.Errorf("converted policy %v, referenced %v", a != nil, referenced)
				}
			}
		})
	}
}

func TestTranslatePeerAuthentication(t *testing.T) {
	tests := []struct {
		name         string
		policy       string
		inherited    MTLSMode
		want         string
		wantProblems []string
	}{
		{name: "mesh STRICT needs no converted policy", policy: "mesh-strict", inherited: permissive},
		{name: "namespace STRICT needs no converted policy", policy: "ns-strict", inherited: permissive},
		{name: "workload STRICT needs no converted policy", policy: "api-strict", inherited: permissive},
		{name: "PERMISSIVE needs none", policy: "api-permissive", inherited: strict},
		{
			name:      "STRICT with PERMISSIVE and DISABLE ports",
			policy:    "api-strict-except-8080",
			inherited: permissive,
			want: `name: "converted_peer_authentication_api" namespace: "shop" scope: WORKLOAD_SELECTOR action: DENY
				groups { rules { matches { not_principals { presence {} } not_destination_ports: [8080, 9090] } } }`,
		},
		{
			name:      "PERMISSIVE with a STRICT port",
			policy:    "api-permissive-strict-9090",
			inherited: strict,
			want: `name: "converted_peer_authentication_api" namespace: "shop" scope: WORKLOAD_SELECTOR action: DENY
				groups { rules { matches { not_principals { presence {} } destination_ports: 9090 } } }`,
		},
		{
			name:      "UNSET inherits STRICT: PERMISSIVE port is an exception",
			policy:    "api-unset-permissive-8080",
			inherited: strict,
			want: `name: "converted_peer_authentication_api" namespace: "shop" scope: WORKLOAD_SELECTOR action: DENY
				groups { rules { matches { not_principals { presence {} } not_destination_ports: 8080 } } }`,
		},
		{name: "UNSET inherits PERMISSIVE: PERMISSIVE port is none", policy: "api-unset-permissive-8080", inherited: permissive},
		{
			name:      "UNSET inherits DISABLE: STRICT port",
			policy:    "api-unset-strict-9090",
			inherited: disable,
			want: `name: "converted_peer_authentication_api" namespace: "shop" scope: WORKLOAD_SELECTOR action: DENY
				groups { rules { matches { not_principals { presence {} } destination_ports: 9090 } } }`,
		},
		{name: "UNSET port entries are no exception", policy: "api-port-unset-only", inherited: permissive},
		{
			name:         "DISABLE is reported",
			policy:       "ns-disable",
			inherited:    strict,
			wantProblems: []string{"spec.mtls.mode"},
		},
		{
			name:         "selector in the root namespace is reported",
			policy:       "root-selector-strict",
			inherited:    permissive,
			wantProblems: []string{"spec.selector"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, problems := TranslatePeerAuthentication(pas(t, tc.policy)[0], root, tc.inherited)
			assertAuthorization(t, got, tc.want)
			assertProblems(t, problems, tc.wantProblems)
		})
	}

	t.Run("portLevelMtls without selector is reported", func(t *testing.T) {
		p := peerAuthentication(t, `
metadata: {name: p, namespace: shop}
spec: {mtls: {mode: STRICT}, portLevelMtls: {"8080": {mode: PERMISSIVE}}}`)
		got, problems := TranslatePeerAuthentication(p, root, permissive)
		assertAuthorization(t, got, "")
		assertProblems(t, problems, []string{"spec.portLevelMtls"})
	})
	t.Run("port 0 is reported and ignored", func(t *testing.T) {
		p := peerAuthentication(t, paYAML["api-strict"])
		p.Spec.PortLevelMtls = map[uint32]*v1beta1.PeerAuthentication_MutualTLS{0: {Mode: permissive}}
		got, problems := TranslatePeerAuthentication(p, root, permissive)
		assertAuthorization(t, got, "")
		assertProblems(t, problems, []string{"spec.portLevelMtls[0]"})
	})
	t.Run("nil", func(t *testing.T) {
		if a, p := TranslatePeerAuthentication(nil, root, strict); a != nil || p != nil {
			t.Errorf("got %v, %v", a, p)
		}
	})
}
