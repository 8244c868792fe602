// Package bpfroute is the policy routing of the eBPF capture mode, inside an
// enrolled pod's network namespace. The sk_lookup program (package bpf)
// only runs on packets the namespace receives; this routing makes the
// pod's outbound TCP be received there too, and brings the app's replies
// to ztunnel's transparent dials back to ztunnel:
//
//   - outbound: every TCP packet the pod sends that ztunnel did not mark
//     (Mark; those go to the main table) looks up OutboundTable, where every address is local
//     ("local default dev lo src <pod IP>"): it loops back through lo, and
//     the sk_lookup program hands it to ztunnel's outbound listener, whose
//     accepted socket keeps the original destination as its local address.
//     Kubelet's probes reach the app directly: the tc program puts Mark
//     on their SYNs, which tcp_fwmark_accept hands to the app's accepted
//     socket, so the app's replies leave through the main table.
//   - connections the pod had before: a first Apply marks them with Mark
//     (bpf.ConnectionKeeper), so they finish uncaptured, as with Istio.
//   - return path: ztunnel dials the app from the client's address with
//     InboundMark; net.ipv4.tcp_fwmark_accept makes the app's accepted
//     socket carry that mark, so its replies look up InboundTable (every
//     address local) and reach ztunnel over lo. nftables mode does the same
//     with a ct mark.
//
// Nothing here touches the node's namespace.
package bpfroute

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/ambitmesh/ambit/bpf"
	"github.com/ambitmesh/ambit/internal/netnsexec"
	"github.com/ambitmesh/ambit/ztunnel/inpod"
)

// Marks, tables and rule preferences, all before the main table's 32766.
// ztunnel's own sockets are sent to the main table by a rule of their own:
// one "not fwmark ... ipproto tcp" rule would not do, as "not" inverts the
// whole selector and would catch the pod's UDP (DNS) too.
const (
	Mark          = inpod.Mark
	InboundMark   = inpod.InboundMark
	InboundTable  = 133 // Istio's
	OutboundTable = 134
	InboundPref   = 32761
	ExemptPref    = 32762
	OutboundPref  = 32763
	mainTable     = 254
	markMask      = 0xfff
)

const (
	fwmarkAccept = "/proc/sys/net/ipv4/tcp_fwmark_accept"
	// acceptLocal: the reverse-path check of every packet the pod
	// receives looks up its source like a locally generated TCP packet,
	// which OutboundTable calls local; without accept_local the kernel
	// drops every inbound TCP packet as a martian.
	acceptLocal = "/proc/sys/net/ipv4/conf/all/accept_local"
	// fwmarkReflect: replies the kernel sends without a socket (a reset
	// for a connection that ended when the pod was enrolled) carry the
	// mark of the packet they answer, which the tc program sets to Mark,
	// so they leave instead of being captured.
	fwmarkReflect = "/proc/sys/net/ipv4/fwmark_reflect"
)

