package xds_test

import (
	"net/netip"
	"slices"
	"testing"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8stypes "k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambitmesh/ambit/api/workloadapi"
	"github.com/ambitmesh/ambit/controller/xds"
)

// Fixtures: plain objects as the informers hold them.

func namespace(name string, labels map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
}

type podOpt func(*corev1.Pod)

// pod returns a running, ready pod in "default" on node-1 with label
// app=echo, service account echo and container port http=8080.
func pod(name, ip string, opts ...podOpt) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: k8stypes.UID("uid-" + name), Labels: map[string]string{"app": "echo"},
			// The node agent has redirected it (it only matters for
			// enrolled pods).
			Annotations: map[string]string{xds.AnnotationRedirection: xds.RedirectionEnabled}},
		Spec: corev1.PodSpec{
			NodeName:           "node-1",
			ServiceAccountName: "echo",
			Containers: []corev1.Container{{
				Name:  "echo",
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}},
			}},
		},
		Status: corev1.PodStatus{
			Phase:      corev1.PodRunning,
			PodIP:      ip,
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
		},
	}
	if ip != "" {
		p.Status.PodIPs = []corev1.PodIP{{IP: ip}}
	}
	for _, o := range opts {
		o(p)
	}
	return p
}

func withLabels(kv ...string) podOpt {
	return func(p *corev1.Pod) {
		for i := 0; i+1 < len(kv); i += 2 {
			p.Labels[kv[i]] = kv[i+1]
		}
	}
}

func withPort(name string, port int32) podOpt {
	return func(p *corev1.Pod) {
		p.Spec.Containers[0].Ports = []corev1.ContainerPort{{Name: name, ContainerPort: port}}
	}
}

func notReady(p *corev1.Pod) { p.Status.Conditions[0].Status = corev1.ConditionFalse }

func phase(ph corev1.PodPhase) podOpt { return func(p *corev1.Pod) { p.Status.Phase = ph } }

type svcOpt func(*corev1.Service)

// service returns a ClusterIP service in "default" selecting app=echo, port
// 80 to target 8080.
func service(name, vip string, opts ...svcOpt) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: corev1.ServiceSpec{
			Selector:   map[string]string{"app": "echo"},
			ClusterIP:  vip,
			ClusterIPs: []string{vip},
			Ports:      []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}},
		},
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

func ports(ps ...corev1.ServicePort) svcOpt {
	return func(s *corev1.Service) { s.Spec.Ports = ps }
}

func selector(kv ...string) svcOpt {
	return func(s *corev1.Service) {
		s.Spec.Selector = map[string]string{}
		for i := 0; i+1 < len(kv); i += 2 {
			s.Spec.Selector[kv[i]] = kv[i+1]
		}
	}
}

func endpointSlice(svc, name string, port int32, portName string, podNames ...string) *discoveryv1.EndpointSlice {
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name, Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &portName, Port: &port}},
	}
	for _, p := range podNames {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{
			Addresses: []string{"10.0.0.1"},
			TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "default", Name: p, UID: k8stypes.UID("uid-" + p)},
		})
	}
	return es
}

const (
	echoKey = "default/echo.default.svc.cluster.local"
	uidA    = "Kubernetes//Pod/default/a"
)

func workloadOf(t *testing.T, got map[string]*workloadapi.Address, uid string) *workloadapi.Workload {
	t.Helper()
	a, ok := got[uid]
	if !ok {
		t.Fatalf("no Address %q; have %v", uid, keys(got))
	}
	if a.GetWorkload() == nil {
		t.Fatalf("Address %q is not a workload", uid)
	}
	return a.GetWorkload()
}

func keys[T any](m map[string]T) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func ipBytes(s string) []byte { return netip.MustParseAddr(s).AsSlice() }

func assertProto(t *testing.T, what string, got, want proto.Message) {
	t.Helper()
	if !proto.Equal(got, want) {
		t.Errorf("%s:\n got %s\nwant %s", what, prototext.Format(got), prototext.Format(want))
	}
}

