package ca

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	pb "istio.io/api/security/v1alpha1"
	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

const (
	// DefaultAudience is the audience a caller's token must be valid for,
	// as Istio's (TOKEN_AUDIENCES).
	DefaultAudience = "istio-ca"
	// DefaultTTL is the lifetime of a workload certificate unless the
	// request asks for less.
	DefaultTTL = 24 * time.Hour

	// ImpersonatedIdentityKey is the key, in IstioCertificateRequest's
	// metadata Struct (not gRPC metadata), under which a node tunnel names
	// the identity it asks for on a workload's behalf. It is Istio's
	// (pkg/security.ImpersonatedIdentity), which istio/ztunnel sends with the
	// same identity as the CSR's URI SAN.
	ImpersonatedIdentityKey = "ImpersonatedIdentity"

	authorizationMetadata = "authorization"
	bearerPrefix          = "bearer "
)

// DefaultNodeAccounts are the service accounts that may ask on behalf of
// the workloads on their node: the node tunnel's.
var DefaultNodeAccounts = []ServiceAccount{{Namespace: "istio-system", Name: "ztunnel"}}

// ServerOptions configure NewServer. The zero value is Istio's defaults.
type ServerOptions struct {
	// Audience a caller's token must be valid for; DefaultAudience if empty.
	Audience string
	// NodeAccounts may ask for the identities of pods on their own node;
	// DefaultNodeAccounts if nil.
	NodeAccounts []ServiceAccount
	// DefaultTTL is used when a request asks for no particular validity;
	// DefaultTTL if zero.
	DefaultTTL time.Duration
	// MaxTTL caps what a request may ask for; DefaultTTL if zero.
	MaxTTL time.Duration
	// Pods is how the node check sees pods; APIPods(client) if nil.
	Pods Pods
	// Log receives a line per refusal (Warn) and per issued certificate
	// (Debug); slog.Default() if nil.
	Log *slog.Logger
	// Registerer the metrics go to; prometheus.DefaultRegisterer if nil.
	Registerer prometheus.Registerer
}

// Server is the gRPC IstioCertificateService: it authenticates the
// caller's service-account token with a TokenReview, checks the CSR,
// authorizes the identity, and signs with the CA.
type Server struct {
	pb.UnimplementedIstioCertificateServiceServer

	ca         *CA
	client     kubernetes.Interface
	pods       Pods
	policy     policy
	defaultTTL time.Duration
	maxTTL     time.Duration
	log        *slog.Logger
	metrics    *metrics
}

// NewServer returns a Server signing with ca and asking client's API
// server for TokenReviews (and pods, unless opts.Pods is set). The
// controller's service account needs `create` on
// authentication.k8s.io/tokenreviews and `get`, `list` on pods.
func NewServer(ca *CA, client kubernetes.Interface, opts ServerOptions) (*Server, error) {
	if opts.Audience == "" {
		opts.Audience = DefaultAudience
	}
	if opts.NodeAccounts == nil {
		opts.NodeAccounts = DefaultNodeAccounts
	}
	if opts.DefaultTTL <= 0 {
		opts.DefaultTTL = DefaultTTL
	}
	if opts.MaxTTL <= 0 {
		opts.MaxTTL = opts.DefaultTTL
	}
	if opts.DefaultTTL > opts.MaxTTL {
		return nil, fmt.Errorf("default TTL %s is above the maximum TTL %s", opts.DefaultTTL, opts.MaxTTL)
	}
	if opts.Pods == nil {
		opts.Pods = APIPods(client)
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.Registerer == nil {
		opts.Registerer = prometheus.DefaultRegisterer
	}
	m, err := newMetrics(opts.Registerer)
	if err != nil {
		return nil, fmt.Errorf("registering CA metrics: %w", err)
	}
	return &Server{
		ca:         ca,
		client:     client,
		pods:       opts.Pods,
		policy:     policy{td: ca.TrustDomain(), audience: opts.Audience, nodeAccounts: opts.NodeAccounts},
		defaultTTL: opts.DefaultTTL,
		maxTTL:     opts.MaxTTL,
		log:        opts.Log,
		metrics:    m,
	}, nil
}

// Register adds the service to g, which must serve TLS: callers send
// bearer tokens.
func (s *Server) Register(g *grpc.Server) {
	pb.RegisterIstioCertificateServiceServer(g, s)
}

// CreateCertificate implements IstioCertificateService. Every refusal is a
// *Refusal (a gRPC status with code Unauthenticated, PermissionDenied,
// InvalidArgument, or Unavailable when the API server did not answer),
// logged and counted by reason.
func (s *Server) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	chain, caller, id, err := s.createCertificate(ctx, req)
	if err != nil {
		var r *Refusal
		if !errors.As(err, &r) {
			r = refuse(codes.Internal, ReasonSigningFailed, "%v", err)
		}
		attrs := []any{"reason", r.Reason, "error", r.Msg}
		if p, ok := peer.FromContext(ctx); ok {
			attrs = append(attrs, "peer.addr", p.Addr.String())
		}
		if caller != nil {
			attrs = append(attrs, "caller", caller.String())
		}
		if id != "" {
			attrs = append(attrs, "identity", id)
		}
		s.log.WarnContext(ctx, "certificate refused", attrs...)
		s.metrics.refusals.WithLabelValues(r.Reason).Inc()
		return nil, r.GRPCStatus().Err()
	}
	s.metrics.issued.Inc()
	s.log.DebugContext(ctx, "certificate issued", "caller", caller.String(), "identity", id)
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
}

