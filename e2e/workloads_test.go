package e2e

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ambitmesh/ambit/e2e/lab"
)

const workloads = `
apiVersion: v1
kind: Namespace
metadata:
  name: work
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg, namespace: work}
data: {greeting: hello-from-configmap}
---
apiVersion: v1
kind: Secret
metadata: {name: sec, namespace: work}
stringData: {password: s3cret}
---
apiVersion: v1
kind: Pod
metadata:
  name: volumes
  namespace: work
  labels: {app: volumes}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: ambit/sleep
    env:
    - name: GREETING
      valueFrom: {configMapKeyRef: {name: cfg, key: greeting}}
    - name: MY_POD_IP
      valueFrom: {fieldRef: {fieldPath: status.podIP}}
    volumeMounts:
    - {name: cfg, mountPath: /etc/lab-test/cfg}
    - {name: sec, mountPath: /etc/lab-test/sec, readOnly: true}
    - {name: scratch, mountPath: /var/lab-test/scratch}
    - {name: token, mountPath: /var/run/secrets/lab-test/token}
    - {name: info, mountPath: /etc/lab-test/info}
  volumes:
  - {name: cfg, configMap: {name: cfg}}
  - {name: sec, secret: {secretName: sec}}
  - {name: scratch, emptyDir: {}}
  - name: token
    projected:
      sources:
      - serviceAccountToken: {path: token, audience: lab-test, expirationSeconds: 3600}
  - name: info
    downwardAPI:
      items:
      - {path: labels, fieldRef: {fieldPath: metadata.labels}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: everywhere, namespace: work}
spec:
  selector: {matchLabels: {app: everywhere}}
  template:
    metadata: {labels: {app: everywhere}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - {name: main, image: ambit/sleep}
---
apiVersion: batch/v1
kind: Job
metadata: {name: once, namespace: work}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: main
        image: ambit/sleep
        command: [sh, -c, 'test "$(hostname)" = "$HOSTNAME" && echo job-done']
---
apiVersion: v1
kind: Pod
metadata: {name: unhealthy, namespace: work}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: ambit/sleep
    livenessProbe:
      exec: {command: ["false"]}
      periodSeconds: 1
      failureThreshold: 1
---
apiVersion: v1
kind: Pod
metadata: {name: no-such-image, namespace: work}
spec:
  containers:
  - {name: main, image: nginx:1.27}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: work}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: gcr.io/istio-testing/app
    args: [--port=8080]
    readinessProbe:
      tcpSocket: {port: 8080}
      periodSeconds: 1
`

