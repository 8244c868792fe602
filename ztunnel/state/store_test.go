package state_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/ambitmesh/ambit/api/workloadapi"
	"github.com/ambitmesh/ambit/api/workloadapi/security"
	"github.com/ambitmesh/ambit/ztunnel/state"
)

const (
	uidA = "Kubernetes//Pod/default/a"
	uidB = "Kubernetes//Pod/default/b"
	uidC = "Kubernetes//Pod/default/c"
	uidH = "Kubernetes//Pod/default/host"
	svcK = "default/echo.default.svc.cluster.local"
)

func ip(s string) []byte { return netip.MustParseAddr(s).AsSlice() }

func workload(uid, name, addr string, status workloadapi.WorkloadStatus, services ...string) *workloadapi.Address {
	w := &workloadapi.Workload{
		Uid:            uid,
		Name:           name,
		Namespace:      "default",
		Addresses:      [][]byte{ip(addr)},
		ServiceAccount: "default",
		Status:         status,
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE,
		Services:       map[string]*workloadapi.PortList{},
	}
	for _, s := range services {
		w.Services[s] = &workloadapi.PortList{Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}
	}
	return &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}}
}

func service(name string, vips ...string) *workloadapi.Address {
	s := &workloadapi.Service{
		Name:      name,
		Namespace: "default",
		Hostname:  name + ".default.svc.cluster.local",
		Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}},
	}
	for _, v := range vips {
		s.Addresses = append(s.Addresses, &workloadapi.NetworkAddress{Address: ip(v)})
	}
	return &workloadapi.Address{Type: &workloadapi.Address_Service{Service: s}}
}

func policy(ns, name string, scope security.Scope) *security.Authorization {
	return &security.Authorization{Name: name, Namespace: ns, Scope: scope, Action: security.Action_DENY}
}

// fixture is a small mesh: two healthy endpoints of echo (one dual-stack),
// one unhealthy one, a host-network pod and the echo service.
func fixture(t *testing.T) *state.Store {
	t.Helper()
	s := state.New()
	a := workload(uidA, "a", "10.0.0.1", workloadapi.WorkloadStatus_HEALTHY, svcK)
	a.GetWorkload().Addresses = append(a.GetWorkload().Addresses, ip("fd00::1"))
	host := workload(uidH, "host", "192.168.0.10", workloadapi.WorkloadStatus_HEALTHY)
	host.GetWorkload().NetworkMode = workloadapi.NetworkMode_HOST_NETWORK
	s.ApplyAddresses(map[string]*workloadapi.Address{
		uidA: a,
		uidB: workload(uidB, "b", "10.0.0.2", workloadapi.WorkloadStatus_HEALTHY, svcK),
		uidC: workload(uidC, "c", "10.0.0.3", workloadapi.WorkloadStatus_UNHEALTHY, svcK),
		uidH: host,
		svcK: service("echo", "10.96.0.10", "fd00:96::10"),
	}, nil)
	s.ApplyAuthorizations(map[string]*security.Authorization{
		"istio-system/global": policy("istio-system", "global", security.Scope_GLOBAL),
		"default/ns":          policy("default", "ns", security.Scope_NAMESPACE),
		"default/sel":         policy("default", "sel", security.Scope_WORKLOAD_SELECTOR),
		"other/ns":            policy("other", "ns", security.Scope_NAMESPACE),
	}, nil)
	return s
}

func uid(w *workloadapi.Workload) string {
	if w == nil {
		return "<nil>"
	}
	return w.GetUid()
}

func TestWorkloadByIP(t *testing.T) {
	s := fixture(t)
	tests := []struct {
		name string
		ip   string
		want string
	}{
		{name: "ipv4", ip: "10.0.0.1", want: uidA},
		{name: "ipv6 of a dual-stack pod", ip: "fd00::1", want: uidA},
		{name: "ipv4-mapped ipv6 from a dual-stack socket", ip: "::ffff:10.0.0.2", want: uidB},
		{name: "unhealthy workloads still resolve", ip: "10.0.0.3", want: uidC},
		{name: "host-network pods do not resolve by IP", ip: "192.168.0.10", want: "<nil>"},
		{name: "unknown", ip: "10.0.0.99", want: "<nil>"},
		{name: "a service VIP is not a workload", ip: "10.96.0.10", want: "<nil>"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := uid(s.WorkloadByIP(netip.MustParseAddr(tc.ip))); got != tc.want {
				t.Errorf("WorkloadByIP(%s) = %s, want %s", tc.ip, got, tc.want)
			}
		})
	}
	if got := uid(s.WorkloadByUID(uidH)); got != uidH {
		t.Errorf("WorkloadByUID(host) = %s: host-network workloads must still resolve by UID", got)
	}
}

