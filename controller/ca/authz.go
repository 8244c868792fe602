package ca

import (
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	authnv1 "k8s.io/api/authentication/v1"
)

// This file is the CA's decision, with no I/O: a TokenReview status and a
// CSR in, a Caller and an identity out (authenticate, parseRequest), then a
// verdict given the pods on the caller's node (authorize). The server in
// server.go does the I/O around it.

// Refusal reasons: the `reason` label of ambit_ca_refusals_total and the
// `reason` key of the log line. Dashboards and alerts key on them: do not
// rename.
const (
	ReasonMissingToken        = "missing_token"         // no `authorization: Bearer` metadata
	ReasonTokenReviewFailed   = "token_review_failed"   // the API server did not answer the TokenReview
	ReasonUnauthenticated     = "unauthenticated"       // TokenReview: not authenticated (expired, revoked, forged, pod gone)
	ReasonWrongAudience       = "wrong_audience"        // authenticated, but not for the CA's audience
	ReasonNotServiceAccount   = "not_service_account"   // authenticated, but not as a service account
	ReasonMalformedCSR        = "malformed_csr"         // not a PEM PKCS #10 request
	ReasonInvalidCSRSignature = "invalid_csr_signature" // the CSR is not signed by the key it carries
	ReasonUnsupportedKey      = "unsupported_key"       // a key type or size the CA does not sign
	ReasonInvalidSAN          = "invalid_san"           // not exactly one SAN, a URI
	ReasonInvalidIdentity     = "invalid_identity"      // the URI is not spiffe://<td>/ns/<ns>/sa/<sa>
	ReasonWrongTrustDomain    = "wrong_trust_domain"    // a SPIFFE ID in another trust domain
	ReasonIdentityMismatch    = "identity_mismatch"     // ImpersonatedIdentity and the CSR's SAN differ
	ReasonNotNodeAccount      = "not_node_account"      // another identity, asked for by a caller that may not impersonate
	ReasonCallerNodeUnknown   = "caller_node_unknown"   // a node tunnel whose token does not say which node it is on
	ReasonNotOnNode           = "not_on_node"           // no pod of the requested service account on the caller's node
	ReasonPodLookupFailed     = "pod_lookup_failed"     // the API server did not answer the pod lookup
	ReasonSigningFailed       = "signing_failed"        // the CA could not sign
)

var allReasons = []string{
	ReasonMissingToken, ReasonTokenReviewFailed, ReasonUnauthenticated, ReasonWrongAudience,
	ReasonNotServiceAccount, ReasonMalformedCSR, ReasonInvalidCSRSignature, ReasonUnsupportedKey,
	ReasonInvalidSAN, ReasonInvalidIdentity, ReasonWrongTrustDomain, ReasonIdentityMismatch,
	ReasonNotNodeAccount, ReasonCallerNodeUnknown, ReasonNotOnNode, ReasonPodLookupFailed,
	ReasonSigningFailed,
}

// Keys Kubernetes puts in a TokenReview's status.user.extra for a token
// bound to a pod (k8s.io/apiserver/pkg/authentication/serviceaccount,
// PodNameKey, PodUIDKey, NodeNameKey). The node name is there for
// pod-bound tokens since the ServiceAccountTokenPodNodeInfo feature (GA and
// locked on in Kubernetes 1.32); it comes from the token's
// kubernetes.io.node claim, which the API server wrote from the pod's
// spec.nodeName when it issued the token, and the TokenReview checks that
// the pod still exists with the same UID.
const (
	extraPodName  = "authentication.kubernetes.io/pod-name"
	extraPodUID   = "authentication.kubernetes.io/pod-uid"
	extraNodeName = "authentication.kubernetes.io/node-name"

	serviceAccountUserPrefix = "system:serviceaccount:"
	serviceAccountsGroup     = "system:serviceaccounts"
)

// Refusal is a refused request: the gRPC code, the metric reason, and a
// message for the caller. CreateCertificate returns it as a gRPC status.
type Refusal struct {
	Code   codes.Code
	Reason string
	Msg    string
}

func (r *Refusal) Error() string { return r.Msg }

// GRPCStatus lets status.FromError see a Refusal.
func (r *Refusal) GRPCStatus() *status.Status { return status.New(r.Code, r.Msg) }

func refuse(code codes.Code, reason, format string, args ...any) *Refusal {
	return &Refusal{Code: code, Reason: reason, Msg: fmt.Sprintf(format, args...)}
}

// Caller is who a TokenReview says is asking.
type Caller struct {
	Namespace      string
	ServiceAccount string
	// PodName and PodUID are set when the token is bound to a pod, which a
	// projected service-account token always is.
	PodName string
	PodUID  string
	// NodeName is the node the caller's pod is scheduled on: from the
	// token, or looked up from PodName.
	NodeName string
}

