package hbone

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"
)

// silenceable is a client's TCP connection that the test can make deaf (its
// reads block until it is closed, as if the peer had gone) or mute (its
// writes vanish, as if the network dropped them).
type silenceable struct {
	net.Conn
	mu     sync.Mutex
	deaf   bool
	mute   bool
	closed chan struct{}
	once   sync.Once
}

func (c *silenceable) Read(p []byte) (int, error) {
	c.mu.Lock()
	deaf := c.deaf
	c.mu.Unlock()
	if deaf {
		<-c.closed
		return 0, net.ErrClosed
	}
	return c.Conn.Read(p)
}

func (c *silenceable) Write(p []byte) (int, error) {
	c.mu.Lock()
	mute := c.mute
	c.mu.Unlock()
	if mute {
		return len(p), nil
	}
	return c.Conn.Write(p)
}

// silence makes c deaf, mute or both.
func (c *silenceable) silence(deaf, mute bool) {
	c.mu.Lock()
	c.deaf, c.mute = c.deaf || deaf, c.mute || mute
	c.mu.Unlock()
}

func (c *silenceable) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// silenceableDial makes the pool's connections silenceable and hands them
// to the test.
func silenceableDial(conns chan<- *silenceable) func(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
	return func(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr.String())
		if err != nil {
			return nil, err
		}
		sc := &silenceable{Conn: c, closed: make(chan struct{})}
		conns <- sc
		return sc, nil
	}
}

// keepaliveEnv is an echo env with a fast keepalive on the client's side
// (client) or the server's, the other side's off, and the pool's
// connections handed to the test as they are dialled.
func keepaliveEnv(t *testing.T, client bool) (*env, <-chan *silenceable) {
	t.Helper()
	conns := make(chan *silenceable, 2)
	e := newEnv(t, echoHandler, func(o *envOptions) {
		const interval, timeout = 20 * time.Millisecond, 500 * time.Millisecond
		if client {
			o.pool.KeepaliveInterval, o.pool.KeepaliveTimeout, o.server.KeepaliveInterval = interval, timeout, -1
		} else {
			o.server.KeepaliveInterval, o.server.KeepaliveTimeout, o.pool.KeepaliveInterval = interval, timeout, -1
		}
		o.pool.Dial = silenceableDial(conns)
	})
	return e, conns
}

// poolConn returns the pool's only connection.
func poolConn(t *testing.T, e *env) *conn {
	t.Helper()
	p := e.pool.(*Pool)
	p.mu.Lock()
	defer p.mu.Unlock()
	if cs := p.conns[e.key]; len(cs) == 1 {
		return cs[0]
	}
	t.Fatalf("pool has %d connections to %v, want 1", len(p.conns[e.key]), e.key)
	return nil
}

// echoOnce writes msg to s and reads it back.
func echoOnce(t *testing.T, s Stream, msg string) {
	t.Helper()
	if _, err := s.Write([]byte(msg)); err != nil {
		t.Fatalf("writing: %v", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo: %q, %v; want %q", buf, err, msg)
	}
}

// TestKeepaliveClient checks the pool's keepalive: an idle connection whose
// peer answers its PINGs stays up, and one whose peer goes silent fails with
// its streams, after which Connect opens a new connection.
func TestKeepaliveClient(t *testing.T) {
	checkLeaks(t)
	e, conns := keepaliveEnv(t, true)
	s := e.connect(t, "10.0.0.1:80")
	defer func() { _ = s.Close() }()
	echoOnce(t, s, "before")
	first := <-conns

	// Idle: each interval without frames brings a PING and its ACK, so
	// the count of frames read grows while the connection stays up.
	c := poolConn(t, e)
	from := c.framesRead.Load()
	waitFor(t, "three keepalive PING ACKs", func() bool { return c.framesRead.Load() >= from+3 })
	echoOnce(t, s, "still up")
	if n := e.ln.n.Load(); n != 1 {
		t.Fatalf("%d connections, want the first one kept", n)
	}

	// The peer goes silent: the stream fails with the keepalive's error.
	first.silence(true, false)
	_ = s.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := s.Read(make([]byte, 1))
	if !errors.Is(err, errKeepaliveTimeout) {
		t.Fatalf("read on a connection whose peer went silent: %v, want %v", err, errKeepaliveTimeout)
	}
	if !strings.Contains(e.logs.String(), "keepalive PING unanswered") {
		t.Errorf("no log line for the keepalive closing the connection:\n%s", e.logs.String())
	}

	s2 := e.connect(t, "10.0.0.1:80")
	defer func() { _ = s2.Close() }()
	echoOnce(t, s2, "after")
	if n := e.ln.n.Load(); n != 2 {
		t.Fatalf("%d connections, want a second one after the keepalive failure", n)
	}
}

// TestKeepaliveServer checks the server's keepalive: a client that stops
// sending anything (its PING ACKs included) has its connection closed.
func TestKeepaliveServer(t *testing.T) {
	checkLeaks(t)
	e, conns := keepaliveEnv(t, false)
	s := e.connect(t, "10.0.0.1:80")
	defer func() { _ = s.Close() }()
	echoOnce(t, s, "hello")
	c := <-conns
	c.silence(false, true)
	select {
	case <-e.ln.accepted()[0].closed:
	case <-time.After(10 * time.Second):
		t.Fatal("the server kept the connection of a client that went silent")
	}
}

// TestKeepaliveDefaults checks the options' defaults and the way to turn
// the keepalive off.
func TestKeepaliveDefaults(t *testing.T) {
	for _, tc := range []struct {
		in, inTimeout, want, wantTimeout time.Duration
	}{
		{0, 0, defaultKeepaliveInterval, defaultKeepaliveTimeout},
		{time.Second, 0, time.Second, defaultKeepaliveTimeout},
		{time.Second, 3 * time.Second, time.Second, 3 * time.Second},
		{-1, 3 * time.Second, 0, 0},
	} {
		i, to := keepaliveDefaults(tc.in, tc.inTimeout)
		if i != tc.want || to != tc.wantTimeout {
			t.Errorf("keepaliveDefaults(%v, %v) = %v, %v; want %v, %v", tc.in, tc.inTimeout, i, to, tc.want, tc.wantTimeout)
		}
	}
}
