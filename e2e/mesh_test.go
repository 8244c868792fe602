package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ambitmesh/ambit/api/zdsapi"
	"github.com/ambitmesh/ambit/cni/nft"
	"github.com/ambitmesh/ambit/e2e/lab"
	"github.com/ambitmesh/ambit/ztunnel/inpod"
)

const meshApps = `
apiVersion: v1
kind: Namespace
metadata:
  name: mesh-a
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Namespace
metadata:
  name: mesh-b
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Namespace
metadata:
  name: plain
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: mesh-a}
spec:
  replicas: 1
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo, version: v1}}
    spec:
      nodeSelector: {kubernetes.io/hostname: node-1}
      terminationGracePeriodSeconds: 1
      containers:
      - name: echo
        image: gcr.io/istio-testing/app
        args: [--port=8080, --tcp=9090, --version=v1]
        readinessProbe:
          tcpSocket: {port: 8080}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: mesh-a}
spec:
  selector: {app: echo}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: tcp, port: 9090, targetPort: 9090}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client-1, namespace: mesh-b}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client-2, namespace: mesh-b}
---
apiVersion: v1
kind: Pod
metadata: {name: client-1, namespace: mesh-b, labels: {app: client-1}}
spec:
  serviceAccountName: client-1
  nodeName: node-2
  terminationGracePeriodSeconds: 1
  containers:
  - {name: client, image: curlimages/curl, command: [/bin/sleep, infinity]}
---
apiVersion: v1
kind: Pod
metadata: {name: client-2, namespace: mesh-b, labels: {app: client-2}}
spec:
  serviceAccountName: client-2
  nodeName: node-2
  terminationGracePeriodSeconds: 1
  containers:
  - {name: client, image: curlimages/curl, command: [/bin/sleep, infinity]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: plain}
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
          tcpSocket: {port: 8080}
          periodSeconds: 1
---
apiVersion: v1
kind: Pod
metadata: {name: plain-client, namespace: plain}
spec:
  nodeName: node-2
  terminationGracePeriodSeconds: 1
  containers:
  - {name: client, image: curlimages/curl, command: [/bin/sleep, infinity]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: plain}
spec:
  selector: {app: echo}
  ports:
  - {name: http, port: 80, targetPort: 8080}
`

// TestMesh installs Ambit from deploy/ into a lab and checks the node
// tunnel and the controller end to end: mTLS on the wire, identities in
// metrics, L4 authorization and its timing, the controller's absence, and a
// forged certificate request. The test plays the node agent (ZDS and
// capture rules), which the capture issue replaces.
func TestMesh(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the lab needs root (network namespaces, cgroups, mounts); run `make test` as root")
	}
	binDir := os.Getenv("AMBIT_BIN_DIR")
	if binDir == "" {
		binDir, _ = filepath.Abs("../bin")
	}
	for _, b := range []string{"ztunnel", "controller"} {
		if _, err := os.Stat(filepath.Join(binDir, b)); err != nil {
			t.Fatalf("bin/%s missing: run `make build`", b)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	l, err := lab.Up(ctx, lab.Options{Name: "mesh", Nodes: 2, BinDir: binDir, Progress: testWriter{t}})
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() && os.Getenv("AMBIT_KEEP_LAB") != "" {
			t.Logf("AMBIT_KEEP_LAB is set: leaving the failed lab up: KUBECONFIG=%s; %s/lab down --name mesh", l.Kubeconfig(), binDir)
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
	kubectl("apply", "--server-side", "-f", filepath.Join(repo, "deploy/crds/istio/security.yaml"))
	kubectl("apply", "--server-side", "-f", filepath.Join(repo, "deploy/ambit.yaml"))

	// The test is the node agent of each node: a ZDS server on the
	// socket the ztunnel DaemonSet mounts.
	zds := map[string]*inpod.Server{}
	for i := 1; i <= l.Nodes(); i++ {
		sock := filepath.Join(l.NodeRoot(i), "var/run/ztunnel/ztunnel.sock")
		if err := os.MkdirAll(filepath.Dir(sock), 0o755); err != nil {
			t.Fatal(err)
		}
		srv, err := inpod.NewServer(sock, slog.New(slog.NewTextHandler(io.Discard, nil)))
		if err != nil {
			t.Fatal(err)
		}
		go func() { _ = srv.Serve(ctx) }()
		t.Cleanup(func() { _ = srv.Close() })
		zds[lab.NodeName(i)] = srv
	}
	kubectl("-n", "istio-system", "rollout", "status", "deploy/ambit-controller", "--timeout=120s")
	kubectl("-n", "istio-system", "rollout", "status", "ds/ztunnel", "--timeout=120s")

	if err := l.Apply(ctx, []byte(meshApps)); err != nil {
		t.Fatal(err)
	}
	kubectl("-n", "mesh-a", "rollout", "status", "deploy/echo", "--timeout=120s")
	kubectl("-n", "plain", "rollout", "status", "deploy/echo", "--timeout=120s")
	kubectl("-n", "mesh-b", "wait", "--for=condition=Ready", "pod/client-1", "pod/client-2", "--timeout=120s")
	kubectl("-n", "plain", "wait", "--for=condition=Ready", "pod/plain-client", "--timeout=120s")
	for _, ns := range []string{"mesh-a", "mesh-b"} {
		pods, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pods.Items {
			enrol(t, ctx, l, zds, &p)
		}
	}

	exec := func(pod string, args ...string) (string, error) {
		out, err := l.KubectlCmd(ctx, append([]string{"-n", "mesh-b", "exec", pod, "--"}, args...)...).CombinedOutput()
		return string(out), err
	}
	curl := func(pod, target string) (string, error) {
		return exec(pod, "curl", "-sS", "--max-time", "3", target)
	}

	t.Run("mTLS between nodes, plaintext nowhere on the underlay", func(t *testing.T) {
		const marker = "ambit-plaintext-marker"
		capture := startCapture(t, ctx, l, "n1")
		waitFor(t, 30*time.Second, func() (bool, string) {
			out, err := curl("client-1", "http://echo.mesh-a.svc.cluster.local/"+marker)
			return err == nil && strings.Contains(out, "Hostname=echo-"), fmt.Sprintf("%v %s", err, out)
		})
		pcap := capture.stop(t)
		if bytes.Contains(pcap, []byte(marker)) {
			t.Error("the request's plaintext crossed the underlay")
		}
		if n := countPackets(t, pcap, "tcp port 15008"); n == 0 {
			t.Errorf("no HBONE (port 15008) packets on the underlay (%d bytes captured, %d TCP packets)", len(pcap), countPackets(t, pcap, "tcp"))
		}
		// The echo server saw the request: ztunnel delivered it.
		out, _ := curl("client-1", "http://echo.mesh-a.svc.cluster.local/"+marker)
		if !strings.Contains(out, "URL=/"+marker) {
			t.Errorf("echo did not see the path: %s", out)
		}
	})

	t.Run("outside the mesh is passthrough", func(t *testing.T) {
		out, err := curl("client-1", "http://echo.plain.svc.cluster.local/")
		if err != nil || !strings.Contains(out, "Hostname=echo-") {
			t.Errorf("passthrough to a non-mesh service: %v %s", err, out)
		}
	})

	t.Run("plaintext inbound until STRICT", func(t *testing.T) {
		plain := func() error {
			_, err := l.KubectlCmd(ctx, "-n", "plain", "exec", "plain-client", "--", "curl", "-sS", "--max-time", "3", "http://echo.mesh-a.svc.cluster.local/").CombinedOutput()
			return err
		}
		if err := plain(); err != nil {
			t.Fatalf("plaintext from outside the mesh, no PeerAuthentication: %v", err)
		}
		kubectlApply(t, ctx, l, `
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: mesh-a}
spec:
  mtls: {mode: STRICT}
`)
		waitFor(t, 10*time.Second, func() (bool, string) {
			return plain() != nil, "plaintext still accepted under STRICT"
		})
		if out, err := curl("client-1", "http://echo.mesh-a.svc.cluster.local/"); err != nil {
			t.Errorf("mTLS client under STRICT: %v %s", err, out)
		}
		kubectl("-n", "mesh-a", "delete", "peerauthentication", "strict")
	})

	t.Run("admin config dump", func(t *testing.T) {
		out, err := l.InNode(ctx, 1, "curl", "-sS", "http://127.0.0.1:15000/config_dump").CombinedOutput()
		if err != nil {
			t.Fatalf("config dump: %v %s", err, out)
		}
		for _, want := range []string{`"certificates"`, "spiffe://cluster.local/ns/mesh-a/sa/default", `"workloads"`, "echo.mesh-a.svc.cluster.local"} {
			if !strings.Contains(string(out), want) {
				t.Errorf("config dump lacks %s", want)
			}
		}
	})

	t.Run("identity in metrics and access log", func(t *testing.T) {
		waitFor(t, 10*time.Second, func() (bool, string) {
			out, err := l.InNode(ctx, 1, "curl", "-sS", "http://127.0.0.1:15020/metrics").CombinedOutput()
			if err != nil {
				return false, string(out)
			}
			for _, line := range strings.Split(string(out), "\n") {
				if strings.HasPrefix(line, "istio_tcp_connections_opened_total{") &&
					strings.Contains(line, `reporter="destination"`) &&
					strings.Contains(line, `source_principal="cluster.local/ns/mesh-b/sa/client-1"`) &&
					strings.Contains(line, `connection_security_policy="mutual_tls"`) {
					return true, ""
				}
			}
			return false, "no destination-side metric with client-1's principal"
		})
		logs := kubectl("-n", "istio-system", "logs", "-l", "app=ztunnel", "--tail=-1", "--prefix")
		if !strings.Contains(logs, "spiffe://cluster.local/ns/mesh-b/sa/client-1") {
			t.Error("no access-log line names client-1's identity")
		}
	})

	t.Run("authorization: allow-nothing, then one principal", func(t *testing.T) {
		kubectlApply(t, ctx, l, `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: mesh-a}
spec: {}
`)
		waitFor(t, 10*time.Second, func() (bool, string) {
			_, err := curl("client-1", "http://echo.mesh-a.svc.cluster.local/")
			return err != nil, "client-1 still gets through an allow-nothing policy"
		})
		kubectlApply(t, ctx, l, `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client-1, namespace: mesh-a}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/mesh-b/sa/client-1"]
`)
		waitFor(t, 10*time.Second, func() (bool, string) {
			out, err := curl("client-1", "http://echo.mesh-a.svc.cluster.local/")
			return err == nil, fmt.Sprintf("client-1 denied: %v %s", err, out)
		})
		if out, err := curl("client-2", "http://echo.mesh-a.svc.cluster.local/"); err == nil {
			t.Errorf("client-2 got through: %s", out)
		}
	})

	t.Run("policy change within 1s; denied established connections closed", func(t *testing.T) {
		// A long-lived TCP connection from client-1 to echo's TCP port.
		tcp := l.KubectlCmd(ctx, "-n", "mesh-b", "exec", "-i", "client-1", "--", "curl", "-sN", "telnet://echo.mesh-a.svc.cluster.local:9090")
		stdin, _ := tcp.StdinPipe()
		stdout, _ := tcp.StdoutPipe()
		if err := tcp.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- tcp.Wait() }()
		defer func() { _ = tcp.Process.Kill() }()
		// Istio's echo server answers each TCP write with a report.
		if _, err := fmt.Fprintln(stdin, "ping-before"); err != nil {
			t.Fatalf("writing to the TCP echo: %v", err)
		}
		rd := bufio.NewReader(stdout)
		line, err := rd.ReadString('\n')
		if err != nil || line == "" {
			t.Fatalf("TCP echo before the change: %q %v", line, err)
		}
		// Drain the rest of the answers; EOF means ztunnel closed it.
		eof := make(chan struct{})
		go func() { _, _ = io.Copy(io.Discard, rd); close(eof) }()
		// A loop inside client-1 stamps each new connection's outcome.
		loop := l.KubectlCmd(ctx, "-n", "mesh-b", "exec", "client-1", "--", "sh", "-c",
			`while true; do c=$(curl -s -o /dev/null -m 1 -w '%{http_code}' http://echo.mesh-a.svc.cluster.local/); echo "$(date +%s%N) $c"; done`)
		lout, _ := loop.StdoutPipe()
		if err := loop.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = loop.Process.Kill(); _ = loop.Wait() }()
		lines := make(chan string, 1000)
		go func() {
			s := bufio.NewScanner(lout)
			for s.Scan() {
				lines <- s.Text()
			}
			close(lines)
		}()
		// Wait until the loop runs and succeeds.
		waitForLine(t, lines, 20*time.Second, func(ts int64, code string) bool { return code == "200" })
		applied := time.Now()
		kubectlApply(t, ctx, l, `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client-1, namespace: mesh-a}
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/mesh-b/sa/client-1"]
`)
		ts := waitForLine(t, lines, 20*time.Second, func(ts int64, code string) bool {
			return ts > applied.UnixNano() && code != "200"
		})
		took := time.Duration(ts - applied.UnixNano())
		t.Logf("policy change enforced for new connections after %s", took)
		if took > time.Second {
			t.Errorf("policy change took %s to be enforced, want < 1s", took)
		}
		// curl notices the close when it next writes, or at EOF.
		closed := false
		for deadline := time.Now().Add(10 * time.Second); !closed && time.Now().Before(deadline); {
			_, _ = fmt.Fprintln(stdin, "ping-after")
			select {
			case err := <-exited:
				t.Logf("curl exited: %v", err)
				closed = true
			case <-eof:
				closed = true
			case <-time.After(500 * time.Millisecond):
			}
		}
		if !closed {
			t.Error("the established connection that the new policy denies is still open")
		}
		kubectl("-n", "mesh-a", "delete", "authorizationpolicy", "deny-client-1")
	})

	t.Run("controller down: traffic and policy keep working", func(t *testing.T) {
		kubectl("-n", "istio-system", "scale", "deploy/ambit-controller", "--replicas=0")
		waitFor(t, 60*time.Second, func() (bool, string) {
			pods, _ := cs.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ambit-controller"})
			return len(pods.Items) == 0, fmt.Sprintf("%d controller pods", len(pods.Items))
		})
		waitFor(t, 10*time.Second, func() (bool, string) {
			out, err := curl("client-1", "http://echo.mesh-a.svc.cluster.local/")
			return err == nil, fmt.Sprintf("client-1 without controller: %v %s", err, out)
		})
		if out, err := curl("client-2", "http://echo.mesh-a.svc.cluster.local/"); err == nil {
			t.Errorf("client-2 got through while the controller was down: %s", out)
		}
		kubectl("-n", "istio-system", "scale", "deploy/ambit-controller", "--replicas=1")
		kubectl("-n", "istio-system", "rollout", "status", "deploy/ambit-controller", "--timeout=120s")
	})

	t.Run("L7 fields at ztunnel are reported in status", func(t *testing.T) {
		kubectlApply(t, ctx, l, `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: plain}
spec:
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: ["GET"]
`)
		waitFor(t, 30*time.Second, func() (bool, string) {
			out, err := l.KubectlCmd(ctx, "-n", "plain", "get", "authorizationpolicy", "get-only",
				"-o", `jsonpath={range .status.conditions[*]}{.type}={.status}/{.reason}: {.message}{"\n"}{end}`).CombinedOutput()
			if err != nil {
				return false, string(out)
			}
			return strings.Contains(string(out), "ZtunnelAccepted=False/UnsupportedValue") && strings.Contains(string(out), "methods"), string(out)
		})
		events := kubectl("-n", "plain", "get", "events", "--field-selector", "involvedObject.name=get-only", "-o", "jsonpath={.items[*].reason}")
		if !strings.Contains(events, "UnsupportedValue") {
			t.Errorf("no UnsupportedValue event for the policy: %q", events)
		}
	})

	t.Run("forged CSR is refused", func(t *testing.T) {
		testForgedCSR(t, ctx, l, cs)
	})
}

