package xds

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/delta/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ambitmesh/ambit/api/workloadapi"
	"github.com/ambitmesh/ambit/api/workloadapi/security"
)

// The type URLs served: Istio's, so that Istio's ztunnel could use this
// server and Ambit's ztunnel could use istiod.
const (
	AddressTypeURL       = "type.googleapis.com/istio.workload.Address"
	AuthorizationTypeURL = "type.googleapis.com/istio.security.Authorization"
)

// Options configures a Server. The zero value works.
type Options struct {
	// Log receives stream events; slog.Default() if nil.
	Log *slog.Logger
	// Registerer gets the server's metrics; nil leaves them unregistered
	// (tests, or a second Server in one process).
	Registerer prometheus.Registerer
	// OnAck, if set, is called when a node acknowledges (or rejects) a
	// response: the hook the controller uses to see which version each node
	// runs. It runs on the node's stream goroutine and must not block.
	OnAck func(Ack)
	// OnPush, if set, is called for every response just before it is sent,
	// on the node's stream goroutine. It must not block or modify the
	// response.
	OnPush func(Push)
}

// Ack is one node's answer to one response.
type Ack struct {
	// NodeID is the node.id the client sent (Ambit's ztunnel sends its
	// Kubernetes node name).
	NodeID  string
	TypeURL string
	// Version is the system_version_info of the acknowledged response: the
	// version SetAddresses or SetAuthorizations returned for the state it
	// carried. A node that acknowledged version N has everything up to N.
	Version string
	Nonce   string
	// Err is the client's error_detail when it rejected the response
	// (NACK); nil when it applied it. A rejecting client keeps its last
	// good copy of the resources it could not use.
	Err error
}

// Push is one response as it leaves. A response to a stream that is
// closing is reported too, though it may never arrive.
type Push struct {
	NodeID   string
	TypeURL  string
	Version  string
	Response *discovery.DeltaDiscoveryResponse
	// Bytes is the response's encoded size.
	Bytes int
}

// Server serves Address and Authorization resources over delta ADS.
type Server struct {
	log   *slog.Logger
	opts  Options
	delta delta.Server
	m     metrics

	mu    sync.Mutex // serializes Set*
	types map[string]*served

	streamsMu sync.Mutex
	streams   map[int64]*streamState
}

// served is one type URL's cache and the state it holds.
type served struct {
	cache     *cache.LinearCache
	version   uint64 // mirrors the LinearCache's version, which only Set* advances
	resources map[string]proto.Message
}

// New returns a Server with no resources. Register it on a gRPC server and
// call SetAddresses and SetAuthorizations with the desired state.
func New(opts Options) *Server {
	log := opts.Log
	if log == nil {
		log = slog.Default()
	}
	log = log.With("component", "xds-server")
	s := &Server{
		log:     log,
		opts:    opts,
		m:       newMetrics(opts.Registerer),
		types:   map[string]*served{},
		streams: map[int64]*streamState{},
	}
	mux := typeMux{}
	for _, t := range []string{AddressTypeURL, AuthorizationTypeURL} {
		c := cache.NewLinearCache(t, cache.WithLogger(cplLogger{log}))
		s.types[t] = &served{cache: c, resources: map[string]proto.Message{}}
		mux[t] = c
	}
	s.delta = delta.NewServer(context.Background(), mux, callbacks{s}, delta.WithLogger(cplLogger{log}))
	return s
}

// ServerKeepalive is the keepalive the controller's gRPC server needs with
// ztunnel's xDS client (ztunnel/xds): it allows the clients' pings every 10
// s or more, with or without a stream (gRPC's default allows one per 5
// minutes and closes connections that ping more), and pings clients silent
// for 30 s itself, dropping those that do not answer within 10 s, so that
// the streams of a node gone without a FIN are released. Istio's istiod
// uses the same figures.
func ServerKeepalive() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
	}
}

// Register adds the AggregatedDiscoveryService (delta only) to g. The
// caller owns g: its TLS, authentication interceptors, keepalive
// (ServerKeepalive) and message size limits.
func (s *Server) Register(g *grpc.Server) {
	discovery.RegisterAggregatedDiscoveryServiceServer(g, &adsService{delta: s.delta})
}

// SetAddresses makes next the complete set of Address resources, keyed by
// resource name (BuildAddresses's output). Resources that are new or differ
// from what is served are pushed to every connected node, names that are
// gone are pushed as removals, and nothing is sent when nothing changed.
// It returns the version that carries this state, to match against
// Ack.Version. The Server keeps the messages: the caller must not modify
// them afterwards.
func (s *Server) SetAddresses(next map[string]*workloadapi.Address) (version string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return set(s, AddressTypeURL, next)
}

// SetAuthorizations is SetAddresses for the Authorization resources, keyed
// by "namespace/name" (the keys Workload.authorization_policies uses).
func (s *Server) SetAuthorizations(next map[string]*security.Authorization) (version string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return set(s, AuthorizationTypeURL, next)
}

