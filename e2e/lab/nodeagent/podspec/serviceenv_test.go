package podspec

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func svc(ns, name, ip string, ports ...corev1.ServicePort) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec:       corev1.ServiceSpec{ClusterIP: ip, Ports: ports},
	}
}

func port(name string, p int32, proto corev1.Protocol) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Port: p, Protocol: proto}
}

// kubernetesVars is what every pod gets for the API server's Service.
var kubernetesVars = []string{
	"KUBERNETES_SERVICE_HOST=10.96.0.1",
	"KUBERNETES_SERVICE_PORT=443",
	"KUBERNETES_SERVICE_PORT_HTTPS=443",
	"KUBERNETES_PORT=tcp://10.96.0.1:443",
	"KUBERNETES_PORT_443_TCP=tcp://10.96.0.1:443",
	"KUBERNETES_PORT_443_TCP_PROTO=tcp",
	"KUBERNETES_PORT_443_TCP_PORT=443",
	"KUBERNETES_PORT_443_TCP_ADDR=10.96.0.1",
}

func TestServiceEnv(t *testing.T) {
	kubernetes := svc("default", "kubernetes", "10.96.0.1", port("https", 443, corev1.ProtocolTCP))
	web := svc("shop", "web-front", "10.96.0.20", port("", 80, ""), port("metrics", 9090, corev1.ProtocolTCP))
	dns := svc("shop", "dns", "10.96.0.10", port("dns", 53, corev1.ProtocolUDP))
	webVars := []string{
		"WEB_FRONT_SERVICE_HOST=10.96.0.20",
		"WEB_FRONT_SERVICE_PORT=80",
		"WEB_FRONT_SERVICE_PORT_METRICS=9090",
		"WEB_FRONT_PORT=tcp://10.96.0.20:80",
		"WEB_FRONT_PORT_80_TCP=tcp://10.96.0.20:80",
		"WEB_FRONT_PORT_80_TCP_PROTO=tcp",
		"WEB_FRONT_PORT_80_TCP_PORT=80",
		"WEB_FRONT_PORT_80_TCP_ADDR=10.96.0.20",
		"WEB_FRONT_PORT_9090_TCP=tcp://10.96.0.20:9090",
		"WEB_FRONT_PORT_9090_TCP_PROTO=tcp",
		"WEB_FRONT_PORT_9090_TCP_PORT=9090",
		"WEB_FRONT_PORT_9090_TCP_ADDR=10.96.0.20",
	}
	dnsVars := []string{
		"DNS_SERVICE_HOST=10.96.0.10",
		"DNS_SERVICE_PORT=53",
		"DNS_SERVICE_PORT_DNS=53",
		"DNS_PORT=udp://10.96.0.10:53",
		"DNS_PORT_53_UDP=udp://10.96.0.10:53",
		"DNS_PORT_53_UDP_PROTO=udp",
		"DNS_PORT_53_UDP_PORT=53",
		"DNS_PORT_53_UDP_ADDR=10.96.0.10",
	}

	tests := []struct {
		name     string
		ns       string
		links    bool
		services []*corev1.Service
		want     []string
	}{
		{name: "no services", ns: "shop", links: true},
		{
			name: "kubernetes service only", ns: "shop", links: true,
			services: []*corev1.Service{kubernetes},
			want:     kubernetesVars,
		},
		{
			name: "kubernetes service even without service links", ns: "shop", links: false,
			services: []*corev1.Service{kubernetes, web},
			want:     kubernetesVars,
		},
		{
			name: "services of the pod's namespace, sorted by name", ns: "shop", links: true,
			services: []*corev1.Service{web, kubernetes, dns},
			want:     slices.Concat(dnsVars, kubernetesVars, webVars),
		},
		{
			name: "services of other namespaces ignored", ns: "other", links: true,
			services: []*corev1.Service{web, dns, kubernetes},
			want:     kubernetesVars,
		},
		{
			name: "other default services only with service links", ns: "default", links: false,
			services: []*corev1.Service{kubernetes, svc("default", "db", "10.96.0.30", port("", 5432, ""))},
			want:     kubernetesVars,
		},
		{
			name: "headless and ExternalName services ignored", ns: "shop", links: true,
			services: []*corev1.Service{
				svc("shop", "headless", corev1.ClusterIPNone, port("", 80, "")),
				svc("shop", "external", "", port("", 80, "")),
				svc("shop", "portless", "10.96.0.40"),
			},
		},
		{
			name: "a kubernetes service of the pod's namespace wins", ns: "shop", links: true,
			services: []*corev1.Service{kubernetes, svc("shop", "kubernetes", "10.96.0.99", port("", 8080, ""))},
			want: []string{
				"KUBERNETES_SERVICE_HOST=10.96.0.99",
				"KUBERNETES_SERVICE_PORT=8080",
				"KUBERNETES_PORT=tcp://10.96.0.99:8080",
				"KUBERNETES_PORT_8080_TCP=tcp://10.96.0.99:8080",
				"KUBERNETES_PORT_8080_TCP_PROTO=tcp",
				"KUBERNETES_PORT_8080_TCP_PORT=8080",
				"KUBERNETES_PORT_8080_TCP_ADDR=10.96.0.99",
			},
		},
		{
			name: "IPv6 cluster IP in brackets", ns: "v6", links: true,
			services: []*corev1.Service{svc("v6", "api", "fd00::1", port("grpc-web", 8443, corev1.ProtocolSCTP))},
			want: []string{
				"API_SERVICE_HOST=fd00::1",
				"API_SERVICE_PORT=8443",
				"API_SERVICE_PORT_GRPC_WEB=8443",
				"API_PORT=sctp://[fd00::1]:8443",
				"API_PORT_8443_SCTP=sctp://[fd00::1]:8443",
				"API_PORT_8443_SCTP_PROTO=sctp",
				"API_PORT_8443_SCTP_PORT=8443",
				"API_PORT_8443_SCTP_ADDR=fd00::1",
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := envStrings(ServiceEnv(tc.ns, tc.links, tc.services))
			if !slices.Equal(got, tc.want) {
				t.Errorf("ServiceEnv =\n%q\nwant\n%q", got, tc.want)
			}
		})
	}
}

func envStrings(env []corev1.EnvVar) []string {
	var out []string
	for _, e := range env {
		out = append(out, e.Name+"="+e.Value)
	}
	return out
}
