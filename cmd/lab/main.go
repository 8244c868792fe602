// Command lab runs the lab: a real Kubernetes cluster on this machine, with
// nodes in network namespaces. `lab up`, `lab down`, `lab status`; the other
// subcommands are the lab's own daemons.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"syscall"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/ambitmesh/ambit/e2e/lab"
	"github.com/ambitmesh/ambit/e2e/lab/nodeagent"
)

func init() {
	// pod-init must exec from the thread that entered the pod's network
	// namespace: keep main on the initial thread from the start.
	if len(os.Args) > 1 && os.Args[1] == nodeagent.PodInitArg {
		runtime.LockOSThread()
	}
}

const usage = `usage: lab <command> [flags]

commands:
  up       bring a lab up (leftovers of a lab of the same name are removed first)
  down     stop the lab and remove everything it made
  status   show the lab's processes and nodes

Run "lab <command> -h" for its flags.
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	os.Exit(run(os.Args[1], os.Args[2:]))
}

// run runs one command and returns the exit code; it is apart from main so
// that its deferred calls run before the process exits.
func run(cmd string, args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch cmd {
	case "up":
		err = up(ctx, args)
	case "down":
		err = down(args)
	case "status":
		err = status(ctx, args)
	case "node":
		err = node(ctx, args)
	case "forward":
		err = forward(ctx, args)
	case nodeagent.PodInitArg:
		if len(args) != 1 {
			err = errors.New("pod-init takes one argument")
			break
		}
		err = nodeagent.PodInit(args[0])
	case "-h", "--help", "help":
		fmt.Print(usage)
	default:
		fmt.Fprint(os.Stderr, usage)
		return 2
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "lab %s: %v\n", cmd, err)
		return 1
	}
	return 0
}

func labFlags(fs *flag.FlagSet) *lab.Options {
	o := &lab.Options{}
	fs.StringVar(&o.Name, "name", "ambit", "lab name: prefixes its namespaces, cgroups and state")
	fs.StringVar(&o.Dir, "dir", "", "state directory (default /run/ambit-lab/<name>)")
	fs.StringVar(&o.BinDir, "bin-dir", "", "directory of the built binaries (default: this binary's)")
	return o
}

func up(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("up", flag.ExitOnError)
	o := labFlags(fs)
	fs.IntVar(&o.Nodes, "nodes", 2, "number of nodes")
	if err := fs.Parse(args); err != nil {
		return err
	}
	o.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	o.Progress = os.Stdout
	l, err := lab.Up(ctx, *o)
	if err != nil {
		return err
	}
	fmt.Printf("\nThe lab %q is up. Use it with:\n\n  export KUBECONFIG=%s\n  export PATH=%s:$PATH\n  kubectl get nodes\n\nStop it with: %s/lab down --name %s\n",
		o.Name, l.Kubeconfig(), l.KubectlDir(), l.BinDir(), o.Name)
	return nil
}

func down(args []string) error {
	fs := flag.NewFlagSet("down", flag.ExitOnError)
	o := labFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	return lab.Down(*o)
}

func status(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("status", flag.ExitOnError)
	o := labFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	l, err := lab.Open(*o)
	if err != nil {
		return err
	}
	return l.PrintStatus(ctx, os.Stdout)
}

func node(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("node", flag.ExitOnError)
	var o nodeagent.Options
	var kubeconfig string
	fs.StringVar(&o.NodeName, "name", "", "node name")
	fs.StringVar(&o.NodeIP, "ip", "", "node IP")
	fs.StringVar(&o.PodCIDR, "pod-cidr", "", "pod range")
	fs.StringVar(&kubeconfig, "kubeconfig", "", "node credentials")
	fs.StringVar(&o.ServingCert, "serving-cert", "", "kubelet API certificate")
	fs.StringVar(&o.ServingKey, "serving-key", "", "kubelet API key")
	fs.StringVar(&o.ClientCA, "client-ca", "", "CA of kubelet API clients")
	fs.StringVar(&o.Dir, "dir", "", "node directory")
	fs.StringVar(&o.Root, "root", "", "node filesystem root for hostPath volumes")
	fs.StringVar(&o.LabDir, "lab-dir", "", "lab state directory")
	fs.StringVar(&o.CNIConfDir, "cni-conf-dir", "", "CNI conf dir")
	fs.StringVar(&o.CNIBinDir, "cni-bin-dir", "", "CNI plugin dirs, colon-separated")
	fs.StringVar(&o.BinDir, "bin-dir", "", "directory of the binaries images map to")
	fs.StringVar(&o.Cgroup, "cgroup", "", "node cgroup v2 directory")
	fs.StringVar(&o.ClusterDNS, "cluster-dns", "", "cluster DNS address")
	fs.StringVar(&o.NetnsPrefix, "netns-prefix", "", "prefix of pod network namespace names")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	cfg.QPS, cfg.Burst = 50, 100
	o.Client, err = kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	o.Log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	return nodeagent.New(o).Run(ctx)
}

func forward(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("forward", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:6443", "address to listen on, in this namespace")
	netns := fs.String("netns", "", "network namespace to dial in")
	to := fs.String("to", "", "address to dial")
	if err := fs.Parse(args); err != nil {
		return err
	}
	return lab.Forward(ctx, *listen, *netns, *to, slog.New(slog.NewTextHandler(os.Stderr, nil)))
}