// Version returns the current version of a type URL's resources.
func (s *Server) Version(typeURL string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if t := s.types[typeURL]; t != nil {
		return strconv.FormatUint(t.version, 10)
	}
	return ""
}

func set[T proto.Message](s *Server, typeURL string, next map[string]T) string {
	t := s.types[typeURL]
	upserts := map[string]types.Resource{}
	resources := make(map[string]proto.Message, len(next))
	for name, m := range next {
		if !m.ProtoReflect().IsValid() {
			continue // a nil message: absent
		}
		resources[name] = m
		if old, ok := t.resources[name]; ok && proto.Equal(old, m) {
			continue
		}
		upserts[name] = m
	}
	var removals []string
	for name := range t.resources {
		if _, ok := resources[name]; !ok {
			removals = append(removals, name)
		}
	}
	if len(upserts) == 0 && len(removals) == 0 {
		return strconv.FormatUint(t.version, 10)
	}
	slices.Sort(removals)
	// UpdateResources bumps the cache version by one and wakes every
	// watch; each then computes its own delta against what its node has.
	if err := t.cache.UpdateResources(upserts, removals); err != nil {
		// Only a resource that cannot be marshaled gets here; the state is
		// in the cache nonetheless, and the failing watch's node will get
		// it on its next request.
		s.log.Error("updating xDS cache", "xds.type", typeURL, "error", err)
	}
	t.version++
	t.resources = resources
	version := strconv.FormatUint(t.version, 10)
	s.log.Debug("xDS resources changed", "xds.type", typeURL, "xds.version", version,
		"xds.upserted", len(upserts), "xds.removed", len(removals), "xds.resources", len(resources))
	return version
}

// adsService wires the delta handler into the gRPC service. The
// state-of-the-world method stays unimplemented: ztunnel speaks delta only.
type adsService struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	delta delta.Server
}

func (a *adsService) DeltaAggregatedResources(st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	// AnyType: an aggregated stream, every request names its type URL.
	return a.delta.DeltaStreamHandler(st, resource.AnyType)
}

// typeMux routes a watch to its type URL's cache and refuses other types
// with an error that names what is served.
type typeMux map[string]*cache.LinearCache

func (m typeMux) CreateWatch(*cache.Request, cache.Subscription, chan cache.Response) (func(), error) {
	return nil, status.Error(codes.Unimplemented, "state-of-the-world xDS is not served; use delta ADS")
}

func (m typeMux) CreateDeltaWatch(req *cache.DeltaRequest, sub cache.Subscription, ch chan cache.DeltaResponse) (func(), error) {
	c, ok := m[req.GetTypeUrl()]
	if !ok {
		return nil, status.Errorf(codes.InvalidArgument, "type URL %q is not served (served: %s, %s)",
			req.GetTypeUrl(), AddressTypeURL, AuthorizationTypeURL)
	}
	return c.CreateDeltaWatch(req, sub, ch)
}

// streamState is what the server remembers about one stream. Callbacks for
// one stream all run on that stream's goroutine; nodeID and acked are also
// read by Nodes, so they are written under Server.streamsMu.
type streamState struct {
	peer   string
	nodeID string
	// sent maps the nonce of each response not yet answered to what it
	// carried.
	sent map[string]sentResponse
	// acked is the last version the node applied, by type URL.
	acked map[string]string
}

// NodeStatus is one connected stream's view of a node.
type NodeStatus struct {
	NodeID string
	// Peer is the stream's remote address.
	Peer string
	// Acked is the last version the node acknowledged, by type URL; a type
	// is missing until the node acknowledges a response of it.
	Acked map[string]string
}

// Nodes returns the connected streams, sorted by node ID: which node runs
// which version. A node that reconnects can briefly appear twice.
func (s *Server) Nodes() []NodeStatus {
	s.streamsMu.Lock()
	defer s.streamsMu.Unlock()
	out := make([]NodeStatus, 0, len(s.streams))
	for _, st := range s.streams {
		out = append(out, NodeStatus{NodeID: st.nodeID, Peer: st.peer, Acked: maps.Clone(st.acked)})
	}
	slices.SortFunc(out, func(a, b NodeStatus) int { return strings.Compare(a.NodeID, b.NodeID) })
	return out
}

type sentResponse struct{ typeURL, version string }

// maxUnanswered bounds streamState.sent against a client that never
// answers; a well-behaved client has at most one response per type
// outstanding.
const maxUnanswered = 64

// callbacks implements delta.Callbacks for a Server.
type callbacks struct{ s *Server }

var _ delta.Callbacks = callbacks{}

func (c callbacks) stream(id int64) *streamState {
	c.s.streamsMu.Lock()
	defer c.s.streamsMu.Unlock()
	return c.s.streams[id]
}