// TestBuildAddressesFull pins every field of one workload and one service,
// and the resource names.
func TestBuildAddressesFull(t *testing.T) {
	yes := true
	p := pod("echo-5d8f-x2x", "10.0.0.1", withLabels("version", "v1", "pod-template-hash", "5d8f"), func(p *corev1.Pod) {
		p.GenerateName = "echo-5d8f-"
		p.OwnerReferences = []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "echo-5d8f", Controller: &yes}}
	})
	svc := service("echo", "10.96.0.10", ports(
		corev1.ServicePort{Name: "http", Port: 80, TargetPort: intstr.FromString("http")},
		corev1.ServicePort{Name: "grpc", Port: 9000, TargetPort: intstr.FromInt32(9090)},
	))
	got := xds.BuildAddresses(xds.Inputs{
		Namespaces:     []*corev1.Namespace{namespace("default", map[string]string{xds.LabelDataplaneMode: "ambient"})},
		Pods:           []*corev1.Pod{p},
		Services:       []*corev1.Service{svc},
		EndpointSlices: []*discoveryv1.EndpointSlice{endpointSlice("echo", "echo-abc", 8080, "http", p.Name)},
		TrustDomain:    "example.org",
		PolicyKeys: func(got *corev1.Pod) []string {
			if got != p {
				t.Errorf("PolicyKeys got pod %s", got.Name)
			}
			return []string{"default/z", "default/a", "default/z"}
		},
	})
	if want := []string{"Kubernetes//Pod/default/echo-5d8f-x2x", echoKey}; !slices.Equal(keys(got), want) {
		t.Fatalf("resource names = %v, want %v", keys(got), want)
	}
	assertProto(t, "workload", got["Kubernetes//Pod/default/echo-5d8f-x2x"], &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{
		Uid:               "Kubernetes//Pod/default/echo-5d8f-x2x",
		Name:              "echo-5d8f-x2x",
		Namespace:         "default",
		Addresses:         [][]byte{ipBytes("10.0.0.1")},
		TunnelProtocol:    workloadapi.TunnelProtocol_HBONE,
		TrustDomain:       "example.org",
		ServiceAccount:    "echo",
		Node:              "node-1",
		CanonicalName:     "echo",
		CanonicalRevision: "v1",
		WorkloadType:      workloadapi.WorkloadType_POD,
		WorkloadName:      "echo",
		Services: map[string]*workloadapi.PortList{echoKey: {Ports: []*workloadapi.Port{
			{ServicePort: 80, TargetPort: 8080},
			{ServicePort: 9000, TargetPort: 9090},
		}}},
		AuthorizationPolicies: []string{"default/a", "default/z"},
		Status:                workloadapi.WorkloadStatus_HEALTHY,
		ClusterId:             "Kubernetes",
	}}})
	assertProto(t, "service", got[echoKey], &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{
		Name:      "echo",
		Namespace: "default",
		Hostname:  "echo.default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: ipBytes("10.96.0.10")}},
		Ports: []*workloadapi.Port{
			{ServicePort: 80, TargetPort: 8080}, // named, resolved from the EndpointSlice
			{ServicePort: 9000, TargetPort: 9090},
		},
	}}})
}

