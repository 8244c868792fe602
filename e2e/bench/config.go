package bench

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"time"
)

// Config is one bench run. The zero value of a field means its default
// (Default); Smoke is the small configuration of the smoke test.
type Config struct {
	// LabName names the lab the bench brings up (and removes): "bench".
	// Use only names no one else uses: Up removes a lab of the same name.
	LabName string `json:"labName"`
	// BinDir holds `make build`'s binaries (the lab's, ztunnel, the
	// controller, the CNI agent). Required.
	BinDir string `json:"binDir"`
	// ToolDir holds fortio and benchnet, run inside the pods by absolute
	// path (the lab's containers see the host's filesystem). Default
	// BinDir.
	ToolDir string `json:"toolDir"`
	// RepoDir is the checkout whose deploy/ is installed. Default: the
	// parent of BinDir.
	RepoDir string `json:"repoDir"`
	// Out is where the JSON results go ("" for nowhere).
	Out string `json:"out"`

	// Runs is how many times each figure is measured (N): cases run
	// interleaved, round by round, so that drift in the machine's load
	// spreads over every variant alike.
	Runs int `json:"runs"`
	// ThroughputTime is the length of one bulk run; the first fifth (at
	// most 1 s) is warm-up, left out of the rate.
	ThroughputTime time.Duration `json:"throughputTime"`
	// Streams is the parallel streams of case 1(d).
	Streams int `json:"streams"`
	// LatencyTime is the length of one fortio run.
	LatencyTime time.Duration `json:"latencyTime"`
	// LatencyConns is fortio's connections (-c).
	LatencyConns int `json:"latencyConns"`
	// FixedRPS is the fixed request rate of case 2.
	FixedRPS int `json:"fixedRPS"`
	// ConnTime and ConnWorkers are the length and parallelism of one
	// connection-rate run.
	ConnTime    time.Duration `json:"connTime"`
	ConnWorkers int           `json:"connWorkers"`
	// IdlePods is how many pods are enrolled for the idle-RSS figure.
	IdlePods int `json:"idlePods"`
	// Subscribers, FakePods and PolicyChanges size the control-plane
	// case: simulated node subscribers, pods that exist only as API
	// objects, and policy changes per run.
	Subscribers   int `json:"subscribers"`
	FakePods      int `json:"fakePods"`
	PolicyChanges int `json:"policyChanges"`

	// Cases selects what to measure, by name (see AllCases); empty is
	// every case.
	Cases []string `json:"cases,omitempty"`
	// CaptureMode, if set, is passed to the CNI node agent as
	// --capture-mode (replacing deploy/cni.yaml's); empty runs the agent
	// as deployed.
	CaptureMode string `json:"captureMode,omitempty"`

	// KeepLab leaves the lab up at the end (for debugging): remove it
	// with `bin/lab down --name <LabName>`.
	KeepLab bool `json:"-"`
	// Progress receives one line per step; default os.Stderr.
	Progress io.Writer `json:"-"`
}

// Default is `make bench`: under 10 minutes on a 2-core machine.
func Default() Config {
	return Config{
		LabName:        "bench",
		Runs:           5,
		ThroughputTime: 4 * time.Second,
		Streams:        8,
		LatencyTime:    5 * time.Second,
		LatencyConns:   8,
		FixedRPS:       1000,
		ConnTime:       3 * time.Second,
		ConnWorkers:    8,
		IdlePods:       100,
		Subscribers:    50,
		FakePods:       1000,
		PolicyChanges:  20,
	}
}

// Smoke is the smoke test's configuration: one run of every case, with
// tiny durations and sizes. Its figures mean nothing; that every row is
// filled does.
func Smoke() Config {
	return Config{
		LabName:        "benchsmoke",
		Runs:           1,
		ThroughputTime: 1 * time.Second,
		Streams:        2,
		LatencyTime:    1 * time.Second,
		LatencyConns:   2,
		FixedRPS:       200,
		ConnTime:       500 * time.Millisecond,
		ConnWorkers:    2,
		IdlePods:       4,
		Subscribers:    3,
		FakePods:       20,
		PolicyChanges:  3,
	}
}

