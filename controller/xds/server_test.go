package xds_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ambitmesh/ambit/api/workloadapi"
	"github.com/ambitmesh/ambit/api/workloadapi/security"
	"github.com/ambitmesh/ambit/controller/xds"
	"github.com/ambitmesh/ambit/ztunnel/state"
	zxds "github.com/ambitmesh/ambit/ztunnel/xds"
)

const wait = 5 * time.Second

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// recorder collects what the Server's hooks report, per type URL.
type recorder struct {
	pushes map[string]chan xds.Push
	acks   chan xds.Ack
}

func newRecorder() *recorder {
	return &recorder{
		pushes: map[string]chan xds.Push{
			xds.AddressTypeURL:       make(chan xds.Push, 64),
			xds.AuthorizationTypeURL: make(chan xds.Push, 64),
		},
		acks: make(chan xds.Ack, 64),
	}
}

func (r *recorder) push(t *testing.T, typeURL string) xds.Push {
	t.Helper()
	select {
	case p := <-r.pushes[typeURL]:
		return p
	case <-time.After(wait):
		t.Fatalf("no %s push", typeURL)
		return xds.Push{}
	}
}

func (r *recorder) noPush(t *testing.T, typeURL string) {
	t.Helper()
	select {
	case p := <-r.pushes[typeURL]:
		t.Fatalf("unexpected %s push: resources %v, removed %v", typeURL, names(p.Response), p.Response.GetRemovedResources())
	case <-time.After(200 * time.Millisecond):
	}
}

// ack returns the first answer to a response of typeURL at version,
// skipping answers to earlier ones.
func (r *recorder) ack(t *testing.T, typeURL, version string) xds.Ack {
	t.Helper()
	for {
		select {
		case a := <-r.acks:
			if a.TypeURL == typeURL && a.Version == version {
				return a
			}
		case <-time.After(wait):
			t.Fatalf("no %s ack", typeURL)
			return xds.Ack{}
		}
	}
}

func names(resp *discovery.DeltaDiscoveryResponse) []string {
	var out []string
	for _, r := range resp.GetResources() {
		out = append(out, r.GetName())
	}
	slices.Sort(out)
	return out
}

// serve starts a gRPC server for s on addr ("127.0.0.1:0" for any port).
func serve(t *testing.T, s *xds.Server, addr string) (*grpc.Server, string) {
	t.Helper()
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	s.Register(g)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	return g, lis.Addr().String()
}

// connect runs Ambit's ztunnel xDS client against addr until the test ends.
func connect(t *testing.T, addr, node string) (*state.Store, *zxds.Client) {
	t.Helper()
	store := state.New()
	c, err := zxds.New(zxds.Options{Addr: addr, NodeID: node, Store: store, Log: quiet,
		InitialBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = c.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return store, c
}

func synced(t *testing.T, c *zxds.Client) {
	t.Helper()
	select {
	case <-c.Synced():
	case <-time.After(wait):
		t.Fatal("client not synced")
	}
}

func wl(name, ip string, status workloadapi.WorkloadStatus) *workloadapi.Address {
	return &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{
		Uid: xds.WorkloadUID("Kubernetes", "default", name), Name: name, Namespace: "default",
		Addresses: [][]byte{netip.MustParseAddr(ip).AsSlice()}, Status: status,
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE,
		Services:       map[string]*workloadapi.PortList{echoKey: {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}},
	}}}
}

func echoService() *workloadapi.Address {
	return &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{
		Name: "echo", Namespace: "default", Hostname: "echo.default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: netip.MustParseAddr("10.96.0.10").AsSlice()}},
		Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}},
	}}}
}

var (
	uid1 = xds.WorkloadUID("Kubernetes", "default", "w1")
	uid2 = xds.WorkloadUID("Kubernetes", "default", "w2")
	uid3 = xds.WorkloadUID("Kubernetes", "default", "w3")
)

