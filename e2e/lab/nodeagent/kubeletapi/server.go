// Package kubeletapi is the lab node agent's kubelet API: the HTTPS endpoint
// on <InternalIP>:10250 that kube-apiserver proxies `kubectl logs`,
// `kubectl exec` and `kubectl port-forward` to.
//
// It serves the same paths as the kubelet (k8s.io/kubernetes
// pkg/kubelet/server/server.go, and the locations the apiserver builds in
// pkg/registry/core/pod/strategy.go):
//
//	GET      /healthz
//	GET      /containerLogs/{namespace}/{pod}/{container}
//	GET,POST /exec/{namespace}/{pod}/{container}?command=...
//	GET,POST /portForward/{namespace}/{pod}
//	GET,POST /attach/{namespace}/{pod}/{container}   501: not supported
//
// Exec and port-forward use k8s.io/cri-streaming, which negotiates SPDY/3.1
// and websockets exactly as the kubelet does. Exec runs the command with
// nsenter in the net, mount and UTS namespaces of the container's process
// and in its cgroup; port-forward dials 127.0.0.1 (then ::1) inside the
// pod's network namespace.
//
// It deliberately does not do: attach, /run, /pods, /stats, /metrics,
// checkpoint, the `timestamps`, `sinceSeconds`, `sinceTime` and split
// `stream` log options (answered 400, see logs.go), or authorization beyond
// a verified client certificate (the lab trusts its own CA).
package kubeletapi

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"
)

// ErrNotFound is what a Runtime wraps when a pod or container does not exist
// on this node or is not running. The server answers 404.
var ErrNotFound = errors.New("not found")

// ErrNotSupported is returned for exec and port-forward on systems other
// than Linux.
var ErrNotSupported = errors.New("not supported on this platform")

// Runtime is what the server needs from the node agent.
type Runtime interface {
	// Container returns the live process of a container of a pod on this
	// node. ErrNotFound (wrapped) when there is no such pod or container, or
	// it is not running.
	Container(namespace, pod, container string) (Container, error)
	// LogPath returns the log file of the current (or, with previous, the
	// previous) instance of a container. ErrNotFound (wrapped) when there is
	// none.
	LogPath(namespace, pod, container string, previous bool) (string, error)
	// PodNetNS returns the path of the pod's network namespace (e.g.
	// /run/netns/x) for port-forward. ErrNotFound (wrapped) when the pod is
	// not on this node.
	PodNetNS(namespace, pod string) (string, error)
}

// Container is the running process of one container instance.
type Container struct {
	// PID is the container's main process, in the host PID namespace. Exec
	// joins its net, mount and UTS namespaces; log follow ends when it
	// changes.
	PID int
	// CgroupPath is the container's cgroup v2 directory, e.g.
	// /sys/fs/cgroup/lab/pod-x/c. Exec'd processes start in it. May be "".
	CgroupPath string
	// Env is the container's environment, KEY=value.
	Env []string
}

// Options configures a Server.
type Options struct {
	// Addr is where Serve listens, e.g. "10.200.0.11:10250".
	Addr string
	// TLSCertFile and TLSKeyFile are the serving certificate, with an IP SAN
	// for the node's InternalIP.
	TLSCertFile, TLSKeyFile string
	// ClientCAFile is the CA that signed the apiserver's kubelet-client
	// certificate. Client certificates are required and verified against it.
	ClientCAFile string
	// Runtime is the node agent.
	Runtime Runtime
	// Log receives one line per request. Nil means slog.Default().
	Log *slog.Logger
}

const (
	// streamIdleTimeout is the kubelet's default
	// --streaming-connection-idle-timeout.
	streamIdleTimeout = 4 * time.Hour
	// streamCreationTimeout is the kubelet's default (and the
	// cri-streaming DefaultStreamCreationTimeout).
	streamCreationTimeout = 30 * time.Second
	// shutdownTimeout bounds the graceful part of Serve's shutdown.
	shutdownTimeout = 5 * time.Second
)

// Server is the kubelet API of one node.
type Server struct {
	addr    string
	tls     *tls.Config
	rt      Runtime
	log     *slog.Logger
	handler http.Handler
}

