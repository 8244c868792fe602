package bpf

import (
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/cilium/ebpf/link"

	"github.com/ambitmesh/ambit/internal/netnsexec"
)

// ConnectionKeeper puts a mark on every TCP connection that exists in a
// network namespace (keep.c). Listening sockets and sockets not yet
// connected are left alone: what they bring later is new. The node agent
// runs it with ztunnel's mark in a pod's namespace just before it installs
// the capture routing, which sends that mark to the main table, so that
// the connections the pod had before it was enrolled keep going instead of
// being reset.
//
// Loading the program (its CO-RE relocation against the kernel's BTF) takes
// a while; running it takes about a millisecond, so load it once and Keep
// per pod, then KeepStragglers once the routing is in.
type ConnectionKeeper struct {
	mu   sync.Mutex // one run at a time: the count is one variable
	objs keepObjects
	it   *link.Iter
}

// NewConnectionKeeper loads the program with mark.
func NewConnectionKeeper(mark uint32) (*ConnectionKeeper, error) {
	spec, err := loadKeep()
	if err != nil {
		return nil, err
	}
	if err := spec.Variables[keepVarMark].Set(mark); err != nil {
		return nil, fmt.Errorf("setting the mark: %w", err)
	}
	k := &ConnectionKeeper{}
	if err := spec.LoadAndAssign(&k.objs, nil); err != nil {
		return nil, fmt.Errorf("loading the connection marker: %w", err)
	}
	if k.it, err = link.AttachIter(link.IterOptions{Program: k.objs.MarkConnections}); err != nil {
		_ = k.objs.Close()
		return nil, fmt.Errorf("attaching the TCP socket iterator: %w", err)
	}
	return k, nil
}

// Keep marks the connections in the network namespace at netnsPath that
// carry no mark and returns how many it marked.
func (k *ConnectionKeeper) Keep(netnsPath string) (int, error) {
	return k.run(netnsPath, false)
}

// KeepStragglers marks, after the capture routing went in, the connections
// without a mark that the routing does not send through lo: those opened
// between Keep and the routing, whose SYN left uncaptured. Connections
// opened since are routed through lo, to ztunnel, and left captured.
func (k *ConnectionKeeper) KeepStragglers(netnsPath string) (int, error) {
	return k.run(netnsPath, true)
}

func (k *ConnectionKeeper) run(netnsPath string, stragglers bool) (int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var flag uint32
	if stragglers {
		flag = 1
	}
	if err := errors.Join(k.objs.Marked.Set(uint32(0)), k.objs.Stragglers.Set(flag)); err != nil {
		return 0, fmt.Errorf("setting up the run: %w", err)
	}
	// An iterator walks the sockets of the namespace it is opened in.
	err := netnsexec.RunPath(netnsPath, func() error {
		rd, err := k.it.Open()
		if err != nil {
			return err
		}
		defer func() { _ = rd.Close() }()
		_, err = io.Copy(io.Discard, rd) // runs the program over every socket
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("marking the connections in %s: %w", netnsPath, err)
	}
	var n uint32
	if err := k.objs.Marked.Get(&n); err != nil {
		return 0, fmt.Errorf("reading the count of marked connections: %w", err)
	}
	return int(n), nil
}

// Close unloads the program.
func (k *ConnectionKeeper) Close() error {
	return errors.Join(k.it.Close(), k.objs.Close())
}
