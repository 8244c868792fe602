package xds

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/ambitmesh/ambit/api/workloadapi"
	"github.com/ambitmesh/ambit/api/workloadapi/security"
	"github.com/ambitmesh/ambit/ztunnel/state"
)

// The type URLs ztunnel subscribes to (Istio's).
const (
	AddressTypeURL       = "type.googleapis.com/istio.workload.Address"
	AuthorizationTypeURL = "type.googleapis.com/istio.security.Authorization"
)

var typeURLs = [...]string{AddressTypeURL, AuthorizationTypeURL}

// Defaults for Options.
const (
	DefaultInitialBackoff = 100 * time.Millisecond
	DefaultMaxBackoff     = 15 * time.Second
	// DefaultMaxMessageSize bounds one response. The first response after
	// a connect carries every Address of the cluster, a few hundred bytes
	// each, well past gRPC's 4 MiB default.
	DefaultMaxMessageSize = 256 << 20
	// DefaultKeepalive is how long the connection to the controller may
	// stay silent before the client pings it (istiod's server keepalive
	// time); KeepaliveTimeout is how long an unanswered ping waits before
	// the connection counts as dead and the client reconnects.
	DefaultKeepalive = 30 * time.Second
	KeepaliveTimeout = 10 * time.Second
)

// ErrTokenWithoutTLS is returned by New when a token would be sent over a
// plaintext connection.
var ErrTokenWithoutTLS = errors.New("refusing to send a service-account token without TLS: set Options.TLS")

// Options configures a Client.
type Options struct {
	// Addr is the controller's gRPC address, host:port. With TLS the host
	// is also the name verified in the controller's certificate unless
	// TLS.ServerName says otherwise (the controller's certificate is for
	// ambit-controller.istio-system.svc).
	Addr string
	// TLS verifies the controller, normally against the mesh root mounted
	// from ConfigMap istio-ca-root-cert. Nil means plaintext, for tests
	// only; it cannot be combined with Token.
	TLS *tls.Config
	// Token returns the projected service-account token (audience
	// istio-ca). It is called on every (re)connect, so a rotated token is
	// picked up, and sent as "authorization: Bearer <token>". Nil sends none.
	Token func() (string, error)
	// NodeID is node.id in every subscription; Ambit's ztunnel uses its
	// Kubernetes node name. Required.
	NodeID string
	// Metadata is node.metadata (string values), e.g. NODE_NAME, NAME,
	// NAMESPACE, INSTANCE_IPS as Istio's ztunnel sends them.
	Metadata map[string]string
	// Store receives the configuration. Required.
	Store *state.Store
	// Log receives connection events; slog.Default() if nil.
	Log *slog.Logger

	// DialOptions are appended to the client's own (transport credentials
	// and the receive size limit), e.g. keepalive or a custom dialer.
	DialOptions []grpc.DialOption
	// InitialBackoff and MaxBackoff bound the delay between reconnects; it
	// doubles per failed attempt, with jitter, and restarts from the
	// initial value after a stream that delivered a response. Defaults
	// DefaultInitialBackoff and DefaultMaxBackoff.
	InitialBackoff time.Duration
	MaxBackoff     time.Duration
	// MaxMessageSize bounds one response; DefaultMaxMessageSize if 0.
	MaxMessageSize int
	// Keepalive is how long the connection may stay silent before the
	// client pings the controller; a ping unanswered for KeepaliveTimeout
	// ends the stream and the client reconnects, so that a controller whose
	// node vanished without closing the connection (no FIN) is left in
	// seconds, not after the kernel's 15-minute retransmission timeout.
	// DefaultKeepalive if 0; gRPC raises anything under 10 s to 10 s;
	// negative: no pings. The server must allow pings this often (see
	// controller/xds.ServerKeepalive).
	Keepalive time.Duration
}

// Client is ztunnel's delta ADS client.
type Client struct {
	opts Options
	log  *slog.Logger
	node *core.Node

	synced     chan struct{}
	syncOnce   sync.Once
	ackedTypes map[string]bool // touched by Run's goroutine only
}

// New checks opts and returns a Client. It does not connect: Run does. It
// returns ErrTokenWithoutTLS when Token is set and TLS is not.
func New(opts Options) (*Client, error) {
	switch {
	case opts.Addr == "":
		return nil, errors.New("xds: Options.Addr is required")
	case opts.NodeID == "":
		return nil, errors.New("xds: Options.NodeID is required (the Kubernetes node name)")
	case opts.Store == nil:
		return nil, errors.New("xds: Options.Store is required")
	case opts.TLS == nil && opts.Token != nil:
		return nil, ErrTokenWithoutTLS
	}
	if opts.InitialBackoff <= 0 {
		opts.InitialBackoff = DefaultInitialBackoff
	}
	if opts.MaxBackoff < opts.InitialBackoff {
		opts.MaxBackoff = max(DefaultMaxBackoff, opts.InitialBackoff)
	}
	if opts.Keepalive == 0 {
		opts.Keepalive = DefaultKeepalive
	}
	if opts.MaxMessageSize <= 0 {
		opts.MaxMessageSize = DefaultMaxMessageSize
	}
	log := opts.Log
	if log == nil {
		log = slog.Default()
	}
	md := make(map[string]any, len(opts.Metadata))
	for k, v := range opts.Metadata {
		md[k] = v
	}
	meta, err := structpb.NewStruct(md)
	if err != nil {
		return nil, fmt.Errorf("xds: encoding node metadata: %w", err)
	}
	return &Client{
		opts:       opts,
		log:        log.With("component", "xds-client", "xds.addr", opts.Addr),
		node:       &core.Node{Id: opts.NodeID, Metadata: meta, UserAgentName: "ambit-ztunnel"},
		synced:     make(chan struct{}),
		ackedTypes: map[string]bool{},
	}, nil
}

