package authz

import (
	"strings"
	"testing"
)

type translateCase struct {
	name         string
	trustDomain  string // td unless set
	policy       string // YAML
	want         string // prototext; "" for nil
	wantProblems []string
	wantText     []string // substrings some Problem message must contain
}

func runTranslate(t *testing.T, tests []translateCase) {
	t.Helper()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			trust := tc.trustDomain
			if trust == "" {
				trust = td
			}
			got, problems := TranslateAuthorizationPolicy(authorizationPolicy(t, tc.policy), root, trust)
			assertAuthorization(t, got, tc.want)
			assertProblems(t, problems, tc.wantProblems, tc.wantText...)
		})
	}
}

func TestTranslateScope(t *testing.T) {
	runTranslate(t, []translateCase{
		{
			name: "selector is WORKLOAD_SELECTOR",
			policy: `
metadata: {name: p, namespace: ns}
spec: {selector: {matchLabels: {app: x}}}`,
			want: `name: "p" namespace: "ns" scope: WORKLOAD_SELECTOR action: ALLOW`,
		},
		{
			name: "no selector is NAMESPACE",
			policy: `
metadata: {name: p, namespace: ns}
spec: {}`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE`,
		},
		{
			name: "no selector in the root namespace is GLOBAL",
			policy: `
metadata: {name: p, namespace: istio-system}
spec: {}`,
			want: `name: "p" namespace: "istio-system" scope: GLOBAL`,
		},
		{
			name: "selector in the root namespace is WORKLOAD_SELECTOR",
			policy: `
metadata: {name: p, namespace: istio-system}
spec: {selector: {matchLabels: {app: x}}}`,
			want: `name: "p" namespace: "istio-system" scope: WORKLOAD_SELECTOR`,
		},
		{
			name: "selector without labels is namespace-wide",
			policy: `
metadata: {name: p, namespace: ns}
spec: {selector: {matchLabels: {}}}`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE`,
		},
		{
			name: "targetRefs is for a waypoint",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules: [{to: [{operation: {methods: [GET]}}]}]`,
		},
		{
			name: "targetRef is for a waypoint",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  targetRef: {kind: Service, group: "", name: reviews}
  action: CUSTOM
  provider: {name: ext}
  rules: [{}]`,
		},
	})
}

func TestTranslateAction(t *testing.T) {
	runTranslate(t, []translateCase{
		{
			name: "ALLOW",
			policy: `
metadata: {name: p, namespace: ns}
spec: {action: ALLOW, rules: [{}]}`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE action: ALLOW groups {}`,
		},
		{
			name: "DENY",
			policy: `
metadata: {name: p, namespace: ns}
spec: {action: DENY, rules: [{}]}`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE action: DENY groups {}`,
		},
		{
			name: "AUDIT is not supported",
			policy: `
metadata: {name: p, namespace: ns}
spec: {action: AUDIT, rules: [{}]}`,
			wantProblems: []string{"spec.action"},
			wantText:     []string{"ztunnel does not support the AUDIT action"},
		},
		{
			name: "CUSTOM is not supported",
			policy: `
metadata: {name: p, namespace: ns}
spec: {action: CUSTOM, provider: {name: ext-authz}, rules: [{}]}`,
			wantProblems: []string{"spec.action"},
			wantText:     []string{"ztunnel does not support the CUSTOM action", "waypoint"},
		},
	})
}

