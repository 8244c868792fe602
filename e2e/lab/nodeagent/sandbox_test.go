package nodeagent

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestResolvConf(t *testing.T) {
	ndots := "2"
	tests := []struct {
		name string
		spec corev1.PodSpec
		want string
	}{
		{"default policy is ClusterFirst", corev1.PodSpec{},
			"nameserver 10.96.0.10\nsearch ns1.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"},
		{"host network falls back to the host's", corev1.PodSpec{HostNetwork: true}, ""},
		{"ClusterFirstWithHostNet", corev1.PodSpec{HostNetwork: true, DNSPolicy: corev1.DNSClusterFirstWithHostNet},
			"nameserver 10.96.0.10\nsearch ns1.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"},
		{"Default keeps the host's", corev1.PodSpec{DNSPolicy: corev1.DNSDefault}, ""},
		{"None with dnsConfig", corev1.PodSpec{DNSPolicy: corev1.DNSNone, DNSConfig: &corev1.PodDNSConfig{
			Nameservers: []string{"1.2.3.4"}, Searches: []string{"x.local"},
			Options: []corev1.PodDNSConfigOption{{Name: "ndots", Value: &ndots}, {Name: "edns0"}}}},
			"nameserver 1.2.3.4\nsearch x.local\noptions ndots:2 edns0\n"},
		{"ClusterFirst plus dnsConfig", corev1.PodSpec{DNSConfig: &corev1.PodDNSConfig{Searches: []string{"extra"}}},
			"nameserver 10.96.0.10\nsearch ns1.svc.cluster.local svc.cluster.local cluster.local extra\noptions ndots:5\n"},
	}
	a := New(Options{ClusterDNS: "10.96.0.10"})
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns1"}, Spec: tc.spec}
			if got := a.resolvConf(pod); got != tc.want {
				t.Errorf("got\n%s\nwant\n%s", got, tc.want)
			}
		})
	}
}

func TestHostsFile(t *testing.T) {
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p"}, Spec: corev1.PodSpec{
		HostAliases: []corev1.HostAlias{{IP: "10.1.1.1", Hostnames: []string{"a", "b"}}},
	}}
	want := "# Kubernetes-managed hosts file (ambit lab).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n10.244.1.5\tp\n10.1.1.1\ta\tb\n"
	if got := hostsFile(pod, "10.244.1.5"); got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
}
