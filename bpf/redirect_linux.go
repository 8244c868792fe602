package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/ambitmesh/ambit/internal/netnsexec"
)

// Names of the pins in a pin directory. The link is pinned last, so its pin
// marks a complete attachment.
const (
	pinLink      = "link"
	pinTCX       = "tcx"
	pinConfig    = "config"
	pinListeners = "listeners"
)

// loopbackIfindex is the ifindex of lo in every network namespace
// (LOOPBACK_IFINDEX, include/net/flow.h).
const loopbackIfindex = 1

// Redirection is the programs attached in one pod's network namespace (the
// sk_lookup program to the namespace, the tc program to the pod's
// interface), with their maps. Its fds are only handles: the pins keep the
// attachment in place after Close.
type Redirection struct {
	link      link.Link // sk_lookup
	tcx       link.Link // tcx ingress on the pod's interface
	config    *ebpf.Map
	listeners *ebpf.Map
}

// Attach sets up redirection in the netns at netnsPath (a path like
// /proc/<pid>/ns/net or /run/netns/x): it loads the program and maps, writes
// cfg, attaches the sk_lookup link to the netns, and pins the link and both
// maps in pinDir (a directory on a bpffs, created if missing), so that
// redirection survives the caller exiting and the node agent can restart
// without opening a window.
//
// Attach is idempotent: if pinDir already holds a pinned link for the netns,
// it reopens the pinned link and maps and only rewrites the config. Until a
// listener is registered in a slot, connections steered to that slot are
// dropped (the client retries), never passed through.
func Attach(netnsPath, pinDir string, cfg Config) (*Redirection, error) {
	pod, probe, err := cfg.encode()
	if err != nil {
		return nil, err
	}
	val := redirectConfig{PodIp4: pod, ProbeIp4: probe}
	ino, err := netnsInode(netnsPath)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(pinDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating pin directory: %w", err)
	}

	r, err := openPinned(pinDir, ino)
	if err != nil {
		return nil, err
	}
	if r != nil && !r.tcxOn(netnsPath, pod) {
		// The pod's interface was re-created or the address moved: a
		// tcx link left on nothing would let inbound through. Start
		// again.
		_ = r.Close()
		if err := Detach(pinDir); err != nil {
			return nil, err
		}
		if err := os.MkdirAll(pinDir, 0o700); err != nil {
			return nil, fmt.Errorf("creating pin directory: %w", err)
		}
		r = nil
	}
	if r == nil {
		return attachNew(netnsPath, pinDir, val)
	}
	if err := r.config.Put(uint32(0), val); err != nil {
		_ = r.Close()
		return nil, fmt.Errorf("writing config: %w", err)
	}
	if err := r.updatePrograms(loopbackIfindex); err != nil {
		_ = r.Close()
		return nil, err
	}
	return r, nil
}

// updatePrograms loads this build's programs against the pinned maps and
// swaps them into the pinned links, atomically (bpf_link_update): an
// upgraded node agent's fixes reach pods enrolled by an older one, with no
// moment without redirection.
func (r *Redirection) updatePrograms(loIfindex uint32) error {
	spec, err := loadRedirect()
	if err != nil {
		return err
	}
	if err := spec.Variables[redirectVarLoIfindex].Set(loIfindex); err != nil {
		return fmt.Errorf("setting lo_ifindex: %w", err)
	}
	var progs redirectPrograms
	opts := &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{"config": r.config, "listeners": r.listeners}}
	if err := spec.LoadAndAssign(&progs, opts); err != nil {
		return fmt.Errorf("loading the programs: %w", err)
	}
	defer func() { _ = progs.Close() }() // the links hold them
	if err := r.link.Update(progs.SteerToZtunnel); err != nil {
		return fmt.Errorf("updating the sk_lookup link: %w", err)
	}
	if err := r.tcx.Update(progs.InboundToZtunnel); err != nil {
		return fmt.Errorf("updating the tcx link: %w", err)
	}
	return nil
}

// tcxOn reports whether r's tcx link is attached to the interface that
// holds the pod's address.
func (r *Redirection) tcxOn(netnsPath string, pod [maxAddrs]uint32) bool {
	info, err := r.tcx.Info()
	if err != nil || info.TCX() == nil {
		return false
	}
	ifindex, err := podInterface(netnsPath, pod)
	return err == nil && info.TCX().Ifindex != 0 && int(info.TCX().Ifindex) == ifindex
}

// openPinned reopens the redirection pinned in pinDir. It returns nil and no
// error if there is none to reuse: no pinned link, or a stale one whose netns
// is gone (whose pins it removes).
func openPinned(pinDir string, ino uint64) (*Redirection, error) {
	l, err := link.LoadPinnedLink(filepath.Join(pinDir, pinLink), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("opening pinned link: %w", err)
	}
	info, err := l.Info()
	if err != nil {
		_ = l.Close()
		return nil, fmt.Errorf("reading pinned link info: %w", err)
	}
	var attachedTo uint64
	if ns := info.NetNs(); ns != nil {
		attachedTo = uint64(ns.NetnsInode)
	}
	switch attachedTo {
	case ino:
	case 0: // the netns it was attached to is gone
		_ = l.Close()
		return nil, removePins(pinDir)
	default:
		_ = l.Close()
		return nil, fmt.Errorf("%s holds a link for another network namespace (inode %d): detach it first", pinDir, attachedTo)
	}

	r := &Redirection{link: l}
	if r.tcx, err = link.LoadPinnedLink(filepath.Join(pinDir, pinTCX), nil); err != nil {
		// An attachment from before the tc program: start again.
		_ = l.Detach()
		_ = r.Close()
		return nil, removePins(pinDir)
	}
	if r.config, err = ebpf.LoadPinnedMap(filepath.Join(pinDir, pinConfig), nil); err != nil {
		_ = r.Close()
		return nil, fmt.Errorf("opening pinned config map: %w", err)
	}
	if r.listeners, err = ebpf.LoadPinnedMap(filepath.Join(pinDir, pinListeners), nil); err != nil {
		_ = r.Close()
		return nil, fmt.Errorf("opening pinned listener map: %w", err)
	}
	return r, nil
}

func attachNew(netnsPath, pinDir string, val redirectConfig) (_ *Redirection, err error) {
	// Pins of an attachment that failed halfway would make Pin fail.
	if err := removePins(pinDir); err != nil {
		return nil, err
	}
	objs, err := loadObjects(loopbackIfindex)
	if err != nil {
		return nil, err
	}
	// The link holds its own reference to the program; the Redirection
	// holds the maps. Closing an fd we own cannot fail in a way to act on.
	defer func() { _ = objs.SteerToZtunnel.Close(); _ = objs.InboundToZtunnel.Close() }()
	r := &Redirection{config: objs.Config, listeners: objs.Listeners}
	defer func() {
		if err != nil {
			_ = r.Close()
			_ = removePins(pinDir)
		}
	}()

	// Configure before attaching, so that the first connection after the
	// attachment is already steered.
	if err := r.config.Put(uint32(0), val); err != nil {
		return nil, fmt.Errorf("writing config: %w", err)
	}
	if err := r.config.Pin(filepath.Join(pinDir, pinConfig)); err != nil {
		return nil, fmt.Errorf("pinning config map: %w", err)
	}
	if err := r.listeners.Pin(filepath.Join(pinDir, pinListeners)); err != nil {
		return nil, fmt.Errorf("pinning listener map: %w", err)
	}

	ifindex, err := podInterface(netnsPath, val.PodIp4)
	if err != nil {
		return nil, err
	}
	err = netnsexec.RunPath(netnsPath, func() error {
		// The ifindex is resolved in the calling thread's namespace.
		l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: objs.InboundToZtunnel, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return fmt.Errorf("attaching tcx ingress to interface %d in %s: %w", ifindex, netnsPath, err)
		}
		r.tcx = l
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := r.tcx.Pin(filepath.Join(pinDir, pinTCX)); err != nil {
		return nil, fmt.Errorf("pinning tcx link: %w", err)
	}

	ns, err := os.Open(netnsPath)
	if err != nil {
		return nil, fmt.Errorf("opening netns: %w", err)
	}
	defer func() { _ = ns.Close() }() // read-only, nothing to flush
	l, err := link.AttachNetNs(int(ns.Fd()), objs.SteerToZtunnel)
	if err != nil {
		return nil, fmt.Errorf("attaching sk_lookup to %s: %w", netnsPath, err)
	}
	r.link = l
	if err := l.Pin(filepath.Join(pinDir, pinLink)); err != nil {
		return nil, fmt.Errorf("pinning link: %w", err)
	}
	return r, nil
}

// loadObjects loads the program and its maps, with lo_ifindex set to
// loIfindex (the tests rebind it; see redirect.c).
func loadObjects(loIfindex uint32) (*redirectObjects, error) {
	spec, err := loadRedirect()
	if err != nil {
		return nil, err
	}
	if err := spec.Variables[redirectVarLoIfindex].Set(loIfindex); err != nil {
		return nil, fmt.Errorf("setting lo_ifindex: %w", err)
	}
	var objs redirectObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		return nil, fmt.Errorf("loading sk_lookup program: %w", err)
	}
	return &objs, nil
}

