package rbac

import (
	"net/netip"
	"strings"
	"testing"

	"google.golang.org/protobuf/types/known/anypb"

	"github.com/ambitmesh/ambit/api/workloadapi"
	"github.com/ambitmesh/ambit/api/workloadapi/security"
)

// TestMatchFields checks every Match field and its not-form against the
// three connections of rbac.rs's rbac_test! cases, with the same outcomes.
func TestMatchFields(t *testing.T) {
	tests := []struct {
		name                  string
		match                 *security.Match
		plaintext, tls, alter bool
	}{
		{"namespaces", &security.Match{Namespaces: sms(exact("namespace"))}, false, true, false},
		{"not_namespaces", &security.Match{NotNamespaces: sms(exact("namespace"))}, true, false, true},
		{"service_accounts", &security.Match{ServiceAccounts: []*security.ServiceAccountMatch{sa("namespace", "account")}}, false, true, false},
		{"not_service_accounts", &security.Match{NotServiceAccounts: []*security.ServiceAccountMatch{sa("namespace", "account")}}, true, false, true},
		{"principals", &security.Match{Principals: sms(exact("td/ns/namespace/sa/account"))}, false, true, false},
		{"not_principals", &security.Match{NotPrincipals: sms(exact("td/ns/namespace/sa/account"))}, true, false, true},
		{"source_ips", &security.Match{SourceIps: cidrs("127.0.0.1/32")}, true, true, false},
		{"not_source_ips", &security.Match{NotSourceIps: cidrs("127.0.0.1/32")}, false, false, true},
		{"destination_ips", &security.Match{DestinationIps: cidrs("127.0.0.2/32")}, true, true, false},
		{"not_destination_ips", &security.Match{NotDestinationIps: cidrs("127.0.0.2/32")}, false, false, true},
		{"destination_ips cidr_range", &security.Match{DestinationIps: cidrs("127.0.0.1/24")}, true, true, true},
		{"destination_ports", &security.Match{DestinationPorts: []uint32{8080}}, true, true, false},
		{"not_destination_ports", &security.Match{NotDestinationPorts: []uint32{8080}}, false, false, true},
		{"positive and negative of one type are ANDed", &security.Match{
			SourceIps: cidrs("127.0.0.0/8"), NotSourceIps: cidrs("127.0.0.3/32"),
		}, true, true, false},
		{"values of one type are ORed", &security.Match{DestinationPorts: []uint32{8080, 9090}}, true, true, true},
		{"not values of one type exclude each", &security.Match{NotDestinationPorts: []uint32{8080, 9090}}, false, false, false},
		{"types are ANDed", &security.Match{
			Namespaces: sms(exact("namespace")), DestinationPorts: []uint32{9090},
		}, false, false, false},
		{"types are ANDed, all hold", &security.Match{
			Namespaces: sms(exact("namespace")), DestinationPorts: []uint32{8080}, SourceIps: cidrs("127.0.0.1/32"),
		}, false, true, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := pol(tc.name, only(tc.match))
			for _, c := range []struct {
				name string
				conn Conn
				want bool
			}{{"plaintext", plaintextConn, tc.plaintext}, {"tls", tlsConn, tc.tls}, {"tls alt", tlsConnAlt, tc.alter}} {
				if got := matches(a, c.conn); got != c.want {
					t.Errorf("%s: matches = %v, want %v", c.name, got, c.want)
				}
			}
		})
	}
}

