// Package nft is the nftables capture mode: rules inside an enrolled pod's
// network namespace that steer its TCP into ztunnel's in-pod listeners, as
// Istio's in-pod iptables mode does. It is the fallback for kernels without
// what the eBPF mode needs, and the mode the lab uses until the eBPF mode
// lands.
//
// Everything lives in one table, inet ambit, plus one policy-routing rule
// and one route (table 133), inside the pod's namespace: removing them
// releases the pod. Nothing is installed in the node's namespace, so the
// rules cannot fight with the primary CNI or with NetworkPolicy.
package nft

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
)

// Mark is the SO_MARK on ztunnel's own sockets (ztunnel/inpod.Mark): they
// are never redirected again.
const Mark = 0x539

// InboundMark is the SO_MARK on ztunnel's transparent sockets to the app
// (ztunnel/inpod.InboundMark): they carry the client's address as their
// source, so the app's replies must be steered back to ztunnel instead of
// leaving through eth0. Istio's in-pod mode uses the same value.
const InboundMark = 0x111

// TableName is the table the rules live in.
const TableName = "ambit"

// RouteTable and RulePref place the policy routing that delivers the app's
// replies to ztunnel's transparent sockets: packets marked InboundMark
// look up a table where every address is local (Istio: table 133, pref
// 32764).
const (
	RouteTable = 133
	RulePref   = 32764
)

// markMask is the part of the mark the rule matches (0x111/0xfff).
const markMask = 0xfff

// Ruleset returns the nft script for a pod. probeSources are the addresses
// kubelet's probes come from (the node's): they reach the app directly, as
// they do without the mesh.
//
//   - outbound: every TCP connection the pod's processes make, except to
//     loopback and from ztunnel's marked sockets, goes to 15001; ztunnel
//     reads the original destination with SO_ORIGINAL_DST.
//   - inbound: TCP to the pod on any port goes to 15006 (plaintext),
//     except HBONE on 15008, which ztunnel terminates itself, and probes.
//   - only SYNs are redirected: a connection open before the rules (when
//     the namespace had no connection tracking yet) is picked up mid-stream
//     by conntrack as a new flow, and redirecting its next packet would
//     reset it.
//   - return path: ztunnel dials the app from the client's address
//     (IP_TRANSPARENT, mark InboundMark). The mark is saved in the
//     connection's ct mark and put back on every packet of the connection
//     the pod sends, so the app's replies, addressed to a remote client,
//     are re-routed (a "type route" chain re-runs the route lookup when
//     the mark changes) by the InboundMark rule to the local table and
//     reach ztunnel's socket over lo.
func Ruleset(probeSources []netip.Addr) string {
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s {\n", TableName)
	b.WriteString("  chain mangle_output {\n    type route hook output priority mangle; policy accept;\n")
	fmt.Fprintf(&b, "    meta mark 0x%x ct mark set 0x%x\n", InboundMark, InboundMark)
	fmt.Fprintf(&b, "    ct mark 0x%x meta mark set 0x%x\n  }\n", InboundMark, InboundMark)
	b.WriteString("  chain output {\n    type nat hook output priority -100; policy accept;\n")
	fmt.Fprintf(&b, "    meta mark 0x%x return\n", Mark)
	fmt.Fprintf(&b, "    meta mark 0x%x return\n", InboundMark)
	b.WriteString("    ip daddr 127.0.0.0/8 return\n    ip6 daddr ::1 return\n")
	b.WriteString("    tcp flags & (syn | ack) == syn redirect to :15001\n  }\n")
	b.WriteString("  chain prerouting {\n    type nat hook prerouting priority -100; policy accept;\n")
	// ztunnel's transparent SYN to the app loops back through lo with the
	// client's source: it is not a new inbound connection.
	fmt.Fprintf(&b, "    meta mark 0x%x return\n", InboundMark)
	fmt.Fprintf(&b, "    ct mark 0x%x return\n", InboundMark)
	for _, a := range probeSources {
		if a.Is4() {
			fmt.Fprintf(&b, "    ip saddr %s return\n", a)
		} else {
			fmt.Fprintf(&b, "    ip6 saddr %s return\n", a)
		}
	}
	b.WriteString("    tcp dport 15008 return\n")
	b.WriteString("    tcp flags & (syn | ack) == syn redirect to :15006\n  }\n}\n")
	return b.String()
}

// Apply installs (or replaces) the rules in the network namespace at
// netnsPath. The nft part is atomic (nft applies a script as one
// transaction); the policy routing is installed first, so that once the
// table exists the app's replies to transparent dials have somewhere to go.
func Apply(netnsPath string, probeSources []netip.Addr) error {
	ns, err := openNetns(netnsPath)
	if err != nil {
		return err
	}
	defer ns.close()
	if err := ns.addRouting(); err != nil {
		return err
	}
	// Replace: delete the table in the same transaction if it exists.
	script := fmt.Sprintf("table inet %s\ndelete table inet %s\n%s", TableName, TableName, Ruleset(probeSources))
	return ns.nft(script)
}

// Remove deletes the rules and the policy routing; removing absent rules
// is not an error.
func Remove(netnsPath string) error {
	ns, err := openNetns(netnsPath)
	if err != nil {
		return err
	}
	defer ns.close()
	script := fmt.Sprintf("table inet %s\ndelete table inet %s\n", TableName, TableName)
	if err := ns.nft(script); err != nil {
		return err
	}
	return ns.delRouting()
}

// RoutingInstalled reports whether the policy-routing rule is present.
func RoutingInstalled(netnsPath string) (bool, error) {
	ns, err := openNetns(netnsPath)
	if err != nil {
		return false, err
	}
	defer ns.close()
	return ns.routingInstalled()
}

// netns is a namespace held open for the commands run in it. The node
// agent names a pod's namespace by /proc/<pid>/ns/net of any process in
// it, which may be short-lived (an exec'd command, or one of these very
// commands); each command enters the namespace through the fd held here,
// so a path that goes away halfway does not leave half the rules in.
type netns struct {
	path string
	f    *os.File
}

func openNetns(path string) (*netns, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening netns %s: %w", path, err)
	}
	return &netns{path: path, f: f}, nil
}