func (c Caller) String() string {
	s := c.Namespace + "/" + c.ServiceAccount
	if c.PodName != "" {
		s += " (pod " + c.PodName
		if c.NodeName != "" {
			s += " on " + c.NodeName
		}
		s += ")"
	}
	return s
}

// ServiceAccount names a Kubernetes service account.
type ServiceAccount struct{ Namespace, Name string }

func (s ServiceAccount) String() string { return s.Namespace + "/" + s.Name }

// PodRef is what the node check needs to know of a pod.
type PodRef struct {
	Namespace      string
	Name           string
	UID            string
	ServiceAccount string
	NodeName       string
}

// policy is the configuration the decision depends on.
type policy struct {
	td           spiffeid.TrustDomain
	audience     string
	nodeAccounts []ServiceAccount // may ask on behalf of workloads on their node
}

// authenticate turns a TokenReview's status into a Caller, or refuses.
func (p policy) authenticate(st authnv1.TokenReviewStatus) (Caller, error) {
	if !st.Authenticated {
		detail := "the token is expired, revoked, or bound to an object that no longer exists"
		if st.Error != "" {
			detail = st.Error
		}
		return Caller{}, refuse(codes.Unauthenticated, ReasonUnauthenticated, "token not authenticated: %s", detail)
	}
	// The API server returns, in status.audiences, the requested audiences
	// the token is valid for; an authenticator that ignores audiences
	// returns none, and that is not good enough.
	if !slices.Contains(st.Audiences, p.audience) {
		return Caller{}, refuse(codes.Unauthenticated, ReasonWrongAudience,
			"token is not valid for audience %q (valid for %q): mount a projected service-account token with audience %q",
			p.audience, st.Audiences, p.audience)
	}
	rest, ok := strings.CutPrefix(st.User.Username, serviceAccountUserPrefix)
	parts := strings.Split(rest, ":")
	if !ok || len(parts) != 2 || parts[0] == "" || parts[1] == "" || !slices.Contains(st.User.Groups, serviceAccountsGroup) {
		return Caller{}, refuse(codes.Unauthenticated, ReasonNotServiceAccount,
			"token of %q is not a service-account token", st.User.Username)
	}
	extra := func(k string) string {
		if v := st.User.Extra[k]; len(v) > 0 {
			return v[0]
		}
		return ""
	}
	return Caller{
		Namespace:      parts[0],
		ServiceAccount: parts[1],
		PodName:        extra(extraPodName),
		PodUID:         extra(extraPodUID),
		NodeName:       extra(extraNodeName),
	}, nil
}

