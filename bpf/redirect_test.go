//go:build linux

package bpf

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/ambitmesh/ambit/internal/netnsexec"
	"github.com/ambitmesh/ambit/internal/netnstest"
)

// Return values of an sk_lookup program (enum sk_action, uapi bpf.h).
const (
	skDrop = 0
	skPass = 1
)

// skLookup mirrors struct bpf_sk_lookup (uapi bpf.h), the context of an
// sk_lookup program in BPF_PROG_TEST_RUN. On output Cookie is the cookie of
// the socket the program selected, 0 for none.
type skLookup struct {
	Cookie         uint64
	Family         uint32
	Protocol       uint32
	RemoteIP4      [4]byte // network byte order
	RemoteIP6      [16]byte
	RemotePort     uint16 // network byte order
	_              uint16
	LocalIP4       [4]byte
	LocalIP6       [16]byte
	LocalPort      uint32 // host byte order
	IngressIfindex uint32 // must be 0: test runs reject anything else
	_              uint32
}

func TestConfigEncode(t *testing.T) {
	a := netip.MustParseAddr
	tests := []struct {
		name    string
		cfg     Config
		pod     [maxAddrs]uint32
		probe   [maxAddrs]uint32
		wantErr string
	}{
		{
			name: "network byte order",
			cfg:  Config{PodIPs: []netip.Addr{a("10.0.0.1")}, ProbeSources: []netip.Addr{a("192.168.1.2")}},
			// Bytes in network order, read as a little-endian u32 (the
			// program is built for bpfel only).
			pod:   [maxAddrs]uint32{0x0100000a},
			probe: [maxAddrs]uint32{0x0201a8c0},
		},
		{
			name: "IPv6 ignored, 4in6 unmapped",
			cfg:  Config{PodIPs: []netip.Addr{a("fd00::1"), a("::ffff:10.0.0.1"), a("10.0.0.2")}},
			pod:  [maxAddrs]uint32{0x0100000a, 0x0200000a},
		},
		{
			name:    "no IPv4 pod address",
			cfg:     Config{PodIPs: []netip.Addr{a("fd00::1")}},
			wantErr: "no IPv4 address",
		},
		{
			name:    "too many",
			cfg:     Config{PodIPs: []netip.Addr{a("10.0.0.1"), a("10.0.0.2"), a("10.0.0.3"), a("10.0.0.4"), a("10.0.0.5")}},
			wantErr: "more than 4",
		},
		{
			name:    "unspecified",
			cfg:     Config{PodIPs: []netip.Addr{a("10.0.0.1")}, ProbeSources: []netip.Addr{a("0.0.0.0")}},
			wantErr: "probe sources: invalid address",
		},
		{
			name:    "zero Addr",
			cfg:     Config{PodIPs: []netip.Addr{{}}},
			wantErr: "pod IPs: invalid address",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pod, probe, err := tc.cfg.encode()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("encode() error = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("encode(): %v", err)
			}
			if pod != tc.pod || probe != tc.probe {
				t.Errorf("encode() = %x, %x, want %x, %x", pod, probe, tc.pod, tc.probe)
			}
		})
	}
}

