package cni

import "net/netip"

// PluginType is the "type" of Ambit's entry in a conflist. A container
// runtime runs the plugin named by "type" from its CNI bin dir, so it is
// also the file name of the plugin binary there.
const PluginType = "ambit-cni"

// DefaultAgentSocket is where the node agent listens for the plugin, on the
// node's filesystem (the plugin runs in the host's mount namespace).
const DefaultAgentSocket = "/var/run/ambit/cni.sock"

// DefaultTimeoutSeconds is how long the plugin waits for the agent to
// finish an ADD. Kubelet's own deadline for creating a pod sandbox is
// minutes, so this leaves room for a retry inside it.
const DefaultTimeoutSeconds = 30

// SupportedCNIVersions are the CNI spec versions the plugin speaks, oldest
// first. 0.3.x is included because the stock conflists of Calico and
// Flannel still declare "cniVersion": "0.3.1"; chaining (prevResult) exists
// since 0.3.0. 0.3.x has no CHECK.
func SupportedCNIVersions() []string {
	return []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}
}

// PluginConfig is Ambit's entry in the conflist, besides its "type"
// (PluginType) and the "name" and "cniVersion" the runtime injects from the
// list. Istio's istio-cni entry is the model; unknown fields are ignored.
//
// Example:
//
//	{"type": "ambit-cni", "agent_socket": "/var/run/ambit/cni.sock", "timeout_seconds": 30, "log_level": "info"}
type PluginConfig struct {
	// AgentSocket is the node agent's Unix socket. Empty means
	// DefaultAgentSocket.
	AgentSocket string `json:"agent_socket,omitempty"`
	// TimeoutSeconds bounds how long ADD waits for the agent. Zero means
	// DefaultTimeoutSeconds.
	TimeoutSeconds int `json:"timeout_seconds,omitempty"`
	// LogLevel is debug, info (the default), warn or error.
	LogLevel string `json:"log_level,omitempty"`
	// LogFile is where the plugin logs (appending; one old file is kept as
	// LogFile+".1"). Empty means stderr, which the runtime captures: CNI
	// plugins may not write anything but their result to stdout.
	LogFile string `json:"log_file,omitempty"`
	// ExcludeNamespaces are pod namespaces the plugin passes through
	// without asking the agent, so that their pods start even while the
	// agent is down (kube-system is the usual one). Their pods are never
	// captured at start, whatever their labels say.
	ExcludeNamespaces []string `json:"exclude_namespaces,omitempty"`
}

// The agent's endpoints.
const (
	// AddPath is POSTed on CNI ADD, after the primary plugin has made the
	// pod's network. The agent answers 200 with AddResponse when it is
	// done, or an error status with ErrorResponse.
	AddPath = "/v1/pods/add"
	// DelPath is POSTed on CNI DEL. Best effort: the plugin ignores the
	// answer beyond logging it.
	DelPath = "/v1/pods/del"
)

// PodRequest is the body of both AddPath and DelPath.
type PodRequest struct {
	// PodNamespace and PodName come from K8S_POD_NAMESPACE and
	// K8S_POD_NAME in CNI_ARGS; the plugin only calls the agent when both
	// are set.
	PodNamespace string `json:"podNamespace"`
	PodName      string `json:"podName"`
	// PodUID is K8S_POD_UID from CNI_ARGS, or "" when the runtime does not
	// pass it (containerd and CRI-O do). It is the pod's metadata.uid, so
	// the agent can tell a pod from a later one with the same name.
	PodUID string `json:"podUID"`
	// Netns is the path of the pod's network namespace (CNI_NETNS), e.g.
	// /var/run/netns/cni-1234. It may be "" on DEL, when the runtime has
	// already removed the namespace (CNI spec).
	Netns string `json:"netns"`
	// IPs are the pod's addresses, from the primary plugin's result
	// (prevResult), IPv4 and IPv6. Never null; empty when the primary
	// plugin reported none (or on a DEL without prevResult).
	IPs []netip.Addr `json:"ips"`
	// ContainerID is CNI_CONTAINERID: the pod sandbox's ID (containerd and
	// CRI-O also pass it as K8S_POD_INFRA_CONTAINER_ID). The runtime uses
	// the same ID for the ADD and the DEL of one sandbox.
	ContainerID string `json:"containerID"`
}

// AddResponse is the agent's 200 answer to AddPath.
type AddResponse struct {
	// Redirected reports whether the pod is enrolled and its traffic is now
	// redirected to ztunnel. False means the pod is not enrolled; the
	// plugin lets it start untouched either way.
	Redirected bool `json:"redirected"`
}

// ErrorResponse is the body of an error status from the agent. Error is
// shown to the operator in the pod's events, prefixed with the pod and the
// socket, so it should say what went wrong for this pod and, where it can,
// what to check.
type ErrorResponse struct {
	Error string `json:"error"`
}
