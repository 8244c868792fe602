package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sys/unix"

	"github.com/ambitmesh/ambit/api/workloadapi"
	"github.com/ambitmesh/ambit/api/zdsapi"
	"github.com/ambitmesh/ambit/bpf"
	"github.com/ambitmesh/ambit/ztunnel/hbone"
	"github.com/ambitmesh/ambit/ztunnel/inpod"
	"github.com/ambitmesh/ambit/ztunnel/rbac"
)

// workloadProxy serves one pod: three listeners inside its network
// namespace, and a pool of HBONE connections whose sockets are made in that
// namespace (so the pod's own address is their source, as NetworkPolicy
// expects) and marked so capture lets them out.
type workloadProxy struct {
	p        *Proxy
	uid      string
	info     *zdsapi.WorkloadInfo
	id       string // spiffe://td/ns/x/sa/y
	spiffeID spiffeid.ID
	netns    *inpod.NetNS
	dial     func(ctx context.Context, network, addr string) (net.Conn, error)
	log      *slog.Logger

	ctx       context.Context
	cancel    context.CancelFunc
	listeners []net.Listener
	ports     []int // each listener's port
	pool      *hbone.Pool
	server    *hbone.Server
	wg        sync.WaitGroup
	live      liveConns
}

func startWorkload(p *Proxy, uid string, info *zdsapi.WorkloadInfo, netns *inpod.NetNS) (*workloadProxy, error) {
	id := fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", p.opts.TrustDomain, info.GetNamespace(), info.GetServiceAccount())
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return nil, fmt.Errorf("identity %s: %w", id, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	w := &workloadProxy{
		p: p, uid: uid, info: info, id: id, spiffeID: sid, netns: netns, dial: netns.Dialer(),
		log:    p.log.With("workload", info.GetNamespace()+"/"+info.GetName()),
		ctx:    ctx,
		cancel: cancel,
	}
	w.live.init()
	w.pool = hbone.NewPool(hbone.PoolOptions{
		Dial: func(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
			return w.dial(ctx, "tcp", addr.String())
		},
		TLSConfig: func(k hbone.Key) (*tls.Config, error) {
			dst, err := spiffeid.FromString(k.DstIdentity)
			if err != nil {
				return nil, err
			}
			return p.opts.Certs.ClientTLSConfig(sid, dst), nil
		},
		Log: w.log,
	})
	w.server = hbone.NewServer(hbone.ServerOptions{
		TLSConfig: p.opts.Certs.ServerTLSConfig(sid),
		Handler:   w,
		Log:       w.log,
	})
	serve := []struct {
		port int
		f    func(net.Listener)
	}{
		{OutboundPort, w.serveOutbound},
		{PlaintextPort, w.servePlaintext},
		{HBONEPort, func(ln net.Listener) { _ = w.server.Serve(ln) }},
	}
	for _, s := range serve {
		// eBPF capture hands IPv4 connections to the listeners
		// through bpf_sk_assign, which takes IPv4 sockets: listen on
		// IPv4 there (the mode is IPv4 only).
		addr := ":" + strconv.Itoa(s.port)
		if netns.SockMap() != nil {
			addr = "0.0.0.0" + addr
		}
		// The pod's own connections to 15001 never leave the
		// machine: no TCP keepalive probes (and 4 fewer setsockopt
		// per connection).
		ln, err := netns.Listen(ctx, addr, s.port != OutboundPort)
		if err != nil {
			w.stop()
			return nil, err
		}
		w.listeners = append(w.listeners, ln)
		w.ports = append(w.ports, s.port)
		w.wg.Add(1)
		go func() { defer w.wg.Done(); s.f(ln) }()
	}
	if err := w.registerListeners(); err != nil {
		w.stop()
		return nil, err
	}
	// Fetch the certificate now, not on the first connection.
	go func() {
		if _, err := p.opts.Certs.Certificate(ctx, sid); err != nil && ctx.Err() == nil {
			w.log.Warn("fetching workload certificate", "identity", id, "error", err)
		}
	}()
	return w, nil
}

// registerListeners puts the outbound and inbound plaintext listeners into
// the pod's listener map when the node agent captures the pod with eBPF
// (its programs steer connections to them). A listener leaves the map by
// itself when it closes, so a stopped ztunnel leaves an empty map: the
// programs then drop what they would steer (fail closed).
func (w *workloadProxy) registerListeners() error {
	f := w.netns.SockMap()
	if f == nil {
		return nil
	}
	// NewMapFromFD owns the fd it gets: give it a copy, NetNS keeps and
	// closes its own.
	fd, err := unix.Dup(int(f.Fd()))
	if err != nil {
		return fmt.Errorf("duplicating the pod's listener map fd: %w", err)
	}
	m, err := ebpf.NewMapFromFD(fd)
	if err != nil {
		return fmt.Errorf("opening the pod's listener map: %w", err)
	}
	defer func() { _ = m.Close() }() // the sockets stay in the map
	slots := map[int]uint32{OutboundPort: bpf.SlotOutbound, PlaintextPort: bpf.SlotInbound}
	for i, ln := range w.listeners {
		slot, ok := slots[w.ports[i]]
		if !ok {
			continue
		}
		sc, ok := ln.(syscall.Conn)
		if !ok {
			return fmt.Errorf("listener on %d has no socket", w.ports[i])
		}
		if err := bpf.RegisterListener(m, slot, sc); err != nil {
			return fmt.Errorf("registering the listener on %d: %w", w.ports[i], err)
		}
	}
	return nil
}

// stop closes the listeners and every connection of the pod.
func (w *workloadProxy) stop() {
	w.cancel()
	for _, ln := range w.listeners {
		_ = ln.Close()
	}
	sctx, cancel := context.WithTimeout(context.Background(), time.Second)
	_ = w.server.Shutdown(sctx)
	cancel()
	_ = w.pool.Close()
	w.live.closeAll()
	w.wg.Wait()
	_ = w.netns.Close()
}

// self is the pod's Workload in the config, if the controller has sent it.
func (w *workloadProxy) self() *workloadapi.Workload {
	uid := fmt.Sprintf("%s//Pod/%s/%s", w.p.opts.ClusterID, w.info.GetNamespace(), w.info.GetName())
	return w.p.opts.Store.WorkloadByUID(uid)
}

func (w *workloadProxy) accept(ln net.Listener, handle func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		w.wg.Add(1)
		go func() { defer w.wg.Done(); handle(c) }()
	}
}

