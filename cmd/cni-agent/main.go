// Command cni-agent is Ambit's CNI node agent (a DaemonSet): it installs the
// chained plugin into the node's CNI configuration, answers it, and keeps
// every pod of the node enrolled in the mesh or released as its labels say.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"syscall"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/ambitmesh/ambit/cni"
	"github.com/ambitmesh/ambit/cni/install"
	"github.com/ambitmesh/ambit/cni/nodeagent"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "cni-agent: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		zdsSocket    = flag.String("zds-socket", "/var/run/ztunnel/ztunnel.sock", "socket ztunnel connects to (ZDS)")
		pluginSocket = flag.String("plugin-socket", cni.DefaultAgentSocket, "socket the CNI plugin asks on; the same path must be valid on the node")
		confDir      = flag.String("cni-conf-dir", "/etc/cni/net.d", "the node's CNI conf dir")
		binDir       = flag.String("cni-bin-dir", "/opt/cni/bin", "the node's CNI plugin dir")
		plugin       = flag.String("plugin-binary", cni.PluginType, "the plugin binary to install (a path, or a name looked up in PATH)")
		mode         = flag.String("capture-mode", string(nodeagent.ModeEBPF), "how pods' traffic is redirected to ztunnel: ebpf (sk_lookup and policy routing) or nftables (for kernels without sk_lookup)")
		pinDir       = flag.String("bpf-pin-dir", nodeagent.DefaultPinDir, "eBPF mode: where each pod's program, link and maps are pinned (on a bpffs), so redirection outlives an agent restart")
	)
	flag.Parse()
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	node := os.Getenv("NODE_NAME")
	if node == "" {
		return fmt.Errorf("NODE_NAME is not set: the DaemonSet sets it from spec.nodeName")
	}
	bin, err := exec.LookPath(*plugin)
	if err != nil {
		return fmt.Errorf("finding the plugin binary %s: %w", *plugin, err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg, err := rest.InClusterConfig()
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	agent, err := nodeagent.New(nodeagent.Options{
		NodeName: node, Client: client, ZDSSocket: *zdsSocket, Log: log,
		Mode: nodeagent.Mode(*mode), PinDir: *pinDir,
	})
	if err != nil {
		return err
	}
	inst := install.Options{
		ConfDir: *confDir, BinDir: *binDir, PluginBinary: bin,
		Plugin: cni.PluginConfig{AgentSocket: *pluginSocket},
		Logger: log.With("component", "install"),
	}
	errc := make(chan error, 3)
	// Answer the plugin before it is in the conflist: an ADD must find
	// the agent once the entry is there.
	go func() { errc <- agent.ServePlugin(ctx, *pluginSocket) }()
	go func() { errc <- install.Watch(ctx, inst) }()
	go func() { errc <- agent.Run(ctx) }()
	select {
	case <-ctx.Done():
		return nil
	case err := <-errc:
		return err
	}
}
