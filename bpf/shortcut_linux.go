package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/ambitmesh/ambit/internal/netnsexec"
)

// Names of the shortcut's pins in its pin directory. The sockops link is
// pinned last, so its pin marks a complete attachment.
const (
	pinSockops  = "sockops"
	pinEnrolled = "enrolled"
	pinEnds     = "ends"
	pinWaiting  = "waiting"
	pinRoute    = "route"
	pinStats    = "stats"
)

// Shortcut is the node-wide local-hop shortcut (shortcut.c): a sockops
// program on the node's root cgroup and an sk_msg program on its SOCKHASH.
// It acts on the network namespaces enrolled with Enrol. Its fds are only
// handles: the pins keep it in place after Close.
type Shortcut struct {
	sockops  link.Link
	enrolled *ebpf.Map
	ends     *ebpf.Map
	waiting  *ebpf.Map
	route    *ebpf.Map
	stats    *ebpf.Map
}

// AttachShortcut attaches the shortcut to the cgroup v2 directory
// cgroupPath (the node's root cgroup: every pod and ztunnel are below it)
// and pins it in pinDir. It is idempotent: with a pinned attachment to the
// same cgroup in pinDir it reopens it, keeps the enrolled namespaces and
// the paired sockets, and swaps this build's programs in.
func AttachShortcut(cgroupPath, pinDir string) (*Shortcut, error) {
	cgroupID, err := inode(cgroupPath)
	if err != nil {
		return nil, fmt.Errorf("reading cgroup %s: %w", cgroupPath, err)
	}
	if err := os.MkdirAll(pinDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating pin directory: %w", err)
	}
	s, err := openPinnedShortcut(pinDir, cgroupID)
	if err != nil {
		return nil, err
	}
	if s == nil {
		return attachNewShortcut(cgroupPath, pinDir)
	}
	if err := s.updatePrograms(); err != nil {
		_ = s.Close()
		return nil, err
	}
	return s, nil
}

func openPinnedShortcut(pinDir string, cgroupID uint64) (*Shortcut, error) {
	l, err := link.LoadPinnedLink(filepath.Join(pinDir, pinSockops), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("opening pinned sockops link: %w", err)
	}
	info, err := l.Info()
	if err != nil {
		_ = l.Close()
		return nil, fmt.Errorf("reading pinned sockops link info: %w", err)
	}
	if cg := info.Cgroup(); cg == nil || cg.CgroupId != cgroupID {
		// Attached elsewhere (another cgroup root) or to a cgroup that
		// is gone: start again.
		_ = l.Detach()
		_ = l.Close()
		return nil, removeShortcutPins(pinDir)
	}
	s := &Shortcut{sockops: l}
	for _, m := range []struct {
		pin string
		to  **ebpf.Map
	}{{pinEnrolled, &s.enrolled}, {pinEnds, &s.ends}, {pinWaiting, &s.waiting}, {pinRoute, &s.route}, {pinStats, &s.stats}} {
		if *m.to, err = ebpf.LoadPinnedMap(filepath.Join(pinDir, m.pin), nil); err != nil {
			_ = s.Close()
			return nil, fmt.Errorf("opening pinned map %s: %w", m.pin, err)
		}
	}
	return s, nil
}

func attachNewShortcut(cgroupPath, pinDir string) (_ *Shortcut, err error) {
	if err := removeShortcutPins(pinDir); err != nil {
		return nil, err
	}
	var objs shortcutObjects
	if err := loadShortcutObjects(&objs, nil); err != nil {
		return nil, fmt.Errorf("loading the shortcut programs: %w", err)
	}
	// The attachments hold their own references to the programs.
	defer func() { _ = objs.PairLocalEnds.Close(); _ = objs.ShortcutLocalEnds.Close() }()
	s := &Shortcut{enrolled: objs.Enrolled, ends: objs.Ends, waiting: objs.Waiting, route: objs.Route, stats: objs.Stats}
	defer func() {
		if err != nil {
			_ = s.Close()
			_ = removeShortcutPins(pinDir)
		}
	}()
	for pin, m := range map[string]*ebpf.Map{pinEnrolled: s.enrolled, pinEnds: s.ends, pinWaiting: s.waiting, pinRoute: s.route, pinStats: s.stats} {
		if err := m.Pin(filepath.Join(pinDir, pin)); err != nil {
			return nil, fmt.Errorf("pinning map %s: %w", pin, err)
		}
	}
	// The sk_msg program stays attached to the SOCKHASH for as long as
	// the map lives (its pin keeps it).
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{Target: s.ends.FD(), Program: objs.ShortcutLocalEnds, Attach: ebpf.AttachSkMsgVerdict}); err != nil {
		return nil, fmt.Errorf("attaching sk_msg to the SOCKHASH: %w", err)
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupPath, Attach: ebpf.AttachCGroupSockOps, Program: objs.PairLocalEnds})
	if err != nil {
		return nil, fmt.Errorf("attaching sockops to cgroup %s: %w", cgroupPath, err)
	}
	s.sockops = l
	if err := l.Pin(filepath.Join(pinDir, pinSockops)); err != nil {
		return nil, fmt.Errorf("pinning sockops link: %w", err)
	}
	return s, nil
}

