package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime/debug"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// ServerOptions configures a Server.
type ServerOptions struct {
	// TLSConfig holds the server certificate and the verification of
	// client certificates (HBONE requires them: set ClientAuth). The server
	// forces TLS 1.3 and ALPN "h2" on a clone.
	TLSConfig *tls.Config
	// Handler serves the CONNECT requests that pass the server's checks.
	Handler Handler
	// MaxConcurrentStreams is advertised per connection (default 1000).
	MaxConcurrentStreams uint32
	// KeepaliveInterval and KeepaliveTimeout are as in PoolOptions: a
	// client that goes silent is PINGed and, failing an answer, its
	// connection and streams are closed (defaults 10s and 20s; a negative
	// interval: never).
	KeepaliveInterval time.Duration
	KeepaliveTimeout  time.Duration
	// Log receives rejected requests and connection-level events; nil
	// means slog.Default().
	Log *slog.Logger
}

// Server is the server side of HBONE. It answers 400 itself, before any
// Handler, to a request that is not a plain CONNECT to "ip:port".
type Server struct {
	o   ServerOptions
	cfg *tls.Config
	log *slog.Logger

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	pending   map[net.Conn]struct{} // handshaking
	conns     map[*conn]struct{}
	shutting  bool
	connGone  chan struct{}  // a connection went away
	wg        sync.WaitGroup // connection and handler goroutines
}

