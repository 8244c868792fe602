package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// PoolOptions configures a Pool.
type PoolOptions struct {
	// Dial opens the TCP connection to a peer. It is where the caller sets
	// SO_MARK or dials from a pod's network namespace. nil means a plain
	// net.Dialer.
	Dial func(ctx context.Context, addr netip.AddrPort) (net.Conn, error)
	// TLSConfig returns the configuration for a connection: the client
	// certificate of k.SrcIdentity and verification that the server is
	// k.DstIdentity. The pool forces TLS 1.3 and ALPN "h2" on a clone.
	TLSConfig func(k Key) (*tls.Config, error)
	// MaxStreamsPerConn is how many streams share a connection before the
	// pool opens another (default 100); a lower
	// SETTINGS_MAX_CONCURRENT_STREAMS from the peer wins.
	MaxStreamsPerConn int
	// IdleTimeout closes connections without streams for this long
	// (default 5 minutes; negative: never).
	IdleTimeout time.Duration
	// KeepaliveInterval is how long a connection may go without receiving
	// anything before the pool PINGs the peer (default 10s; negative:
	// never), and KeepaliveTimeout how long it then waits for anything to
	// arrive before it fails the connection and its streams (default 20s).
	KeepaliveInterval time.Duration
	KeepaliveTimeout  time.Duration
	// DialTimeout bounds the TCP connect and TLS handshake (default 10s).
	// A dial is shared by the Connects waiting for it, so it is not
	// cancelled with any one of them.
	DialTimeout time.Duration
	// Log receives connection-level events; nil means slog.Default().
	Log *slog.Logger
}

// Pool is the client side of HBONE: it keeps HTTP/2 connections per Key
// and multiplexes CONNECT streams on them, opening a connection when none
// has room and closing those that stay idle. A connection whose peer sent
// GOAWAY takes no new streams.
type Pool struct {
	o      PoolOptions
	log    *slog.Logger
	ctx    context.Context // cancelled by Close: aborts dials
	cancel context.CancelFunc

	mu     sync.Mutex
	conns  map[Key][]*conn
	dials  map[Key]*dialCall
	closed bool
	wg     sync.WaitGroup // dials and frame readers
}

// dialCall is a connection being opened, shared by the Connects waiting.
type dialCall struct {
	done chan struct{}
	err  error
}

// NewPool returns an empty pool.
func NewPool(o PoolOptions) *Pool {
	if o.MaxStreamsPerConn <= 0 {
		o.MaxStreamsPerConn = defaultClientStreams
	}
	switch {
	case o.IdleTimeout == 0:
		o.IdleTimeout = 5 * time.Minute
	case o.IdleTimeout < 0:
		o.IdleTimeout = 0
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = handshakeTimeout
	}
	o.KeepaliveInterval, o.KeepaliveTimeout = keepaliveDefaults(o.KeepaliveInterval, o.KeepaliveTimeout)
	if o.Dial == nil {
		o.Dial = func(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr.String())
		}
	}
	p := &Pool{o: o, log: o.Log, conns: make(map[Key][]*conn), dials: make(map[Key]*dialCall)}
	if p.log == nil {
		p.log = slog.Default()
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	return p
}

// Connect opens a CONNECT stream to target ("ip:port") through the peer
// k.Addr, with h as extra header fields (Forwarded, baggage). It returns
// when the peer answers 200; any other answer is a *StatusError. Streams
// the peer provably did not process (REFUSED_STREAM, GOAWAY) are retried
// on another connection.
func (p *Pool) Connect(ctx context.Context, k Key, target string, h http.Header) (Stream, error) {
	if _, err := parseTarget(target); err != nil {
		return nil, fmt.Errorf("hbone: %w", err)
	}
	if err := validHeader(h); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var err error
	for range 3 {
		var c *conn
		if c, err = p.get(ctx, k); err != nil {
			return nil, err
		}
		var s *stream
		if s, err = c.connect(ctx, target, h); err == nil {
			return s, nil
		}
		if !errors.Is(err, errUnprocessed) {
			return nil, err
		}
	}
	return nil, err
}