// TestSkLookupDecisions runs the sk_lookup program in the kernel
// (BPF_PROG_TEST_RUN) through every branch of its decision table and checks
// the verdict and which listener it selected. The program decides outbound
// only: a connection to one of the pod's addresses passes untouched whatever
// the slots hold, because the kernel cannot tell sk_lookup whether it came
// from outside (inbound is the tc program's: TestInboundDecisions).
func TestSkLookupDecisions(t *testing.T) {
	requireRoot(t)
	lns := slotListeners(t)
	cookies := map[int]uint64{SlotOutbound: cookie(t, lns[SlotOutbound]), SlotInbound: cookie(t, lns[SlotInbound])}

	const (
		pod   = "10.99.0.2"
		pod2  = "10.99.0.3"
		probe = "10.99.0.1"
		peer  = "10.1.2.3"
		ext   = "192.0.2.1"
		none  = -1 // no listener selected
	)
	cfg := Config{
		PodIPs:       []netip.Addr{netip.MustParseAddr(pod), netip.MustParseAddr(pod2)},
		ProbeSources: []netip.Addr{netip.MustParseAddr(probe)},
	}
	tcp4 := func(src, dst string, port uint32) skLookup {
		return skLookup{
			Family: unix.AF_INET, Protocol: unix.IPPROTO_TCP,
			RemoteIP4: netip.MustParseAddr(src).As4(), RemotePort: 0xd431, // 12756, network order
			LocalIP4: netip.MustParseAddr(dst).As4(), LocalPort: port,
		}
	}
	udp4 := func(src, dst string, port uint32) skLookup {
		c := tcp4(src, dst, port)
		c.Protocol = unix.IPPROTO_UDP
		return c
	}
	both := []int{SlotOutbound, SlotInbound}
	tests := []struct {
		name         string
		viaLo        bool  // arriving on lo (rather than eth0)
		unconfigured bool  // config map left empty
		empty        []int // slots left without a listener
		ctx          skLookup
		wantRet      uint32
		wantSlot     int
	}{
		// Loopback destinations are the pod's own business.
		{name: "127.0.0.1 via lo", viaLo: true, ctx: tcp4("127.0.0.1", "127.0.0.1", 8080), wantRet: skPass, wantSlot: none},
		{name: "127.1.2.3 via lo", viaLo: true, ctx: tcp4(pod, "127.1.2.3", 80), wantRet: skPass, wantSlot: none},
		{name: "127.1.2.3 via eth0", ctx: tcp4(peer, "127.1.2.3", 80), wantRet: skPass, wantSlot: none},

		// The pod's own addresses: never steered, never dropped.
		{name: "pod IP via lo, from the pod", viaLo: true, ctx: tcp4(pod, pod, 80), wantRet: skPass, wantSlot: none},
		{name: "pod IP via lo, from a client's address (ztunnel's transparent dial)", viaLo: true, ctx: tcp4(peer, pod, 8080), wantRet: skPass, wantSlot: none},
		{name: "pod IP via eth0", ctx: tcp4(peer, pod, 80), wantRet: skPass, wantSlot: none},
		{name: "second pod IP via eth0", ctx: tcp4(peer, pod2, 8080), wantRet: skPass, wantSlot: none},
		{name: "pod IP port 15008 (HBONE)", ctx: tcp4(peer, pod, 15008), wantRet: skPass, wantSlot: none},
		{name: "pod IP from a probe source", ctx: tcp4(probe, pod, 8080), wantRet: skPass, wantSlot: none},
		{name: "pod IP via eth0, both slots empty", empty: both, ctx: tcp4(peer, pod, 80), wantRet: skPass, wantSlot: none},
		{name: "pod IP via lo, both slots empty", viaLo: true, empty: both, ctx: tcp4(peer, pod, 80), wantRet: skPass, wantSlot: none},

		// Anything else arriving on lo is the pod's own outbound connection.
		{name: "non-pod dst via lo", viaLo: true, ctx: tcp4(pod, ext, 80), wantRet: skPass, wantSlot: SlotOutbound},
		{name: "non-pod dst port 15008 via lo", viaLo: true, ctx: tcp4(pod, ext, 15008), wantRet: skPass, wantSlot: SlotOutbound},
		{name: "non-pod dst via lo, inbound slot empty", viaLo: true, empty: []int{SlotInbound}, ctx: tcp4(pod, ext, 80), wantRet: skPass, wantSlot: SlotOutbound},
		{name: "non-pod dst via lo, outbound slot empty", viaLo: true, empty: []int{SlotOutbound}, ctx: tcp4(pod, ext, 80), wantRet: skDrop, wantSlot: none},
		{name: "non-pod dst via lo, both slots empty", viaLo: true, empty: both, ctx: tcp4(pod, ext, 80), wantRet: skDrop, wantSlot: none},
		{name: "non-pod dst via eth0", ctx: tcp4(peer, ext, 80), wantRet: skPass, wantSlot: none},
		{name: "non-pod dst via eth0, both slots empty", empty: both, ctx: tcp4(peer, ext, 80), wantRet: skPass, wantSlot: none},

		// Not IPv4 TCP, or not configured.
		{name: "UDP to pod IP via eth0", ctx: udp4(peer, pod, 53), wantRet: skPass, wantSlot: none},
		{name: "UDP to non-pod dst via lo", viaLo: true, ctx: udp4(pod, ext, 53), wantRet: skPass, wantSlot: none},
		{
			name:  "IPv6 via lo",
			viaLo: true,
			ctx: skLookup{
				Family: unix.AF_INET6, Protocol: unix.IPPROTO_TCP,
				RemoteIP6: netip.MustParseAddr("fd00::2").As16(), LocalIP6: netip.MustParseAddr("2001:db8::1").As16(), LocalPort: 80,
			},
			wantRet: skPass, wantSlot: none,
		},
		{name: "unconfigured, non-pod dst via lo", viaLo: true, unconfigured: true, ctx: tcp4(pod, ext, 80), wantRet: skPass, wantSlot: none},
		{name: "unconfigured, non-pod dst via lo, outbound slot empty", viaLo: true, unconfigured: true, empty: []int{SlotOutbound}, ctx: tcp4(pod, ext, 80), wantRet: skPass, wantSlot: none},
		{name: "unconfigured, pod IP via eth0", unconfigured: true, ctx: tcp4(peer, pod, 80), wantRet: skPass, wantSlot: none},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// Test runs present ingress_ifindex 0, so "via lo" rebinds
			// lo_ifindex to 0 and "via eth0" to an index that is not 0.
			lo := uint32(2)
			if tc.viaLo {
				lo = 0
			}
			c := &cfg
			if tc.unconfigured {
				c = nil
			}
			objs := loadObjectsWith(t, lo, c, lns, tc.empty)

			var got skLookup
			ret, err := objs.SteerToZtunnel.Run(&ebpf.RunOptions{Context: tc.ctx, ContextOut: &got})
			if err != nil {
				t.Fatalf("running program: %v", err)
			}
			if ret != tc.wantRet {
				t.Errorf("verdict = %d, want %d (0 drop, 1 pass)", ret, tc.wantRet)
			}
			var want uint64
			if tc.wantSlot != none {
				want = cookies[tc.wantSlot]
			}
			if got.Cookie != want {
				t.Errorf("selected socket cookie = %d, want %d (outbound %d, inbound %d, none 0)",
					got.Cookie, want, cookies[SlotOutbound], cookies[SlotInbound])
			}
		})
	}
}