// Synced is closed once a response of each type has been applied in full
// (acknowledged): the first is the full state, so from then on the store
// holds a complete configuration. ztunnel's readiness waits for it. It
// stays closed across reconnects: the store keeps the last good state.
func (c *Client) Synced() <-chan struct{} { return c.synced }

// Run connects, keeps the store in step with the server, and reconnects
// whenever the stream ends, until ctx is done; then it returns nil. It
// returns an error only when the connection cannot be set up at all. Call
// it once.
func (c *Client) Run(ctx context.Context) error {
	creds := insecure.NewCredentials()
	if c.opts.TLS != nil {
		creds = credentials.NewTLS(c.opts.TLS)
	}
	dialOpts := append([]grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(c.opts.MaxMessageSize)),
		// gRPC redials a broken connection on its own schedule (up to two
		// minutes apart by default) and fails streams fast meanwhile; keep
		// that schedule the same as the stream's.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: grpcbackoff.Config{
				BaseDelay:  c.opts.InitialBackoff,
				Multiplier: 2,
				Jitter:     0.2,
				MaxDelay:   c.opts.MaxBackoff,
			},
			MinConnectTimeout: 20 * time.Second,
		}),
	}, c.opts.DialOptions...)
	if c.opts.Keepalive > 0 {
		dialOpts = append(dialOpts, grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time: c.opts.Keepalive, Timeout: KeepaliveTimeout, PermitWithoutStream: true,
		}))
	}
	conn, err := grpc.NewClient(c.opts.Addr, dialOpts...)
	if err != nil {
		return fmt.Errorf("xds: setting up a client for %s: %w", c.opts.Addr, err)
	}
	defer func() { _ = conn.Close() }()
	ads := discovery.NewAggregatedDiscoveryServiceClient(conn)

	b := backoff{initial: c.opts.InitialBackoff, max: c.opts.MaxBackoff}
	b.reset()
	for {
		delivered, err := c.stream(ctx, ads)
		if ctx.Err() != nil {
			return nil
		}
		if delivered {
			b.reset()
		}
		delay := b.next()
		c.log.Warn("xDS stream ended; keeping the last good configuration and reconnecting",
			"error", err, "backoff", delay)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(delay):
		}
	}
}

// stream runs one ADS stream until it fails. delivered reports whether the
// server sent anything, which resets the backoff.
func (c *Client) stream(ctx context.Context, ads discovery.AggregatedDiscoveryServiceClient) (delivered bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if c.opts.Token != nil {
		tok, err := c.opts.Token()
		if err != nil {
			return false, fmt.Errorf("reading the service-account token: %w", err)
		}
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
	}
	st, err := ads.DeltaAggregatedResources(ctx)
	if err != nil {
		return false, fmt.Errorf("opening the ADS stream (is the controller reachable on %s?): %w", c.opts.Addr, err)
	}
	send := func(req *discovery.DeltaDiscoveryRequest) error {
		if err := st.Send(req); err != nil {
			// Send reports io.EOF when the stream is already over; the
			// reason is in Recv.
			if _, rerr := st.Recv(); rerr != nil {
				return rerr
			}
			return err
		}
		return nil
	}
	view := c.opts.Store.View()
	known := map[string][]string{
		AddressTypeURL:       view.AddressNames(),
		AuthorizationTypeURL: view.AuthorizationNames(),
	}
	for _, t := range typeURLs {
		// An empty version matches no real one, so the server resends
		// every resource that still exists and removes the rest.
		versions := make(map[string]string, len(known[t]))
		for _, name := range known[t] {
			versions[name] = ""
		}
		req := &discovery.DeltaDiscoveryRequest{
			Node:                    c.node,
			TypeUrl:                 t,
			ResourceNamesSubscribe:  []string{"*"},
			InitialResourceVersions: versions,
		}
		if err := send(req); err != nil {
			return false, fmt.Errorf("subscribing to %s: %w", t, err)
		}
	}
	c.log.Info("xDS stream open", "node", c.opts.NodeID,
		"xds.known_addresses", len(known[AddressTypeURL]), "xds.known_authorizations", len(known[AuthorizationTypeURL]))
	for {
		resp, err := st.Recv()
		if err != nil {
			return delivered, fmt.Errorf("receiving: %w", err)
		}
		delivered = true
		ack := c.apply(resp)
		if err := send(ack); err != nil {
			return delivered, fmt.Errorf("acknowledging %s: %w", resp.GetTypeUrl(), err)
		}
		if ack.GetErrorDetail() == nil {
			c.markSynced(resp.GetTypeUrl())
		}
	}
}

