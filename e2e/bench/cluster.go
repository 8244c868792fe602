package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/yaml"

	"github.com/ambitmesh/ambit/e2e/lab"
	"github.com/ambitmesh/ambit/ztunnel/inpod"
)

// restConfig is the lab's admin config with room for the control-plane
// case's thousands of requests (the lab's own client allows 50/s).
func (b *bench) restConfig() (*rest.Config, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", b.lab.Kubeconfig())
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", b.lab.Kubeconfig(), err)
	}
	cfg.QPS, cfg.Burst = 500, 1000
	return cfg, nil
}

func (b *bench) client() (kubernetes.Interface, error) {
	cfg, err := b.restConfig()
	if err != nil {
		return nil, err
	}
	return kubernetes.NewForConfig(cfg)
}

// kubectl runs the lab's kubectl and returns its output.
func (b *bench) kubectl(ctx context.Context, args ...string) (string, error) {
	out, err := b.lab.KubectlCmd(ctx, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// exec runs argv in a pod's container with kubectl exec (the lab's node
// agent puts it in the container's namespaces and cgroup, so it is
// captured as the container is) and returns its stdout.
func (b *bench) exec(ctx context.Context, timeout time.Duration, ns, pod, container string, argv ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := b.lab.KubectlCmd(ctx, append([]string{"-n", ns, "exec", pod, "-c", container, "--"}, argv...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("in %s/%s: %s: %w: %s", ns, pod, filepath.Base(argv[0])+" "+strings.Join(argv[1:], " "), err, lastLines(stderr.String(), 5))
	}
	return stdout.Bytes(), nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// waitFor polls cond every interval until it holds, ctx ends, or d passes;
// the error then carries cond's last description.
func waitFor(ctx context.Context, d, interval time.Duration, what string, cond func() (bool, string)) error {
	deadline := time.Now().Add(d)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		ok, last := cond()
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not after %s; last: %s", what, d, last)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", what, ctx.Err())
		case <-tick.C:
		}
	}
}

// waitPodsReady waits until every pod of ns matching selector is Ready,
// and at least want of them.
func (b *bench) waitPodsReady(ctx context.Context, ns, selector string, want int, d time.Duration) error {
	return waitFor(ctx, d, 500*time.Millisecond, fmt.Sprintf("pods %s in %s ready", selector, ns), func() (bool, string) {
		pods, err := b.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return false, err.Error()
		}
		ready, notReady := 0, ""
		for _, p := range pods.Items {
			if podReady(&p) {
				ready++
			} else if notReady == "" {
				notReady = fmt.Sprintf("; %s is %s", p.Name, p.Status.Phase)
			}
		}
		return ready >= want && ready == len(pods.Items), fmt.Sprintf("%d of %d ready%s", ready, want, notReady)
	})
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// installAmbit applies deploy/ as a user does and waits for the rollouts.
// With Config.CaptureMode set, the CNI node agent's DaemonSet is applied
// with that --capture-mode instead of deploy/cni.yaml's.
func (b *bench) installAmbit(ctx context.Context) error {
	b.progress("installing Ambit from %s/deploy", b.cfg.RepoDir)
	for _, f := range []string{"deploy/crds/istio/security.yaml", "deploy/ambit.yaml", "deploy/cni.yaml"} {
		path := filepath.Join(b.cfg.RepoDir, f)
		if f == "deploy/cni.yaml" && b.cfg.CaptureMode != "" {
			y, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			if y, err = withCaptureMode(y, b.cfg.CaptureMode); err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
			if err := b.lab.Apply(ctx, y); err != nil {
				return err
			}
			continue
		}
		if _, err := b.kubectl(ctx, "apply", "--server-side", "-f", path); err != nil {
			return err
		}
	}
	for _, r := range []string{"deploy/ambit-controller", "ds/ztunnel", "ds/ambit-cni-node"} {
		if _, err := b.kubectl(ctx, "-n", "istio-system", "rollout", "status", r, "--timeout=180s"); err != nil {
			return err
		}
	}
	ds, err := b.cs.AppsV1().DaemonSets("istio-system").Get(ctx, "ambit-cni-node", metav1.GetOptions{})
	if err != nil {
		return err
	}
	for _, c := range ds.Spec.Template.Spec.Containers {
		b.res.Lab.CNIAgentArgs = append(b.res.Lab.CNIAgentArgs, c.Args...)
	}
	return nil
}

var docSep = regexp.MustCompile(`(?m)^---[ \t]*$`)

// withCaptureMode returns a multi-document manifest with --capture-mode=mode
// on every container of the ambit-cni-node DaemonSet, replacing the one
// there. Other documents are returned as they are.
func withCaptureMode(manifest []byte, mode string) ([]byte, error) {
	docs := docSep.Split(string(manifest), -1)
	found := false
	for i, doc := range docs {
		var obj map[string]any
		if err := yaml.Unmarshal([]byte(doc), &obj); err != nil {
			return nil, fmt.Errorf("document %d: %w", i+1, err)
		}
		meta, _ := obj["metadata"].(map[string]any)
		if obj["kind"] != "DaemonSet" || meta["name"] != "ambit-cni-node" {
			continue
		}
		var ds appsv1.DaemonSet
		if err := yaml.Unmarshal([]byte(doc), &ds); err != nil {
			return nil, fmt.Errorf("the ambit-cni-node DaemonSet: %w", err)
		}
		for j := range ds.Spec.Template.Spec.Containers {
			c := &ds.Spec.Template.Spec.Containers[j]
			c.Args = slices.DeleteFunc(c.Args, func(a string) bool { return strings.HasPrefix(a, "--capture-mode") })
			c.Args = append(c.Args, "--capture-mode="+mode)
		}
		out, err := yaml.Marshal(&ds)
		if err != nil {
			return nil, err
		}
		docs[i] = "\n" + string(out)
		found = true
	}
	if !found {
		return nil, errors.New("no ambit-cni-node DaemonSet")
	}
	return []byte(strings.Join(docs, "---")), nil
}

// findProcs finds the processes the bench measures through their
// containers' cgroups: both ztunnels and the stunnels.
func (b *bench) findProcs(ctx context.Context) error {
	zt, err := b.cs.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ztunnel"})
	if err != nil {
		return err
	}
	found := 0
	for _, p := range zt.Items {
		i, ok := lab.NodeIndex(p.Spec.NodeName)
		if !ok || i < 1 || i > 2 {
			continue
		}
		procs, err := containerProcs(b.cgroupRoot, b.cfg.LabName, p.Spec.NodeName, string(p.UID), "ztunnel", "ztunnel "+p.Spec.NodeName)
		if err != nil {
			return err
		}
		if len(procs) != 1 || filepath.Base(procs[0].Exe) != "ztunnel" {
			return fmt.Errorf("want one ztunnel process in the ztunnel pod on %s, found %+v", p.Spec.NodeName, procs)
		}
		b.ztunnels[i-1] = procs[0]
		found++
	}
	if found != 2 {
		return fmt.Errorf("found %d ztunnel pods on node-1 and node-2, want 2", found)
	}
	b.res.Lab.Procs = append(b.res.Lab.Procs, b.ztunnels[:]...)
	for _, pod := range []string{"client", "server"} {
		p, err := b.cs.CoreV1().Pods(nsPlain).Get(ctx, pod, metav1.GetOptions{})
		if err != nil {
			return err
		}
		procs, err := containerProcs(b.cgroupRoot, b.cfg.LabName, p.Spec.NodeName, string(p.UID), "stunnel", "stunnel "+pod)
		if err != nil {
			return err
		}
		b.stunnels = append(b.stunnels, procs...)
	}
	b.res.Lab.Procs = append(b.res.Lab.Procs, b.stunnels...)
	return nil
}

// controllerProc finds the controller's process.
func (b *bench) controllerProc(ctx context.Context) (Proc, error) {
	pods, err := b.cs.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ambit-controller"})
	if err != nil {
		return Proc{}, err
	}
	if len(pods.Items) != 1 {
		return Proc{}, fmt.Errorf("want one controller pod, found %d", len(pods.Items))
	}
	p := pods.Items[0]
	procs, err := containerProcs(b.cgroupRoot, b.cfg.LabName, p.Spec.NodeName, string(p.UID), "controller", "controller")
	if err != nil {
		return Proc{}, err
	}
	if len(procs) != 1 {
		return Proc{}, fmt.Errorf("want one controller process, found %+v", procs)
	}
	return procs[0], nil
}

// nodeNet makes HTTP requests from inside a node's network namespace:
// ztunnel's metrics (node IP:15020) and admin (127.0.0.1:15000 there).
type nodeNet struct {
	ns   *inpod.NetNS
	http *http.Client
	ip   string
	dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

func openNodeNet(l *lab.Lab, i int) (*nodeNet, error) {
	ns, err := inpod.OpenNetNS(filepath.Join("/run/netns", l.NodeNetns(i)))
	if err != nil {
		return nil, err
	}
	dial := ns.Dialer()
	return &nodeNet{
		ns:   ns,
		ip:   "10.200.0." + strconv.Itoa(10+i), // the lab's node addresses (e2e/lab/network.go)
		dial: dial,
		http: &http.Client{
			Timeout:   10 * time.Second,
			Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true},
		},
	}, nil
}

func (n *nodeNet) close() { _ = n.ns.Close() }

func (n *nodeNet) get(ctx context.Context, url string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := n.http.Do(req)
	if err != nil {
		return nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return body, nil
}

// served counts the pods of namespace ns that the node's ztunnel serves,
// from its config dump.
func (n *nodeNet) served(ctx context.Context, ns string) (int, error) {
	body, err := n.get(ctx, "http://127.0.0.1:15000/config_dump")
	if err != nil {
		return 0, fmt.Errorf("ztunnel config dump: %w", err)
	}
	var dump struct {
		Served []struct {
			Namespace string `json:"namespace"`
		} `json:"served"`
	}
	if err := json.Unmarshal(body, &dump); err != nil {
		return 0, fmt.Errorf("decoding ztunnel's config dump: %w", err)
	}
	c := 0
	for _, s := range dump.Served {
		if s.Namespace == ns {
			c++
		}
	}
	return c, nil
}

// meshConnections sums ztunnel's istio_tcp_connections_opened_total over
// the series whose labels include every one of want (`k="v"` strings).
func (n *nodeNet) meshConnections(ctx context.Context, want ...string) (float64, error) {
	body, err := n.get(ctx, "http://"+n.ip+":15020/metrics")
	if err != nil {
		return 0, fmt.Errorf("ztunnel metrics: %w", err)
	}
	var sum float64
	for line := range strings.Lines(string(body)) {
		if !strings.HasPrefix(line, "istio_tcp_connections_opened_total{") {
			continue
		}
		match := true
		for _, w := range want {
			if !strings.Contains(line, w) {
				match = false
				break
			}
		}
		if !match {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			sum += v
		}
	}
	return sum, nil
}