// enrol hands a pod to its node's ztunnel over ZDS and steers its traffic.
func enrol(t *testing.T, ctx context.Context, l *lab.Lab, zds map[string]*inpod.Server, p *corev1.Pod) {
	t.Helper()
	nsPath := l.PodNetnsPath(p.UID)
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	var err error
	deadline := time.Now().Add(30 * time.Second)
	for {
		err = zds[p.Spec.NodeName].Upsert(string(p.UID), &zdsapi.WorkloadInfo{Name: p.Name, Namespace: p.Namespace, ServiceAccount: sa}, nsPath, nil)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("enrolling %s/%s: %v", p.Namespace, p.Name, err)
	}
	// Steer its traffic as the nftables capture mode does (cni/nft),
	// probes from the node excepted.
	i, _ := lab.NodeIndex(p.Spec.NodeName)
	if err := nft.Apply(nsPath, []netip.Addr{netip.MustParseAddr(nodeIPOf(i))}); err != nil {
		t.Fatalf("capture rules for %s/%s: %v", p.Namespace, p.Name, err)
	}
	// Tell the controller, as the node agent does: peers may now use HBONE.
	if out, err := l.KubectlCmd(ctx, "-n", p.Namespace, "annotate", "--overwrite", "pod", p.Name, "ambient.istio.io/redirection=enabled").CombinedOutput(); err != nil {
		t.Fatalf("annotating %s/%s: %v: %s", p.Namespace, p.Name, err, out)
	}
}

