package authz

import (
	"fmt"
	"strconv"

	"istio.io/api/annotation"
	"istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"

	"github.com/ambitmesh/ambit/api/workloadapi/security"
)

// Consequences, appended to Problem messages so that the status tells the
// user what ztunnel does instead. The first two are Istio's own wording for
// the same situation (httpAllowRuleBoilerplate, httpDenyRuleBoilerplate).
const (
	allowLeftOut   = "Within an ALLOW policy, rules matching HTTP attributes are omitted. This will be more restrictive than requested."
	denyWithout    = "DENY policy with HTTP attributes is enforced without the HTTP rules. This will be more restrictive than requested."
	allowInvalid   = "Within an ALLOW policy the rule is omitted, so it allows nothing. This is more restrictive than requested."
	denyNoField    = "The DENY rule is enforced without this field, so it denies more than requested."
	denyNoValue    = "The value is ignored, so the DENY rule denies more than requested."
	denyMatchesAll = "The entry matches every connection, so the DENY rule denies more than requested."
	useWaypoint    = "In ambient mode you must use a waypoint proxy to enforce HTTP rules: attach the policy to it with targetRefs."
)

// TranslateAuthorizationPolicy converts an AuthorizationPolicy into the
// Authorization ztunnel enforces, named and keyed as the policy
// ("<namespace>/<name>"), plus the Problems to report in its status.
//
// It returns nil and no Problem for a policy with targetRef or targetRefs:
// that policy is for a waypoint ("TargetRef is not intended for ztunnel") and
// the caller routes it there. It returns nil and a Problem for an action
// ztunnel does not support (AUDIT, CUSTOM), as Istio does.
//
// Scope, as the AuthorizationPolicy reference defines it: a selector with
// labels gives WORKLOAD_SELECTOR (the controller lists the key in the
// selected Workloads' authorization_policies, see SelectsWorkload); no
// selector gives NAMESPACE, or GLOBAL in the root namespace ("If the policy
// is in the root namespace, the policy applies to all namespaces in a mesh").
// A selector without labels selects every workload, so it is treated as no
// selector (Istio warns "workload selector specified without labels").
//
// The "istio.io/dry-run" annotation sets DryRun: ztunnel evaluates and logs
// the policy but does not enforce it. A value that does not parse as a bool
// is reported and the policy is enforced, as Istio does.
//
// Rules are translated with the L4 attributes ztunnel can see: source
// principals, namespaces, serviceAccounts and ipBlocks; destination ports;
// and conditions on source.ip, source.namespace, source.principal,
// destination.ip and destination.port, each with its not-form. For anything
// else (HTTP attributes, requestPrincipals, remoteIpBlocks, trustDomains,
// other condition keys) and for values that do not parse, Istio's rule for
// ztunnel applies:
//
//   - ALLOW: "Within an ALLOW policy, rules matching HTTP attributes are
//     omitted." The rule is left out, so it can only allow less. An ALLOW
//     policy whose rules are all left out has no groups and denies every
//     connection to the workloads it applies to, as an ALLOW policy with an
//     empty spec does.
//   - DENY: "DENY policy with HTTP attributes is enforced without the HTTP
//     rules." The rule is kept and the part ztunnel cannot evaluate is treated
//     as matching every connection, so it can only deny more.
//
// Ambit is stricter than Istio's code in three places, all toward fail
// closed: (1) ztunnel skips a Match with no fields ("empty clause") rather
// than matching everything, so Istio's output for a DENY rule like
// "to: [{operation: {methods: [GET]}}]" never matches, whereas Ambit leaves
// that clause out so the rule matches, as Istio's message promises;
// (2) trustDomains are ignored by Istio's ambient translation and are a
// Problem here; (3) malformed values (ports, CIDRs, empty strings) are
// dropped silently by Istio, which can widen an ALLOW rule, and are a Problem
// here with the ALLOW rule left out.
func TranslateAuthorizationPolicy(p *securityv1.AuthorizationPolicy, rootNamespace, trustDomain string) (*security.Authorization, []Problem) {
	if p == nil {
		return nil, nil
	}
	spec := &p.Spec
	if spec.GetTargetRef() != nil || len(spec.GetTargetRefs()) > 0 {
		return nil, nil
	}

	var action security.Action
	switch spec.GetAction() {
	case v1beta1.AuthorizationPolicy_ALLOW:
		action = security.Action_ALLOW
	case v1beta1.AuthorizationPolicy_DENY:
		action = security.Action_DENY
	case v1beta1.AuthorizationPolicy_AUDIT:
		// AUDIT never changes a verdict, so dropping it loses only the audit
		// log; ztunnel has no audit log of its own.
		return nil, []Problem{{
			Field:   "spec.action",
			Message: "ztunnel does not support the AUDIT action; the policy is not applied by ztunnel and changes no verdict.",
		}}
	case v1beta1.AuthorizationPolicy_CUSTOM:
		// Istio returns no Authorization for CUSTOM and so does Ambit rather
		// than a DENY: the decision belongs to an external authorizer that
		// ztunnel cannot ask, and a DENY would also block a selected pod that
		// enforces the policy itself (a gateway with ext_authz), which
		// breaks Istio YAML that works today.
		return nil, []Problem{{
			Field: "spec.action",
			Message: "ztunnel does not support the CUSTOM action; the policy is not enforced by ztunnel. " +
				"To enforce it in ambient mode, attach it to a waypoint with targetRefs.",
		}}
	default:
		return nil, []Problem{{
			Field:   "spec.action",
			Message: fmt.Sprintf("unknown action %d; the policy is not enforced by ztunnel.", spec.GetAction()),
		}}
	}

	t := &translator{
		action:      action,
		namespace:   p.Namespace,
		trustDomain: trustDomain,
	}

	out := &security.Authorization{
		Name:      p.Name,
		Namespace: p.Namespace,
		Scope:     scopeOf(spec.GetSelector().GetMatchLabels(), p.Namespace, rootNamespace),
		Action:    action,
	}

	if v, ok := p.Annotations[annotation.IoIstioDryRun.Name]; ok && v != "" {
		dry, err := strconv.ParseBool(v)
		if err != nil {
			t.report("metadata.annotations["+annotation.IoIstioDryRun.Name+"]",
				fmt.Sprintf("invalid value %q: want true or false. The policy is enforced.", v))
		}
		out.DryRun = dry
	}

	for i, r := range spec.GetRules() {
		if g := t.rule(i, r); g != nil {
			out.Groups = append(out.Groups, g)
		}
	}
	return out, t.problems
}

