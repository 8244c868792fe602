// Package lab runs a real Kubernetes cluster on one Linux machine without
// containers: the pinned kube-apiserver, etcd, kube-controller-manager,
// kube-scheduler and kube-proxy, plus nodes that are network namespaces on an
// underlay bridge, each with a node agent (package nodeagent) that plays
// kubelet and runs pods as processes in namespaces of their own made through
// a real CNI chain.
//
// Everything the lab makes (namespaces, cgroups, processes, files) is named
// after the lab and recorded in its state directory, so that Down, or the
// next Up after a crash, removes exactly that. The lab does not touch the
// host's network: the host reaches the API server through a forwarder on a
// loopback port.
package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"time"
)

// Options configures a lab.
type Options struct {
	// Name prefixes everything the lab makes; lower-case letters and
	// digits. Default "ambit".
	Name string
	// Nodes is the number of nodes. Default 2.
	Nodes int
	// Dir holds the lab's state, certificates, logs and data. Default
	// /run/ambit-lab/<name>.
	Dir string
	// BinDir holds the binaries built by `make build`: lab, the
	// Kubernetes release in kube-<version>/, and the images' binaries.
	BinDir string
	// Log receives progress. Default: discarded.
	Log *slog.Logger
	// Progress, if set, gets one line per phase with its duration.
	Progress io.Writer
}

// KubeVersion is the pinned Kubernetes release the lab runs.
const KubeVersion = "v1.36.0"

var nameRE = regexp.MustCompile(`^[a-z][a-z0-9]{0,11}$`)

func (o *Options) defaults() error {
	if o.Name == "" {
		o.Name = "ambit"
	}
	if !nameRE.MatchString(o.Name) {
		return fmt.Errorf("lab name %q: want 1-12 lower-case letters and digits, starting with a letter", o.Name)
	}
	if o.Nodes == 0 {
		o.Nodes = 2
	}
	if o.Nodes < 1 || o.Nodes > 200 {
		return fmt.Errorf("--nodes %d: want 1 to 200", o.Nodes)
	}
	if o.Dir == "" {
		o.Dir = filepath.Join("/run/ambit-lab", o.Name)
	}
	if o.BinDir == "" {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("finding the bin directory: %w", err)
		}
		o.BinDir = filepath.Dir(exe)
	}
	if o.Log == nil {
		o.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	return nil
}

// Lab is a running (or recorded) lab.
type Lab struct {
	opts  Options
	state State
}

// State is what a lab records in <dir>/state.json: enough for another
// process to find and remove everything.
type State struct {
	Name       string    `json:"name"`
	Nodes      int       `json:"nodes"`
	Dir        string    `json:"dir"`
	BinDir     string    `json:"binDir"`
	Kubeconfig string    `json:"kubeconfig"`
	Server     string    `json:"server"`
	Procs      []Proc    `json:"procs"`
	Cgroup     string    `json:"cgroup"`
	Created    time.Time `json:"created"`
}

// Kubeconfig is the path of the admin kubeconfig usable from the host.
func (l *Lab) Kubeconfig() string { return l.state.Kubeconfig }

// Dir is the lab's state directory.
func (l *Lab) Dir() string { return l.opts.Dir }

// Kubectl is the path of the lab's kubectl.
func (l *Lab) Kubectl() string { return l.kubeBin("kubectl") }

// NodeNetns is the network namespace name of node i (1-based).
func (l *Lab) NodeNetns(i int) string { return l.nodeNetns(i) }

// Nodes is the number of nodes.
func (l *Lab) Nodes() int { return l.opts.Nodes }

func (l *Lab) kubeBin(name string) string {
	return filepath.Join(l.opts.BinDir, "kube-"+KubeVersion, name)
}

func (l *Lab) path(elem ...string) string {
	return filepath.Join(append([]string{l.opts.Dir}, elem...)...)
}

func (l *Lab) saveState() error {
	b, err := json.MarshalIndent(l.state, "", "  ")
	if err != nil {
		return err
	}
	tmp := l.path("state.json.tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return fmt.Errorf("writing lab state: %w", err)
	}
	return os.Rename(tmp, l.path("state.json"))
}