// TestTranslateEmpty pins the two shapes Istio gives opposite meanings.
func TestTranslateEmpty(t *testing.T) {
	runTranslate(t, []translateCase{
		{
			name: "ALLOW with empty spec has no groups: denies all",
			policy: `
metadata: {name: deny-all, namespace: ns}
spec: {}`,
			want: `name: "deny-all" namespace: "ns" scope: NAMESPACE`,
		},
		{
			name: "ALLOW with rules [{}] has one empty group: allows all",
			policy: `
metadata: {name: allow-all, namespace: ns}
spec: {rules: [{}]}`,
			want: `name: "allow-all" namespace: "ns" scope: NAMESPACE groups {}`,
		},
		{
			name: "DENY without rules never denies",
			policy: `
metadata: {name: p, namespace: ns}
spec: {action: DENY}`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE action: DENY`,
		},
	})
}

func TestTranslateSource(t *testing.T) {
	runTranslate(t, []translateCase{
		{
			name: "principals: exact, presence, prefix, suffix",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/a/sa/b", "*", "cluster.local/ns/c/*", "*/sa/d"]`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE groups { rules { matches {
				principals { exact: "cluster.local/ns/a/sa/b" }
				principals { presence {} }
				principals { prefix: "cluster.local/ns/c/" }
				principals { suffix: "/sa/d" }
			} } }`,
		},
		{
			name: "notPrincipals",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  rules: [{from: [{source: {notPrincipals: ["cluster.local/ns/a/sa/b"]}}]}]`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE groups { rules { matches {
				not_principals { exact: "cluster.local/ns/a/sa/b" } } } }`,
		},
		{
			name:        "cluster.local means the mesh trust domain, as in Istio sidecars",
			trustDomain: "example.org",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/a/sa/b", "cluster.local/ns/a/sa/*", "other.org/ns/a/sa/b", "cluster.local/*", "*/ns/a/sa/b"]
        notPrincipals: ["cluster.local/ns/a/sa/c"]`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE groups { rules { matches {
				principals { exact: "example.org/ns/a/sa/b" }
				principals { prefix: "example.org/ns/a/sa/" }
				principals { exact: "other.org/ns/a/sa/b" }
				principals { prefix: "cluster.local/" }
				principals { suffix: "/ns/a/sa/b" }
				not_principals { exact: "example.org/ns/a/sa/c" }
			} } }`,
		},
		{
			name: "namespaces and notNamespaces with wildcards",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  rules: [{from: [{source: {namespaces: [a, "team-*", "*-prod"], notNamespaces: ["*"]}}]}]`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE groups { rules { matches {
				namespaces { exact: "a" } namespaces { prefix: "team-" } namespaces { suffix: "-prod" }
				not_namespaces { presence {} }
			} } }`,
		},
		{
			name: "serviceAccounts: qualified and in the policy namespace",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  rules: [{from: [{source: {serviceAccounts: ["other/api", "web"], notServiceAccounts: ["ns/batch"]}}]}]`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE groups { rules { matches {
				service_accounts { namespace: "other" serviceAccount: "api" }
				service_accounts { namespace: "ns" serviceAccount: "web" }
				not_service_accounts { namespace: "ns" serviceAccount: "batch" }
			} } }`,
		},
		{
			name: "ipBlocks: single IP, CIDR, IPv6, host bits masked",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  rules:
  - from:
    - source:
        ipBlocks: ["10.1.2.3", "10.0.0.0/8", "2001:db8::/32", "192.168.7.9/24"]
        notIpBlocks: ["10.9.0.0/16"]`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE groups { rules { matches {
				source_ips { address: "\x0a\x01\x02\x03" length: 32 }
				source_ips { address: "\x0a\x00\x00\x00" length: 8 }
				source_ips { address: "\x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00" length: 32 }
				source_ips { address: "\xc0\xa8\x07\x00" length: 24 }
				not_source_ips { address: "\x0a\x09\x00\x00" length: 16 }
			} } }`,
		},
		{
			name: "several sources are ORed: one match each",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  rules: [{from: [{source: {namespaces: [a]}}, {source: {principals: ["td/ns/b/sa/c"], ipBlocks: ["10.0.0.0/8"]}}]}]`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE groups { rules {
				matches { namespaces { exact: "a" } }
				matches { principals { exact: "td/ns/b/sa/c" } source_ips { address: "\x0a\x00\x00\x00" length: 8 } }
			} }`,
		},
	})
}

func TestTranslateOperationAndConditions(t *testing.T) {
	runTranslate(t, []translateCase{
		{
			name: "ports and notPorts",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  rules: [{to: [{operation: {ports: ["80", "8080"]}}, {operation: {notPorts: ["22"]}}]}]`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE groups { rules {
				matches { destination_ports: [80, 8080] }
				matches { not_destination_ports: 22 }
			} }`,
		},
		{
			name: "every L4 condition key, values and notValues in one match",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  rules:
  - when:
    - {key: source.ip, values: ["10.0.0.0/8"], notValues: ["10.1.0.0/16"]}
    - {key: source.namespace, values: ["a"], notValues: ["b*"]}
    - {key: source.principal, values: ["cluster.local/ns/a/sa/x"], notValues: ["*"]}
    - {key: destination.ip, values: ["10.2.3.4"], notValues: ["10.2.3.5"]}
    - {key: destination.port, values: ["443"], notValues: ["8443"]}`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE groups {
				rules { matches { source_ips { address: "\x0a\x00\x00\x00" length: 8 } not_source_ips { address: "\x0a\x01\x00\x00" length: 16 } } }
				rules { matches { namespaces { exact: "a" } not_namespaces { prefix: "b" } } }
				rules { matches { principals { exact: "cluster.local/ns/a/sa/x" } not_principals { presence {} } } }
				rules { matches { destination_ips { address: "\x0a\x02\x03\x04" length: 32 } not_destination_ips { address: "\x0a\x02\x03\x05" length: 32 } } }
				rules { matches { destination_ports: 443 not_destination_ports: 8443 } }
			}`,
		},
		{
			name:        "source.principal condition gets the trust domain rule",
			trustDomain: "example.org",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  rules: [{when: [{key: source.principal, values: ["cluster.local/ns/a/sa/x"]}]}]`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE groups { rules { matches {
				principals { exact: "example.org/ns/a/sa/x" } } } }`,
		},
		{
			name: "from, to and when are ANDed clauses; rules are ORed groups",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - from: [{source: {namespaces: [app]}}]
    to: [{operation: {ports: ["5432"]}}]
    when: [{key: source.ip, notValues: ["10.6.6.6"]}]
  - from: [{source: {principals: ["cluster.local/ns/ops/sa/admin"]}}]`,
			want: `name: "p" namespace: "ns" scope: WORKLOAD_SELECTOR
				groups {
					rules { matches { namespaces { exact: "app" } } }
					rules { matches { destination_ports: 5432 } }
					rules { matches { not_source_ips { address: "\x0a\x06\x06\x06" length: 32 } } }
				}
				groups { rules { matches { principals { exact: "cluster.local/ns/ops/sa/admin" } } } }`,
		},
	})
}

