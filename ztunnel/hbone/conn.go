package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Flow-control and framing parameters. The windows and frame size are Rust
// ztunnel's; receive windows under 1 MiB and 16 KiB frames each cost 20-40%
// of the throughput here (PERF-FACTS).
const (
	streamWindow      = 4 << 20  // SETTINGS_INITIAL_WINDOW_SIZE we advertise
	connWindow        = 16 << 20 // connection receive window
	maxFrameSize      = 1 << 20  // SETTINGS_MAX_FRAME_SIZE we advertise, and our largest DATA frame
	maxHeaderListSize = 64 << 10 // SETTINGS_MAX_HEADER_LIST_SIZE we advertise

	defaultServerStreams = 1000 // SETTINGS_MAX_CONCURRENT_STREAMS a Server advertises
	defaultClientStreams = 100  // streams per pooled connection (Rust ztunnel's default)

	initialWindow  = 65535 // RFC 9113 section 6.9.2
	initialFrame   = 16384 // RFC 9113 section 6.5.2
	maxWindow      = 1<<31 - 1
	maxStreamID    = 1<<31 - 1
	frameHeaderLen = 9

	// smallData is the largest payload copied behind its frame header so
	// that both go out as one TLS record; larger payloads get a record of
	// their own rather than a copy.
	smallData = 4 << 10

	handshakeTimeout = 10 * time.Second
	closeTimeout     = time.Second // for the last frames of a closing connection

	// A connection on which nothing arrived for keepaliveInterval gets a
	// PING; if nothing arrives within keepaliveTimeout of it, the peer is
	// taken for gone and the connection fails (its streams with it), so
	// that a pooled connection to a dead node or a partitioned one does not
	// take new streams for the kernel's retransmission timeout (about 15
	// minutes). Rust ztunnel's pool uses the same PING keepalive.
	defaultKeepaliveInterval = 10 * time.Second
	defaultKeepaliveTimeout  = 20 * time.Second
)

// errKeepaliveTimeout fails a connection whose peer did not answer a
// keepalive PING in time.
var errKeepaliveTimeout = errors.New("hbone: peer did not answer a keepalive PING in time")

// keepalive is a connection's PING keepalive; zero interval: none.
type keepalive struct {
	interval, timeout time.Duration
}

// keepaliveDefaults applies the options' defaults: zero is the default, a
// negative interval turns the keepalive off (interval 0).
func keepaliveDefaults(interval, timeout time.Duration) (time.Duration, time.Duration) {
	switch {
	case interval == 0:
		interval = defaultKeepaliveInterval
	case interval < 0:
		return 0, 0
	}
	if timeout <= 0 {
		timeout = defaultKeepaliveTimeout
	}
	return interval, timeout
}

var clientPreface = []byte(http2.ClientPreface)

// errUnprocessed marks a stream the peer did not process (REFUSED_STREAM,
// or above the last stream ID of a GOAWAY): it is safe to retry elsewhere.
var errUnprocessed = errors.New("hbone: stream not processed by peer")

type role uint8

const (
	clientRole role = iota
	serverRole
)

// h2Error is a connection error (RFC 9113 section 5.4.1): the reader sends
// GOAWAY with code and closes the connection.
type h2Error struct {
	code   http2.ErrCode
	reason string
}

func (e *h2Error) Error() string { return fmt.Sprintf("hbone: %v: %s", e.code, e.reason) }

func connError(code http2.ErrCode, format string, args ...any) error {
	return &h2Error{code: code, reason: fmt.Sprintf(format, args...)}
}

type peerSettings struct {
	initialWindow int64
	maxFrame      int
	maxStreams    uint32
}

// conn is one HTTP/2 connection over TLS, in either role.
type conn struct {
	role      role
	raw       net.Conn
	w         *wire
	tc        *tls.Conn
	fr        *http2.Framer
	log       *slog.Logger
	ctx       context.Context // cancelled when the connection closes
	cancel    context.CancelFunc
	peerCerts []*x509.Certificate

	// Set before start and not changed after.
	maxStreams  uint32        // server: SETTINGS_MAX_CONCURRENT_STREAMS
	idleTimeout time.Duration // client: close when idle this long
	keepalive   keepalive
	onStream    func(s *stream, req *Request)
	onDrain     func(c *conn) // no new streams from now on (called once, without locks)
	onClose     func(c *conn)

	// wmu serialises frame writes: frames are encrypted in the order they
	// are written, and so reach the wire in that order.
	wmu   sync.Mutex
	henc  *hpack.Encoder
	hbuf  bytes.Buffer
	small []byte
	hdr   [frameHeaderLen]byte
	ctl   [frameHeaderLen]byte // scratch for END_STREAM frames written by hand

	mu          sync.Mutex
	flow        sync.Cond // send windows grew, or a stream or the connection failed
	streams     map[uint32]*stream
	nextID      uint32 // client: the next stream ID to open
	lastID      uint32 // server: the highest stream ID the peer opened
	reserved    int    // client: pool reservations not yet streams
	sendWin     int64  // connection send window
	recvAvail   int64  // bytes the peer may still send on the connection
	recvUnacked int64  // bytes consumed and not yet returned with WINDOW_UPDATE
	peer        peerSettings
	draining    bool
	drainedOnce bool
	closed      bool
	err         error
	idleTimer   *time.Timer
	done        chan struct{}

	// framesRead counts the frames read: the keepalive's sign of life.
	framesRead atomic.Uint64

	// Owned by the frame reader. The scratch holds small control payloads
	// and dropped DATA; it is small because every connection has one.
	sawSettings bool
	rscratch    [1 << 10]byte
}

