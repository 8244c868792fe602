package hbone

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// stream is one CONNECT stream; it implements Stream.
type stream struct {
	c  *conn
	id uint32

	// Guarded by c.mu: the sending side and the stream's place in the table.
	sendWin     int64
	sentEnd     bool  // END_STREAM sent (or the stream closed)
	remoteEnded bool  // END_STREAM received
	removed     bool  // out of the stream table
	werr        error // why the stream can no longer send
	wexpired    bool
	wdl         time.Time
	wtimer      *time.Timer

	// wlock serialises the goroutines sending on the stream (Write,
	// ReadFrom, CloseWrite, Close), so frames of one Write stay together.
	wlock sync.Mutex

	// Guarded by mu: the receiving side.
	mu        sync.Mutex
	cond      sync.Cond // data, end of stream, error, deadline, or the reader slot freed
	rb        recvBuf
	recvAvail int64 // bytes the peer may still send
	unacked   int64 // bytes read and not yet returned with WINDOW_UPDATE
	eof       bool  // END_STREAM received; reads end once rb is empty
	rerr      error // reads fail with this once rb is empty
	rclosed   bool  // Close called: drop what arrives
	consuming bool  // a reader is copying out of rb without mu
	producing bool  // the frame reader is filling rb without mu
	rexpired  bool
	rdl       time.Time
	rtimer    *time.Timer
	sink      *directSink // set while WriteTo copies into a TCP socket
	sinkErr   error       // the sink failed: WriteTo reports it
	sunk      int64       // bytes written through the sink, for WriteTo's count

	// Client: the answer to the CONNECT (guarded by mu).
	ready       chan struct{} // closed when status or respErr is set
	readyDone   bool
	gotResponse bool
	status      int
	respErr     error

	// Server: the handler's context.
	ctx       context.Context
	cancelCtx context.CancelFunc
}

func newStream(c *conn) *stream {
	s := &stream{c: c, recvAvail: streamWindow}
	s.cond.L = &s.mu
	return s
}

// receive takes n bytes of DATA payload from the connection, always all of
// them, into the receive queue (or drops them). size is the frame's length
// as counted by flow control. It returns a stream error code, or an I/O
// error that ends the connection.
func (s *stream) receive(n int, size int64, end bool) (http2.ErrCode, error) {
	c := s.c
	s.mu.Lock()
	var code http2.ErrCode
	switch {
	case s.eof:
		code = http2.ErrCodeStreamClosed // DATA after END_STREAM (RFC 9113 section 5.1)
	case size > s.recvAvail:
		code = http2.ErrCodeFlowControl
	}
	if code != http2.ErrCodeNo || s.rclosed {
		s.mu.Unlock()
		c.credit(size, nil, 0)
		return code, c.discard(n)
	}
	s.recvAvail -= size
	payload := n
	var credit int64 // bytes written to the sink, and padding
	for n > 0 {
		if s.rclosed {
			// Closed while we were reading: drop the rest.
			dropped := s.releaseLocked()
			s.mu.Unlock()
			c.credit(credit+int64(dropped+n)+size-int64(payload), nil, 0)
			return http2.ErrCodeNo, c.discard(n)
		}
		region := s.rb.space(s.consuming)
		if region == nil {
			s.mu.Unlock()
			c.credit(int64(n), nil, 0)
			return http2.ErrCodeFlowControl, c.discard(n)
		}
		m := min(n, len(region))
		s.producing = true
		s.mu.Unlock()
		_, err := io.ReadFull(c.tc, region[:m])
		s.mu.Lock()
		s.producing = false
		if err != nil {
			s.mu.Unlock()
			return http2.ErrCodeNo, err
		}
		s.rb.commit(m)
		n -= m
		if s.sink != nil && !s.consuming && s.sinkErr == nil && s.rb.size == m {
			// Nothing was queued before this chunk: write it to the
			// socket now, rather than wake WriteTo to do it.
			sunk, err := s.sinkLocked()
			credit += int64(sunk)
			if err != nil {
				s.sinkErr = err
				s.cond.Broadcast()
			}
		}
		if s.rb.size > 0 {
			s.cond.Broadcast()
		}
	}
	if end {
		s.eof = true
		s.cond.Broadcast()
	}
	// Padding counts against the windows but is never read: credit it now.
	pad := size - int64(payload)
	s.unacked += pad
	credit += pad
	sinc := s.windowUpdateLocked()
	s.mu.Unlock()
	if credit > 0 || sinc > 0 {
		c.credit(credit, s, sinc)
	}
	return http2.ErrCodeNo, nil
}