// TestStringMatch follows rbac.rs's string_match cases, on namespaces, and
// checks the principal rules: compared without "spiffe://", never matching
// without it.
func TestStringMatch(t *testing.T) {
	tests := []struct {
		name  string
		match *security.StringMatch
		value string
		want  bool
	}{
		{"exact match", exact("foo"), "foo", true},
		{"exact mismatch", exact("foo"), "not", false},
		{"prefix match", prefix("foo"), "foobar", true},
		{"prefix mismatch", prefix("foo"), "notfoo", false},
		{"suffix match", suffix("foo"), "barfoo", true},
		{"suffix mismatch", suffix("foo"), "foonot", false},
		{"presence match", presence(), "foo", true},
	}
	for _, tc := range tests {
		t.Run("namespace "+tc.name, func(t *testing.T) {
			c := tlsConn
			c.SrcIdentity = "spiffe://td/ns/" + tc.value + "/sa/x"
			if got := matches(pol("p", only(&security.Match{Namespaces: sms(tc.match)})), c); got != tc.want {
				t.Errorf("matches = %v, want %v", got, tc.want)
			}
		})
	}
	t.Run("namespace of plaintext is empty", func(t *testing.T) {
		for _, m := range []*security.StringMatch{exact("foo"), prefix("foo"), suffix("foo"), presence()} {
			if matches(pol("p", only(&security.Match{Namespaces: sms(m)})), plaintextConn) {
				t.Errorf("%v matched a plaintext connection", m)
			}
		}
	})

	principals := []struct {
		name     string
		match    *security.StringMatch
		identity string
		want     bool
	}{
		{"exact", exact("td/ns/a/sa/b"), "spiffe://td/ns/a/sa/b", true},
		{"exact needs the whole identity", exact("td/ns/a/sa/b"), "spiffe://td/ns/a/sa/bc", false},
		{"exact with spiffe prefix never matches", exact("spiffe://td/ns/a/sa/b"), "spiffe://td/ns/a/sa/b", false},
		{"prefix namespace wildcard", prefix("td/ns/a/"), "spiffe://td/ns/a/sa/b", true},
		{"prefix other namespace", prefix("td/ns/a/"), "spiffe://td/ns/ab/sa/b", false},
		{"suffix trust domain wildcard", suffix("/ns/a/sa/b"), "spiffe://other.td/ns/a/sa/b", true},
		{"suffix mismatch", suffix("/ns/a/sa/b"), "spiffe://td/ns/a/sa/c", false},
		{"presence with identity", presence(), "spiffe://td/ns/a/sa/b", true},
		{"presence plaintext", presence(), "", false},
		{"prefix empty string plaintext", prefix(""), "", false},
		{"exact empty string plaintext", exact(""), "", false},
		{"presence without spiffe scheme", presence(), "td/ns/a/sa/b", false},
		{"malformed spiffe id still has a principal", exact("td/foo"), "spiffe://td/foo", true},
	}
	for _, tc := range principals {
		t.Run("principal "+tc.name, func(t *testing.T) {
			c := tlsConn
			c.SrcIdentity = tc.identity
			if got := matches(pol("p", only(&security.Match{Principals: sms(tc.match)})), c); got != tc.want {
				t.Errorf("principals: matches = %v, want %v", got, tc.want)
			}
			// A not_principals match is the complement only when there is a
			// principal; without one both forms fail to find a value, so
			// not_principals matches.
			wantNot := !tc.want
			if got := matches(pol("p", only(&security.Match{NotPrincipals: sms(tc.match)})), c); got != wantNot {
				t.Errorf("not_principals: matches = %v, want %v", got, wantNot)
			}
		})
	}
}

func TestServiceAccounts(t *testing.T) {
	tests := []struct {
		name     string
		match    *security.ServiceAccountMatch
		identity string
		want     bool
	}{
		{"same namespace and account", sa("a", "b"), "spiffe://td/ns/a/sa/b", true},
		{"any trust domain", sa("a", "b"), "spiffe://other/ns/a/sa/b", true},
		{"other account", sa("a", "b"), "spiffe://td/ns/a/sa/c", false},
		{"other namespace", sa("a", "b"), "spiffe://td/ns/c/sa/b", false},
		{"plaintext", sa("a", "b"), "", false},
		{"malformed identity", sa("a", "b"), "spiffe://td/ns/a/sa/b/extra", false},
		{"no ns marker", sa("a", "b"), "spiffe://td/a/sa/b", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := tlsConn
			c.SrcIdentity = tc.identity
			m := []*security.ServiceAccountMatch{tc.match}
			if got := matches(pol("p", only(&security.Match{ServiceAccounts: m})), c); got != tc.want {
				t.Errorf("service_accounts: matches = %v, want %v", got, tc.want)
			}
			if got := matches(pol("p", only(&security.Match{NotServiceAccounts: m})), c); got == tc.want {
				t.Errorf("not_service_accounts: matches = %v, want %v", got, !tc.want)
			}
		})
	}
}

