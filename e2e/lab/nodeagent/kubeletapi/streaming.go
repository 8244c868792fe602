package kubeletapi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"k8s.io/cri-streaming/pkg/streaming/portforward"
	"k8s.io/cri-streaming/pkg/streaming/remotecommand"
)

// exec serves /exec/{namespace}/{pod}/{container}?command=...&input=1&output=1&error=1&tty=1.
// (The apiserver names the streams input, output and error; cri-streaming
// reads them.) Failures found before the upgrade are plain HTTP errors;
// after it, cri-streaming reports them on the error stream, and a non-zero
// exit code reaches `kubectl exec` as its own exit code.
func (s *Server) exec(w http.ResponseWriter, r *http.Request) {
	ns, pod, ctr := r.PathValue("namespace"), r.PathValue("pod"), r.PathValue("container")
	cmd := r.URL.Query()["command"]
	if len(cmd) == 0 {
		writeError(w, badRequest{errors.New("exec: query parameter command is required")})
		return
	}
	opts, err := remotecommand.NewOptions(r)
	if err != nil {
		writeError(w, badRequest{fmt.Errorf("exec: %w", err)})
		return
	}
	c, err := s.rt.Container(ns, pod, ctr)
	if err != nil {
		writeError(w, fmt.Errorf("exec in container %s of pod %s/%s: %w", ctr, ns, pod, err))
		return
	}
	defer closeConnOnDone(r)()
	remotecommand.ServeExec(w, r, executor{c: c}, ns+"/"+pod, "", ctr, cmd, opts,
		streamIdleTimeout, streamCreationTimeout, remotecommand.SupportedStreamingProtocols)
}

// executor runs commands in one container for remotecommand.ServeExec.
type executor struct{ c Container }

var _ remotecommand.Executor = executor{}

// ExecInContainer implements remotecommand.Executor. A command that ran and
// exited non-zero comes back as a utilexec.CodeExitError.
func (e executor) ExecInContainer(ctx context.Context, _, _, _ string, cmd []string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize, _ time.Duration) error {
	// Typed nils would look like real streams to os/exec.
	var stdout, stderr io.Writer
	if out != nil {
		stdout = out
	}
	if errw != nil {
		stderr = errw
	}
	return runInContainer(ctx, e.c, cmd, in, stdout, stderr, tty, resize)
}

// portForward serves /portForward/{namespace}/{pod}.
func (s *Server) portForward(w http.ResponseWriter, r *http.Request) {
	ns, pod := r.PathValue("namespace"), r.PathValue("pod")
	opts, err := portforward.NewV4Options(r)
	if err != nil {
		writeError(w, badRequest{fmt.Errorf("port-forward: %w", err)})
		return
	}
	netns, err := s.rt.PodNetNS(ns, pod)
	if err != nil {
		writeError(w, fmt.Errorf("port-forward to pod %s/%s: %w", ns, pod, err))
		return
	}
	defer closeConnOnDone(r)()
	// cri-streaming calls PortForward with context.Background(); the
	// request's context, which ends with the session or at shutdown, is the
	// one that should close the pod-side connections.
	f := forwarder{ctx: r.Context(), pod: ns + "/" + pod, netns: netns}
	portforward.ServePortForward(w, r, f, f.pod, "", opts,
		streamIdleTimeout, streamCreationTimeout, portforward.SupportedProtocols)
}

// forwarder connects port-forward streams to ports of one pod.
type forwarder struct {
	ctx   context.Context
	pod   string
	netns string
}

var _ portforward.PortForwarder = forwarder{}

// PortForward implements portforward.PortForwarder: it dials port on the
// pod's loopback and copies both ways. The client half-closing its stream
// half-closes the pod connection; the copy towards the client decides when
// the forward is over.
func (f forwarder) PortForward(_ context.Context, _, _ string, port int32, stream io.ReadWriteCloser) error {
	conn, err := dialInNetNS(f.ctx, f.netns, port)
	if err != nil {
		return fmt.Errorf("dialing port %d in pod %s (is the pod listening on 127.0.0.1:%d or [::1]:%d?): %w",
			port, f.pod, port, port, err)
	}
	defer func() { _ = conn.Close() }()
	stop := context.AfterFunc(f.ctx, func() { _ = conn.Close() })
	defer stop()
	go func() {
		_, err := io.Copy(conn, stream)
		if cw, ok := conn.(interface{ CloseWrite() error }); ok && err == nil {
			_ = cw.CloseWrite()
			return
		}
		_ = conn.Close()
	}()
	if _, err := io.Copy(stream, conn); err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("copying from port %d of pod %s: %w", port, f.pod, err)
	}
	return nil
}
