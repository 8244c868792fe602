package hbone

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"golang.org/x/net/http2"
)

// Proxy copies a to b and b to a until both directions have ended, then
// closes both. It returns the bytes copied each way and the first error.
//
// The end of one direction is passed on as a half-close (CloseWrite: a TCP
// FIN, or END_STREAM on a Stream) while the other keeps flowing. An error
// aborts both sides as RFC 9113 section 8.5 asks of a CONNECT proxy: a
// failed TCP connection resets the stream with CONNECT_ERROR, a failed
// stream resets the TCP connection (RST).
//
// Copies use pooled 256 KiB buffers; a Stream of this package is read and
// written without an intermediate copy.
func Proxy(a, b net.Conn) (aToB, bToA int64, err error) {
	var first firstError
	done := make(chan int64, 1)
	go func() { done <- pipe(b, a, &first) }()
	bToA = pipe(a, b, &first)
	aToB = <-done
	_ = a.Close() // the copy errors are the ones to report
	_ = b.Close()
	return aToB, bToA, first.err
}

type firstError struct {
	mu  sync.Mutex
	err error
}

func (f *firstError) set(err error) {
	f.mu.Lock()
	if f.err == nil {
		f.err = err
	}
	f.mu.Unlock()
}

// pipe copies src to dst and passes on the end of src.
func pipe(dst, src net.Conn, first *firstError) int64 {
	n, rerr, werr := copyConn(dst, src)
	switch {
	case rerr != nil:
		first.set(fmt.Errorf("reading from %v: %w", src.RemoteAddr(), rerr))
	case werr != nil:
		first.set(fmt.Errorf("writing to %v: %w", dst.RemoteAddr(), werr))
	default:
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			if err := cw.CloseWrite(); err != nil {
				first.set(fmt.Errorf("half-closing %v: %w", dst.RemoteAddr(), err))
			}
		}
		return n
	}
	// Stop the other direction too, and tell both peers it went wrong.
	abortConn(src)
	abortConn(dst)
	return n
}

// copyConn copies src to dst until io.EOF, reporting read and write errors
// apart.
func copyConn(dst, src net.Conn) (n int64, rerr, werr error) {
	if s, ok := src.(*stream); ok {
		return s.writeTo(dst)
	}
	if s, ok := dst.(*stream); ok {
		return s.readFrom(src)
	}
	bp := getBlock()
	defer putBlock(bp)
	buf := *bp
	for {
		m, err := src.Read(buf)
		if m > 0 {
			w, err := dst.Write(buf[:m])
			n += int64(w)
			if err != nil {
				return n, nil, err
			}
			if w != m {
				return n, nil, io.ErrShortWrite
			}
		}
		if errors.Is(err, io.EOF) {
			return n, nil, nil
		}
		if err != nil {
			return n, err, nil
		}
	}
}

// abortConn closes c so that its peer sees an error rather than an end.
func abortConn(c net.Conn) {
	switch c := c.(type) {
	case *stream:
		c.abort(http2.ErrCodeConnect)
	case *net.TCPConn:
		_ = c.SetLinger(0) // close with RST
		_ = c.Close()
	default:
		_ = c.Close()
	}
}