func TestWorkloadByIPConflict(t *testing.T) {
	s := state.New()
	// An old pod going away and its replacement share an IP for a moment.
	s.ApplyAddresses(map[string]*workloadapi.Address{
		uidA: workload(uidA, "a", "10.0.0.1", workloadapi.WorkloadStatus_UNHEALTHY),
		uidB: workload(uidB, "b", "10.0.0.1", workloadapi.WorkloadStatus_HEALTHY),
	}, nil)
	if got := uid(s.WorkloadByIP(netip.MustParseAddr("10.0.0.1"))); got != uidB {
		t.Errorf("got %s, want the healthy %s", got, uidB)
	}
	s.ApplyAddresses(nil, []string{uidB})
	if got := uid(s.WorkloadByIP(netip.MustParseAddr("10.0.0.1"))); got != uidA {
		t.Errorf("after removing %s got %s, want %s", uidB, got, uidA)
	}
}

func TestServiceByVIP(t *testing.T) {
	s := fixture(t)
	tests := []struct {
		name string
		dst  string
		want bool
	}{
		{name: "ipv4 vip, declared port", dst: "10.96.0.10:80", want: true},
		{name: "ipv6 vip, declared port", dst: "[fd00:96::10]:80", want: true},
		{name: "undeclared port", dst: "10.96.0.10:81", want: false},
		{name: "not a vip", dst: "10.0.0.1:80", want: false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := s.ServiceByVIP(netip.MustParseAddrPort(tc.dst))
			if (got != nil) != tc.want {
				t.Errorf("ServiceByVIP(%s) = %v, want found=%v", tc.dst, got, tc.want)
			}
		})
	}
	if s.View().ServiceByAddr(netip.MustParseAddr("10.96.0.10")) == nil {
		t.Error("ServiceByAddr(vip) = nil")
	}
	if s.View().ServiceByKey(svcK) == nil {
		t.Errorf("ServiceByKey(%s) = nil", svcK)
	}
}

func TestEndpoints(t *testing.T) {
	s := fixture(t)
	v := s.View()
	svc := v.ServiceByVIP(netip.MustParseAddrPort("10.96.0.10:80"))
	got := uids(v.Endpoints(svc))
	want := []string{uidA, uidB} // c is unhealthy
	if !slices.Equal(got, want) {
		t.Errorf("Endpoints = %v, want %v", got, want)
	}

	// A service from an older View still finds the current endpoints.
	s.ApplyAddresses(map[string]*workloadapi.Address{
		uidC: workload(uidC, "c", "10.0.0.3", workloadapi.WorkloadStatus_HEALTHY, svcK),
	}, []string{uidA})
	if got, want := uids(s.Endpoints(svc)), []string{uidB, uidC}; !slices.Equal(got, want) {
		t.Errorf("Endpoints(stale service) = %v, want %v", got, want)
	}
	if got := s.Endpoints(nil); got != nil {
		t.Errorf("Endpoints(nil) = %v", got)
	}

	// Workloads can name a service the store has not received.
	unknown := &workloadapi.Service{Namespace: "default", Hostname: "nope.default.svc.cluster.local"}
	if got := s.Endpoints(unknown); len(got) != 0 {
		t.Errorf("Endpoints(unknown) = %v", uids(got))
	}
}

func uids(ws []*workloadapi.Workload) []string {
	var out []string
	for _, w := range ws {
		out = append(out, w.GetUid())
	}
	return out
}

func TestAuthorizations(t *testing.T) {
	s := fixture(t)
	v := s.View()
	if got := len(v.Authorizations()); got != 4 {
		t.Errorf("len(Authorizations) = %d, want 4", got)
	}
	if v.Authorization("default/sel") == nil {
		t.Error("Authorization(default/sel) = nil")
	}
	names := func(ps []*security.Authorization) []string {
		var out []string
		for _, p := range ps {
			out = append(out, p.GetNamespace()+"/"+p.GetName())
		}
		return out
	}
	if got, want := names(v.GlobalAuthorizations()), []string{"istio-system/global"}; !slices.Equal(got, want) {
		t.Errorf("GlobalAuthorizations = %v, want %v", got, want)
	}
	if got, want := names(v.NamespaceAuthorizations("default")), []string{"default/ns"}; !slices.Equal(got, want) {
		t.Errorf("NamespaceAuthorizations(default) = %v, want %v", got, want)
	}

	// A policy change keeps the workload indexes.
	s.ApplyAuthorizations(nil, []string{"default/ns"})
	v2 := s.View()
	if len(v2.NamespaceAuthorizations("default")) != 0 {
		t.Error("removed namespace policy still listed")
	}
	if uid(v2.WorkloadByIP(netip.MustParseAddr("10.0.0.1"))) != uidA {
		t.Error("policy change lost the workload index")
	}
	if len(v.NamespaceAuthorizations("default")) != 1 {
		t.Error("an old View changed")
	}
}