// New checks the options and loads the certificates.
func New(o Options) (*Server, error) {
	if o.Runtime == nil {
		return nil, errors.New("kubeletapi: Options.Runtime is nil")
	}
	if o.TLSCertFile == "" || o.TLSKeyFile == "" || o.ClientCAFile == "" {
		return nil, errors.New("kubeletapi: TLSCertFile, TLSKeyFile and ClientCAFile are all required")
	}
	cert, err := tls.LoadX509KeyPair(o.TLSCertFile, o.TLSKeyFile)
	if err != nil {
		return nil, fmt.Errorf("loading serving certificate %s: %w", o.TLSCertFile, err)
	}
	caPEM, err := os.ReadFile(o.ClientCAFile)
	if err != nil {
		return nil, fmt.Errorf("reading client CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("client CA %s holds no PEM certificate", o.ClientCAFile)
	}
	log := o.Log
	if log == nil {
		log = slog.Default()
	}
	s := &Server{
		addr: o.Addr,
		// Authentication is the TLS handshake: the apiserver presents
		// --kubelet-client-certificate, signed by ClientCAFile. There is no
		// authorization step (the kubelet would do a SubjectAccessReview):
		// the lab trusts every certificate its own CA has signed.
		tls: &tls.Config{
			MinVersion:   tls.VersionTLS12,
			Certificates: []tls.Certificate{cert},
			ClientAuth:   tls.RequireAndVerifyClientCert,
			ClientCAs:    pool,
		},
		rt:  o.Runtime,
		log: log,
	}
	s.handler = s.routes()
	return s, nil
}

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok"))
	})
	mux.HandleFunc("GET /containerLogs/{namespace}/{pod}/{container}", s.containerLogs)
	for _, m := range []string{"GET", "POST"} {
		mux.HandleFunc(m+" /exec/{namespace}/{pod}/{container}", s.exec)
		mux.HandleFunc(m+" /portForward/{namespace}/{pod}", s.portForward)
		mux.HandleFunc(m+" /attach/{namespace}/{pod}/{container}", func(w http.ResponseWriter, _ *http.Request) {
			http.Error(w, "attach is not supported by the lab node agent: containers are host processes "+
				"whose output goes to a log file; use kubectl logs -f, or kubectl exec", http.StatusNotImplemented)
		})
	}
	return s.accessLog(mux)
}

// Serve listens on Options.Addr and serves until ctx is done.
func (s *Server) Serve(ctx context.Context) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", s.addr)
	if err != nil {
		return fmt.Errorf("listening on %s (is the node's InternalIP on an interface of this netns?): %w", s.addr, err)
	}
	return s.ServeListener(ctx, ln)
}

// ServeListener serves TLS on ln until ctx is done, then shuts down: request
// contexts are cancelled (which ends log follows, kills exec'd commands and
// closes port-forward connections), and idle connections are closed. It
// closes ln. It returns nil after a shutdown caused by ctx.
func (s *Server) ServeListener(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           s.handler,
		TLSConfig:         s.tls.Clone(),
		ReadHeaderTimeout: 10 * time.Second,
		// Every request context derives from ctx, so shutdown reaches the
		// long-lived ones too: http.Server.Shutdown does not wait for, or
		// close, hijacked (exec, port-forward) connections.
		BaseContext: func(net.Listener) context.Context { return ctx },
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, c)
		},
		// TLS handshake failures land here: an apiserver with the wrong
		// kubelet client certificate shows up as a warning.
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(tls.NewListener(ln, srv.TLSConfig)) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serving kubelet API on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
	}
	// Serve returns http.ErrServerClosed once Shutdown or Close has begun.
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		s.log.Warn("kubelet API server ended during shutdown", "error", err)
	}
	return nil
}

// connKey keys the request's net.Conn in its context.
type connKey struct{}

// closeConnOnDone closes the connection of r when r's context ends. After a
// hijack nothing else ties a streaming session to server shutdown.
func closeConnOnDone(r *http.Request) (stop func() bool) {
	c, ok := r.Context().Value(connKey{}).(net.Conn)
	if !ok {
		return func() bool { return false }
	}
	return context.AfterFunc(r.Context(), func() { _ = c.Close() })
}

// badRequest marks an error the client caused (400).
type badRequest struct{ error }

// writeError is the one place a failure becomes an HTTP status.
func writeError(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	var br badRequest
	switch {
	case errors.As(err, &br):
		code = http.StatusBadRequest
	case errors.Is(err, ErrNotFound):
		code = http.StatusNotFound
	case errors.Is(err, ErrNotSupported):
		code = http.StatusNotImplemented
	}
	http.Error(w, err.Error(), code)
}

// accessLog logs each request once it is done: for exec and port-forward
// that is when the session ends.
func (s *Server) accessLog(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w}
		next.ServeHTTP(rec, r)
		status := rec.status
		if status == 0 {
			// A websocket upgrade hijacks the unwrapped writer, so the
			// recorder never sees its 101.
			status = http.StatusOK
			if r.Header.Get("Upgrade") != "" {
				status = http.StatusSwitchingProtocols
			}
		}
		user := ""
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			user = r.TLS.PeerCertificates[0].Subject.CommonName
		}
		s.log.Info("kubelet api request",
			"method", r.Method,
			"path", r.URL.Path,
			"status", status,
			"duration", time.Since(start),
			"user", user,
			"remote", r.RemoteAddr)
	})
}

// statusRecorder remembers the status code. It passes Flush and Hijack
// through (logs follow, SPDY upgrade) and unwraps for the websocket upgrade
// in cri-streaming, which looks for Unwrap.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return r.ResponseWriter.Write(b)
}

func (r *statusRecorder) Flush() {
	if f, ok := r.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (r *statusRecorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	h, ok := r.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, errors.New("response writer cannot hijack")
	}
	if r.status == 0 {
		r.status = http.StatusSwitchingProtocols
	}
	return h.Hijack()
}

func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }
