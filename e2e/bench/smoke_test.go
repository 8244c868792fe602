package bench

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSmoke runs the whole bench in its smallest configuration (Smoke) in
// a lab of its own, so that `make bench` cannot rot: every case must fill
// every row of its table, and the lab must be gone afterwards. It checks
// no figure's value.
func TestSmoke(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the bench's lab needs root (network namespaces, cgroups, mounts); run `make test` as root")
	}
	binDir := os.Getenv("AMBIT_BIN_DIR")
	if binDir == "" {
		binDir, _ = filepath.Abs("../../bin")
	}
	cfg := Smoke()
	cfg.BinDir = binDir
	cfg.Out = filepath.Join(t.TempDir(), "bench-results.json")
	cfg.Progress = testWriter{t}
	// Empty: the CNI node agent's capture mode as deploy/cni.yaml has it.
	cfg.CaptureMode = os.Getenv("AMBIT_BENCH_CAPTURE_MODE")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	res, err := Run(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("smoke bench took %.1fs\n%s", time.Since(start).Seconds(), res.Markdown())
	for c, e := range res.Errors {
		t.Errorf("case %s failed: %s", c, e)
	}
	for _, cell := range res.Unfilled() {
		t.Errorf("no figure in %s", cell)
	}
	for _, want := range []string{"### 1. Throughput", "### 2. Latency", "### 3. Footprint", "### 4. Connection rate", "### 5. Waypoint", "### 6. Control plane", "not built yet"} {
		if !strings.Contains(res.Markdown(), want) {
			t.Errorf("the report lacks %q", want)
		}
	}

	b, err := os.ReadFile(cfg.Out)
	if err != nil {
		t.Fatalf("the JSON results: %v", err)
	}
	var got struct {
		Machine Machine                    `json:"machine"`
		Metrics map[string]json.RawMessage `json:"metrics"`
	}
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("decoding the JSON results: %v", err)
	}
	if got.Machine.CPUModel == "" || got.Machine.Cores == 0 {
		t.Errorf("the JSON lacks the machine: %+v", got.Machine)
	}
	if len(got.Metrics) != len(res.Metrics) {
		t.Errorf("the JSON has %d metrics, the run %d", len(got.Metrics), len(res.Metrics))
	}

	// Nothing of the lab is left: its state directory and its network
	// namespaces (named <lab>-...).
	if _, err := os.Stat(filepath.Join("/run/ambit-lab", cfg.LabName)); !os.IsNotExist(err) {
		t.Errorf("the lab's directory is still there: %v", err)
	}
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), cfg.LabName+"-") {
			t.Errorf("network namespace %s left behind", e.Name())
		}
	}
}

// testWriter sends progress lines to the test log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
