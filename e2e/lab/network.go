package lab

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// The lab's addresses. They exist only inside the lab's own network
// namespaces, so two labs (each with its own namespaces) may use the same
// ones without meeting.
const (
	underlayCIDR   = "10.200.0.0/24"
	controlPlaneIP = "10.200.0.1"
	clusterCIDR    = "10.244.0.0/16"
	serviceCIDR    = "10.96.0.0/16"
	apiServiceIP   = "10.96.0.1"
	dnsServiceIP   = "10.96.0.10"
	apiserverPort  = 6443
)

// nodeIP is the underlay address of node i (1-based).
func nodeIP(i int) string { return fmt.Sprintf("10.200.0.%d", 10+i) }

// podCIDR is the pod range of node i (1-based).
func podCIDR(i int) string { return fmt.Sprintf("10.244.%d.0/24", i) }

func netnsPath(name string) string { return filepath.Join("/run/netns", name) }

// ip runs `ip args...` and returns a useful error.
func ip(args ...string) error {
	var stderr bytes.Buffer
	cmd := exec.Command("ip", args...)
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// sysctl sets a sysctl inside a network namespace.
func sysctl(netnsName, key, value string) error {
	out, err := exec.Command("nsenter", "--net="+netnsPath(netnsName), "--", "sysctl", "-qw", key+"="+value).CombinedOutput()
	if err != nil {
		return fmt.Errorf("setting %s in %s: %w: %s", key, netnsName, err, out)
	}
	return nil
}

// setupNetwork builds the underlay: a control-plane namespace holding a
// bridge, and one namespace per node joined to it by a veth pair, with
// routes for every node's pod range.
//
//	cp netns:    br0 10.200.0.1/24; 10.244.i.0/24 via 10.200.0.(10+i)
//	node i netns: eth0 10.200.0.(10+i)/24, default via 10.200.0.1,
//	              10.244.j.0/24 via 10.200.0.(10+j) for every other node j
func (l *Lab) setupNetwork() error {
	cp := l.cpNetns()
	steps := [][]string{
		{"netns", "add", cp},
		{"-n", cp, "link", "set", "lo", "up"},
		{"-n", cp, "link", "add", "br0", "type", "bridge"},
		{"-n", cp, "addr", "add", controlPlaneIP + "/24", "dev", "br0"},
		{"-n", cp, "link", "set", "br0", "up"},
	}
	for i := 1; i <= l.opts.Nodes; i++ {
		n := l.nodeNetns(i)
		peer := fmt.Sprintf("n%d", i)
		steps = append(steps,
			[]string{"netns", "add", n},
			[]string{"-n", n, "link", "set", "lo", "up"},
			[]string{"-n", n, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", cp},
			[]string{"-n", cp, "link", "set", peer, "master", "br0", "up"},
			[]string{"-n", n, "addr", "add", nodeIP(i) + "/24", "dev", "eth0"},
			[]string{"-n", n, "link", "set", "eth0", "up"},
			[]string{"-n", n, "route", "add", "default", "via", controlPlaneIP},
			[]string{"-n", cp, "route", "add", podCIDR(i), "via", nodeIP(i)},
		)
		for j := 1; j <= l.opts.Nodes; j++ {
			if j != i {
				steps = append(steps, []string{"-n", n, "route", "add", podCIDR(j), "via", nodeIP(j)})
			}
		}
	}
	for _, s := range steps {
		if err := ip(s...); err != nil {
			return err
		}
	}
	for _, ns := range l.netnsNames() {
		if err := sysctl(ns, "net.ipv4.ip_forward", "1"); err != nil {
			return err
		}
	}
	return nil
}

// netnsNames lists every node-level namespace of the lab (not pods').
func (l *Lab) netnsNames() []string {
	names := []string{l.cpNetns()}
	for i := 1; i <= l.opts.Nodes; i++ {
		names = append(names, l.nodeNetns(i))
	}
	return names
}

func (l *Lab) cpNetns() string        { return l.opts.Name + "-cp" }
func (l *Lab) nodeNetns(i int) string { return fmt.Sprintf("%s-node%d", l.opts.Name, i) }

// NodeName is the Kubernetes name of node i (1-based).
func NodeName(i int) string { return fmt.Sprintf("node-%d", i) }

// removeNetnsWithPrefix deletes every network namespace whose name starts
// with the lab's prefix: the node and control-plane namespaces and any pod
// namespace a crashed node agent left behind. Deleting a namespace removes
// its links, routes and nft tables with it.
func removeNetnsWithPrefix(prefix string) error {
	entries, err := os.ReadDir("/run/netns")
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			if err := ip("netns", "delete", e.Name()); err != nil {
				errs = append(errs, err.Error())
			}
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("deleting namespaces: %s", strings.Join(errs, "; "))
	}
	return nil
}