func scopeOf(selector map[string]string, namespace, rootNamespace string) security.Scope {
	switch {
	case len(selector) > 0:
		return security.Scope_WORKLOAD_SELECTOR
	case namespace == rootNamespace:
		return security.Scope_GLOBAL
	default:
		return security.Scope_NAMESPACE
	}
}

// translator holds what one policy's rules need.
type translator struct {
	action      security.Action
	namespace   string
	trustDomain string
	problems    []Problem
}

func (t *translator) report(field, msg string) {
	t.problems = append(t.problems, Problem{Field: field, Message: msg})
}

// ruleBuilder translates one rule. In an ALLOW policy, dropped records that
// the rule needs something ztunnel cannot evaluate and must be left out.
type ruleBuilder struct {
	*translator
	path    string
	dropped bool
}

func (b *ruleBuilder) deny() bool { return b.action == security.Action_DENY }

// unenforceable reports an attribute ztunnel cannot see, an HTTP one (the
// message then says to use a waypoint) or another one. In an ALLOW policy the
// rule is dropped; in a DENY policy the caller treats the attribute as
// matching everything.
func (b *ruleBuilder) unenforceable(field, what string, http bool) {
	if !b.deny() {
		b.dropped = true
	}
	if !http {
		consequence := allowInvalid
		if b.deny() {
			consequence = denyNoField
		}
		b.report(field, fmt.Sprintf("ztunnel does not support %s. %s", what, consequence))
		return
	}
	consequence := allowLeftOut
	if b.deny() {
		consequence = denyWithout
	}
	b.report(field, fmt.Sprintf("ztunnel does not support HTTP attributes (found: %s). %s %s", what, consequence, useWaypoint))
}

// malformed reports a structural error Istio's validation would reject
// ("`from.source` must not be empty"). In an ALLOW policy the rule is
// dropped; in a DENY policy the entry matches every connection.
func (b *ruleBuilder) malformed(field, what string) {
	consequence := allowInvalid
	if b.deny() {
		consequence = denyMatchesAll
	} else {
		b.dropped = true
	}
	b.report(field, what+". "+consequence)
}

// convert converts the values of one list field. A bad value drops the rule
// in an ALLOW policy. In a DENY policy it drops the whole field if the list
// is positive (fewer values would match fewer connections) and only the
// value if the list is negative (fewer exceptions match more connections);
// either way the rule denies more, never less.
func convert[T any](b *ruleBuilder, field string, values []string, negative bool, conv func(string) (T, error)) []T {
	if len(values) == 0 {
		return nil
	}
	out := make([]T, 0, len(values))
	dropField := false
	for k, v := range values {
		c, err := conv(v)
		if err == nil {
			out = append(out, c)
			continue
		}
		consequence := allowInvalid
		switch {
		case !b.deny():
			b.dropped = true
		case negative:
			consequence = denyNoValue
		default:
			consequence = denyNoField
			dropField = true
		}
		b.report(fmt.Sprintf("%s[%d]", field, k), fmt.Sprintf("invalid value %q: %v. %s", v, err, consequence))
	}
	if dropField || len(out) == 0 {
		return nil
	}
	return out
}