// parseRequest checks the CSR and returns it with the identity it asks for.
// impersonated is the request's ImpersonatedIdentity metadata (empty if
// absent); when set, it must be the CSR's identity.
func (p policy) parseRequest(csrPEM, impersonated string) (*x509.CertificateRequest, spiffeid.ID, error) {
	block, _ := pem.Decode([]byte(csrPEM))
	if block == nil || (block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST") {
		return nil, spiffeid.ID{}, refuse(codes.InvalidArgument, ReasonMalformedCSR, "csr is not a PEM CERTIFICATE REQUEST")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, spiffeid.ID{}, refuse(codes.InvalidArgument, ReasonMalformedCSR, "parsing csr: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, spiffeid.ID{}, refuse(codes.InvalidArgument, ReasonInvalidCSRSignature, "csr signature does not verify: %v", err)
	}
	if err := checkPublicKey(csr.PublicKey); err != nil {
		return nil, spiffeid.ID{}, refuse(codes.InvalidArgument, ReasonUnsupportedKey, "csr: %v", err)
	}
	names, err := countSANs(csr)
	if err != nil {
		return nil, spiffeid.ID{}, refuse(codes.InvalidArgument, ReasonMalformedCSR, "csr subjectAltName: %v", err)
	}
	if names != 1 || len(csr.URIs) != 1 {
		return nil, spiffeid.ID{}, refuse(codes.InvalidArgument, ReasonInvalidSAN,
			"csr must have exactly one subjectAltName, the SPIFFE ID URI; it has %d (%d URI, %d DNS, %d IP, %d email)",
			names, len(csr.URIs), len(csr.DNSNames), len(csr.IPAddresses), len(csr.EmailAddresses))
	}
	id, err := spiffeid.FromURI(csr.URIs[0])
	if err != nil {
		return nil, spiffeid.ID{}, refuse(codes.InvalidArgument, ReasonInvalidIdentity, "csr URI %q is not a SPIFFE ID: %v", csr.URIs[0], err)
	}
	if err := p.checkIdentity(id); err != nil {
		return nil, spiffeid.ID{}, err
	}
	if impersonated != "" && impersonated != id.String() {
		return nil, spiffeid.ID{}, refuse(codes.InvalidArgument, ReasonIdentityMismatch,
			"ImpersonatedIdentity %q is not the csr's identity %q", impersonated, id)
	}
	return csr, id, nil
}

// checkIdentity refuses an identity that is not
// spiffe://<trust domain>/ns/<ns>/sa/<sa>.
func (p policy) checkIdentity(id spiffeid.ID) error {
	if !id.MemberOf(p.td) {
		return refuse(codes.InvalidArgument, ReasonWrongTrustDomain,
			"identity %s is not in trust domain %q", id, p.td)
	}
	if _, ok := serviceAccountOf(id); !ok {
		return refuse(codes.InvalidArgument, ReasonInvalidIdentity,
			"identity %s is not of the form spiffe://%s/ns/<namespace>/sa/<service account>", id, p.td)
	}
	return nil
}

// serviceAccountOf parses the path /ns/<ns>/sa/<sa>.
func serviceAccountOf(id spiffeid.ID) (ServiceAccount, bool) {
	s := strings.Split(id.Path(), "/")
	if len(s) != 5 || s[0] != "" || s[1] != "ns" || s[2] == "" || s[3] != "sa" || s[4] == "" {
		return ServiceAccount{}, false
	}
	return ServiceAccount{Namespace: s[2], Name: s[4]}, true
}

func (p policy) isNodeAccount(c Caller) bool {
	return slices.Contains(p.nodeAccounts, ServiceAccount{Namespace: c.Namespace, Name: c.ServiceAccount})
}

// ownIdentity reports whether requested is the caller's own identity.
func (p policy) ownIdentity(c Caller, requested spiffeid.ID) bool {
	sa, ok := serviceAccountOf(requested)
	return ok && requested.MemberOf(p.td) && sa == ServiceAccount{Namespace: c.Namespace, Name: c.ServiceAccount}
}

// needsNode reports whether authorize will look at the caller's node, so
// that the server looks the node and its pods up only then.
func (p policy) needsNode(c Caller, requested spiffeid.ID) bool {
	return !p.ownIdentity(c, requested) && p.isNodeAccount(c)
}

// authorize decides whether caller may have a certificate for requested,
// given the pods scheduled on the caller's node (podsOnNode; only read for
// a node tunnel asking for another identity).
//
// The rule is the Kubernetes Node authorizer's
// (https://kubernetes.io/docs/reference/access-authn-authz/node/), applied to
// identities as Istio's CA does for ztunnel (CA_TRUSTED_NODE_ACCOUNTS): a
// caller may always have its own identity; a node tunnel may also have the
// identity of any service account with a pod on its own node, and no other.
func (p policy) authorize(caller Caller, requested spiffeid.ID, podsOnNode []PodRef) error {
	if err := p.checkIdentity(requested); err != nil {
		return err
	}
	if p.ownIdentity(caller, requested) {
		return nil
	}
	if !p.isNodeAccount(caller) {
		return refuse(codes.PermissionDenied, ReasonNotNodeAccount,
			"%s may only have a certificate for its own identity, not %s; only %v may ask on behalf of workloads",
			caller, requested, p.nodeAccounts)
	}
	if caller.NodeName == "" {
		return refuse(codes.PermissionDenied, ReasonCallerNodeUnknown,
			"node tunnel %s did not present a token bound to a pod on a node, so the workloads it may ask for are unknown: mount a projected service-account token",
			caller)
	}
	want, _ := serviceAccountOf(requested)
	for _, pod := range podsOnNode {
		// The node is compared here too, not only trusted to the lookup's
		// field selector.
		if pod.NodeName == caller.NodeName && pod.Namespace == want.Namespace && pod.ServiceAccount == want.Name {
			return nil
		}
	}
	return refuse(codes.PermissionDenied, ReasonNotOnNode,
		"node tunnel %s may not have a certificate for %s: no running pod of service account %s is scheduled on node %s",
		caller, requested, want, caller.NodeName)
}

// oidSubjectAltName is id-ce-subjectAltName (RFC 5280 section 4.2.1.6).
var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

// countSANs counts every GeneralName in the CSR's subjectAltName
// extensions, including the kinds crypto/x509 does not parse (otherName,
// directoryName, registeredID...), which it would otherwise drop silently.
func countSANs(csr *x509.CertificateRequest) (int, error) {
	n := 0
	for _, ext := range csr.Extensions {
		if !ext.Id.Equal(oidSubjectAltName) {
			continue
		}
		var seq asn1.RawValue
		rest, err := asn1.Unmarshal(ext.Value, &seq)
		if err != nil || len(rest) > 0 || seq.Tag != asn1.TagSequence || !seq.IsCompound {
			return 0, errors.New("malformed extension")
		}
		for b := seq.Bytes; len(b) > 0; n++ {
			var name asn1.RawValue
			if b, err = asn1.Unmarshal(b, &name); err != nil {
				return 0, errors.New("malformed GeneralName")
			}
		}
	}
	return n, nil
}
