package rbac

import (
	"net/netip"
	"slices"

	"github.com/ambitmesh/ambit/api/workloadapi"
	"github.com/ambitmesh/ambit/api/workloadapi/security"
)

// Conn is what ztunnel knows about an inbound connection when it decides.
type Conn struct {
	// SrcIdentity is the peer's SPIFFE ID from its HBONE client certificate,
	// "spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>", or "" for
	// a plaintext connection.
	SrcIdentity string
	// SrcIP is the client workload's address.
	SrcIP netip.Addr
	// DstIP and DstPort are the workload address and port the client asked
	// for.
	DstIP   netip.Addr
	DstPort uint16
}

// Reason says why a Decision was taken.
type Reason uint8

const (
	_ Reason = iota
	// ReasonDenyMatched: a DENY policy matched ("If there are any DENY
	// policies that match the request, deny the request.").
	ReasonDenyMatched
	// ReasonAllowMatched: an ALLOW policy matched ("If any of the ALLOW
	// policies match the request, allow the request.").
	ReasonAllowMatched
	// ReasonNoAllowPolicy: no DENY policy matched and no ALLOW policy
	// applies ("If there are no ALLOW policies for the workload, allow the
	// request.").
	ReasonNoAllowPolicy
	// ReasonNoAllowMatched: ALLOW policies apply and none matched ("Deny the
	// request.").
	ReasonNoAllowMatched
	// ReasonNoWorkload: there is no destination workload to evaluate for
	// (ztunnel: "destination workload not found"); the connection is denied.
	ReasonNoWorkload
)

func (r Reason) String() string {
	switch r {
	case ReasonDenyMatched:
		return "deny policy matched"
	case ReasonAllowMatched:
		return "allow policy matched"
	case ReasonNoAllowPolicy:
		return "no allow policy"
	case ReasonNoAllowMatched:
		return "no allow policy matched"
	case ReasonNoWorkload:
		return "destination workload not found"
	default:
		return "unknown"
	}
}

// Decision is the outcome of one evaluation.
type Decision struct {
	Allow bool
	// Policy is the key ("<namespace>/<name>") of the policy that decided:
	// the matching DENY or ALLOW policy; "" when no policy matched.
	Policy string
	Reason Reason
}

// Verdict is what Evaluate returns.
type Verdict struct {
	// Decision is enforced.
	Decision
	// DryRun is the decision the dry-run policies that apply would take on
	// their own, evaluated with the same rules as enforced ones, as Envoy's
	// shadow rules do for Istio sidecars. It never affects Decision; the
	// caller logs it. With no dry-run policy it allows with
	// ReasonNoAllowPolicy.
	DryRun Decision
	// MissingPolicies counts keys in Workload.authorization_policies with no
	// policy in the set. ztunnel skips them too ("skipping unknown policy"):
	// it is normal while a config update is in flight, and worth a log line
	// when it lasts.
	MissingPolicies int
}

// Policies is a compiled, immutable set of Authorization resources, safe for
// concurrent use. A nil *Policies holds no policy. To change the set, build a
// new one and swap the pointer.
type Policies struct {
	byKey       map[string]*policy
	global      scoped
	byNamespace map[string]*scoped
	hasDryRun   bool
	warnings    []string
}

// scoped holds the policies that apply by scope (GLOBAL, or NAMESPACE for one
// namespace), split by action and dry-run, in key order.
type scoped struct {
	deny, allow       []*policy
	dryDeny, dryAllow []*policy
}

func (s *scoped) add(p *policy) {
	switch {
	case p.deny && p.dryRun:
		s.dryDeny = append(s.dryDeny, p)
	case p.deny:
		s.deny = append(s.deny, p)
	case p.dryRun:
		s.dryAllow = append(s.dryAllow, p)
	default:
		s.allow = append(s.allow, p)
	}
}

func (s *scoped) lists(dry bool) (deny, allow []*policy) {
	if s == nil {
		return nil, nil
	}
	if dry {
		return s.dryDeny, s.dryAllow
	}
	return s.deny, s.allow
}

// NewPolicies compiles auths. A later resource with the same key
// ("<namespace>/<name>") replaces an earlier one, as an xDS update does. Nil
// entries are ignored. Nothing is dropped: what cannot be compiled as written
// is compiled fail-closed (see the package doc) and listed in Warnings.
func NewPolicies(auths []*security.Authorization) *Policies {
	p := &Policies{
		byKey:       make(map[string]*policy, len(auths)),
		byNamespace: make(map[string]*scoped),
	}
	for _, a := range auths {
		if a == nil {
			continue
		}
		p.byKey[key(a)] = compile(a)
	}
	keys := make([]string, 0, len(p.byKey))
	for k := range p.byKey {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		pol := p.byKey[k]
		p.warnings = append(p.warnings, pol.warnings...)
		pol.warnings = nil
		p.hasDryRun = p.hasDryRun || pol.dryRun
		switch pol.scope {
		case security.Scope_GLOBAL:
			p.global.add(pol)
		case security.Scope_NAMESPACE:
			s := p.byNamespace[pol.namespace]
			if s == nil {
				s = &scoped{}
				p.byNamespace[pol.namespace] = s
			}
			s.add(pol)
		}
	}
	return p
}

func key(a *security.Authorization) string {
	return a.GetNamespace() + "/" + a.GetName()
}

// Len returns the number of policies in the set.
func (p *Policies) Len() int {
	if p == nil {
		return 0
	}
	return len(p.byKey)
}

// Warnings lists, per policy, what NewPolicies compiled fail-closed instead
// of as written.
func (p *Policies) Warnings() []string {
	if p == nil {
		return nil
	}
	return p.warnings
}