func (b *ruleBuilder) principal(v string) (*security.StringMatch, error) {
	return stringMatch(localPrincipal(v, b.trustDomain))
}

func (b *ruleBuilder) serviceAccount(v string) (*security.ServiceAccountMatch, error) {
	return serviceAccount(v, b.namespace)
}

// rule translates one rule into a Group: from, to and when each give one
// Rules (clause) and clauses are ANDed; within a clause the entries
// (Matches) are ORed, as in rbac.rs. It returns nil when an ALLOW rule is
// left out.
//
// ztunnel skips a Match with no fields instead of matching everything, so an
// entry that matches every connection is never emitted as an empty Match:
// its whole clause is left out instead (an OR with "true" is "true", and a
// missing clause constrains nothing). A Group with no clauses matches every
// connection, which is what "rules: [{}]" means.
func (t *translator) rule(i int, r *v1beta1.Rule) *security.Group {
	b := &ruleBuilder{translator: t, path: fmt.Sprintf("spec.rules[%d]", i)}
	if r == nil {
		b.malformed(b.path, "rule must not be null")
		if b.dropped {
			return nil
		}
		return &security.Group{}
	}
	var clauses []*security.Rules

	var from []*security.Match
	fromAll := false
	for j, f := range r.From {
		m := b.source(fmt.Sprintf("%s.from[%d].source", b.path, j), f.GetSource())
		if m == nil {
			fromAll = true
			continue
		}
		from = append(from, m)
	}
	if len(from) > 0 && !fromAll {
		clauses = append(clauses, &security.Rules{Matches: from})
	}

	var to []*security.Match
	toAll := false
	for j, o := range r.To {
		m := b.operation(fmt.Sprintf("%s.to[%d].operation", b.path, j), o.GetOperation())
		if m == nil {
			toAll = true
			continue
		}
		to = append(to, m)
	}
	if len(to) > 0 && !toAll {
		clauses = append(clauses, &security.Rules{Matches: to})
	}

	for k, c := range r.When {
		if m := b.condition(fmt.Sprintf("%s.when[%d]", b.path, k), c); m != nil {
			clauses = append(clauses, &security.Rules{Matches: []*security.Match{m}})
		}
	}

	if b.dropped {
		return nil
	}
	return &security.Group{Rules: clauses}
}

// source translates one from[].source. It returns nil when the entry
// matches every connection (possible only in a DENY policy: in an ALLOW
// policy the rule has been dropped by then).
func (b *ruleBuilder) source(path string, s *v1beta1.Source) *security.Match {
	if s == nil {
		b.malformed(path, "`from.source` must be set")
		return nil
	}
	unsupported := []struct {
		field  string
		values []string
		http   bool
	}{
		{"requestPrincipals", s.RequestPrincipals, true},
		{"notRequestPrincipals", s.NotRequestPrincipals, true},
		// remote.ip comes from X-Forwarded-For or PROXY protocol, which
		// ztunnel does not parse; Istio lists remoteIpBlocks among the HTTP
		// attributes, and using the peer address instead would match the
		// wrong thing.
		{"remoteIpBlocks", s.RemoteIpBlocks, true},
		{"notRemoteIpBlocks", s.NotRemoteIpBlocks, true},
		// The trust domain is L4 data, but the Authorization message has no
		// field for it and Istio's ambient translation ignores it, which
		// widens an ALLOW; report it rather than guess.
		{"trustDomains", s.TrustDomains, false},
		{"notTrustDomains", s.NotTrustDomains, false},
	}
	unenforced := 0
	for _, f := range unsupported {
		if len(f.values) > 0 {
			b.unenforceable(path+"."+f.field, f.field, f.http)
			unenforced++
		}
	}
	m := &security.Match{
		Principals:         convert(b, path+".principals", s.Principals, false, b.principal),
		NotPrincipals:      convert(b, path+".notPrincipals", s.NotPrincipals, true, b.principal),
		Namespaces:         convert(b, path+".namespaces", s.Namespaces, false, stringMatch),
		NotNamespaces:      convert(b, path+".notNamespaces", s.NotNamespaces, true, stringMatch),
		ServiceAccounts:    convert(b, path+".serviceAccounts", s.ServiceAccounts, false, b.serviceAccount),
		NotServiceAccounts: convert(b, path+".notServiceAccounts", s.NotServiceAccounts, true, b.serviceAccount),
		SourceIps:          convert(b, path+".ipBlocks", s.IpBlocks, false, address),
		NotSourceIps:       convert(b, path+".notIpBlocks", s.NotIpBlocks, true, address),
	}
	if !emptyMatch(m) {
		return m
	}
	if unenforced == 0 && len(s.Principals)+len(s.NotPrincipals)+len(s.Namespaces)+len(s.NotNamespaces)+
		len(s.ServiceAccounts)+len(s.NotServiceAccounts)+len(s.IpBlocks)+len(s.NotIpBlocks) == 0 {
		b.malformed(path, "`from.source` must not be empty")
	}
	return nil
}

