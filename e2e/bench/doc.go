// Package bench is the harness behind `make bench`: it brings up a lab (a
// real Kubernetes control plane and network-namespace nodes, package
// e2e/lab), installs Ambit from deploy/, and measures, on one path (a pod
// on node-1 to a pod on node-2), Ambit against plain TCP and against
// stunnel: bulk throughput and tunnel CPU per GB, 1 KB HTTP latency (fortio),
// the tunnel's CPU and memory, the connection rate, and the control plane's
// policy push time to simulated node subscribers. Every figure is the
// median of several interleaved runs, printed as Markdown tables and written
// as JSON with the raw samples.
//
// The pure parts (statistics, /proc parsing, the tables) are kept apart
// from the code that drives the lab, and tested on their own. The harness
// sets no performance thresholds: it reports, the README judges.
//
// It does not tune the machine (CPU governor, IRQs, isolation) and does not
// know how Ambit captures traffic: it enrols pods with the namespace label,
// as a user does, so it works with any capture mode of the CNI node agent.
package bench