// sinkLocked writes the queued bytes, all in one block, to the sink as far
// as it takes them without blocking. s.mu is released meanwhile; the
// consuming flag keeps WriteTo out.
func (s *stream) sinkLocked() (int, error) {
	b, d := s.rb.readable(), s.sink
	s.consuming = true
	s.mu.Unlock()
	n, err := d.write(b)
	s.mu.Lock()
	s.consuming = false
	s.rb.consume(n, false)
	s.unacked += int64(n)
	s.sunk += int64(n)
	return n, err
}

// windowUpdateLocked returns the stream WINDOW_UPDATE increment to send,
// once half the window has been read: not after every read, which in the
// x/net server cost 15% of the CPU in WINDOW_UPDATE frames.
func (s *stream) windowUpdateLocked() uint32 {
	if s.unacked < streamWindow/2 || s.eof || s.rclosed {
		return 0
	}
	inc := s.unacked
	s.recvAvail += inc
	s.unacked = 0
	return uint32(inc)
}

// releaseLocked drops the receive queue of a closed stream if nobody is
// using it, and returns the number of bytes dropped.
func (s *stream) releaseLocked() int {
	if !s.rclosed || s.consuming || s.producing {
		return 0
	}
	return s.rb.release()
}

// acquireLocked waits until there is something to read and takes the
// reader slot; the caller copies out of the returned slice without s.mu
// and then calls consumed.
func (s *stream) acquireLocked() ([]byte, error) {
	for {
		switch {
		case s.rclosed:
			return nil, net.ErrClosed
		case s.rexpired:
			return nil, os.ErrDeadlineExceeded
		case s.sinkErr != nil:
			return nil, s.sinkErr
		case !s.consuming:
			if s.rb.size > 0 {
				s.consuming = true
				return s.rb.readable(), nil
			}
			if s.eof {
				return nil, io.EOF
			}
			if s.rerr != nil {
				return nil, s.rerr
			}
		}
		s.cond.Wait()
	}
}

// consumed releases the reader slot after n bytes were taken, and returns
// them to the peer's windows when enough have accumulated.
func (s *stream) consumed(n int) {
	s.mu.Lock()
	s.consuming = false
	s.rb.consume(n, s.producing)
	dropped := s.releaseLocked()
	s.unacked += int64(n)
	sinc := s.windowUpdateLocked()
	s.cond.Broadcast()
	s.mu.Unlock()
	s.c.credit(int64(n+dropped), s, sinc)
}

// Read reads data the peer sent; io.EOF after its END_STREAM.
func (s *stream) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.mu.Lock()
	b, err := s.acquireLocked()
	s.mu.Unlock()
	if err != nil {
		return 0, err
	}
	n := copy(p, b)
	s.consumed(n)
	return n, nil
}

// WriteTo writes what the peer sends to w until END_STREAM, straight from
// the receive queue (io.Copy uses it).
func (s *stream) WriteTo(w io.Writer) (int64, error) {
	n, rerr, werr := s.writeTo(w)
	if werr != nil {
		return n, werr
	}
	return n, rerr
}

// writeTo is WriteTo with the stream's error (rerr) told apart from the
// writer's (werr).
func (s *stream) writeTo(w io.Writer) (n int64, rerr, werr error) {
	if d := newDirectSink(w); d != nil {
		s.mu.Lock()
		s.sink = d
		s.mu.Unlock()
		defer func() {
			s.mu.Lock()
			s.sink = nil
			n += s.sunk
			s.sunk = 0
			s.mu.Unlock()
		}()
	}
	for {
		s.mu.Lock()
		b, err := s.acquireLocked()
		sinkErr := s.sinkErr
		s.mu.Unlock()
		if errors.Is(err, io.EOF) {
			return n, nil, nil
		}
		if err != nil {
			if errors.Is(err, sinkErr) {
				return n, nil, err
			}
			return n, err, nil
		}
		m, err := w.Write(b)
		s.consumed(m)
		n += int64(m)
		if err != nil {
			return n, nil, err
		}
	}
}