// SockMap returns the SOCKMAP that ztunnel registers its listeners in (see
// RegisterListener); pass its FD to ztunnel. It stays owned by r.
func (r *Redirection) SockMap() *ebpf.Map {
	return r.listeners
}

// Close closes the fds. The pins keep the attachment and the maps in place;
// Detach removes them.
func (r *Redirection) Close() error {
	var err error
	if r.link != nil {
		err = r.link.Close()
	}
	if r.tcx != nil {
		err = errors.Join(err, r.tcx.Close())
	}
	// Map.Close accepts nil.
	return errors.Join(err, r.config.Close(), r.listeners.Close())
}

// Detach detaches the link pinned in pinDir and removes the pins and the
// directory. The link is detached explicitly rather than left to the last
// reference going away: a removed pin is released asynchronously (after an
// RCU grace period), and anything still holding the link (a Redirection not
// yet closed) would keep redirecting. A missing pinDir is not an error.
func Detach(pinDir string) error {
	for _, pin := range []string{pinLink, pinTCX} {
		l, err := link.LoadPinnedLink(filepath.Join(pinDir, pin), nil)
		switch {
		case err == nil:
			err = l.Detach()
			_ = l.Close()
			if err != nil && !errors.Is(err, link.ErrNotSupported) {
				return fmt.Errorf("detaching link pinned in %s: %w", pinDir, err)
			}
		case !errors.Is(err, os.ErrNotExist):
			return fmt.Errorf("opening pinned link: %w", err)
		}
	}
	if err := removePins(pinDir); err != nil {
		return err
	}
	if err := os.Remove(pinDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing pin directory: %w", err)
	}
	return nil
}

func removePins(pinDir string) error {
	for _, name := range []string{pinLink, pinTCX, pinConfig, pinListeners} {
		if err := os.Remove(filepath.Join(pinDir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("removing pin: %w", err)
		}
	}
	return nil
}

// AttachedTo reports whether any sk_lookup link is attached to the netns at
// netnsPath, or any tcx ingress program to one of its interfaces.
func AttachedTo(netnsPath string) (bool, error) {
	n, err := attachments(netnsPath)
	if err != nil || n > 0 {
		return n > 0, err
	}
	return tcxAttached(netnsPath)
}

// tcxAttached reports whether an interface in the netns has a tcx ingress
// program.
func tcxAttached(netnsPath string) (bool, error) {
	found := false
	err := netnsexec.RunPath(netnsPath, func() error {
		links, err := netlink.LinkList()
		if err != nil {
			return fmt.Errorf("listing interfaces in %s: %w", netnsPath, err)
		}
		for _, l := range links {
			res, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: ebpf.AttachTCXIngress})
			if err != nil {
				return fmt.Errorf("querying tcx programs of %s in %s: %w", l.Attrs().Name, netnsPath, err)
			}
			if len(res.Programs) > 0 {
				found = true
			}
		}
		return nil
	})
	return found, err
}