// Open finds a lab by its options (name and dir) without starting anything.
func Open(opts Options) (*Lab, error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	l := &Lab{opts: opts}
	b, err := os.ReadFile(l.path("state.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no lab %q at %s: run `lab up`", opts.Name, opts.Dir)
	}
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(b, &l.state); err != nil {
		return nil, fmt.Errorf("reading %s: %w", l.path("state.json"), err)
	}
	l.opts.Nodes = l.state.Nodes
	return l, nil
}

// Up brings a lab up and returns when its nodes are Ready and cluster DNS
// answers. Leftovers of an earlier lab of the same name are removed first.
// On failure everything made so far is removed again.
func Up(ctx context.Context, opts Options) (_ *Lab, err error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("the lab needs root: it makes network namespaces, cgroups and mounts")
	}
	if err := checkBinaries(opts.BinDir); err != nil {
		return nil, err
	}
	l := &Lab{opts: opts}
	// A lab that crashed, or one still up, is removed first.
	if err := l.teardown(); err != nil {
		return nil, fmt.Errorf("removing the leftovers of lab %q: %w", opts.Name, err)
	}
	if err := os.MkdirAll(l.path("logs"), 0o755); err != nil {
		return nil, err
	}
	l.state = State{Name: opts.Name, Nodes: opts.Nodes, Dir: opts.Dir, BinDir: opts.BinDir, Created: time.Now()}
	defer func() {
		if err != nil {
			opts.Log.Error("lab up failed; removing what it made", "error", err)
			if terr := l.teardown(); terr != nil {
				opts.Log.Error("removing the failed lab", "error", terr)
			}
		}
	}()
	start := time.Now()
	phase := func(name string, f func() error) error {
		t := time.Now()
		if err := f(); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		// Progress is informational: a failed write must not fail the lab.
		_, _ = fmt.Fprintf(opts.Progress, "lab: %-28s %6.1fs (total %.1fs)\n", name, time.Since(t).Seconds(), time.Since(start).Seconds())
		return nil
	}
	if err := phase("certificates", l.makePKI); err != nil {
		return nil, err
	}
	if err := phase("network", l.setupNetwork); err != nil {
		return nil, err
	}
	if err := l.saveState(); err != nil {
		return nil, err
	}
	if err := phase("control plane ready", func() error { return l.startControlPlane(ctx) }); err != nil {
		return nil, err
	}
	if err := phase("nodes ready", func() error { return l.startNodes(ctx) }); err != nil {
		return nil, err
	}
	if err := phase("cluster DNS ready", func() error { return l.installAddons(ctx) }); err != nil {
		return nil, err
	}
	if err := l.saveState(); err != nil {
		return nil, err
	}
	return l, nil
}

// Down stops every process of the lab and removes what it made.
func (l *Lab) Down() error { return l.teardown() }

// Down removes the lab described by opts, if any.
func Down(opts Options) error {
	if err := opts.defaults(); err != nil {
		return err
	}
	l := &Lab{opts: opts}
	return l.teardown()
}

// teardown removes everything the lab of this name may have made, whether
// or not its state file survived: processes by recorded pid, every pod's
// processes through the lab's cgroup, network namespaces by prefix, and the
// state directory.
func (l *Lab) teardown() error {
	var errs []error
	var st State
	if b, err := os.ReadFile(l.path("state.json")); err == nil {
		_ = json.Unmarshal(b, &st)
	}
	// Node agents first, so they do not restart pods we are killing;
	// then the rest in reverse start order.
	for i := len(st.Procs) - 1; i >= 0; i-- {
		if err := st.Procs[i].Stop(10 * time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if err := removeCgroupTree(labCgroup(l.opts.Name)); err != nil {
		errs = append(errs, err)
	}
	if err := removeNetnsWithPrefix(l.opts.Name + "-"); err != nil {
		errs = append(errs, err)
	}
	if err := unmountBPFFS(l.opts.Dir); err != nil {
		errs = append(errs, err)
	}
	if err := removeMountPoints(l.path("mountpoints")); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(l.opts.Dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func checkBinaries(binDir string) error {
	var missing []string
	for _, b := range []string{"kube-" + KubeVersion + "/hyperkube", "kube-" + KubeVersion + "/etcd", "coredns", "lab"} {
		if _, err := os.Stat(filepath.Join(binDir, b)); err != nil {
			missing = append(missing, filepath.Join(binDir, b))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing binaries %v: run `make build`", missing)
	}
	return nil
}
