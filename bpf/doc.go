// Package bpf captures an ambient-mode pod's TCP traffic for ztunnel with two
// programs (redirect.c): an sk_lookup program attached to the pod's network
// namespace for outbound, and a tc program attached (tcx ingress) to the pod's
// interface for inbound. It is the only package that imports cilium/ebpf.
//
// ztunnel runs its in-pod listeners inside the pod's netns and puts the
// outbound one (:15001) and the inbound plaintext one (:15006) into the
// programs' SOCKMAP (RegisterListener). Then:
//
//   - inbound (tc): a SYN arriving on the pod's interface for the pod's own
//     address goes to ztunnel's inbound listener (bpf_sk_assign), except
//     HBONE (15008, ztunnel's own listener) and kubelet probes, which reach
//     their listeners directly. The connection's later packets find the
//     accepted socket by the usual lookup. Inbound is decided here and not
//     in sk_lookup because sk_lookup reports the pod's interface as the
//     ingress of local traffic to the pod's address too (the pod talking to
//     itself, and ztunnel's transparent dials to the app), so it cannot tell
//     them from connections from outside;
//   - outbound (sk_lookup): a connection to any other address, arriving on
//     lo, goes to ztunnel's outbound listener. The pod's own connections
//     arrive that way because of policy routing the node agent installs in
//     the netns (cni/bpfroute): TCP that ztunnel has not marked is routed to
//     a table with "local 0.0.0.0/0 dev lo", so it loops back and is looked
//     up locally with the original destination as the local address, which
//     ztunnel reads as its accepted socket's LocalAddr;
//   - everything else (loopback, the pod talking to itself, UDP, IPv6) is
//     left alone.
//
// Why this shape:
//   - Everything stays inside the pod's netns: the program, the routing and
//     the listeners. Nothing is installed on the node's datapath, and no cgroup
//     is needed: the attachment point is the netns path the CNI plugin is
//     handed, whatever the runtime does with cgroups.
//   - No nftables, no iptables, no conntrack: nothing rewrites addresses, so
//     there is no SO_ORIGINAL_DST to recover and no conntrack table to size.
//   - It fails closed. A socket leaves the SOCKMAP when it is closed, so when
//     ztunnel is not running the slot is empty and the program drops the SYN:
//     the client retries until ztunnel is back, and traffic waits rather than
//     leaves the pod unproxied.
//   - The attachments are bpf_links pinned on a bpffs with the maps (Attach),
//     so they outlive the node agent process and are not re-created on a
//     restart (unless the pod's interface changed under the tcx link); a
//     restarted agent swaps its own build's programs into them atomically
//     (bpf_link_update), so an upgrade reaches pods already enrolled.
//
// What it does not do: routing (the node agent installs the ip rule and
// route), listening (ztunnel owns its sockets; they must be plain TCP, not
// MPTCP, and the outbound one needs IP_TRANSPARENT), IPv6 (the program steers
// IPv4 only), and anything after the connection is accepted.
//
// The program is compiled with bpf2go (gen.go, `make generate`) for bpfel
// (amd64, arm64); the generated redirect_bpfel.go and .o are committed.
package bpf