func TestEnrolment(t *testing.T) {
	tests := []struct {
		name      string
		nsLabels  map[string]string // nil: no Namespace object at all
		podLabels []string
		want      workloadapi.TunnelProtocol
	}{
		{name: "namespace label enrols", nsLabels: map[string]string{xds.LabelDataplaneMode: "ambient"}, want: workloadapi.TunnelProtocol_HBONE},
		{name: "pod none opts out of an ambient namespace", nsLabels: map[string]string{xds.LabelDataplaneMode: "ambient"}, podLabels: []string{xds.LabelDataplaneMode, "none"}, want: workloadapi.TunnelProtocol_NONE},
		{name: "pod ambient enrols in an unlabelled namespace", nsLabels: map[string]string{}, podLabels: []string{xds.LabelDataplaneMode, "ambient"}, want: workloadapi.TunnelProtocol_HBONE},
		{name: "pod ambient wins over namespace none", nsLabels: map[string]string{xds.LabelDataplaneMode: "none"}, podLabels: []string{xds.LabelDataplaneMode, "ambient"}, want: workloadapi.TunnelProtocol_HBONE},
		{name: "pod ambient without a Namespace object", nsLabels: nil, podLabels: []string{xds.LabelDataplaneMode, "ambient"}, want: workloadapi.TunnelProtocol_HBONE},
		{name: "unknown pod value defers to the namespace", nsLabels: map[string]string{xds.LabelDataplaneMode: "ambient"}, podLabels: []string{xds.LabelDataplaneMode, "sidecar"}, want: workloadapi.TunnelProtocol_HBONE},
		{name: "neither labelled: out of the mesh but still sent", nsLabels: map[string]string{}, want: workloadapi.TunnelProtocol_NONE},
		{name: "namespace none", nsLabels: map[string]string{xds.LabelDataplaneMode: "none"}, want: workloadapi.TunnelProtocol_NONE},
		{name: "namespace with another value", nsLabels: map[string]string{xds.LabelDataplaneMode: "Ambient"}, want: workloadapi.TunnelProtocol_NONE},
		{name: "label of another namespace does not count", nsLabels: map[string]string{}, podLabels: nil, want: workloadapi.TunnelProtocol_NONE},
	}
	t.Run("enrolled but not yet redirected by the node agent", func(t *testing.T) {
		p := pod("a", "10.0.0.1")
		delete(p.Annotations, xds.AnnotationRedirection)
		in := xds.Inputs{Pods: []*corev1.Pod{p}, Namespaces: []*corev1.Namespace{namespace("default", map[string]string{xds.LabelDataplaneMode: "ambient"})}}
		if got := workloadOf(t, xds.BuildAddresses(in), uidA).GetTunnelProtocol(); got != workloadapi.TunnelProtocol_NONE {
			t.Errorf("tunnel_protocol = %v before redirection, want NONE", got)
		}
	})
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := xds.Inputs{
				Pods: []*corev1.Pod{pod("a", "10.0.0.1", withLabels(tc.podLabels...))},
				// An enrolled namespace next door must not leak.
				Namespaces: []*corev1.Namespace{namespace("other", map[string]string{xds.LabelDataplaneMode: "ambient"})},
			}
			if tc.nsLabels != nil {
				in.Namespaces = append(in.Namespaces, namespace("default", tc.nsLabels))
			}
			w := workloadOf(t, xds.BuildAddresses(in), uidA)
			if w.GetTunnelProtocol() != tc.want {
				t.Errorf("tunnel_protocol = %v, want %v", w.GetTunnelProtocol(), tc.want)
			}
			ns := tc.nsLabels
			if ns == nil {
				ns = map[string]string{}
			}
			podLabels := map[string]string{}
			for i := 0; i+1 < len(tc.podLabels); i += 2 {
				podLabels[tc.podLabels[i]] = tc.podLabels[i+1]
			}
			if got := xds.Enrolled(ns, podLabels); got != (tc.want == workloadapi.TunnelProtocol_HBONE) {
				t.Errorf("Enrolled = %v, disagrees with tunnel_protocol %v", got, tc.want)
			}
		})
	}
}

func TestPodInclusionAndStatus(t *testing.T) {
	deleting := metav1.Now()
	tests := []struct {
		name       string
		pod        *corev1.Pod
		wantIn     bool
		wantStatus workloadapi.WorkloadStatus
		wantIPs    []string
	}{
		{name: "running and ready", pod: pod("a", "10.0.0.1"), wantIn: true, wantStatus: workloadapi.WorkloadStatus_HEALTHY, wantIPs: []string{"10.0.0.1"}},
		{name: "not ready", pod: pod("a", "10.0.0.1", notReady), wantIn: true, wantStatus: workloadapi.WorkloadStatus_UNHEALTHY, wantIPs: []string{"10.0.0.1"}},
		{name: "no ready condition yet", pod: pod("a", "10.0.0.1", func(p *corev1.Pod) { p.Status.Conditions = nil }), wantIn: true, wantStatus: workloadapi.WorkloadStatus_UNHEALTHY, wantIPs: []string{"10.0.0.1"}},
		{name: "pending with an IP (init containers running)", pod: pod("a", "10.0.0.1", phase(corev1.PodPending), notReady), wantIn: true, wantStatus: workloadapi.WorkloadStatus_UNHEALTHY, wantIPs: []string{"10.0.0.1"}},
		{name: "terminating", pod: pod("a", "10.0.0.1", func(p *corev1.Pod) { p.DeletionTimestamp = &deleting }), wantIn: true, wantStatus: workloadapi.WorkloadStatus_UNHEALTHY, wantIPs: []string{"10.0.0.1"}},
		{name: "dual stack", pod: pod("a", "10.0.0.1", func(p *corev1.Pod) { p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: "fd00::1"}) }), wantIn: true, wantStatus: workloadapi.WorkloadStatus_HEALTHY, wantIPs: []string{"10.0.0.1", "fd00::1"}},
		{name: "only the legacy podIP field", pod: pod("a", "10.0.0.1", func(p *corev1.Pod) { p.Status.PodIPs = nil }), wantIn: true, wantStatus: workloadapi.WorkloadStatus_HEALTHY, wantIPs: []string{"10.0.0.1"}},
		{name: "no IP yet", pod: pod("a", "", phase(corev1.PodPending)), wantIn: false},
		{name: "succeeded", pod: pod("a", "10.0.0.1", phase(corev1.PodSucceeded)), wantIn: false},
		{name: "failed", pod: pod("a", "10.0.0.1", phase(corev1.PodFailed)), wantIn: false},
		{name: "host network", pod: pod("a", "192.168.1.5", func(p *corev1.Pod) { p.Spec.HostNetwork = true }), wantIn: false},
		{name: "unparsable IP", pod: pod("a", "10.0.0.300"), wantIn: false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := xds.BuildAddresses(xds.Inputs{Pods: []*corev1.Pod{tc.pod}})
			if _, in := got[uidA]; in != tc.wantIn {
				t.Fatalf("present = %v, want %v", in, tc.wantIn)
			}
			if !tc.wantIn {
				return
			}
			w := got[uidA].GetWorkload()
			if w.GetStatus() != tc.wantStatus {
				t.Errorf("status = %v, want %v", w.GetStatus(), tc.wantStatus)
			}
			var ips []string
			for _, b := range w.GetAddresses() {
				a, _ := netip.AddrFromSlice(b)
				ips = append(ips, a.String())
			}
			if !slices.Equal(ips, tc.wantIPs) {
				t.Errorf("addresses = %v, want %v", ips, tc.wantIPs)
			}
		})
	}
}

func TestWorkloadServices(t *testing.T) {
	udp := corev1.ServicePort{Name: "dns", Port: 53, TargetPort: intstr.FromInt32(53), Protocol: corev1.ProtocolUDP}
	type portMap = map[string][][2]uint32 // service key -> [service port, target port]
	tests := []struct {
		name     string
		pod      *corev1.Pod
		services []*corev1.Service
		slices   []*discoveryv1.EndpointSlice
		want     portMap
	}{
		{
			name:     "numeric target port",
			pod:      pod("a", "10.0.0.1"),
			services: []*corev1.Service{service("echo", "10.96.0.10")},
			want:     portMap{echoKey: {{80, 8080}}},
		},
		{
			name:     "unset target port means the service port",
			pod:      pod("a", "10.0.0.1"),
			services: []*corev1.Service{service("echo", "10.96.0.10", ports(corev1.ServicePort{Port: 80}))},
			want:     portMap{echoKey: {{80, 80}}},
		},
		{
			name:     "named target port resolves on the pod",
			pod:      pod("a", "10.0.0.1", withPort("http", 9999)),
			services: []*corev1.Service{service("echo", "10.96.0.10", ports(corev1.ServicePort{Port: 80, TargetPort: intstr.FromString("http")}))},
			want:     portMap{echoKey: {{80, 9999}}},
		},
		{
			name: "named target port the pod lacks is left out",
			pod:  pod("a", "10.0.0.1", withPort("web", 9999)),
			services: []*corev1.Service{service("echo", "10.96.0.10", ports(
				corev1.ServicePort{Name: "http", Port: 80, TargetPort: intstr.FromString("http")},
				corev1.ServicePort{Name: "admin", Port: 81, TargetPort: intstr.FromInt32(9000)},
			))},
			want: portMap{echoKey: {{81, 9000}}},
		},
		{
			name: "multiple services",
			pod:  pod("a", "10.0.0.1", withLabels("tier", "web")),
			services: []*corev1.Service{
				service("echo", "10.96.0.10"),
				service("web", "10.96.0.11", selector("tier", "web"), ports(corev1.ServicePort{Port: 443, TargetPort: intstr.FromInt32(8443)})),
				service("other", "10.96.0.12", selector("app", "other")),
			},
			want: portMap{echoKey: {{80, 8080}}, "default/web.default.svc.cluster.local": {{443, 8443}}},
		},
		{
			name:     "selector must match every label",
			pod:      pod("a", "10.0.0.1"),
			services: []*corev1.Service{service("echo", "10.96.0.10", selector("app", "echo", "tier", "web"))},
			want:     portMap{},
		},
		{
			name:     "services of another namespace do not select",
			pod:      pod("a", "10.0.0.1"),
			services: []*corev1.Service{service("echo", "10.96.0.10", func(s *corev1.Service) { s.Namespace = "other" })},
			want:     portMap{},
		},
		{
			name:     "UDP ports are not proxied",
			pod:      pod("a", "10.0.0.1"),
			services: []*corev1.Service{service("echo", "10.96.0.10", ports(udp, corev1.ServicePort{Port: 53, TargetPort: intstr.FromInt32(5353)}))},
			want:     portMap{echoKey: {{53, 5353}}},
		},
		{
			name:     "selectorless service through its EndpointSlice",
			pod:      pod("a", "10.0.0.1"),
			services: []*corev1.Service{service("echo", "10.96.0.10", selector(), ports(corev1.ServicePort{Name: "http", Port: 80, TargetPort: intstr.FromInt32(1)}))},
			slices: []*discoveryv1.EndpointSlice{
				endpointSlice("echo", "echo-v4", 7070, "http", "a"),
				endpointSlice("echo", "echo-v4b", 7070, "http", "a"), // a second slice naming it again
			},
			want: portMap{echoKey: {{80, 7070}}},
		},
		{
			name:     "EndpointSlice naming an earlier pod of the same name",
			pod:      pod("a", "10.0.0.1", func(p *corev1.Pod) { p.UID = "new" }),
			services: []*corev1.Service{service("echo", "10.96.0.10", selector())},
			slices:   []*discoveryv1.EndpointSlice{endpointSlice("echo", "echo-v4", 7070, "http", "a")},
			want:     portMap{},
		},
		{
			name:     "ExternalName services have no endpoints",
			pod:      pod("a", "10.0.0.1"),
			services: []*corev1.Service{service("echo", "", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeExternalName })},
			want:     portMap{},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := xds.BuildAddresses(xds.Inputs{Pods: []*corev1.Pod{tc.pod}, Services: tc.services, EndpointSlices: tc.slices})
			w := workloadOf(t, got, uidA)
			gotMap := portMap{}
			for k, pl := range w.GetServices() {
				gotMap[k] = [][2]uint32{}
				for _, p := range pl.GetPorts() {
					gotMap[k] = append(gotMap[k], [2]uint32{p.GetServicePort(), p.GetTargetPort()})
				}
			}
			if !equalPortMaps(gotMap, tc.want) {
				t.Errorf("services = %v, want %v", gotMap, tc.want)
			}
		})
	}
}

