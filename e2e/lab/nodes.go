package lab

import (
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/ambitmesh/ambit/e2e/lab/nodeagent"
)

// NodeDir is where node i keeps its CNI configuration, IPAM state and pods.
func (l *Lab) NodeDir(i int) string { return l.path("nodes", NodeName(i)) }

// NodeRoot is node i's own filesystem root: hostPath volumes of pods on the
// node resolve below it (see nodeagent.HostPath), so that two nodes on one
// machine do not share /etc/cni/net.d or /var/run/ztunnel.
func (l *Lab) NodeRoot(i int) string { return filepath.Join(l.NodeDir(i), "root") }

// CNIConfDir is node i's CNI configuration directory, the one a container
// runtime would read: /etc/cni/net.d below the node's root.
func (l *Lab) CNIConfDir(i int) string { return filepath.Join(l.NodeRoot(i), "etc", "cni", "net.d") }

// BPFFS is node i's bpf filesystem, /sys/fs/bpf below the node's root: a
// bpffs instance of its own, as every real node has, so that what a node's
// agents pin there is the node's alone and goes when the lab goes.
func (l *Lab) BPFFS(i int) string { return filepath.Join(l.NodeRoot(i), "sys", "fs", "bpf") }

// mountBPFFS gives node i its own bpffs (a new instance per mount).
func (l *Lab) mountBPFFS(i int) error {
	dir := l.BPFFS(i)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mounting a bpffs for %s at %s: %w", NodeName(i), dir, err)
	}
	return nil
}

// unmountBPFFS unmounts every node's bpffs of the lab in dir, which
// releases whatever was pinned there.
func unmountBPFFS(dir string) error {
	mounts, _ := filepath.Glob(filepath.Join(dir, "nodes", "*", "root", "sys", "fs", "bpf"))
	var errs []error
	for _, m := range mounts {
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("unmounting %s: %w", m, err))
		}
	}
	return errors.Join(errs...)
}

// cniConflist is the primary network of every node: ptp veth pairs with
// host-local IPAM over the node's pod range, as a simple real CNI does it.
// Chained plugins (Ambit's, later) are appended to "plugins".
const cniConflist = `{
  "cniVersion": "1.0.0",
  "name": "lab",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": false,
      "mtu": 1500,
      "ipam": {
        "type": "host-local",
        "dataDir": %q,
        "ranges": [[{"subnet": %q}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {
      "type": "portmap",
      "capabilities": {"portMappings": true}
    }
  ]
}
`

// startNodes writes each node's CNI configuration, starts its node agent and
// kube-proxy in its namespace, and waits for every Node to be Ready.
func (l *Lab) startNodes(ctx context.Context) error {
	for i := 1; i <= l.opts.Nodes; i++ {
		if err := os.MkdirAll(l.CNIConfDir(i), 0o755); err != nil {
			return err
		}
		if err := l.mountBPFFS(i); err != nil {
			return err
		}
		conf := fmt.Sprintf(cniConflist, filepath.Join(l.NodeDir(i), "ipam"), podCIDR(i))
		if err := os.WriteFile(filepath.Join(l.CNIConfDir(i), "10-lab.conflist"), []byte(conf), 0o644); err != nil {
			return err
		}
		name := NodeName(i)
		proc, err := startDaemon("node-agent-"+name, l.nodeNetns(i), l.path("logs", "node-agent-"+name+".log"), nil,
			l.labBin(), "node",
			"--name="+name,
			"--ip="+nodeIP(i),
			"--pod-cidr="+podCIDR(i),
			"--kubeconfig="+l.path("pki", "node-"+strconv.Itoa(i)+".kubeconfig"),
			"--serving-cert="+l.path("pki", name+"-serving.crt"),
			"--serving-key="+l.path("pki", name+"-serving.key"),
			"--client-ca="+l.path("pki", "ca.crt"),
			"--dir="+l.NodeDir(i),
			"--root="+l.NodeRoot(i),
			"--lab-dir="+l.opts.Dir,
			"--cni-conf-dir="+l.CNIConfDir(i),
			// The node's own /opt/cni/bin (where Ambit's node agent
			// installs its plugin), then Debian's plugins.
			"--cni-bin-dir="+filepath.Join(l.NodeRoot(i), "opt", "cni", "bin")+":/usr/lib/cni",
			"--bin-dir="+l.opts.BinDir,
			"--cgroup="+filepath.Join(labCgroup(l.opts.Name), name),
			"--cluster-dns="+dnsServiceIP,
			"--netns-prefix="+l.opts.Name,
		)
		if err != nil {
			return err
		}
		l.state.Procs = append(l.state.Procs, proc)
		proc, err = startDaemon("kube-proxy-"+name, l.nodeNetns(i), l.path("logs", "kube-proxy-"+name+".log"), nil,
			l.kubeBin("hyperkube"), "kube-proxy",
			"--kubeconfig="+l.path("pki", "kube-proxy.kubeconfig"),
			"--proxy-mode=nftables",
			"--hostname-override="+name,
			"--cluster-cidr="+clusterCIDR,
			// nf_conntrack_max is read-only outside the initial
			// namespace; without this kube-proxy exits.
			"--conntrack-max-per-core=0",
			"--metrics-bind-address=127.0.0.1:10249",
			"--healthz-bind-address=127.0.0.1:10256",
		)
		if err != nil {
			return err
		}
		l.state.Procs = append(l.state.Procs, proc)
		if err := l.saveState(); err != nil {
			return err
		}
	}
	cs, err := l.Client()
	if err != nil {
		return err
	}
	var last string
	ok := waitFor(90*time.Second, func() bool {
		nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			last = err.Error()
			return ctx.Err() != nil
		}
		ready := 0
		for _, n := range nodes.Items {
			for _, c := range n.Status.Conditions {
				if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
					ready++
				}
			}
		}
		last = fmt.Sprintf("%d of %d nodes Ready", ready, l.opts.Nodes)
		return ready == l.opts.Nodes
	})
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if !ok {
		return fmt.Errorf("nodes not ready after 90s (%s); see %s", last, l.path("logs"))
	}
	return nil
}