func newConn(r role, raw net.Conn, w *wire, tc *tls.Conn, log *slog.Logger) *conn {
	c := &conn{
		role:      r,
		raw:       raw,
		w:         w,
		tc:        tc,
		log:       log,
		streams:   make(map[uint32]*stream),
		sendWin:   initialWindow,
		recvAvail: connWindow,
		peer:      peerSettings{initialWindow: initialWindow, maxFrame: initialFrame, maxStreams: maxStreamID},
		small:     make([]byte, frameHeaderLen+smallData),
		done:      make(chan struct{}),
	}
	if r == clientRole {
		c.nextID = 1
	}
	c.flow.L = &c.mu
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.peerCerts = tc.ConnectionState().PeerCertificates
	c.fr = http2.NewFramer(tc, tc)
	c.fr.SetMaxReadFrameSize(maxFrameSize)
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = maxHeaderListSize
	c.henc = hpack.NewEncoder(&c.hbuf)
	return c
}

// start sends the preface and SETTINGS and starts the flusher. The caller
// runs readLoop.
func (c *conn) start() error {
	c.w.direct = false
	go c.w.run()
	if c.keepalive.interval > 0 {
		go c.keepaliveLoop()
	}
	settings := []http2.Setting{
		{ID: http2.SettingInitialWindowSize, Val: streamWindow},
		{ID: http2.SettingMaxFrameSize, Val: maxFrameSize},
		{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderListSize},
	}
	if c.role == clientRole {
		settings = append(settings, http2.Setting{ID: http2.SettingEnablePush, Val: 0})
	} else {
		settings = append(settings, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: c.maxStreams})
	}
	if err := c.w.begin(); err != nil {
		return err
	}
	c.wmu.Lock()
	var err error
	if c.role == clientRole {
		_, err = c.tc.Write(clientPreface)
	}
	if err == nil {
		err = c.fr.WriteSettings(settings...)
	}
	if err == nil {
		err = c.fr.WriteWindowUpdate(0, connWindow-initialWindow)
	}
	c.wmu.Unlock()
	if ferr := c.w.end(); err == nil {
		err = ferr
	}
	return err
}

// readLoop reads frames until the connection fails, then closes it.
func (c *conn) readLoop() {
	err := c.readFrames()
	var he *h2Error
	if errors.As(err, &he) {
		c.log.Debug("hbone: connection error", "peer", c.raw.RemoteAddr(), "error", err)
		c.goAway(he.code, he.reason)
		_ = c.raw.SetWriteDeadline(time.Now().Add(closeTimeout)) // best effort: the connection is failing anyway
		_ = c.w.flush()                                          // best effort: the connection is failing anyway
	}
	c.fail(err)
}

func (c *conn) readFrames() error {
	for {
		fh, err := c.fr.ReadFrameHeader()
		if err != nil {
			if errors.Is(err, http2.ErrFrameTooLarge) {
				return connError(http2.ErrCodeFrameSize, "frame of %d bytes exceeds %d", fh.Length, maxFrameSize)
			}
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				return connError(http2.ErrCode(ce), "%v", c.fr.ErrorDetail())
			}
			return err
		}
		c.framesRead.Add(1)
		if !c.sawSettings {
			// RFC 9113 section 3.4: the preface ends with a SETTINGS frame.
			if fh.Type != http2.FrameSettings || fh.Flags.Has(http2.FlagSettingsAck) {
				return connError(http2.ErrCodeProtocol, "first frame is %v, not SETTINGS", fh.Type)
			}
			c.sawSettings = true
		}
		// The frames that come by the thousand are parsed here, without
		// the Framer's per-frame allocation; DATA payloads are read straight
		// into the stream's receive queue.
		switch fh.Type {
		case http2.FrameData:
			err = c.readData(fh)
		case http2.FrameWindowUpdate:
			err = c.readWindowUpdate(fh)
		case http2.FrameRSTStream:
			err = c.readReset(fh)
		case http2.FramePing:
			err = c.readPing(fh)
		default:
			var f http2.Frame
			f, err = c.fr.ReadFrameForHeader(fh)
			if err == nil {
				err = c.handleFrame(f)
			}
		}
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				c.streamError(se)
				continue
			}
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				return connError(http2.ErrCode(ce), "%v", c.fr.ErrorDetail())
			}
			return err
		}
	}
}

