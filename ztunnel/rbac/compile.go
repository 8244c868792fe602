package rbac

import (
	"fmt"
	"net/netip"

	"github.com/ambitmesh/ambit/api/workloadapi/security"
)

// policy is a compiled Authorization.
type policy struct {
	key       string
	namespace string
	scope     security.Scope
	deny      bool
	dryRun    bool
	// never is set for an ALLOW policy that cannot be evaluated as written
	// (unknown extensions): it applies, and never allows.
	never  bool
	groups []group

	warnings []string // moved to Policies.warnings by NewPolicies
}

// group is a security.Group: its rules are ANDed.
type group struct{ rules []rule }

// rule is a security.Rules ("clause" in rbac.rs): its matches are ORed.
type rule struct{ matches []match }

// match is a security.Match: every field that is set must match.
type match struct {
	// skip makes the match never match: rbac.rs skips a match with no field
	// set ("empty clause"), and an ALLOW match that cannot be evaluated as
	// written never matches (fail closed).
	skip bool

	namespaces, notNamespaces           []stringMatch
	serviceAccounts, notServiceAccounts []saMatch
	principals, notPrincipals           []stringMatch
	srcIPs, notSrcIPs                   []netip.Prefix
	dstIPs, notDstIPs                   []netip.Prefix
	ports, notPorts                     []uint16
}

type matchKind uint8

const (
	matchExact matchKind = iota
	matchPrefix
	matchSuffix
	matchPresence
)

type stringMatch struct {
	kind matchKind
	s    string
}

type saMatch struct {
	namespace, serviceAccount string
}

// compiler compiles one Authorization and collects its warnings.
type compiler struct {
	pol *policy
}

func (c *compiler) warn(path, msg string) {
	c.pol.warnings = append(c.pol.warnings, fmt.Sprintf("policy %s: %s: %s", c.pol.key, path, msg))
}

func compile(a *security.Authorization) *policy {
	pol := &policy{
		key:       key(a),
		namespace: a.GetNamespace(),
		scope:     a.GetScope(),
		dryRun:    a.GetDryRun(),
	}
	c := &compiler{pol: pol}

	switch a.GetAction() {
	case security.Action_ALLOW:
	case security.Action_DENY:
		pol.deny = true
	default:
		// ztunnel rejects the resource. Treating an action it cannot know as
		// DENY keeps a referenced policy from silently widening access.
		pol.deny = true
		c.warn("action", fmt.Sprintf("unknown action %d, enforced as DENY", a.GetAction()))
	}
	switch a.GetScope() {
	case security.Scope_GLOBAL, security.Scope_NAMESPACE, security.Scope_WORKLOAD_SELECTOR:
	default:
		pol.scope = security.Scope_WORKLOAD_SELECTOR
		c.warn("scope", fmt.Sprintf("unknown scope %d, applied only to workloads that reference it", a.GetScope()))
	}
	if n := len(a.GetExtensions()); n > 0 {
		if pol.deny {
			c.warn("extensions", fmt.Sprintf("%d unknown extensions ignored; the DENY policy is evaluated without them", n))
		} else {
			pol.never = true
			c.warn("extensions", fmt.Sprintf("%d unknown extensions; the ALLOW policy never allows", n))
		}
	}

	pol.groups = make([]group, 0, len(a.GetGroups()))
	for gi, g := range a.GetGroups() {
		cg := group{rules: make([]rule, 0, len(g.GetRules()))}
		for ri, r := range g.GetRules() {
			cr := rule{matches: make([]match, 0, len(r.GetMatches()))}
			for mi, m := range r.GetMatches() {
				cr.matches = append(cr.matches, c.match(fmt.Sprintf("groups[%d].rules[%d].matches[%d]", gi, ri, mi), m))
			}
			cg.rules = append(cg.rules, cr)
		}
		pol.groups = append(pol.groups, cg)
	}
	return pol
}

// field carries what converting one list needs.
type field struct {
	c        *compiler
	path     string
	negative bool
	out      *match
}