// Client returns an admin clientset for the lab.
func (l *Lab) Client() (kubernetes.Interface, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", l.state.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", l.state.Kubeconfig, err)
	}
	cfg.QPS, cfg.Burst = 50, 100
	return kubernetes.NewForConfig(cfg)
}

//go:embed manifests/coredns.yaml
var corednsYAML []byte

// installAddons applies cluster DNS (CoreDNS behind the kube-dns Service)
// and the Gateway API CRDs, and waits for DNS to be available.
func (l *Lab) installAddons(ctx context.Context) error {
	if err := l.Apply(ctx, corednsYAML); err != nil {
		return fmt.Errorf("applying CoreDNS: %w", err)
	}
	if crds, err := os.ReadFile(filepath.Join(l.opts.BinDir, "..", "deploy", "crds", "gateway-api", "standard-install.yaml")); err == nil {
		if err := l.Apply(ctx, crds); err != nil {
			return fmt.Errorf("applying the Gateway API CRDs: %w", err)
		}
	}
	cs, err := l.Client()
	if err != nil {
		return err
	}
	var last string
	ok := waitFor(120*time.Second, func() bool {
		d, err := cs.AppsV1().Deployments("kube-system").Get(ctx, "coredns", metav1.GetOptions{})
		if apierrors.IsNotFound(err) || err != nil {
			return ctx.Err() != nil
		}
		last = fmt.Sprintf("%d of %d replicas available", d.Status.AvailableReplicas, *d.Spec.Replicas)
		return d.Status.AvailableReplicas == *d.Spec.Replicas
	})
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if !ok {
		return fmt.Errorf("CoreDNS not available after 120s (%s)", last)
	}
	return nil
}

// Apply runs `kubectl apply --server-side -f -` with manifest on stdin.
func (l *Lab) Apply(ctx context.Context, manifest []byte) error {
	out, err := l.KubectlCmd(ctx, "apply", "--server-side", "--force-conflicts", "-f", "-").WithStdin(manifest).CombinedOutput()
	if err != nil {
		return fmt.Errorf("kubectl apply: %w: %s", err, out)
	}
	return nil
}

// KubectlCmd is a kubectl command against the lab.
type KubectlCmd struct{ *exec.Cmd }

// KubectlCmd returns the lab's kubectl with the admin kubeconfig.
func (l *Lab) KubectlCmd(ctx context.Context, args ...string) KubectlCmd {
	cmd := exec.CommandContext(ctx, l.Kubectl(), append([]string{"--kubeconfig=" + l.state.Kubeconfig}, args...)...)
	return KubectlCmd{cmd}
}

// WithStdin sets the command's standard input.
func (k KubectlCmd) WithStdin(b []byte) KubectlCmd {
	k.Stdin = bytes.NewReader(b)
	return k
}

// PodNetnsPath is the network namespace of a pod (not host-network) of the
// lab, as its node agent made it.
func (l *Lab) PodNetnsPath(uid types.UID) string {
	return netnsPath(nodeagent.PodNetnsName(l.opts.Name, uid))
}

// NodeIndex returns the 1-based index of a node by name.
func NodeIndex(name string) (int, bool) {
	var i int
	if _, err := fmt.Sscanf(name, "node-%d", &i); err != nil {
		return 0, false
	}
	return i, true
}

// InNode returns a command that runs argv in node i's network namespace.
func (l *Lab) InNode(ctx context.Context, i int, argv ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + netnsPath(l.nodeNetns(i)), "--"}, argv...)...)
}

// ControlPlaneNetns is the control plane's network namespace (it holds the
// underlay bridge br0).
func (l *Lab) ControlPlaneNetns() string { return netnsPath(l.cpNetns()) }
