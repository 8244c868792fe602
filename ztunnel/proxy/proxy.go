// Package proxy is ztunnel's data path: for every enrolled pod on the node
// it serves, inside the pod's network namespace, the outbound listener
// (15001: captured connections leave as HBONE, or as plain TCP when the
// destination is not in the mesh), the HBONE listener (15008: terminates
// mTLS, checks L4 policy, connects to the app) and the plaintext inbound
// listener (15006: allowed only where no STRICT PeerAuthentication applies).
// It counts every connection with Istio's TCP metrics and writes one
// access-log line per connection.
//
// It does not capture traffic (the node agent's eBPF or nftables rules do)
// or fetch config and certificates (packages xds and identity do); it reads
// them from the state store and the certificate manager.
package proxy

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"

	"github.com/ambitmesh/ambit/api/workloadapi"
	"github.com/ambitmesh/ambit/api/workloadapi/security"
	"github.com/ambitmesh/ambit/api/zdsapi"
	"github.com/ambitmesh/ambit/ztunnel/identity"
	"github.com/ambitmesh/ambit/ztunnel/inpod"
	"github.com/ambitmesh/ambit/ztunnel/rbac"
	"github.com/ambitmesh/ambit/ztunnel/state"
)

// Ports ztunnel listens on inside each enrolled pod's network namespace.
const (
	OutboundPort  = 15001
	PlaintextPort = 15006
	HBONEPort     = 15008
)

// Options configures the proxy.
type Options struct {
	Store       *state.Store
	Certs       *identity.Manager
	Metrics     *Metrics
	TrustDomain string
	// ClusterID is the Kubernetes cluster name in workload UIDs.
	ClusterID string
	Log       *slog.Logger
}

// Proxy serves every enrolled pod of the node. It implements
// inpod.Handler.
type Proxy struct {
	opts Options
	log  *slog.Logger

	mu        sync.Mutex
	workloads map[string]*workloadProxy // by pod UID

	policies policyCache
}

var _ inpod.Handler = (*Proxy)(nil)

// New returns a proxy; workloads come from the node agent through Add.
func New(opts Options) *Proxy {
	p := &Proxy{opts: opts, log: opts.Log, workloads: map[string]*workloadProxy{}}
	p.policies.store = opts.Store
	opts.Store.Subscribe(p.configChanged)
	return p
}

// Add starts serving a pod inside its network namespace. A pod already
// served in the same namespace (the node agent sends every pod again when
// either side reconnects) keeps its listeners and connections; its
// listeners go into the listener map it comes with, if any.
func (p *Proxy) Add(ctx context.Context, uid string, info *zdsapi.WorkloadInfo, netns *inpod.NetNS) error {
	p.mu.Lock()
	old := p.workloads[uid]
	if old != nil && old.netns.SameNamespace(netns) {
		p.mu.Unlock()
		old.netns.Adopt(netns)
		if err := old.registerListeners(); err != nil {
			return fmt.Errorf("serving %s/%s: %w", info.GetNamespace(), info.GetName(), err)
		}
		p.log.Info("workload already served", "uid", uid, "workload", info.GetNamespace()+"/"+info.GetName())
		return nil
	}
	delete(p.workloads, uid)
	p.mu.Unlock()
	if old != nil {
		old.stop()
	}
	w, err := startWorkload(p, uid, info, netns)
	if err != nil {
		// The namespace fd is only read from; closing it cannot lose
		// anything, and the error that matters is startWorkload's.
		_ = netns.Close()
		return fmt.Errorf("serving %s/%s: %w", info.GetNamespace(), info.GetName(), err)
	}
	p.mu.Lock()
	p.workloads[uid] = w
	p.mu.Unlock()
	p.log.Info("serving workload", "uid", uid, "workload", info.GetNamespace()+"/"+info.GetName(), "identity", w.id)
	return nil
}

// Del stops serving a pod.
func (p *Proxy) Del(uid string) error {
	p.mu.Lock()
	w := p.workloads[uid]
	delete(p.workloads, uid)
	p.mu.Unlock()
	if w == nil {
		return nil
	}
	w.stop()
	p.opts.Certs.Forget(w.spiffeID)
	p.log.Info("stopped serving workload", "uid", uid, "workload", w.info.GetNamespace()+"/"+w.info.GetName())
	return nil
}

// Reconcile drops pods the node agent no longer has.
func (p *Proxy) Reconcile(present map[string]bool) {
	p.mu.Lock()
	var gone []string
	for uid := range p.workloads {
		if !present[uid] {
			gone = append(gone, uid)
		}
	}
	p.mu.Unlock()
	for _, uid := range gone {
		_ = p.Del(uid)
	}
}

// Close stops serving every pod.
func (p *Proxy) Close() {
	p.mu.Lock()
	ws := p.workloads
	p.workloads = map[string]*workloadProxy{}
	p.mu.Unlock()
	for _, w := range ws {
		w.stop()
	}
}

// WorkloadStatus is one served pod, for the admin config dump.
type WorkloadStatus struct {
	UID       string `json:"uid"`
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	Identity  string `json:"identity"`
	Conns     int    `json:"activeConnections"`
}

// Served lists the pods being served.
func (p *Proxy) Served() []WorkloadStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]WorkloadStatus, 0, len(p.workloads))
	for uid, w := range p.workloads {
		out = append(out, WorkloadStatus{UID: uid, Name: w.info.GetName(), Namespace: w.info.GetNamespace(), Identity: w.id, Conns: w.live.count()})
	}
	return out
}

// configChanged re-checks established inbound connections against the new
// policies, closing those now denied, as Istio's ztunnel does.
func (p *Proxy) configChanged(state.Change) {
	p.policies.invalidate()
	p.mu.Lock()
	ws := make([]*workloadProxy, 0, len(p.workloads))
	for _, w := range p.workloads {
		ws = append(ws, w)
	}
	p.mu.Unlock()
	for _, w := range ws {
		w.recheck()
	}
}

// policyCache holds the rbac index built from the store's current
// authorizations, rebuilt lazily after a change.
type policyCache struct {
	store *state.Store
	mu    sync.Mutex
	cur   *rbac.Policies
}

func (c *policyCache) invalidate() {
	c.mu.Lock()
	c.cur = nil
	c.mu.Unlock()
}

func (c *policyCache) get() *rbac.Policies {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cur == nil {
		m := c.store.Authorizations()
		list := make([]*security.Authorization, 0, len(m))
		for _, a := range m {
			list = append(list, a)
		}
		c.cur = rbac.NewPolicies(list)
	}
	return c.cur
}

// spiffeIdentity is the identity a workload's certificate carries.
func spiffeIdentity(w *workloadapi.Workload, defaultTD string) string {
	td := w.TrustDomain
	if td == "" {
		td = defaultTD
	}
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", td, w.Namespace, w.ServiceAccount)
}

func addrOf(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
