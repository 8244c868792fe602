package state

import (
	"maps"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"

	"google.golang.org/protobuf/proto"

	"github.com/ambitmesh/ambit/api/workloadapi"
	"github.com/ambitmesh/ambit/api/workloadapi/security"
)

// Store holds ztunnel's configuration. The zero value is not usable; call
// New. All methods are safe for concurrent use.
type Store struct {
	// mu serializes writers. Readers never take it.
	mu      sync.Mutex
	current atomic.Pointer[View]

	subsMu  sync.Mutex
	subs    []subscriber
	nextSub uint64
}

type subscriber struct {
	id uint64
	fn func(Change)
}

// Change describes what one Apply call changed. Names are resource names
// (a workload's UID, a service's "namespace/hostname", a policy's
// "namespace/name"), sorted. An upsert whose content equals what the store
// already holds is not a change and is not listed.
type Change struct {
	AddressesUpserted      []string
	AddressesRemoved       []string
	AuthorizationsUpserted []string
	AuthorizationsRemoved  []string
	// View is the configuration after the change.
	View *View
}

// New returns an empty store.
func New() *Store {
	s := &Store{}
	s.current.Store(newView(nil, nil))
	return s
}

// View returns the current configuration. It never changes once returned:
// use one View for all the lookups of one decision so that they agree.
func (s *Store) View() *View { return s.current.Load() }

// WorkloadByIP returns the workload that owns ip, or nil. See View.WorkloadByIP.
func (s *Store) WorkloadByIP(ip netip.Addr) *workloadapi.Workload {
	return s.current.Load().WorkloadByIP(ip)
}

// WorkloadByUID returns the workload with that UID, or nil.
func (s *Store) WorkloadByUID(uid string) *workloadapi.Workload {
	return s.current.Load().WorkloadByUID(uid)
}

// ServiceByVIP returns the service reached at dst, or nil. See View.ServiceByVIP.
func (s *Store) ServiceByVIP(dst netip.AddrPort) *workloadapi.Service {
	return s.current.Load().ServiceByVIP(dst)
}

// Endpoints returns the healthy workloads backing svc. See View.Endpoints.
func (s *Store) Endpoints(svc *workloadapi.Service) []*workloadapi.Workload {
	return s.current.Load().Endpoints(svc)
}

// Authorizations returns every policy by resource name. See View.Authorizations.
func (s *Store) Authorizations() map[string]*security.Authorization {
	return s.current.Load().Authorizations()
}

// Dump returns the current configuration in a form for the admin config
// dump. See View.Dump.
func (s *Store) Dump() Dump { return s.current.Load().Dump() }

// ApplyAddresses removes the named Address resources and then inserts or
// replaces the given ones, keyed by resource name, and publishes the result
// as one new View. Nil entries and Addresses with neither a workload nor a
// service are ignored: the xDS client rejects those before they get here.
//
// The store keeps the messages it is given; the caller must not modify them
// afterwards.
func (s *Store) ApplyAddresses(upserts map[string]*workloadapi.Address, removals []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.current.Load()
	next, upserted, removed := applyDelta(old.addresses, upserts, removals, func(a *workloadapi.Address) bool {
		return a != nil && a.GetType() != nil
	})
	if len(upserted) == 0 && len(removed) == 0 {
		return
	}
	v := newView(next, old.authorizations)
	s.publish(v, Change{AddressesUpserted: upserted, AddressesRemoved: removed, View: v})
}

// ApplyAuthorizations removes the named policies and then inserts or
// replaces the given ones, keyed by resource name ("namespace/name", the key
// workloads list in authorization_policies), and publishes the result as one
// new View. Nil entries are ignored. The store keeps the messages it is
// given; the caller must not modify them afterwards.
func (s *Store) ApplyAuthorizations(upserts map[string]*security.Authorization, removals []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.current.Load()
	next, upserted, removed := applyDelta(old.authorizations, upserts, removals, func(a *security.Authorization) bool {
		return a != nil
	})
	if len(upserted) == 0 && len(removed) == 0 {
		return
	}
	v := old.withAuthorizations(next)
	s.publish(v, Change{AuthorizationsUpserted: upserted, AuthorizationsRemoved: removed, View: v})
}

// Subscribe calls fn after every change, in order, on the goroutine that
// applied it, after the new View is published. fn must be quick and must not
// call ApplyAddresses or ApplyAuthorizations (the write lock is held);
// lookups, Subscribe and cancel are fine. cancel stops the calls; it is
// idempotent.
func (s *Store) Subscribe(fn func(Change)) (cancel func()) {
	s.subsMu.Lock()
	defer s.subsMu.Unlock()
	s.nextSub++
	id := s.nextSub
	s.subs = append(s.subs, subscriber{id: id, fn: fn})
	return func() {
		s.subsMu.Lock()
		defer s.subsMu.Unlock()
		s.subs = slices.DeleteFunc(s.subs, func(sub subscriber) bool { return sub.id == id })
	}
}

// publish must be called with s.mu held.
func (s *Store) publish(v *View, ch Change) {
	s.current.Store(v)
	s.subsMu.Lock()
	subs := slices.Clone(s.subs)
	s.subsMu.Unlock()
	for _, sub := range subs {
		sub.fn(ch)
	}
}

// applyDelta returns a copy of cur with removals and then upserts applied,
// and the names that actually changed. It returns cur itself when nothing
// changed.
func applyDelta[T proto.Message](cur map[string]T, upserts map[string]T, removals []string, valid func(T) bool) (next map[string]T, upserted, removed []string) {
	next = cur
	cloned := false
	clone := func() {
		if !cloned {
			next = maps.Clone(cur)
			if next == nil {
				next = make(map[string]T, len(upserts))
			}
			cloned = true
		}
	}
	for _, name := range removals {
		if _, ok := next[name]; ok {
			clone()
			delete(next, name)
			removed = append(removed, name)
		}
	}
	for name, m := range upserts {
		if !valid(m) {
			continue
		}
		if old, ok := next[name]; ok && proto.Equal(old, m) {
			continue
		}
		clone()
		next[name] = m
		upserted = append(upserted, name)
	}
	slices.Sort(upserted)
	slices.Sort(removed)
	return next, upserted, removed
}