// testWorkloads checks what kubelet does for pods beyond running them:
// volumes and env, DaemonSets, Jobs, liveness restarts, unknown images and
// port-forward.
func testWorkloads(ctx context.Context, t *testing.T, l *lab.Lab) {
	if err := l.Apply(ctx, []byte(workloads)); err != nil {
		t.Fatal(err)
	}
	cs, err := l.Client()
	if err != nil {
		t.Fatal(err)
	}
	exec := func(pod string, cmd ...string) string {
		t.Helper()
		out, err := l.KubectlCmd(ctx, append([]string{"-n", "work", "exec", pod, "--"}, cmd...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("exec %v in %s: %v\n%s", cmd, pod, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	waitPod(ctx, t, cs, "volumes", func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodRunning })

	t.Run("volumes and env", func(t *testing.T) {
		checks := []struct{ name, cmd, want string }{
			{"configMap", "cat /etc/lab-test/cfg/greeting", "hello-from-configmap"},
			{"secret", "cat /etc/lab-test/sec/password", "s3cret"},
			{"secret read-only", "touch /etc/lab-test/sec/x 2>/dev/null && echo writable || echo read-only", "read-only"},
			{"emptyDir writable", "echo hi > /var/lab-test/scratch/f && cat /var/lab-test/scratch/f", "hi"},
			{"downward API", "cat /etc/lab-test/info/labels", `app="volumes"`},
			{"env from configMap", "echo $GREETING", "hello-from-configmap"},
			{"env from fieldRef", `test "$MY_POD_IP" = "$(hostname -i 2>/dev/null | cut -d' ' -f1)" || ip -o -4 addr show eth0 | grep -q "$MY_POD_IP" && echo ok`, "ok"},
			{"in-cluster env", "echo $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT", "10.96.0.1:443"},
			{"hostname", "hostname", "volumes"},
			{"service-account token mounted", "test -s /var/run/secrets/kubernetes.io/serviceaccount/token && echo ok", "ok"},
		}
		for _, c := range checks {
			if got := exec("volumes", "sh", "-c", c.cmd); got != c.want {
				t.Errorf("%s: %q gave %q, want %q", c.name, c.cmd, got, c.want)
			}
		}
		// The projected token is bound to the pod and its node, with the
		// audience asked for: Ambit's CA authenticates callers by these
		// claims.
		claims := jwtClaims(t, exec("volumes", "cat", "/var/run/secrets/lab-test/token/token"))
		k8s, _ := claims["kubernetes.io"].(map[string]any)
		pod, _ := k8s["pod"].(map[string]any)
		node, _ := k8s["node"].(map[string]any)
		if aud := fmt.Sprint(claims["aud"]); !strings.Contains(aud, "lab-test") {
			t.Errorf("token audience %s, want lab-test", aud)
		}
		if pod["name"] != "volumes" || node["name"] == nil {
			t.Errorf("token not bound to the pod and node: %v", k8s)
		}
	})

	t.Run("DaemonSet runs on every node", func(t *testing.T) {
		waitFor(t, 60*time.Second, func() (bool, string) {
			pods, err := cs.CoreV1().Pods("work").List(ctx, metav1.ListOptions{LabelSelector: "app=everywhere"})
			if err != nil {
				return false, err.Error()
			}
			nodes := map[string]bool{}
			for _, p := range pods.Items {
				if p.Status.Phase == corev1.PodRunning {
					nodes[p.Spec.NodeName] = true
				}
			}
			return len(nodes) == l.Nodes(), fmt.Sprintf("running on %v", nodes)
		})
	})

	t.Run("Job completes", func(t *testing.T) {
		waitFor(t, 60*time.Second, func() (bool, string) {
			j, err := cs.BatchV1().Jobs("work").Get(ctx, "once", metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			return j.Status.Succeeded == 1, fmt.Sprintf("succeeded %d failed %d", j.Status.Succeeded, j.Status.Failed)
		})
	})

	t.Run("liveness probe failure restarts the container", func(t *testing.T) {
		waitPod(ctx, t, cs, "unhealthy", func(p *corev1.Pod) bool {
			return len(p.Status.ContainerStatuses) == 1 && p.Status.ContainerStatuses[0].RestartCount >= 1
		})
	})

	t.Run("unknown image is ErrImagePull", func(t *testing.T) {
		waitPod(ctx, t, cs, "no-such-image", func(p *corev1.Pod) bool {
			return p.Status.Phase == corev1.PodPending && len(p.Status.ContainerStatuses) == 1 &&
				p.Status.ContainerStatuses[0].State.Waiting != nil &&
				p.Status.ContainerStatuses[0].State.Waiting.Reason == "ErrImagePull"
		})
	})

	t.Run("port-forward", func(t *testing.T) {
		waitPod(ctx, t, cs, "web", func(p *corev1.Pod) bool { return podReady(p) })
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		_ = ln.Close() // only asked the kernel for a free port
		pf := l.KubectlCmd(ctx, "-n", "work", "port-forward", "pod/web", fmt.Sprintf("%d:8080", port))
		var pfOut strings.Builder
		pf.Stdout, pf.Stderr = &pfOut, &pfOut
		defer func() {
			if t.Failed() {
				t.Logf("kubectl port-forward said:\n%s", pfOut.String())
			}
		}()
		if err := pf.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = pf.Process.Kill(); _ = pf.Wait() }()
		var body string
		waitFor(t, 30*time.Second, func() (bool, string) {
			resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
			if err != nil {
				return false, err.Error()
			}
			defer func() { _ = resp.Body.Close() }()
			b, _ := io.ReadAll(resp.Body)
			body = string(b)
			return true, ""
		})
		if !strings.Contains(body, "Hostname=web") {
			t.Errorf("port-forwarded answer: %q", body)
		}
	})
}

func waitPod(ctx context.Context, t *testing.T, cs kubernetes.Interface, name string, cond func(*corev1.Pod) bool) {
	t.Helper()
	waitFor(t, 90*time.Second, func() (bool, string) {
		p, err := cs.CoreV1().Pods("work").Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		b, _ := json.Marshal(p.Status)
		return cond(p), string(b)
	})
}

// waitFor polls cond until it holds, failing the test with cond's last
// description after d.
func waitFor(t *testing.T, d time.Duration, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met after %s; last: %s", d, last)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func jwtClaims(t *testing.T, token string) map[string]any {
	t.Helper()
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("not a JWT: %q", token)
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var claims map[string]any
	if err := json.Unmarshal(b, &claims); err != nil {
		t.Fatal(err)
	}
	return claims
}
