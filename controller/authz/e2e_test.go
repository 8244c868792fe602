package authz_test

import (
	"net/netip"
	"testing"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	"sigs.k8s.io/yaml"

	"github.com/ambitmesh/ambit/api/workloadapi"
	"github.com/ambitmesh/ambit/api/workloadapi/security"
	"github.com/ambitmesh/ambit/controller/authz"
	"github.com/ambitmesh/ambit/ztunnel/rbac"
)

// These tests run the whole L4 policy path: Istio YAML -> translation (this
// package, as the controller uses it) -> xDS resources and
// Workload.authorization_policies -> ztunnel's evaluation (ztunnel/rbac).

const rootNS = "istio-system"

type pod struct {
	namespace string
	labels    map[string]string
}

type check struct {
	name  string
	pod   pod
	conn  rbac.Conn
	allow bool
}

var (
	httpbin = pod{"ambient-demo", map[string]string{"app": "httpbin"}}
	other   = pod{"ambient-demo", map[string]string{"app": "other"}}
	shopAPI = pod{"shop", map[string]string{"app": "api"}}
	shopWeb = pod{"shop", map[string]string{"app": "web"}}
)

// conn is a connection from identity ("" for plaintext) at src to port.
func conn(identity, src string, port uint16) rbac.Conn {
	return rbac.Conn{
		SrcIdentity: identity,
		SrcIP:       netip.MustParseAddr(src),
		DstIP:       netip.MustParseAddr("10.44.0.9"),
		DstPort:     port,
	}
}

const (
	sleepID = "spiffe://cluster.local/ns/ambient-demo/sa/sleep"
	curlID  = "spiffe://cluster.local/ns/ambient-demo/sa/curl"
	badID   = "spiffe://cluster.local/ns/untrusted/sa/default"
)

