package podspec

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

func testPod() *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace:   "shop",
			Name:        "web-0",
			UID:         "4f9d2c1e-0000-4000-8000-000000000001",
			Labels:      map[string]string{"app": "web", "tier": "front"},
			Annotations: map[string]string{"note": "say \"hi\"\n", "example.com/owner": "team-a"},
		},
		Spec: corev1.PodSpec{
			NodeName:           "lab-node-1",
			ServiceAccountName: "web",
			Containers: []corev1.Container{{
				Name: "app",
				Resources: corev1.ResourceRequirements{
					Requests: corev1.ResourceList{
						corev1.ResourceCPU:    resource.MustParse("250m"),
						corev1.ResourceMemory: resource.MustParse("64Mi"),
					},
					Limits: corev1.ResourceList{
						corev1.ResourceCPU:    resource.MustParse("1500m"),
						corev1.ResourceMemory: resource.MustParse("128Mi"),
						"hugepages-2Mi":       resource.MustParse("4Mi"),
					},
				},
			}, {
				Name: "sidecar",
			}},
			InitContainers: []corev1.Container{{
				Name: "init",
				Resources: corev1.ResourceRequirements{
					Limits: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("2")},
				},
			}},
		},
		Status: corev1.PodStatus{
			PodIP:  "10.244.1.7",
			PodIPs: []corev1.PodIP{{IP: "10.244.1.7"}, {IP: "fd00:10:244::7"}},
		},
	}
}

func TestFieldRefValue(t *testing.T) {
	hostIPs := []string{"192.168.1.10"}
	tests := []struct {
		name    string
		path    string
		version string
		pod     func(*corev1.Pod)
		hostIPs []string
		want    string
		wantErr string
	}{
		{name: "name", path: "metadata.name", want: "web-0"},
		{name: "namespace", path: "metadata.namespace", want: "shop"},
		{name: "uid", path: "metadata.uid", want: "4f9d2c1e-0000-4000-8000-000000000001"},
		{name: "explicit v1", path: "metadata.name", version: "v1", want: "web-0"},
		{name: "other version", path: "metadata.name", version: "v2", wantErr: "unsupported pod version"},
		{name: "all labels", path: "metadata.labels", want: "app=\"web\"\ntier=\"front\""},
		{name: "all annotations, quoted", path: "metadata.annotations", want: "example.com/owner=\"team-a\"\nnote=\"say \\\"hi\\\"\\n\""},
		{name: "no labels", path: "metadata.labels", pod: func(p *corev1.Pod) { p.Labels = nil }, want: ""},
		{name: "one label", path: "metadata.labels['tier']", want: "front"},
		{name: "missing label", path: "metadata.labels['nope']", want: ""},
		{name: "one annotation with prefix", path: "metadata.annotations['example.com/owner']", want: "team-a"},
		{name: "annotation key checked in lower case", path: "metadata.annotations['Note']", want: ""},
		{name: "invalid label key", path: "metadata.labels['a b']", wantErr: "invalid key"},
		{name: "subscript on a plain field", path: "metadata.name['x']", wantErr: "does not support a subscript"},
		{name: "node name", path: "spec.nodeName", want: "lab-node-1"},
		{name: "legacy spec.host", path: "spec.host", want: "lab-node-1"},
		{name: "service account", path: "spec.serviceAccountName", want: "web"},
		{name: "host IP", path: "status.hostIP", hostIPs: hostIPs, want: "192.168.1.10"},
		{name: "host IPs", path: "status.hostIPs", hostIPs: []string{"192.168.1.10", "fd00::10"}, want: "192.168.1.10,fd00::10"},
		{name: "host IP unknown", path: "status.hostIP", wantErr: "no IP"},
		{name: "pod IP", path: "status.podIP", hostIPs: hostIPs, want: "10.244.1.7"},
		{name: "pod IPs", path: "status.podIPs", hostIPs: hostIPs, want: "10.244.1.7,fd00:10:244::7"},
		{name: "pod IPs follow an IPv6 node", path: "status.podIPs", hostIPs: []string{"fd00::10"}, want: "fd00:10:244::7,10.244.1.7"},
		{name: "pod IP of an IPv6 node", path: "status.podIP", hostIPs: []string{"fd00::10"}, want: "fd00:10:244::7"},
		{
			name: "pod IP from the singular field", path: "status.podIP", hostIPs: hostIPs,
			pod:  func(p *corev1.Pod) { p.Status.PodIPs = nil },
			want: "10.244.1.7",
		},
		{
			name: "pod IP not known yet", path: "status.podIP",
			pod:  func(p *corev1.Pod) { p.Status = corev1.PodStatus{} },
			want: "",
		},
		{name: "unsupported field", path: "spec.restartPolicy", wantErr: "unsupported field"},
		{name: "garbage", path: "status", wantErr: "unsupported field"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pod := testPod()
			if tc.pod != nil {
				tc.pod(pod)
			}
			got, err := FieldRefValue(&corev1.ObjectFieldSelector{APIVersion: tc.version, FieldPath: tc.path}, pod, tc.hostIPs)
			checkErr(t, err, tc.wantErr)
			if err == nil && got != tc.want {
				t.Errorf("FieldRefValue(%s) = %q, want %q", tc.path, got, tc.want)
			}
		})
	}
}

