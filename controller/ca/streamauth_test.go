package ca_test

import (
	"context"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/ambitmesh/ambit/controller/ca/catest"
)

// fakeStream is the part of a grpc.ServerStream the interceptor reads.
type fakeStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (f fakeStream) Context() context.Context { return f.ctx }

func TestStreamAuthenticator(t *testing.T) {
	env := catest.Start(t, catest.Options{})
	env.AddToken("good", catest.Token{Namespace: "istio-system", ServiceAccount: "ztunnel", PodName: "ztunnel-1", PodUID: "u1", NodeName: "node-1"})
	env.AddToken("expired", catest.Token{Namespace: "istio-system", ServiceAccount: "ztunnel", Invalid: true})
	env.AddToken("other-audience", catest.Token{Namespace: "istio-system", ServiceAccount: "ztunnel", Audiences: []string{"api"}})
	const ads = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
	intercept := env.Server.StreamAuthenticator("/envoy.service.discovery.v3.AggregatedDiscoveryService/")
	tests := []struct {
		name   string
		method string
		auth   string
		want   codes.Code
	}{
		{"valid token", ads, "Bearer good", codes.OK},
		{"no token", ads, "", codes.Unauthenticated},
		{"invalid token", ads, "Bearer expired", codes.Unauthenticated},
		{"wrong audience", ads, "Bearer other-audience", codes.Unauthenticated},
		{"other services pass through", "/istio.v1.auth.IstioCertificateService/CreateCertificate", "", codes.OK},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := t.Context()
			if tc.auth != "" {
				ctx = metadata.NewIncomingContext(ctx, metadata.Pairs("authorization", tc.auth))
			}
			called := false
			err := intercept(nil, fakeStream{ctx: ctx}, &grpc.StreamServerInfo{FullMethod: tc.method}, func(any, grpc.ServerStream) error {
				called = true
				return nil
			})
			if got := status.Code(err); got != tc.want {
				t.Fatalf("code %v (%v), want %v", got, err, tc.want)
			}
			if called != (tc.want == codes.OK) {
				t.Errorf("handler called: %v", called)
			}
		})
	}
}
