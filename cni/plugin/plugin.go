package plugin

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/ambitmesh/ambit/cni"
)

// About is what the binary prints on stderr when run without CNI_COMMAND.
const About = "ambit-cni: Ambit's chained CNI plugin; hands each pod to the Ambit node agent for capture"

// VersionInfo is the CNI spec versions the plugin speaks
// (cni.SupportedCNIVersions).
func VersionInfo() version.PluginInfo {
	return version.PluginSupports(cni.SupportedCNIVersions()...)
}

// Plugin is the CNI plugin. The zero value writes to os.Stdout and
// os.Stderr, as a CNI plugin does; tests set Stdout and Stderr.
type Plugin struct {
	// Stdout receives the CNI result. Nil means os.Stdout.
	Stdout io.Writer
	// Stderr receives the log when the config names no log_file. Nil
	// means os.Stderr.
	Stderr io.Writer
}

// Funcs is the plugin's commands, for skel.PluginMainFuncs.
func (p *Plugin) Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: p.Add, Del: p.Del, Check: p.Check}
}

func (p *Plugin) stdout() io.Writer {
	if p.Stdout != nil {
		return p.Stdout
	}
	return os.Stdout
}

func (p *Plugin) stderr() io.Writer {
	if p.Stderr != nil {
		return p.Stderr
	}
	return os.Stderr
}

// Add is CNI ADD: hand the pod to the agent, wait for it, and pass
// prevResult on. Its errors are *types.Error (see toCNIError).
func (p *Plugin) Add(args *skel.CmdArgs) error {
	if err := p.add(args); err != nil {
		return toCNIError(err)
	}
	return nil
}

func (p *Plugin) add(args *skel.CmdArgs) error {
	conf, err := parseConfig(args.StdinData)
	if err != nil {
		log, done := p.logger(nil, "ADD", args.ContainerID)
		defer done()
		log.Error("ADD failed", "error", err)
		return err
	}
	log, done := p.logger(conf, "ADD", args.ContainerID)
	defer done()
	if conf.PrevResult == nil {
		log.Error("ADD failed", "error", ErrNotChained)
		return fmt.Errorf("%w (network %q)", ErrNotChained, conf.Name)
	}
	pod := parseCNIArgs(args.Args)
	log = log.With("pod", pod.String())
	switch {
	case !pod.isKubernetes():
		log.Info("not a Kubernetes pod (no K8S_POD_NAMESPACE and K8S_POD_NAME in CNI_ARGS); passing through")
	case conf.excluded(pod.Namespace):
		log.Info("namespace in exclude_namespaces; passing through")
	default:
		ips, err := podIPs(conf.PrevResult)
		if err != nil {
			log.Error("ADD failed", "error", err)
			return err
		}
		req := cni.PodRequest{
			PodNamespace: pod.Namespace,
			PodName:      pod.Name,
			PodUID:       pod.UID,
			Netns:        args.Netns,
			IPs:          ips,
			ContainerID:  args.ContainerID,
		}
		agent := agentClient{socket: conf.AgentSocket, timeout: conf.timeout()}
		start := time.Now()
		resp, err := agent.add(context.Background(), req)
		if err != nil {
			log.Error("ADD failed", "socket", agent.socket, "error", err)
			return err
		}
		log.Info("node agent done", "redirected", resp.Redirected, "ips", ips, "netns", args.Netns,
			"duration", time.Since(start).Round(time.Millisecond))
	}
	// A chained plugin that changes nothing returns what it was given
	// (CNI spec, "Chained plugins"), in the config's version.
	res, err := conf.PrevResult.GetAsVersion(conf.CNIVersion)
	if err != nil {
		return fmt.Errorf("converting prevResult to %s: %w", conf.CNIVersion, err)
	}
	return res.PrintTo(p.stdout())
}

// Del is CNI DEL: tell the agent, best effort. It never fails: the CNI spec
// wants DEL to succeed when there is nothing (left) to do, and a runtime
// whose DEL fails keeps the sandbox and retries.
func (p *Plugin) Del(args *skel.CmdArgs) error {
	conf, err := parseConfig(args.StdinData)
	if err != nil {
		log, done := p.logger(nil, "DEL", args.ContainerID)
		defer done()
		log.Warn("ignoring unusable configuration on DEL", "error", err)
		return nil
	}
	log, done := p.logger(conf, "DEL", args.ContainerID)
	defer done()
	pod := parseCNIArgs(args.Args)
	if !pod.isKubernetes() || conf.excluded(pod.Namespace) {
		return nil
	}
	log = log.With("pod", pod.String())
	req := cni.PodRequest{
		PodNamespace: pod.Namespace,
		PodName:      pod.Name,
		PodUID:       pod.UID,
		Netns:        args.Netns,
		IPs:          delIPs(conf),
		ContainerID:  args.ContainerID,
	}
	agent := agentClient{socket: conf.AgentSocket, timeout: conf.delTimeout()}
	if err := agent.del(context.Background(), req); err != nil {
		log.Warn("could not tell the node agent; it cleans up on its own when the pod is gone", "socket", agent.socket, "error", err)
		return nil
	}
	log.Info("node agent told of DEL")
	return nil
}

// delIPs are the IPs for a DEL: prevResult is optional there (0.4.0 and
// later pass it when they have it), and DEL goes ahead without.
func delIPs(conf *Config) []netip.Addr {
	if conf.PrevResult != nil {
		if ips, err := podIPs(conf.PrevResult); err == nil {
			return ips
		}
	}
	return []netip.Addr{}
}

// Check is CNI CHECK. There is nothing of the plugin's own in the pod's
// network to check: the agent owns the redirection and repairs it itself.
func (p *Plugin) Check(*skel.CmdArgs) error {
	return nil
}
