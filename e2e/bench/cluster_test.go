package bench

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/yaml"
)

func TestWithCaptureMode(t *testing.T) {
	const manifest = `apiVersion: v1
kind: ServiceAccount
metadata: {name: ambit-cni-node, namespace: istio-system}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: ambit-cni-node, namespace: istio-system}
spec:
  selector: {matchLabels: {app: ambit-cni-node}}
  template:
    metadata: {labels: {app: ambit-cni-node}}
    spec:
      containers:
      - name: agent
        image: ghcr.io/ambitmesh/cni:latest
        args:
        - --zds-socket=/var/run/ztunnel/ztunnel.sock
%s
`
	tests := []struct {
		name, args string
	}{
		{name: "replaces the deployed mode", args: "        - --capture-mode=ebpf"},
		{name: "adds one where there is none", args: ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := strings.Replace(manifest, "%s", tc.args, 1)
			out, err := withCaptureMode([]byte(in), "nftables")
			if err != nil {
				t.Fatal(err)
			}
			docs := docSep.Split(string(out), -1)
			if len(docs) != 2 || docs[0] != strings.SplitN(in, "---", 2)[0] {
				t.Fatalf("want the first document untouched and two in all:\n%s", out)
			}
			var ds appsv1.DaemonSet
			if err := yaml.Unmarshal([]byte(docs[1]), &ds); err != nil {
				t.Fatal(err)
			}
			got := strings.Join(ds.Spec.Template.Spec.Containers[0].Args, " ")
			if want := "--zds-socket=/var/run/ztunnel/ztunnel.sock --capture-mode=nftables"; got != want {
				t.Errorf("args = %q, want %q", got, want)
			}
		})
	}
	if _, err := withCaptureMode([]byte("kind: ConfigMap\n"), "nftables"); err == nil {
		t.Error("want an error for a manifest without the DaemonSet")
	}
}

// TestWithCaptureModeDeploy runs withCaptureMode on the repository's own
// deploy/cni.yaml.
func TestWithCaptureModeDeploy(t *testing.T) {
	in, err := os.ReadFile(filepath.Join("..", "..", "deploy", "cni.yaml"))
	if err != nil {
		t.Skipf("no deploy/cni.yaml: %v", err)
	}
	out, err := withCaptureMode(in, "nftables")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "--capture-mode=nftables") || strings.Contains(string(out), "--capture-mode=ebpf") {
		t.Errorf("capture mode not set:\n%s", out)
	}
}