// TestTranslateL7 checks HTTP attributes, which ztunnel cannot see: an
// ALLOW rule with them is left out, a DENY rule is enforced without them.
func TestTranslateL7(t *testing.T) {
	runTranslate(t, []translateCase{
		{
			name: "allow: methods drop the rule, the policy denies all",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/ambient-demo/sa/sleep"]}}]
    to: [{operation: {methods: [GET]}}]`,
			want:         `name: "p" namespace: "ns" scope: WORKLOAD_SELECTOR`,
			wantProblems: []string{"spec.rules[0].to[0].operation.methods"},
			wantText:     []string{"ztunnel does not support HTTP attributes (found: methods)", "rules matching HTTP attributes are omitted", "waypoint"},
		},
		{
			name: "allow: only the L7 rule is dropped",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  rules:
  - to: [{operation: {paths: ["/admin"]}}]
  - from: [{source: {namespaces: [a]}}]`,
			want:         `name: "p" namespace: "ns" scope: NAMESPACE groups { rules { matches { namespaces { exact: "a" } } } }`,
			wantProblems: []string{"spec.rules[0].to[0].operation.paths"},
		},
		{
			name: "allow: every HTTP field is reported",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  rules:
  - from:
    - source: {requestPrincipals: ["iss/sub"], notRequestPrincipals: ["x/y"], remoteIpBlocks: ["1.2.3.4"], notRemoteIpBlocks: ["5.6.7.8"]}
    to:
    - operation: {hosts: [a.com], notHosts: [b.com], methods: [GET], notMethods: [POST], paths: ["/a"], notPaths: ["/b"]}
    when:
    - {key: "request.headers[x-user]", values: [alice]}
    - {key: "request.auth.claims[iss]", values: [me]}
    - {key: connection.sni, values: [x.com]}
    - {key: remote.ip, values: ["1.2.3.4"]}
    - {key: source.serviceAccount, values: ["ns/sa"]}`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE`,
			wantProblems: []string{
				"spec.rules[0].from[0].source.requestPrincipals",
				"spec.rules[0].from[0].source.notRequestPrincipals",
				"spec.rules[0].from[0].source.remoteIpBlocks",
				"spec.rules[0].from[0].source.notRemoteIpBlocks",
				"spec.rules[0].to[0].operation.hosts",
				"spec.rules[0].to[0].operation.notHosts",
				"spec.rules[0].to[0].operation.methods",
				"spec.rules[0].to[0].operation.notMethods",
				"spec.rules[0].to[0].operation.paths",
				"spec.rules[0].to[0].operation.notPaths",
				"spec.rules[0].when[0].key",
				"spec.rules[0].when[1].key",
				"spec.rules[0].when[2].key",
				"spec.rules[0].when[3].key",
				"spec.rules[0].when[4].key",
			},
			wantText: []string{"found: request.headers[x-user]", "found: connection.sni"},
		},
		{
			name: "allow: trustDomains are not supported",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  rules: [{from: [{source: {trustDomains: [example.org]}}]}]`,
			want:         `name: "p" namespace: "ns" scope: NAMESPACE`,
			wantProblems: []string{"spec.rules[0].from[0].source.trustDomains"},
			wantText:     []string{"ztunnel does not support trustDomains", "allows nothing"},
		},
		{
			name: "deny: methods only, the rule denies every connection",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]`,
			want:         `name: "p" namespace: "ns" scope: NAMESPACE action: DENY groups {}`,
			wantProblems: []string{"spec.rules[0].to[0].operation.methods"},
			wantText:     []string{"DENY policy with HTTP attributes is enforced without the HTTP rules"},
		},
		{
			name: "deny: L4 part of the rule is kept",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [untrusted]}}]
    to: [{operation: {ports: ["8080"], paths: ["/admin"]}}]
    when: [{key: "request.headers[x-debug]", values: ["1"]}]`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE action: DENY groups {
				rules { matches { namespaces { exact: "untrusted" } } }
				rules { matches { destination_ports: 8080 } }
			}`,
			wantProblems: []string{"spec.rules[0].to[0].operation.paths", "spec.rules[0].when[0].key"},
		},
		{
			name: "deny: a source that is L7 only makes the from clause match everything",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [a]}}, {source: {requestPrincipals: ["*"]}}]
    to: [{operation: {ports: ["9000"]}}]`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE action: DENY groups {
				rules { matches { destination_ports: 9000 } }
			}`,
			wantProblems: []string{"spec.rules[0].from[1].source.requestPrincipals"},
		},
		{
			name: "deny: trustDomains are ignored, the rest holds",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  action: DENY
  rules: [{from: [{source: {trustDomains: [evil.org], namespaces: [a]}}]}]`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE action: DENY groups {
				rules { matches { namespaces { exact: "a" } } }
			}`,
			wantProblems: []string{"spec.rules[0].from[0].source.trustDomains"},
			wantText:     []string{"denies more than requested"},
		},
	})
}