func equalPortMaps(a, b map[string][][2]uint32) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || !slices.Equal(v, w) {
			return false
		}
	}
	return true
}

func TestServices(t *testing.T) {
	local := corev1.ServiceInternalTrafficPolicyLocal
	preferClose := corev1.ServiceTrafficDistributionPreferClose
	named := ports(corev1.ServicePort{Name: "http", Port: 80, TargetPort: intstr.FromString("http")})
	tests := []struct {
		name     string
		svc      *corev1.Service
		slices   []*discoveryv1.EndpointSlice
		wantIn   bool
		want     *workloadapi.Service // compared where set
		wantPort uint32               // target port of the first port
	}{
		{name: "cluster IP", svc: service("echo", "10.96.0.10"), wantIn: true, wantPort: 8080,
			want: &workloadapi.Service{Addresses: []*workloadapi.NetworkAddress{{Address: ipBytes("10.96.0.10")}}}},
		{name: "dual stack", svc: service("echo", "10.96.0.10", func(s *corev1.Service) { s.Spec.ClusterIPs = []string{"10.96.0.10", "fd00:96::10"} }), wantIn: true, wantPort: 8080,
			want: &workloadapi.Service{Addresses: []*workloadapi.NetworkAddress{{Address: ipBytes("10.96.0.10")}, {Address: ipBytes("fd00:96::10")}}}},
		{name: "headless", svc: service("echo", corev1.ClusterIPNone), wantIn: true, wantPort: 8080, want: &workloadapi.Service{}},
		{name: "named target port, endpoints agree", svc: service("echo", "10.96.0.10", named), wantIn: true, wantPort: 8080,
			slices: []*discoveryv1.EndpointSlice{endpointSlice("echo", "s1", 8080, "http", "a"), endpointSlice("echo", "s2", 8080, "http", "b")}},
		{name: "named target port, endpoints disagree", svc: service("echo", "10.96.0.10", named), wantIn: true, wantPort: 0,
			slices: []*discoveryv1.EndpointSlice{endpointSlice("echo", "s1", 8080, "http", "a"), endpointSlice("echo", "s2", 9090, "http", "b")}},
		{name: "named target port, no endpoints", svc: service("echo", "10.96.0.10", named), wantIn: true, wantPort: 0},
		{name: "named target port, slices of another service", svc: service("echo", "10.96.0.10", named), wantIn: true, wantPort: 0,
			slices: []*discoveryv1.EndpointSlice{endpointSlice("other", "s1", 8080, "http", "a")}},
		{name: "subject alt names", wantIn: true, wantPort: 8080,
			svc: service("echo", "10.96.0.10", func(s *corev1.Service) {
				s.Annotations = map[string]string{
					"alpha.istio.io/kubernetes-serviceaccounts": "echo, admin",
					"alpha.istio.io/canonical-serviceaccounts":  "spiffe://other.org/ns/x/sa/y",
				}
			}),
			want: &workloadapi.Service{SubjectAltNames: []string{
				"spiffe://cluster.local/ns/default/sa/echo", "spiffe://cluster.local/ns/default/sa/admin", "spiffe://other.org/ns/x/sa/y",
			}}},
		{name: "internal traffic policy Local", wantIn: true, wantPort: 8080,
			svc: service("echo", "10.96.0.10", func(s *corev1.Service) { s.Spec.InternalTrafficPolicy = &local }),
			want: &workloadapi.Service{LoadBalancing: &workloadapi.LoadBalancing{
				RoutingPreference: []workloadapi.LoadBalancing_Scope{workloadapi.LoadBalancing_NODE},
				Mode:              workloadapi.LoadBalancing_STRICT,
			}}},
		{name: "traffic distribution PreferClose", wantIn: true, wantPort: 8080,
			svc: service("echo", "10.96.0.10", func(s *corev1.Service) { s.Spec.TrafficDistribution = &preferClose }),
			want: &workloadapi.Service{LoadBalancing: &workloadapi.LoadBalancing{
				RoutingPreference: []workloadapi.LoadBalancing_Scope{
					workloadapi.LoadBalancing_NETWORK, workloadapi.LoadBalancing_REGION, workloadapi.LoadBalancing_ZONE, workloadapi.LoadBalancing_SUBZONE,
				},
				Mode: workloadapi.LoadBalancing_FAILOVER,
			}}},
		{name: "ExternalName is not sent", svc: service("echo", "", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeExternalName }), wantIn: false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := xds.BuildAddresses(xds.Inputs{Services: []*corev1.Service{tc.svc}, EndpointSlices: tc.slices})
			a, in := got[echoKey]
			if in != tc.wantIn {
				t.Fatalf("present = %v, want %v (have %v)", in, tc.wantIn, keys(got))
			}
			if !in {
				return
			}
			s := a.GetService()
			if s.GetName() != "echo" || s.GetNamespace() != "default" || s.GetHostname() != "echo.default.svc.cluster.local" {
				t.Errorf("identity = %s/%s %s", s.GetNamespace(), s.GetName(), s.GetHostname())
			}
			if got := s.GetPorts()[0].GetTargetPort(); got != tc.wantPort {
				t.Errorf("target port = %d, want %d", got, tc.wantPort)
			}
			if tc.want == nil {
				return
			}
			if tc.want.Addresses != nil || tc.name == "headless" {
				assertProto(t, "addresses", &workloadapi.Service{Addresses: s.GetAddresses()}, &workloadapi.Service{Addresses: tc.want.Addresses})
			}
			if tc.want.SubjectAltNames != nil && !slices.Equal(s.GetSubjectAltNames(), tc.want.SubjectAltNames) {
				t.Errorf("subject_alt_names = %v, want %v", s.GetSubjectAltNames(), tc.want.SubjectAltNames)
			}
			if tc.want.LoadBalancing != nil {
				assertProto(t, "load_balancing", s.GetLoadBalancing(), tc.want.LoadBalancing)
			}
		})
	}
}