func (c *compiler) match(path string, m *security.Match) match {
	var out match
	written := len(m.GetNamespaces())+len(m.GetNotNamespaces())+
		len(m.GetServiceAccounts())+len(m.GetNotServiceAccounts())+
		len(m.GetPrincipals())+len(m.GetNotPrincipals())+
		len(m.GetSourceIps())+len(m.GetNotSourceIps())+
		len(m.GetDestinationIps())+len(m.GetNotDestinationIps())+
		len(m.GetDestinationPorts())+len(m.GetNotDestinationPorts())+
		len(m.GetExtensions()) > 0
	if !written {
		out.skip = true
		return out
	}
	if n := len(m.GetExtensions()); n > 0 {
		if c.pol.deny {
			c.warn(path+".extensions", fmt.Sprintf("%d unknown extensions ignored; the match denies more", n))
		} else {
			out.skip = true
			c.warn(path+".extensions", fmt.Sprintf("%d unknown extensions; the match never allows", n))
		}
	}
	f := func(name string, negative bool) field {
		return field{c: c, path: path + "." + name, negative: negative, out: &out}
	}
	out.namespaces = convert(f("namespaces", false), m.GetNamespaces(), toStringMatch)
	out.notNamespaces = convert(f("not_namespaces", true), m.GetNotNamespaces(), toStringMatch)
	out.serviceAccounts = convert(f("service_accounts", false), m.GetServiceAccounts(), toSAMatch)
	out.notServiceAccounts = convert(f("not_service_accounts", true), m.GetNotServiceAccounts(), toSAMatch)
	out.principals = convert(f("principals", false), m.GetPrincipals(), toStringMatch)
	out.notPrincipals = convert(f("not_principals", true), m.GetNotPrincipals(), toStringMatch)
	out.srcIPs = convert(f("source_ips", false), m.GetSourceIps(), toPrefix)
	out.notSrcIPs = convert(f("not_source_ips", true), m.GetNotSourceIps(), toPrefix)
	out.dstIPs = convert(f("destination_ips", false), m.GetDestinationIps(), toPrefix)
	out.notDstIPs = convert(f("not_destination_ips", true), m.GetNotDestinationIps(), toPrefix)
	out.ports = convert(f("destination_ports", false), m.GetDestinationPorts(), toPort)
	out.notPorts = convert(f("not_destination_ports", true), m.GetNotDestinationPorts(), toPort)
	return out
}

// convert compiles one list. rbac.rs drops values it cannot parse, which can
// widen an ALLOW match (a positive list that loses values matches more
// connections once empty, a negative one excludes fewer). Instead, a bad
// value makes an ALLOW match never match; in a DENY match it drops the whole
// field if positive and only the value if negative, so the match can only
// deny more.
func convert[S, T any](f field, in []S, conv func(S) (T, error)) []T {
	if len(in) == 0 {
		return nil
	}
	out := make([]T, 0, len(in))
	dropField := false
	for i, v := range in {
		t, err := conv(v)
		if err == nil {
			out = append(out, t)
			continue
		}
		path := fmt.Sprintf("%s[%d]", f.path, i)
		switch {
		case !f.c.pol.deny:
			f.out.skip = true
			f.c.warn(path, err.Error()+"; the match never allows")
		case f.negative:
			f.c.warn(path, err.Error()+"; value ignored, the match denies more")
		default:
			dropField = true
			f.c.warn(path, err.Error()+"; field ignored, the match denies more")
		}
	}
	if dropField || len(out) == 0 {
		return nil
	}
	return out
}

func toStringMatch(m *security.StringMatch) (stringMatch, error) {
	switch t := m.GetMatchType().(type) {
	case *security.StringMatch_Exact:
		return stringMatch{kind: matchExact, s: t.Exact}, nil
	case *security.StringMatch_Prefix:
		return stringMatch{kind: matchPrefix, s: t.Prefix}, nil
	case *security.StringMatch_Suffix:
		return stringMatch{kind: matchSuffix, s: t.Suffix}, nil
	case *security.StringMatch_Presence:
		return stringMatch{kind: matchPresence}, nil
	default:
		return stringMatch{}, fmt.Errorf("string match without a type")
	}
}

func toSAMatch(m *security.ServiceAccountMatch) (saMatch, error) {
	if m == nil {
		return saMatch{}, fmt.Errorf("null service account match")
	}
	return saMatch{namespace: m.GetNamespace(), serviceAccount: m.GetServiceAccount()}, nil
}

func toPrefix(a *security.Address) (netip.Prefix, error) {
	ip, ok := netip.AddrFromSlice(a.GetAddress())
	if !ok {
		return netip.Prefix{}, fmt.Errorf("address of %d bytes, want 4 or 16", len(a.GetAddress()))
	}
	if a.GetLength() > uint32(ip.BitLen()) {
		return netip.Prefix{}, fmt.Errorf("prefix length %d longer than the %d-bit address %s", a.GetLength(), ip.BitLen(), ip)
	}
	bits := int(a.GetLength())
	// Match ::ffff:a.b.c.d/N as the IPv4 block it names; connections are
	// unmapped too (see newPeer).
	if ip.Is4In6() && bits >= 96 {
		ip, bits = ip.Unmap(), bits-96
	}
	return netip.PrefixFrom(ip, bits).Masked(), nil
}

func toPort(p uint32) (uint16, error) {
	if p > 65535 {
		return 0, fmt.Errorf("port %d out of range", p)
	}
	return uint16(p), nil
}