// Write sends p in DATA frames as flow control allows.
func (s *stream) Write(p []byte) (int, error) {
	s.wlock.Lock()
	defer s.wlock.Unlock()
	n := 0
	for len(p) > 0 {
		m, err := s.c.awaitWindow(s, len(p))
		if err != nil {
			return n, err
		}
		if err := s.c.writeData(s.id, p[:m], false); err != nil {
			return n, err
		}
		n += m
		p = p[m:]
	}
	return n, nil
}

// ReadFrom sends what r yields until io.EOF (io.Copy uses it). It reads
// into a pooled block behind room for the frame header, so each frame
// leaves as one TLS record without a copy. It does not end the stream.
func (s *stream) ReadFrom(r io.Reader) (int64, error) {
	n, rerr, werr := s.readFrom(r)
	if werr != nil {
		return n, werr
	}
	return n, rerr
}

// readFrom is ReadFrom with the reader's error (rerr) told apart from the
// stream's (werr).
func (s *stream) readFrom(r io.Reader) (n int64, rerr, werr error) {
	s.wlock.Lock()
	defer s.wlock.Unlock()
	bp := getBlock()
	defer putBlock(bp)
	buf := *bp
	for {
		m, err := r.Read(buf[frameHeaderLen:])
		for off, end := frameHeaderLen, frameHeaderLen+m; off < end; {
			k, werr := s.c.awaitWindow(s, end-off)
			if werr != nil {
				return n, nil, werr
			}
			// The header goes in the bytes before the payload, which are
			// either the room left for it or already-sent payload.
			if werr := s.c.writeFramed(s.id, buf[off-frameHeaderLen:off+k]); werr != nil {
				return n, nil, werr
			}
			off += k
			n += int64(k)
		}
		if err == io.EOF {
			return n, nil, nil
		}
		if err != nil {
			return n, err, nil
		}
	}
}

// CloseWrite sends END_STREAM: the peer reads EOF, and can still send.
func (s *stream) CloseWrite() error {
	s.wlock.Lock()
	defer s.wlock.Unlock()
	c := s.c
	c.mu.Lock()
	switch {
	case s.sentEnd:
		c.mu.Unlock()
		return nil
	case s.werr != nil:
		err := s.werr
		c.mu.Unlock()
		return err
	}
	c.mu.Unlock()
	if err := c.writeData(s.id, nil, true); err != nil {
		return err
	}
	c.mu.Lock()
	s.sentEnd = true
	drained := false
	if s.remoteEnded {
		drained = c.removeLocked(s, nil)
	}
	c.mu.Unlock()
	c.afterRemove(drained)
	return nil
}

// closeRead stops the receiving side; it reports false if it was stopped.
func (s *stream) closeRead() bool {
	s.mu.Lock()
	if s.rclosed {
		s.mu.Unlock()
		return false
	}
	s.rclosed = true
	dropped := s.releaseLocked()
	if s.rtimer != nil {
		s.rtimer.Stop()
	}
	s.cond.Broadcast()
	s.mu.Unlock()
	if dropped > 0 {
		s.c.credit(int64(dropped), nil, 0)
	}
	return true
}

// Close ends the stream: END_STREAM if not sent yet, and RST_STREAM CANCEL
// if the peer had not finished sending.
func (s *stream) Close() error {
	if !s.closeRead() {
		return nil
	}
	c := s.c
	defer s.cancel()
	c.mu.Lock()
	if s.removed {
		c.mu.Unlock()
		return nil
	}
	if s.werr == nil {
		s.werr = net.ErrClosed // wakes and fails writers waiting for window
	}
	c.flow.Broadcast()
	c.mu.Unlock()

	s.wlock.Lock() // let a Write in progress finish its frame
	defer s.wlock.Unlock()
	c.mu.Lock()
	if s.removed {
		c.mu.Unlock()
		return nil
	}
	sendEnd, sendRST := !s.sentEnd, !s.remoteEnded
	s.sentEnd = true
	drained := c.removeLocked(s, nil)
	c.mu.Unlock()
	c.writeEnd(s.id, sendEnd, http2.ErrCodeCancel, sendRST)
	c.afterRemove(drained)
	return nil
}

