package hbone

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// rawClient speaks HTTP/2 frame by frame to a server.
type rawClient struct {
	t    *testing.T
	tc   *tls.Conn
	fr   *http2.Framer
	enc  *hpack.Encoder
	hbuf bytes.Buffer
}

func dialRaw(t *testing.T, e *env) *rawClient {
	t.Helper()
	cfg := e.pki.clientTLS(clientID, serverID)
	cfg.NextProtos = []string{"h2"}
	tc, err := tls.Dial("tcp", e.key.Addr.String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tc.Close() })
	_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
	c := &rawClient{t: t, tc: tc, fr: http2.NewFramer(tc, tc)}
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.enc = hpack.NewEncoder(&c.hbuf)
	if _, err := io.WriteString(tc, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := c.fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return c
}

// request sends a header block on stream id; fields alternate name, value.
func (c *rawClient) request(id uint32, endStream bool, fields ...string) {
	c.hbuf.Reset()
	for i := 0; i < len(fields); i += 2 {
		_ = c.enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	if err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: c.hbuf.Bytes(), EndHeaders: true, EndStream: endStream}); err != nil {
		c.t.Fatal(err)
	}
}

// status reads frames until the response on stream id and returns its
// :status, acknowledging SETTINGS on the way.
func (c *rawClient) status(id uint32) string {
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			c.t.Fatalf("waiting for the response on stream %d: %v", id, err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				_ = c.fr.WriteSettingsAck()
			}
		case *http2.MetaHeadersFrame:
			if f.StreamID == id {
				return f.PseudoValue("status")
			}
		case *http2.GoAwayFrame:
			c.t.Fatalf("GOAWAY %v waiting for stream %d", f.ErrCode, id)
		}
	}
}

func TestMalformedRequests(t *testing.T) {
	checkLeaks(t)
	e := newEnv(t, echoHandler)
	c := dialRaw(t, e)
	tests := []struct {
		name   string
		fields []string
		reason string
	}{
		{"not CONNECT", []string{":method", "POST", ":authority", "10.0.0.1:80"}, "is not CONNECT"},
		{"GET with path", []string{":method", "GET", ":scheme", "https", ":authority", "10.0.0.1:80", ":path", "/"}, "CONNECT with :scheme"},
		{"no authority", []string{":method", "CONNECT"}, "missing :authority"},
		{"host name", []string{":method", "CONNECT", ":authority", "example.com:443"}, "example.com:443"},
		{"no port", []string{":method", "CONNECT", ":authority", "10.0.0.1"}, "is not ip:port"},
		{"port 0", []string{":method", "CONNECT", ":authority", "10.0.0.1:0"}, "is not ip:port"},
		{"path and scheme", []string{":method", "CONNECT", ":authority", "10.0.0.1:80", ":scheme", "https", ":path", "/x"}, "CONNECT with :scheme"},
		{"extended CONNECT", []string{":method", "CONNECT", ":protocol", "websocket", ":authority", "10.0.0.1:80"}, "extended CONNECT"},
		{"upper-case field", []string{":method", "CONNECT", ":authority", "10.0.0.1:80", "Forwarded", "x"}, "malformed header block"},
		{"pseudo after regular", []string{":method", "CONNECT", "baggage", "x", ":authority", "10.0.0.1:80"}, "malformed header block"},
	}
	for i, tc := range tests {
		id := uint32(2*i + 1)
		t.Run(tc.name, func(t *testing.T) {
			c.t = t
			c.request(id, false, tc.fields...)
			if got := c.status(id); got != "400" {
				t.Fatalf(":status %s, want 400", got)
			}
			if logs := e.logs.String(); !strings.Contains(logs, "rejecting malformed request") || !strings.Contains(logs, tc.reason) {
				t.Fatalf("no log line with %q in:\n%s", tc.reason, logs)
			}
		})
	}
	// The connection survives them all.
	c.t = t
	id := uint32(2*len(tests) + 1)
	c.request(id, true, ":method", "CONNECT", ":authority", "10.0.0.1:80")
	if got := c.status(id); got != "200" {
		t.Fatalf("valid CONNECT after the malformed ones: :status %s", got)
	}
	_ = c.fr.WritePing(false, [8]byte{1, 2, 3})
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if p, ok := f.(*http2.PingFrame); ok {
			if !p.IsAck() || p.Data != [8]byte{1, 2, 3} {
				t.Fatalf("PING answer %v", p)
			}
			break
		}
	}
}

