package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
)

// sandbox is a pod's network: its namespace, made through the node's CNI
// chain exactly as a container runtime makes it.
type sandbox struct {
	netnsName string // empty for host-network pods
	netnsPath string
	ip        string
}

const loopbackConf = `{"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"}`

// cniRuntimeConf is what the CNI plugins are told about the pod, with the
// CNI_ARGS a container runtime passes (K8S_POD_NAMESPACE and friends) so
// that a chained plugin can look the pod up.
func cniRuntimeConf(pod *corev1.Pod, netnsPath string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: string(pod.UID),
		NetNS:       netnsPath,
		IfName:      "eth0",
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", pod.Namespace},
			{"K8S_POD_NAME", pod.Name},
			{"K8S_POD_INFRA_CONTAINER_ID", string(pod.UID)},
			{"K8S_POD_UID", string(pod.UID)},
		},
	}
}

// loadConflist reads the first conflist of the CNI conf dir, by file name
// order, as container runtimes do.
func (a *Agent) loadConflist() (*libcni.NetworkConfigList, error) {
	files, err := libcni.ConfFiles(a.opts.CNIConfDir, []string{".conflist"})
	if err != nil {
		return nil, fmt.Errorf("reading CNI conf dir %s: %w", a.opts.CNIConfDir, err)
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("no .conflist in CNI conf dir %s", a.opts.CNIConfDir)
	}
	return libcni.ConfListFromFile(files[0])
}

func (a *Agent) cni() *libcni.CNIConfig {
	return libcni.NewCNIConfig(filepath.SplitList(a.opts.CNIBinDir), &nodeExec{root: a.opts.Root, dir: filepath.Join(a.opts.Dir, "cni-exec")})
}

// nodeExec runs CNI plugins with the node's view of the paths a chained
// plugin talks through: /var/run/ambit (the CNI node agent's socket) is
// node-local in the lab like every hostPath, so each plugin runs in a
// mount namespace of its own where the node's directory is bound there.
// Without it two labs on one machine would share the agent socket.
type nodeExec struct {
	invoke.RawExec
	version.PluginDecoder
	root, dir string
}

// FindInPath returns a wrapper that sets up the node's view and then
// executes the real plugin with the same stdin and environment.
func (e *nodeExec) FindInPath(plugin string, paths []string) (string, error) {
	real, err := invoke.FindInPath(plugin, paths)
	if err != nil || e.root == "" {
		return real, err
	}
	src := filepath.Join(e.root, "var", "run", "ambit")
	if err := os.MkdirAll(src, 0o755); err != nil {
		return "", err
	}
	if err := os.MkdirAll(e.dir, 0o755); err != nil {
		return "", err
	}
	wrapper := filepath.Join(e.dir, plugin)
	script := fmt.Sprintf("#!/bin/sh\nexec unshare --mount --propagation private -- sh -c 'mkdir -p /run/ambit && mount --bind \"$0\" /run/ambit && exec \"$1\"' %q %q\n", src, real)
	if err := os.WriteFile(wrapper+".tmp", []byte(script), 0o755); err != nil {
		return "", err
	}
	return wrapper, os.Rename(wrapper+".tmp", wrapper)
}

var _ invoke.Exec = (*nodeExec)(nil)

