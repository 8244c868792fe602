// Package install puts Ambit's chained CNI plugin on a node and keeps it
// there, the way istio-cni and linkerd-cni install themselves. The node
// agent calls it:
//
//	res, err := install.Install(opts)   // at start, before reporting ready
//	go install.Watch(ctx, opts)          // then, for as long as the agent runs
//	err = install.Uninstall(opts)        // only when Ambit leaves the node
//
// Install copies the ambit-cni binary into the node's CNI bin dir and adds
// Ambit's entry ({"type": "ambit-cni", ...}, cni.PluginConfig) to the end of
// the plugins of the primary network config: the first .conf, .conflist or
// .json in the CNI conf dir by file name, the one the container runtime
// uses. A single-plugin .conf (or .json) is converted into a .conflist of
// the same base name, keeping the network's name and cniVersion. Ambit
// never replaces the primary plugin and never renames the network.
//
// The primary config is edited as ordered JSON: every other key and plugin
// comes back byte for byte, in its order, unknown fields included; only
// whitespace is normalized (two-space indentation). Install is idempotent
// and writes nothing when the entry is already as wanted. Uninstall removes
// the entry and leaves the file as it was before Install (and converts a
// converted .conf back). Every write is atomic (temporary file in the same
// directory, fsync, rename, fsync of the directory).
//
// Install refuses (ErrUnsupportedCNIVersion) a primary config whose
// cniVersion the plugin does not speak, and (ErrInvalidConfig) one that
// libcni would not load after the edit: a conflist that fails to load
// stops every pod on the node, so the package checks before it writes.
//
// What the package deliberately does not do:
//
//   - It does not fight a primary CNI that rewrites its config: Watch puts
//     the entry back at most once per interval, and an entry someone has
//     moved (another chained plugin appended after it) stays where it is.
//   - It does not uninstall on agent shutdown. That is the agent's call,
//     and the right one is almost always to leave the plugin in place
//     across agent restarts and upgrades, so that pods created while the
//     agent is away wait for it instead of starting uncaptured.
//   - It does not wait for the primary CNI: Install returns
//     ErrNoPrimaryConfig; Watch retries until the config appears.
//   - It does not look at plugins a CNI 1.1 runtime loads from
//     <conf dir>/<network name>/*.conf, which run after the inline list,
//     nor at conflists with no inline "plugins" list (ErrInvalidConfig).
//   - It writes no kubeconfig or other credentials: the plugin needs none;
//     it asks the node agent.
package install
