package xds_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/ambitmesh/ambit/api/workloadapi"
	"github.com/ambitmesh/ambit/api/workloadapi/security"
	"github.com/ambitmesh/ambit/ztunnel/state"
	"github.com/ambitmesh/ambit/ztunnel/xds"
)

const timeout = 5 * time.Second

// fakeADS is a delta ADS server the test drives by hand, so that it can
// send what a real server would not (undecodable resources) and see every
// request the client makes.
type fakeADS struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	streams chan *fakeStream
}

type fakeStream struct {
	md   metadata.MD
	reqs chan *discovery.DeltaDiscoveryRequest
	send func(*discovery.DeltaDiscoveryResponse) error
	end  chan struct{}
}

func (f *fakeADS) DeltaAggregatedResources(st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	md, _ := metadata.FromIncomingContext(st.Context())
	fs := &fakeStream{md: md, reqs: make(chan *discovery.DeltaDiscoveryRequest, 16), send: st.Send, end: make(chan struct{})}
	go func() {
		for {
			req, err := st.Recv()
			if err != nil {
				return
			}
			fs.reqs <- req
		}
	}()
	f.streams <- fs
	select {
	case <-fs.end:
		return status.Error(codes.Unavailable, "test ends the stream")
	case <-st.Context().Done():
		return nil
	}
}

func (fs *fakeStream) request(t *testing.T) *discovery.DeltaDiscoveryRequest {
	t.Helper()
	select {
	case r := <-fs.reqs:
		return r
	case <-time.After(timeout):
		t.Fatal("no request from the client")
		return nil
	}
}

func (f *fakeADS) stream(t *testing.T) *fakeStream {
	t.Helper()
	select {
	case s := <-f.streams:
		return s
	case <-time.After(timeout):
		t.Fatal("the client did not open a stream")
		return nil
	}
}

// serveTLS starts the fake server with a self-signed certificate for
// controller.test and returns its address and a client TLS config that
// trusts it.
func serveTLS(t *testing.T, f *fakeADS) (string, *tls.Config) {
	t.Helper()
	return serveTLSWith(t, f)
}

// serveTLSWith is serveTLS with more server options.
func serveTLSWith(t *testing.T, f *fakeADS, opts ...grpc.ServerOption) (string, *tls.Config) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "controller.test"},
		DNSNames:     []string{"controller.test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:         true,

		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(append([]grpc.ServerOption{grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
		MinVersion:   tls.VersionTLS13,
	}))}, opts...)...)
	discovery.RegisterAggregatedDiscoveryServiceServer(g, f)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	roots := x509.NewCertPool()
	roots.AddCert(cert)
	return lis.Addr().String(), &tls.Config{RootCAs: roots, ServerName: "controller.test", MinVersion: tls.VersionTLS13}
}

func resource(t *testing.T, name, typeURL string, m proto.Message) *discovery.Resource {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	a.TypeUrl = typeURL
	return &discovery.Resource{Name: name, Version: "v", Resource: a}
}

func workload(uid, ip string) *workloadapi.Address {
	return &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{
		Uid: uid, Name: uid, Namespace: "default", Addresses: [][]byte{netip.MustParseAddr(ip).AsSlice()},
	}}}
}

func svc(name, vip string) *workloadapi.Address {
	return &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{
		Name: name, Namespace: "default", Hostname: name + ".default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: netip.MustParseAddr(vip).AsSlice()}},
		Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}},
	}}}
}

func expectAck(t *testing.T, fs *fakeStream, typeURL, nonce string) {
	t.Helper()
	r := fs.request(t)
	if r.GetTypeUrl() != typeURL || r.GetResponseNonce() != nonce || r.GetErrorDetail() != nil {
		t.Fatalf("got request type=%s nonce=%q error=%v; want an ACK of %s nonce %q", r.GetTypeUrl(), r.GetResponseNonce(), r.GetErrorDetail(), typeURL, nonce)
	}
}

func expectNack(t *testing.T, fs *fakeStream, typeURL, nonce, mentions string) {
	t.Helper()
	r := fs.request(t)
	if r.GetTypeUrl() != typeURL || r.GetResponseNonce() != nonce || r.GetErrorDetail() == nil {
		t.Fatalf("got request type=%s nonce=%q error=%v; want a NACK of %s nonce %q", r.GetTypeUrl(), r.GetResponseNonce(), r.GetErrorDetail(), typeURL, nonce)
	}
	if d := r.GetErrorDetail(); codes.Code(d.GetCode()) != codes.InvalidArgument || !strings.Contains(d.GetMessage(), mentions) {
		t.Errorf("NACK detail = %v %q, want InvalidArgument mentioning %q", codes.Code(d.GetCode()), d.GetMessage(), mentions)
	}
}

