package rbac

import (
	"net/netip"
	"strings"
)

// eval reports whether any group matches (rbac.rs: "An Authorization
// Policy can have multiple rules. If ANY rule matches it's a match"). No
// group, no match.
func (p *policy) eval(pr *peer) bool {
	if p.never {
		return false
	}
	for i := range p.groups {
		if p.groups[i].eval(pr) {
			return true
		}
	}
	return false
}

// eval reports whether every rule matches ("If ALL clauses match, it is a
// match"); a group without rules matches.
func (g *group) eval(pr *peer) bool {
	for i := range g.rules {
		if !g.rules[i].eval(pr) {
			return false
		}
	}
	return true
}

// eval reports whether any match matches ("we need ANY mg to match"); a
// rule without matches matches.
func (r *rule) eval(pr *peer) bool {
	if len(r.matches) == 0 {
		return true
	}
	for i := range r.matches {
		if r.matches[i].eval(pr) {
			return true
		}
	}
	return false
}

// eval reports whether every field that is set matches ("We need ALL of
// these to match. Within each type, ANY must match"): a positive list when
// any value matches, a negative list when none does.
func (m *match) eval(pr *peer) bool {
	if m.skip {
		return false
	}
	return prefixes(m.dstIPs, m.notDstIPs, pr.dst) &&
		prefixes(m.srcIPs, m.notSrcIPs, pr.src) &&
		ports(m.ports, m.notPorts, pr.port) &&
		serviceAccounts(m.serviceAccounts, m.notServiceAccounts, pr) &&
		strs(m.principals, m.notPrincipals, pr.principal, pr.hasPrincipal) &&
		strs(m.namespaces, m.notNamespaces, pr.namespace, true)
}

func prefixes(pos, neg []netip.Prefix, a netip.Addr) bool {
	return (len(pos) == 0 || anyPrefix(pos, a)) && (len(neg) == 0 || !anyPrefix(neg, a))
}

func anyPrefix(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func ports(pos, neg []uint16, port uint16) bool {
	return (len(pos) == 0 || anyPort(pos, port)) && (len(neg) == 0 || !anyPort(neg, port))
}

func anyPort(ps []uint16, port uint16) bool {
	for _, p := range ps {
		if p == port {
			return true
		}
	}
	return false
}

// serviceAccounts: "No identity at all, this does not match", either way.
func serviceAccounts(pos, neg []saMatch, pr *peer) bool {
	return (len(pos) == 0 || anySA(pos, pr)) && (len(neg) == 0 || !anySA(neg, pr))
}

func anySA(ms []saMatch, pr *peer) bool {
	if !pr.hasIdentity {
		return false
	}
	for _, m := range ms {
		if m.namespace == pr.namespace && m.serviceAccount == pr.serviceAccount {
			return true
		}
	}
	return false
}

// strs matches v; when ok is false (a principal without "spiffe://") no
// value matches, not even presence.
func strs(pos, neg []stringMatch, v string, ok bool) bool {
	return (len(pos) == 0 || anyString(pos, v, ok)) && (len(neg) == 0 || !anyString(neg, v, ok))
}

func anyString(ms []stringMatch, v string, ok bool) bool {
	if !ok {
		return false
	}
	for _, m := range ms {
		if m.matches(v) {
			return true
		}
	}
	return false
}

func (m stringMatch) matches(v string) bool {
	switch m.kind {
	case matchExact:
		return v == m.s
	case matchPrefix:
		return strings.HasPrefix(v, m.s)
	case matchSuffix:
		return strings.HasSuffix(v, m.s)
	case matchPresence:
		return v != ""
	}
	return false
}
