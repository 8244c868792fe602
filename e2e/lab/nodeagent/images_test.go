package nodeagent

import (
	"errors"
	"slices"
	"testing"
)

func TestImageName(t *testing.T) {
	tests := []struct{ name, ref, want string }{
		{"tag", "gcr.io/istio-testing/app:latest", "gcr.io/istio-testing/app"},
		{"digest", "busybox@sha256:abc", "busybox"},
		{"tag and digest", "busybox:1.36@sha256:abc", "busybox"},
		{"registry port, no tag", "localhost:5000/ambit/echo", "localhost:5000/ambit/echo"},
		{"registry port and tag", "localhost:5000/ambit/echo:v1", "localhost:5000/ambit/echo"},
		{"bare", "busybox", "busybox"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := imageName(tc.ref); got != tc.want {
				t.Errorf("imageName(%q) = %q, want %q", tc.ref, got, tc.want)
			}
		})
	}
}

func TestResolveCommand(t *testing.T) {
	tests := []struct {
		name          string
		image         string
		command, args []string
		want          []string
		wantErr       error
	}{
		{"entrypoint and default args", "curlimages/curl", nil, nil, []string{"/bin/sleep", "infinity"}, nil},
		{"args replace CMD", "gcr.io/istio-testing/app:1.0", nil, []string{"--port=8080"}, []string{"/b/echo-server", "--port=8080"}, nil},
		{"command replaces entrypoint and CMD", "curlimages/curl", []string{"/bin/sh", "-c"}, []string{"true"}, []string{"/bin/sh", "-c", "true"}, nil},
		{"image path alias", "gcr.io/istio-testing/app", []string{"/usr/local/bin/server"}, []string{"--port=1"}, []string{"/b/echo-server", "--port=1"}, nil},
		{"conformance echo image", "registry.k8s.io/gateway-api/echo-advanced:v20240412-v1.0.0-394-g40c666fd", nil, nil, []string{"/b/echo-server"}, nil},
		{"coredns", "registry.k8s.io/coredns/coredns:v1.15.0", nil, []string{"-conf", "/etc/coredns/Corefile"}, []string{"/b/coredns", "-conf", "/etc/coredns/Corefile"}, nil},
		{"unknown image", "nginx:latest", nil, nil, nil, ErrImagePull},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := resolveCommand("/b", tc.image, tc.command, tc.args)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("error = %v, want %v", err, tc.wantErr)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("argv = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestHostPath(t *testing.T) {
	tests := []struct{ name, root, path, want string }{
		{"node-local", "/lab/n1/root", "/var/run/ztunnel", "/lab/n1/root/var/run/ztunnel"},
		{"CNI conf dir", "/lab/n1/root", "/etc/cni/net.d", "/lab/n1/root/etc/cni/net.d"},
		{"shared netns", "/lab/n1/root", "/run/netns", "/run/netns"},
		{"shared below", "/lab/n1/root", "/sys/kernel/tracing", "/sys/kernel/tracing"},
		{"bpffs is the node's", "/lab/n1/root", "/sys/fs/bpf", "/lab/n1/root/sys/fs/bpf"},
		{"below the bpffs", "/lab/n1/root", "/sys/fs/bpf/ambit", "/lab/n1/root/sys/fs/bpf/ambit"},
		{"bpffs prefix is not a parent", "/lab/n1/root", "/sys/fs/bpfx", "/sys/fs/bpfx"},
		{"prefix is not a parent", "/lab/n1/root", "/procfoo", "/lab/n1/root/procfoo"},
		{"cleaned", "/lab/n1/root", "/var/../etc/x/", "/lab/n1/root/etc/x"},
		{"no root", "", "/var/run/ztunnel", "/var/run/ztunnel"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := HostPath(tc.root, tc.path); got != tc.want {
				t.Errorf("HostPath(%q, %q) = %q, want %q", tc.root, tc.path, got, tc.want)
			}
		})
	}
}