// Return values of a tcx program (enum tcx_action_base): the program
// returns TCX_NEXT for what it leaves alone, TCX_DROP for a SYN it cannot
// steer (TCX_PASS after a successful assignment, which test runs cannot
// reach).
const (
	tcOK   = ^uint32(0) // TCX_NEXT, -1
	tcShot = 2          // TCX_DROP
)

// TCP flags (RFC 9293, section 3.1).
const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpPSH = 0x08
	tcpACK = 0x10
	tcpECE = 0x40
	tcpCWR = 0x80
)

// IPv4 flags and fragment offset (RFC 791, section 3.1).
const (
	ipDF = 0x4000
	ipMF = 0x2000
)

// TestInboundDecisions runs the tc program in the kernel (BPF_PROG_TEST_RUN)
// on crafted Ethernet frames through every branch of its decision table.
//
// A test run cannot show bpf_sk_assign succeeding. The helper works only at
// tc ingress (skb_at_tc_ingress, net/core/filter.c), and a test run's skb is
// not there: the helper returns -EOPNOTSUPP (seen on 6.18, with the listener
// in the netns the test run ran in or another) and the program drops the SYN
// as it does for any failed assignment. So a SYN the program steers reads
// TC_ACT_SHOT here whether its slot is filled or empty; what sets it apart
// from what the program lets through is that the rest read TC_ACT_OK.
// TestInboundTraffic covers the assignment itself on a real interface.
func TestInboundDecisions(t *testing.T) {
	requireRoot(t)
	lns := slotListeners(t)

	const (
		pod   = "10.99.0.2"
		pod2  = "10.99.0.3"
		probe = "10.99.0.1"
		peer  = "10.1.2.3"
		ext   = "192.0.2.1"
	)
	cfg := Config{
		PodIPs:       []netip.Addr{netip.MustParseAddr(pod), netip.MustParseAddr(pod2)},
		ProbeSources: []netip.Addr{netip.MustParseAddr(probe)},
	}
	syn := func(src, dst string, port uint16) frame {
		return frame{src: src, dst: dst, dport: port, flags: tcpSYN}
	}
	with := func(f frame, change func(*frame)) frame {
		change(&f)
		return f
	}
	both := []int{SlotOutbound, SlotInbound}
	tests := []struct {
		name         string
		unconfigured bool  // config map left empty
		empty        []int // slots left without a listener
		pkt          frame
		want         uint32
	}{
		// Steered: assigned to the inbound listener, which a test run
		// refuses (see above), or dropped when the slot is empty.
		{name: "SYN to the pod, port 80", pkt: syn(peer, pod, 80), want: tcShot},
		{name: "SYN to the second pod IP", pkt: syn(peer, pod2, 8080), want: tcShot},
		{name: "SYN to the pod, port 15006", pkt: syn(peer, pod, 15006), want: tcShot},
		{name: "SYN with ECE and CWR (ECN setup)", pkt: with(syn(peer, pod, 80), func(f *frame) { f.flags |= tcpECE | tcpCWR }), want: tcShot},
		{name: "SYN with DF", pkt: with(syn(peer, pod, 80), func(f *frame) { f.frag = ipDF }), want: tcShot},
		{name: "SYN in a first fragment", pkt: with(syn(peer, pod, 80), func(f *frame) { f.frag = ipMF }), want: tcShot},
		// Read at the wrong offset, the options would make the TCP
		// flags 0 and the frame pass.
		{name: "SYN after IP options", pkt: with(syn(peer, pod, 80), func(f *frame) { f.ipOptions = []byte{1, 1, 1, 0} }), want: tcShot},
		{name: "SYN to the pod, inbound slot empty", empty: []int{SlotInbound}, pkt: syn(peer, pod, 80), want: tcShot},
		{name: "SYN to the pod, both slots empty", empty: both, pkt: syn(peer, pod, 80), want: tcShot},

		// Not a new IPv4 TCP connection to the pod.
		{name: "IPv6 ethertype", pkt: with(syn(peer, pod, 80), func(f *frame) { f.ethertype = unix.ETH_P_IPV6 }), want: tcOK},
		{name: "ARP ethertype", pkt: with(syn(peer, pod, 80), func(f *frame) { f.ethertype = unix.ETH_P_ARP }), want: tcOK},
		// A test run refuses an IPv4 frame shorter than an IPv4 header
		// (EINVAL), so the short frames here are cut in the TCP header.
		{name: "no TCP header", pkt: with(syn(peer, pod, 80), func(f *frame) { f.cut = 20 }), want: tcOK},
		{name: "IHL below 5", pkt: with(syn(peer, pod, 80), func(f *frame) { f.ihl = 4 }), want: tcOK},
		{name: "UDP", pkt: with(syn(peer, pod, 80), func(f *frame) { f.proto = unix.IPPROTO_UDP }), want: tcOK},
		{name: "non-first fragment", pkt: with(syn(peer, pod, 80), func(f *frame) { f.frag = ipMF | 185 }), want: tcOK},
		{name: "last fragment", pkt: with(syn(peer, pod, 80), func(f *frame) { f.frag = 185 }), want: tcOK},
		{name: "truncated TCP header", pkt: with(syn(peer, pod, 80), func(f *frame) { f.cut = 1 }), want: tcOK},
		{name: "SYN+ACK", pkt: with(syn(peer, pod, 80), func(f *frame) { f.flags = tcpSYN | tcpACK }), want: tcOK},
		{name: "ACK", pkt: with(syn(peer, pod, 80), func(f *frame) { f.flags = tcpACK }), want: tcOK},
		{name: "PSH+ACK", pkt: with(syn(peer, pod, 80), func(f *frame) { f.flags = tcpPSH | tcpACK }), want: tcOK},
		{name: "FIN+ACK", pkt: with(syn(peer, pod, 80), func(f *frame) { f.flags = tcpFIN | tcpACK }), want: tcOK},
		{name: "RST", pkt: with(syn(peer, pod, 80), func(f *frame) { f.flags = tcpRST }), want: tcOK},
		{name: "SYN to a non-pod address", pkt: syn(peer, ext, 80), want: tcOK},
		{name: "SYN to a non-pod address, both slots empty", empty: both, pkt: syn(peer, ext, 80), want: tcOK},

		// To the pod, but reaching its listener directly.
		{name: "SYN to port 15008 (HBONE)", pkt: syn(peer, pod, 15008), want: tcOK},
		{name: "SYN to port 15008, both slots empty", empty: both, pkt: syn(peer, pod, 15008), want: tcOK},
		{name: "SYN from a probe source", pkt: syn(probe, pod, 8080), want: tcOK},
		{name: "SYN from a probe source, both slots empty", empty: both, pkt: syn(probe, pod, 8080), want: tcOK},
		{name: "unconfigured", unconfigured: true, pkt: syn(peer, pod, 80), want: tcOK},
		{name: "unconfigured, both slots empty", unconfigured: true, empty: both, pkt: syn(peer, pod, 80), want: tcOK},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := &cfg
			if tc.unconfigured {
				c = nil
			}
			objs := loadObjectsWith(t, loopbackIfindex, c, lns, tc.empty)
			ret, err := objs.InboundToZtunnel.Run(&ebpf.RunOptions{Data: tc.pkt.bytes()})
			if err != nil {
				t.Fatalf("running program: %v", err)
			}
			if ret != tc.want {
				t.Errorf("verdict = %d, want %d (0 ok, 2 shot)", ret, tc.want)
			}
		})
	}
}

