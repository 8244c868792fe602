package identity

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ErrClosed is returned by a Manager after Close.
var ErrClosed = errors.New("identity manager closed")

// State is where an identity's certificate stands, as the admin config
// dump shows it.
type State string

const (
	// StateInitializing: the first request to the CA is in flight.
	StateInitializing State = "Initializing"
	// StateAvailable: a valid certificate is held (a renewal may be
	// failing; see CertInfo.Error).
	StateAvailable State = "Available"
	// StateUnavailable: no valid certificate; requests are retried with
	// back-off.
	StateUnavailable State = "Unavailable"
)

// CertInfo describes one identity's certificate for the admin config dump.
type CertInfo struct {
	Identity  string    `json:"identity"`
	State     State     `json:"state"`
	Serial    string    `json:"serial,omitempty"` // hex
	NotBefore time.Time `json:"notBefore,omitzero"`
	NotAfter  time.Time `json:"notAfter,omitzero"`
	// NextRequest is when the CA will next be asked: half-life renewal or
	// a retry.
	NextRequest time.Time `json:"nextRequest,omitzero"`
	// Error is the last failed request's, until one succeeds.
	Error string `json:"error,omitempty"`
}

// Manager holds one certificate per workload identity. It is safe for
// concurrent use.
type Manager struct {
	opts   Options
	td     spiffeid.TrustDomain
	client *Client
	log    *slog.Logger
	clock  Clock

	ctx    context.Context // cancelled by Close: ends in-flight requests
	cancel context.CancelFunc
	wg     sync.WaitGroup // in-flight requests

	mu      sync.Mutex
	closed  bool
	entries map[spiffeid.ID]*entry

	// bundle is the trust bundle, rebuilt whenever a certificate arrives or
	// an identity is forgotten; handshakes read it without the lock.
	bundle atomic.Pointer[x509bundle.Bundle]
}

// entry is one identity. Guarded by Manager.mu.
type entry struct {
	id        spiffeid.ID
	cur       *Issued // the newest certificate; nil until the first arrives
	inflight  *flight // the request in progress, if any
	timer     Timer   // the next renewal or retry
	timerGen  uint64  // tells a stale timer's call from the current one's
	next      time.Time
	failures  int   // consecutive
	lastErr   error // of the last request, nil after a success
	forgotten bool
}

// flight is one request to the CA that concurrent callers wait on.
type flight struct {
	done   chan struct{}
	issued *Issued
	err    error
}

// NewManager returns a Manager asking the CA at opts.CAAddr. Close it to
// stop renewals.
func NewManager(opts Options) (*Manager, error) {
	opts, td, err := opts.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("configuring identity manager: %w", err)
	}
	client, err := NewClient(opts)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{
		opts:    opts,
		td:      td,
		client:  client,
		log:     opts.Log,
		clock:   opts.Clock,
		ctx:     ctx,
		cancel:  cancel,
		entries: map[spiffeid.ID]*entry{},
	}
	m.rebuildBundleLocked()
	return m, nil
}

// Close stops renewals, ends requests in flight and closes the connection
// to the CA. Certificates already handed out stay usable.
func (m *Manager) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	for _, e := range m.entries {
		if e.timer != nil {
			e.timer.Stop()
		}
	}
	m.mu.Unlock()
	m.cancel()
	m.wg.Wait()
	return m.client.Close()
}

// Certificate returns the current certificate for id, asking the CA on
// first use; concurrent first calls share one request. From then on the
// certificate is renewed at half its lifetime in the background, and each
// call returns the newest. While there is no valid certificate (the CA
// refused or could not be reached, and the next retry is pending) it
// returns the last error at once rather than waiting for the retry.
//
// The returned certificate is shared: do not modify it.
func (m *Manager) Certificate(ctx context.Context, id spiffeid.ID) (*tls.Certificate, error) {
	if !id.MemberOf(m.td) {
		return nil, fmt.Errorf("certificate for %s: %w %s", id, ErrWrongTrustDomain, m.td)
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil, ErrClosed
	}
	e := m.entries[id]
	if e == nil {
		e = &entry{id: id}
		m.entries[id] = e
		m.startLocked(e)
	}
	if c := e.cur; c != nil && m.clock.Now().Before(c.Certificate.Leaf.NotAfter) {
		m.mu.Unlock()
		return c.Certificate, nil
	}
	if e.inflight == nil {
		if err := e.lastErr; err != nil {
			// Waiting for the retry could take minutes; fail this
			// handshake now instead.
			next := e.next
			m.mu.Unlock()
			return nil, fmt.Errorf("no valid certificate for %s (next request to the CA at %s): %w", id, next.Format(time.RFC3339), err)
		}
		// Expired before its renewal fired (the clock jumped, or the
		// machine slept): ask now.
		m.startLocked(e)
	}
	f := e.inflight
	m.mu.Unlock()

	select {
	case <-f.done:
	case <-ctx.Done():
		return nil, fmt.Errorf("waiting for the certificate for %s: %w", id, context.Cause(ctx))
	}
	if f.err != nil {
		return nil, f.err
	}
	return f.issued.Certificate, nil
}

// Forget drops id: its certificate, renewal and retries. Call it when the
// last workload with that identity leaves the node. Connections using the
// certificate are not affected.
func (m *Manager) Forget(id spiffeid.ID) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.entries[id]
	if e == nil {
		return
	}
	e.forgotten = true
	if e.timer != nil {
		e.timer.Stop()
	}
	delete(m.entries, id)
	m.rebuildBundleLocked()
	m.log.Info("certificate forgotten", "identity", id.String())
}

