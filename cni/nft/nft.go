// Package nft is the nftables capture mode: rules inside an enrolled pod's
// network namespace that steer its TCP into ztunnel's in-pod listeners, as
// Istio's in-pod iptables mode does. It is the fallback for kernels without
// what the eBPF mode needs, and the mode the lab uses until the eBPF mode
// lands.
//
// Everything lives in one table, inet ambit, inside the pod's namespace:
// removing the table releases the pod. Nothing is installed in the node's
// namespace, so the rules cannot fight with the primary CNI or with
// NetworkPolicy.
package nft

import (
	"bytes"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
)

// Mark is the SO_MARK on ztunnel's own sockets (ztunnel/inpod.Mark): they
// are never redirected again.
const Mark = 0x539

// TableName is the table the rules live in.
const TableName = "ambit"

// Ruleset returns the nft script for a pod. probeSources are the addresses
// kubelet's probes come from (the node's): they reach the app directly, as
// they do without the mesh.
//
//   - outbound: every TCP connection the pod's processes make, except to
//     loopback and from ztunnel's marked sockets, goes to 15001; ztunnel
//     reads the original destination with SO_ORIGINAL_DST.
//   - inbound: TCP to the pod on any port goes to 15006 (plaintext),
//     except HBONE on 15008, which ztunnel terminates itself, and probes.
func Ruleset(probeSources []netip.Addr) string {
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s {\n", TableName)
	b.WriteString("  chain output {\n    type nat hook output priority -100; policy accept;\n")
	fmt.Fprintf(&b, "    meta mark 0x%x return\n", Mark)
	b.WriteString("    ip daddr 127.0.0.0/8 return\n    ip6 daddr ::1 return\n")
	b.WriteString("    meta l4proto tcp redirect to :15001\n  }\n")
	b.WriteString("  chain prerouting {\n    type nat hook prerouting priority -100; policy accept;\n")
	for _, a := range probeSources {
		if a.Is4() {
			fmt.Fprintf(&b, "    ip saddr %s return\n", a)
		} else {
			fmt.Fprintf(&b, "    ip6 saddr %s return\n", a)
		}
	}
	b.WriteString("    tcp dport 15008 return\n")
	b.WriteString("    meta l4proto tcp redirect to :15006\n  }\n}\n")
	return b.String()
}

// Apply installs (or replaces) the rules in the network namespace at
// netnsPath. It is atomic: nft applies a script as one transaction.
func Apply(netnsPath string, probeSources []netip.Addr) error {
	// Replace: delete the table in the same transaction if it exists.
	script := fmt.Sprintf("table inet %s\ndelete table inet %s\n%s", TableName, TableName, Ruleset(probeSources))
	return run(netnsPath, script)
}

// Remove deletes the rules; removing absent rules is not an error.
func Remove(netnsPath string) error {
	script := fmt.Sprintf("table inet %s\ndelete table inet %s\n", TableName, TableName)
	return run(netnsPath, script)
}

// Installed reports whether the rules are present.
func Installed(netnsPath string) (bool, error) {
	out, err := exec.Command("nsenter", "--net="+netnsPath, "--", "nft", "list", "tables").CombinedOutput()
	if err != nil {
		return false, fmt.Errorf("listing nft tables in %s: %w: %s", netnsPath, err, bytes.TrimSpace(out))
	}
	return strings.Contains(string(out), "table inet "+TableName+"\n") || strings.HasSuffix(strings.TrimSpace(string(out)), "table inet "+TableName), nil
}

func run(netnsPath, script string) error {
	cmd := exec.Command("nsenter", "--net="+netnsPath, "--", "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft in %s: %w: %s", netnsPath, err, bytes.TrimSpace(out))
	}
	return nil
}