func TestWorkloadNames(t *testing.T) {
	yes := true
	owned := func(kind, name string) podOpt {
		return func(p *corev1.Pod) {
			p.GenerateName = name + "-"
			p.OwnerReferences = []metav1.OwnerReference{{Kind: kind, Name: name, Controller: &yes}}
		}
	}
	tests := []struct {
		name          string
		pod           *corev1.Pod
		wantWorkload  string
		wantCanonical string
		wantRevision  string
	}{
		{name: "bare pod", pod: pod("a", "10.0.0.1", func(p *corev1.Pod) { delete(p.Labels, "app") }), wantWorkload: "a", wantCanonical: "a", wantRevision: "latest"},
		{name: "deployment", pod: pod("a", "10.0.0.1", owned("ReplicaSet", "echo-5d8f"), withLabels("pod-template-hash", "5d8f")), wantWorkload: "echo", wantCanonical: "echo", wantRevision: "latest"},
		{name: "replicaset without a deployment", pod: pod("a", "10.0.0.1", owned("ReplicaSet", "echo-rs")), wantWorkload: "echo-rs", wantCanonical: "echo", wantRevision: "latest"},
		{name: "cronjob", pod: pod("a", "10.0.0.1", owned("Job", "backup-28930000")), wantWorkload: "backup", wantCanonical: "echo", wantRevision: "latest"},
		{name: "job", pod: pod("a", "10.0.0.1", owned("Job", "migrate")), wantWorkload: "migrate", wantCanonical: "echo", wantRevision: "latest"},
		{name: "statefulset", pod: pod("a", "10.0.0.1", owned("StatefulSet", "db")), wantWorkload: "db", wantCanonical: "echo", wantRevision: "latest"},
		{name: "workload-name label wins", pod: pod("a", "10.0.0.1", owned("StatefulSet", "db"), withLabels("service.istio.io/workload-name", "store")), wantWorkload: "store", wantCanonical: "echo", wantRevision: "latest"},
		{name: "app.kubernetes.io labels win over app/version", pod: pod("a", "10.0.0.1", withLabels("app.kubernetes.io/name", "shop", "app.kubernetes.io/version", "2", "version", "1")), wantWorkload: "a", wantCanonical: "shop", wantRevision: "2"},
		{name: "canonical labels win", pod: pod("a", "10.0.0.1", withLabels("service.istio.io/canonical-name", "c", "service.istio.io/canonical-revision", "r", "app.kubernetes.io/name", "shop")), wantWorkload: "a", wantCanonical: "c", wantRevision: "r"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w := workloadOf(t, xds.BuildAddresses(xds.Inputs{Pods: []*corev1.Pod{tc.pod}}), uidA)
			if w.GetWorkloadName() != tc.wantWorkload || w.GetCanonicalName() != tc.wantCanonical || w.GetCanonicalRevision() != tc.wantRevision {
				t.Errorf("workload_name, canonical_name, canonical_revision = %q, %q, %q; want %q, %q, %q",
					w.GetWorkloadName(), w.GetCanonicalName(), w.GetCanonicalRevision(), tc.wantWorkload, tc.wantCanonical, tc.wantRevision)
			}
			if w.GetWorkloadType() != workloadapi.WorkloadType_POD {
				t.Errorf("workload_type = %v, want POD", w.GetWorkloadType())
			}
		})
	}
}

func TestMeshSettings(t *testing.T) {
	got := xds.BuildAddresses(xds.Inputs{
		Pods:         []*corev1.Pod{pod("a", "10.0.0.1", func(p *corev1.Pod) { p.Spec.ServiceAccountName = "" })},
		Services:     []*corev1.Service{service("echo", "10.96.0.10")},
		ClusterID:    "east",
		Network:      "net1",
		DomainSuffix: "example.internal",
	})
	w := workloadOf(t, got, "east//Pod/default/a")
	if w.GetClusterId() != "east" || w.GetNetwork() != "net1" || w.GetTrustDomain() != "cluster.local" || w.GetServiceAccount() != "default" {
		t.Errorf("cluster_id, network, trust_domain, service_account = %q, %q, %q, %q", w.GetClusterId(), w.GetNetwork(), w.GetTrustDomain(), w.GetServiceAccount())
	}
	key := "default/echo.default.svc.example.internal"
	if _, ok := w.GetServices()[key]; !ok {
		t.Errorf("services = %v, want key %s", keys(w.GetServices()), key)
	}
	s := got[key].GetService()
	if s.GetAddresses()[0].GetNetwork() != "net1" {
		t.Errorf("service network = %q", s.GetAddresses()[0].GetNetwork())
	}
	if xds.WorkloadUID("Kubernetes", "ns", "p") != "Kubernetes//Pod/ns/p" {
		t.Error("WorkloadUID does not follow istiod's <cluster>/<group>/<kind>/<ns>/<name>")
	}
}
