package bench

import (
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// metricKeys is every metric the tables show, as the cases record them:
// the JSON's keys.
func metricKeys() []string {
	var keys []string
	for _, v := range []string{"plain", "ambit", "stunnel", "ambit-n"} {
		keys = append(keys, "throughput."+v+".gbps")
		if v != "plain" {
			keys = append(keys, "throughput."+v+".ratio", "throughput."+v+".cpu_s_per_gb")
		}
	}
	for _, load := range []string{"rr", "fixed", "max"} {
		for _, p := range []string{"plain", "ambit", "added"} {
			if p != "added" {
				keys = append(keys, "latency."+load+"."+p+".rps")
			}
			for _, q := range percentiles {
				keys = append(keys, "latency."+load+"."+p+"."+q)
			}
		}
		if load == "rr" {
			continue
		}
		for _, n := range []string{"node-1", "node-2"} {
			keys = append(keys, "footprint."+load+".ztunnel-"+n+".vcpu_per_krps", "footprint."+load+".ztunnel-"+n+".peak_rss_mb")
		}
	}
	for _, n := range []string{"node-1", "node-2"} {
		keys = append(keys, "footprint.idle-0.ztunnel-"+n+".rss_mb", "footprint.idle-enrolled.ztunnel-"+n+".rss_mb")
	}
	keys = append(keys, "connrate.plain.per_s", "connrate.ambit.per_s", "connrate.ambit.ratio")
	for _, k := range []string{"all.p50_ms", "all.p99_ms", "each.p50_ms", "each.p99_ms", "bytes_per_change", "responses_per_change",
		"initial_sync_s", "initial_bytes_per_subscriber", "controller.rss_mb", "controller.peak_rss_mb"} {
		keys = append(keys, "controlplane."+k)
	}
	return keys
}

// sampleResults is a run of 3 with made-up, distinct figures.
func sampleResults() *Results {
	r := newResults(Default())
	r.Started = time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	r.Seconds = 420
	r.Machine = Machine{CPUModel: "Test CPU @ 2.00GHz", Cores: 2, Kernel: "6.18.0", GoVersion: "go1.26.8"}
	r.Lab.CNIAgentArgs = []string{"--zds-socket=/var/run/ztunnel/ztunnel.sock", "--capture-mode=nftables"}
	for i, k := range metricKeys() {
		for run := range 3 {
			r.record(k, "unit", float64(i)+0.25*float64(run))
		}
	}
	return r
}

// TestMarkdownGolden pins the tables' layout. Refresh with
// BENCH_UPDATE_GOLDEN=1 go test -run Golden and review the diff.
func TestMarkdownGolden(t *testing.T) {
	got := sampleResults().Markdown()
	golden := filepath.Join("testdata", "report.golden")
	if os.Getenv("BENCH_UPDATE_GOLDEN") != "" {
		if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (create it with BENCH_UPDATE_GOLDEN=1)", err)
	}
	if got != string(want) {
		t.Errorf("the report changed; if that is intended, refresh %s with BENCH_UPDATE_GOLDEN=1\ngot:\n%s", golden, got)
	}
}

func TestUnfilled(t *testing.T) {
	tests := []struct {
		name   string
		change func(*Results)
		want   []string // substrings of the unfilled cells, in order
	}{
		{name: "every metric", change: func(*Results) {}},
		{
			name:   "a missing metric",
			change: func(r *Results) { delete(r.Metrics, "connrate.ambit.ratio") },
			want:   []string{"4. Connection rate: new TCP connections, node-1 to node-2 / Ambit / ratio to plain"},
		},
		{
			name:   "a metric without samples",
			change: func(r *Results) { r.Metrics["controlplane.all.p50_ms"] = &Metric{Median: math.NaN()} },
			want:   []string{"policy change to every subscriber, p50 ms / value"},
		},
		{
			name:   "a failed case fails all its cells",
			change: func(r *Results) { r.fail(caseConnRate, errors.New("boom")) },
			want:   []string{"plain TCP / connections/s", "Ambit / connections/s", "Ambit / ratio to plain"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := sampleResults()
			tc.change(r)
			got := r.Unfilled()
			if len(got) != len(tc.want) {
				t.Fatalf("Unfilled() = %q, want %d cells like %q", got, len(tc.want), tc.want)
			}
			for i := range got {
				if !strings.Contains(got[i], tc.want[i]) {
					t.Errorf("cell %d = %q, want it to contain %q", i, got[i], tc.want[i])
				}
			}
		})
	}
}

func TestCell(t *testing.T) {
	r := newResults(Default())
	r.record("one", "u", 1.234)
	for _, v := range []float64{3, 1, 2} {
		r.record("three", "u", v)
	}
	tests := []struct {
		name, key string
		digits    int
		want      string
	}{
		{name: "one sample: no range", key: "one", digits: 2, want: "1.23"},
		{name: "median and range", key: "three", digits: 1, want: "2.0 (1.0–3.0)"},
		{name: "missing", key: "none", want: "n/a"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := r.cell(caseThroughput, tc.key, tc.digits); got != tc.want {
				t.Errorf("cell = %q, want %q", got, tc.want)
			}
		})
	}
}

// TestJSONNaN checks that a metric without samples encodes (as nulls):
// encoding/json refuses NaN.
func TestJSONNaN(t *testing.T) {
	r := sampleResults()
	r.Metrics["empty"] = &Metric{Unit: "u", Median: math.NaN(), Min: math.NaN(), Max: math.NaN()}
	r.Metrics["odd"] = &Metric{Unit: "u", Samples: []float64{math.Inf(1)}}
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var back struct {
		Metrics map[string]struct {
			Median  *float64   `json:"median"`
			Samples []*float64 `json:"samples"`
		} `json:"metrics"`
	}
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Metrics["empty"].Median != nil || back.Metrics["odd"].Samples[0] != nil {
		t.Errorf("NaN and Inf should encode as null: %s", b)
	}
	if !slices.ContainsFunc(metricKeys(), func(k string) bool { _, ok := back.Metrics[k]; return ok }) {
		t.Error("the metrics are missing from the JSON")
	}
}