func TestApplyChanges(t *testing.T) {
	s := fixture(t)
	var got []state.Change
	cancel := s.Subscribe(func(c state.Change) {
		c.View = nil
		got = append(got, c)
	})
	before := s.View()

	// Upserting what is already there is not a change.
	s.ApplyAddresses(map[string]*workloadapi.Address{
		uidB: workload(uidB, "b", "10.0.0.2", workloadapi.WorkloadStatus_HEALTHY, svcK),
	}, []string{"not-there"})
	if s.View() != before {
		t.Error("a no-op apply published a new View")
	}

	s.ApplyAddresses(map[string]*workloadapi.Address{
		uidB: workload(uidB, "b", "10.0.0.2", workloadapi.WorkloadStatus_UNHEALTHY, svcK),
		"x":  nil, // ignored
		"y":  {},  // neither workload nor service: ignored
	}, []string{uidC})
	s.ApplyAuthorizations(map[string]*security.Authorization{
		"default/new": policy("default", "new", security.Scope_NAMESPACE),
	}, []string{"other/ns"})
	cancel()
	cancel() // idempotent
	s.ApplyAddresses(nil, []string{uidA})

	want := []state.Change{
		{AddressesUpserted: []string{uidB}, AddressesRemoved: []string{uidC}},
		{AuthorizationsUpserted: []string{"default/new"}, AuthorizationsRemoved: []string{"other/ns"}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("changes:\n got %+v\nwant %+v", got, want)
	}
	if s.WorkloadByUID(uidA) != nil {
		t.Error("removal after cancel was not applied")
	}
}

func TestZeroAllocLookups(t *testing.T) {
	s := fixture(t)
	v := s.View()
	wip := netip.MustParseAddr("10.0.0.1")
	mapped := netip.MustParseAddr("::ffff:10.0.0.1")
	vip := netip.MustParseAddrPort("10.96.0.10:80")
	svc := v.ServiceByVIP(vip)
	lookups := map[string]func(){
		"WorkloadByIP":        func() { _ = s.WorkloadByIP(wip) },
		"WorkloadByIP mapped": func() { _ = s.WorkloadByIP(mapped) },
		"WorkloadByUID":       func() { _ = s.WorkloadByUID(uidA) },
		"ServiceByVIP":        func() { _ = s.ServiceByVIP(vip) },
		"Endpoints":           func() { _ = s.Endpoints(svc) },
		"Authorization":       func() { _ = s.View().Authorization("default/sel") },
		"NamespaceAuthz":      func() { _ = s.View().NamespaceAuthorizations("default") },
	}
	for name, f := range lookups {
		if n := testing.AllocsPerRun(100, f); n != 0 {
			t.Errorf("%s allocates %.1f times per call, want 0", name, n)
		}
	}
}

func TestConcurrentReadsAndWrites(t *testing.T) {
	s := fixture(t)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 2 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				v := s.View()
				if svc := v.ServiceByVIP(netip.MustParseAddrPort("10.96.0.10:80")); svc != nil {
					_ = v.Endpoints(svc)
				}
				_ = s.WorkloadByIP(netip.MustParseAddr("10.0.0.2"))
			}
		})
	}
	for i := range 200 {
		st := workloadapi.WorkloadStatus(i % 2)
		s.ApplyAddresses(map[string]*workloadapi.Address{uidB: workload(uidB, "b", "10.0.0.2", st, svcK)}, nil)
	}
	close(stop)
	wg.Wait()
}

func TestDump(t *testing.T) {
	s := fixture(t)
	d := s.Dump()
	got, err := json.MarshalIndent(d, "", "  ")
	if err != nil {
		t.Fatalf("marshaling dump: %v", err)
	}
	got = append(got, '\n')
	// protojson varies its whitespace on purpose; MarshalIndent re-indents
	// what MarshalJSON returns, so the output is stable.
	golden := filepath.Join("testdata", "dump.golden")
	if os.Getenv("UPDATE_GOLDEN") != "" {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(golden, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("reading golden file (UPDATE_GOLDEN=1 writes it): %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("dump differs from %s (UPDATE_GOLDEN=1 to refresh):\n%s", golden, firstDiff(string(want), string(got)))
	}
	if len(d.Workloads) != 4 || len(d.Services) != 1 || len(d.Authorizations) != 4 {
		t.Errorf("dump has %d workloads, %d services, %d policies; want 4, 1, 4", len(d.Workloads), len(d.Services), len(d.Authorizations))
	}
	if !proto.Equal(d.Services[0].Resource.Message, s.View().ServiceByKey(svcK)) {
		t.Error("dumped service is not the stored one")
	}
}

// firstDiff shows the first line where two texts differ.
func firstDiff(want, got string) string {
	wl, gl := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := range max(len(wl), len(gl)) {
		var w, g string
		if i < len(wl) {
			w = wl[i]
		}
		if i < len(gl) {
			g = gl[i]
		}
		if w != g {
			return fmt.Sprintf("line %d:\nwant %q\n got %q", i+1, w, g)
		}
	}
	return "no difference"
}