// updatePrograms loads this build's programs against the pinned maps and
// swaps them in: the sockops link atomically, the sk_msg program for the
// sockets paired from now on (a paired socket keeps the program it was
// paired with).
func (s *Shortcut) updatePrograms() error {
	spec, err := loadShortcut()
	if err != nil {
		return err
	}
	var progs shortcutPrograms
	opts := &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{
		"enrolled": s.enrolled, "ends": s.ends, "waiting": s.waiting, "route": s.route, "stats": s.stats,
	}}
	if err := spec.LoadAndAssign(&progs, opts); err != nil {
		return fmt.Errorf("loading the shortcut programs: %w", err)
	}
	defer func() { _ = progs.Close() }()
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{Target: s.ends.FD(), Program: progs.ShortcutLocalEnds, Attach: ebpf.AttachSkMsgVerdict}); err != nil {
		return fmt.Errorf("attaching sk_msg to the SOCKHASH: %w", err)
	}
	if err := s.sockops.Update(progs.PairLocalEnds); err != nil {
		return fmt.Errorf("updating the sockops link: %w", err)
	}
	return nil
}

// Enrol makes the shortcut act on the network namespace at netnsPath, a
// pod with the addresses podIPs (IPv4 only are used, at most four). It
// returns the namespace's cookie, which Forget takes.
func (s *Shortcut) Enrol(netnsPath string, podIPs []netip.Addr) (uint64, error) {
	ips, n, err := ipv4Slots(podIPs)
	if err != nil {
		return 0, fmt.Errorf("pod IPs: %w", err)
	}
	if n == 0 {
		return 0, errors.New("pod IPs: no IPv4 address")
	}
	cookie, err := NetnsCookie(netnsPath)
	if err != nil {
		return 0, err
	}
	if err := s.enrolled.Put(cookie, shortcutPod{Ip4: ips}); err != nil {
		return 0, fmt.Errorf("enrolling netns %s: %w", netnsPath, err)
	}
	return cookie, nil
}

// Forget stops the shortcut for connections established from now on in
// the namespace with this cookie. A missing entry is not an error.
func (s *Shortcut) Forget(cookie uint64) error {
	if err := s.enrolled.Delete(cookie); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("forgetting netns cookie %d: %w", cookie, err)
	}
	return nil
}

// Enrolled returns the cookies of the enrolled namespaces.
func (s *Shortcut) Enrolled() ([]uint64, error) {
	var (
		cookies []uint64
		cookie  uint64
		pod     shortcutPod
	)
	it := s.enrolled.Iterate()
	for it.Next(&cookie, &pod) {
		cookies = append(cookies, cookie)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("listing enrolled namespaces: %w", err)
	}
	return cookies, nil
}

// ShortcutStats counts, since the shortcut was attached, the sends that
// took the shortcut, those that went over TCP, and the sockets paired.
type ShortcutStats struct {
	Shortcut, TCP, Paired uint64
}

// Stats sums the per-CPU counters.
func (s *Shortcut) Stats() (ShortcutStats, error) {
	var st ShortcutStats
	for key, to := range map[uint32]*uint64{0: &st.Shortcut, 1: &st.TCP, 2: &st.Paired} {
		var perCPU []uint64
		if err := s.stats.Lookup(key, &perCPU); err != nil {
			return st, fmt.Errorf("reading shortcut stats: %w", err)
		}
		for _, n := range perCPU {
			*to += n
		}
	}
	return st, nil
}

// Close closes the fds; the pins keep the shortcut in place.
func (s *Shortcut) Close() error {
	var err error
	if s.sockops != nil {
		err = s.sockops.Close()
	}
	return errors.Join(err, s.enrolled.Close(), s.ends.Close(), s.waiting.Close(), s.route.Close(), s.stats.Close())
}

// DetachShortcut detaches the shortcut pinned in pinDir and removes its
// pins. Sockets already paired keep their shortcut until they close. A
// missing pinDir is not an error.
func DetachShortcut(pinDir string) error {
	l, err := link.LoadPinnedLink(filepath.Join(pinDir, pinSockops), nil)
	switch {
	case err == nil:
		err = l.Detach()
		_ = l.Close()
		if err != nil {
			return fmt.Errorf("detaching the sockops link pinned in %s: %w", pinDir, err)
		}
	case !errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("opening pinned sockops link: %w", err)
	}
	if err := removeShortcutPins(pinDir); err != nil {
		return err
	}
	if err := os.Remove(pinDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing pin directory: %w", err)
	}
	return nil
}

func removeShortcutPins(pinDir string) error {
	for _, name := range []string{pinSockops, pinEnrolled, pinEnds, pinWaiting, pinRoute, pinStats} {
		if err := os.Remove(filepath.Join(pinDir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("removing pin: %w", err)
		}
	}
	return nil
}

// NetnsCookie returns the cookie of the network namespace at netnsPath
// (SO_NETNS_COOKIE of a socket made in it), which BPF programs see as
// bpf_get_netns_cookie.
func NetnsCookie(netnsPath string) (uint64, error) {
	var cookie uint64
	err := netnsexec.RunPath(netnsPath, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer func() { _ = unix.Close(fd) }()
		v, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		cookie = v
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("reading the cookie of netns %s: %w", netnsPath, err)
	}
	return cookie, nil
}

func inode(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}