func nodeIPOf(i int) string { return "10.200.0." + strconv.Itoa(10+i) }

func kubectlApply(t *testing.T, ctx context.Context, l *lab.Lab, y string) {
	t.Helper()
	if err := l.Apply(ctx, []byte(y)); err != nil {
		t.Fatal(err)
	}
}

// waitForLine reads "<unix nanos> <code>" lines until cond holds, returning
// the line's time.
func waitForLine(t *testing.T, lines <-chan string, d time.Duration, cond func(ts int64, code string) bool) int64 {
	t.Helper()
	timeout := time.After(d)
	for {
		select {
		case line, ok := <-lines:
			if !ok {
				t.Fatal("the request loop ended")
			}
			f := strings.Fields(line)
			if len(f) != 2 {
				continue
			}
			ts, err := strconv.ParseInt(f[0], 10, 64)
			if err == nil && cond(ts, f[1]) {
				return ts
			}
		case <-timeout:
			t.Fatalf("no matching line after %s", d)
		}
	}
}

// capture is a tcpdump of an underlay link in the control-plane namespace.
type capture struct {
	cmd  *exec.Cmd
	file string
}

func startCapture(t *testing.T, ctx context.Context, l *lab.Lab, link string) *capture {
	t.Helper()
	file := filepath.Join(t.TempDir(), "underlay.pcap")
	cmd := exec.CommandContext(ctx, "nsenter", "--net="+l.ControlPlaneNetns(), "--", "tcpdump", "-i", link, "--immediate-mode", "-U", "-Z", "root", "-s", "0", "-w", file, "tcp")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	waitFor(t, 10*time.Second, func() (bool, string) {
		return strings.Contains(stderr.String(), "listening on"), stderr.String()
	})
	return &capture{cmd: cmd, file: file}
}

