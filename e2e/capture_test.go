package e2e

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ambitmesh/ambit/bpf"
	"github.com/ambitmesh/ambit/cni/bpfroute"
	"github.com/ambitmesh/ambit/cni/nft"
	"github.com/ambitmesh/ambit/e2e/lab"
	"github.com/ambitmesh/ambit/internal/netnsexec"
)

// captureApps is the scenario's apps in namespace NS.
const captureApps = `
apiVersion: v1
kind: Namespace
metadata: {name: NS}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: NS}
spec:
  replicas: 1
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      nodeSelector: {kubernetes.io/hostname: node-1}
      terminationGracePeriodSeconds: 1
      containers:
      - name: echo
        image: gcr.io/istio-testing/app
        args: [--port=8080]
        readinessProbe:
          httpGet: {path: /, port: 8080}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: NS}
spec:
  selector: {app: echo}
  ports:
  - {name: http, port: 80, targetPort: 8080}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: NS}
spec:
  nodeName: node-2
  terminationGracePeriodSeconds: 1
  containers:
  - {name: client, image: curlimages/curl, command: [/bin/sleep, infinity]}
`

// TestCapture installs Ambit with its CNI node agent and, in each capture
// mode (nftables, then eBPF, switching the agent's flag), checks enrolment
// without restarts: plaintext before the label, HBONE within 2 s of
// labelling with no failed request and no pod restarted, the app seeing
// the client's address, plaintext again and nothing left in the pods after
// unlabelling, no plaintext while ztunnel is down and traffic back when it
// returns, redirection kept through a node agent restart, and a pod
// created in an enrolled namespace captured from its start by the chained
// CNI plugin.
func TestCapture(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the lab needs root (network namespaces, cgroups, mounts); run `make test` as root")
	}
	binDir := os.Getenv("AMBIT_BIN_DIR")
	if binDir == "" {
		binDir, _ = filepath.Abs("../bin")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	l, err := lab.Up(ctx, lab.Options{Name: "cap", Nodes: 2, BinDir: binDir, Progress: testWriter{t}})
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() && os.Getenv("AMBIT_KEEP_LAB") != "" {
			t.Logf("AMBIT_KEEP_LAB is set: leaving the failed lab up: KUBECONFIG=%s; %s/lab down --name cap", l.Kubeconfig(), binDir)
			return
		}
		if err := l.Down(); err != nil {
			t.Errorf("lab down: %v", err)
		}
	})
	cs, err := l.Client()
	if err != nil {
		t.Fatal(err)
	}
	kubectl := func(args ...string) string {
		t.Helper()
		out, err := l.KubectlCmd(ctx, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	repo := filepath.Dir(binDir)
	for _, f := range []string{"deploy/crds/istio/security.yaml", "deploy/ambit.yaml", "deploy/cni.yaml"} {
		kubectl("apply", "--server-side", "-f", filepath.Join(repo, f))
	}
	for _, r := range []string{"deploy/ambit-controller", "ds/ztunnel", "ds/ambit-cni-node"} {
		kubectl("-n", "istio-system", "rollout", "status", r, "--timeout=120s")
	}
	modes := []string{"nftables", "ebpf"}
	if m := os.Getenv("AMBIT_CAPTURE_MODES"); m != "" { // for debugging one mode
		modes = strings.Split(m, ",")
	}
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			setCaptureMode(t, ctx, cs, kubectl, mode)
			captureScenario(t, ctx, l, cs, kubectl, mode)
		})
	}
}