func TestFormatMap(t *testing.T) {
	tests := []struct {
		name string
		m    map[string]string
		want string
	}{
		{"nil", nil, ""},
		{"one", map[string]string{"a": "1"}, `a="1"`},
		{"sorted", map[string]string{"b": "2", "a": "1"}, "a=\"1\"\nb=\"2\""},
		{"escapes", map[string]string{"k": "tab\there \"q\" é"}, `k="tab\there \"q\" é"`},
		{"empty value", map[string]string{"k": ""}, `k=""`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := FormatMap(tc.m); got != tc.want {
				t.Errorf("FormatMap = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestResourceValue(t *testing.T) {
	alloc := corev1.ResourceList{
		corev1.ResourceCPU:              resource.MustParse("2"),
		corev1.ResourceMemory:           resource.MustParse("8Gi"),
		corev1.ResourceEphemeralStorage: resource.MustParse("20Gi"),
	}
	tests := []struct {
		name      string
		resource  string
		container string
		divisor   string
		alloc     corev1.ResourceList
		want      string
		wantErr   string
	}{
		{name: "cpu limit rounds up to cores", resource: "limits.cpu", want: "2"},
		{name: "cpu limit in millicores", resource: "limits.cpu", divisor: "1m", want: "1500"},
		{name: "cpu request rounds up", resource: "requests.cpu", want: "1"},
		{name: "cpu request in millicores", resource: "requests.cpu", divisor: "1m", want: "250"},
		{name: "memory limit in bytes", resource: "limits.memory", want: "134217728"},
		{name: "memory limit in Mi", resource: "limits.memory", divisor: "1Mi", want: "128"},
		{name: "memory request in Mi", resource: "requests.memory", divisor: "1Mi", want: "64"},
		{name: "unset request is 0", resource: "requests.ephemeral-storage", want: "0"},
		{name: "unset limit from allocatable", resource: "limits.ephemeral-storage", divisor: "1Gi", alloc: alloc, want: "20"},
		{name: "unset limit, allocatable unknown", resource: "limits.ephemeral-storage", want: "0"},
		{name: "hugepages limit", resource: "limits.hugepages-2Mi", divisor: "1Mi", alloc: alloc, want: "4"},
		{name: "hugepages never defaulted", resource: "limits.hugepages-1Gi", alloc: alloc, want: "0"},
		{name: "named container", resource: "limits.cpu", container: "sidecar", alloc: alloc, want: "2"},
		{name: "named container memory from allocatable", resource: "limits.memory", container: "sidecar", divisor: "1Gi", alloc: alloc, want: "8"},
		{name: "init container by name", resource: "limits.cpu", container: "init", want: "2"},
		{name: "unknown container", resource: "limits.cpu", container: "nope", wantErr: `no container "nope"`},
		{name: "unsupported resource", resource: "limits.nvidia.com/gpu", wantErr: "unsupported resource"},
		{name: "not limits or requests", resource: "cpu", wantErr: "unsupported resource"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pod := testPod()
			fs := &corev1.ResourceFieldSelector{Resource: tc.resource, ContainerName: tc.container}
			if tc.divisor != "" {
				fs.Divisor = resource.MustParse(tc.divisor)
			}
			got, err := ResourceValue(fs, pod, &pod.Spec.Containers[0], tc.alloc)
			checkErr(t, err, tc.wantErr)
			if err == nil && got != tc.want {
				t.Errorf("ResourceValue(%s) = %q, want %q", tc.resource, got, tc.want)
			}
		})
	}
}

func TestNeedsAllocatable(t *testing.T) {
	tests := []struct {
		name, resource, container string
		want                      bool
	}{
		{"limit set", "limits.cpu", "", false},
		{"limit unset", "limits.ephemeral-storage", "", true},
		{"request", "requests.ephemeral-storage", "", false},
		{"hugepages", "limits.hugepages-1Gi", "", false},
		{"other container's unset limit", "limits.cpu", "sidecar", true},
		{"unknown container", "limits.cpu", "nope", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pod := testPod()
			fs := &corev1.ResourceFieldSelector{Resource: tc.resource, ContainerName: tc.container}
			if got := needsAllocatable(fs, pod, &pod.Spec.Containers[0]); got != tc.want {
				t.Errorf("needsAllocatable = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestHostname(t *testing.T) {
	long := strings.Repeat("a", 62) + "-b"
	tests := []struct {
		name string
		pod  corev1.Pod
		want string
	}{
		{"pod name", corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "web-0"}}, "web-0"},
		{"spec.hostname", corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "web-0"}, Spec: corev1.PodSpec{Hostname: "front"}}, "front"},
		{
			"hostnameOverride wins",
			corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "web-0"}, Spec: corev1.PodSpec{Hostname: "front", HostnameOverride: ptr.To("web.example")}},
			"web.example",
		},
		{"long name cut and trimmed", corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: long}}, strings.Repeat("a", 62)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := Hostname(&tc.pod); got != tc.want {
				t.Errorf("Hostname = %q, want %q", got, tc.want)
			}
		})
	}
}

// checkErr fails t unless err matches want: nil for "", else an error
// containing want.
func checkErr(t *testing.T, err error, want string) {
	t.Helper()
	switch {
	case want == "" && err != nil:
		t.Fatalf("unexpected error: %v", err)
	case want != "" && err == nil:
		t.Fatalf("no error, want one containing %q", want)
	case want != "" && !strings.Contains(err.Error(), want):
		t.Fatalf("error %q, want one containing %q", err, want)
	}
}