// Apply installs the routing in the network namespace at netnsPath for a
// pod with addresses podIPs (the first IPv4 one is the source of its
// outbound connections). It is idempotent. With a keeper, the first Apply
// marks the pod's connections first (see firstApply).
func Apply(netnsPath string, podIPs []netip.Addr, keeper *bpf.ConnectionKeeper) error {
	var src netip.Addr
	for _, ip := range podIPs {
		if ip.Unmap().Is4() {
			src = ip.Unmap()
			break
		}
	}
	if !src.IsValid() {
		return fmt.Errorf("no IPv4 pod address in %v: eBPF capture is IPv4 only", podIPs)
	}
	h, lo, done, err := open(netnsPath)
	if err != nil {
		return err
	}
	defer done()
	routes := []*netlink.Route{
		{Type: unix.RTN_LOCAL, Table: InboundTable, Dst: anyV4(), LinkIndex: lo, Scope: netlink.SCOPE_HOST},
		{Type: unix.RTN_LOCAL, Table: OutboundTable, Dst: anyV4(), LinkIndex: lo, Scope: netlink.SCOPE_HOST, Src: src.AsSlice()},
	}
	for _, r := range routes {
		if err := h.RouteReplace(r); err != nil {
			return fmt.Errorf("adding route %s in %s: %w", r, netnsPath, err)
		}
	}
	if err := setSysctls(netnsPath, "1"); err != nil {
		return err
	}
	first, err := firstApply(h, netnsPath)
	if err != nil {
		return err
	}
	// Rules last: once they are in, everything they send somewhere has
	// somewhere to go. A rule already there stays: deleting and adding it
	// again would open a window in which the pod's traffic leaves
	// uncaptured (Apply runs again when the agent restarts). The rules for
	// marked packets first: the return path of ztunnel's deliveries is
	// needed as soon as ztunnel has the pod.
	if err := addRules(h, netlink.FAMILY_V4, netnsPath, InboundPref, ExemptPref); err != nil {
		return err
	}
	if first && keeper != nil {
		if _, err := keeper.Keep(netnsPath); err != nil {
			return fmt.Errorf("keeping the connections open before enrolment: %w", err)
		}
	}
	if err := addRules(h, netlink.FAMILY_V4, netnsPath, OutboundPref); err != nil {
		return err
	}
	if first && keeper != nil {
		if _, err := keeper.KeepStragglers(netnsPath); err != nil {
			return fmt.Errorf("keeping the connections opened during enrolment: %w", err)
		}
	}
	if !slices.ContainsFunc(podIPs, func(ip netip.Addr) bool { return ip.Is6() && !ip.Is4In6() }) {
		return nil
	}
	// The programs steer IPv4 only. A pod with an IPv6 address gets its
	// IPv6 TCP refused rather than sent in plaintext (fail closed):
	// the same rules, pointing at a table that prohibits everything.
	if err := h.RouteReplace(&netlink.Route{Type: unix.RTN_PROHIBIT, Table: OutboundTable, Dst: anyV6(), Family: netlink.FAMILY_V6}); err != nil {
		return fmt.Errorf("adding the IPv6 prohibit route in %s: %w", netnsPath, err)
	}
	return addRules(h, netlink.FAMILY_V6, netnsPath, ExemptPref, OutboundPref)
}

// firstApply reports whether the capture rule is not in yet: a first
// enrolment, on which the pod's open connections are marked with Mark
// (bpf.ConnectionKeeper), so that the exempt rule sends them to the main
// table: a connection made before the pod was enrolled keeps going
// uncaptured, as with Istio's capture, instead of being reset when the
// capture rule loops its next packet to lo. Not on a re-apply: the pod's
// connections then go through ztunnel, and marked they would leave it.
func firstApply(h *netlink.Handle, netnsPath string) (bool, error) {
	have, err := h.RuleList(netlink.FAMILY_V4)
	if err != nil {
		return false, fmt.Errorf("listing rules in %s: %w", netnsPath, err)
	}
	return !slices.ContainsFunc(have, func(r netlink.Rule) bool { return r.Priority == OutboundPref && r.Table == OutboundTable }), nil
}

// addRules adds family's rules of the preferences prefs, in that order,
// that are not there yet.
func addRules(h *netlink.Handle, family int, netnsPath string, prefs ...int) error {
	have, err := h.RuleList(family)
	if err != nil {
		return fmt.Errorf("listing rules in %s: %w", netnsPath, err)
	}
	all := rules(family)
	for _, pref := range prefs {
		i := slices.IndexFunc(all, func(r *netlink.Rule) bool { return r.Priority == pref })
		if i < 0 {
			continue
		}
		r := all[i]
		if slices.ContainsFunc(have, func(o netlink.Rule) bool { return o.Priority == r.Priority && o.Table == r.Table }) {
			continue
		}
		if err := h.RuleAdd(r); err != nil {
			return fmt.Errorf("adding rule %d in %s: %w", r.Priority, netnsPath, err)
		}
	}
	return nil
}

