package bench

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// The cases, as the issue numbers them; errors are recorded by case.
const (
	caseSetup        = "setup"
	caseThroughput   = "1 throughput"
	caseLatency      = "2 latency"
	caseFootprint    = "3 footprint"
	caseConnRate     = "4 connection rate"
	caseControlPlane = "6 control plane"
)

// Results is what a run measured: the JSON file, and the tables' source.
type Results struct {
	Started time.Time `json:"started"`
	Seconds float64   `json:"seconds"`
	Machine Machine   `json:"machine"`
	Config  Config    `json:"config"`
	Lab     LabInfo   `json:"lab"`
	// Commit is the checkout's HEAD, "-dirty" when it has changes.
	Commit string `json:"commit,omitempty"`
	// Metrics are keyed "<case>.<variant>.<figure>", e.g.
	// "throughput.ambit.gbps"; each holds one sample per run.
	Metrics map[string]*Metric `json:"metrics"`
	// Errors are the cases that failed, with why. A failed case leaves
	// its rows "error" and the others are still measured.
	Errors map[string]string `json:"errors,omitempty"`
}

// Machine is where the bench ran.
type Machine struct {
	CPUModel  string `json:"cpuModel"`
	Cores     int    `json:"cores"`
	Kernel    string `json:"kernel"`
	GoVersion string `json:"goVersion"`
}

// LabInfo is what the bench found in the lab.
type LabInfo struct {
	Name string `json:"name"`
	// CNIAgentArgs are the CNI node agent's arguments as deployed: the
	// capture mode, when the agent has one, is among them.
	CNIAgentArgs []string `json:"cniAgentArgs"`
	// Procs are the processes measured (by pid and start time).
	Procs []Proc `json:"procs"`
	// PodIPs of the bench's pods, by namespace/name.
	PodIPs map[string]string `json:"podIPs"`
}

func newResults(cfg Config) *Results {
	return &Results{
		Started: time.Now().UTC(),
		Machine: machine(),
		Config:  cfg,
		Lab:     LabInfo{Name: cfg.LabName, PodIPs: map[string]string{}},
		Metrics: map[string]*Metric{},
		Errors:  map[string]string{},
	}
}

// record adds one sample to a metric.
func (r *Results) record(key, unit string, v float64) {
	m, ok := r.Metrics[key]
	if !ok {
		m = &Metric{Unit: unit}
		r.Metrics[key] = m
	}
	m.add(v)
}

func (r *Results) fail(c string, err error) {
	if _, ok := r.Errors[c]; !ok {
		r.Errors[c] = err.Error()
	}
}

// WriteJSON writes the results to path.
func (r *Results) WriteJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("writing the results: %w", err)
	}
	return nil
}

// MarshalJSON writes NaN (a metric with no sample) as null.
func (m *Metric) MarshalJSON() ([]byte, error) {
	num := func(v float64) any {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			return nil
		}
		return v
	}
	samples := make([]any, len(m.Samples))
	for i, v := range m.Samples {
		samples[i] = num(v)
	}
	return json.Marshal(struct {
		Unit    string `json:"unit"`
		Samples []any  `json:"samples"`
		Median  any    `json:"median"`
		Min     any    `json:"min"`
		Max     any    `json:"max"`
	}{m.Unit, samples, num(m.Median), num(m.Min), num(m.Max)})
}