// abort resets the stream with code, dropping data in flight both ways.
func (s *stream) abort(code http2.ErrCode) {
	s.closeRead()
	s.c.mu.Lock()
	removed := s.removed
	s.c.mu.Unlock()
	if !removed {
		s.c.writeReset(s.id, code)
	}
	s.failed(&ResetError{Code: uint32(code)})
}

// reset resets the stream after a stream error we detected.
func (s *stream) reset(code uint32) {
	s.c.writeReset(s.id, http2.ErrCode(code))
	s.failed(&ResetError{Code: code})
}

// failed ends the stream with err (a reset, or the connection's failure).
func (s *stream) failed(err error) {
	c := s.c
	c.mu.Lock()
	drained := c.removeLocked(s, err)
	c.mu.Unlock()
	c.afterRemove(drained)
	s.mu.Lock()
	if !s.eof && s.rerr == nil {
		s.rerr = err
	}
	if s.ready != nil && !s.readyDone && !s.gotResponse {
		s.respErr = err
		s.readyDone = true
		close(s.ready)
	}
	s.cond.Broadcast()
	s.mu.Unlock()
	s.cancel()
}

func (s *stream) cancel() {
	if s.cancelCtx != nil {
		s.cancelCtx()
	}
	s.c.mu.Lock()
	if s.wtimer != nil {
		s.wtimer.Stop()
	}
	s.c.mu.Unlock()
}

// LocalAddr and RemoteAddr are those of the HBONE connection.
func (s *stream) LocalAddr() net.Addr  { return s.c.raw.LocalAddr() }
func (s *stream) RemoteAddr() net.Addr { return s.c.raw.RemoteAddr() }

func (s *stream) SetDeadline(t time.Time) error {
	_ = s.SetReadDeadline(t) // cannot fail for a stream
	return s.SetWriteDeadline(t)
}

func (s *stream) SetReadDeadline(t time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rdl, s.rexpired = t, false
	switch d := time.Until(t); {
	case t.IsZero():
		if s.rtimer != nil {
			s.rtimer.Stop()
		}
	case d <= 0:
		s.rexpired = true
		s.cond.Broadcast()
	case s.rtimer == nil:
		s.rtimer = time.AfterFunc(d, s.readDeadline)
	default:
		s.rtimer.Reset(d)
	}
	return nil
}

func (s *stream) readDeadline() {
	s.mu.Lock()
	// A timer stopped too late fires for an old deadline: check the time.
	if !s.rdl.IsZero() && !time.Now().Before(s.rdl) {
		s.rexpired = true
		s.cond.Broadcast()
	}
	s.mu.Unlock()
}

// SetWriteDeadline bounds the wait for flow-control window. Writes on the
// shared connection's socket are not bounded per stream.
func (s *stream) SetWriteDeadline(t time.Time) error {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	s.wdl, s.wexpired = t, false
	switch d := time.Until(t); {
	case t.IsZero():
		if s.wtimer != nil {
			s.wtimer.Stop()
		}
	case d <= 0:
		s.wexpired = true
		c.flow.Broadcast()
	case s.wtimer == nil:
		s.wtimer = time.AfterFunc(d, s.writeDeadline)
	default:
		s.wtimer.Reset(d)
	}
	return nil
}

func (s *stream) writeDeadline() {
	c := s.c
	c.mu.Lock()
	if !s.wdl.IsZero() && !time.Now().Before(s.wdl) {
		s.wexpired = true
		c.flow.Broadcast()
	}
	c.mu.Unlock()
}

var (
	_ Stream        = (*stream)(nil)
	_ io.WriterTo   = (*stream)(nil)
	_ io.ReaderFrom = (*stream)(nil)
)
