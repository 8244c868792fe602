package hbone

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"

	"golang.org/x/net/http2"
)

// Port is the HBONE port (Istio's and Ambit's).
const Port = 15008

var (
	// ErrPoolClosed is returned by Connect after Pool.Close.
	ErrPoolClosed = errors.New("hbone: pool closed")
	// ErrServerClosed is returned by Serve after Shutdown or Close.
	ErrServerClosed = errors.New("hbone: server closed")
	// ErrWriteAfterCloseWrite is returned by Stream.Write after CloseWrite.
	ErrWriteAfterCloseWrite = errors.New("hbone: write after CloseWrite")
)

// Key says which pooled connection a stream may share: connections are
// never shared between source identities (each presents its own
// certificate), destination identities (each is verified separately) or
// destination addresses.
type Key struct {
	// SrcIdentity is the SPIFFE ID whose certificate the client presents.
	SrcIdentity string
	// DstIdentity is the SPIFFE ID the server must prove.
	DstIdentity string
	// Addr is the peer's HBONE address (its port is normally Port).
	Addr netip.AddrPort
}

func (k Key) String() string {
	return fmt.Sprintf("%s->%s@%s", k.SrcIdentity, k.DstIdentity, k.Addr)
}

// Stream is one proxied TCP connection: a net.Conn whose CloseWrite ends
// the sending direction (END_STREAM, the HTTP/2 form of a TCP FIN) while
// the other direction stays open. Read returns io.EOF once the peer ended
// its direction, and a *ResetError if it reset the stream.
//
// Close ends what this side sends (END_STREAM, if CloseWrite was not
// called) and, if the peer's direction has not ended, resets the stream
// with RST_STREAM CANCEL, as closing a TCP socket with data still arriving
// does. A stream must be closed: until then it holds its place in the
// connection. Write deadlines bound the wait for flow-control credit, not
// the shared connection's socket writes.
//
// The engine's streams also implement io.WriterTo and io.ReaderFrom, which
// io.Copy and Proxy use to copy without an intermediate buffer.
type Stream interface {
	net.Conn
	CloseWrite() error
}

// StatusError is the answer of a peer that refused a CONNECT: 401 when
// policy denied it, 400 for a malformed request, 503 when the destination
// could not be reached, and so on.
type StatusError struct {
	Code int
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("hbone: peer answered %d %s", e.Code, http.StatusText(e.Code))
}

// ResetError reports a stream reset with RST_STREAM, by the peer (Remote)
// or by this side after a protocol or flow-control error.
type ResetError struct {
	Code   uint32 // HTTP/2 error code (RFC 9113 section 7)
	Remote bool
}

func (e *ResetError) Error() string {
	by := "locally"
	if e.Remote {
		by = "by peer"
	}
	return fmt.Sprintf("hbone: stream reset %s: %v", by, http2.ErrCode(e.Code))
}

// Request is an incoming CONNECT that passed the server's checks.
type Request struct {
	// Authority is the :authority pseudo-header, the original destination.
	Authority string
	// Target is Authority parsed; the server only lets "ip:port" through.
	Target netip.AddrPort
	// Header holds the regular header fields (Forwarded, baggage, ...).
	Header http.Header
	// PeerCertificates is the client's verified chain, leaf first.
	PeerCertificates []*x509.Certificate
	// RemoteAddr and LocalAddr are the HBONE connection's addresses.
	RemoteAddr, LocalAddr net.Addr
}

// Handler serves CONNECT requests. It must call exactly one of the
// Responder's methods; if it returns without doing so the server answers
// 500. The stream is closed when ServeHBONE returns. ctx is cancelled when
// the stream is reset or its connection closes.
type Handler interface {
	ServeHBONE(ctx context.Context, req *Request, rw Responder)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, req *Request, rw Responder)

// ServeHBONE calls f.
func (f HandlerFunc) ServeHBONE(ctx context.Context, req *Request, rw Responder) { f(ctx, req, rw) }

// Responder answers a CONNECT.
type Responder interface {
	// Accept answers 200 and returns the tunnel.
	Accept() (Stream, error)
	// Reject answers with code (300 to 599) and ends the stream.
	Reject(code int) error
}

// Connector is the client half of an HBONE engine; *Pool implements it.
type Connector interface {
	// Connect opens a tunnel to target ("ip:port") through the peer k.Addr,
	// sending h as extra header fields. It returns once the peer answered
	// 200; any other answer is a *StatusError.
	Connect(ctx context.Context, k Key, target string, h http.Header) (Stream, error)
	// Close closes every connection, aborting the streams on them.
	Close() error
}

// Acceptor is the server half of an HBONE engine; *Server implements it.
type Acceptor interface {
	// Serve accepts HBONE connections on ln until Shutdown or Close.
	Serve(ln net.Listener) error
	// Shutdown stops accepting, tells peers to open no new streams
	// (GOAWAY) and waits for the open streams to finish or ctx to end.
	Shutdown(ctx context.Context) error
	// Close closes everything at once.
	Close() error
}

var (
	_ Connector = (*Pool)(nil)
	_ Acceptor  = (*Server)(nil)
)
