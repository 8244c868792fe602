package rbac

import (
	"net/netip"

	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/ambitmesh/ambit/api/workloadapi"
	"github.com/ambitmesh/ambit/api/workloadapi/security"
)

// Connections as in rbac.rs's tests.
var (
	plaintextConn = Conn{
		SrcIP:   netip.MustParseAddr("127.0.0.1"),
		DstIP:   netip.MustParseAddr("127.0.0.2"),
		DstPort: 8080,
	}
	tlsConn = Conn{
		SrcIdentity: "spiffe://td/ns/namespace/sa/account",
		SrcIP:       netip.MustParseAddr("127.0.0.1"),
		DstIP:       netip.MustParseAddr("127.0.0.2"),
		DstPort:     8080,
	}
	tlsConnAlt = Conn{
		SrcIdentity: "spiffe://td-alt/ns/ns-alt/sa/sa-alt",
		SrcIP:       netip.MustParseAddr("127.0.0.3"),
		DstIP:       netip.MustParseAddr("127.0.0.4"),
		DstPort:     9090,
	}
)

func exact(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Exact{Exact: s}}
}

func prefix(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Prefix{Prefix: s}}
}

func suffix(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Suffix{Suffix: s}}
}

func presence() *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}
}

func sms(ms ...*security.StringMatch) []*security.StringMatch { return ms }

func cidr(s string) *security.Address {
	p := netip.MustParsePrefix(s)
	return &security.Address{Address: p.Addr().AsSlice(), Length: uint32(p.Bits())}
}

func cidrs(ss ...string) []*security.Address {
	out := make([]*security.Address, len(ss))
	for i, s := range ss {
		out[i] = cidr(s)
	}
	return out
}

func sa(ns, name string) *security.ServiceAccountMatch {
	return &security.ServiceAccountMatch{Namespace: ns, ServiceAccount: name}
}

func grp(rules ...*security.Rules) *security.Group { return &security.Group{Rules: rules} }

func clause(ms ...*security.Match) *security.Rules { return &security.Rules{Matches: ms} }

// pol builds a policy; namespace "ns", ALLOW, GLOBAL unless changed.
func pol(name string, opts ...func(*security.Authorization)) *security.Authorization {
	a := &security.Authorization{Name: name, Namespace: "ns"}
	for _, o := range opts {
		o(a)
	}
	return a
}

func deny(a *security.Authorization)   { a.Action = security.Action_DENY }
func dryRun(a *security.Authorization) { a.DryRun = true }

func in(ns string) func(*security.Authorization) {
	return func(a *security.Authorization) { a.Namespace = ns }
}

func scope(s security.Scope) func(*security.Authorization) {
	return func(a *security.Authorization) { a.Scope = s }
}

func groups(gs ...*security.Group) func(*security.Authorization) {
	return func(a *security.Authorization) { a.Groups = gs }
}

// only is a policy with a single match in a single rule in a single group.
func only(m *security.Match) func(*security.Authorization) {
	return groups(grp(clause(m)))
}

func workload(ns string, keys ...string) *workloadapi.Workload {
	return &workloadapi.Workload{Name: "w", Namespace: ns, AuthorizationPolicies: keys}
}

// matches evaluates one GLOBAL ALLOW policy and reports whether it matched.
func matches(a *security.Authorization, c Conn) bool {
	v := NewPolicies([]*security.Authorization{a}).Evaluate(workload("ns"), c)
	return v.Reason == ReasonAllowMatched
}