// TestFlowControlViolations sends more DATA than the server's windows
// allow: over a stream window resets the stream, over the connection
// window ends the connection (RFC 9113 section 6.9.1).
func TestFlowControlViolations(t *testing.T) {
	checkLeaks(t)
	streams := make(chan Stream, 10)
	done := make(chan struct{})
	defer close(done)
	e := newEnv(t, acceptStream(streams, done)) // never reads
	c := dialRaw(t, e)
	chunk := make([]byte, 1<<20)
	send := func(id uint32, n int) {
		for ; n > 0; n -= len(chunk) {
			if err := c.fr.WriteData(id, false, chunk[:min(n, len(chunk))]); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Frames until one that matters: RST_STREAM or GOAWAY.
	next := func() http2.Frame {
		for {
			f, err := c.fr.ReadFrame()
			if err != nil {
				t.Fatal(err)
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() {
					_ = c.fr.WriteSettingsAck()
				}
			case *http2.RSTStreamFrame, *http2.GoAwayFrame:
				return f
			}
		}
	}
	c.request(1, false, ":method", "CONNECT", ":authority", "10.0.0.1:80")
	if got := c.status(1); got != "200" {
		t.Fatalf(":status %s", got)
	}
	send(1, streamWindow+1)
	if f, ok := next().(*http2.RSTStreamFrame); !ok || f.StreamID != 1 || f.ErrCode != http2.ErrCodeFlowControl {
		t.Fatalf("got %v, want RST_STREAM FLOW_CONTROL_ERROR on stream 1", f)
	}
	// Stream 1's data still counts against the connection window, as does
	// what fills streams 3, 5 and 7 to their windows; one byte more is too much.
	used := streamWindow + 1
	for id := uint32(3); used < connWindow; id += 2 {
		c.request(id, false, ":method", "CONNECT", ":authority", "10.0.0.1:80")
		c.status(id)
		n := min(streamWindow, connWindow-used)
		send(id, n)
		used += n
	}
	c.request(9, false, ":method", "CONNECT", ":authority", "10.0.0.1:80")
	c.status(9)
	send(9, 1)
	if f, ok := next().(*http2.GoAwayFrame); !ok || f.ErrCode != http2.ErrCodeFlowControl {
		t.Fatalf("got %v, want GOAWAY FLOW_CONTROL_ERROR", f)
	}
}

// TestXNetClient connects to our server the way Istio's Go HBONE client
// (istio.io/istio/pkg/hbone) does: an x/net http2.Transport round trip of a
// bare CONNECT whose body is a pipe.
func TestXNetClient(t *testing.T) {
	checkLeaks(t)
	h := HandlerFunc(func(ctx context.Context, req *Request, rw Responder) {
		if req.Target.Port() == 401 {
			_ = rw.Reject(http.StatusUnauthorized)
			return
		}
		echoHandler(ctx, req, rw)
	})
	e := newEnv(t, h)
	tr := &http2.Transport{TLSClientConfig: e.pki.clientTLS(clientID, serverID)} //nolint:staticcheck // x/net/http2 on purpose: an independent HTTP/2 peer
	defer tr.CloseIdleConnections()                                              //nolint:staticcheck // x/net/http2 on purpose: an independent HTTP/2 peer
	connect := func(target string, body io.Reader) (*http.Response, error) {
		req := &http.Request{
			Method: http.MethodConnect,
			URL:    &url.URL{Scheme: "https", Host: e.key.Addr.String()},
			Host:   target,
			Header: http.Header{},
			Body:   io.NopCloser(body),
		}
		return tr.RoundTrip(req) //nolint:staticcheck // x/net/http2 on purpose: an independent HTTP/2 peer
	}

	pr, pw := io.Pipe()
	resp, err := connect("10.0.0.1:80", pr)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	payload := bytes.Repeat([]byte("x/net interop "), 300000) // ~4 MiB: several windows
	go func() {
		_, _ = pw.Write(payload)
		_ = pw.Close()
	}()
	got, err := io.ReadAll(resp.Body)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("echoed %d bytes, %v; want %d", len(got), err, len(payload))
	}
	_ = resp.Body.Close()

	resp, err = connect("10.0.0.1:401", http.NoBody)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != 401 {
		t.Fatalf("status %d, want 401", resp.StatusCode)
	}
}

// TestXNetServer connects our pool to an x/net http2.Server whose handler
// answers CONNECT by streaming the request body back, flushing as it goes,
// the way Istio's Go HBONE server does.
func TestXNetServer(t *testing.T) {
	checkLeaks(t)
	p := getPKI(t)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodConnect {
			w.WriteHeader(http.StatusMethodNotAllowed)
			return
		}
		if r.Host == "10.0.0.1:401" {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		buf := make([]byte, 32<<10)
		for {
			n, err := r.Body.Read(buf)
			if n > 0 {
				_, _ = w.Write(buf[:n])
				w.(http.Flusher).Flush()
			}
			if err != nil {
				return
			}
		}
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := p.serverTLS(serverID)
	cfg.NextProtos = []string{"h2"}
	h2s := &http2.Server{} //nolint:staticcheck // x/net/http2 on purpose: an independent HTTP/2 peer
	var wg sync.WaitGroup
	defer wg.Wait()
	defer func() { _ = l.Close() }()
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				tc := tls.Server(c, cfg)
				if err := tc.Handshake(); err != nil {
					_ = c.Close()
					return
				}
				h2s.ServeConn(tc, &http2.ServeConnOpts{Handler: handler}) //nolint:staticcheck // x/net/http2 on purpose: an independent HTTP/2 peer
			})
		}
	})
	pool := newConnector(PoolOptions{TLSConfig: func(k Key) (*tls.Config, error) { return p.clientTLS(k.SrcIdentity, k.DstIdentity), nil }})
	defer func() { _ = pool.Close() }()
	k := Key{SrcIdentity: clientID, DstIdentity: serverID, Addr: netip.MustParseAddrPort(l.Addr().String())}

	for range 3 { // several streams on one connection
		s, err := pool.Connect(context.Background(), k, "10.0.0.1:80", nil)
		if err != nil {
			t.Fatal(err)
		}
		payload := bytes.Repeat([]byte("to x/net and back "), 500000) // ~9 MiB
		go func() {
			_, _ = s.Write(payload)
			_ = s.CloseWrite()
		}()
		h := sha256.New()
		n, err := io.Copy(h, s)
		if err != nil || n != int64(len(payload)) || !bytes.Equal(h.Sum(nil), sha256Sum(payload)) {
			t.Fatalf("echoed %d bytes (%v), want %d intact", n, err, len(payload))
		}
		_ = s.Close()
	}
	_, err = pool.Connect(context.Background(), k, "10.0.0.1:401", nil)
	var se *StatusError
	if !errors.As(err, &se) || se.Code != 401 {
		t.Fatalf("Connect: %v, want 401", err)
	}
}

func sha256Sum(b []byte) []byte {
	s := sha256.Sum256(b)
	return s[:]
}