func (c *conn) handleFrame(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.SettingsFrame:
		return c.onSettings(f)
	case *http2.MetaHeadersFrame:
		if c.role == serverRole {
			return c.onRequest(f)
		}
		return c.onResponse(f)
	case *http2.GoAwayFrame:
		c.onGoAway(f)
	case *http2.PushPromiseFrame:
		// We advertised SETTINGS_ENABLE_PUSH 0 (RFC 9113 section 8.4).
		return connError(http2.ErrCodeProtocol, "PUSH_PROMISE received")
	}
	// PRIORITY and unknown frame types are ignored (RFC 9113 sections 5.3.2, 4.1).
	return nil
}

// readPayload reads a small control-frame payload into the reader scratch.
func (c *conn) readPayload(fh http2.FrameHeader, want int) ([]byte, error) {
	if int(fh.Length) != want {
		return nil, connError(http2.ErrCodeFrameSize, "%v frame of %d bytes", fh.Type, fh.Length)
	}
	b := c.rscratch[:want]
	_, err := io.ReadFull(c.tc, b)
	return b, err
}

// discard reads and drops n bytes of payload.
func (c *conn) discard(n int) error {
	for n > 0 {
		m := min(n, len(c.rscratch))
		if _, err := io.ReadFull(c.tc, c.rscratch[:m]); err != nil {
			return err
		}
		n -= m
	}
	return nil
}

// idleID reports whether the peer may not yet have used stream id (RFC 9113
// section 5.1: frames other than HEADERS on idle streams are a protocol
// error). Called with c.mu held.
func (c *conn) idleID(id uint32) bool {
	if c.role == clientRole {
		return id%2 == 0 || id >= c.nextID
	}
	return id%2 == 0 || id > c.lastID
}

func (c *conn) readData(fh http2.FrameHeader) error {
	id := fh.StreamID
	if id == 0 {
		return connError(http2.ErrCodeProtocol, "DATA on stream 0")
	}
	size := int64(fh.Length)
	c.mu.Lock()
	if size > c.recvAvail {
		c.mu.Unlock()
		return connError(http2.ErrCodeFlowControl, "peer overran the connection window")
	}
	c.recvAvail -= size
	s := c.streams[id]
	idle := s == nil && c.idleID(id)
	c.mu.Unlock()
	if idle {
		return connError(http2.ErrCodeProtocol, "DATA on idle stream %d", id)
	}
	n, pad := int(fh.Length), 0
	if fh.Flags.Has(http2.FlagDataPadded) {
		if n < 1 {
			return connError(http2.ErrCodeFrameSize, "padded DATA without pad length")
		}
		if _, err := io.ReadFull(c.tc, c.rscratch[:1]); err != nil {
			return err
		}
		pad = int(c.rscratch[0])
		n -= 1 + pad
		if n < 0 {
			return connError(http2.ErrCodeProtocol, "DATA padding exceeds payload")
		}
	}
	end := fh.Flags.Has(http2.FlagDataEndStream)
	if s == nil {
		// A stream we closed or reset: its data is dropped, but it still
		// counts against the connection window (RFC 9113 section 6.9).
		c.credit(size, nil, 0)
		return c.discard(n + pad)
	}
	code, err := s.receive(n, size, end)
	if err != nil {
		return err
	}
	if err := c.discard(pad); err != nil {
		return err
	}
	if code != http2.ErrCodeNo {
		return http2.StreamError{StreamID: id, Code: code}
	}
	if end {
		c.remoteEnd(s)
	}
	return nil
}

func (c *conn) readWindowUpdate(fh http2.FrameHeader) error {
	p, err := c.readPayload(fh, 4)
	if err != nil {
		return err
	}
	incr := int64(binary.BigEndian.Uint32(p) & 0x7fffffff)
	id := fh.StreamID
	c.mu.Lock()
	defer c.mu.Unlock()
	if id == 0 {
		if incr == 0 {
			return connError(http2.ErrCodeProtocol, "WINDOW_UPDATE of 0 on the connection")
		}
		if c.sendWin+incr > maxWindow {
			return connError(http2.ErrCodeFlowControl, "connection window overflow")
		}
		c.sendWin += incr
		c.flow.Broadcast()
		return nil
	}
	s := c.streams[id]
	if s == nil {
		if c.idleID(id) {
			return connError(http2.ErrCodeProtocol, "WINDOW_UPDATE on idle stream %d", id)
		}
		return nil // closed stream: ignore (RFC 9113 section 6.9)
	}
	if incr == 0 {
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
	}
	if s.sendWin+incr > maxWindow {
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeFlowControl}
	}
	s.sendWin += incr
	c.flow.Broadcast()
	return nil
}