// Snapshot describes every identity's certificate, sorted by identity.
func (m *Manager) Snapshot() []CertInfo {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.clock.Now()
	out := make([]CertInfo, 0, len(m.entries))
	for _, e := range m.entries {
		ci := CertInfo{Identity: e.id.String(), NextRequest: e.next}
		switch {
		case e.cur != nil && now.Before(e.cur.Certificate.Leaf.NotAfter):
			ci.State = StateAvailable
		case e.inflight != nil && e.cur == nil:
			ci.State = StateInitializing
		default:
			ci.State = StateUnavailable
		}
		if e.inflight != nil {
			ci.NextRequest = time.Time{} // now
		}
		if e.cur != nil {
			l := e.cur.Certificate.Leaf
			ci.Serial = l.SerialNumber.Text(16)
			ci.NotBefore, ci.NotAfter = l.NotBefore, l.NotAfter
		}
		if e.lastErr != nil {
			ci.Error = e.lastErr.Error()
		}
		out = append(out, ci)
	}
	slices.SortFunc(out, func(a, b CertInfo) int { return cmp.Compare(a.Identity, b.Identity) })
	return out
}

// startLocked starts a request to the CA for e.
func (m *Manager) startLocked(e *entry) {
	if e.timer != nil {
		e.timer.Stop()
		e.timerGen++
	}
	f := &flight{done: make(chan struct{})}
	e.inflight = f
	e.next = time.Time{}
	m.wg.Add(1)
	go m.fetch(e, f)
}

// fetch is one request to the CA, run in its own goroutine so that no
// caller's context cancels what others wait for.
func (m *Manager) fetch(e *entry, f *flight) {
	defer m.wg.Done()
	ctx, cancel := context.WithTimeout(m.ctx, m.opts.RequestTimeout)
	f.issued, f.err = m.client.Fetch(ctx, e.id)
	cancel()

	m.mu.Lock()
	e.inflight = nil
	if !e.forgotten && !m.closed {
		now := m.clock.Now()
		if f.err == nil {
			e.cur, e.failures, e.lastErr = f.issued, 0, nil
			l := f.issued.Certificate.Leaf
			m.scheduleLocked(e, m.renewAt(l, now), now)
			m.rebuildBundleLocked()
			m.log.Info("certificate issued", "identity", e.id.String(),
				"serial", l.SerialNumber.Text(16), "not_after", l.NotAfter, "renew_at", e.next)
		} else {
			e.failures++
			e.lastErr = f.err
			delay := m.backoff(e.failures)
			m.scheduleLocked(e, now.Add(delay), now)
			m.log.Warn("certificate request failed", "identity", e.id.String(),
				"attempt", e.failures, "retry_in", delay, "have_valid", e.cur != nil && now.Before(e.cur.Certificate.Leaf.NotAfter),
				"error", f.err)
		}
	}
	m.mu.Unlock()
	close(f.done)
}

// scheduleLocked arranges the next request for e at at.
func (m *Manager) scheduleLocked(e *entry, at, now time.Time) {
	if e.timer != nil {
		e.timer.Stop()
	}
	e.timerGen++
	gen := e.timerGen
	e.next = at
	e.timer = m.clock.AfterFunc(max(at.Sub(now), 0), func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		// The entry may have been forgotten, or the timer replaced, since
		// (Stop does not stop a call already under way).
		if m.closed || e.forgotten || e.inflight != nil || e.timerGen != gen {
			return
		}
		m.startLocked(e)
	})
}

// renewAt is when to renew leaf: at half its lifetime. If that has
// already passed by this node's clock (the CA's clock is behind, or the
// certificate took long to arrive), halfway from now to expiry instead,
// and never sooner than RetryMin, so that a skewed clock cannot make the
// manager ask the CA in a loop.
func (m *Manager) renewAt(leaf *x509.Certificate, now time.Time) time.Time {
	at := leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2)
	if !at.After(now) {
		at = now.Add(leaf.NotAfter.Sub(now) / 2)
	}
	return maxTime(at, now.Add(m.opts.RetryMin))
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// backoff is the wait after the n-th consecutive failure: RetryMin doubled
// per failure up to RetryMax, then "equal jitter" (a random point in its
// upper half) so that the node's identities, which failed together when the
// CA went away, do not all come back at once.
func (m *Manager) backoff(n int) time.Duration {
	d := m.opts.RetryMin
	for i := 1; i < n && d < m.opts.RetryMax; i++ {
		d *= 2
	}
	d = min(d, m.opts.RetryMax)
	half := d / 2
	return half + rand.N(d-half+1)
}

// rebuildBundleLocked sets the trust bundle to the configured roots plus
// those sent with every certificate held. A root the CA stops sending
// leaves the bundle when the last certificate that came with it is renewed.
func (m *Manager) rebuildBundleLocked() {
	b := x509bundle.FromX509Authorities(m.td, m.opts.TrustBundle)
	for _, e := range m.entries {
		if e.cur == nil {
			continue
		}
		for _, r := range e.cur.Roots {
			b.AddX509Authority(r)
		}
	}
	m.bundle.Store(b)
}

// TrustBundle returns the roots peers are verified against.
func (m *Manager) TrustBundle() []*x509.Certificate {
	return m.bundle.Load().X509Authorities()
}
