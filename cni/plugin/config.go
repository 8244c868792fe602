package plugin

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/ambitmesh/ambit/cni"
)

// Config is what the runtime passes on stdin: the list's name and
// cniVersion, Ambit's entry in the conflist, and the previous plugin's
// result.
type Config struct {
	types.PluginConf
	cni.PluginConfig
}

// parseConfig parses and checks the plugin's stdin and fills in defaults.
// prevResult, when present, is parsed into PrevResult in the config's
// cniVersion. Errors wrap ErrInvalidConfig.
func parseConfig(stdin []byte) (*Config, error) {
	var conf Config
	if err := json.Unmarshal(stdin, &conf); err != nil {
		return nil, fmt.Errorf("%w: parsing network configuration: %w", ErrInvalidConfig, err)
	}
	if conf.AgentSocket == "" {
		conf.AgentSocket = cni.DefaultAgentSocket
	}
	// The plugin runs with the runtime's working directory, which is
	// nobody's business: a relative path would be a guess.
	if !filepath.IsAbs(conf.AgentSocket) {
		return nil, fmt.Errorf("%w: agent_socket %q is not an absolute path", ErrInvalidConfig, conf.AgentSocket)
	}
	switch {
	case conf.TimeoutSeconds < 0:
		return nil, fmt.Errorf("%w: timeout_seconds %d is negative", ErrInvalidConfig, conf.TimeoutSeconds)
	case conf.TimeoutSeconds == 0:
		conf.TimeoutSeconds = cni.DefaultTimeoutSeconds
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	return &conf, nil
}

// timeout is how long ADD waits for the agent.
func (c *Config) timeout() time.Duration {
	return time.Duration(c.TimeoutSeconds) * time.Second
}

// delTimeout is how long DEL waits for the agent: DEL is best effort, and a
// runtime tearing a pod down should not wait on a hung agent for long.
func (c *Config) delTimeout() time.Duration {
	return min(c.timeout(), 5*time.Second)
}

// excluded reports whether pods of namespace ns pass through untouched.
func (c *Config) excluded(ns string) bool {
	return slices.Contains(c.ExcludeNamespaces, ns)
}

// podArgs is what CNI_ARGS say about the pod, as kubelet's container
// runtime passes them (containerd: K8S_POD_NAMESPACE, K8S_POD_NAME,
// K8S_POD_INFRA_CONTAINER_ID, K8S_POD_UID).
type podArgs struct {
	Namespace, Name, UID, InfraContainerID string
}

func (p podArgs) String() string { return p.Namespace + "/" + p.Name }

// isKubernetes reports whether the sandbox is a Kubernetes pod's: the agent
// can only look a pod up by namespace and name.
func (p podArgs) isKubernetes() bool { return p.Namespace != "" && p.Name != "" }

// parseCNIArgs reads CNI_ARGS ("K1=V1;K2=V2"). Unlike types.LoadArgs it
// never fails: unknown keys are ignored whether or not IgnoreUnknown is
// set, and a pair without "=" is skipped, because a chained plugin has no
// business failing a pod over arguments meant for another plugin. A value
// may itself contain "=".
func parseCNIArgs(s string) podArgs {
	var p podArgs
	for pair := range strings.SplitSeq(s, ";") {
		k, v, ok := strings.Cut(pair, "=")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "K8S_POD_NAMESPACE":
			p.Namespace = v
		case "K8S_POD_NAME":
			p.Name = v
		case "K8S_POD_UID":
			p.UID = v
		case "K8S_POD_INFRA_CONTAINER_ID":
			p.InfraContainerID = v
		}
	}
	return p
}

// podIPs returns the addresses in a plugin result, in order, without
// duplicates. Never nil, so that it encodes as [].
func podIPs(res types.Result) ([]netip.Addr, error) {
	cur, err := current.NewResultFromResult(res)
	if err != nil {
		return nil, fmt.Errorf("%w: reading prevResult: %w", ErrInvalidConfig, err)
	}
	ips := make([]netip.Addr, 0, len(cur.IPs))
	for _, ipc := range cur.IPs {
		a, ok := netip.AddrFromSlice(ipc.Address.IP)
		if !ok {
			continue
		}
		// net.IP keeps IPv4 in 16 bytes; the agent wants 10.0.0.1, not
		// ::ffff:10.0.0.1.
		a = a.Unmap()
		if !slices.Contains(ips, a) {
			ips = append(ips, a)
		}
	}
	return ips, nil
}