// serveOutbound carries the pod's captured outbound connections.
func (w *workloadProxy) serveOutbound(ln net.Listener) { w.accept(ln, w.outbound) }

// originalDst is where a captured connection was going. In eBPF mode
// nothing rewrote it: it is the local address (skipping the
// SO_ORIGINAL_DST syscall, which fails there).
func (w *workloadProxy) originalDst(c net.Conn) (net.Addr, error) {
	if w.netns.SockMap() != nil {
		return c.LocalAddr(), nil
	}
	return inpod.OriginalDst(c)
}

func (w *workloadProxy) outbound(c net.Conn) {
	// The deferred Closes in this file end a proxied connection's sides on
	// the early returns; hbone.Proxy has closed them already on the normal
	// path, and a failed close of a side we are done with changes nothing.
	defer func() { _ = c.Close() }()
	orig, err := w.originalDst(c)
	if err != nil {
		w.log.Warn("outbound: reading the original destination", "error", err)
		return
	}
	dst := addrOf(orig)
	src := addrOf(c.RemoteAddr())
	route := w.route(dst)
	ci := &ConnInfo{
		Reporter: ReporterSource, Src: w.self(), SrcIdentity: w.id, SrcAddr: src.String(),
		DstAddr: route.target.String(), Dst: route.workload, DstService: route.service, Start: time.Now(),
	}
	if route.workload == nil || route.workload.TunnelProtocol != workloadapi.TunnelProtocol_HBONE {
		// Not in the mesh: plain TCP, from the pod's namespace and
		// marked, to where the app meant to go.
		up, err := w.dial(w.ctx, "tcp", dst.String())
		t := w.p.opts.Metrics.Open(w.log, ci)
		if err != nil {
			ci.ResponseFlag = "UF"
			t.Close(0, 0, fmt.Errorf("dialing %s (passthrough): %w", dst, err))
			return
		}
		defer func() { _ = up.Close() }()
		sent, recv, err := hbone.Proxy(c, up)
		t.Close(sent, recv, err)
		return
	}
	ci.DstIdentity = spiffeIdentity(route.workload, w.p.opts.TrustDomain)
	ci.MutualTLS = true
	t := w.p.opts.Metrics.Open(w.log, ci)
	key := hbone.Key{SrcIdentity: w.id, DstIdentity: ci.DstIdentity, Addr: netip.AddrPortFrom(route.target.Addr(), HBONEPort)}
	h := http.Header{}
	h.Set("Forwarded", fmt.Sprintf("for=%q", src.String()))
	h.Set("Baggage", w.baggage())
	ctx, cancel := context.WithTimeout(w.ctx, 10*time.Second)
	s, err := w.pool.Connect(ctx, key, route.target.String(), h)
	cancel()
	if err != nil {
		var se *hbone.StatusError
		if errors.As(err, &se) && se.Code == http.StatusUnauthorized {
			ci.ResponseFlag = "UAEX"
		} else {
			ci.ResponseFlag = "UF"
		}
		t.Close(0, 0, fmt.Errorf("HBONE to %s via %s: %w (is port 15008 reachable? a NetworkPolicy may block HBONE)", route.target, key.Addr, err))
		return
	}
	defer func() { _ = s.Close() }()
	untrack := w.live.add(c, s, nil)
	defer untrack()
	sent, recv, err := hbone.Proxy(c, s)
	t.Close(sent, recv, err)
}

