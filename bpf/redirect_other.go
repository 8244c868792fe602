//go:build !linux

package bpf

import (
	"syscall"

	"github.com/cilium/ebpf"
)

// Redirection is the sk_lookup program attached to one pod's network
// namespace; on this system it cannot exist.
type Redirection struct{}

// Attach returns ErrNotSupported.
func Attach(netnsPath, pinDir string, cfg Config) (*Redirection, error) {
	return nil, ErrNotSupported
}

// SockMap returns nil.
func (r *Redirection) SockMap() *ebpf.Map { return nil }

// Close does nothing.
func (r *Redirection) Close() error { return nil }

// Detach returns ErrNotSupported.
func Detach(pinDir string) error { return ErrNotSupported }

// AttachedTo returns ErrNotSupported.
func AttachedTo(netnsPath string) (bool, error) { return false, ErrNotSupported }

// RegisterListener returns ErrNotSupported.
func RegisterListener(m *ebpf.Map, slot uint32, ln syscall.Conn) error {
	return ErrNotSupported
}

// ConnectionKeeper marks a namespace's connections; on this system it
// cannot exist.
type ConnectionKeeper struct{}

// NewConnectionKeeper returns ErrNotSupported.
func NewConnectionKeeper(mark uint32) (*ConnectionKeeper, error) { return nil, ErrNotSupported }

// Keep returns ErrNotSupported.
func (*ConnectionKeeper) Keep(netnsPath string) (int, error) { return 0, ErrNotSupported }

// KeepStragglers returns ErrNotSupported.
func (*ConnectionKeeper) KeepStragglers(netnsPath string) (int, error) { return 0, ErrNotSupported }

// Close does nothing.
func (*ConnectionKeeper) Close() error { return nil }