// podInterface returns the index of the interface that holds one of the
// pod's addresses in its namespace.
func podInterface(netnsPath string, pod [maxAddrs]uint32) (int, error) {
	ns, err := netns.GetFromPath(netnsPath)
	if err != nil {
		return 0, fmt.Errorf("opening netns %s: %w", netnsPath, err)
	}
	defer func() { _ = ns.Close() }()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return 0, fmt.Errorf("netlink in %s: %w", netnsPath, err)
	}
	defer h.Close()
	addrs, err := h.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return 0, fmt.Errorf("listing addresses in %s: %w", netnsPath, err)
	}
	for _, a := range addrs {
		ip4 := a.IP.To4()
		if ip4 == nil {
			continue
		}
		v := binary.NativeEndian.Uint32(ip4) // as the config holds it: network order in memory
		if slices.Contains(pod[:], v) && v != 0 {
			return a.LinkIndex, nil
		}
	}
	return 0, fmt.Errorf("no interface in %s holds the pod's addresses", netnsPath)
}

// attachments counts the sk_lookup links attached to the netns at netnsPath,
// matching the netns inode that link info reports (0 once detached).
func attachments(netnsPath string) (int, error) {
	ino, err := netnsInode(netnsPath)
	if err != nil {
		return 0, err
	}
	var it link.Iterator
	defer it.Close()
	n := 0
	for it.Next() {
		info, err := it.Link.Info()
		if err != nil {
			return 0, fmt.Errorf("reading info of link %d: %w", it.ID, err)
		}
		ns := info.NetNs()
		if info.Type == link.NetNsType && ns != nil &&
			ebpf.AttachType(ns.AttachType) == ebpf.AttachSkLookup && uint64(ns.NetnsInode) == ino {
			n++
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("listing links: %w", err)
	}
	return n, nil
}

func netnsInode(netnsPath string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(netnsPath, &st); err != nil {
		return 0, fmt.Errorf("reading netns %s: %w", netnsPath, err)
	}
	return st.Ino, nil
}

// RegisterListener puts a listening socket into slot of the SOCKMAP m
// (ztunnel calls it with the map it received over a unix socket and its
// listener); the map entry goes away when the socket is closed. The socket
// must be plain TCP, not MPTCP (ListenConfig.SetMultipathTCP(false)), and in
// the pod's netns; the outbound listener also needs IP_TRANSPARENT, because
// its accepted sockets have the original, non-local destination as their
// local address.
func RegisterListener(m *ebpf.Map, slot uint32, ln syscall.Conn) error {
	if slot != SlotOutbound && slot != SlotInbound {
		return fmt.Errorf("registering listener: invalid slot %d", slot)
	}
	rc, err := ln.SyscallConn()
	if err != nil {
		return fmt.Errorf("registering listener: %w", err)
	}
	var uerr error
	if err := rc.Control(func(fd uintptr) {
		uerr = m.Update(slot, uint64(fd), ebpf.UpdateAny)
	}); err != nil {
		return fmt.Errorf("registering listener: %w", err)
	}
	if errors.Is(uerr, unix.EOPNOTSUPP) {
		return fmt.Errorf("registering listener in slot %d: %w (a SOCKMAP takes listening TCP sockets only: is it MPTCP? use ListenConfig.SetMultipathTCP(false))", slot, uerr)
	}
	if uerr != nil {
		return fmt.Errorf("registering listener in slot %d: %w", slot, uerr)
	}
	return nil
}