func (c *conn) readPing(fh http2.FrameHeader) error {
	if fh.StreamID != 0 {
		return connError(http2.ErrCodeProtocol, "PING on stream %d", fh.StreamID)
	}
	p, err := c.readPayload(fh, 8)
	if err != nil {
		return err
	}
	if fh.Flags.Has(http2.FlagPingAck) {
		return nil
	}
	var data [8]byte
	copy(data[:], p)
	c.wmu.Lock()
	_ = c.fr.WritePing(true, data) // queued: a write error is sticky in c.w and surfaces on the next flush
	c.wmu.Unlock()
	return nil
}

// keepaliveLoop sends a PING when nothing arrived for an interval and fails
// the connection when nothing arrives within the timeout after it. Any
// frame counts as an answer: a busy peer's DATA is as good as its PING ACK.
func (c *conn) keepaliveLoop() {
	t := time.NewTimer(c.keepalive.interval)
	defer t.Stop()
	last := c.framesRead.Load()
	pinged := false
	for n := uint64(1); ; n++ {
		select {
		case <-c.done:
			return
		case <-t.C:
		}
		now := c.framesRead.Load()
		switch {
		case now != last:
			last, pinged = now, false
			t.Reset(c.keepalive.interval)
		case pinged:
			c.log.Info("hbone: closing connection: keepalive PING unanswered", "peer", c.raw.RemoteAddr(), "timeout", c.keepalive.timeout)
			c.fail(errKeepaliveTimeout)
			return
		default:
			var data [8]byte
			binary.BigEndian.PutUint64(data[:], n)
			c.wmu.Lock()
			_ = c.fr.WritePing(false, data) // queued: a write error is sticky in c.w and fails the connection
			c.wmu.Unlock()
			pinged = true
			t.Reset(c.keepalive.timeout)
		}
	}
}

func (c *conn) readReset(fh http2.FrameHeader) error {
	if fh.StreamID == 0 {
		return connError(http2.ErrCodeProtocol, "RST_STREAM on stream 0")
	}
	p, err := c.readPayload(fh, 4)
	if err != nil {
		return err
	}
	code := binary.BigEndian.Uint32(p)
	c.mu.Lock()
	s := c.streams[fh.StreamID]
	if s == nil {
		idle := c.idleID(fh.StreamID)
		c.mu.Unlock()
		if idle {
			return connError(http2.ErrCodeProtocol, "RST_STREAM on idle stream %d", fh.StreamID)
		}
		return nil
	}
	var rerr error = &ResetError{Code: code, Remote: true}
	if http2.ErrCode(code) == http2.ErrCodeRefusedStream {
		rerr = fmt.Errorf("%w (REFUSED_STREAM)", errUnprocessed)
	}
	c.mu.Unlock()
	s.failed(rerr)
	return nil
}

// streamError resets a stream after a stream error (RFC 9113 section 5.4.2).
func (c *conn) streamError(se http2.StreamError) {
	c.mu.Lock()
	s := c.streams[se.StreamID]
	isNew := s == nil && c.role == serverRole && se.StreamID%2 == 1 && se.StreamID > c.lastID
	if isNew {
		c.lastID = se.StreamID
	}
	c.mu.Unlock()
	if isNew {
		// A request whose header block was malformed: answer it like the
		// other malformed requests.
		c.rejectMalformed(se.StreamID, false, fmt.Sprintf("malformed header block: %v", se.Cause))
		return
	}
	if s != nil {
		s.reset(uint32(se.Code))
		return
	}
	c.writeReset(se.StreamID, se.Code)
}

func (c *conn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	if err := f.ForeachSetting(func(s http2.Setting) error { return s.Valid() }); err != nil {
		code := http2.ErrCodeProtocol
		var ce http2.ConnectionError
		if errors.As(err, &ce) {
			code = http2.ErrCode(ce) // FLOW_CONTROL_ERROR for a window over 2^31-1
		}
		return connError(code, "invalid SETTINGS: %v", err)
	}
	c.mu.Lock()
	err := f.ForeachSetting(func(s http2.Setting) error {
		switch s.ID {
		case http2.SettingInitialWindowSize:
			// RFC 9113 section 6.9.2: the change applies to every open
			// stream's send window, which may go negative.
			delta := int64(s.Val) - c.peer.initialWindow
			c.peer.initialWindow = int64(s.Val)
			for _, st := range c.streams {
				st.sendWin += delta
				if st.sendWin > maxWindow {
					return connError(http2.ErrCodeFlowControl, "SETTINGS_INITIAL_WINDOW_SIZE overflows stream %d's window", st.id)
				}
			}
		case http2.SettingMaxFrameSize:
			c.peer.maxFrame = int(s.Val)
		case http2.SettingMaxConcurrentStreams:
			c.peer.maxStreams = s.Val
		}
		return nil
	})
	c.flow.Broadcast()
	c.mu.Unlock()
	if err != nil {
		return err
	}
	c.wmu.Lock()
	if v, ok := f.Value(http2.SettingHeaderTableSize); ok {
		c.henc.SetMaxDynamicTableSizeLimit(v)
	}
	_ = c.fr.WriteSettingsAck() // queued: a write error is sticky in c.w and surfaces on the next flush
	c.wmu.Unlock()
	return nil
}