// setCaptureMode sets the node agents' --capture-mode and waits for them
// to roll out.
func setCaptureMode(t *testing.T, ctx context.Context, cs kubernetes.Interface, kubectl func(...string) string, mode string) {
	t.Helper()
	ds, err := cs.AppsV1().DaemonSets("istio-system").Get(ctx, "ambit-cni-node", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	args := ds.Spec.Template.Spec.Containers[0].Args
	args = slices.DeleteFunc(args, func(a string) bool { return strings.HasPrefix(a, "--capture-mode=") })
	args = append(args, "--capture-mode="+mode)
	ds.Spec.Template.Spec.Containers[0].Args = args
	if _, err := cs.AppsV1().DaemonSets("istio-system").Update(ctx, ds, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	kubectl("-n", "istio-system", "rollout", "status", "ds/ambit-cni-node", "--timeout=120s")
}

// captureInstalled reports whether a pod's namespace has mode's capture.
func captureInstalled(mode, netns string) (bool, error) {
	if mode == "nftables" {
		return nft.Installed(netns)
	}
	return bpf.AttachedTo(netns)
}

// captureLeft describes what either mode left in a released pod's
// namespace ("" if nothing).
func captureLeft(netns string) string {
	var left []string
	if ok, err := nft.Installed(netns); err != nil || ok {
		left = append(left, fmt.Sprintf("nft rules (%v)", err))
	}
	if ok, err := bpf.AttachedTo(netns); err != nil || ok {
		left = append(left, fmt.Sprintf("sk_lookup link (%v)", err))
	}
	if ok, err := bpfroute.Installed(netns); err != nil || ok {
		left = append(left, fmt.Sprintf("policy routing (%v)", err))
	}
	if v, err := twReuse(netns); err != nil || v != "2" {
		left = append(left, fmt.Sprintf("tcp_tw_reuse %q, not the default 2 (%v)", v, err))
	}
	return strings.Join(left, ", ")
}

// twReuse reads net.ipv4.tcp_tw_reuse in the namespace at netns.
func twReuse(netns string) (string, error) {
	var v string
	err := netnsexec.RunPath(netns, func() error {
		b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_tw_reuse")
		v = strings.TrimSpace(string(b))
		return err
	})
	return v, err
}

// captureScenario is acceptance 1-5 of capture in one mode, in its own
// namespaces (cap-<mode>, cap-<mode>-plain), deleted at the end so that the
// next mode starts from released pods.
func captureScenario(t *testing.T, ctx context.Context, l *lab.Lab, cs kubernetes.Interface, kubectl func(...string) string, mode string) {
	ns := "cap-" + mode
	defer func() {
		// Only if the scenario passed: a failed run's pods stay up for
		// AMBIT_KEEP_LAB, and the next mode uses other namespaces.
		if !t.Failed() {
			kubectl("delete", "namespace", ns, ns+"-plain", "--wait=true", "--timeout=90s")
		}
	}()
	if err := l.Apply(ctx, []byte(strings.ReplaceAll(captureApps, "NS", ns))); err != nil {
		t.Fatal(err)
	}
	kubectl("-n", ns, "rollout", "status", "deploy/echo", "--timeout=120s")
	kubectl("-n", ns, "wait", "--for=condition=Ready", "pod/client", "--timeout=120s")
	before := podStarts(ctx, t, cs, ns)

	// A request loop in the client: one new connection per request,
	// each line "<unix nanos> <http code>".
	loop := l.KubectlCmd(ctx, "-n", ns, "exec", "client", "--", "sh", "-c",
		`while true; do c=$(curl -s -o /dev/null -m 2 -w '%{http_code}' http://echo.`+ns+`.svc.cluster.local/); echo "$(date +%s%N) $c"; done`)
	lout, _ := loop.StdoutPipe()
	if err := loop.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = loop.Process.Kill(); _ = loop.Wait() }()
	lines := make(chan string, 10000)
	go func() {
		s := bufio.NewScanner(lout)
		for s.Scan() {
			lines <- s.Text()
		}
		close(lines)
	}()
	waitForLine(t, lines, 30*time.Second, func(_ int64, code string) bool { return code == "200" })

	// hbonePackets captures the underlay while the loop completes three
	// requests (or, with failing=true, for one second of failing ones).
	hbonePackets := func(failing bool) (hbone, plain int, pcap []byte) {
		c := startCapture(t, ctx, l, "n1")
		started := time.Now().UnixNano()
		if failing {
			waitForLine(t, lines, 10*time.Second, func(ts int64, _ string) bool { return ts > started+int64(time.Second) })
		} else {
			for i := 0; i < 3; i++ {
				waitForLine(t, lines, 10*time.Second, func(ts int64, code string) bool { return ts > started && code == "200" })
			}
		}
		pcap = c.stop(t)
		return countPackets(t, pcap, "tcp port 15008"), countPackets(t, pcap, "tcp port 8080"), pcap
	}
	t.Run("plaintext before enrolment", func(t *testing.T) {
		h, p, _ := hbonePackets(false)
		if p == 0 || h != 0 {
			t.Errorf("want plaintext only on the underlay: %d packets to 8080, %d HBONE", p, h)
		}
	})

	t.Run("label: HBONE within 2s, no failed request, no restart", func(t *testing.T) {
		// A keep-alive connection opened before the label goes on after
		// it: only new connections are captured, as with Istio.
		kept := keepAlive(ctx, t, l, ns, "http://echo."+ns+".svc.cluster.local/", 24)
		labelled := time.Now()
		kubectl("label", "namespace", ns, "istio.io/dataplane-mode=ambient")
		// Every request after the label must succeed; enrolment must be
		// visible within 2 s (the pods carry the redirection annotation).
		waitFor(t, 2*time.Second, func() (bool, string) {
			pods, _ := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
			n := 0
			for _, p := range pods.Items {
				if p.Annotations["ambient.istio.io/redirection"] == "enabled" {
					n++
				}
			}
			return n == len(pods.Items), fmt.Sprintf("%d of %d pods annotated after %s", n, len(pods.Items), time.Since(labelled))
		})
		enrolled := time.Now()
		waitForLine(t, lines, 10*time.Second, func(ts int64, code string) bool {
			if ts > labelled.UnixNano() && code != "200" {
				t.Errorf("request failed during the switch: %s", code)
			}
			return ts > enrolled.UnixNano()+int64(500*time.Millisecond)
		})
		kept()
		// Every new connection is HBONE: no SYN to the app on the
		// underlay. (A last packet of a connection opened before the
		// switch may still pass: in eBPF mode such a connection is
		// reset when its next packet is routed to ztunnel.)
		h, _, pcap := hbonePackets(false)
		if syn := countPackets(t, pcap, "tcp dst port 8080 and tcp[tcpflags] & tcp-syn != 0"); h == 0 || syn != 0 {
			t.Errorf("want new connections over HBONE only: %d HBONE packets, %d SYNs to 8080", h, syn)
		}
		// Enrolled pods reuse TIME_WAIT ports (see nodeagent's
		// setTWReuse).
		pods, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pods.Items {
			if v, err := twReuse(l.PodNetnsPath(p.UID)); err != nil || v != "1" {
				t.Errorf("%s: tcp_tw_reuse %q (%v), want 1 while enrolled", p.Name, v, err)
			}
		}
		if after := podStarts(ctx, t, cs, ns); after != before {
			t.Errorf("pods restarted: before %s, after %s", before, after)
		}
		// Kubelet's probes (from node-1's address on the echo pod's
		// veth, 10.244.1.1) reach the app directly, not through
		// ztunnel: the echo pod stays Ready (the requests above) and
		// node-1's ztunnel logs no connection from there.
		zt, err := cs.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ztunnel", FieldSelector: "spec.nodeName=node-1"})
		if err != nil || len(zt.Items) != 1 {
			t.Fatalf("node-1's ztunnel: %v", err)
		}
		if logs := kubectl("-n", "istio-system", "logs", zt.Items[0].Name); strings.Contains(logs, `"src.addr":"10.244.1.1:`) {
			t.Errorf("kubelet probes went through ztunnel:\n%s", grepLines(logs, `"src.addr":"10.244.1.1:`))
		}
		// The app sees the client pod as the peer, not its own address:
		// ztunnel dials it transparently (acceptance 3). Istio's echo
		// server answers with an "IP=<peer ip>" line, the host of the
		// request's RemoteAddr.
		client, err := cs.CoreV1().Pods(ns).Get(ctx, "client", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		out := kubectl("-n", ns, "exec", "client", "--", "curl", "-s", "-m", "5", "http://echo."+ns+".svc.cluster.local/")
		if want := "IP=" + client.Status.PodIP; !slices.Contains(strings.Fields(out), want) {
			t.Errorf("echo does not see the client pod %s as the source: want %q in\n%s", client.Status.PodIP, want, out)
		}
	})

	t.Run("unlabel: plaintext again, nothing left in the pods", func(t *testing.T) {
		kubectl("label", "namespace", ns, "istio.io/dataplane-mode-")
		waitFor(t, 10*time.Second, func() (bool, string) {
			pods, _ := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
			for _, p := range pods.Items {
				if _, ok := p.Annotations["ambient.istio.io/redirection"]; ok {
					return false, p.Name + " still annotated"
				}
				if left := captureLeft(l.PodNetnsPath(p.UID)); left != "" {
					return false, fmt.Sprintf("%s: %s", p.Name, left)
				}
			}
			return true, ""
		})
		flushLines(lines)
		h, p, _ := hbonePackets(false)
		if p == 0 || h != 0 {
			t.Errorf("want plaintext only again: %d packets to 8080, %d HBONE", p, h)
		}
	})

	t.Run("ztunnel down: no plaintext leak, then traffic resumes", func(t *testing.T) {
		kubectl("label", "namespace", ns, "istio.io/dataplane-mode=ambient")
		waitFor(t, 10*time.Second, func() (bool, string) {
			p, _ := cs.CoreV1().Pods(ns).Get(ctx, "client", metav1.GetOptions{})
			return p.Annotations["ambient.istio.io/redirection"] == "enabled", "client not enrolled"
		})
		flushLines(lines)
		// Stop node-2's ztunnel (the client's) for good: no DaemonSet
		// pod may run there while we look.
		kubectl("-n", "istio-system", "patch", "ds", "ztunnel", "--type=json",
			`-p=[{"op":"add","path":"/spec/template/spec/affinity","value":{"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":[{"matchExpressions":[{"key":"kubernetes.io/hostname","operator":"NotIn","values":["node-2"]}]}]}}}}]`)
		waitFor(t, 60*time.Second, func() (bool, string) {
			pods, _ := cs.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ztunnel", FieldSelector: "spec.nodeName=node-2"})
			return len(pods.Items) == 0, fmt.Sprintf("%d ztunnel pods on node-2", len(pods.Items))
		})
		flushLines(lines)
		_, p, pcap := hbonePackets(true)
		if p != 0 {
			t.Errorf("%d plaintext packets to the app while the client's ztunnel was down:\n%s", p, packets(t, pcap, "tcp port 8080"))
		}
		kubectl("-n", "istio-system", "patch", "ds", "ztunnel", "--type=json", `-p=[{"op":"remove","path":"/spec/template/spec/affinity"}]`)
		kubectl("-n", "istio-system", "rollout", "status", "ds/ztunnel", "--timeout=120s")
		flushLines(lines)
		waitForLine(t, lines, 30*time.Second, func(_ int64, code string) bool { return code == "200" })
		h, p, _ := hbonePackets(false)
		if h == 0 || p != 0 {
			t.Errorf("after ztunnel came back: %d HBONE packets, %d to 8080", h, p)
		}
		if after := podStarts(ctx, t, cs, ns); after != before {
			t.Errorf("pods restarted: before %s, after %s", before, after)
		}
	})

	t.Run("node agent restart: redirection stays, no failed request", func(t *testing.T) {
		old, err := cs.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ambit-cni-node", FieldSelector: "spec.nodeName=node-2"})
		if err != nil || len(old.Items) != 1 {
			t.Fatalf("node-2's agent: %v (%d pods)", err, len(old.Items))
		}
		flushLines(lines)
		restarted := time.Now()
		kubectl("-n", "istio-system", "delete", "pod", old.Items[0].Name, "--wait=false")
		waitFor(t, 60*time.Second, func() (bool, string) {
			pods, _ := cs.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ambit-cni-node", FieldSelector: "spec.nodeName=node-2"})
			for _, p := range pods.Items {
				if p.UID != old.Items[0].UID && p.Status.Phase == "Running" && p.DeletionTimestamp == nil {
					for _, c := range p.Status.Conditions {
						if c.Type == "Ready" && c.Status == "True" {
							return true, ""
						}
					}
				}
			}
			return false, "no new agent on node-2 yet"
		})
		back := time.Now()
		waitForLine(t, lines, 10*time.Second, func(ts int64, code string) bool {
			if ts > restarted.UnixNano() && code != "200" {
				t.Errorf("request failed while the agent restarted: %s", code)
			}
			return ts > back.UnixNano()+int64(time.Second)
		})
		h, p, _ := hbonePackets(false)
		if h == 0 || p != 0 {
			t.Errorf("after the agent restart: %d HBONE packets, %d to 8080", h, p)
		}
		client, err := cs.CoreV1().Pods(ns).Get(ctx, "client", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if ok, err := captureInstalled(mode, l.PodNetnsPath(client.UID)); err != nil || !ok {
			t.Errorf("the client's %s capture is gone after the agent restart: %v", mode, err)
		}
	})

	t.Run("a new pod in an enrolled namespace is captured from its start", func(t *testing.T) {
		kubectlApply(t, ctx, l, `
apiVersion: v1
kind: Pod
metadata: {name: late, namespace: `+ns+`}
spec:
  nodeName: node-2
  terminationGracePeriodSeconds: 1
  containers:
  - {name: client, image: curlimages/curl, command: [/bin/sleep, infinity]}
`)
		kubectl("-n", ns, "wait", "--for=condition=Ready", "pod/late", "--timeout=60s")
		p, err := cs.CoreV1().Pods(ns).Get(ctx, "late", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if p.Annotations["ambient.istio.io/redirection"] != "enabled" {
			t.Error("the new pod is not annotated as redirected")
		}
		if ok, err := captureInstalled(mode, l.PodNetnsPath(p.UID)); err != nil || !ok {
			t.Errorf("no %s capture in the new pod: %v", mode, err)
		}
		out, err := l.KubectlCmd(ctx, "-n", ns, "exec", "late", "--", "curl", "-sS", "--max-time", "3", "http://echo."+ns+".svc.cluster.local/").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "Hostname=echo-") {
			t.Errorf("the new pod's request: %v %s", err, out)
		}
	})

	t.Run("plaintext from outside the mesh: the app sees the client", func(t *testing.T) {
		kubectlApply(t, ctx, l, `
apiVersion: v1
kind: Namespace
metadata: {name: `+ns+`-plain}
---
apiVersion: v1
kind: Pod
metadata: {name: outside, namespace: `+ns+`-plain}
spec:
  nodeName: node-2
  terminationGracePeriodSeconds: 1
  containers:
  - {name: client, image: curlimages/curl, command: [/bin/sleep, infinity]}
`)
		kubectl("-n", ns+"-plain", "wait", "--for=condition=Ready", "pod/outside", "--timeout=60s")
		p, err := cs.CoreV1().Pods(ns+"-plain").Get(ctx, "outside", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		out := kubectl("-n", ns+"-plain", "exec", "outside", "--", "curl", "-s", "-m", "5", "http://echo."+ns+".svc.cluster.local/")
		if want := "IP=" + p.Status.PodIP; !slices.Contains(strings.Fields(out), want) {
			t.Errorf("echo does not see the plaintext client %s as the source: want %q in\n%s", p.Status.PodIP, want, out)
		}
	})
}

// podStarts is the pods of a namespace by UID with their containers' start
// times and restart counts: equal before and after means nothing restarted.
func podStarts(ctx context.Context, t *testing.T, cs kubernetes.Interface, ns string) string {
	t.Helper()
	pods, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var parts []string
	for _, p := range pods.Items {
		for _, c := range p.Status.ContainerStatuses {
			started := ""
			if c.State.Running != nil {
				started = c.State.Running.StartedAt.String()
			}
			parts = append(parts, fmt.Sprintf("%s/%s/%s@%s#%d", p.Name, p.UID, c.Name, started, c.RestartCount))
		}
	}
	sort.Strings(parts)
	return strings.Join(parts, " ")
}

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// keepAlive starts n requests to url on one keep-alive connection from
// the client pod, four a second, and returns once the first is answered;
// the function it returns waits for the rest and checks that every one was
// answered on that same connection.
func keepAlive(ctx context.Context, t *testing.T, l *lab.Lab, ns, url string, n int) func() {
	t.Helper()
	args := []string{"-n", ns, "exec", "client", "--", "curl", "-s", "--rate", "4/s", "-m", "30", "-w", "%{http_code} %{num_connects}\n"}
	for range n {
		args = append(args, "-o", "/dev/null", url) // curl pairs each -o with a URL
	}
	cmd := l.KubectlCmd(ctx, args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	results := make(chan string, n)
	go func() {
		s := bufio.NewScanner(out)
		for s.Scan() {
			results <- s.Text()
		}
		close(results)
	}()
	var got []string
	select {
	case r, ok := <-results:
		if !ok {
			t.Fatalf("keep-alive curl ended before its first answer: %v", cmd.Wait())
		}
		got = append(got, r)
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("keep-alive curl: no first answer in 30 s")
	}
	return func() {
		t.Helper()
		for r := range results {
			got = append(got, r)
		}
		_ = cmd.Wait()
		want := []string{"200 1"}
		for range n - 1 {
			want = append(want, "200 0") // answered, on the connection already open
		}
		if !slices.Equal(got, want) {
			t.Errorf("a keep-alive connection open across the label: got (code, new connections) %q, want %q", got, want)
		}
	}
}

func flushLines(lines <-chan string) {
	for {
		select {
		case <-lines:
		default:
			return
		}
	}
}
