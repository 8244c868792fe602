// Package rbac decides whether ztunnel lets an inbound connection reach a
// workload, from the istio.security.Authorization resources the controller
// pushes. It is the Go counterpart of istio/ztunnel's src/rbac.rs and of the
// policy lookup in its state.rs (assert_rbac), with the same semantics.
//
// It is a pure core: NewPolicies compiles a set of Authorizations once per
// config update into an immutable, concurrency-safe value; Evaluate takes a
// destination Workload and a Conn and returns a Verdict, without I/O, locks,
// logging or allocation, so the inbound path can call it per connection.
//
// Which policies apply to a workload (ztunnel's assert_rbac): GLOBAL ones,
// NAMESPACE ones of the workload's namespace, and the keys listed in
// Workload.authorization_policies (WORKLOAD_SELECTOR; the controller resolves
// label selectors). The verdict follows the AuthorizationPolicy reference,
// quoted in Evaluate: DENY first, then ALLOW.
//
// How a policy matches (rbac.rs): the groups of a policy are ORed; the rules
// (clauses: from, to, when) of a group are ANDed; the matches of a rule are
// ORed; within a match every field that is set must match, a positive list
// when any value matches and a negative list when none does. Edge cases, all
// as rbac.rs and pinned by its rbac_empty_policy test: a policy with no
// groups never matches; a group with no rules and a rule with no matches
// match everything; a match with no fields set never matches.
//
// Where rbac.rs drops malformed data (an address of the wrong length, a port
// above 65535, a StringMatch without a type) or where the resource carries
// Extensions that Ambit does not know, this package fails closed instead:
// the match can never allow in an ALLOW policy and is widened in a DENY
// policy. Warnings lists what was affected so that the caller can log it.
//
// What it deliberately does not do: fetch or watch config, resolve label
// selectors, look up the destination workload, or log. Dry-run policies are
// evaluated separately into Verdict.DryRun and never change the verdict; the
// caller logs them.
package rbac