func (c *conn) onGoAway(f *http2.GoAwayFrame) {
	if f.ErrCode != http2.ErrCodeNo {
		c.log.Debug("hbone peer sent GOAWAY", "peer", c.raw.RemoteAddr(), "code", f.ErrCode, "debug", string(f.DebugData()))
	}
	c.mu.Lock()
	var refused []*stream
	if c.role == clientRole {
		// Streams above the last one the peer processed never reached it.
		for id, s := range c.streams {
			if id > f.LastStreamID {
				refused = append(refused, s)
			}
		}
	}
	c.mu.Unlock()
	for _, s := range refused {
		s.failed(fmt.Errorf("%w (GOAWAY)", errUnprocessed))
	}
	c.drain()
}

// drain stops new streams; the connection closes once the last one ends.
func (c *conn) drain() {
	c.mu.Lock()
	c.draining = true
	notify := !c.drainedOnce
	c.drainedOnce = true
	empty := len(c.streams) == 0 && c.reserved == 0
	c.mu.Unlock()
	if notify && c.onDrain != nil {
		c.onDrain(c)
	}
	if empty {
		go c.closeGracefully()
	}
}

// shutdown sends GOAWAY and drains: the server's graceful stop, and the
// client's release of an idle connection.
func (c *conn) shutdown() {
	c.mu.Lock()
	sent := c.draining
	c.mu.Unlock()
	if !sent {
		c.goAway(http2.ErrCodeNo, "")
	}
	c.drain()
}

// goAway queues a GOAWAY carrying the last stream the peer opened that we
// will process.
func (c *conn) goAway(code http2.ErrCode, reason string) {
	c.mu.Lock()
	last := c.lastID
	c.draining = true
	c.mu.Unlock()
	c.wmu.Lock()
	_ = c.fr.WriteGoAway(last, code, []byte(reason)) // queued: a write error is sticky in c.w and surfaces on the next flush
	c.wmu.Unlock()
}

// closeGracefully writes out what is queued, then closes.
func (c *conn) closeGracefully() {
	_ = c.raw.SetWriteDeadline(time.Now().Add(closeTimeout)) // best effort: the connection is closing anyway
	_ = c.w.flush()                                          // best effort: the connection is closing anyway
	c.fail(net.ErrClosed)
}

// fail closes the connection and fails its streams with err.
func (c *conn) fail(err error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.draining = true
	notify := !c.drainedOnce
	c.drainedOnce = true
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	c.err = fmt.Errorf("hbone connection to %s closed: %w", c.raw.RemoteAddr(), err)
	streams := make([]*stream, 0, len(c.streams))
	for _, s := range c.streams {
		streams = append(streams, s)
	}
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
	c.flow.Broadcast()
	c.mu.Unlock()
	for _, s := range streams {
		s.failed(c.err)
	}
	c.cancel()
	c.w.close(c.err)
	close(c.done)
	if notify && c.onDrain != nil {
		c.onDrain(c)
	}
	if c.onClose != nil {
		c.onClose(c)
	}
}

// register adds a stream to the table. Called with c.mu held.
func (c *conn) registerLocked(s *stream) {
	s.sendWin = c.peer.initialWindow
	c.streams[s.id] = s
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
}

// removeLocked takes a finished stream out of the table. Called with c.mu
// held; the caller calls afterRemove once it is released.
func (c *conn) removeLocked(s *stream, err error) bool {
	if s.removed {
		return false
	}
	s.removed = true
	if s.werr == nil {
		s.werr = err
	}
	delete(c.streams, s.id)
	c.flow.Broadcast()
	return c.idleLocked()
}

// idleLocked arms the idle timer and reports whether a draining
// connection just lost its last stream.
func (c *conn) idleLocked() bool {
	if len(c.streams) > 0 || c.reserved > 0 || c.closed {
		return false
	}
	if c.draining {
		return true
	}
	if c.idleTimeout > 0 {
		if c.idleTimer == nil {
			c.idleTimer = time.AfterFunc(c.idleTimeout, c.onIdle)
		} else {
			c.idleTimer.Reset(c.idleTimeout)
		}
	}
	return false
}

func (c *conn) afterRemove(drained bool) {
	if drained {
		go c.closeGracefully()
	}
}

func (c *conn) onIdle() {
	c.mu.Lock()
	idle := len(c.streams) == 0 && c.reserved == 0 && !c.draining
	c.mu.Unlock()
	if idle {
		c.shutdown()
	}
}

// remoteEnd records END_STREAM from the peer.
func (c *conn) remoteEnd(s *stream) {
	c.mu.Lock()
	s.remoteEnded = true
	drained := false
	if s.sentEnd {
		drained = c.removeLocked(s, nil)
	}
	c.mu.Unlock()
	c.afterRemove(drained)
}

