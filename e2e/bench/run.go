package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"k8s.io/client-go/kubernetes"

	"github.com/ambitmesh/ambit/e2e/lab"
)

// bench is one run in progress.
type bench struct {
	cfg Config
	lab *lab.Lab
	cs  kubernetes.Interface
	res *Results
	// cgroupRoot is the cgroup v2 mount, where the lab's containers are.
	cgroupRoot string
	// ztunnels are the two ztunnel processes, node-1's first.
	ztunnels [2]Proc
	// stunnels are the stunnel processes in the plain client and server
	// pods.
	stunnels []Proc
	// nodes reach into the lab's node network namespaces (metrics, admin).
	nodes [2]*nodeNet
	// ips of the bench pods: plain and mesh servers.
	plainServer, meshServer string
	start                   time.Time
}

// Run brings up a lab, measures every case, removes the lab again (also on
// failure, unless cfg.KeepLab) and writes the JSON results to cfg.Out. It
// returns the results even when a case failed (see Results.Errors); the
// error is for failures that leave nothing to report, such as a lab that
// does not come up.
func Run(ctx context.Context, cfg Config) (*Results, error) {
	if os.Geteuid() != 0 {
		return nil, ErrNotRoot
	}
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	b := &bench{cfg: cfg, res: newResults(cfg), start: time.Now()}
	b.res.Commit = commit(cfg.RepoDir)
	if b.cgroupRoot, err = lab.Cgroup2Root(); err != nil {
		return nil, err
	}
	err = b.run(ctx)
	b.res.Seconds = time.Since(b.start).Seconds()
	if err != nil {
		return nil, err
	}
	if cfg.Out != "" {
		if err := b.res.WriteJSON(cfg.Out); err != nil {
			return b.res, err
		}
		b.progress("wrote %s", cfg.Out)
	}
	return b.res, nil
}

// run is Run between the checks and the JSON: the lab's life.
func (b *bench) run(ctx context.Context) error {
	cfg := b.cfg
	b.progress("bringing up lab %q", cfg.LabName)
	l, err := lab.Up(ctx, lab.Options{Name: cfg.LabName, Nodes: 2, BinDir: cfg.BinDir, Progress: cfg.Progress})
	if err != nil {
		return fmt.Errorf("lab up: %w", err)
	}
	b.lab = l
	defer func() {
		for _, n := range b.nodes {
			if n != nil {
				n.close()
			}
		}
		if cfg.KeepLab {
			b.progress("leaving lab %q up: KUBECONFIG=%s; remove it with %s/lab down --name %s", cfg.LabName, l.Kubeconfig(), cfg.BinDir, cfg.LabName)
			return
		}
		b.progress("removing lab %q", cfg.LabName)
		if derr := l.Down(); derr != nil {
			b.res.fail(caseSetup, fmt.Errorf("lab down: %w", derr))
		}
	}()
	if b.cs, err = b.client(); err != nil {
		return err
	}
	for i := range b.nodes {
		if b.nodes[i], err = openNodeNet(l, i+1); err != nil {
			return err
		}
	}
	if err := b.setup(ctx); err != nil {
		b.res.fail(caseSetup, err)
		return nil
	}
	b.rounds(ctx)
	if b.cfg.selected("controlplane") {
		if err := b.controlPlane(ctx); err != nil {
			b.res.fail(caseControlPlane, err)
		}
	}
	return nil
}

// setup installs Ambit and the bench's pods, measures idle RSS before and
// after enrolling IdlePods pods, and enrols the mesh namespace; each only
// as far as the selected cases need it.
func (b *bench) setup(ctx context.Context) error {
	if err := b.installAmbit(ctx); err != nil {
		return err
	}
	load := b.cfg.selected("throughput") || b.cfg.selected("latency") || b.cfg.selected("connrate")
	if !load && !b.cfg.selected("idle") {
		return nil
	}
	if err := b.deployApps(ctx); err != nil {
		return err
	}
	if err := b.findProcs(ctx); err != nil {
		return err
	}
	if b.cfg.selected("idle") {
		if err := b.idleRSS(ctx); err != nil {
			b.res.fail(caseFootprint, err)
		}
	}
	if load {
		return b.enrolMesh(ctx)
	}
	return nil
}

// rounds runs cases 1 to 4 Runs times, interleaved, so that the machine's
// drift (other tenants, thermal state) touches every variant alike. A case
// that fails is skipped in the rounds after.
func (b *bench) rounds(ctx context.Context) {
	type step struct {
		name, c string
		run     func(context.Context) error
	}
	steps := []step{
		{"throughput", caseThroughput, b.throughput},
		{"latency", caseLatency, b.latency},
		{"connrate", caseConnRate, b.connRate},
	}
	for r := 1; r <= b.cfg.Runs; r++ {
		for _, s := range steps {
			if _, failed := b.res.Errors[s.c]; failed || !b.cfg.selected(s.name) {
				continue
			}
			t := time.Now()
			if err := s.run(ctx); err != nil {
				b.res.fail(s.c, fmt.Errorf("run %d: %w", r, err))
				if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
					return
				}
			}
			b.progress("run %d/%d: %s (%.1fs)", r, b.cfg.Runs, s.c, time.Since(t).Seconds())
		}
	}
}

func (b *bench) progress(format string, args ...any) {
	_, _ = fmt.Fprintf(b.cfg.Progress, "bench: %6.1fs  %s\n", time.Since(b.start).Seconds(), fmt.Sprintf(format, args...))
}

// commit names the checkout's HEAD, with "-dirty" for local changes; empty
// outside a git checkout.
func commit(repo string) string {
	out, err := exec.Command("git", "-C", repo, "rev-parse", "--short=12", "HEAD").Output()
	if err != nil {
		return ""
	}
	c := strings.TrimSpace(string(out))
	if st, err := exec.Command("git", "-C", repo, "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(bytes.TrimSpace(st)) > 0 {
		c += "-dirty"
	}
	return c
}
