package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambitmesh/ambit/e2e/lab"
)

const echoApp = `
apiVersion: v1
kind: Namespace
metadata:
  name: demo
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
  namespace: demo
spec:
  replicas: 2
  selector:
    matchLabels: {app: echo}
  template:
    metadata:
      labels: {app: echo, version: v1}
    spec:
      topologySpreadConstraints:
      - maxSkew: 1
        topologyKey: kubernetes.io/hostname
        whenUnsatisfiable: DoNotSchedule
        labelSelector:
          matchLabels: {app: echo}
      containers:
      - name: echo
        image: gcr.io/istio-testing/app:latest
        args: [--port=8080, --tcp=9090, --version=v1]
        ports:
        - {containerPort: 8080, name: http}
        - {containerPort: 9090, name: tcp}
        readinessProbe:
          httpGet: {path: /, port: 8080}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: demo
spec:
  selector: {app: echo}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: tcp, port: 9090, targetPort: 9090}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: client
  namespace: demo
spec:
  replicas: 1
  selector:
    matchLabels: {app: client}
  template:
    metadata:
      labels: {app: client}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: client
        image: curlimages/curl
        command: [/bin/sleep, infinity]
`

// TestLab brings a two-node lab up, runs an echo Service with a replica on
// each node and a client, calls the Service by its DNS name through
// `kubectl exec`, reads `kubectl logs`, replaces a deleted replica, and
// checks that `lab down` leaves nothing behind.
func TestLab(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the lab needs root (network namespaces, cgroups, mounts); run `make test` as root")
	}
	binDir := os.Getenv("AMBIT_BIN_DIR")
	if binDir == "" {
		binDir, _ = filepath.Abs("../bin")
	}
	before := hostSnapshot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	l, err := lab.Up(ctx, lab.Options{Name: "e2e", Nodes: 2, BinDir: binDir, Progress: testWriter{t}})
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	downDone := false
	t.Cleanup(func() {
		if !downDone {
			if err := l.Down(); err != nil {
				t.Errorf("lab down: %v", err)
			}
		}
	})

	kubectl := func(args ...string) string {
		t.Helper()
		out, err := l.KubectlCmd(ctx, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	if err := l.Apply(ctx, []byte(echoApp)); err != nil {
		t.Fatal(err)
	}
	kubectl("-n", "demo", "rollout", "status", "deploy/echo", "deploy/client", "--timeout=120s")

	cs, err := l.Client()
	if err != nil {
		t.Fatal(err)
	}
	pods, err := cs.CoreV1().Pods("demo").List(ctx, metav1.ListOptions{LabelSelector: "app=echo"})
	if err != nil {
		t.Fatal(err)
	}
	nodes := map[string]string{}
	for _, p := range pods.Items {
		nodes[p.Name] = p.Spec.NodeName
	}
	if len(nodes) != 2 || len(distinct(nodes)) != 2 {
		t.Fatalf("echo replicas not spread over both nodes: %v", nodes)
	}

	t.Run("DNS and ClusterIP through kubectl exec", func(t *testing.T) {
		// Ready pods reach kube-proxy's rules a moment after the rollout
		// reports them: wait until each replica has answered once.
		seenOnce := map[string]bool{}
		waitFor(t, 30*time.Second, func() (bool, string) {
			out, _ := l.KubectlCmd(ctx, "-n", "demo", "exec", "deploy/client", "--", "curl", "-sS", "--max-time", "2", "http://echo.demo.svc.cluster.local/").CombinedOutput()
			for _, line := range strings.Split(string(out), "\n") {
				if h, ok := strings.CutPrefix(line, "Hostname="); ok {
					seenOnce[h] = true
				}
			}
			return len(seenOnce) == 2, fmt.Sprintf("answered: %v", seenOnce)
		})
		out := kubectl("-n", "demo", "exec", "deploy/client", "--", "sh", "-c",
			`for i in $(seq 50); do curl -sS --max-time 5 http://echo.demo.svc.cluster.local/ | grep '^Hostname=' || echo FAILED; done`)
		seen := map[string]int{}
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			seen[strings.TrimPrefix(line, "Hostname=")]++
		}
		if seen["FAILED"] > 0 {
			t.Fatalf("%d of 50 requests failed:\n%s", seen["FAILED"], out)
		}
		for name := range nodes {
			if seen[name] == 0 {
				t.Errorf("replica %s never answered; answers: %v", name, seen)
			}
		}
		// Short names resolve through the search path too.
		if out := kubectl("-n", "demo", "exec", "deploy/client", "--", "curl", "-sS", "--max-time", "5", "http://echo/"); !strings.Contains(out, "Hostname=") {
			t.Errorf("short name: %s", out)
		}
	})

	t.Run("kubectl exec exit code", func(t *testing.T) {
		cmd := l.KubectlCmd(ctx, "-n", "demo", "exec", "deploy/client", "--", "sh", "-c", "exit 3")
		err := cmd.Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 3 {
			t.Errorf("exit code: got %v, want 3", err)
		}
	})

	t.Run("kubectl logs", func(t *testing.T) {
		for name := range nodes {
			out := kubectl("-n", "demo", "logs", name)
			if !regexp.MustCompile(`(?i)listening`).MatchString(out) {
				t.Errorf("logs of %s do not show the echo server's start:\n%s", name, out)
			}
		}
	})

	t.Run("deleted replica is replaced", func(t *testing.T) {
		var victim string
		for name := range nodes {
			victim = name
			break
		}
		kubectl("-n", "demo", "delete", "pod", victim, "--wait=true", "--timeout=60s")
		deadline := time.Now().Add(90 * time.Second)
		for {
			pods, err := cs.CoreV1().Pods("demo").List(ctx, metav1.ListOptions{LabelSelector: "app=echo"})
			if err != nil {
				t.Fatal(err)
			}
			ready := 0
			for _, p := range pods.Items {
				if p.Name != victim && p.DeletionTimestamp == nil && podReady(&p) {
					ready++
				}
			}
			if ready == 2 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the deleted replica was not replaced: %d ready", ready)
			}
			time.Sleep(200 * time.Millisecond)
		}
	})

	t.Run("workloads", func(t *testing.T) { testWorkloads(ctx, t, l) })

	t.Run("namespace deletion", func(t *testing.T) {
		kubectl("delete", "namespace", "demo", "--wait=true", "--timeout=120s")
	})

	if err := l.Down(); err != nil {
		t.Fatalf("lab down: %v", err)
	}
	downDone = true
	after := hostSnapshot(t)
	for _, k := range []string{"netns", "links", "cgroups", "mounts", "processes"} {
		if added := diff(before[k], after[k]); len(added) > 0 {
			t.Errorf("lab down left %s behind: %v", k, added)
		}
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func distinct(m map[string]string) map[string]bool {
	out := map[string]bool{}
	for _, v := range m {
		out[v] = true
	}
	return out
}

// hostSnapshot lists what a lab could leave behind on the host.
func hostSnapshot(t *testing.T) map[string][]string {
	t.Helper()
	run := func(name string, args ...string) []string {
		out, err := exec.Command(name, args...).Output()
		if err != nil {
			t.Fatalf("%s %v: %v", name, args, err)
		}
		return lines(string(out))
	}
	snap := map[string][]string{
		"netns": run("ip", "netns", "list"),
		"links": run("sh", "-c", "ip -o link show | awk -F': ' '{print $2}'"),
	}
	root, err := lab.Cgroup2Root()
	if err != nil {
		t.Fatal(err)
	}
	snap["cgroups"] = run("find", root, "-maxdepth", "3", "-type", "d", "-path", "*ambit-lab-e2e*")
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range lines(string(mounts)) {
		if f := strings.Fields(l); len(f) > 4 {
			snap["mounts"] = append(snap["mounts"], f[4])
		}
	}
	// Processes are compared by command line: pids of short-lived
	// commands come and go.
	for _, l := range run("ps", "-eo", "args=") {
		if strings.Contains(l, "/bin/lab") || strings.Contains(l, "hyperkube") || strings.Contains(l, "kube-v1.36.0/etcd") ||
			strings.Contains(l, "echo-server") || strings.Contains(l, "coredns") {
			snap["processes"] = append(snap["processes"], l)
		}
	}
	return snap
}

func lines(s string) []string {
	var out []string
	for _, l := range strings.Split(strings.TrimSpace(s), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	sort.Strings(out)
	return out
}

func diff(before, after []string) []string {
	seen := map[string]bool{}
	for _, b := range before {
		seen[b] = true
	}
	var added []string
	for _, a := range after {
		if !seen[a] {
			added = append(added, a)
		}
	}
	return added
}
