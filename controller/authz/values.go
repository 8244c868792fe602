package authz

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/ambitmesh/ambit/api/workloadapi/security"
)

// defaultTrustDomain is the trust domain Istio treats as an alias of the
// mesh's own one in policies.
const defaultTrustDomain = "cluster.local"

var errEmpty = errors.New("empty value")

// stringMatch converts one principal or namespace value with Istio's wildcard
// rules (AuthorizationPolicy reference: "Exact match: abc; Prefix match: abc*;
// Suffix match: *abc; Presence match: * will match when value is not empty").
func stringMatch(v string) (*security.StringMatch, error) {
	switch {
	case v == "":
		return nil, errEmpty
	case v == "*":
		return &security.StringMatch{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}, nil
	case strings.HasPrefix(v, "*"):
		return &security.StringMatch{MatchType: &security.StringMatch_Suffix{Suffix: v[1:]}}, nil
	case strings.HasSuffix(v, "*"):
		return &security.StringMatch{MatchType: &security.StringMatch_Prefix{Prefix: v[:len(v)-1]}}, nil
	default:
		return &security.StringMatch{MatchType: &security.StringMatch_Exact{Exact: v}}, nil
	}
}

// presence matches any non-empty value; NotPrincipals: [presence] is how
// Istio says "the peer has no identity", i.e. plaintext.
func presence() *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}
}

// localPrincipal applies the trust domain rule of Istio's sidecar
// authorization (pilot/pkg/security/trustdomain, ReplaceTrustDomainAliases):
// a principal of exactly the form "<td>/ns/<ns>/sa/<sa>" whose trust domain
// is "cluster.local" means "this mesh", "which is a pointer to the local trust
// domain and its aliases", and is rewritten to the mesh's trust domain. Other
// principals ("*", "cluster.local/*", "other.td/ns/a/sa/b") are kept as they
// are. Istio's ambient translation does not do this yet ("TODO: TDA"), which
// makes "cluster.local/..." policies silently stop matching in a mesh with
// another trust domain; with the default trust domain both agree.
func localPrincipal(v, trustDomain string) string {
	if trustDomain == "" || trustDomain == defaultTrustDomain {
		return v
	}
	if strings.Count(v, "/") != 4 {
		return v
	}
	if td, rest, _ := strings.Cut(v, "/"); td == defaultTrustDomain {
		return trustDomain + "/" + rest
	}
	return v
}

// serviceAccount converts "<ns>/<sa>", or "<sa>" in the policy's namespace
// (Source.serviceAccounts: "`<serviceaccount>` may also be used to use the
// same namespace as the AuthorizationPolicy. No form of wildcard (*) is
// allowed.").
func serviceAccount(v, policyNamespace string) (*security.ServiceAccountMatch, error) {
	if v == "" {
		return nil, errEmpty
	}
	if strings.Contains(v, "*") {
		return nil, fmt.Errorf("wildcards are not allowed in service accounts: %q", v)
	}
	ns, sa, found := strings.Cut(v, "/")
	if !found {
		ns, sa = policyNamespace, v
	}
	if ns == "" || sa == "" || strings.Contains(sa, "/") {
		return nil, fmt.Errorf("want <namespace>/<serviceaccount> or <serviceaccount>, got %q", v)
	}
	return &security.ServiceAccountMatch{Namespace: ns, ServiceAccount: sa}, nil
}

// address converts a single IP ("203.0.113.4", a full-length prefix) or a
// CIDR ("203.0.113.0/24") as Source.ipBlocks documents.
func address(v string) (*security.Address, error) {
	if v == "" {
		return nil, errEmpty
	}
	var p netip.Prefix
	if strings.Contains(v, "/") {
		var err error
		if p, err = netip.ParsePrefix(v); err != nil {
			return nil, fmt.Errorf("parsing CIDR: %w", err)
		}
	} else {
		a, err := netip.ParseAddr(v)
		if err != nil {
			return nil, fmt.Errorf("parsing IP: %w", err)
		}
		if a.Zone() != "" {
			return nil, fmt.Errorf("IP with a zone is not supported: %q", v)
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	p = p.Masked()
	return &security.Address{Address: p.Addr().AsSlice(), Length: uint32(p.Bits())}, nil
}

// port converts a destination port; Operation.ports holds numbers as strings.
func port(v string) (uint32, error) {
	if v == "" {
		return 0, errEmpty
	}
	p, err := strconv.ParseUint(v, 10, 16)
	if err != nil {
		return 0, fmt.Errorf("want a port number (0-65535), got %q", v)
	}
	return uint32(p), nil
}