// createCertificate returns the chain, or a *Refusal; it also returns the
// caller and identity as far as it got, for the log line.
func (s *Server) createCertificate(ctx context.Context, req *pb.IstioCertificateRequest) ([]string, *Caller, string, error) {
	requested := req.GetMetadata().GetFields()[ImpersonatedIdentityKey].GetStringValue()

	token := bearerToken(ctx)
	if token == "" {
		return nil, nil, requested, refuse(codes.Unauthenticated, ReasonMissingToken,
			"no bearer token: send the service-account token as gRPC metadata %q: \"Bearer <token>\"", authorizationMetadata)
	}
	review, err := s.client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{s.policy.audience}},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, nil, requested, refuse(codes.Unavailable, ReasonTokenReviewFailed,
			"reviewing the token with the Kubernetes API server: %v", err)
	}
	caller, err := s.policy.authenticate(review.Status)
	if err != nil {
		return nil, nil, requested, err
	}

	csr, id, err := s.policy.parseRequest(req.GetCsr(), requested)
	if err != nil {
		return nil, &caller, requested, err
	}
	requested = id.String()

	var pods []PodRef
	if s.policy.needsNode(caller, id) {
		if caller, err = s.callerNode(ctx, caller); err != nil {
			return nil, &caller, requested, err
		}
		if caller.NodeName != "" {
			if pods, err = s.pods.OnNode(ctx, caller.NodeName); err != nil {
				return nil, &caller, requested, refuse(codes.Unavailable, ReasonPodLookupFailed, "%v", err)
			}
		}
	}
	if err := s.authorize(ctx, caller, id, pods); err != nil {
		return nil, &caller, requested, err
	}

	chain, err := s.ca.Sign(csr, id, s.ttl(req.GetValidityDuration()))
	if err != nil {
		return nil, &caller, requested, refuse(codes.Internal, ReasonSigningFailed, "%v", err)
	}
	return chain, &caller, requested, nil
}

// authorize is policy.authorize, asked once more with the node's pods read
// fresh when they came from a cache (CachedPods) and the answer was that
// no pod of the identity is on the node.
func (s *Server) authorize(ctx context.Context, caller Caller, id spiffeid.ID, pods []PodRef) error {
	err := s.policy.authorize(caller, id, pods)
	var r *Refusal
	fresh, cached := s.pods.(interface{ Fresh() Pods })
	if !cached || !errors.As(err, &r) || r.Reason != ReasonNotOnNode {
		return err
	}
	pods, lerr := fresh.Fresh().OnNode(ctx, caller.NodeName)
	if lerr != nil {
		return refuse(codes.Unavailable, ReasonPodLookupFailed, "%v", lerr)
	}
	return s.policy.authorize(caller, id, pods)
}

// callerNode fills in the caller's node from its pod when the token did
// not carry it (an API server older than 1.30, or the
// ServiceAccountTokenPodNodeInfo feature off). The TokenReview has already
// checked that the pod exists with the token's UID; the UID is checked
// again against what Get returns so that a pod recreated under the same
// name does not lend its node to an old token.
func (s *Server) callerNode(ctx context.Context, c Caller) (Caller, error) {
	if c.NodeName != "" || c.PodName == "" {
		return c, nil // authorize refuses an unknown node
	}
	pod, err := s.pods.Get(ctx, c.Namespace, c.PodName)
	switch {
	case errors.Is(err, ErrPodNotFound):
		return c, refuse(codes.PermissionDenied, ReasonCallerNodeUnknown, "caller %s: its pod no longer exists", c)
	case err != nil:
		return c, refuse(codes.Unavailable, ReasonPodLookupFailed, "%v", err)
	case c.PodUID != "" && pod.UID != c.PodUID:
		return c, refuse(codes.PermissionDenied, ReasonCallerNodeUnknown,
			"caller %s: pod UID %s is not the token's %s (the pod was recreated; retry with a fresh token)", c, pod.UID, c.PodUID)
	}
	c.NodeName = pod.NodeName
	return c, nil
}

// ttl is the certificate lifetime for a request asking for seconds (0 or
// less: no preference): the default, or what is asked for up to the max.
func (s *Server) ttl(seconds int64) time.Duration {
	if seconds <= 0 {
		return s.defaultTTL
	}
	if seconds >= int64(s.maxTTL/time.Second) {
		return s.maxTTL
	}
	return time.Duration(seconds) * time.Second
}

// bearerToken returns the token of the `authorization: Bearer <token>`
// metadata, or "". The scheme is case-insensitive (RFC 6750 section 2.1).
func bearerToken(ctx context.Context) string {
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get(authorizationMetadata) {
		if len(v) > len(bearerPrefix) && strings.EqualFold(v[:len(bearerPrefix)], bearerPrefix) {
			return strings.TrimSpace(v[len(bearerPrefix):])
		}
	}
	return ""
}