// frame is an Ethernet frame holding an IPv4 TCP segment from src:40000 to
// dst:dport, for the tc program. Zero fields mean a well-formed segment.
// Checksums are left zero: the program does not read them.
type frame struct {
	ethertype uint16 // 0: IPv4
	ihl       uint8  // IPv4 header length in 32-bit words; 0: 5 + options
	ipOptions []byte // a multiple of 4 bytes
	frag      uint16 // IPv4 flags and fragment offset
	proto     uint8  // 0: TCP
	src, dst  string
	dport     uint16
	flags     uint8 // TCP flags
	cut       int   // bytes cut off the end
}

func (f frame) bytes() []byte {
	ip := make([]byte, 20, 20+len(f.ipOptions))
	ip[0] = 4<<4 | cmp.Or(f.ihl, uint8(5+len(f.ipOptions)/4))
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(f.ipOptions)+20)) // total length
	binary.BigEndian.PutUint16(ip[6:], f.frag)
	ip[8] = 64 // TTL
	ip[9] = cmp.Or(f.proto, unix.IPPROTO_TCP)
	src, dst := netip.MustParseAddr(f.src).As4(), netip.MustParseAddr(f.dst).As4()
	copy(ip[12:], src[:])
	copy(ip[16:], dst[:])
	ip = append(ip, f.ipOptions...)

	tcp := make([]byte, 20)
	binary.BigEndian.PutUint16(tcp[0:], 40000)
	binary.BigEndian.PutUint16(tcp[2:], f.dport)
	binary.BigEndian.PutUint32(tcp[4:], 1) // sequence number
	tcp[12] = 5 << 4                       // data offset
	tcp[13] = f.flags
	binary.BigEndian.PutUint16(tcp[14:], 64240) // window

	eth := make([]byte, 14) // MAC addresses left zero: not read
	binary.BigEndian.PutUint16(eth[12:], cmp.Or(f.ethertype, unix.ETH_P_IP))
	b := slices.Concat(eth, ip, tcp)
	return b[:len(b)-f.cut]
}