// apply applies one response to the store and returns the ACK, or the NACK
// naming every resource it could not use. Resources that decode are
// applied even when others in the same response do not; the ones that do
// not keep their previous version in the store.
func (c *Client) apply(resp *discovery.DeltaDiscoveryResponse) *discovery.DeltaDiscoveryRequest {
	typ := resp.GetTypeUrl()
	var rejects []string
	switch typ {
	case AddressTypeURL:
		upserts := make(map[string]*workloadapi.Address, len(resp.GetResources()))
		for _, r := range resp.GetResources() {
			a := &workloadapi.Address{}
			err := decode(r, typ, a)
			if err == nil {
				err = validateAddress(a)
			}
			if err != nil {
				rejects = append(rejects, fmt.Sprintf("%s: %v", r.GetName(), err))
				continue
			}
			upserts[r.GetName()] = a
		}
		c.opts.Store.ApplyAddresses(upserts, resp.GetRemovedResources())
	case AuthorizationTypeURL:
		upserts := make(map[string]*security.Authorization, len(resp.GetResources()))
		for _, r := range resp.GetResources() {
			a := &security.Authorization{}
			if err := decode(r, typ, a); err != nil {
				rejects = append(rejects, fmt.Sprintf("%s: %v", r.GetName(), err))
				continue
			}
			upserts[r.GetName()] = a
		}
		c.opts.Store.ApplyAuthorizations(upserts, resp.GetRemovedResources())
	default:
		rejects = append(rejects, fmt.Sprintf("type URL %q was not subscribed to", typ))
	}
	req := &discovery.DeltaDiscoveryRequest{TypeUrl: typ, ResponseNonce: resp.GetNonce()}
	if len(rejects) > 0 {
		req.ErrorDetail = &statuspb.Status{Code: int32(codes.InvalidArgument), Message: strings.Join(rejects, "; ")}
		c.log.Warn("rejecting xDS resources; keeping their last good versions", "xds.type", typ,
			"xds.version", resp.GetSystemVersionInfo(), "xds.nonce", resp.GetNonce(), "error", req.ErrorDetail.GetMessage())
	}
	c.log.Debug("xDS response applied", "xds.type", typ, "xds.version", resp.GetSystemVersionInfo(),
		"xds.nonce", resp.GetNonce(), "xds.upserted", len(resp.GetResources()), "xds.removed", len(resp.GetRemovedResources()),
		"xds.rejected", len(rejects))
	return req
}

func (c *Client) markSynced(typ string) {
	if c.ackedTypes[typ] {
		return
	}
	c.ackedTypes[typ] = true
	for _, t := range typeURLs {
		if !c.ackedTypes[t] {
			return
		}
	}
	c.syncOnce.Do(func() {
		w, s, p := c.opts.Store.View().Counts()
		c.log.Info("xDS synced", "workloads", w, "services", s, "authorizations", p)
		close(c.synced)
	})
}

// decode unpacks one delta resource into m.
func decode(r *discovery.Resource, typeURL string, m proto.Message) error {
	switch {
	case r.GetName() == "":
		return errors.New("resource has no name")
	case r.GetResource() == nil:
		return errors.New("resource has no body")
	case r.GetResource().GetTypeUrl() != typeURL:
		return fmt.Errorf("body of type %q in a %s response", r.GetResource().GetTypeUrl(), typeURL)
	}
	if err := proto.Unmarshal(r.GetResource().GetValue(), m); err != nil {
		return fmt.Errorf("decoding: %w", err)
	}
	return nil
}

// validateAddress rejects what the store could not index: an Address that
// is neither a workload nor a service, or an IP that is not 4 or 16 bytes.
func validateAddress(a *workloadapi.Address) error {
	switch t := a.GetType().(type) {
	case *workloadapi.Address_Workload:
		for _, ip := range t.Workload.GetAddresses() {
			if len(ip) != 4 && len(ip) != 16 {
				return fmt.Errorf("workload address of %d bytes", len(ip))
			}
		}
	case *workloadapi.Address_Service:
		for _, na := range t.Service.GetAddresses() {
			if ip := na.GetAddress(); len(ip) != 4 && len(ip) != 16 {
				return fmt.Errorf("service address of %d bytes", len(ip))
			}
		}
	default:
		return errors.New("address is neither a workload nor a service")
	}
	return nil
}

// backoff is exponential backoff with jitter: each delay is drawn from
// [d/2, d] where d doubles per attempt up to max, so that the ztunnels of a
// cluster do not all reconnect in step after a controller restart.
type backoff struct {
	initial, max, cur time.Duration
}

func (b *backoff) reset() { b.cur = b.initial }

func (b *backoff) next() time.Duration {
	d := b.cur
	b.cur = min(b.cur*2, b.max)
	half := d / 2
	return half + rand.N(d-half+1)
}