// AllCases are the names Config.Cases takes: case 1, case 2 with case 3's
// figures under load, case 3's idle RSS, case 4, case 6.
var AllCases = []string{"throughput", "latency", "idle", "connrate", "controlplane"}

// selected reports whether the named case is to run.
func (c Config) selected(name string) bool {
	return len(c.Cases) == 0 || slices.Contains(c.Cases, name)
}

// ErrNotRoot is returned by Run without root: the lab makes network
// namespaces, cgroups and mounts.
var ErrNotRoot = errors.New("the bench needs root: the lab makes network namespaces, cgroups and mounts")

// withDefaults fills zero fields from Default and checks what the run
// needs on this machine.
func (c Config) withDefaults() (Config, error) {
	d := Default()
	set := func(v *int, def int) {
		if *v == 0 {
			*v = def
		}
	}
	setD := func(v *time.Duration, def time.Duration) {
		if *v == 0 {
			*v = def
		}
	}
	if c.LabName == "" {
		c.LabName = d.LabName
	}
	set(&c.Runs, d.Runs)
	setD(&c.ThroughputTime, d.ThroughputTime)
	set(&c.Streams, d.Streams)
	setD(&c.LatencyTime, d.LatencyTime)
	set(&c.LatencyConns, d.LatencyConns)
	set(&c.FixedRPS, d.FixedRPS)
	setD(&c.ConnTime, d.ConnTime)
	set(&c.ConnWorkers, d.ConnWorkers)
	set(&c.IdlePods, d.IdlePods)
	set(&c.Subscribers, d.Subscribers)
	set(&c.FakePods, d.FakePods)
	set(&c.PolicyChanges, d.PolicyChanges)
	for _, name := range c.Cases {
		if !slices.Contains(AllCases, name) {
			return c, fmt.Errorf("unknown case %q: want some of %v", name, AllCases)
		}
	}
	if c.Progress == nil {
		c.Progress = os.Stderr
	}
	if c.BinDir == "" {
		return c, errors.New("Config.BinDir is required: the directory `make build` fills")
	}
	var err error
	if c.BinDir, err = filepath.Abs(c.BinDir); err != nil {
		return c, err
	}
	if c.ToolDir == "" {
		c.ToolDir = c.BinDir
	}
	if c.ToolDir, err = filepath.Abs(c.ToolDir); err != nil {
		return c, err
	}
	if c.RepoDir == "" {
		c.RepoDir = filepath.Dir(c.BinDir)
	}
	var missing []string
	for _, p := range []string{
		filepath.Join(c.BinDir, "ztunnel"), filepath.Join(c.BinDir, "controller"),
		filepath.Join(c.BinDir, "ambit-cni"), filepath.Join(c.BinDir, "ambit-cni-agent"),
		filepath.Join(c.BinDir, "lab"),
	} {
		if _, err := os.Stat(p); err != nil {
			missing = append(missing, p+" (make build)")
		}
	}
	for _, p := range []string{filepath.Join(c.ToolDir, "fortio"), filepath.Join(c.ToolDir, "benchnet")} {
		if _, err := os.Stat(p); err != nil {
			missing = append(missing, p+" (go -C e2e/bench build -o "+c.ToolDir+"/ fortio.org/fortio ./cmd/benchnet)")
		}
	}
	if _, err := exec.LookPath("stunnel4"); err != nil {
		missing = append(missing, "stunnel4 (Debian package stunnel4; make deps)")
	}
	for _, f := range []string{"deploy/ambit.yaml", "deploy/cni.yaml", "deploy/crds/istio/security.yaml"} {
		if _, err := os.Stat(filepath.Join(c.RepoDir, f)); err != nil {
			missing = append(missing, filepath.Join(c.RepoDir, f))
		}
	}
	if len(missing) > 0 {
		return c, fmt.Errorf("missing: %v", missing)
	}
	return c, nil
}