func TestCIDR(t *testing.T) {
	tests := []struct {
		name   string
		block  *security.Address
		src    string
		wantIn bool
	}{
		{"/32 same", cidr("10.1.2.3/32"), "10.1.2.3", true},
		{"/32 next", cidr("10.1.2.3/32"), "10.1.2.4", false},
		{"/31 low", cidr("10.1.2.2/31"), "10.1.2.2", true},
		{"/31 high", cidr("10.1.2.2/31"), "10.1.2.3", true},
		{"/31 out", cidr("10.1.2.2/31"), "10.1.2.4", false},
		{"/24 in", cidr("10.1.2.0/24"), "10.1.2.255", true},
		{"/24 out", cidr("10.1.2.0/24"), "10.1.3.0", false},
		{"/20 in", cidr("10.1.0.0/20"), "10.1.15.1", true},
		{"/20 out", cidr("10.1.0.0/20"), "10.1.16.1", false},
		{"/16 in", cidr("10.1.0.0/16"), "10.1.200.7", true},
		{"/8 in", cidr("10.0.0.0/8"), "10.255.255.255", true},
		{"/8 out", cidr("10.0.0.0/8"), "11.0.0.0", false},
		{"/0 matches any IPv4", cidr("0.0.0.0/0"), "192.0.2.1", true},
		{"/0 IPv4 does not match IPv6", cidr("0.0.0.0/0"), "2001:db8::1", false},
		{"host bits set are masked", &security.Address{Address: []byte{10, 1, 2, 99}, Length: 24}, "10.1.2.1", true},
		{"IPv6 /64 in", cidr("2001:db8:1::/64"), "2001:db8:1::42", true},
		{"IPv6 /64 out", cidr("2001:db8:1::/64"), "2001:db8:2::42", false},
		{"IPv6 /128", cidr("2001:db8::1/128"), "2001:db8::1", true},
		{"IPv6 block does not match IPv4", cidr("::/0"), "10.0.0.1", false},
		{"IPv4-mapped client matches IPv4 block", cidr("10.0.0.0/8"), "::ffff:10.1.2.3", true},
		{"IPv4-mapped block matches IPv4 client", cidr("::ffff:10.0.0.0/104"), "10.1.2.3", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := tlsConn
			c.SrcIP = netip.MustParseAddr(tc.src)
			c.DstIP = c.SrcIP
			blocks := []*security.Address{tc.block}
			for _, f := range []struct {
				name string
				m    *security.Match
				want bool
			}{
				{"source_ips", &security.Match{SourceIps: blocks}, tc.wantIn},
				{"not_source_ips", &security.Match{NotSourceIps: blocks}, !tc.wantIn},
				{"destination_ips", &security.Match{DestinationIps: blocks}, tc.wantIn},
				{"not_destination_ips", &security.Match{NotDestinationIps: blocks}, !tc.wantIn},
			} {
				if got := matches(pol("p", only(f.m)), c); got != f.want {
					t.Errorf("%s: matches = %v, want %v", f.name, got, f.want)
				}
			}
		})
	}
}