func (c *capture) stop(t *testing.T) []byte {
	t.Helper()
	_ = c.cmd.Process.Signal(syscall.SIGINT)
	_ = c.cmd.Wait()
	b, err := os.ReadFile(c.file)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func countPackets(t *testing.T, pcap []byte, filter string) int {
	t.Helper()
	return len(lines(packets(t, pcap, filter)))
}

// packets returns tcpdump's lines for the packets of pcap that match
// filter, for failure messages.
func packets(t *testing.T, pcap []byte, filter string) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "c.pcap")
	if err := os.WriteFile(f, pcap, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("tcpdump", "-nn", "-r", f, filter).Output()
	if err != nil {
		t.Fatalf("tcpdump -r: %v", err)
	}
	return string(out)
}

// testForgedCSR asks the CA, with the token of node-1's ztunnel, for the
// identity of a pod on node-2, and expects a refusal with a reason; the
// same token gets the identity of a pod on node-1.
func testForgedCSR(t *testing.T, ctx context.Context, l *lab.Lab, cs kubernetes.Interface) {
	pods, err := cs.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ztunnel", FieldSelector: "spec.nodeName=node-1"})
	if err != nil || len(pods.Items) != 1 {
		t.Fatalf("ztunnel on node-1: %v %d", err, len(pods.Items))
	}
	out, err := l.KubectlCmd(ctx, "-n", "istio-system", "create", "token", "ztunnel", "--audience=istio-ca",
		"--bound-object-kind=Pod", "--bound-object-name="+pods.Items[0].Name, "--bound-object-uid="+string(pods.Items[0].UID)).Output()
	if err != nil {
		t.Fatalf("kubectl create token: %v", err)
	}
	token := strings.TrimSpace(string(out))
	ctl, err := cs.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ambit-controller"})
	if err != nil || len(ctl.Items) == 0 || ctl.Items[0].Status.PodIP == "" {
		t.Fatalf("controller pod: %v", err)
	}
	cm, err := cs.CoreV1().ConfigMaps("istio-system").Get(ctx, "istio-ca-root-cert", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM([]byte(cm.Data["root-cert.pem"]))
	node1, err := inpod.OpenNetNS("/run/netns/" + l.NodeNetns(1))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = node1.Close() }()
	dial := node1.Dialer()
	conn, err := grpc.NewClient(net.JoinHostPort(ctl.Items[0].Status.PodIP, "15012"),
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: "ambit-controller.istio-system.svc"})),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return dial(ctx, "tcp", addr) }))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	client := pb.NewIstioCertificateServiceClient(conn)
	ask := func(id string) error {
		u, _ := url.Parse(id)
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, key)
		if err != nil {
			t.Fatal(err)
		}
		md, _ := structpbImpersonate(id)
		cctx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
		cctx, cancel := context.WithTimeout(cctx, 10*time.Second)
		defer cancel()
		_, err = client.CreateCertificate(cctx, &pb.IstioCertificateRequest{
			Csr:              string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})),
			ValidityDuration: 3600,
			Metadata:         md,
		})
		return err
	}
	err = ask("spiffe://cluster.local/ns/mesh-b/sa/client-1")
	if st, _ := status.FromError(err); err == nil || st.Code() != codes.PermissionDenied {
		t.Errorf("node-1's ztunnel asking for a node-2 identity: got %v, want PermissionDenied", err)
	} else {
		t.Logf("refused as expected: %s", st.Message())
	}
	if err := ask("spiffe://cluster.local/ns/mesh-a/sa/default"); err != nil {
		t.Errorf("node-1's ztunnel asking for a node-1 identity: %v", err)
	}
}

// structpbImpersonate is the request metadata with which a node tunnel
// names the identity it asks for (Istio's ImpersonatedIdentity).
func structpbImpersonate(id string) (*structpb.Struct, error) {
	return structpb.NewStruct(map[string]any{"ImpersonatedIdentity": id})
}
