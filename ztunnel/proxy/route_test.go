package proxy

import (
	"net/netip"
	"testing"

	"github.com/ambitmesh/ambit/api/workloadapi"
	"github.com/ambitmesh/ambit/ztunnel/state"
)

func ip(s string) []byte { return netip.MustParseAddr(s).AsSlice() }

func TestRoute(t *testing.T) {
	st := state.New()
	svcKey := "ns1/echo.ns1.svc.cluster.local"
	st.ApplyAddresses(map[string]*workloadapi.Address{
		"Kubernetes//Pod/ns1/echo-1": {Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{
			Uid: "Kubernetes//Pod/ns1/echo-1", Name: "echo-1", Namespace: "ns1", Addresses: [][]byte{ip("10.244.1.5")},
			TunnelProtocol: workloadapi.TunnelProtocol_HBONE, Status: workloadapi.WorkloadStatus_HEALTHY,
			Services: map[string]*workloadapi.PortList{svcKey: {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}},
		}}},
		"Kubernetes//Pod/ns2/plain-1": {Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{
			Uid: "Kubernetes//Pod/ns2/plain-1", Name: "plain-1", Namespace: "ns2", Addresses: [][]byte{ip("10.244.2.7")},
			Status: workloadapi.WorkloadStatus_HEALTHY,
		}}},
		svcKey: {Type: &workloadapi.Address_Service{Service: &workloadapi.Service{
			Name: "echo", Namespace: "ns1", Hostname: "echo.ns1.svc.cluster.local",
			Addresses: []*workloadapi.NetworkAddress{{Address: ip("10.96.0.50")}},
			Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}},
		}}},
		"ns1/empty.ns1.svc.cluster.local": {Type: &workloadapi.Address_Service{Service: &workloadapi.Service{
			Name: "empty", Namespace: "ns1", Hostname: "empty.ns1.svc.cluster.local",
			Addresses: []*workloadapi.NetworkAddress{{Address: ip("10.96.0.51")}},
			Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}},
		}}},
	}, nil)
	w := &workloadProxy{p: &Proxy{opts: Options{Store: st}}}
	tests := []struct {
		name         string
		dst          string
		wantTarget   string
		wantWorkload string
		wantService  string
	}{
		{"service VIP goes to an endpoint's target port", "10.96.0.50:80", "10.244.1.5:8080", "echo-1", "echo"},
		{"pod IP is used as is", "10.244.1.5:9090", "10.244.1.5:9090", "echo-1", ""},
		{"pod outside the mesh is known but not HBONE", "10.244.2.7:80", "10.244.2.7:80", "plain-1", ""},
		{"service without endpoints keeps the VIP", "10.96.0.51:80", "10.96.0.51:80", "", "empty"},
		{"unknown address is passthrough", "192.0.2.1:443", "192.0.2.1:443", "", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := w.route(netip.MustParseAddrPort(tc.dst))
			if r.target.String() != tc.wantTarget {
				t.Errorf("target %s, want %s", r.target, tc.wantTarget)
			}
			if got := r.workload.GetName(); got != tc.wantWorkload {
				t.Errorf("workload %q, want %q", got, tc.wantWorkload)
			}
			if got := r.service.GetName(); got != tc.wantService {
				t.Errorf("service %q, want %q", got, tc.wantService)
			}
		})
	}
}

func TestMetricLabels(t *testing.T) {
	src := &workloadapi.Workload{WorkloadName: "client", Namespace: "b", CanonicalName: "client", CanonicalRevision: "v1", ClusterId: "Kubernetes"}
	ci := &ConnInfo{Reporter: ReporterDestination, Src: src, SrcIdentity: "spiffe://cluster.local/ns/b/sa/client", MutualTLS: true}
	got := map[string]string{}
	for i, v := range ci.labels() {
		got[tcpLabels[i]] = v
	}
	want := map[string]string{
		"reporter": "destination", "source_workload": "client", "source_workload_namespace": "b",
		"source_principal": "cluster.local/ns/b/sa/client", "source_app": "client", "source_version": "v1",
		"destination_workload": "unknown", "destination_principal": "unknown", "destination_service": "unknown",
		"connection_security_policy": "mutual_tls", "request_protocol": "tcp", "response_flags": "-",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
	if len(got) != len(tcpLabels) {
		t.Errorf("%d labels, want %d", len(got), len(tcpLabels))
	}
}