// credit returns consumed (or dropped) bytes to the peer with WINDOW_UPDATE
// once half a window has accumulated, rather than after every read: in the
// x/net server a WINDOW_UPDATE per 4 KB read cost 15% of the CPU.
func (c *conn) credit(n int64, s *stream, sinc uint32) {
	var cinc int64
	if n > 0 {
		c.mu.Lock()
		c.recvUnacked += n
		if c.recvUnacked >= connWindow/2 && !c.closed {
			cinc = c.recvUnacked
			c.recvAvail += cinc
			c.recvUnacked = 0
		}
		c.mu.Unlock()
	}
	if cinc == 0 && sinc == 0 {
		return
	}
	c.wmu.Lock()
	if cinc > 0 {
		_ = c.fr.WriteWindowUpdate(0, uint32(cinc)) // queued: a write error is sticky in c.w and surfaces on the next flush
	}
	if sinc > 0 {
		_ = c.fr.WriteWindowUpdate(s.id, sinc) // queued: a write error is sticky in c.w and surfaces on the next flush
	}
	c.wmu.Unlock()
}

// awaitWindow takes up to want bytes of send window for s, waiting for it.
func (c *conn) awaitWindow(s *stream, want int) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		switch {
		case s.werr != nil:
			return 0, s.werr
		case s.sentEnd:
			return 0, ErrWriteAfterCloseWrite
		case c.closed:
			return 0, c.err
		case s.wexpired:
			return 0, os.ErrDeadlineExceeded
		}
		if win := min(s.sendWin, c.sendWin); win > 0 {
			n := min(want, int(win), c.peer.maxFrame, maxFrameSize)
			s.sendWin -= int64(n)
			c.sendWin -= int64(n)
			return n, nil
		}
		c.flow.Wait()
	}
}

func putFrameHeader(b []byte, length int, t http2.FrameType, f http2.Flags, id uint32) {
	b[0], b[1], b[2] = byte(length>>16), byte(length>>8), byte(length)
	b[3], b[4] = byte(t), byte(f)
	binary.BigEndian.PutUint32(b[5:], id&maxStreamID)
}

// writeData writes one DATA frame carrying p, blocking on the socket.
func (c *conn) writeData(id uint32, p []byte, end bool) error {
	if err := c.w.begin(); err != nil {
		return err
	}
	var flags http2.Flags
	if end {
		flags = http2.FlagDataEndStream
	}
	c.wmu.Lock()
	var err error
	if len(p) <= smallData {
		b := c.small[:frameHeaderLen+len(p)]
		putFrameHeader(b, len(p), http2.FrameData, flags, id)
		copy(b[frameHeaderLen:], p)
		_, err = c.tc.Write(b)
	} else {
		putFrameHeader(c.hdr[:], len(p), http2.FrameData, flags, id)
		if _, err = c.tc.Write(c.hdr[:]); err == nil {
			_, err = c.tc.Write(p)
		}
	}
	c.wmu.Unlock()
	if ferr := c.w.end(); err == nil {
		err = ferr
	}
	return err
}

// writeFramed writes a DATA frame whose payload follows frameHeaderLen
// bytes of room in b, so header and payload leave in one TLS record.
func (c *conn) writeFramed(id uint32, b []byte) error {
	if err := c.w.begin(); err != nil {
		return err
	}
	c.wmu.Lock()
	putFrameHeader(b, len(b)-frameHeaderLen, http2.FrameData, 0, id)
	_, err := c.tc.Write(b)
	c.wmu.Unlock()
	if ferr := c.w.end(); err == nil {
		err = ferr
	}
	return err
}

// writeReset queues RST_STREAM without blocking.
func (c *conn) writeReset(id uint32, code http2.ErrCode) {
	c.wmu.Lock()
	_ = c.fr.WriteRSTStream(id, code) // queued: a write error is sticky in c.w and surfaces on the next flush
	c.wmu.Unlock()
}

// writeEnd queues the frames that end a stream without blocking: an empty
// END_STREAM DATA frame and/or RST_STREAM.
func (c *conn) writeEnd(id uint32, end bool, rst http2.ErrCode, sendRST bool) {
	c.wmu.Lock()
	if end {
		putFrameHeader(c.ctl[:], 0, http2.FrameData, http2.FlagDataEndStream, id)
		_, _ = c.tc.Write(c.ctl[:]) // queued: a write error is sticky in c.w and surfaces on the next flush
	}
	if sendRST {
		_ = c.fr.WriteRSTStream(id, rst) // queued: a write error is sticky in c.w and surfaces on the next flush
	}
	c.wmu.Unlock()
}