// TestTranslateInvalid covers what Istio's validation webhook rejects and
// Istio's translation drops silently: here each is a Problem, the ALLOW rule
// is left out and the DENY rule can only widen.
func TestTranslateInvalid(t *testing.T) {
	runTranslate(t, []translateCase{
		{
			name: "allow: a named port drops the rule",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  rules: [{to: [{operation: {ports: ["80", "http"]}}]}]`,
			want:         `name: "p" namespace: "ns" scope: NAMESPACE`,
			wantProblems: []string{"spec.rules[0].to[0].operation.ports[1]"},
			wantText:     []string{`invalid value "http"`, "allows nothing"},
		},
		{
			name: "allow: a bad notIpBlock drops the rule",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  rules: [{from: [{source: {notIpBlocks: ["10.0.0.0/33"]}}]}]`,
			want:         `name: "p" namespace: "ns" scope: NAMESPACE`,
			wantProblems: []string{"spec.rules[0].from[0].source.notIpBlocks[0]"},
		},
		{
			name: "allow: empty strings, bad service accounts, port out of range",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  rules:
  - from: [{source: {principals: [""], serviceAccounts: ["a/b/c", "*"]}}]
    to: [{operation: {notPorts: ["65536"]}}]
    when: [{key: destination.ip, values: ["fe80::1%eth0"]}]`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE`,
			wantProblems: []string{
				"spec.rules[0].from[0].source.principals[0]",
				"spec.rules[0].from[0].source.serviceAccounts[0]",
				"spec.rules[0].from[0].source.serviceAccounts[1]",
				"spec.rules[0].to[0].operation.notPorts[0]",
				"spec.rules[0].when[0].values[0]",
			},
		},
		{
			name: "allow: empty source, empty operation, empty from, condition without values",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  rules:
  - from: [{source: {}}]
  - to: [{operation: {}}]
  - when: [{key: source.ip}]
  - to: [{}]
  - from: [{source: {namespaces: [ok]}}]
  - from: []
    to: []`,
			// proto3 lists have no presence: "from: []" is no from at all.
			want: `name: "p" namespace: "ns" scope: NAMESPACE
				groups { rules { matches { namespaces { exact: "ok" } } } }
				groups {}`,
			wantProblems: []string{
				"spec.rules[0].from[0].source",
				"spec.rules[1].to[0].operation",
				"spec.rules[2].when[0]",
				"spec.rules[3].to[0].operation",
			},
		},
		{
			name: "deny: a bad value in a positive list drops the field",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  action: DENY
  rules: [{to: [{operation: {ports: ["80", "http"]}}], from: [{source: {namespaces: [a]}}]}]`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE action: DENY groups {
				rules { matches { namespaces { exact: "a" } } }
			}`,
			wantProblems: []string{"spec.rules[0].to[0].operation.ports[1]"},
			wantText:     []string{"enforced without this field"},
		},
		{
			name: "deny: a bad value in a negative list drops the value",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  action: DENY
  rules: [{to: [{operation: {notPorts: ["15021", "health"]}}]}]`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE action: DENY groups {
				rules { matches { not_destination_ports: 15021 } }
			}`,
			wantProblems: []string{"spec.rules[0].to[0].operation.notPorts[1]"},
			wantText:     []string{"The value is ignored"},
		},
		{
			name: "deny: an empty source matches every connection",
			policy: `
metadata: {name: p, namespace: ns}
spec:
  action: DENY
  rules: [{from: [{source: {}}], to: [{operation: {ports: ["22"]}}]}]`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE action: DENY groups {
				rules { matches { destination_ports: 22 } }
			}`,
			wantProblems: []string{"spec.rules[0].from[0].source"},
			wantText:     []string{"matches every connection"},
		},
	})
}