// maxInlineKeys is how many Workload.authorization_policies entries Evaluate
// resolves without allocating; a workload with more costs one allocation.
const maxInlineKeys = 16

// Evaluate decides whether c may reach workload w. The policies that apply
// are, as in ztunnel's assert_rbac, the NAMESPACE policies of w's namespace,
// the GLOBAL policies and the policies keyed in w.authorization_policies.
// The decision follows the AuthorizationPolicy reference, which ztunnel
// quotes:
//
//  1. "If there are any DENY policies that match the request, deny the
//     request."
//  2. "If there are no ALLOW policies for the workload, allow the request."
//  3. "If any of the ALLOW policies match the request, allow the request."
//  4. "Deny the request."
//
// Dry-run policies take no part in the decision; see Verdict.DryRun. A nil
// workload is denied (ReasonNoWorkload).
func (p *Policies) Evaluate(w *workloadapi.Workload, c Conn) Verdict {
	if w == nil {
		return Verdict{
			Decision: Decision{Reason: ReasonNoWorkload},
			DryRun:   Decision{Allow: true, Reason: ReasonNoAllowPolicy},
		}
	}
	if p == nil {
		p = &empty
	}
	pr := newPeer(&c)

	var buf [maxInlineKeys]*policy
	keyed := buf[:0]
	missing := 0
	for _, k := range w.GetAuthorizationPolicies() {
		if pol := p.byKey[k]; pol != nil {
			keyed = append(keyed, pol)
		} else {
			missing++
		}
	}
	ns := p.byNamespace[w.GetNamespace()]

	v := Verdict{
		Decision:        p.decide(ns, keyed, &pr, false),
		DryRun:          Decision{Allow: true, Reason: ReasonNoAllowPolicy},
		MissingPolicies: missing,
	}
	if p.hasDryRun {
		v.DryRun = p.decide(ns, keyed, &pr, true)
	}
	return v
}

var empty Policies

// decide runs the four steps over the enforced (dry false) or the dry-run
// policies, in ztunnel's order: namespace, global, workload.
func (p *Policies) decide(ns *scoped, keyed []*policy, pr *peer, dry bool) Decision {
	nsDeny, nsAllow := ns.lists(dry)
	glDeny, glAllow := p.global.lists(dry)

	for _, pol := range nsDeny {
		if pol.eval(pr) {
			return Decision{Policy: pol.key, Reason: ReasonDenyMatched}
		}
	}
	for _, pol := range glDeny {
		if pol.eval(pr) {
			return Decision{Policy: pol.key, Reason: ReasonDenyMatched}
		}
	}
	for _, pol := range keyed {
		if pol.deny && pol.dryRun == dry && pol.eval(pr) {
			return Decision{Policy: pol.key, Reason: ReasonDenyMatched}
		}
	}

	applies := len(nsAllow)+len(glAllow) > 0
	for _, pol := range nsAllow {
		if pol.eval(pr) {
			return Decision{Allow: true, Policy: pol.key, Reason: ReasonAllowMatched}
		}
	}
	for _, pol := range glAllow {
		if pol.eval(pr) {
			return Decision{Allow: true, Policy: pol.key, Reason: ReasonAllowMatched}
		}
	}
	for _, pol := range keyed {
		if pol.deny || pol.dryRun != dry {
			continue
		}
		applies = true
		if pol.eval(pr) {
			return Decision{Allow: true, Policy: pol.key, Reason: ReasonAllowMatched}
		}
	}
	if !applies {
		return Decision{Allow: true, Reason: ReasonNoAllowPolicy}
	}
	return Decision{Reason: ReasonNoAllowMatched}
}

// peer is a Conn prepared for matching once per evaluation.
type peer struct {
	// principal is the identity without "spiffe://", valid if hasPrincipal.
	// rbac.rs matches principals against that form: "Istio matches all
	// assumes spiffe:// prefix. [...] So we strip it, and fail if it isn't
	// present."
	principal    string
	hasPrincipal bool
	// namespace is the identity's namespace, "" without a well-formed
	// identity (rbac.rs matches namespaces against "" then).
	namespace string
	// serviceAccount is valid if hasIdentity: a well-formed SPIFFE ID.
	serviceAccount string
	hasIdentity    bool

	src, dst netip.Addr
	port     uint16
}

func newPeer(c *Conn) peer {
	// Unmap so that an IPv4 client seen on a dual-stack socket as
	// ::ffff:a.b.c.d matches IPv4 blocks (netip: "An IPv4-mapped IPv6 address
	// will not match an IPv4 prefix").
	p := peer{src: c.SrcIP.Unmap(), dst: c.DstIP.Unmap(), port: c.DstPort}
	const scheme = "spiffe://"
	id := c.SrcIdentity
	if len(id) < len(scheme) || id[:len(scheme)] != scheme {
		return p
	}
	rest := id[len(scheme):]
	p.principal, p.hasPrincipal = rest, true

	// <trust-domain>/ns/<namespace>/sa/<serviceaccount>: exactly four
	// slashes, found in one pass.
	var slash [4]int
	n := 0
	for i := 0; i < len(rest); i++ {
		if rest[i] != '/' {
			continue
		}
		if n == len(slash) {
			return p
		}
		slash[n] = i
		n++
	}
	if n != len(slash) || slash[0] == 0 ||
		rest[slash[0]+1:slash[1]] != "ns" || rest[slash[2]+1:slash[3]] != "sa" {
		return p
	}
	ns, sa := rest[slash[1]+1:slash[2]], rest[slash[3]+1:]
	if ns == "" || sa == "" {
		return p
	}
	p.namespace, p.serviceAccount, p.hasIdentity = ns, sa, true
	return p
}