// slotListeners opens the two listeners that the decision tests register,
// in a netns of their own, by slot.
func slotListeners(t *testing.T) map[int]*net.TCPListener {
	t.Helper()
	nsPath := newNetns(t)
	return map[int]*net.TCPListener{
		SlotOutbound: listen(t, nsPath, "127.0.0.1:15001", true),
		SlotInbound:  listen(t, nsPath, "127.0.0.1:15006", true),
	}
}

// loadObjectsWith loads the programs with lo_ifindex rebound to lo, writes
// cfg unless it is nil, and registers the listeners in lns in their slots,
// except those in empty. The objects are closed when the test ends.
func loadObjectsWith(t *testing.T, lo uint32, cfg *Config, lns map[int]*net.TCPListener, empty []int) *redirectObjects {
	t.Helper()
	objs, err := loadObjects(lo)
	if err != nil {
		t.Fatalf("%+v", err)
	}
	t.Cleanup(func() { _ = objs.Close() })
	if cfg != nil {
		pod, probe, err := cfg.encode()
		if err != nil {
			t.Fatal(err)
		}
		if err := objs.Config.Put(uint32(0), redirectConfig{PodIp4: pod, ProbeIp4: probe}); err != nil {
			t.Fatal(err)
		}
	}
	for slot, ln := range lns {
		if slices.Contains(empty, slot) {
			continue
		}
		if err := RegisterListener(objs.Listeners, uint32(slot), ln); err != nil {
			t.Fatal(err)
		}
	}
	return objs
}

// TestAttachIdempotent checks that Attach pins both links and both maps,
// that a second Attach with the same pin directory reuses the pinned
// attachment and maps and only rewrites the config, and that the attachment
// survives closing the Redirection.
// linkProgs returns the IDs of r's sk_lookup and tcx links and of the
// programs they run.
func linkProgs(t *testing.T, r *Redirection) (links [2]link.ID, progs [2]ebpf.ProgramID) {
	t.Helper()
	for i, l := range []link.Link{r.link, r.tcx} {
		info, err := l.Info()
		if err != nil {
			t.Fatal(err)
		}
		links[i], progs[i] = info.ID, info.Program
	}
	return links, progs
}