func TestPorts(t *testing.T) {
	tests := []struct {
		name    string
		ports   []uint32
		notPort []uint32
		port    uint16
		want    bool
	}{
		{"listed", []uint32{80, 443}, nil, 443, true},
		{"not listed", []uint32{80, 443}, nil, 8443, false},
		{"excluded", nil, []uint32{22}, 22, false},
		{"not excluded", nil, []uint32{22}, 2222, true},
		{"listed and excluded", []uint32{80}, []uint32{80}, 80, false},
		{"highest port", []uint32{65535}, nil, 65535, true},
		{"port 0 only matches 0", []uint32{0}, nil, 1, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := tlsConn
			c.DstPort = tc.port
			m := &security.Match{DestinationPorts: tc.ports, NotDestinationPorts: tc.notPort}
			if got := matches(pol("p", only(m)), c); got != tc.want {
				t.Errorf("matches = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestStructure pins how groups, rules and matches combine, including the
// empty cases of rbac.rs's rbac_empty_policy test.
func TestStructure(t *testing.T) {
	nsA := &security.Match{Namespaces: sms(exact("a"))}
	nsB := &security.Match{Namespaces: sms(exact("b"))}
	port80 := &security.Match{DestinationPorts: []uint32{80}}
	from := func(ns string, port uint16) Conn {
		c := tlsConn
		c.SrcIdentity = "spiffe://td/ns/" + ns + "/sa/account"
		c.DstPort = port
		return c
	}
	tests := []struct {
		name   string
		groups []*security.Group
		conn   Conn
		want   bool
	}{
		{"no groups never matches", nil, plaintextConn, false},
		{"group without rules matches everything", []*security.Group{grp()}, plaintextConn, true},
		{"rule without matches matches everything", []*security.Group{grp(clause())}, plaintextConn, true},
		{"empty match never matches", []*security.Group{grp(clause(&security.Match{}))}, plaintextConn, false},
		{"empty match is skipped, not the clause", []*security.Group{grp(clause(&security.Match{}, nsA))}, from("a", 1), true},
		{"nesting: first match of clause", []*security.Group{grp(clause(nsA, nsB), clause(port80))}, from("a", 80), true},
		{"nesting: second match of clause", []*security.Group{grp(clause(nsA, nsB), clause(port80))}, from("b", 80), true},
		{"nesting: wrong namespace", []*security.Group{grp(clause(nsA, nsB), clause(port80))}, from("bad", 80), false},
		{"nesting: wrong port", []*security.Group{grp(clause(nsA, nsB), clause(port80))}, from("b", 12345), false},
		{"clauses are ANDed with an empty clause", []*security.Group{grp(clause(), clause(nsA))}, from("b", 80), false},
		{"multi group: first", []*security.Group{grp(clause(nsA)), grp(clause(nsB))}, from("a", 1), true},
		{"multi group: second", []*security.Group{grp(clause(nsA)), grp(clause(nsB))}, from("b", 1), true},
		{"multi group: none", []*security.Group{grp(clause(nsA)), grp(clause(nsB))}, from("bad", 1), false},
		{"empty group after non-matching group", []*security.Group{grp(clause(nsA)), grp()}, from("bad", 1), true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := matches(pol("p", groups(tc.groups...)), tc.conn); got != tc.want {
				t.Errorf("matches = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestEvaluatePrecedence(t *testing.T) {
	fromA := &security.Match{Namespaces: sms(exact("a"))}
	c := tlsConn
	c.SrcIdentity = "spiffe://td/ns/a/sa/x"
	other := tlsConn
	other.SrcIdentity = "spiffe://td/ns/b/sa/x"

	tests := []struct {
		name     string
		policies []*security.Authorization
		conn     Conn
		want     Decision
		wantDry  Decision
	}{
		{
			name: "no policy allows",
			conn: c,
			want: Decision{Allow: true, Reason: ReasonNoAllowPolicy},
		},
		{
			name:     "matching deny denies",
			policies: []*security.Authorization{pol("d", deny, only(fromA))},
			conn:     c,
			want:     Decision{Policy: "ns/d", Reason: ReasonDenyMatched},
		},
		{
			name:     "non-matching deny and no allow allows",
			policies: []*security.Authorization{pol("d", deny, only(fromA))},
			conn:     other,
			want:     Decision{Allow: true, Reason: ReasonNoAllowPolicy},
		},
		{
			name:     "matching allow allows",
			policies: []*security.Authorization{pol("a", only(fromA))},
			conn:     c,
			want:     Decision{Allow: true, Policy: "ns/a", Reason: ReasonAllowMatched},
		},
		{
			name:     "allow applies and none matches denies",
			policies: []*security.Authorization{pol("a", only(fromA))},
			conn:     other,
			want:     Decision{Reason: ReasonNoAllowMatched},
		},
		{
			name:     "deny beats a matching allow",
			policies: []*security.Authorization{pol("a", only(fromA)), pol("d", deny, only(fromA))},
			conn:     c,
			want:     Decision{Policy: "ns/d", Reason: ReasonDenyMatched},
		},
		{
			name:     "one of several allows matching is enough",
			policies: []*security.Authorization{pol("a1", only(&security.Match{Namespaces: sms(exact("z"))})), pol("a2", only(fromA))},
			conn:     c,
			want:     Decision{Allow: true, Policy: "ns/a2", Reason: ReasonAllowMatched},
		},
		{
			name:     "empty allow policy denies everything",
			policies: []*security.Authorization{pol("empty")},
			conn:     c,
			want:     Decision{Reason: ReasonNoAllowMatched},
		},
		{
			name:     "allow with an empty group allows everything",
			policies: []*security.Authorization{pol("all", groups(grp()))},
			conn:     plaintextConn,
			want:     Decision{Allow: true, Policy: "ns/all", Reason: ReasonAllowMatched},
		},
		{
			name:     "deny with an empty group denies everything",
			policies: []*security.Authorization{pol("all", deny, groups(grp())), pol("a", only(fromA))},
			conn:     c,
			want:     Decision{Policy: "ns/all", Reason: ReasonDenyMatched},
		},
		{
			name:     "empty deny policy never denies",
			policies: []*security.Authorization{pol("d", deny)},
			conn:     c,
			want:     Decision{Allow: true, Reason: ReasonNoAllowPolicy},
		},
		{
			name:     "dry-run deny does not deny",
			policies: []*security.Authorization{pol("d", deny, dryRun, only(fromA))},
			conn:     c,
			want:     Decision{Allow: true, Reason: ReasonNoAllowPolicy},
			wantDry:  Decision{Policy: "ns/d", Reason: ReasonDenyMatched},
		},
		{
			name:     "dry-run allow does not make allow policies apply",
			policies: []*security.Authorization{pol("a", dryRun, only(fromA))},
			conn:     other,
			want:     Decision{Allow: true, Reason: ReasonNoAllowPolicy},
			wantDry:  Decision{Reason: ReasonNoAllowMatched},
		},
		{
			name:     "dry-run allow does not rescue a denied connection",
			policies: []*security.Authorization{pol("a", only(fromA)), pol("dry", dryRun, groups(grp()))},
			conn:     other,
			want:     Decision{Reason: ReasonNoAllowMatched},
			wantDry:  Decision{Allow: true, Policy: "ns/dry", Reason: ReasonAllowMatched},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			v := NewPolicies(tc.policies).Evaluate(workload("ns"), tc.conn)
			if v.Decision != tc.want {
				t.Errorf("Decision = %+v, want %+v", v.Decision, tc.want)
			}
			wantDry := tc.wantDry
			if wantDry == (Decision{}) {
				wantDry = Decision{Allow: true, Reason: ReasonNoAllowPolicy}
			}
			if v.DryRun != wantDry {
				t.Errorf("DryRun = %+v, want %+v", v.DryRun, wantDry)
			}
		})
	}
}

// TestScope checks which policies apply to which workload (ztunnel's
// assert_rbac): GLOBAL everywhere, NAMESPACE in its namespace,
// WORKLOAD_SELECTOR only where referenced. Each policy is an empty ALLOW,
// so "applies" shows as a denial.
func TestScope(t *testing.T) {
	policies := NewPolicies([]*security.Authorization{
		pol("mesh", in("istio-system"), scope(security.Scope_GLOBAL)),
		pol("ns-wide", in("a"), scope(security.Scope_NAMESPACE)),
		pol("selected", in("a"), scope(security.Scope_WORKLOAD_SELECTOR)),
		pol("root-selected", in("istio-system"), scope(security.Scope_WORKLOAD_SELECTOR)),
	})
	globalOnly := NewPolicies([]*security.Authorization{pol("mesh", in("istio-system"), scope(security.Scope_GLOBAL))})
	nsOnly := NewPolicies([]*security.Authorization{pol("ns-wide", in("a"), scope(security.Scope_NAMESPACE))})
	selOnly := NewPolicies([]*security.Authorization{pol("selected", in("a"), scope(security.Scope_WORKLOAD_SELECTOR))})

	tests := []struct {
		name        string
		policies    *Policies
		w           *workloadapi.Workload
		wantAllow   bool
		wantMissing int
	}{
		{"global applies in any namespace", globalOnly, workload("z"), false, 0},
		{"global applies in its own namespace", globalOnly, workload("istio-system"), false, 0},
		{"namespace policy applies in its namespace", nsOnly, workload("a"), false, 0},
		{"namespace policy does not apply elsewhere", nsOnly, workload("b"), true, 0},
		{"selector policy does not apply unreferenced", selOnly, workload("a"), true, 0},
		{"selector policy applies when referenced", selOnly, workload("a", "a/selected"), false, 0},
		{"referenced key applies across namespaces, as in ztunnel", selOnly, workload("b", "a/selected"), false, 0},
		{"unknown key is skipped and counted", selOnly, workload("a", "a/gone"), true, 1},
		{"root selector policy referenced from another namespace", policies, workload("b", "istio-system/root-selected"), false, 0},
		{"no policies, nil set", nil, workload("a"), true, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			v := tc.policies.Evaluate(tc.w, tlsConn)
			if v.Allow != tc.wantAllow {
				t.Errorf("Allow = %v (%v), want %v", v.Allow, v.Reason, tc.wantAllow)
			}
			if v.MissingPolicies != tc.wantMissing {
				t.Errorf("MissingPolicies = %d, want %d", v.MissingPolicies, tc.wantMissing)
			}
		})
	}
}

// TestScopeOrder pins which DENY is reported when several match: namespace,
// then global, then workload, as ztunnel chains them.
func TestScopeOrder(t *testing.T) {
	all := groups(grp())
	p := NewPolicies([]*security.Authorization{
		pol("w", deny, all, in("a"), scope(security.Scope_WORKLOAD_SELECTOR)),
		pol("g", deny, all, in("istio-system"), scope(security.Scope_GLOBAL)),
		pol("n", deny, all, in("a"), scope(security.Scope_NAMESPACE)),
	})
	if v := p.Evaluate(workload("a", "a/w"), tlsConn); v.Policy != "a/n" {
		t.Errorf("Policy = %q, want a/n", v.Policy)
	}
	if v := p.Evaluate(workload("b", "a/w"), tlsConn); v.Policy != "istio-system/g" {
		t.Errorf("Policy = %q, want istio-system/g", v.Policy)
	}
}

// TestPeerAuthentication evaluates the policies the controller derives from
// PeerAuthentication (see controller/authz): STRICT denies connections
// without a principal, and a merged port-level policy exempts ports.
func TestPeerAuthentication(t *testing.T) {
	noPrincipal := sms(presence())
	strict := pol("istio_converted_static_strict", in("istio-system"), deny,
		scope(security.Scope_WORKLOAD_SELECTOR), only(&security.Match{NotPrincipals: noPrincipal}))
	strictExcept8080 := pol("converted_peer_authentication_p", in("a"), deny,
		scope(security.Scope_WORKLOAD_SELECTOR),
		only(&security.Match{NotPrincipals: noPrincipal, NotDestinationPorts: []uint32{8080}}))
	strictOn9090 := pol("converted_peer_authentication_q", in("a"), deny,
		scope(security.Scope_WORKLOAD_SELECTOR),
		only(&security.Match{NotPrincipals: noPrincipal, DestinationPorts: []uint32{9090}}))
	p := NewPolicies([]*security.Authorization{strict, strictExcept8080, strictOn9090})

	port := func(c Conn, port uint16) Conn { c.DstPort = port; return c }
	tests := []struct {
		name string
		w    *workloadapi.Workload
		conn Conn
		want bool
	}{
		{"strict: plaintext denied", workload("a", "istio-system/istio_converted_static_strict"), plaintextConn, false},
		{"strict: mTLS allowed", workload("a", "istio-system/istio_converted_static_strict"), tlsConn, true},
		{"strict: mTLS from another trust domain allowed", workload("a", "istio-system/istio_converted_static_strict"), tlsConnAlt, true},
		{"not referenced: plaintext allowed", workload("a"), plaintextConn, true},
		{"strict except 8080: plaintext on 8080 allowed", workload("a", "a/converted_peer_authentication_p"), port(plaintextConn, 8080), true},
		{"strict except 8080: plaintext on 9090 denied", workload("a", "a/converted_peer_authentication_p"), port(plaintextConn, 9090), false},
		{"strict except 8080: mTLS on 9090 allowed", workload("a", "a/converted_peer_authentication_p"), port(tlsConn, 9090), true},
		{"permissive, strict on 9090: plaintext on 9090 denied", workload("a", "a/converted_peer_authentication_q"), port(plaintextConn, 9090), false},
		{"permissive, strict on 9090: plaintext on 8080 allowed", workload("a", "a/converted_peer_authentication_q"), port(plaintextConn, 8080), true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if v := p.Evaluate(tc.w, tc.conn); v.Allow != tc.want {
				t.Errorf("Allow = %v (%v %s), want %v", v.Allow, v.Reason, v.Policy, tc.want)
			}
		})
	}
}

// TestFailClosed checks what rbac.rs silently drops or cannot know: an
// ALLOW match never allows, a DENY match denies more.
func TestFailClosed(t *testing.T) {
	bad := &security.Address{Address: []byte{10, 0, 0}, Length: 24}
	tooLong := &security.Address{Address: []byte{10, 0, 0, 0}, Length: 33}
	untyped := &security.StringMatch{}
	ext := []*workloadapi.Extension{{Name: "future", Config: &anypb.Any{}}}

	tests := []struct {
		name   string
		policy *security.Authorization
		conn   Conn
		want   Decision
	}{
		{
			name:   "allow: bad address never allows",
			policy: pol("p", only(&security.Match{SourceIps: []*security.Address{cidr("127.0.0.0/8"), bad}})),
			conn:   tlsConn,
			want:   Decision{Reason: ReasonNoAllowMatched},
		},
		{
			name:   "allow: prefix longer than the address never allows",
			policy: pol("p", only(&security.Match{NotSourceIps: []*security.Address{tooLong}})),
			conn:   tlsConn,
			want:   Decision{Reason: ReasonNoAllowMatched},
		},
		{
			name:   "allow: port out of range never allows (rbac.rs would truncate 65616 to 80)",
			policy: pol("p", only(&security.Match{DestinationPorts: []uint32{65616}})),
			conn:   func() Conn { c := tlsConn; c.DstPort = 80; return c }(),
			want:   Decision{Reason: ReasonNoAllowMatched},
		},
		{
			name:   "allow: untyped string match never allows",
			policy: pol("p", only(&security.Match{NotPrincipals: sms(untyped)})),
			conn:   tlsConn,
			want:   Decision{Reason: ReasonNoAllowMatched},
		},
		{
			name:   "allow: match extension never allows",
			policy: pol("p", only(&security.Match{Extensions: ext})),
			conn:   tlsConn,
			want:   Decision{Reason: ReasonNoAllowMatched},
		},
		{
			name:   "allow: policy extension never allows",
			policy: func() *security.Authorization { a := pol("p", groups(grp())); a.Extensions = ext; return a }(),
			conn:   tlsConn,
			want:   Decision{Reason: ReasonNoAllowMatched},
		},
		{
			name:   "deny: bad address in a positive list drops the field",
			policy: pol("p", deny, only(&security.Match{SourceIps: []*security.Address{cidr("10.0.0.0/8"), bad}})),
			conn:   tlsConn,
			want:   Decision{Policy: "ns/p", Reason: ReasonDenyMatched},
		},
		{
			name: "deny: bad address in a negative list drops the value only",
			policy: pol("p", deny, only(&security.Match{
				NotSourceIps: []*security.Address{cidr("127.0.0.1/32"), bad},
			})),
			conn: tlsConn,
			want: Decision{Allow: true, Reason: ReasonNoAllowPolicy},
		},
		{
			name:   "deny: port out of range drops the field and keeps the rest",
			policy: pol("p", deny, only(&security.Match{DestinationPorts: []uint32{70000}, Namespaces: sms(exact("namespace"))})),
			conn:   tlsConn,
			want:   Decision{Policy: "ns/p", Reason: ReasonDenyMatched},
		},
		{
			name:   "deny: the rest of the match still has to hold",
			policy: pol("p", deny, only(&security.Match{DestinationPorts: []uint32{70000}, Namespaces: sms(exact("other"))})),
			conn:   tlsConn,
			want:   Decision{Allow: true, Reason: ReasonNoAllowPolicy},
		},
		{
			name:   "deny: match extension is ignored, the match holds",
			policy: pol("p", deny, only(&security.Match{Extensions: ext})),
			conn:   tlsConn,
			want:   Decision{Policy: "ns/p", Reason: ReasonDenyMatched},
		},
		{
			name:   "unknown action is enforced as deny",
			policy: func() *security.Authorization { a := pol("p", groups(grp())); a.Action = 7; return a }(),
			conn:   tlsConn,
			want:   Decision{Policy: "ns/p", Reason: ReasonDenyMatched},
		},
		{
			name:   "unknown scope applies only where referenced",
			policy: pol("p", deny, groups(grp()), scope(9)),
			conn:   tlsConn,
			want:   Decision{Allow: true, Reason: ReasonNoAllowPolicy},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := NewPolicies([]*security.Authorization{tc.policy})
			if v := p.Evaluate(workload("ns"), tc.conn); v.Decision != tc.want {
				t.Errorf("Decision = %+v, want %+v", v.Decision, tc.want)
			}
			if len(p.Warnings()) == 0 {
				t.Errorf("no warning")
			}
			for _, w := range p.Warnings() {
				if !strings.HasPrefix(w, "policy ns/p: ") {
					t.Errorf("warning %q does not name the policy", w)
				}
			}
		})
	}
}

func TestNewPolicies(t *testing.T) {
	t.Run("later duplicate replaces earlier", func(t *testing.T) {
		p := NewPolicies([]*security.Authorization{
			pol("p", deny, groups(grp()), scope(security.Scope_NAMESPACE)),
			pol("p", groups(grp()), scope(security.Scope_NAMESPACE)),
		})
		if p.Len() != 1 {
			t.Fatalf("Len = %d, want 1", p.Len())
		}
		if v := p.Evaluate(workload("ns"), tlsConn); v.Decision != (Decision{Allow: true, Policy: "ns/p", Reason: ReasonAllowMatched}) {
			t.Errorf("Decision = %+v", v.Decision)
		}
	})
	t.Run("nil entries are ignored", func(t *testing.T) {
		if p := NewPolicies([]*security.Authorization{nil}); p.Len() != 0 {
			t.Errorf("Len = %d", p.Len())
		}
	})
	t.Run("valid policies have no warnings", func(t *testing.T) {
		p := NewPolicies(realisticPolicies())
		if w := p.Warnings(); len(w) != 0 {
			t.Errorf("Warnings = %q", w)
		}
	})
	t.Run("nil workload is denied", func(t *testing.T) {
		if v := NewPolicies(nil).Evaluate(nil, tlsConn); v.Allow || v.Reason != ReasonNoWorkload {
			t.Errorf("Verdict = %+v", v)
		}
	})
}

func TestReasonString(t *testing.T) {
	for r := Reason(0); r <= ReasonNoWorkload+1; r++ {
		if r.String() == "" {
			t.Errorf("Reason(%d) has no text", r)
		}
	}
}