func (n *netns) close() { _ = n.f.Close() } // read-only

// command runs name in the namespace: the fd is the child's fd 3.
func (n *netns) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command("nsenter", append([]string{"--net=/proc/self/fd/3", "--", name}, args...)...)
	cmd.ExtraFiles = []*os.File{n.f}
	return cmd
}

func (n *netns) nft(script string) error {
	cmd := n.command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft in %s: %w: %s", n.path, err, bytes.TrimSpace(out))
	}
	return nil
}

func (n *netns) ip(args ...string) (string, error) {
	out, err := n.command("ip", args...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("ip %s in %s: %w: %s", strings.Join(args, " "), n.path, err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

func (n *netns) routingInstalled() (bool, error) {
	out, err := n.ip("-4", "rule", "list", "pref", strconv.Itoa(RulePref))
	if err != nil {
		return false, err
	}
	return strings.Contains(out, fmt.Sprintf("lookup %d", RouteTable)), nil
}

func ruleArgs(verb string) []string {
	return []string{"-4", "rule", verb, "fwmark", fmt.Sprintf("0x%x/0x%x", InboundMark, markMask),
		"pref", strconv.Itoa(RulePref), "lookup", strconv.Itoa(RouteTable)}
}

// addRouting installs the route and the rule; it is idempotent. A rule
// already there stays: deleting and adding it again would, for a moment,
// send the app's replies to transparent dials out through eth0 (Apply runs
// again when the agent restarts).
func (n *netns) addRouting() error {
	if _, err := n.ip("-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", strconv.Itoa(RouteTable)); err != nil {
		return err
	}
	if ok, err := n.routingInstalled(); err != nil || ok {
		return err
	}
	_, err := n.ip(ruleArgs("add")...)
	return err
}

func (n *netns) delRouting() error {
	if err := n.delRule(); err != nil {
		return err
	}
	// Deleting an absent route fails and so does listing an absent table,
	// so look through all tables first.
	out, err := n.ip("-4", "route", "show", "table", "all")
	if err != nil || !strings.Contains(out, fmt.Sprintf("local default dev lo table %d ", RouteTable)) {
		return err
	}
	_, err = n.ip("-4", "route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", strconv.Itoa(RouteTable))
	return err
}

// delRule deletes every copy of the rule.
func (n *netns) delRule() error {
	for {
		ok, err := n.routingInstalled()
		if err != nil || !ok {
			return err
		}
		if _, err := n.ip(ruleArgs("del")...); err != nil {
			return err
		}
	}
}

// Installed reports whether the rules are present.
func Installed(netnsPath string) (bool, error) {
	out, err := exec.Command("nsenter", "--net="+netnsPath, "--", "nft", "list", "tables").CombinedOutput()
	if err != nil {
		return false, fmt.Errorf("listing nft tables in %s: %w: %s", netnsPath, err, bytes.TrimSpace(out))
	}
	return strings.Contains(string(out), "table inet "+TableName+"\n") || strings.HasSuffix(strings.TrimSpace(string(out)), "table inet "+TableName), nil
}