func send(t *testing.T, fs *fakeStream, resp *discovery.DeltaDiscoveryResponse) {
	t.Helper()
	if err := fs.send(resp); err != nil {
		t.Fatalf("sending: %v", err)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// runClient runs client until the test ends, and checks that it then
// returns nil.
func runClient(t *testing.T, client *xds.Client) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- client.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run returned %v after cancel, want nil", err)
		}
	})
}

func TestClient(t *testing.T) {
	f := &fakeADS{streams: make(chan *fakeStream, 4)}
	addr, tlsConf := serveTLS(t, f)
	store := state.New()
	var tokenCalls atomic.Int32
	client, err := xds.New(xds.Options{
		Addr: addr,
		TLS:  tlsConf,
		Token: func() (string, error) {
			switch n := tokenCalls.Add(1); n {
			case 2:
				return "", errors.New("token file not there yet")
			default:
				return "tok-" + strconv.Itoa(int(n)), nil
			}
		},
		NodeID:         "node-1",
		Metadata:       map[string]string{"NODE_NAME": "node-1"},
		Store:          store,
		Log:            slog.New(slog.NewTextHandler(io.Discard, nil)),
		InitialBackoff: 10 * time.Millisecond,
		MaxBackoff:     50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	runClient(t, client)

	// First stream: token, wildcard subscriptions to both types, nothing known.
	fs := f.stream(t)
	if got := fs.md.Get("authorization"); len(got) != 1 || got[0] != "Bearer tok-1" {
		t.Errorf("authorization metadata = %v, want [Bearer tok-1]", got)
	}
	for _, typ := range []string{xds.AddressTypeURL, xds.AuthorizationTypeURL} {
		r := fs.request(t)
		if r.GetTypeUrl() != typ || r.GetNode().GetId() != "node-1" || len(r.GetResourceNamesSubscribe()) != 1 || r.GetResourceNamesSubscribe()[0] != "*" {
			t.Fatalf("subscription = %v, want wildcard %s from node-1", r, typ)
		}
		if r.GetNode().GetMetadata().GetFields()["NODE_NAME"].GetStringValue() != "node-1" {
			t.Errorf("node metadata = %v", r.GetNode().GetMetadata())
		}
		if len(r.GetInitialResourceVersions()) != 0 {
			t.Errorf("a fresh client claims to know %v", r.GetInitialResourceVersions())
		}
	}

	// Full state of each type; Synced closes after both.
	send(t, fs, &discovery.DeltaDiscoveryResponse{TypeUrl: xds.AddressTypeURL, Nonce: "1", Resources: []*discovery.Resource{
		resource(t, "w1", xds.AddressTypeURL, workload("w1", "10.0.0.1")),
		resource(t, "default/echo.default.svc.cluster.local", xds.AddressTypeURL, svc("echo", "10.96.0.10")),
	}})
	expectAck(t, fs, xds.AddressTypeURL, "1")
	select {
	case <-client.Synced():
		t.Fatal("Synced before any Authorization response")
	default:
	}
	policy := &security.Authorization{Name: "p", Namespace: "default", Scope: security.Scope_NAMESPACE}
	send(t, fs, &discovery.DeltaDiscoveryResponse{TypeUrl: xds.AuthorizationTypeURL, Nonce: "2", Resources: []*discovery.Resource{
		resource(t, "default/p", xds.AuthorizationTypeURL, policy),
	}})
	expectAck(t, fs, xds.AuthorizationTypeURL, "2")
	select {
	case <-client.Synced():
	case <-time.After(timeout):
		t.Fatal("not Synced after both types were acknowledged")
	}
	if store.WorkloadByUID("w1") == nil || store.ServiceByVIP(netip.MustParseAddrPort("10.96.0.10:80")) == nil || store.View().Authorization("default/p") == nil {
		t.Fatalf("store after full state: %+v", store.Dump())
	}

	// A response with an undecodable resource: the good one applies, the
	// client NACKs naming the bad one.
	send(t, fs, &discovery.DeltaDiscoveryResponse{TypeUrl: xds.AddressTypeURL, Nonce: "3", Resources: []*discovery.Resource{
		resource(t, "w2", xds.AddressTypeURL, workload("w2", "10.0.0.2")),
		{Name: "garbage", Resource: &anypb.Any{TypeUrl: xds.AddressTypeURL, Value: []byte{0xff, 0xff, 0xff}}},
		{Name: "wrong-type", Resource: &anypb.Any{TypeUrl: xds.AuthorizationTypeURL}},
	}})
	expectNack(t, fs, xds.AddressTypeURL, "3", "garbage")
	if store.WorkloadByUID("w2") == nil {
		t.Error("the good resource of a NACKed response was not applied")
	}

	// A bad update of a known resource keeps its last good version.
	bad := workload("w1", "10.0.0.1")
	bad.GetWorkload().Addresses = [][]byte{{1, 2, 3, 4, 5}}
	send(t, fs, &discovery.DeltaDiscoveryResponse{TypeUrl: xds.AddressTypeURL, Nonce: "4", Resources: []*discovery.Resource{
		resource(t, "w1", xds.AddressTypeURL, bad),
	}})
	expectNack(t, fs, xds.AddressTypeURL, "4", "w1: workload address of 5 bytes")
	if w := store.WorkloadByIP(netip.MustParseAddr("10.0.0.1")); w == nil || w.GetUid() != "w1" {
		t.Error("the last good w1 was not kept")
	}

	// Removals.
	send(t, fs, &discovery.DeltaDiscoveryResponse{TypeUrl: xds.AddressTypeURL, Nonce: "5", RemovedResources: []string{"default/echo.default.svc.cluster.local"}})
	expectAck(t, fs, xds.AddressTypeURL, "5")
	if store.View().ServiceByKey("default/echo.default.svc.cluster.local") != nil {
		t.Error("removed service still in the store")
	}

	// The stream breaks: the store keeps its state; the client reconnects
	// (after a token error), with a fresh token, telling the server what
	// it holds.
	close(fs.end)
	fs = f.stream(t)
	if store.WorkloadByUID("w1") == nil || store.WorkloadByUID("w2") == nil {
		t.Error("the store lost its state while disconnected")
	}
	if got := fs.md.Get("authorization"); len(got) != 1 || got[0] != "Bearer tok-3" {
		t.Errorf("authorization on reconnect = %v, want [Bearer tok-3] (re-read after the failed read)", got)
	}
	want := map[string]map[string]string{
		xds.AddressTypeURL:       {"w1": "", "w2": ""},
		xds.AuthorizationTypeURL: {"default/p": ""},
	}
	for range 2 {
		r := fs.request(t)
		if !equalMaps(r.GetInitialResourceVersions(), want[r.GetTypeUrl()]) {
			t.Errorf("%s initial_resource_versions = %v, want %v", r.GetTypeUrl(), r.GetInitialResourceVersions(), want[r.GetTypeUrl()])
		}
	}
	send(t, fs, &discovery.DeltaDiscoveryResponse{TypeUrl: xds.AddressTypeURL, Nonce: "1",
		Resources:        []*discovery.Resource{resource(t, "w1", xds.AddressTypeURL, workload("w1", "10.0.0.1"))},
		RemovedResources: []string{"w2"},
	})
	expectAck(t, fs, xds.AddressTypeURL, "1")
	waitFor(t, "w2 removed", func() bool { return store.WorkloadByUID("w2") == nil })

	// A type that was not subscribed to is refused.
	send(t, fs, &discovery.DeltaDiscoveryResponse{TypeUrl: "type.googleapis.com/envoy.config.cluster.v3.Cluster", Nonce: "2"})
	expectNack(t, fs, "type.googleapis.com/envoy.config.cluster.v3.Cluster", "2", "not subscribed")
}

func equalMaps(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func TestNewValidates(t *testing.T) {
	store := state.New()
	tok := func() (string, error) { return "t", nil }
	tests := []struct {
		name string
		opts xds.Options
		want error // nil: any error
	}{
		{name: "token without TLS", opts: xds.Options{Addr: "x:1", NodeID: "n", Store: store, Token: tok}, want: xds.ErrTokenWithoutTLS},
		{name: "no address", opts: xds.Options{NodeID: "n", Store: store}},
		{name: "no node ID", opts: xds.Options{Addr: "x:1", Store: store}},
		{name: "no store", opts: xds.Options{Addr: "x:1", NodeID: "n"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := xds.New(tc.opts)
			if err == nil || (tc.want != nil && !errors.Is(err, tc.want)) {
				t.Errorf("New = %v, want %v", err, tc.want)
			}
		})
	}
	if _, err := xds.New(xds.Options{Addr: "x:1", NodeID: "n", Store: store}); err != nil {
		t.Errorf("plaintext without a token (tests): %v", err)
	}
}

// TestRunStopsWhileUnreachable checks that a client that cannot connect
// keeps retrying and still stops promptly.
func TestRunStopsWhileUnreachable(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	_ = lis.Close()
	c, err := xds.New(xds.Options{Addr: addr, NodeID: "n", Store: state.New(),
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)), InitialBackoff: 5 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := c.Run(ctx); err != nil {
		t.Errorf("Run = %v, want nil", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Run took %v to stop", d)
	}
	select {
	case <-c.Synced():
		t.Error("Synced without a server")
	default:
	}
}