func TestTranslateDryRun(t *testing.T) {
	runTranslate(t, []translateCase{
		{
			name: "dry-run true",
			policy: `
metadata: {name: p, namespace: ns, annotations: {istio.io/dry-run: "true"}}
spec: {action: DENY, rules: [{}]}`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE action: DENY groups {} dry_run: true`,
		},
		{
			name: "dry-run false",
			policy: `
metadata: {name: p, namespace: ns, annotations: {istio.io/dry-run: "false"}}
spec: {action: DENY, rules: [{}]}`,
			want: `name: "p" namespace: "ns" scope: NAMESPACE action: DENY groups {}`,
		},
		{
			name: "dry-run that does not parse is enforced",
			policy: `
metadata: {name: p, namespace: ns, annotations: {istio.io/dry-run: "yes please"}}
spec: {action: DENY, rules: [{}]}`,
			want:         `name: "p" namespace: "ns" scope: NAMESPACE action: DENY groups {}`,
			wantProblems: []string{"metadata.annotations[istio.io/dry-run]"},
			wantText:     []string{"The policy is enforced"},
		},
	})
}

func TestTranslateNil(t *testing.T) {
	if a, p := TranslateAuthorizationPolicy(nil, root, td); a != nil || p != nil {
		t.Errorf("TranslateAuthorizationPolicy(nil) = %v, %v", a, p)
	}
}

func TestProblemString(t *testing.T) {
	p := Problem{Field: "spec.action", Message: "no"}
	if got := p.String(); got != "spec.action: no" {
		t.Errorf("String() = %q", got)
	}
}

func BenchmarkTranslateAuthorizationPolicy(b *testing.B) {
	p := authorizationPolicy(b, `
metadata: {name: p, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/frontend/sa/web", "cluster.local/ns/frontend/sa/mobile"]}
    - source: {namespaces: ["checkout"], notIpBlocks: ["10.66.0.0/16"]}
    to: [{operation: {ports: ["8080", "8443"]}}]
    when: [{key: source.ip, values: ["10.0.0.0/8"]}]
  - from: [{source: {serviceAccounts: ["ops/admin"]}}]
    to: [{operation: {methods: [GET]}}]`)
	b.ReportAllocs()
	for b.Loop() {
		a, problems := TranslateAuthorizationPolicy(p, root, td)
		if a == nil || len(problems) != 1 || !strings.Contains(problems[0].Field, "methods") {
			b.Fatal(a, problems)
		}
	}
}
