package ca

import (
	"context"
	"errors"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// StreamAuthenticator returns a gRPC stream interceptor that authenticates
// every stream whose method starts with methodPrefix (the xDS service
// sharing the CA's port) the way CreateCertificate does: a service-account
// token for the CA's audience, checked with a TokenReview. A node's config
// describes the mesh's workloads and policies, so only callers with a
// Kubernetes identity get it, as istiod requires. Other methods pass
// through.
func (s *Server) StreamAuthenticator(methodPrefix string) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if !strings.HasPrefix(info.FullMethod, methodPrefix) {
			return handler(srv, ss)
		}
		caller, err := s.authenticateStream(ss.Context())
		if err != nil {
			r := asRefusal(err)
			s.log.WarnContext(ss.Context(), "xDS stream refused", "method", info.FullMethod, "reason", r.Reason, "error", r.Msg)
			s.metrics.refusals.WithLabelValues("xds_" + r.Reason).Inc()
			return r.GRPCStatus().Err()
		}
		s.log.DebugContext(ss.Context(), "xDS stream authenticated", "caller", caller.String())
		return handler(srv, ss)
	}
}

func (s *Server) authenticateStream(ctx context.Context) (Caller, error) {
	token := bearerToken(ctx)
	if token == "" {
		return Caller{}, refuse(codes.Unauthenticated, ReasonMissingToken,
			"no bearer token: send the service-account token as gRPC metadata %q: \"Bearer <token>\"", authorizationMetadata)
	}
	review, err := s.client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{s.policy.audience}},
	}, metav1.CreateOptions{})
	if err != nil {
		return Caller{}, refuse(codes.Unavailable, ReasonTokenReviewFailed, "reviewing the token with the Kubernetes API server: %v", err)
	}
	return s.policy.authenticate(review.Status)
}

// asRefusal returns err as a *Refusal, wrapping anything else as internal.
func asRefusal(err error) *Refusal {
	var r *Refusal
	if errors.As(err, &r) {
		return r
	}
	return refuse(codes.Internal, ReasonSigningFailed, "%v", err)
}