func TestEndToEnd(t *testing.T) {
	tests := []struct {
		name                string
		trustDomain         string
		authorizationPolicy []string
		peerAuthentication  []string
		checks              []check
	}{
		{
			name: "L4 ALLOW by principal (Istio ambient docs)",
			authorizationPolicy: []string{`
metadata: {name: allow-sleep-to-httpbin, namespace: ambient-demo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/ambient-demo/sa/sleep]}}]}]`},
			checks: []check{
				{"sleep is allowed", httpbin, conn(sleepID, "10.44.1.1", 8000), true},
				{"curl is denied", httpbin, conn(curlID, "10.44.1.2", 8000), false},
				{"plaintext is denied", httpbin, conn("", "10.44.1.3", 8000), false},
				{"unselected pod is open", other, conn(curlID, "10.44.1.2", 8000), true},
			},
		},
		{
			name: "L7 ALLOW without a waypoint denies everything (Istio ambient docs)",
			authorizationPolicy: []string{`
metadata: {name: allow-sleep-to-httpbin, namespace: ambient-demo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/ambient-demo/sa/sleep]}}]
    to: [{operation: {methods: [GET]}}]`},
			checks: []check{
				{"sleep is denied", httpbin, conn(sleepID, "10.44.1.1", 8000), false},
				{"unselected pod is open", other, conn(sleepID, "10.44.1.1", 8000), true},
			},
		},
		{
			name: "L7-only DENY without a waypoint denies everything",
			authorizationPolicy: []string{`
metadata: {name: no-delete, namespace: ambient-demo}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]`},
			checks: []check{
				{"sleep is denied", httpbin, conn(sleepID, "10.44.1.1", 8000), false},
				{"plaintext is denied", other, conn("", "10.44.1.1", 80), false},
			},
		},
		{
			name: "DENY with L7 and L4 parts denies on the L4 part",
			authorizationPolicy: []string{`
metadata: {name: no-admin-from-untrusted, namespace: ambient-demo}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [untrusted]}}]
    to: [{operation: {paths: ["/admin*"]}}]`},
			checks: []check{
				{"untrusted is denied on every path", httpbin, conn(badID, "10.44.2.1", 8000), false},
				{"sleep is allowed", httpbin, conn(sleepID, "10.44.1.1", 8000), true},
			},
		},
		{
			name: "mesh-wide DENY in the root namespace, namespace ALLOW",
			authorizationPolicy: []string{`
metadata: {name: deny-untrusted, namespace: istio-system}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [untrusted]}}]}]`, `
metadata: {name: allow-all, namespace: shop}
spec: {rules: [{}]}`},
			checks: []check{
				{"untrusted to shop is denied despite allow-all", shopAPI, conn(badID, "10.44.2.1", 8080), false},
				{"untrusted to ambient-demo is denied", httpbin, conn(badID, "10.44.2.1", 8000), false},
				{"sleep to shop is allowed", shopAPI, conn(sleepID, "10.44.1.1", 8080), true},
			},
		},
		{
			name: "empty ALLOW denies, rules [{}] next to it allows",
			authorizationPolicy: []string{`
metadata: {name: allow-nothing, namespace: shop}
spec: {}`, `
metadata: {name: allow-api, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  rules: [{}]`},
			checks: []check{
				{"api is open", shopAPI, conn("", "10.44.1.1", 8080), true},
				{"web is closed", shopWeb, conn(sleepID, "10.44.1.1", 8080), false},
			},
		},
		{
			name: "ipBlocks, ports and service accounts",
			authorizationPolicy: []string{`
metadata: {name: api, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  rules:
  - from: [{source: {ipBlocks: ["10.44.0.0/16"], notIpBlocks: ["10.44.66.0/24"]}}]
    to: [{operation: {ports: ["8080"]}}]
  - from: [{source: {serviceAccounts: [web]}}]`},
			checks: []check{
				{"cluster range on 8080", shopAPI, conn("", "10.44.1.1", 8080), true},
				{"cluster range on 9090", shopAPI, conn("", "10.44.1.1", 9090), false},
				{"excluded subnet", shopAPI, conn("", "10.44.66.7", 8080), false},
				{"outside range", shopAPI, conn("", "192.168.1.1", 8080), false},
				{"shop/web service account on any port from anywhere", shopAPI, conn("spiffe://cluster.local/ns/shop/sa/web", "192.168.1.1", 9090), true},
				{"web service account of another namespace", shopAPI, conn("spiffe://cluster.local/ns/other/sa/web", "192.168.1.1", 9090), false},
			},
		},
		{
			name: "when conditions on L4 attributes",
			authorizationPolicy: []string{`
metadata: {name: api, namespace: shop}
spec:
  action: DENY
  selector: {matchLabels: {app: api}}
  rules:
  - when:
    - {key: source.ip, notValues: ["10.44.0.0/16"]}
    - {key: destination.port, values: ["8080", "8443"]}`},
			checks: []check{
				{"outside on 8080 is denied", shopAPI, conn(sleepID, "192.168.1.1", 8080), false},
				{"outside on 9090 is allowed", shopAPI, conn(sleepID, "192.168.1.1", 9090), true},
				{"inside on 8080 is allowed", shopAPI, conn(sleepID, "10.44.3.3", 8080), true},
			},
		},
		{
			name:        "cluster.local in a policy means the mesh trust domain",
			trustDomain: "example.org",
			authorizationPolicy: []string{`
metadata: {name: api, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  rules: [{from: [{source: {principals: [cluster.local/ns/ambient-demo/sa/sleep]}}]}]`},
			checks: []check{
				{"sleep of this mesh", shopAPI, conn("spiffe://example.org/ns/ambient-demo/sa/sleep", "10.44.1.1", 8080), true},
				{"sleep of a foreign cluster.local mesh", shopAPI, conn(sleepID, "10.44.1.1", 8080), false},
			},
		},
		{
			name: "dry-run DENY does not deny",
			authorizationPolicy: []string{`
metadata: {name: try-deny, namespace: shop, annotations: {istio.io/dry-run: "true"}}
spec: {action: DENY, rules: [{}]}`},
			checks: []check{
				{"allowed", shopAPI, conn(sleepID, "10.44.1.1", 8080), true},
			},
		},
		{
			name: "CUSTOM and waypoint policies are not enforced by ztunnel",
			authorizationPolicy: []string{`
metadata: {name: ext, namespace: shop}
spec: {action: CUSTOM, provider: {name: oauth2-proxy}, rules: [{}]}`, `
metadata: {name: waypoint, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules: [{from: [{source: {namespaces: [nobody]}}]}]`},
			checks: []check{
				{"allowed", shopAPI, conn(sleepID, "10.44.1.1", 8080), true},
			},
		},
		{
			name: "mesh STRICT, namespace PERMISSIVE",
			peerAuthentication: []string{`
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}`, `
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: PERMISSIVE}}`},
			checks: []check{
				{"plaintext to shop is allowed", shopAPI, conn("", "10.44.1.1", 8080), true},
				{"plaintext to ambient-demo is denied", httpbin, conn("", "10.44.1.1", 8000), false},
				{"mTLS to ambient-demo is allowed", httpbin, conn(sleepID, "10.44.1.1", 8000), true},
			},
		},
		{
			name: "workload STRICT with a PERMISSIVE port, next to an ALLOW policy",
			authorizationPolicy: []string{`
metadata: {name: allow-all, namespace: shop}
spec: {rules: [{}]}`},
			peerAuthentication: []string{`
metadata: {name: api, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  mtls: {mode: STRICT}
  portLevelMtls: {"8080": {mode: PERMISSIVE}}`},
			checks: []check{
				{"plaintext on 8080 is allowed", shopAPI, conn("", "10.44.1.1", 8080), true},
				{"plaintext on 9090 is denied", shopAPI, conn("", "10.44.1.1", 9090), false},
				{"mTLS on 9090 is allowed", shopAPI, conn(sleepID, "10.44.1.1", 9090), true},
				{"plaintext to web is allowed", shopWeb, conn("", "10.44.1.1", 9090), true},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			trustDomain := tc.trustDomain
			if trustDomain == "" {
				trustDomain = "cluster.local"
			}
			var aps []*securityv1.AuthorizationPolicy
			for _, y := range tc.authorizationPolicy {
				var p securityv1.AuthorizationPolicy
				if err := yaml.UnmarshalStrict([]byte(y), &p); err != nil {
					t.Fatalf("decoding: %v", err)
				}
				aps = append(aps, &p)
			}
			var pas []*securityv1.PeerAuthentication
			for _, y := range tc.peerAuthentication {
				var p securityv1.PeerAuthentication
				if err := yaml.UnmarshalStrict([]byte(y), &p); err != nil {
					t.Fatalf("decoding: %v", err)
				}
				pas = append(pas, &p)
			}

			// What the controller pushes.
			auths := []*security.Authorization{authz.StaticStrictPolicy(rootNS)}
			var translated []*securityv1.AuthorizationPolicy
			for _, p := range aps {
				a, problems := authz.TranslateAuthorizationPolicy(p, rootNS, trustDomain)
				for _, pr := range problems {
					t.Logf("status of %s/%s: %v", p.Namespace, p.Name, pr)
				}
				if a != nil {
					auths = append(auths, a)
					translated = append(translated, p)
				}
			}
			for _, p := range pas {
				a, _ := authz.TranslatePeerAuthentication(p, rootNS, authz.InheritedMTLSMode(rootNS, p.Namespace, pas))
				if a != nil {
					auths = append(auths, a)
				}
			}
			policies := rbac.NewPolicies(auths)
			if w := policies.Warnings(); len(w) > 0 {
				t.Errorf("translated policies compile with warnings: %q", w)
			}

			for _, c := range tc.checks {
				w := &workloadapi.Workload{Name: "pod", Namespace: c.pod.namespace}
				for _, p := range translated {
					if authz.SelectsWorkload(p, rootNS, c.pod.namespace, c.pod.labels) {
						w.AuthorizationPolicies = append(w.AuthorizationPolicies, authz.PolicyKey(p.Namespace, p.Name))
					}
				}
				w.AuthorizationPolicies = append(w.AuthorizationPolicies,
					authz.WorkloadPeerAuthenticationKeys(rootNS, c.pod.namespace, c.pod.labels, pas)...)

				v := policies.Evaluate(w, c.conn)
				if v.Allow != c.allow {
					t.Errorf("%s: Allow = %v (%v %s), want %v", c.name, v.Allow, v.Reason, v.Policy, c.allow)
				}
				if v.MissingPolicies != 0 {
					t.Errorf("%s: workload references %d missing policies: %q", c.name, v.MissingPolicies, w.AuthorizationPolicies)
				}
			}
		})
	}
}