// NewServer returns a server; call Serve to start it.
func NewServer(o ServerOptions) *Server {
	if o.MaxConcurrentStreams == 0 {
		o.MaxConcurrentStreams = defaultServerStreams
	}
	o.KeepaliveInterval, o.KeepaliveTimeout = keepaliveDefaults(o.KeepaliveInterval, o.KeepaliveTimeout)
	s := &Server{
		o:         o,
		log:       o.Log,
		listeners: make(map[net.Listener]struct{}),
		pending:   make(map[net.Conn]struct{}),
		conns:     make(map[*conn]struct{}),
		connGone:  make(chan struct{}, 1),
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	if o.TLSConfig != nil {
		s.cfg = o.TLSConfig.Clone()
		s.cfg.NextProtos = []string{"h2"}
		s.cfg.MinVersion = tls.VersionTLS13
		s.cfg.DynamicRecordSizingDisabled = true
	}
	return s
}

// Serve accepts connections on ln and serves them, each in its own
// goroutine, until Shutdown or Close (then it returns ErrServerClosed).
func (srv *Server) Serve(ln net.Listener) error {
	if srv.cfg == nil || srv.o.Handler == nil {
		return errors.New("hbone: ServerOptions needs TLSConfig and Handler")
	}
	srv.mu.Lock()
	if srv.shutting {
		srv.mu.Unlock()
		return ErrServerClosed
	}
	srv.listeners[ln] = struct{}{}
	srv.mu.Unlock()
	defer func() {
		srv.mu.Lock()
		delete(srv.listeners, ln)
		srv.mu.Unlock()
	}()
	var backoff time.Duration
	for {
		raw, err := ln.Accept()
		if err != nil {
			srv.mu.Lock()
			shutting := srv.shutting
			srv.mu.Unlock()
			if shutting {
				return ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of file descriptors and the like: wait and go on.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			srv.log.Warn("hbone: accept failed", "error", err, "retry_in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		srv.mu.Lock()
		if srv.shutting {
			srv.mu.Unlock()
			_ = raw.Close()
			return ErrServerClosed
		}
		srv.pending[raw] = struct{}{}
		srv.wg.Add(1)
		srv.mu.Unlock()
		go srv.serveConn(raw)
	}
}

func (srv *Server) serveConn(raw net.Conn) {
	defer srv.wg.Done()
	c, err := srv.handshake(raw)
	srv.mu.Lock()
	delete(srv.pending, raw)
	if err == nil && srv.shutting {
		err = ErrServerClosed
	}
	if err == nil {
		srv.conns[c] = struct{}{}
	}
	srv.mu.Unlock()
	if err != nil {
		if !errors.Is(err, ErrServerClosed) {
			srv.log.Info("hbone: rejecting connection", "peer", raw.RemoteAddr(), "error", err)
		}
		_ = raw.Close() // rejected: nothing to report a close error to
		return
	}
	defer func() {
		srv.mu.Lock()
		delete(srv.conns, c)
		srv.mu.Unlock()
		select {
		case srv.connGone <- struct{}{}:
		default:
		}
	}()
	if err := c.start(); err != nil {
		c.fail(err)
		return
	}
	c.readLoop()
}

// handshake runs TLS and reads the client's HTTP/2 preface.
func (srv *Server) handshake(raw net.Conn) (*conn, error) {
	_ = raw.SetDeadline(time.Now().Add(handshakeTimeout)) // a failing socket fails the handshake below
	w := newWire(raw)
	tc := tls.Server(w, srv.cfg)
	if err := tc.Handshake(); err != nil {
		return nil, fmt.Errorf("TLS handshake: %w", err)
	}
	if proto := tc.ConnectionState().NegotiatedProtocol; proto != "h2" {
		return nil, fmt.Errorf("client negotiated ALPN %q instead of h2", proto)
	}
	preface := make([]byte, len(clientPreface))
	if _, err := io.ReadFull(tc, preface); err != nil {
		return nil, fmt.Errorf("reading HTTP/2 preface: %w", err)
	}
	if !bytes.Equal(preface, clientPreface) {
		return nil, fmt.Errorf("bad HTTP/2 preface %q", preface)
	}
	_ = raw.SetDeadline(time.Time{}) // a failing socket fails the first read/write
	c := newConn(serverRole, raw, w, tc, srv.log)
	c.maxStreams = srv.o.MaxConcurrentStreams
	c.keepalive = keepalive{srv.o.KeepaliveInterval, srv.o.KeepaliveTimeout}
	c.onStream = srv.startStream
	return c, nil
}

// startStream runs the handler for a new stream. Called by the frame
// reader, whose connection goroutine keeps srv.wg above zero.
func (srv *Server) startStream(s *stream, req *Request) {
	srv.wg.Add(1)
	go srv.serveStream(s, req)
}

func (srv *Server) serveStream(s *stream, req *Request) {
	defer srv.wg.Done()
	rw := &responder{s: s}
	defer func() {
		if v := recover(); v != nil {
			srv.log.Error("hbone: handler panicked", "peer", req.RemoteAddr, "dst.addr", req.Authority, "panic", v, "stack", string(debug.Stack()))
			s.abort(http2.ErrCodeInternal)
			return
		}
		rw.mu.Lock()
		answered := rw.answered
		rw.mu.Unlock()
		if !answered {
			srv.log.Error("hbone: handler returned without answering", "peer", req.RemoteAddr, "dst.addr", req.Authority)
			_ = rw.Reject(http.StatusInternalServerError) // best effort: the stream is closed next
		}
		_ = s.Close() // the handler is done with the stream
	}()
	srv.o.Handler.ServeHBONE(s.ctx, req, rw)
}

// Shutdown stops accepting, sends GOAWAY on every connection, and waits
// until their streams are done and the handlers have returned, or ctx
// ends (then it closes what is left and returns ctx.Err()).
func (srv *Server) Shutdown(ctx context.Context) error {
	conns := srv.stop()
	for _, c := range conns {
		c.shutdown()
	}
	for {
		srv.mu.Lock()
		n := len(srv.conns)
		srv.mu.Unlock()
		if n == 0 {
			break
		}
		select {
		case <-srv.connGone:
		case <-ctx.Done():
			_ = srv.Close()
			return ctx.Err()
		}
	}
	done := make(chan struct{})
	go func() {
		srv.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close closes listeners and connections at once and waits for the
// connection goroutines and handlers.
func (srv *Server) Close() error {
	for _, c := range srv.stop() {
		c.fail(ErrServerClosed)
	}
	srv.wg.Wait()
	return nil
}

// stop refuses new connections and returns the established ones.
func (srv *Server) stop() []*conn {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	srv.shutting = true
	for ln := range srv.listeners {
		_ = ln.Close() // shutting down
	}
	for raw := range srv.pending {
		_ = raw.Close() // shutting down
	}
	conns := make([]*conn, 0, len(srv.conns))
	for c := range srv.conns {
		conns = append(conns, c)
	}
	return conns
}

// responder answers one request.
type responder struct {
	s        *stream
	mu       sync.Mutex
	answered bool
}

var errAnswered = errors.New("hbone: request already answered")

func (r *responder) answer() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.answered {
		return errAnswered
	}
	r.answered = true
	return nil
}

func (r *responder) Accept() (Stream, error) {
	if err := r.answer(); err != nil {
		return nil, err
	}
	if err := r.s.c.writeStatus(r.s.id, http.StatusOK, false); err != nil {
		return nil, err
	}
	return r.s, nil
}

func (r *responder) Reject(code int) error {
	if code < 300 || code > 599 {
		return fmt.Errorf("hbone: cannot reject with status %d", code)
	}
	if err := r.answer(); err != nil {
		return err
	}
	s, c := r.s, r.s.c
	err := c.writeStatus(s.id, code, true)
	c.mu.Lock()
	s.sentEnd = true
	sendRST := !s.remoteEnded
	drained := c.removeLocked(s, ErrWriteAfterCloseWrite)
	c.mu.Unlock()
	if sendRST {
		// RFC 9113 section 8.1: the response is complete; tell the client
		// to stop sending, without an error.
		c.writeReset(s.id, http2.ErrCodeNo)
	}
	s.closeRead()
	c.afterRemove(drained)
	return err
}