// assertStore checks that the client's store holds exactly want.
func assertStore(t *testing.T, store *state.Store, want map[string]*workloadapi.Address) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for {
		v := store.View()
		ok := slices.Equal(v.AddressNames(), keys(want))
		for name, a := range want {
			switch {
			case a.GetWorkload() != nil:
				ok = ok && proto.Equal(v.WorkloadByUID(name), a.GetWorkload())
			case a.GetService() != nil:
				ok = ok && proto.Equal(v.ServiceByKey(name), a.GetService())
			}
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("store holds %v, want %v", v.AddressNames(), keys(want))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// assertResources checks that a push carries exactly want, encoded as the
// Server was given them.
func assertResources(t *testing.T, p xds.Push, want map[string]*workloadapi.Address, removed ...string) {
	t.Helper()
	if got := names(p.Response); !slices.Equal(got, keys(want)) {
		t.Errorf("push resources = %v, want %v", got, keys(want))
	}
	slices.Sort(removed)
	got := slices.Sorted(slices.Values(p.Response.GetRemovedResources()))
	if !slices.Equal(got, removed) {
		t.Errorf("push removed = %v, want %v", got, removed)
	}
	for _, r := range p.Response.GetResources() {
		if r.GetResource().GetTypeUrl() != xds.AddressTypeURL {
			t.Errorf("%s has type %s", r.GetName(), r.GetResource().GetTypeUrl())
		}
		var a workloadapi.Address
		if err := proto.Unmarshal(r.GetResource().GetValue(), &a); err != nil {
			t.Fatalf("decoding %s: %v", r.GetName(), err)
		}
		assertProto(t, r.GetName(), &a, want[r.GetName()])
	}
}

func TestServerDeltaPushes(t *testing.T) {
	rec := newRecorder()
	reg := prometheus.NewRegistry()
	s := xds.New(xds.Options{Log: quiet, Registerer: reg,
		OnPush: func(p xds.Push) { rec.pushes[p.TypeURL] <- p },
		OnAck:  func(a xds.Ack) { rec.acks <- a },
	})
	state1 := map[string]*workloadapi.Address{
		uid1:    wl("w1", "10.0.0.1", workloadapi.WorkloadStatus_HEALTHY),
		uid2:    wl("w2", "10.0.0.2", workloadapi.WorkloadStatus_HEALTHY),
		echoKey: echoService(),
	}
	v1 := s.SetAddresses(state1)
	policies := map[string]*security.Authorization{
		"default/deny": {Name: "deny", Namespace: "default", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY},
	}
	s.SetAuthorizations(policies)
	_, addr := serve(t, s, "127.0.0.1:0")
	store, client := connect(t, addr, "node-1")

	t.Run("full state on connect", func(t *testing.T) {
		p := rec.push(t, xds.AddressTypeURL)
		if p.NodeID != "node-1" || p.Version != v1 || p.Bytes == 0 {
			t.Errorf("push node=%q version=%q bytes=%d, want node-1, %s, >0", p.NodeID, p.Version, p.Bytes, v1)
		}
		assertResources(t, p, state1)
		ap := rec.push(t, xds.AuthorizationTypeURL)
		if got := names(ap.Response); !slices.Equal(got, []string{"default/deny"}) {
			t.Errorf("authorization push = %v", got)
		}
		synced(t, client)
		assertStore(t, store, state1)
		if a := rec.ack(t, xds.AddressTypeURL, v1); a.NodeID != "node-1" || a.Err != nil {
			t.Errorf("ack = %+v, want node-1 at %s", a, v1)
		}
	})

	t.Run("a change pushes only the changed resource", func(t *testing.T) {
		state2 := map[string]*workloadapi.Address{
			uid1:    wl("w1", "10.0.0.1", workloadapi.WorkloadStatus_UNHEALTHY), // changed
			uid2:    wl("w2", "10.0.0.2", workloadapi.WorkloadStatus_HEALTHY),   // equal, new message
			echoKey: echoService(),
		}
		v2 := s.SetAddresses(state2)
		if v2 == v1 {
			t.Fatal("version did not move")
		}
		p := rec.push(t, xds.AddressTypeURL)
		assertResources(t, p, map[string]*workloadapi.Address{uid1: state2[uid1]})
		if p.Version != v2 {
			t.Errorf("push version %s, want %s", p.Version, v2)
		}
		if a := rec.ack(t, xds.AddressTypeURL, v2); a.Err != nil {
			t.Errorf("ack of %s: %v", v2, a.Err)
		}
		assertStore(t, store, state2)
		rec.noPush(t, xds.AuthorizationTypeURL)
	})

	t.Run("no change, no push", func(t *testing.T) {
		before := s.Version(xds.AddressTypeURL)
		v := s.SetAddresses(map[string]*workloadapi.Address{
			uid1:    wl("w1", "10.0.0.1", workloadapi.WorkloadStatus_UNHEALTHY),
			uid2:    wl("w2", "10.0.0.2", workloadapi.WorkloadStatus_HEALTHY),
			echoKey: echoService(),
		})
		if v != before {
			t.Errorf("version moved from %s to %s without a change", before, v)
		}
		rec.noPush(t, xds.AddressTypeURL)
	})

	t.Run("removal pushes removed_resources", func(t *testing.T) {
		state3 := map[string]*workloadapi.Address{
			uid1:    wl("w1", "10.0.0.1", workloadapi.WorkloadStatus_UNHEALTHY),
			echoKey: echoService(),
		}
		s.SetAddresses(state3)
		p := rec.push(t, xds.AddressTypeURL)
		assertResources(t, p, nil, uid2)
		assertStore(t, store, state3)

		s.SetAuthorizations(nil)
		ap := rec.push(t, xds.AuthorizationTypeURL)
		if len(ap.Response.GetResources()) != 0 || !slices.Equal(ap.Response.GetRemovedResources(), []string{"default/deny"}) {
			t.Errorf("authorization push = %v removed %v", names(ap.Response), ap.Response.GetRemovedResources())
		}
		waitForCond(t, "policy removed", func() bool { return len(store.Authorizations()) == 0 })
	})

	t.Run("a rejected resource is reported as a NACK", func(t *testing.T) {
		bad := wl("w1", "10.0.0.1", workloadapi.WorkloadStatus_HEALTHY)
		bad.GetWorkload().Addresses = [][]byte{{1, 2, 3}}
		v := s.SetAddresses(map[string]*workloadapi.Address{uid1: bad, echoKey: echoService()})
		a := rec.ack(t, xds.AddressTypeURL, v)
		if a.Err == nil || status.Code(a.Err) != codes.InvalidArgument || !strings.Contains(a.Err.Error(), uid1) {
			t.Errorf("ack = %+v, want a NACK of %s naming %s", a, v, uid1)
		}
		// The client kept its last good w1.
		if w := store.WorkloadByUID(uid1); w == nil || len(w.GetAddresses()) != 1 || len(w.GetAddresses()[0]) != 4 {
			t.Errorf("client's w1 = %v, want the last good one", w)
		}
	})

	t.Run("node status", func(t *testing.T) {
		nodes := s.Nodes()
		if len(nodes) != 1 || nodes[0].NodeID != "node-1" || nodes[0].Peer == "" {
			t.Fatalf("Nodes = %+v", nodes)
		}
		// The last ACK was of the state before the rejected one.
		if got := nodes[0].Acked[xds.AddressTypeURL]; got == "" || got == s.Version(xds.AddressTypeURL) {
			t.Errorf("acked address version = %q (current %s), want the last good one", got, s.Version(xds.AddressTypeURL))
		}
		if got := nodes[0].Acked[xds.AuthorizationTypeURL]; got != s.Version(xds.AuthorizationTypeURL) {
			t.Errorf("acked authorization version = %q, want %s", got, s.Version(xds.AuthorizationTypeURL))
		}
	})

	t.Run("metrics", func(t *testing.T) {
		got := gather(t, reg)
		if got["ambit_xds_pushes_total/"+xds.AddressTypeURL] < 4 || got["ambit_xds_push_bytes_total/"+xds.AddressTypeURL] <= 0 {
			t.Errorf("push metrics = %v", got)
		}
		if got["ambit_xds_nacks_total/"+xds.AddressTypeURL] != 1 || got["ambit_xds_streams/"] != 1 {
			t.Errorf("nack/stream metrics = %v", got)
		}
	})
}

func waitForCond(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// gather returns each series' value by "<name>/<type_url label>".
func gather(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			label := ""
			for _, l := range m.GetLabel() {
				if l.GetName() == "type_url" {
					label = l.GetValue()
				}
			}
			v := m.GetCounter().GetValue() + m.GetGauge().GetValue()
			out[mf.GetName()+"/"+label] = v
		}
	}
	return out
}

func TestServerReconnectGetsFullState(t *testing.T) {
	rec := newRecorder()
	s := xds.New(xds.Options{Log: quiet, OnPush: func(p xds.Push) { rec.pushes[p.TypeURL] <- p }})
	before := map[string]*workloadapi.Address{
		uid1:    wl("w1", "10.0.0.1", workloadapi.WorkloadStatus_HEALTHY),
		uid2:    wl("w2", "10.0.0.2", workloadapi.WorkloadStatus_HEALTHY),
		echoKey: echoService(),
	}
	s.SetAddresses(before)
	g, addr := serve(t, s, "127.0.0.1:0")
	store, client := connect(t, addr, "node-1")
	synced(t, client)
	assertResources(t, rec.push(t, xds.AddressTypeURL), before)
	rec.push(t, xds.AuthorizationTypeURL) // empty full state
	assertStore(t, store, before)

	// The controller goes away; the state changes meanwhile; the node keeps
	// its last good configuration.
	g.Stop()
	// Stop cancels the stream without waiting for its handler, which may
	// still answer a last change into the closed stream: wait it out.
	waitForCond(t, "the stream to close", func() bool { return len(s.Nodes()) == 0 })
	after := map[string]*workloadapi.Address{
		uid1:    wl("w1", "10.0.0.1", workloadapi.WorkloadStatus_HEALTHY), // unchanged
		uid3:    wl("w3", "10.0.0.3", workloadapi.WorkloadStatus_HEALTHY), // new
		echoKey: echoService(),                                            // unchanged
	}
	s.SetAddresses(after)
	time.Sleep(50 * time.Millisecond)
	assertStore(t, store, before)

	// A controller answers again on the same address: the node gets every
	// resource, changed or not, and the removal of what went away.
	serve(t, s, addr)
	assertResources(t, rec.push(t, xds.AddressTypeURL), after, uid2)
	assertStore(t, store, after)
	if ap := rec.push(t, xds.AuthorizationTypeURL); len(ap.Response.GetResources())+len(ap.Response.GetRemovedResources()) != 0 {
		t.Errorf("authorization push on reconnect = %v", ap.Response)
	}
}

func TestServerEveryNodeGetsEveryChange(t *testing.T) {
	rec := newRecorder()
	s := xds.New(xds.Options{Log: quiet, OnPush: func(p xds.Push) { rec.pushes[p.TypeURL] <- p }})
	_, addr := serve(t, s, "127.0.0.1:0")
	storeA, ca := connect(t, addr, "node-a")
	storeB, cb := connect(t, addr, "node-b")
	synced(t, ca)
	synced(t, cb)
	want := map[string]*workloadapi.Address{uid1: wl("w1", "10.0.0.1", workloadapi.WorkloadStatus_HEALTHY)}
	s.SetAddresses(want)
	assertStore(t, storeA, want)
	assertStore(t, storeB, want)
	nodes := map[string]bool{}
	for len(nodes) < 2 {
		p := rec.push(t, xds.AddressTypeURL)
		if len(p.Response.GetResources()) == 1 {
			nodes[p.NodeID] = true
		}
	}
}

func TestServerRefusesUnknownTypes(t *testing.T) {
	s := xds.New(xds.Options{Log: quiet})
	_, addr := serve(t, s, "127.0.0.1:0")
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	st, err := discovery.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discovery.DeltaDiscoveryRequest{TypeUrl: "type.googleapis.com/envoy.config.cluster.v3.Cluster"}); err != nil {
		t.Fatal(err)
	}
	_, err = st.Recv()
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), xds.AddressTypeURL) {
		t.Errorf("Recv = %v, want InvalidArgument naming the served types", err)
	}
}