func TestAttachIdempotent(t *testing.T) {
	requireRoot(t)
	nsPath, pinDir := podNetns(t, "10.99.0.2/32")
	a := netip.MustParseAddr

	r1, err := Attach(nsPath, pinDir, Config{PodIPs: []netip.Addr{a("10.99.0.2")}})
	if err != nil {
		t.Fatalf("%+v", err)
	}
	id1 := mapID(t, r1.SockMap())
	links1, progs1 := linkProgs(t, r1)
	if err := r1.Close(); err != nil {
		t.Fatal(err)
	}
	assertPins(t, pinDir, pinLink, pinTCX, pinConfig, pinListeners)
	assertAttachments(t, nsPath, 1)
	assertTCXPrograms(t, nsPath, "eth0", 1)

	cfg2 := Config{PodIPs: []netip.Addr{a("10.99.0.2"), a("10.99.0.3")}, ProbeSources: []netip.Addr{a("10.99.0.1")}}
	r2, err := Attach(nsPath, pinDir, cfg2)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r2.Close() })
	assertAttachments(t, nsPath, 1)
	assertTCXPrograms(t, nsPath, "eth0", 1)
	if id2 := mapID(t, r2.SockMap()); id2 != id1 {
		t.Errorf("second Attach has listener map %d, want the pinned one %d", id2, id1)
	}
	// The same links, with this build's programs swapped in (what an
	// upgraded agent does to pods enrolled by an older one).
	links2, progs2 := linkProgs(t, r2)
	if links2 != links1 {
		t.Errorf("second Attach has links %v, want the pinned %v", links2, links1)
	}
	if progs2[0] == progs1[0] || progs2[1] == progs1[1] {
		t.Errorf("second Attach kept programs %v (first %v), want them replaced", progs2, progs1)
	}
	var got redirectConfig
	if err := r2.config.Lookup(uint32(0), &got); err != nil {
		t.Fatal(err)
	}
	pod, probe, _ := cfg2.encode()
	if got.PodIp4 != pod || got.ProbeIp4 != probe {
		t.Errorf("config after second Attach = %x %x, want %x %x", got.PodIp4, got.ProbeIp4, pod, probe)
	}

	// The pin directory belongs to one netns.
	if r, err := Attach(newNetns(t), pinDir, cfg2); err == nil {
		_ = r.Close()
		t.Error("Attach of another netns with the same pin directory succeeded, want an error")
	}

	if err := Detach(pinDir); err != nil {
		t.Fatal(err)
	}
	assertAttachments(t, nsPath, 0)
	assertTCXPrograms(t, nsPath, "eth0", 0)
	if attached, err := AttachedTo(nsPath); err != nil || attached {
		t.Errorf("AttachedTo after Detach = %v, %v, want false", attached, err)
	}
}

// TestAttachedTo checks that AttachedTo reports either link on its own: a
// netns is not clean while any program of ours is attached in it.
func TestAttachedTo(t *testing.T) {
	requireRoot(t)
	tests := []struct {
		name   string
		detach string // the pin of the link detached before asking
	}{
		{name: "tcx only", detach: pinLink},
		{name: "sk_lookup only", detach: pinTCX},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			nsPath, pinDir := podNetns(t, "10.99.0.2/32")
			r, err := Attach(nsPath, pinDir, Config{PodIPs: []netip.Addr{netip.MustParseAddr("10.99.0.2")}})
			if err != nil {
				t.Fatalf("%+v", err)
			}
			if err := r.Close(); err != nil {
				t.Fatal(err)
			}
			detachPinned(t, filepath.Join(pinDir, tc.detach))

			if attached, err := AttachedTo(nsPath); err != nil || !attached {
				t.Errorf("AttachedTo = %v, %v, want true", attached, err)
			}
			if err := Detach(pinDir); err != nil {
				t.Fatalf("Detach with one link already detached: %v", err)
			}
			if attached, err := AttachedTo(nsPath); err != nil || attached {
				t.Errorf("AttachedTo after Detach = %v, %v, want false", attached, err)
			}
		})
	}
}

