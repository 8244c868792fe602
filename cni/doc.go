// Package cni is the contract between Ambit's chained CNI plugin and the
// node agent: the plugin's entry in a CNI conflist (PluginConfig), the
// names both sides agree on (PluginType, DefaultAgentSocket), and the
// plugin-to-agent protocol (AddPath, DelPath, PodRequest, AddResponse,
// ErrorResponse), which is HTTP/1.1 over a Unix socket.
//
// The pieces live below it:
//
//   - cni/plugin is the plugin itself (binary bin/ambit-cni, cmd/cni): on
//     ADD it asks the node agent to set up redirection for the pod and
//     blocks the pod's start until the agent answers; on DEL it tells the
//     agent, best effort.
//   - cni/install is what the node agent runs at start: it copies the
//     binary into the node's CNI bin dir and appends the plugin's entry to
//     the primary conflist, and keeps it there.
//
// The protocol, as the plugin speaks it (the agent is the server):
//
//	POST /v1/pods/add   body PodRequest
//	    200 {"redirected": true}   the pod is enrolled and its redirection is in place
//	    200 {"redirected": false}  the pod is not enrolled; nothing was done
//	    4xx/5xx ErrorResponse      the agent could not set the pod up; the ADD fails
//	                               (503: not ready yet, e.g. still syncing; the runtime retries)
//	POST /v1/pods/del   body PodRequest
//	    any status; the plugin logs a non-200 answer and never fails DEL
//
// The agent answers an ADD only when the redirection is done (or known to be
// unnecessary): the pod's containers do not start before it answers. The
// plugin gives up after PluginConfig.TimeoutSeconds (DefaultTimeoutSeconds).
// Every request carries Content-Type application/json; the Host header is
// meaningless on a Unix socket and the agent should ignore it.
//
// What this package deliberately does not do: no I/O, no CNI library types,
// no Kubernetes types. It is imported by the plugin (a short-lived binary
// run by the container runtime) and by the agent, and stays small for both.
package cni