// Remove deletes the rules, then the routes, and turns
// tcp_fwmark_accept back off. Removing what is not there is not an error.
func Remove(netnsPath string) error {
	h, _, done, err := open(netnsPath)
	if err != nil {
		return err
	}
	defer done()
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		for _, r := range rules(family) {
			for {
				err := h.RuleDel(r)
				if errors.Is(err, unix.ENOENT) || (family == netlink.FAMILY_V6 && errors.Is(err, unix.EAFNOSUPPORT)) {
					break
				}
				if err != nil {
					return fmt.Errorf("deleting rule %d in %s: %w", r.Priority, netnsPath, err)
				}
			}
		}
		for _, table := range []int{OutboundTable, InboundTable} {
			routes, err := h.RouteListFiltered(family, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
			if err != nil && family == netlink.FAMILY_V6 {
				break // no IPv6 in the namespace
			}
			if err != nil {
				return fmt.Errorf("listing table %d in %s: %w", table, netnsPath, err)
			}
			for i := range routes {
				if err := h.RouteDel(&routes[i]); err != nil && !errors.Is(err, unix.ESRCH) {
					return fmt.Errorf("deleting route %s in %s: %w", routes[i], netnsPath, err)
				}
			}
		}
	}
	return setSysctls(netnsPath, "0")
}

// Installed reports whether any of the rules or routes is present.
func Installed(netnsPath string) (bool, error) {
	h, _, done, err := open(netnsPath)
	if err != nil {
		return false, err
	}
	defer done()
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rs, err := h.RuleList(family)
		if err != nil && family == netlink.FAMILY_V6 {
			continue // no IPv6 in the namespace
		}
		if err != nil {
			return false, err
		}
		for _, r := range rs {
			if r.Table == InboundTable || r.Table == OutboundTable || r.Priority == ExemptPref {
				return true, nil
			}
		}
		for _, table := range []int{OutboundTable, InboundTable} {
			routes, err := h.RouteListFiltered(family, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
			if err != nil {
				return false, err
			}
			if len(routes) > 0 {
				return true, nil
			}
		}
	}
	return false, nil
}

// rules are family's rules: for IPv4 the return path, ztunnel's exemption
// and the capture; for IPv6 the exemption and the capture (into a table
// that prohibits).
func rules(family int) []*netlink.Rule {
	mask := uint32(markMask)
	exempt := netlink.NewRule()
	exempt.Family, exempt.Priority, exempt.Table, exempt.Mark, exempt.Mask = family, ExemptPref, mainTable, Mark, &mask
	out := netlink.NewRule()
	out.Family, out.Priority, out.Table, out.IPProto = family, OutboundPref, OutboundTable, unix.IPPROTO_TCP
	if family == netlink.FAMILY_V6 {
		return []*netlink.Rule{exempt, out}
	}
	in := netlink.NewRule()
	in.Family, in.Priority, in.Table, in.Mark, in.Mask = family, InboundPref, InboundTable, InboundMark, &mask
	return []*netlink.Rule{in, exempt, out}
}

func anyV4() *net.IPNet { return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)} }

func anyV6() *net.IPNet { return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)} }

// open returns a netlink handle in the namespace and its lo's index.
func open(netnsPath string) (*netlink.Handle, int, func(), error) {
	ns, err := netns.GetFromPath(netnsPath)
	if err != nil {
		return nil, 0, nil, fmt.Errorf("opening netns %s: %w", netnsPath, err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		_ = ns.Close()
		return nil, 0, nil, fmt.Errorf("netlink in %s: %w", netnsPath, err)
	}
	done := func() { h.Close(); _ = ns.Close() }
	lo, err := h.LinkByName("lo")
	if err != nil {
		done()
		return nil, 0, nil, fmt.Errorf("finding lo in %s: %w", netnsPath, err)
	}
	return h, lo.Attrs().Index, done, nil
}

// setSysctls writes the namespace's tcp_fwmark_accept, accept_local and
// fwmark_reflect (net sysctls are those of the namespace of the thread
// that opens them).
func setSysctls(netnsPath, v string) error {
	return netnsexec.RunPath(netnsPath, func() error {
		for _, p := range []string{fwmarkAccept, acceptLocal, fwmarkReflect} {
			if err := os.WriteFile(p, []byte(v), 0); err != nil {
				return fmt.Errorf("setting %s in %s: %w", p, netnsPath, err)
			}
		}
		return nil
	})
}