// route is where an outbound connection goes.
type route struct {
	target   netip.AddrPort // the endpoint's ip:port
	workload *workloadapi.Workload
	service  *workloadapi.Service
}

// route resolves a destination: a Service VIP is load-balanced over its
// healthy endpoints (target port from the Service's port map), a pod IP is
// used as is.
func (w *workloadProxy) route(dst netip.AddrPort) route {
	st := w.p.opts.Store
	if svc := st.ServiceByVIP(dst); svc != nil {
		eps := st.Endpoints(svc)
		if len(eps) > 0 {
			ep := eps[rand.IntN(len(eps))]
			port := dst.Port()
			for _, p := range svc.Ports {
				if p.ServicePort == uint32(dst.Port()) && p.TargetPort != 0 {
					port = uint16(p.TargetPort)
				}
			}
			// The endpoint's own map (named target ports) wins.
			if pl, ok := ep.Services[svc.Namespace+"/"+svc.Hostname]; ok {
				for _, p := range pl.Ports {
					if p.ServicePort == uint32(dst.Port()) && p.TargetPort != 0 {
						port = uint16(p.TargetPort)
					}
				}
			}
			if ip, ok := firstAddr(ep); ok {
				return route{target: netip.AddrPortFrom(ip, port), workload: ep, service: svc}
			}
		}
		return route{target: dst, service: svc}
	}
	if wl := st.WorkloadByIP(dst.Addr()); wl != nil {
		return route{target: dst, workload: wl}
	}
	return route{target: dst}
}

func firstAddr(w *workloadapi.Workload) (netip.Addr, bool) {
	for _, a := range w.Addresses {
		if ip, ok := netip.AddrFromSlice(a); ok {
			return ip.Unmap(), true
		}
	}
	return netip.Addr{}, false
}

