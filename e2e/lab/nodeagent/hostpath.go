package nodeagent

import (
	"path/filepath"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// hostShared lists the host paths that every node of the lab shares with
// the machine: kernel interfaces, the network namespaces (made by the node
// agents, visible machine-wide), and programs. Every other hostPath is
// node-local and resolves below the node's root, so that, say, each node's
// ztunnel has its own /var/run/ztunnel and each node its own
// /etc/cni/net.d, as on real machines.
// (The CNI plugins the lab runs see the node's /var/run/ambit: see
// nodeExec.)
//
// /sys/fs/bpf is the exception under /sys: each node has a bpffs of its own
// (the lab mounts one below the node's root), as real nodes do.
var hostShared = []string{"/proc", "/sys", "/dev", "/run/netns", "/var/run/netns", "/lib/modules", "/usr", "/bin", "/sbin", "/lib", "/lib64"}

// HostPath returns where a pod's hostPath lives on this machine for a node
// whose root is root.
func HostPath(root, p string) string {
	p = filepath.Clean(p)
	if root == "" {
		return p
	}
	if p == "/sys/fs/bpf" || strings.HasPrefix(p, "/sys/fs/bpf/") {
		return filepath.Join(root, p)
	}
	for _, s := range hostShared {
		if p == s || strings.HasPrefix(p, s+"/") {
			return p
		}
	}
	return filepath.Join(root, p)
}

// nodeLocalHostPaths returns a copy of pod whose hostPath volumes point
// below the node's root.
func (a *Agent) nodeLocalHostPaths(pod *corev1.Pod) *corev1.Pod {
	pod = pod.DeepCopy()
	for i := range pod.Spec.Volumes {
		if hp := pod.Spec.Volumes[i].HostPath; hp != nil {
			hp.Path = HostPath(a.opts.Root, hp.Path)
		}
	}
	return pod
}
