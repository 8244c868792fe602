// Command ambit-bench is `make bench`: it brings up a lab, measures Ambit
// against plain TCP and stunnel (package bench), prints the tables on
// stdout and writes the raw numbers as JSON. It removes the lab it made,
// also when interrupted. Progress goes to stderr.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/ambitmesh/ambit/e2e/bench"
)

func main() {
	os.Exit(run())
}

func run() int {
	cfg := bench.Default()
	smoke := flag.Bool("smoke", false, "the smoke test's tiny configuration (figures meaningless; other flags still apply)")
	binDir := flag.String("bin-dir", os.Getenv("AMBIT_BIN_DIR"), "make build's bin directory (default $AMBIT_BIN_DIR, else this binary's directory)")
	flag.StringVar(&cfg.ToolDir, "tool-dir", "", "directory of fortio and benchnet (default: -bin-dir)")
	flag.StringVar(&cfg.RepoDir, "repo-dir", "", "checkout whose deploy/ is installed (default: the parent of -bin-dir)")
	flag.StringVar(&cfg.Out, "out", "bench-results.json", "JSON results file (empty: none)")
	flag.StringVar(&cfg.LabName, "lab", cfg.LabName, "lab name (removed first if it exists: never give one someone else uses)")
	flag.IntVar(&cfg.Runs, "runs", cfg.Runs, "runs per figure (N); each figure is their median")
	flag.DurationVar(&cfg.ThroughputTime, "throughput-time", cfg.ThroughputTime, "length of one bulk run")
	flag.IntVar(&cfg.Streams, "streams", cfg.Streams, "parallel streams of case 1(d)")
	flag.DurationVar(&cfg.LatencyTime, "latency-time", cfg.LatencyTime, "length of one fortio run")
	flag.IntVar(&cfg.LatencyConns, "latency-conns", cfg.LatencyConns, "fortio connections")
	flag.IntVar(&cfg.FixedRPS, "rps", cfg.FixedRPS, "fixed request rate of case 2")
	flag.DurationVar(&cfg.ConnTime, "conn-time", cfg.ConnTime, "length of one connection-rate run")
	flag.IntVar(&cfg.ConnWorkers, "conn-workers", cfg.ConnWorkers, "parallel connections of the connection rate")
	flag.IntVar(&cfg.IdlePods, "idle-pods", cfg.IdlePods, "pods enrolled for the idle-RSS figure")
	flag.IntVar(&cfg.Subscribers, "subscribers", cfg.Subscribers, "simulated xDS subscribers")
	flag.IntVar(&cfg.FakePods, "fake-pods", cfg.FakePods, "pods as API objects for the control-plane case")
	flag.IntVar(&cfg.PolicyChanges, "policy-changes", cfg.PolicyChanges, "policy changes per run")
	cases := flag.String("cases", "", "comma-separated cases to run, of "+strings.Join(bench.AllCases, ",")+" (default: all)")
	flag.StringVar(&cfg.CaptureMode, "capture-mode", "", "--capture-mode for the CNI node agent (default: as deploy/cni.yaml has it)")
	flag.BoolVar(&cfg.KeepLab, "keep-lab", false, "leave the lab up at the end, for debugging")
	flag.Parse()
	if *smoke {
		// Flags given explicitly win over the smoke configuration.
		s := bench.Smoke()
		s.ToolDir, s.RepoDir, s.Out, s.CaptureMode, s.KeepLab = cfg.ToolDir, cfg.RepoDir, cfg.Out, cfg.CaptureMode, cfg.KeepLab
		flag.Visit(func(f *flag.Flag) {
			switch f.Name {
			case "lab":
				s.LabName = cfg.LabName
			case "runs":
				s.Runs = cfg.Runs
			}
		})
		cfg = s
	}
	if *cases != "" {
		cfg.Cases = strings.Split(*cases, ",")
	}
	cfg.BinDir = *binDir
	if cfg.BinDir == "" {
		exe, err := os.Executable()
		if err != nil {
			fmt.Fprintf(os.Stderr, "ambit-bench: %v\n", err)
			return 2
		}
		cfg.BinDir = filepath.Dir(exe)
	}
	if cfg.Out != "" {
		out, err := filepath.Abs(cfg.Out)
		if err != nil {
			fmt.Fprintf(os.Stderr, "ambit-bench: %v\n", err)
			return 2
		}
		cfg.Out = out
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := bench.Run(ctx, cfg)
	if errors.Is(err, bench.ErrNotRoot) {
		fmt.Fprintf(os.Stderr, "ambit-bench: %v; run `make bench` as root\n", err)
		return 2
	}
	if res != nil {
		fmt.Print(res.Markdown())
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "ambit-bench: %v\n", err)
		return 1
	}
	if len(res.Errors) > 0 {
		fmt.Fprintf(os.Stderr, "ambit-bench: %d case(s) failed; see Errors above\n", len(res.Errors))
		return 1
	}
	return 0
}