// get returns a connection for k with a stream slot reserved on it.
func (p *Pool) get(ctx context.Context, k Key) (*conn, error) {
	p.mu.Lock()
	for {
		if p.closed {
			p.mu.Unlock()
			return nil, ErrPoolClosed
		}
		for _, c := range p.conns[k] {
			if c.reserve(p.o.MaxStreamsPerConn) {
				p.mu.Unlock()
				return c, nil
			}
		}
		d := p.dials[k]
		if d == nil {
			d = &dialCall{done: make(chan struct{})}
			p.dials[k] = d
			p.wg.Add(1)
			go p.dial(k, d)
		}
		p.mu.Unlock()
		select {
		case <-d.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if d.err != nil {
			return nil, d.err
		}
		p.mu.Lock()
	}
}

func (p *Pool) dial(k Key, d *dialCall) {
	defer p.wg.Done()
	ctx, cancel := context.WithTimeout(p.ctx, p.o.DialTimeout)
	defer cancel()
	c, err := p.open(ctx, k)
	p.mu.Lock()
	delete(p.dials, k)
	closed := err == nil && p.closed
	if closed {
		err = ErrPoolClosed
	}
	if err == nil {
		p.conns[k] = append(p.conns[k], c)
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			c.readLoop()
		}()
	}
	d.err = err
	close(d.done)
	p.mu.Unlock()
	if closed {
		c.fail(ErrPoolClosed) // not under p.mu: fail calls back into the pool
	}
	if err != nil {
		p.log.Debug("hbone: dial failed", "dst.addr", k.Addr, "identity", k.SrcIdentity, "error", err)
		return
	}
	// Nobody may want the connection any more: start its idle clock.
	c.mu.Lock()
	c.idleLocked()
	c.mu.Unlock()
}

// open dials, handshakes and sends the HTTP/2 preface.
func (p *Pool) open(ctx context.Context, k Key) (*conn, error) {
	if p.o.TLSConfig == nil {
		return nil, errors.New("hbone: PoolOptions.TLSConfig is nil")
	}
	cfg, err := p.o.TLSConfig(k)
	if err != nil {
		return nil, fmt.Errorf("hbone: TLS configuration for %s: %w", k, err)
	}
	cfg = cfg.Clone()
	cfg.NextProtos = []string{"h2"}
	cfg.MinVersion = tls.VersionTLS13
	cfg.DynamicRecordSizingDisabled = true
	raw, err := p.o.Dial(ctx, k.Addr)
	if err != nil {
		return nil, fmt.Errorf("hbone: dialing %s for %s (is port %d reachable, or does a NetworkPolicy block it?): %w", k.Addr, k.SrcIdentity, k.Addr.Port(), err)
	}
	w := newWire(raw)
	tc := tls.Client(w, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		_ = raw.Close() // the handshake error is the one to report
		return nil, fmt.Errorf("hbone: TLS handshake with %s as %s, expecting %s: %w", k.Addr, k.SrcIdentity, k.DstIdentity, err)
	}
	if proto := tc.ConnectionState().NegotiatedProtocol; proto != "h2" {
		_ = raw.Close() // the ALPN error is the one to report
		return nil, fmt.Errorf("hbone: %s negotiated ALPN %q instead of h2: not an HBONE endpoint?", k.Addr, proto)
	}
	c := newConn(clientRole, raw, w, tc, p.log)
	c.idleTimeout = p.o.IdleTimeout
	c.keepalive = keepalive{p.o.KeepaliveInterval, p.o.KeepaliveTimeout}
	c.onDrain = func(c *conn) { p.remove(k, c) }
	if err := c.start(); err != nil {
		c.fail(err)
		return nil, fmt.Errorf("hbone: starting HTTP/2 with %s: %w", k.Addr, err)
	}
	return c, nil
}

// remove forgets a connection that takes no new streams.
func (p *Pool) remove(k Key, c *conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	list := p.conns[k]
	if i := slices.Index(list, c); i >= 0 {
		list = slices.Delete(list, i, i+1)
	}
	if len(list) == 0 {
		delete(p.conns, k)
	} else {
		p.conns[k] = list
	}
}

// Close sends GOAWAY on every connection and closes them, aborting their
// streams, and waits for the pool's goroutines.
func (p *Pool) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	var all []*conn
	for _, list := range p.conns {
		all = append(all, list...)
	}
	clear(p.conns)
	p.mu.Unlock()
	p.cancel()
	var wg sync.WaitGroup
	for _, c := range all {
		wg.Go(func() {
			c.goAway(http2.ErrCodeNo, "")
			c.closeGracefully()
		})
	}
	wg.Wait()
	p.wg.Wait()
	return nil
}
