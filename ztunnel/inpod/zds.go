// Package inpod is ztunnel's side of in-pod capture: the ZDS protocol over
// which the node agent hands ztunnel each enrolled pod's network namespace
// (a file descriptor, SCM_RIGHTS, on a SOCK_SEQPACKET Unix socket, Istio's
// istio.workload.zds messages), and the helpers that open listeners and
// make sockets inside such a namespace.
//
// It also holds the node agent's end of the protocol (Server), used by the
// CNI node agent and by tests that play it.
//
// It does not decide what to serve in a namespace: that is the proxy's job,
// behind the Handler interface.
package inpod

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/ambitmesh/ambit/api/zdsapi"
)

// Handler is what ztunnel does with the node agent's messages.
type Handler interface {
	// Add starts serving a workload inside netns; the handler owns netns
	// from then on (and closes it). Adding a uid that is already served
	// replaces it.
	Add(ctx context.Context, uid string, info *zdsapi.WorkloadInfo, netns *NetNS) error
	// Del stops serving a workload and closes its listeners.
	Del(uid string) error
	// Reconcile is called once a snapshot is complete with every uid the
	// agent sent (added or kept); workloads not in it are gone.
	Reconcile(present map[string]bool)
}

// maxMessage bounds a ZDS message; they are a few hundred bytes.
const maxMessage = 64 << 10

// Client is ztunnel's connection to the node agent. It reconnects with
// backoff; a new connection starts with a fresh snapshot.
type Client struct {
	Path    string
	Handler Handler
	Log     *slog.Logger
	// Connected, if set, is called after each snapshot is applied.
	Connected func()
}

// Run connects and serves until ctx is done.
func (c *Client) Run(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	for {
		err := c.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		c.Log.Warn("ZDS session ended; reconnecting", "socket", c.Path, "error", err, "backoff", backoff)
		jitter := time.Duration(rand.Int64N(int64(backoff) / 2))
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff + jitter):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

func (c *Client) session(ctx context.Context) error {
	var d net.Dialer
	raw, err := d.DialContext(ctx, "unixpacket", c.Path)
	if err != nil {
		return fmt.Errorf("connecting to the node agent at %s (is it running on this node?): %w", c.Path, err)
	}
	conn := raw.(*net.UnixConn)
	defer func() { _ = conn.Close() }()
	go func() { <-ctx.Done(); _ = conn.Close() }()
	if err := send(conn, &zdsapi.ZdsHello{Version: zdsapi.Version_V1}); err != nil {
		return fmt.Errorf("sending hello: %w", err)
	}
	present := map[string]bool{}
	snapshotDone := false
	for {
		var req zdsapi.WorkloadRequest
		fds, err := recv(conn, &req)
		if err != nil {
			return err
		}
		var herr error
		switch p := req.Payload.(type) {
		case *zdsapi.WorkloadRequest_Add:
			if len(fds) == 0 {
				herr = fmt.Errorf("add %s: no netns fd attached", p.Add.Uid)
				break
			}
			// The netns fd, then, in eBPF capture mode, the pod's
			// listener SOCKMAP (Ambit's addition to Istio's ZDS).
			ns := NetNSFromFD(fds[0])
			if len(fds) > 1 {
				ns.sockmap = os.NewFile(uintptr(fds[1]), "sockmap")
			}
			fds = fds[min(len(fds), 2):]
			herr = c.Handler.Add(ctx, p.Add.Uid, p.Add.WorkloadInfo, ns)
			if !snapshotDone {
				present[p.Add.Uid] = true
			}
		case *zdsapi.WorkloadRequest_Keep:
			present[p.Keep.Uid] = true
		case *zdsapi.WorkloadRequest_Del:
			herr = c.Handler.Del(p.Del.Uid)
		case *zdsapi.WorkloadRequest_SnapshotSent:
			c.Handler.Reconcile(present)
			snapshotDone = true
			present = map[string]bool{}
			if c.Connected != nil {
				c.Connected()
			}
		default:
			herr = errors.New("unknown ZDS request")
		}
		for _, fd := range fds {
			closeFD(fd)
		}
		ack := &zdsapi.WorkloadResponse{Payload: &zdsapi.WorkloadResponse_Ack{Ack: &zdsapi.Ack{}}}
		if herr != nil {
			c.Log.Error("handling ZDS request", "error", herr)
			ack.GetAck().Error = herr.Error()
		}
		if err := send(conn, ack); err != nil {
			return fmt.Errorf("sending ack: %w", err)
		}
	}
}

// send writes one message with fds attached.
func send(conn *net.UnixConn, m proto.Message, fds ...int) error {
	b, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_, _, err = conn.WriteMsgUnix(b, oob, nil)
	return err
}

// maxFDs bounds the fds a message may carry; extra ones are closed.
const maxFDs = 4

// recv reads one message and the fds attached to it, in order.
func recv(conn *net.UnixConn, m proto.Message) ([]int, error) {
	buf := make([]byte, maxMessage)
	oob := make([]byte, unix.CmsgSpace(maxFDs*4))
	n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, err
	}
	if n == 0 && oobn == 0 {
		return nil, errors.New("connection closed by peer")
	}
	var fds []int
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return nil, fmt.Errorf("parsing control message: %w", err)
		}
		for _, cm := range msgs {
			if got, err := unix.ParseUnixRights(&cm); err == nil {
				fds = append(fds, got...)
			}
		}
	}
	if err := proto.Unmarshal(buf[:n], m); err != nil {
		for _, fd := range fds {
			closeFD(fd)
		}
		return nil, fmt.Errorf("decoding ZDS message: %w", err)
	}
	return fds, nil
}
