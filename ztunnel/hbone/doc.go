// Package hbone is ztunnel's HBONE engine: TCP connections carried as
// HTTP/2 CONNECT streams (RFC 9113 section 8.5), one stream per proxied
// connection, over TLS 1.3 with ALPN "h2" and certificates on both sides.
//
// The client side is a Pool of HTTP/2 connections keyed by (source
// identity, destination identity, destination address) on which streams
// are multiplexed; the server side is a Server that terminates connections
// and hands each valid CONNECT to a Handler. Both speak plain HTTP/2, so
// they interoperate with Istio's Rust ztunnel and with Go's x/net/http2.
//
// The engine is built on the x/net/http2 Framer with its own stream table
// and flow control rather than on http.Server/http.Transport, which costs
// about half the throughput on the same machine (see PERF-FACTS): frames
// are written straight to the TLS connection by the goroutine that has the
// data, the TLS records of a frame leave in one write(2), receive buffers
// are pooled 256 KiB blocks, and the windows are large (4 MiB per stream,
// 16 MiB per connection, 1 MiB frames, as Rust ztunnel uses).
//
// Callers depend only on Connector, Acceptor, Handler, Responder and
// Stream, so the engine can be replaced without touching them.
//
// Limits: the engine sends no keepalive PINGs of its own (it answers the
// peer's) and relies on TCP keepalive to find dead peers; a connection's
// socket writes have no deadline; HTTP/2 priorities are ignored; response
// headers other than :status are not passed to the client; a stream the
// caller never closes keeps its pooled connection from going idle.
//
// What the package deliberately does not do: it does not choose or verify
// certificates (the caller's tls.Config does, normally from the identity
// package), it does not create sockets in pod network namespaces or mark
// them (the caller's Dial does), it does not authorize (the Handler
// decides whether to Accept or Reject), and it does not dial the final
// destination (the Handler does, and may use Proxy to copy the bytes).
package hbone
