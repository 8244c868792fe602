package inpod

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sort"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/ambitmesh/ambit/api/zdsapi"
)

// Server is the node agent's end of ZDS: it holds the enrolled pods of a
// node and hands them to whichever ztunnel connects (the newest connection
// wins, as ztunnel restarts connect again), a full snapshot first, then
// each change.
type Server struct {
	log *slog.Logger
	ln  *net.UnixListener

	mu        sync.Mutex
	workloads map[string]entry
	conn      *zdsConn // the current ztunnel, nil if none
}

// entry is an enrolled pod. The namespace is held open by fd, not path:
// a /proc/<pid>/ns/net path goes away with its process while the
// namespace lives on.
type entry struct {
	info    *zdsapi.WorkloadInfo
	netns   *os.File
	sockmap *os.File // eBPF mode: the pod's listener SOCKMAP; nil otherwise
}

func (e entry) close() {
	_ = e.netns.Close() // read-only
	if e.sockmap != nil {
		_ = e.sockmap.Close()
	}
}

type zdsConn struct {
	mu   sync.Mutex // one request in flight
	conn *net.UnixConn
}

// ErrNoZtunnel is returned by Upsert and Remove when no ztunnel is connected:
// the change is recorded and goes out with the next snapshot.
var ErrNoZtunnel = errors.New("no ztunnel connected")

// NewServer listens on a SOCK_SEQPACKET Unix socket at path (replacing a
// stale socket file).
func NewServer(path string, log *slog.Logger) (*Server, error) {
	_ = os.Remove(path)
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("listening on ZDS socket %s: %w", path, err)
	}
	return &Server{log: log, ln: ln, workloads: map[string]entry{}}, nil
}

// Serve accepts ztunnel connections until ctx is done.
func (s *Server) Serve(ctx context.Context) error {
	go func() { <-ctx.Done(); _ = s.ln.Close() }()
	for {
		c, err := s.ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		go s.handshake(c)
	}
}

// Close stops listening and drops the current connection.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.conn != nil {
		_ = s.conn.conn.Close()
	}
	s.mu.Unlock()
	return s.ln.Close()
}

func (s *Server) handshake(c *net.UnixConn) {
	var hello zdsapi.ZdsHello
	fds, err := recv(c, &hello)
	for _, fd := range fds {
		closeFD(fd)
	}
	if err != nil {
		s.log.Warn("ZDS hello", "error", err)
		_ = c.Close()
		return
	}
	zc := &zdsConn{conn: c}
	s.mu.Lock()
	if s.conn != nil {
		_ = s.conn.conn.Close()
	}
	s.conn = zc
	snapshot := make([]string, 0, len(s.workloads))
	for uid := range s.workloads {
		snapshot = append(snapshot, uid)
	}
	entries := make(map[string]entry, len(s.workloads))
	for k, v := range s.workloads {
		entries[k] = v
	}
	// Hold zc's lock through the snapshot so that live changes queue
	// behind it.
	zc.mu.Lock()
	s.mu.Unlock()
	defer zc.mu.Unlock()
	sort.Strings(snapshot)
	for _, uid := range snapshot {
		if err := zc.add(uid, entries[uid]); err != nil {
			s.log.Warn("sending snapshot", "uid", uid, "error", err)
		}
	}
	req := &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_SnapshotSent{SnapshotSent: &zdsapi.SnapshotSent{}}}
	if err := zc.request(req); err != nil {
		s.log.Warn("sending snapshot end", "error", err)
	}
	s.log.Info("ztunnel connected; snapshot sent", "workloads", len(snapshot))
}

// Upsert records an enrolled pod (opening its network namespace, which
// it holds open until Remove) and sends it to the connected ztunnel,
// waiting for its ack. sockmap, if not nil, is the pod's listener SOCKMAP
// (eBPF capture mode), sent along for ztunnel to put its listeners in;
// the server owns it from then on.
func (s *Server) Upsert(uid string, info *zdsapi.WorkloadInfo, netnsPath string, sockmap *os.File) error {
	f, err := os.Open(netnsPath)
	if err != nil {
		if sockmap != nil {
			_ = sockmap.Close()
		}
		return fmt.Errorf("opening netns of %s: %w", uid, err)
	}
	e := entry{info: info, netns: f, sockmap: sockmap}
	s.mu.Lock()
	if old, ok := s.workloads[uid]; ok {
		old.close()
	}
	s.workloads[uid] = e
	zc := s.conn
	s.mu.Unlock()
	if zc == nil {
		return ErrNoZtunnel
	}
	zc.mu.Lock()
	defer zc.mu.Unlock()
	return zc.add(uid, e)
}

// Remove forgets a pod and tells the connected ztunnel.
func (s *Server) Remove(uid string) error {
	s.mu.Lock()
	if old, ok := s.workloads[uid]; ok {
		old.close()
	}
	delete(s.workloads, uid)
	zc := s.conn
	s.mu.Unlock()
	if zc == nil {
		return ErrNoZtunnel
	}
	zc.mu.Lock()
	defer zc.mu.Unlock()
	return zc.request(&zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Del{Del: &zdsapi.DelWorkload{Uid: uid}}})
}

func (zc *zdsConn) add(uid string, e entry) error {
	req := &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{Uid: uid, WorkloadInfo: e.info}}}
	fds := []int{int(e.netns.Fd())}
	if e.sockmap != nil {
		fds = append(fds, int(e.sockmap.Fd()))
	}
	return zc.request(req, fds...)
}

// request sends one request and waits for its ack.
func (zc *zdsConn) request(m proto.Message, fds ...int) error {
	_ = zc.conn.SetDeadline(time.Now().Add(10 * time.Second))
	defer func() { _ = zc.conn.SetDeadline(time.Time{}) }()
	if err := send(zc.conn, m, fds...); err != nil {
		return fmt.Errorf("sending to ztunnel: %w", err)
	}
	var resp zdsapi.WorkloadResponse
	rfds, err := recv(zc.conn, &resp)
	for _, fd := range rfds {
		closeFD(fd)
	}
	if err != nil {
		return fmt.Errorf("waiting for ztunnel's ack: %w", err)
	}
	if msg := resp.GetAck().GetError(); msg != "" {
		return fmt.Errorf("ztunnel refused: %s", msg)
	}
	return nil
}