// baggage carries the source workload's metadata, as Istio's ztunnel sends
// it (W3C baggage with k8s.* keys).
func (w *workloadProxy) baggage() string {
	b := "k8s.namespace.name=" + w.info.GetNamespace() + ",k8s.pod.name=" + w.info.GetName()
	if self := w.self(); self != nil {
		if self.CanonicalName != "" {
			b += ",service.name=" + self.CanonicalName
		}
		if self.CanonicalRevision != "" {
			b += ",service.version=" + self.CanonicalRevision
		}
		if self.ClusterId != "" {
			b += ",k8s.cluster.name=" + self.ClusterId
		}
	}
	return b
}

// ServeHBONE terminates an HBONE stream for this pod: identity, policy,
// then the app. A Reject that fails means the peer is already gone; the
// stream ends either way and the access log records why it was refused,
// so its error is dropped.
func (w *workloadProxy) ServeHBONE(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
	target, err := netip.ParseAddrPort(req.Authority)
	if err != nil {
		_ = rw.Reject(http.StatusBadRequest)
		w.log.Warn("HBONE: bad authority", "authority", req.Authority, "error", err)
		return
	}
	target = netip.AddrPortFrom(target.Addr().Unmap(), target.Port())
	peerID := ""
	if len(req.PeerCertificates) > 0 && len(req.PeerCertificates[0].URIs) > 0 {
		peerID = req.PeerCertificates[0].URIs[0].String()
	}
	remote := addrOf(req.RemoteAddr)
	self := w.self()
	ci := &ConnInfo{
		Reporter: ReporterDestination, Src: w.p.opts.Store.WorkloadByIP(remote.Addr()), SrcIdentity: peerID,
		SrcAddr: remote.String(), Dst: self, DstIdentity: w.id, DstAddr: target.String(), MutualTLS: true, Start: time.Now(),
	}
	if self != nil && !hasAddr(self, target.Addr()) {
		_ = rw.Reject(http.StatusBadRequest)
		ci.ResponseFlag = "NR"
		w.p.opts.Metrics.Open(w.log, ci).Close(0, 0, fmt.Errorf("HBONE target %s is not this pod's address", target))
		return
	}
	conn := rbac.Conn{SrcIdentity: peerID, SrcIP: remote.Addr(), DstIP: target.Addr(), DstPort: target.Port()}
	if v := w.allowed(self, conn); !v.Allow {
		_ = rw.Reject(http.StatusUnauthorized)
		ci.ResponseFlag = "UAEX"
		w.p.opts.Metrics.Open(w.log, ci).Close(0, 0, fmt.Errorf("denied by policy %s: %s", v.Policy, v.Reason))
		return
	}
	t := w.p.opts.Metrics.Open(w.log, ci)
	// The app sees the client pod as the peer, as without the mesh: in
	// in-pod mode the HBONE connection comes from the source pod's IP.
	app, err := w.netns.TransparentDialer(remote.Addr())(ctx, "tcp", target.String())
	if err != nil {
		_ = rw.Reject(http.StatusServiceUnavailable)
		ci.ResponseFlag = "UF"
		t.Close(0, 0, fmt.Errorf("connecting to the app at %s: %w", target, err))
		return
	}
	defer func() { _ = app.Close() }()
	s, err := rw.Accept()
	if err != nil {
		t.Close(0, 0, err)
		return
	}
	defer func() { _ = s.Close() }()
	untrack := w.live.add(s, app, &conn)
	defer untrack()
	recv, sent, err := hbone.Proxy(s, app)
	t.Close(recv, sent, err)
}

// servePlaintext takes captured inbound connections that did not come over
// HBONE. They carry no identity, so STRICT PeerAuthentication (a DENY of
// principal-less sources) refuses them.
func (w *workloadProxy) servePlaintext(ln net.Listener) { w.accept(ln, w.plaintext) }