func (c callbacks) OnDeltaStreamOpen(ctx context.Context, id int64, _ string) error {
	st := &streamState{sent: map[string]sentResponse{}, acked: map[string]string{}}
	if p, ok := peer.FromContext(ctx); ok {
		st.peer = p.Addr.String()
	}
	c.s.streamsMu.Lock()
	c.s.streams[id] = st
	c.s.streamsMu.Unlock()
	c.s.m.streams.Inc()
	c.s.log.Debug("xDS stream opened", "xds.stream", id, "peer", st.peer)
	return nil
}

func (c callbacks) OnDeltaStreamClosed(id int64, _ *core.Node) {
	c.s.streamsMu.Lock()
	st := c.s.streams[id]
	delete(c.s.streams, id)
	c.s.streamsMu.Unlock()
	if st == nil {
		return
	}
	c.s.m.streams.Dec()
	c.s.log.Info("node disconnected", "node", st.nodeID, "peer", st.peer, "xds.stream", id)
}

func (c callbacks) OnStreamDeltaRequest(id int64, req *discovery.DeltaDiscoveryRequest) error {
	st := c.stream(id)
	if st == nil {
		return nil
	}
	if req.GetNode() != nil && st.nodeID == "" {
		c.s.streamsMu.Lock()
		st.nodeID = req.GetNode().GetId()
		c.s.streamsMu.Unlock()
		c.s.log.Info("node connected", "node", st.nodeID, "peer", st.peer, "xds.stream", id)
	}
	nonce := req.GetResponseNonce()
	if nonce == "" {
		c.s.log.Debug("xDS subscription", "node", st.nodeID, "xds.type", req.GetTypeUrl(),
			"xds.subscribe", req.GetResourceNamesSubscribe(), "xds.known", len(req.GetInitialResourceVersions()))
		return nil
	}
	sent, ok := st.sent[nonce]
	if !ok {
		return nil // a nonce from before a server restart, or already answered
	}
	delete(st.sent, nonce)
	ack := Ack{NodeID: st.nodeID, TypeURL: sent.typeURL, Version: sent.version, Nonce: nonce}
	if detail := req.GetErrorDetail(); detail != nil {
		ack.Err = status.ErrorProto(detail)
		c.s.m.nacks.WithLabelValues(sent.typeURL).Inc()
		c.s.log.Warn("node rejected xDS response", "node", st.nodeID, "xds.type", sent.typeURL,
			"xds.version", sent.version, "xds.nonce", nonce, "error", ack.Err)
	} else {
		c.s.streamsMu.Lock()
		st.acked[sent.typeURL] = sent.version
		c.s.streamsMu.Unlock()
		c.s.log.Debug("node acknowledged xDS response", "node", st.nodeID, "xds.type", sent.typeURL,
			"xds.version", sent.version, "xds.nonce", nonce)
	}
	if c.s.opts.OnAck != nil {
		c.s.opts.OnAck(ack)
	}
	return nil
}

func (c callbacks) OnStreamDeltaResponse(id int64, _ *discovery.DeltaDiscoveryRequest, resp *discovery.DeltaDiscoveryResponse) {
	st := c.stream(id)
	if st == nil {
		return
	}
	if len(st.sent) >= maxUnanswered {
		clear(st.sent)
	}
	st.sent[resp.GetNonce()] = sentResponse{typeURL: resp.GetTypeUrl(), version: resp.GetSystemVersionInfo()}
	size := proto.Size(resp)
	c.s.m.pushes.WithLabelValues(resp.GetTypeUrl()).Inc()
	c.s.m.pushBytes.WithLabelValues(resp.GetTypeUrl()).Add(float64(size))
	c.s.log.Debug("xDS push", "node", st.nodeID, "xds.type", resp.GetTypeUrl(), "xds.version", resp.GetSystemVersionInfo(),
		"xds.nonce", resp.GetNonce(), "xds.upserted", len(resp.GetResources()), "xds.removed", len(resp.GetRemovedResources()), "bytes", size)
	if c.s.opts.OnPush != nil {
		c.s.opts.OnPush(Push{NodeID: st.nodeID, TypeURL: resp.GetTypeUrl(), Version: resp.GetSystemVersionInfo(), Response: resp, Bytes: size})
	}
}

// cplLogger sends go-control-plane's logs to slog. Its Info level reports
// every watch opened, which is debug material here; its debug messages
// print whole version maps, so nothing is formatted unless enabled.
type cplLogger struct{ l *slog.Logger }

func (l cplLogger) logf(level slog.Level, format string, args []any) {
	if l.l.Enabled(context.Background(), level) {
		l.l.Log(context.Background(), level, fmt.Sprintf(format, args...))
	}
}

func (l cplLogger) Debugf(format string, args ...any) { l.logf(slog.LevelDebug, format, args) }
func (l cplLogger) Infof(format string, args ...any)  { l.logf(slog.LevelDebug, format, args) }
func (l cplLogger) Warnf(format string, args ...any)  { l.logf(slog.LevelWarn, format, args) }
func (l cplLogger) Errorf(format string, args ...any) { l.logf(slog.LevelError, format, args) }