// writeHeaders writes a header block, split into CONTINUATION frames if it
// exceeds the peer's frame size. Called with c.wmu held.
func (c *conn) writeHeadersLocked(id uint32, block []byte, end bool) error {
	c.mu.Lock()
	max := c.peer.maxFrame
	c.mu.Unlock()
	first := true
	for first || len(block) > 0 {
		frag := block[:min(len(block), max)]
		block = block[len(frag):]
		var err error
		if first {
			err = c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: frag, EndStream: end, EndHeaders: len(block) == 0})
			first = false
		} else {
			err = c.fr.WriteContinuation(id, len(block) == 0, frag)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// writeStatus writes a response HEADERS frame; blocking is fine since it is
// only called from handler goroutines.
func (c *conn) writeStatus(id uint32, code int, end bool) error {
	if err := c.w.begin(); err != nil {
		return err
	}
	c.wmu.Lock()
	c.hbuf.Reset()
	_ = c.henc.WriteField(hpack.HeaderField{Name: ":status", Value: statusText(code)}) // writes to c.hbuf, a bytes.Buffer: cannot fail
	err := c.writeHeadersLocked(id, c.hbuf.Bytes(), end)
	c.wmu.Unlock()
	if ferr := c.w.end(); err == nil {
		err = ferr
	}
	return err
}

func statusText(code int) string {
	switch code {
	case http.StatusOK:
		return "200"
	case http.StatusBadRequest:
		return "400"
	}
	return strconv.Itoa(code)
}

// Client role.

// reserve books a stream slot for the pool, if this connection has one.
func (c *conn) reserve(limit int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.draining || c.nextID > maxStreamID-2*uint32(c.reserved+1) {
		return false
	}
	limit = min(limit, int(c.peer.maxStreams))
	if len(c.streams)+c.reserved >= limit {
		return false
	}
	c.reserved++
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
	return true
}

// connect opens a CONNECT stream on a slot taken with reserve.
func (c *conn) connect(ctx context.Context, target string, h http.Header) (*stream, error) {
	s := newStream(c)
	s.ready = make(chan struct{})
	if err := c.w.begin(); err != nil {
		c.mu.Lock()
		c.reserved--
		drained := c.idleLocked()
		c.mu.Unlock()
		c.afterRemove(drained)
		return nil, err
	}
	// The stream ID is taken under wmu so that streams are opened on the
	// wire in ID order (RFC 9113 section 5.1.1).
	c.wmu.Lock()
	c.mu.Lock()
	c.reserved--
	if c.closed || c.draining {
		drained := c.idleLocked()
		c.mu.Unlock()
		c.wmu.Unlock()
		_ = c.w.end() // errUnprocessed below is the error that matters
		c.afterRemove(drained)
		return nil, fmt.Errorf("%w (connection draining)", errUnprocessed)
	}
	s.id = c.nextID
	c.nextID += 2
	c.registerLocked(s)
	c.mu.Unlock()

	c.hbuf.Reset()
	_ = c.henc.WriteField(hpack.HeaderField{Name: ":method", Value: http.MethodConnect}) // writes to c.hbuf, a bytes.Buffer: cannot fail
	_ = c.henc.WriteField(hpack.HeaderField{Name: ":authority", Value: target})          // writes to c.hbuf, a bytes.Buffer: cannot fail
	for k, vs := range h {
		name := strings.ToLower(k)
		if skipHeader(name) {
			continue
		}
		for _, v := range vs {
			_ = c.henc.WriteField(hpack.HeaderField{Name: name, Value: v}) // writes to c.hbuf, a bytes.Buffer: cannot fail
		}
	}
	err := c.writeHeadersLocked(s.id, c.hbuf.Bytes(), false)
	c.wmu.Unlock()
	if ferr := c.w.end(); err == nil {
		err = ferr
	}
	if err != nil {
		s.abort(http2.ErrCodeCancel)
		return nil, err
	}

	select {
	case <-s.ready:
	case <-ctx.Done():
		s.abort(http2.ErrCodeCancel)
		return nil, ctx.Err()
	}
	s.mu.Lock()
	status, rerr := s.status, s.respErr
	s.mu.Unlock()
	if rerr != nil {
		_ = s.Close() // rerr is the error that matters
		return nil, rerr
	}
	if status != http.StatusOK {
		_ = s.Close() // the status is the error that matters
		return nil, &StatusError{Code: status}
	}
	return s, nil
}

// skipHeader reports fields that must not be sent on HTTP/2 (RFC 9113
// section 8.2.2) or that would collide with the pseudo-headers.
func skipHeader(name string) bool {
	switch name {
	case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "host":
		return true
	}
	return strings.HasPrefix(name, ":")
}

// validHeader reports whether h can be sent.
func validHeader(h http.Header) error {
	for k, vs := range h {
		if !httpguts.ValidHeaderFieldName(k) {
			return fmt.Errorf("hbone: invalid header field name %q", k)
		}
		for _, v := range vs {
			if !httpguts.ValidHeaderFieldValue(v) {
				return fmt.Errorf("hbone: invalid value for header field %q", k)
			}
		}
	}
	return nil
}

func (c *conn) onResponse(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	c.mu.Lock()
	s := c.streams[id]
	idle := s == nil && c.idleID(id)
	c.mu.Unlock()
	if s == nil {
		if idle {
			return connError(http2.ErrCodeProtocol, "HEADERS on stream %d, which we did not open", id)
		}
		return nil
	}
	status, err := strconv.Atoi(f.PseudoValue("status"))
	if err != nil || status < 100 || status > 999 || f.Truncated {
		s.reset(uint32(http2.ErrCodeProtocol))
		return nil
	}
	s.mu.Lock()
	if s.gotResponse {
		// RFC 9113 section 8.5: after the response, only DATA and stream
		// management frames may follow on a CONNECT stream.
		s.mu.Unlock()
		s.reset(uint32(http2.ErrCodeProtocol))
		return nil
	}
	if status < 200 {
		s.mu.Unlock()
		if f.StreamEnded() {
			s.reset(uint32(http2.ErrCodeProtocol))
		}
		return nil // informational: wait for the final answer
	}
	s.gotResponse = true
	s.status = status
	close(s.ready)
	if f.StreamEnded() {
		s.eof = true
		s.cond.Broadcast()
	}
	s.mu.Unlock()
	if f.StreamEnded() {
		c.remoteEnd(s)
	}
	return nil
}

// Server role.

func (c *conn) onRequest(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	c.mu.Lock()
	if s := c.streams[id]; s != nil {
		c.mu.Unlock()
		s.reset(uint32(http2.ErrCodeProtocol)) // trailers or a second request on a tunnel
		return nil
	}
	if id%2 == 0 {
		c.mu.Unlock()
		return connError(http2.ErrCodeProtocol, "client opened even stream %d", id)
	}
	if id <= c.lastID {
		c.mu.Unlock()
		return nil // a stream we already closed or reset
	}
	c.lastID = id
	if c.draining || len(c.streams) >= int(c.maxStreams) {
		// REFUSED_STREAM tells the client it may retry elsewhere.
		c.mu.Unlock()
		c.writeReset(id, http2.ErrCodeRefusedStream)
		return nil
	}
	c.mu.Unlock()

	req, reason := parseRequest(f)
	if reason != "" {
		c.rejectMalformed(id, f.StreamEnded(), reason)
		return nil
	}
	req.PeerCertificates = c.peerCerts
	req.RemoteAddr, req.LocalAddr = c.raw.RemoteAddr(), c.raw.LocalAddr()

	s := newStream(c)
	s.id = id
	s.ctx, s.cancelCtx = context.WithCancel(c.ctx)
	if f.StreamEnded() {
		s.eof = true
		s.remoteEnded = true
	}
	c.mu.Lock()
	c.registerLocked(s)
	c.mu.Unlock()
	c.onStream(s, req)
	return nil
}

// parseRequest checks a CONNECT request and returns why it is not a valid
// HBONE request, if it is not.
func parseRequest(f *http2.MetaHeadersFrame) (*Request, string) {
	var method, authority string
	var hasAuthority bool
	for _, hf := range f.PseudoFields() {
		switch hf.Name {
		case ":method":
			method = hf.Value
		case ":authority":
			authority, hasAuthority = hf.Value, true
		case ":path", ":scheme":
			return nil, "CONNECT with " + hf.Name + " (only plain CONNECT is HBONE)"
		case ":protocol":
			return nil, "extended CONNECT (:protocol " + strconv.Quote(hf.Value) + ")"
		}
	}
	switch {
	case f.Truncated:
		return nil, "header list too large"
	case method != http.MethodConnect:
		return nil, "method " + strconv.Quote(method) + " is not CONNECT"
	case !hasAuthority || authority == "":
		return nil, "missing :authority"
	}
	target, err := parseTarget(authority)
	if err != nil {
		return nil, err.Error()
	}
	regular := f.RegularFields()
	h := make(http.Header, len(regular))
	for _, hf := range regular {
		k := http.CanonicalHeaderKey(hf.Name)
		h[k] = append(h[k], hf.Value)
	}
	return &Request{Authority: authority, Target: target, Header: h}, ""
}

// rejectMalformed answers 400 for a request the server refuses before any
// Handler sees it.
func (c *conn) rejectMalformed(id uint32, ended bool, reason string) {
	c.log.Info("hbone: rejecting malformed request", "peer", c.raw.RemoteAddr(), "stream", id, "status", http.StatusBadRequest, "reason", reason)
	c.wmu.Lock()
	c.hbuf.Reset()
	_ = c.henc.WriteField(hpack.HeaderField{Name: ":status", Value: "400"}) // writes to c.hbuf, a bytes.Buffer: cannot fail
	_ = c.writeHeadersLocked(id, c.hbuf.Bytes(), true)                      // queued: a write error is sticky in c.w and surfaces on the next flush
	if !ended {
		// RFC 9113 section 8.1: the response is complete; ask the client
		// to stop sending without an error.
		_ = c.fr.WriteRSTStream(id, http2.ErrCodeNo) // queued: a write error is sticky in c.w and surfaces on the next flush
	}
	c.wmu.Unlock()
}

// parseTarget parses an HBONE authority: an IP address and a port, nothing
// else (no names, no zones, no port 0).
func parseTarget(authority string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(authority)
	if err != nil || ap.Port() == 0 || ap.Addr().Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("authority %q is not ip:port", authority)
	}
	return ap, nil
}