// operation translates one to[].operation; nil means every connection.
func (b *ruleBuilder) operation(path string, o *v1beta1.Operation) *security.Match {
	if o == nil {
		b.malformed(path, "`to.operation` must be set")
		return nil
	}
	l7 := []struct {
		field  string
		values []string
	}{
		{"hosts", o.Hosts},
		{"notHosts", o.NotHosts},
		{"methods", o.Methods},
		{"notMethods", o.NotMethods},
		{"paths", o.Paths},
		{"notPaths", o.NotPaths},
	}
	unenforced := 0
	for _, f := range l7 {
		if len(f.values) > 0 {
			b.unenforceable(path+"."+f.field, f.field, true)
			unenforced++
		}
	}
	m := &security.Match{
		DestinationPorts:    convert(b, path+".ports", o.Ports, false, port),
		NotDestinationPorts: convert(b, path+".notPorts", o.NotPorts, true, port),
	}
	if !emptyMatch(m) {
		return m
	}
	if unenforced == 0 && len(o.Ports)+len(o.NotPorts) == 0 {
		b.malformed(path, "`to.operation` must not be empty")
	}
	return nil
}

// condition translates one when[] entry into a single Match holding its
// values and notValues (ANDed); nil means every connection. The L4 keys are
// Istio's l4WhenAttributes; every other key of the conditions reference
// (request.*, connection.sni, remote.ip, source.serviceAccount, ...) is
// treated as an HTTP attribute, as Istio does.
func (b *ruleBuilder) condition(path string, c *v1beta1.Condition) *security.Match {
	if c == nil {
		b.malformed(path, "condition must not be null")
		return nil
	}
	if c.Key == "" {
		b.malformed(path+".key", "`key` must not be empty")
		return nil
	}
	if len(c.Values) == 0 && len(c.NotValues) == 0 {
		b.malformed(path, fmt.Sprintf("at least one of `values` or `notValues` must be set for key %s", c.Key))
		return nil
	}
	vp, np := path+".values", path+".notValues"
	m := &security.Match{}
	switch c.Key {
	case "source.ip":
		m.SourceIps = convert(b, vp, c.Values, false, address)
		m.NotSourceIps = convert(b, np, c.NotValues, true, address)
	case "source.namespace":
		m.Namespaces = convert(b, vp, c.Values, false, stringMatch)
		m.NotNamespaces = convert(b, np, c.NotValues, true, stringMatch)
	case "source.principal":
		m.Principals = convert(b, vp, c.Values, false, b.principal)
		m.NotPrincipals = convert(b, np, c.NotValues, true, b.principal)
	case "destination.ip":
		m.DestinationIps = convert(b, vp, c.Values, false, address)
		m.NotDestinationIps = convert(b, np, c.NotValues, true, address)
	case "destination.port":
		m.DestinationPorts = convert(b, vp, c.Values, false, port)
		m.NotDestinationPorts = convert(b, np, c.NotValues, true, port)
	default:
		b.unenforceable(path+".key", c.Key, true)
		return nil
	}
	if emptyMatch(m) {
		return nil
	}
	return m
}

func emptyMatch(m *security.Match) bool {
	return len(m.Namespaces) == 0 && len(m.NotNamespaces) == 0 &&
		len(m.ServiceAccounts) == 0 && len(m.NotServiceAccounts) == 0 &&
		len(m.Principals) == 0 && len(m.NotPrincipals) == 0 &&
		len(m.SourceIps) == 0 && len(m.NotSourceIps) == 0 &&
		len(m.DestinationIps) == 0 && len(m.NotDestinationIps) == 0 &&
		len(m.DestinationPorts) == 0 && len(m.NotDestinationPorts) == 0 &&
		len(m.Extensions) == 0
}
