package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
)

// ErrNotSupported is returned on systems without sk_lookup (anything but Linux).
var ErrNotSupported = errors.New("sk_lookup redirection needs Linux")

// Listener slots in the SOCKMAP.
const (
	// SlotOutbound holds ztunnel's outbound listener (:15001), which gets
	// every TCP connection the pod's own processes open.
	SlotOutbound = 0
	// SlotInbound holds ztunnel's inbound plaintext listener (:15006), which
	// gets connections to the pod that are neither HBONE nor kubelet probes.
	SlotInbound = 1
)

// maxAddrs is the size of each address list in the program's config
// (MAX_ADDRS in redirect.c).
const maxAddrs = 4

// Config is what the program needs to know about a pod.
type Config struct {
	// PodIPs are the pod's own addresses: connections to them are inbound.
	// The program steers IPv4 only, so IPv6 addresses are ignored; at least
	// one and at most four IPv4 addresses are required.
	PodIPs []netip.Addr
	// ProbeSources are the addresses kubelet probes come from (the node's
	// addresses). Connections from them to the pod reach the app directly.
	// At most four IPv4 addresses; IPv6 addresses are ignored.
	ProbeSources []netip.Addr
}

// encode returns the pod and probe address lists as the program reads them:
// IPv4 addresses in network byte order (the in-memory order of the bytes, so
// the native-endian reading of As4), zero for an unused slot.
func (c Config) encode() (pod, probe [maxAddrs]uint32, err error) {
	pod, n, err := ipv4Slots(c.PodIPs)
	if err != nil {
		return pod, probe, fmt.Errorf("pod IPs: %w", err)
	}
	if n == 0 {
		return pod, probe, errors.New("pod IPs: no IPv4 address (the program steers IPv4 only and would pass everything)")
	}
	probe, _, err = ipv4Slots(c.ProbeSources)
	if err != nil {
		return pod, probe, fmt.Errorf("probe sources: %w", err)
	}
	return pod, probe, nil
}

func ipv4Slots(addrs []netip.Addr) (slots [maxAddrs]uint32, n int, err error) {
	for _, a := range addrs {
		a = a.Unmap()
		switch {
		case !a.IsValid() || a.IsUnspecified():
			return slots, n, fmt.Errorf("invalid address %q", a)
		case !a.Is4():
			continue
		case n == maxAddrs:
			return slots, n, fmt.Errorf("more than %d IPv4 addresses", maxAddrs)
		}
		b := a.As4()
		slots[n] = binary.NativeEndian.Uint32(b[:])
		n++
	}
	return slots, n, nil
}