// createSandbox makes the pod's network namespace and runs CNI ADD in it.
func (a *Agent) createSandbox(ctx context.Context, pod *corev1.Pod) (*sandbox, error) {
	if pod.Spec.HostNetwork {
		return &sandbox{ip: a.opts.NodeIP}, nil
	}
	name := a.podNetnsName(pod)
	sb := &sandbox{netnsName: name, netnsPath: filepath.Join("/run/netns", name)}
	// A namespace left from an earlier try is made again from scratch.
	_ = a.deleteSandbox(ctx, pod, sb)
	if out, err := exec.CommandContext(ctx, "ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("creating netns %s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	// The pod's loopback, as containerd brings it up: the CNI loopback
	// plugin, outside the node's conflist.
	lo, err := libcni.NetworkPluginConfFromBytes([]byte(loopbackConf))
	if err != nil {
		return nil, err
	}
	if _, err := a.cni().AddNetwork(ctx, lo, cniRuntimeConf(pod, sb.netnsPath)); err != nil {
		_ = exec.Command("ip", "netns", "delete", name).Run()
		return nil, fmt.Errorf("CNI ADD (loopback): %w", err)
	}
	list, err := a.loadConflist()
	if err != nil {
		return nil, err
	}
	res, err := a.cni().AddNetworkList(ctx, list, cniRuntimeConf(pod, sb.netnsPath))
	if err != nil {
		_ = exec.Command("ip", "netns", "delete", name).Run()
		return nil, fmt.Errorf("CNI ADD (%s): %w", list.Name, err)
	}
	cur, err := current.NewResultFromResult(res)
	if err != nil {
		return nil, fmt.Errorf("reading CNI result: %w", err)
	}
	for _, ipc := range cur.IPs {
		if ipc.Address.IP.To4() != nil {
			sb.ip = ipc.Address.IP.String()
			break
		}
	}
	if sb.ip == "" {
		return nil, errors.New("CNI ADD returned no IPv4 address")
	}
	return sb, nil
}

// deleteSandbox runs CNI DEL and removes the namespace. It is idempotent.
func (a *Agent) deleteSandbox(ctx context.Context, pod *corev1.Pod, sb *sandbox) error {
	if sb == nil || sb.netnsName == "" {
		return nil
	}
	var errs []error
	if _, err := os.Stat(sb.netnsPath); err == nil {
		if list, err := a.loadConflist(); err == nil {
			if err := a.cni().DelNetworkList(ctx, list, cniRuntimeConf(pod, sb.netnsPath)); err != nil {
				errs = append(errs, fmt.Errorf("CNI DEL: %w", err))
			}
		}
		if out, err := exec.Command("ip", "netns", "delete", sb.netnsName).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("deleting netns %s: %w: %s", sb.netnsName, err, out))
		}
	} else if list, err := a.loadConflist(); err == nil {
		// Without the namespace, DEL still releases the IPAM lease.
		_ = a.cni().DelNetworkList(ctx, list, cniRuntimeConf(pod, ""))
	}
	return errors.Join(errs...)
}

func (a *Agent) podNetnsName(pod *corev1.Pod) string {
	return PodNetnsName(a.opts.NetnsPrefix, pod.UID)
}

// PodNetnsName is the name of the network namespace of the pod with uid,
// under /run/netns, for a lab whose namespaces are prefixed with prefix.
func PodNetnsName(prefix string, uid types.UID) string {
	return fmt.Sprintf("%s-pod-%s", prefix, strings.ReplaceAll(string(uid), "-", "")[:12])
}

// resolvConf returns the contents of the pod's /etc/resolv.conf for its DNS
// policy, or "" to leave the host's in place.
func (a *Agent) resolvConf(pod *corev1.Pod) string {
	policy := pod.Spec.DNSPolicy
	if policy == "" {
		policy = corev1.DNSClusterFirst
	}
	if policy == corev1.DNSClusterFirst && pod.Spec.HostNetwork {
		policy = corev1.DNSDefault
	}
	var servers, searches, options []string
	switch policy {
	case corev1.DNSDefault:
		if pod.Spec.DNSConfig == nil {
			return ""
		}
	case corev1.DNSClusterFirst, corev1.DNSClusterFirstWithHostNet:
		servers = []string{a.opts.ClusterDNS}
		searches = []string{pod.Namespace + ".svc.cluster.local", "svc.cluster.local", "cluster.local"}
		options = []string{"ndots:5"}
	}
	if c := pod.Spec.DNSConfig; c != nil {
		servers = append(servers, c.Nameservers...)
		searches = append(searches, c.Searches...)
		for _, o := range c.Options {
			if o.Value != nil {
				options = append(options, o.Name+":"+*o.Value)
			} else {
				options = append(options, o.Name)
			}
		}
	}
	var b strings.Builder
	for _, s := range servers {
		fmt.Fprintf(&b, "nameserver %s\n", s)
	}
	if len(searches) > 0 {
		fmt.Fprintf(&b, "search %s\n", strings.Join(searches, " "))
	}
	if len(options) > 0 {
		fmt.Fprintf(&b, "options %s\n", strings.Join(options, " "))
	}
	return b.String()
}

// hostsFile returns the pod's /etc/hosts, as kubelet writes it.
func hostsFile(pod *corev1.Pod, ip string) string {
	var b strings.Builder
	b.WriteString("# Kubernetes-managed hosts file (ambit lab).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
	if ip != "" && net.ParseIP(ip) != nil {
		host := pod.Name
		if pod.Spec.Hostname != "" {
			host = pod.Spec.Hostname
		}
		fmt.Fprintf(&b, "%s\t%s\n", ip, host)
	}
	for _, h := range pod.Spec.HostAliases {
		fmt.Fprintf(&b, "%s\t%s\n", h.IP, strings.Join(h.Hostnames, "\t"))
	}
	return b.String()
}