// TestAttachReplacesSkLookupOnlyPins checks that Attach over the pins of an
// attachment made before the tc program existed (an sk_lookup link and no
// tcx link) starts again rather than keeping an attachment without inbound
// capture.
func TestAttachReplacesSkLookupOnlyPins(t *testing.T) {
	requireRoot(t)
	nsPath, pinDir := podNetns(t, "10.99.0.2/32")
	cfg := Config{PodIPs: []netip.Addr{netip.MustParseAddr("10.99.0.2")}}

	r, err := Attach(nsPath, pinDir, cfg)
	if err != nil {
		t.Fatalf("%+v", err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	detachPinned(t, filepath.Join(pinDir, pinTCX))
	if err := os.Remove(filepath.Join(pinDir, pinTCX)); err != nil {
		t.Fatal(err)
	}
	assertTCXPrograms(t, nsPath, "eth0", 0)

	r, err = Attach(nsPath, pinDir, cfg)
	if err != nil {
		t.Fatalf("%+v", err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	assertPins(t, pinDir, pinLink, pinTCX, pinConfig, pinListeners)
	assertAttachments(t, nsPath, 1) // the old link detached, not left beside the new one
	assertTCXPrograms(t, nsPath, "eth0", 1)
}

// TestAttachWithoutPodInterface checks that Attach refuses a netns where no
// interface holds a pod address (there is nothing to attach the tc program
// to, so inbound would go uncaptured) and leaves nothing behind.
func TestAttachWithoutPodInterface(t *testing.T) {
	requireRoot(t)
	nsPath, pinDir := podNetns(t, "10.99.0.9/32")

	r, err := Attach(nsPath, pinDir, Config{PodIPs: []netip.Addr{netip.MustParseAddr("10.99.0.2")}})
	if err == nil {
		_ = r.Close()
		t.Fatal("Attach with no interface holding the pod IP succeeded, want an error")
	}
	if !strings.Contains(err.Error(), "no interface") {
		t.Errorf("Attach error = %v, want one saying no interface holds the pod's addresses", err)
	}
	if attached, err := AttachedTo(nsPath); err != nil || attached {
		t.Errorf("AttachedTo after a failed Attach = %v, %v, want false", attached, err)
	}
	assertPins(t, pinDir)
}

func TestRegisterListenerRejectsMPTCP(t *testing.T) {
	requireRoot(t)
	objs, err := loadObjects(loopbackIfindex)
	if err != nil {
		t.Fatalf("%+v", err)
	}
	t.Cleanup(func() { _ = objs.Close() })
	var lc net.ListenConfig
	lc.SetMultipathTCP(true)
	ln, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	if sockoptInt(t, ln.(*net.TCPListener), "SO_PROTOCOL", unix.SO_PROTOCOL) != unix.IPPROTO_MPTCP {
		t.Skip("MPTCP not available: Go fell back to TCP")
	}
	err = RegisterListener(objs.Listeners, SlotOutbound, ln.(*net.TCPListener))
	if err == nil || !strings.Contains(err.Error(), "SetMultipathTCP(false)") {
		t.Errorf("RegisterListener(MPTCP listener) = %v, want an error pointing at SetMultipathTCP(false)", err)
	}
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (bpf, netns): run make test as root")
	}
}

// newNetns creates a network namespace with lo up, removed when the test
// ends, and returns its path.
func newNetns(t *testing.T) string {
	t.Helper()
	_, path := netnstest.New(t, "ambit-bpftest")
	return path
}

func ipNetns(t *testing.T, nsPath string, args ...string) {
	t.Helper()
	args = append([]string{"-n", filepath.Base(nsPath)}, args...)
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// podNetns makes a netns with an interface holding addr and a pin directory
// on a private bpffs, whose attachment is detached when the test ends.
func podNetns(t *testing.T, addr string) (nsPath, pinDir string) {
	t.Helper()
	nsPath = newNetns(t)
	addPodInterface(t, nsPath, addr)
	pinDir = filepath.Join(newBPFFS(t), "pod")
	t.Cleanup(func() { _ = Detach(pinDir) })
	return nsPath, pinDir
}

// newBPFFS mounts a private bpffs for the test's pins and returns its path.
// Unmounting it releases whatever is still pinned there.
func newBPFFS(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mounting bpffs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmounting bpffs: %v", err)
		}
	})
	return dir
}

// listen opens a plain TCP (not MPTCP) listener in the netns at nsPath.
func listen(t *testing.T, nsPath, addr string, transparent bool) *net.TCPListener {
	t.Helper()
	var ln net.Listener
	err := netnsexec.RunPath(nsPath, func() error {
		lc := net.ListenConfig{}
		lc.SetMultipathTCP(false)
		if transparent {
			lc.Control = setSockopts(sockopt{unix.SOL_IP, unix.IP_TRANSPARENT, 1})
		}
		var err error
		ln, err = lc.Listen(context.Background(), "tcp4", addr)
		return err
	})
	if err != nil {
		t.Fatalf("listening on %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	return ln.(*net.TCPListener)
}

// sockopt is an integer socket option.
type sockopt struct{ level, name, value int }

// setSockopts returns a Control hook for net.ListenConfig and net.Dialer,
// which run it before binding, that sets opts on the socket.
func setSockopts(opts ...sockopt) func(network, address string, c syscall.RawConn) error {
	return func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			for _, o := range opts {
				serr = errors.Join(serr, unix.SetsockoptInt(int(fd), o.level, o.name, o.value))
			}
		})
		return errors.Join(err, serr)
	}
}