func (w *workloadProxy) plaintext(c net.Conn) {
	defer func() { _ = c.Close() }()
	orig, err := w.originalDst(c)
	if err != nil {
		w.log.Warn("inbound plaintext: reading the original destination", "error", err)
		return
	}
	dst := addrOf(orig)
	remote := addrOf(c.RemoteAddr())
	self := w.self()
	ci := &ConnInfo{
		Reporter: ReporterDestination, Src: w.p.opts.Store.WorkloadByIP(remote.Addr()), SrcAddr: remote.String(),
		Dst: self, DstIdentity: w.id, DstAddr: dst.String(), Start: time.Now(),
	}
	conn := rbac.Conn{SrcIP: remote.Addr(), DstIP: dst.Addr(), DstPort: dst.Port()}
	if v := w.allowed(self, conn); !v.Allow {
		ci.ResponseFlag = "UAEX"
		w.p.opts.Metrics.Open(w.log, ci).Close(0, 0, fmt.Errorf("plaintext denied by policy %s: %s", v.Policy, v.Reason))
		return
	}
	t := w.p.opts.Metrics.Open(w.log, ci)
	app, err := w.netns.TransparentDialer(remote.Addr())(w.ctx, "tcp", dst.String())
	if err != nil {
		ci.ResponseFlag = "UF"
		t.Close(0, 0, fmt.Errorf("connecting to the app at %s: %w", dst, err))
		return
	}
	defer func() { _ = app.Close() }()
	untrack := w.live.add(c, app, &conn)
	defer untrack()
	recv, sent, err := hbone.Proxy(c, app)
	t.Close(recv, sent, err)
}

// allowed evaluates L4 policy for a connection to this pod. Before the
// controller has sent the pod's Workload, only mesh-wide and namespace
// policies can apply; an unknown pod is evaluated with its namespace.
func (w *workloadProxy) allowed(self *workloadapi.Workload, c rbac.Conn) rbac.Verdict {
	if self == nil {
		self = &workloadapi.Workload{Namespace: w.info.GetNamespace(), ServiceAccount: w.info.GetServiceAccount()}
	}
	return w.p.policies.get().Evaluate(self, c)
}

// recheck closes established inbound connections that the current policy
// denies.
func (w *workloadProxy) recheck() {
	self := w.self()
	for _, lc := range w.live.inbound() {
		if v := w.allowed(self, *lc.conn); !v.Allow {
			w.log.Info("closing connection denied by a policy change", "src.addr", lc.conn.SrcIP, "dst.port", lc.conn.DstPort, "policy", v.Policy)
			lc.close()
		}
	}
}

func hasAddr(w *workloadapi.Workload, ip netip.Addr) bool {
	for _, a := range w.Addresses {
		if got, ok := netip.AddrFromSlice(a); ok && got.Unmap() == ip {
			return true
		}
	}
	return false
}

// liveConns tracks a pod's established connections so that a policy change
// can close them and stop can end them.
type liveConns struct {
	mu    sync.Mutex
	conns map[*liveConn]struct{}
}

type liveConn struct {
	a, b net.Conn
	conn *rbac.Conn // nil for outbound
}

func (l *liveConns) init() { l.conns = map[*liveConn]struct{}{} }

func (lc *liveConn) close() { _ = lc.a.Close(); _ = lc.b.Close() }

func (l *liveConns) add(a, b net.Conn, c *rbac.Conn) func() {
	lc := &liveConn{a: a, b: b, conn: c}
	l.mu.Lock()
	l.conns[lc] = struct{}{}
	l.mu.Unlock()
	return func() {
		l.mu.Lock()
		delete(l.conns, lc)
		l.mu.Unlock()
	}
}

func (l *liveConns) inbound() []*liveConn {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []*liveConn
	for lc := range l.conns {
		if lc.conn != nil {
			out = append(out, lc)
		}
	}
	return out
}

func (l *liveConns) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns)
}

func (l *liveConns) closeAll() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for lc := range l.conns {
		lc.close()
	}
}
