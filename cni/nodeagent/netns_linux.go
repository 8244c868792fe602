package nodeagent

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"k8s.io/apimachinery/pkg/labels"
)

func labelsEverything() labels.Selector { return labels.Everything() }

// ErrNoNetns is returned by FindNetns when no process is in a namespace
// holding the address (the pod has no running container yet).
var ErrNoNetns = errors.New("no network namespace holds the pod's address")

// FindNetns finds the network namespace of a running pod from its IP, as
// Istio's node agent does for pods that were running before it: it looks at
// the namespace of every process on the node (each namespace once) for an
// interface with that address whose other end (a veth peer, a macvlan's
// parent) is in the agent's own namespace, the node's, and returns a
// /proc/<pid>/ns/net path to it. The last condition matters where one
// machine holds several clusters' pods with the same addresses (the lab).
func FindNetns(ip netip.Addr) (string, error) {
	if !ip.IsValid() {
		return "", errors.New("pod has no IP yet")
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return "", err
	}
	seen := map[uint64]bool{}
	self, _ := os.Stat("/proc/self/ns/net")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		path := filepath.Join("/proc", e.Name(), "ns", "net")
		st, err := os.Stat(path)
		if err != nil {
			continue
		}
		ino := st.Sys().(*syscall.Stat_t).Ino
		if seen[ino] || (self != nil && os.SameFile(st, self)) {
			continue
		}
		seen[ino] = true
		if has, err := netnsHasAddr(path, ip); err == nil && has {
			return fmt.Sprintf("/proc/%d/ns/net", pid), nil
		}
	}
	return "", fmt.Errorf("%w: %s", ErrNoNetns, ip)
}

func netnsHasAddr(path string, ip netip.Addr) (bool, error) {
	h, err := netns.GetFromPath(path)
	if err != nil {
		return false, err
	}
	defer func() { _ = h.Close() }() // a namespace handle we only read through
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		return false, err
	}
	defer nl.Close()
	addrs, err := nl.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return false, err
	}
	for _, a := range addrs {
		if got, ok := netip.AddrFromSlice(a.IP); !ok || got.Unmap() != ip.Unmap() {
			continue
		}
		l, err := nl.LinkByIndex(a.LinkIndex)
		if err != nil {
			return false, err
		}
		peer := l.Attrs().NetNsID
		if peer < 0 { // no other end to check
			return true, nil
		}
		return isOwnNetns(nl, peer)
	}
	return false, nil
}

// isOwnNetns reports whether nsid, as the namespace of nl names it, is the
// agent's own namespace (the node's).
func isOwnNetns(nl *netlink.Handle, nsid int) (bool, error) {
	self, err := os.Open("/proc/self/ns/net")
	if err != nil {
		return false, err
	}
	defer func() { _ = self.Close() }() // read-only
	ours, err := nl.GetNetNsIdByFd(int(self.Fd()))
	return err == nil && ours == nsid, err
}
