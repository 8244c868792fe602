package rbac

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/ambitmesh/ambit/api/workloadapi"
	"github.com/ambitmesh/ambit/api/workloadapi/security"
)

// realisticPolicies is 20 policies of which 5 apply to realisticWorkload:
// one GLOBAL DENY, one NAMESPACE ALLOW of its namespace, and three it
// references (two selector policies and the static STRICT policy). The rest
// belong to other namespaces or other workloads.
func realisticPolicies() []*security.Authorization {
	ps := []*security.Authorization{
		pol("deny-untrusted", in("istio-system"), deny, scope(security.Scope_GLOBAL),
			only(&security.Match{Namespaces: sms(exact("untrusted"), prefix("sandbox-"))})),
		pol("shop-from-ops", in("shop"), scope(security.Scope_NAMESPACE),
			only(&security.Match{Principals: sms(prefix("cluster.local/ns/ops/")), DestinationPorts: []uint32{9090}})),
		pol("api-from-frontend", in("shop"), scope(security.Scope_WORKLOAD_SELECTOR), groups(
			grp(
				clause(
					&security.Match{Principals: sms(exact("cluster.local/ns/frontend/sa/web"), exact("cluster.local/ns/frontend/sa/mobile"))},
					&security.Match{ServiceAccounts: []*security.ServiceAccountMatch{sa("checkout", "api")}},
				),
				clause(&security.Match{DestinationPorts: []uint32{8080, 8443}}),
			),
			grp(clause(&security.Match{SourceIps: cidrs("10.10.0.0/16"), NotSourceIps: cidrs("10.10.66.0/24")})),
		)),
		pol("api-block-legacy", in("shop"), deny, scope(security.Scope_WORKLOAD_SELECTOR),
			only(&security.Match{SourceIps: cidrs("192.168.0.0/16", "172.16.0.0/12"), NotDestinationPorts: []uint32{15021}})),
		pol("istio_converted_static_strict", in("istio-system"), deny, scope(security.Scope_WORKLOAD_SELECTOR),
			only(&security.Match{NotPrincipals: sms(presence())})),
	}
	for i := range 10 {
		ps = append(ps, pol(fmt.Sprintf("ns-policy-%d", i), in(fmt.Sprintf("team-%d", i)), scope(security.Scope_NAMESPACE),
			only(&security.Match{Namespaces: sms(exact(fmt.Sprintf("team-%d", i)))})))
	}
	for i := range 5 {
		ps = append(ps, pol(fmt.Sprintf("other-workload-%d", i), in("shop"), scope(security.Scope_WORKLOAD_SELECTOR),
			only(&security.Match{DestinationPorts: []uint32{uint32(7000 + i)}})))
	}
	return ps
}

var realisticWorkload = &workloadapi.Workload{
	Name:      "api-7d9f",
	Namespace: "shop",
	AuthorizationPolicies: []string{
		"shop/api-block-legacy",
		"shop/api-from-frontend",
		"istio-system/istio_converted_static_strict",
	},
}

var realisticConns = []struct {
	name string
	conn Conn
	want Decision
}{
	{
		name: "allowed by last allow",
		conn: Conn{
			SrcIdentity: "spiffe://cluster.local/ns/frontend/sa/mobile",
			SrcIP:       netip.MustParseAddr("10.20.1.5"),
			DstIP:       netip.MustParseAddr("10.20.3.9"),
			DstPort:     8443,
		},
		want: Decision{Allow: true, Policy: "shop/api-from-frontend", Reason: ReasonAllowMatched},
	},
	{
		name: "denied by selector deny",
		conn: Conn{
			SrcIdentity: "spiffe://cluster.local/ns/frontend/sa/web",
			SrcIP:       netip.MustParseAddr("172.20.0.1"),
			DstIP:       netip.MustParseAddr("10.20.3.9"),
			DstPort:     8080,
		},
		want: Decision{Policy: "shop/api-block-legacy", Reason: ReasonDenyMatched},
	},
	{
		name: "no allow matched",
		conn: Conn{
			SrcIdentity: "spiffe://cluster.local/ns/batch/sa/job",
			SrcIP:       netip.MustParseAddr("10.20.1.6"),
			DstIP:       netip.MustParseAddr("10.20.3.9"),
			DstPort:     8080,
		},
		want: Decision{Reason: ReasonNoAllowMatched},
	},
	{
		name: "plaintext denied by strict",
		conn: Conn{
			SrcIP:   netip.MustParseAddr("10.20.1.7"),
			DstIP:   netip.MustParseAddr("10.20.3.9"),
			DstPort: 8080,
		},
		want: Decision{Policy: "istio-system/istio_converted_static_strict", Reason: ReasonDenyMatched},
	},
}

func TestRealistic(t *testing.T) {
	p := NewPolicies(realisticPolicies())
	for _, tc := range realisticConns {
		t.Run(tc.name, func(t *testing.T) {
			if v := p.Evaluate(realisticWorkload, tc.conn); v.Decision != tc.want {
				t.Errorf("Decision = %+v, want %+v", v.Decision, tc.want)
			}
		})
	}
}

// TestEvaluateDoesNotAllocate pins the hot path at zero allocations.
func TestEvaluateDoesNotAllocate(t *testing.T) {
	withDryRun := realisticPolicies()
	withDryRun = append(withDryRun, pol("dry", in("shop"), dryRun, deny, scope(security.Scope_NAMESPACE),
		only(&security.Match{Namespaces: sms(exact("frontend"))})))
	sets := map[string]*Policies{
		"enforced only": NewPolicies(realisticPolicies()),
		"with dry-run":  NewPolicies(withDryRun),
	}
	for name, p := range sets {
		for _, tc := range realisticConns {
			t.Run(name+"/"+tc.name, func(t *testing.T) {
				allocs := testing.AllocsPerRun(100, func() {
					_ = p.Evaluate(realisticWorkload, tc.conn)
				})
				if allocs != 0 {
					t.Errorf("Evaluate allocates %v times per call, want 0", allocs)
				}
			})
		}
	}
}

func BenchmarkEvaluate(b *testing.B) {
	p := NewPolicies(realisticPolicies())
	for _, tc := range realisticConns {
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				_ = p.Evaluate(realisticWorkload, tc.conn)
			}
		})
	}
	b.Run("no policies", func(b *testing.B) {
		empty := NewPolicies(nil)
		b.ReportAllocs()
		for b.Loop() {
			_ = empty.Evaluate(realisticWorkload, realisticConns[0].conn)
		}
	})
}

func BenchmarkNewPolicies(b *testing.B) {
	auths := realisticPolicies()
	b.ReportAllocs()
	for b.Loop() {
		_ = NewPolicies(auths)
	}
}