// machine describes this machine.
func machine() Machine {
	m := Machine{Cores: runtime.NumCPU(), GoVersion: runtime.Version()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	return m
}

// A table is one case's Markdown table.
type table struct {
	title  string
	notes  []string
	header []string
	rows   [][]string
}

// cell formats a metric as "median (min–max)" with digits decimals;
// "skipped" if its case was not selected, "error" if it failed, "n/a" if
// it was not measured.
func (r *Results) cell(c, key string, digits int) string {
	if !r.Config.selected(selectorOf(key)) {
		return "skipped"
	}
	if _, failed := r.Errors[c]; failed {
		return "error"
	}
	m, ok := r.Metrics[key]
	if !ok || len(m.Samples) == 0 || math.IsNaN(m.Median) {
		if _, failed := r.Errors[caseSetup]; failed {
			return "error"
		}
		return "n/a"
	}
	f := func(v float64) string { return strconv.FormatFloat(v, 'f', digits, 64) }
	if len(m.Samples) == 1 {
		return f(m.Median)
	}
	return fmt.Sprintf("%s (%s–%s)", f(m.Median), f(m.Min), f(m.Max))
}

// selectorOf is the name in AllCases of the case that records key.
func selectorOf(key string) string {
	switch {
	case strings.HasPrefix(key, "footprint.idle"):
		return "idle"
	case strings.HasPrefix(key, "footprint."):
		return "latency"
	}
	name, _, _ := strings.Cut(key, ".")
	return name
}

// tables lays the results out, one table per case.
func (r *Results) tables() []table {
	cfg := r.Config
	var ts []table

	tput := table{
		title:  "1. Throughput: one TCP stream, a pod on node-1 to a pod on node-2",
		header: []string{"path", "Gbit/s", "ratio to (a)", "tunnel CPU-s per GB"},
		notes: []string{
			fmt.Sprintf("benchnet, %s per run, the first fifth (at most 1 s) left out; the rate is what the receiving pod counted.", cfg.ThroughputTime),
			"Ratios are taken within each run (against that run's plain TCP), then the median over runs.",
			"Tunnel CPU: utime+stime (/proc/<pid>/stat) of both tunnel processes over the run, per GB carried.",
			"stunnel4: one instance in the client pod's netns (client mode, on 127.0.0.1) and one in the server pod's netns (forwarding to 127.0.0.1): the same three TCP hops as Ambit's in-pod listeners; TLS 1.3, TLS_AES_128_GCM_SHA256 (what Go picks with AES-NI), ECDSA P-256 certificates verified both ways.",
		},
	}
	for _, v := range []struct{ label, key string }{
		{"(a) plain TCP", "plain"},
		{"(b) Ambit: two ztunnels, HBONE", "ambit"},
		{"(c) stunnel4, mTLS", "stunnel"},
		{fmt.Sprintf("(d) Ambit, %d streams", cfg.Streams), "ambit-n"},
	} {
		ratio, cpu := "1", "–"
		if v.key != "plain" {
			ratio = r.cell(caseThroughput, "throughput."+v.key+".ratio", 2)
			cpu = r.cell(caseThroughput, "throughput."+v.key+".cpu_s_per_gb", 2)
		}
		tput.rows = append(tput.rows, []string{v.label, r.cell(caseThroughput, "throughput."+v.key+".gbps", 2), ratio, cpu})
	}
	ts = append(ts, tput)

	lat := table{
		title:  "2. Latency: 1 KB HTTP request and response, node-1 to node-2",
		header: []string{"load", "path", "req/s", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs"},
		notes: []string{
			fmt.Sprintf("fortio %s, %d connections (keep-alive), %s per run, 1 µs histogram resolution; POST of 1024 bytes echoed back.", "v1.68.2", cfg.LatencyConns, cfg.LatencyTime),
			"\"added\" is Ambit minus plain within the same run, then the median over runs; tails of runs this short are noisy and can come out negative.",
			"At max rate each path runs at its own maximum, so its percentiles are at different loads.",
			"\"1 connection, back to back\": benchnet rr, 1024-byte messages echoed on one TCP connection, each sent when the one before is back (no idle time between requests, no HTTP); req/s is round trips per second.",
		},
	}
	for _, load := range []struct{ label, key string }{{"1 connection, back to back", "rr"}, {fmt.Sprintf("%d req/s", cfg.FixedRPS), "fixed"}, {"max", "max"}} {
		for _, p := range []struct{ label, key string }{{"plain", "plain"}, {"Ambit", "ambit"}, {"added by Ambit", "added"}} {
			k := "latency." + load.key + "." + p.key + "."
			rps := "–"
			if p.key != "added" {
				rps = r.cell(caseLatency, k+"rps", 0)
			}
			lat.rows = append(lat.rows, []string{load.label, p.label, rps,
				r.cell(caseLatency, k+"p50", 0), r.cell(caseLatency, k+"p90", 0), r.cell(caseLatency, k+"p99", 0), r.cell(caseLatency, k+"p99.9", 0)})
		}
	}
	ts = append(ts, lat)

	fp := table{
		title:  "3. Footprint: ztunnel",
		header: []string{"figure", "ztunnel node-1 (client side)", "ztunnel node-2 (server side)"},
		notes: []string{
			"CPU from /proc/<pid>/stat over case 2's Ambit runs; peak RSS is VmHWM, reset before each run (clear_refs 5).",
			"Idle RSS is VmRSS with no traffic, before the load cases, sampled once per run 200 ms apart; \"enrolled\" is once both ztunnels serve every idle pod.",
		},
	}
	fpRow := func(label, key string, digits int) {
		fp.rows = append(fp.rows, []string{label,
			r.cell(caseFootprint, strings.ReplaceAll(key, "NODE", "node-1"), digits),
			r.cell(caseFootprint, strings.ReplaceAll(key, "NODE", "node-2"), digits)})
	}
	fpRow(fmt.Sprintf("vCPU per 1000 req/s, at %d req/s", cfg.FixedRPS), "footprint.fixed.ztunnel-NODE.vcpu_per_krps", 3)
	fpRow(fmt.Sprintf("peak RSS MB, at %d req/s", cfg.FixedRPS), "footprint.fixed.ztunnel-NODE.peak_rss_mb", 1)
	fpRow("vCPU per 1000 req/s, at max rate", "footprint.max.ztunnel-NODE.vcpu_per_krps", 3)
	fpRow("peak RSS MB, at max rate", "footprint.max.ztunnel-NODE.peak_rss_mb", 1)
	fpRow("idle RSS MB, 0 enrolled pods", "footprint.idle-0.ztunnel-NODE.rss_mb", 1)
	fpRow(fmt.Sprintf("idle RSS MB, %d enrolled pods", cfg.IdlePods), "footprint.idle-enrolled.ztunnel-NODE.rss_mb", 1)
	ts = append(ts, fp)

	cr := table{
		title:  "4. Connection rate: new TCP connections, node-1 to node-2",
		header: []string{"path", "connections/s", "ratio to plain"},
		notes:  []string{fmt.Sprintf("benchnet: connect, 1-byte round trip, close; %d in parallel, %s per run.", cfg.ConnWorkers, cfg.ConnTime)},
	}
	cr.rows = append(cr.rows,
		[]string{"plain TCP", r.cell(caseConnRate, "connrate.plain.per_s", 0), "1"},
		[]string{"Ambit", r.cell(caseConnRate, "connrate.ambit.per_s", 0), r.cell(caseConnRate, "connrate.ambit.ratio", 2)})
	ts = append(ts, cr)

	ts = append(ts, table{
		title:  "5. Waypoint",
		header: []string{"figure", "value"},
		rows:   [][]string{{"HTTP/1.1 req/s per core and latency through a waypoint with a 3-rule HTTPRoute, against nginx and haproxy", "not built yet"}},
	})

	cp := table{
		title:  fmt.Sprintf("6. Control plane: %d simulated node subscribers, %d pods", cfg.Subscribers, cfg.FakePods),
		header: []string{"figure", "value"},
		notes: []string{
			"Subscribers are ztunnel's own delta ADS client (ztunnel/xds) with a store each, authenticated with a service-account token, connected from node-1's netns; pods are API objects bound to nodes without a kubelet.",
			fmt.Sprintf("A change is a merge patch of a namespace-wide AuthorizationPolicy; timed from the API call to the subscriber's store applying it. p50 and p99 over the %d changes of a run, then the median over runs.", cfg.PolicyChanges),
		},
	}
	cpRow := func(label, key string, digits int) {
		cp.rows = append(cp.rows, []string{label, r.cell(caseControlPlane, key, digits)})
	}
	cpRow("policy change to every subscriber, p50 ms", "controlplane.all.p50_ms", 1)
	cpRow("policy change to every subscriber, p99 ms", "controlplane.all.p99_ms", 1)
	cpRow("policy change to one subscriber, p50 ms", "controlplane.each.p50_ms", 1)
	cpRow("policy change to one subscriber, p99 ms", "controlplane.each.p99_ms", 1)
	cpRow("bytes pushed per change, all subscribers", "controlplane.bytes_per_change", 0)
	cpRow("xDS responses per change, all subscribers", "controlplane.responses_per_change", 1)
	cpRow("initial sync of every subscriber, s", "controlplane.initial_sync_s", 2)
	cpRow("initial sync, bytes per subscriber", "controlplane.initial_bytes_per_subscriber", 0)
	cpRow("controller RSS MB", "controlplane.controller.rss_mb", 1)
	cpRow("controller peak RSS MB (VmHWM)", "controlplane.controller.peak_rss_mb", 1)
	ts = append(ts, cp)
	return ts
}

// Markdown renders the results: a header naming the machine, one table per
// case, and the errors, if any.
func (r *Results) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "## Ambit bench, %s\n\n", r.Started.Format("2006-01-02 15:04 MST"))
	capture := "the CNI node agent's default"
	for _, a := range r.Lab.CNIAgentArgs {
		if strings.HasPrefix(a, "--capture-mode") || strings.HasPrefix(a, "-capture-mode") {
			capture = a
		}
	}
	fmt.Fprintf(&b, "Machine: %s, %d cores, kernel %s, %s. Lab %q: 2 nodes; capture: %s.\n",
		r.Machine.CPUModel, r.Machine.Cores, r.Machine.Kernel, r.Machine.GoVersion, r.Lab.Name, capture)
	commit := ""
	if r.Commit != "" {
		commit = " Commit " + r.Commit + "."
	}
	fmt.Fprintf(&b, "Every figure: median (min–max) of %d interleaved runs. Took %.0f s.%s\n", r.Config.Runs, r.Seconds, commit)
	for _, t := range r.tables() {
		fmt.Fprintf(&b, "\n### %s\n\n", t.title)
		fmt.Fprintf(&b, "| %s |\n", strings.Join(t.header, " | "))
		fmt.Fprintf(&b, "|%s\n", strings.Repeat("---|", len(t.header)))
		for _, row := range t.rows {
			fmt.Fprintf(&b, "| %s |\n", strings.Join(row, " | "))
		}
		if len(t.notes) > 0 {
			b.WriteString("\n")
			for _, n := range t.notes {
				fmt.Fprintf(&b, "- %s\n", n)
			}
		}
	}
	if len(r.Errors) > 0 {
		b.WriteString("\n### Errors\n\n")
		keys := make([]string, 0, len(r.Errors))
		for k := range r.Errors {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			fmt.Fprintf(&b, "- %s: %s\n", k, r.Errors[k])
		}
	}
	return b.String()
}

// Unfilled lists the table cells that hold no figure ("n/a", "error" or
// "skipped"),
// as "table / row / column": the smoke test wants none.
func (r *Results) Unfilled() []string {
	var out []string
	for _, t := range r.tables() {
		for _, row := range t.rows {
			for i, c := range row {
				if c == "" || c == "n/a" || c == "error" || c == "skipped" {
					out = append(out, fmt.Sprintf("%s / %s / %s", t.title, row[0], t.header[i]))
				}
			}
		}
	}
	return out
}
