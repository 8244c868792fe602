// Package plugin is Ambit's chained CNI plugin, ambit-cni (binary built
// from cmd/cni). It runs after the node's primary CNI plugin, in the same
// conflist, once per pod sandbox, and hands the pod to the Ambit node agent,
// which decides whether the pod is enrolled and, if it is, sets up the
// redirection of its traffic to ztunnel.
//
// ADD: the plugin needs the primary plugin's result (prevResult; without
// it the ADD fails: ambit-cni is never a primary plugin). It reads the pod's
// namespace, name and UID from CNI_ARGS and its IPs from prevResult, POSTs
// them to the agent (cni.AddPath, see package cni for the protocol) and
// waits until the agent answers, at most timeout_seconds. On success it
// prints prevResult unchanged, in the config's cniVersion, whether or not
// the agent enrolled the pod. An invocation without K8S_POD_NAMESPACE and
// K8S_POD_NAME is not a Kubernetes pod and passes through, as does a pod in
// one of exclude_namespaces; neither is sent to the agent.
//
// DEL: a best-effort POST to cni.DelPath, at most 5 s. DEL never fails:
// the CNI spec requires DEL to succeed when there is nothing left to clean
// up, and a runtime that cannot delete a sandbox retries forever.
//
// CHECK, GC and STATUS succeed without doing anything.
//
// The agent is down (its socket missing, or nothing listening): ADD fails,
// closed, for every pod it would have asked about. The plugin cannot tell
// whether the pod would be enrolled: that is the agent's call, made from the
// Kubernetes API (namespace and pod labels), and the plugin deliberately has
// no API client, no credentials and no cache of its own. Letting the pod
// start would risk starting an enrolled pod with no redirection, whose
// traffic would then leave in plaintext and bypass policy: exactly what the
// mesh promises cannot happen. A failed ADD costs only time: kubelet tears
// the sandbox down and retries with backoff, and the pod starts once the
// agent is back. What it costs: while the agent is down, no pod that uses
// the pod network starts on that node (host-network pods, which include the
// agent's own, never run CNI), except in exclude_namespaces. Istio makes the
// same trade for the pods it knows are ambient; ambit-cni makes it for all,
// because it does not know which those are.
//
// Logs go to log_file when set, else to stderr, which the runtime captures
// (stdout carries only the CNI result or error). Errors returned to the
// runtime name the pod, the socket and what to check; kubelet shows them in
// the pod's events.
//
// What the package deliberately does not do: it does not touch the pod's
// network namespace, nftables or eBPF (the agent does, in its own process,
// which outlives this short-lived binary); it does not talk to the
// Kubernetes API; it does not install itself (cni/install does); and it
// does not retry: kubelet does.
package plugin
