package nodeagent

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
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
// parent) is in the agent's own namespace, the node's, and returns a path
// to it that lasts as long as the namespace: its bind mount under
// /var/run/netns or /run/netns, where the container runtime keeps one,
// else /proc/<pid>/ns/net of the oldest process in it (the pod's sandbox,
// not a kubectl exec that ends in a second). The last condition matters where one
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
			return stablePath(st, pid), nil
		}
	}
	return "", fmt.Errorf("%w: %s", ErrNoNetns, ip)
}

// stablePath returns the lasting path to the namespace st, found first as
// pid's: its bind mount, else the oldest process in it.
func stablePath(st os.FileInfo, pid int) string {
	for _, dir := range []string{"/var/run/netns", "/run/netns"} {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			p := filepath.Join(dir, e.Name())
			if o, err := os.Stat(p); err == nil && os.SameFile(o, st) {
				return p
			}
		}
	}
	oldest, oldestStart := pid, startTime(pid)
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		other, err := strconv.Atoi(e.Name())
		if err != nil || other == pid {
			continue
		}
		o, err := os.Stat(filepath.Join("/proc", e.Name(), "ns", "net"))
		if err != nil || !os.SameFile(o, st) {
			continue
		}
		if start := startTime(other); start > 0 && (oldestStart == 0 || start < oldestStart) {
			oldest, oldestStart = other, start
		}
	}
	return fmt.Sprintf("/proc/%d/ns/net", oldest)
}

// startTime is field 22 of /proc/<pid>/stat, the process's start in clock
// ticks since boot; 0 if unknown.
func startTime(pid int) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command (field 2) is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 { // fields 3 to 22
		return 0
	}
	v, _ := strconv.ParseUint(f[19], 10, 64)
	return v
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