// dial opens a TCP connection from inside the netns at nsPath.
func dial(nsPath, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := netnsexec.RunPath(nsPath, func() error {
		var err error
		c, err = net.DialTimeout("tcp4", addr, timeout)
		return err
	})
	return c, err
}

// getSockopt reads a socket option of c with get, failing the test on error.
func getSockopt[T any](t *testing.T, c syscall.Conn, name string, get func(fd int) (T, error)) T {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v T
	var serr error
	if err := rc.Control(func(fd uintptr) { v, serr = get(int(fd)) }); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatalf("%s: %v", name, serr)
	}
	return v
}

// cookie returns the socket cookie (SO_COOKIE) of c, which is what a test run
// reports for the socket the program selected.
func cookie(t *testing.T, c syscall.Conn) uint64 {
	t.Helper()
	return getSockopt(t, c, "SO_COOKIE", func(fd int) (uint64, error) {
		return unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	})
}

// sockoptInt reads an int SOL_SOCKET option.
func sockoptInt(t *testing.T, c syscall.Conn, name string, opt int) int {
	t.Helper()
	return getSockopt(t, c, name, func(fd int) (int, error) { return unix.GetsockoptInt(fd, unix.SOL_SOCKET, opt) })
}

func mapID(t *testing.T, m *ebpf.Map) ebpf.MapID {
	t.Helper()
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, ok := info.ID()
	if !ok {
		t.Fatal("map info has no ID")
	}
	return id
}

func assertAttachments(t *testing.T, nsPath string, want int) {
	t.Helper()
	n, err := attachments(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	if n != want {
		t.Errorf("%d sk_lookup links attached to %s, want %d", n, nsPath, want)
	}
}

// addPodInterface gives the netns an eth0 holding addr, as in a pod. It is
// one end of a veth pair whose other end stays in the netns, because the
// dummy driver is not in every kernel (not in the lab's).
func addPodInterface(t *testing.T, nsPath, addr string) {
	t.Helper()
	ipNetns(t, nsPath, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
	ipNetns(t, nsPath, "addr", "add", addr, "dev", "eth0")
	ipNetns(t, nsPath, "link", "set", "eth0", "up")
}

// assertPins checks that pinDir holds exactly the pins named (none: empty or
// missing).
func assertPins(t *testing.T, pinDir string, want ...string) {
	t.Helper()
	entries, err := os.ReadDir(pinDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var got []string
	for _, e := range entries {
		got = append(got, e.Name())
	}
	slices.Sort(got)
	want = slices.Sorted(slices.Values(want))
	if !slices.Equal(got, want) {
		t.Errorf("pins in %s = %v, want %v", pinDir, got, want)
	}
}

// detachPinned detaches the link pinned at path and leaves the pin.
func detachPinned(t *testing.T, path string) {
	t.Helper()
	l, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close() }() // the pin keeps the (now detached) link
	if err := l.Detach(); err != nil {
		t.Fatalf("detaching %s: %v", path, err)
	}
}

// assertTCXPrograms checks how many tcx ingress programs the interface
// ifname in the netns has.
func assertTCXPrograms(t *testing.T, nsPath, ifname string, want int) {
	t.Helper()
	var n int
	err := netnsexec.RunPath(nsPath, func() error {
		// Both the name and the ifindex are resolved in the thread's netns.
		ifc, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: ifc.Index, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return err
		}
		n = len(res.Programs)
		return nil
	})
	if err != nil {
		t.Fatalf("querying tcx ingress programs of %s: %v", ifname, err)
	}
	if n != want {
		t.Errorf("%d tcx ingress programs on %s in %s, want %d", n, ifname, nsPath, want)
	}
}

// TestAttachRecreatedInterface re-attaches when the pod's interface was
// re-created: a pinned tcx link left on nothing would let inbound through.
func TestAttachRecreatedInterface(t *testing.T) {
	requireRoot(t)
	nsPath, pinDir := podNetns(t, "10.99.0.2/32")
	cfg := Config{PodIPs: []netip.Addr{netip.MustParseAddr("10.99.0.2")}}
	r, err := Attach(nsPath, pinDir, cfg)
	if err != nil {
		t.Fatal(err)
	}
	_ = r.Close()
	ipNetns(t, nsPath, "link", "del", "eth0")
	addPodInterface(t, nsPath, "10.99.0.2/32")
	r, err = Attach(nsPath, pinDir, cfg)
	if err != nil {
		t.Fatal(err)
	}
	_ = r.Close()
	assertTCXPrograms(t, nsPath, "eth0", 1)
}
