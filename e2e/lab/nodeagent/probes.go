package nodeagent

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// probe runs the container's readiness and liveness probes while its
// current process lives. Probes come from the node's network namespace to
// the pod IP, as kubelet's do.
func (w *podWorker) probe(ctx context.Context, c *ctr) {
	if c.spec.ReadinessProbe != nil {
		go w.probeLoop(ctx, c, c.spec.ReadinessProbe, func(ok bool) {
			w.mu.Lock()
			changed := c.ready != ok && c.pid != 0
			if c.pid != 0 {
				c.ready = ok
			}
			w.mu.Unlock()
			if changed {
				w.markDirty()
			}
		})
	}
	if c.spec.LivenessProbe != nil {
		go w.probeLoop(ctx, c, c.spec.LivenessProbe, func(ok bool) {
			if ok {
				return
			}
			w.mu.Lock()
			pid := c.pid
			c.killed = true
			w.mu.Unlock()
			if pid > 0 {
				w.log.Info("liveness probe failed; restarting container", "container", c.spec.Name)
				_ = syscall.Kill(-pid, syscall.SIGKILL)
			}
		})
	}
}

// probeLoop calls report with the probe's verdict each time it changes by
// the thresholds (successThreshold successes, failureThreshold failures).
func (w *podWorker) probeLoop(ctx context.Context, c *ctr, p *corev1.Probe, report func(bool)) {
	period := secs(p.PeriodSeconds, 10)
	timeout := secs(p.TimeoutSeconds, 1)
	succ := int(max(p.SuccessThreshold, 1))
	fail := int(max(p.FailureThreshold, 3))
	select {
	case <-ctx.Done():
		return
	case <-time.After(secs(p.InitialDelaySeconds, 0)):
	}
	var okRun, failRun int
	for {
		w.mu.Lock()
		pid := c.pid
		ip := ""
		if w.sandbox != nil {
			ip = w.sandbox.ip
		}
		w.mu.Unlock()
		if pid > 0 {
			err := w.runProbe(ctx, c, p, ip, pid, timeout)
			if err == nil {
				okRun, failRun = okRun+1, 0
				if okRun == succ {
					report(true)
				}
			} else {
				okRun, failRun = 0, failRun+1
				w.log.Debug("probe failed", "container", c.spec.Name, "error", err)
				if failRun == fail {
					report(false)
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(period):
		}
	}
}

func secs(s int32, def int) time.Duration {
	if s <= 0 {
		return time.Duration(def) * time.Second
	}
	return time.Duration(s) * time.Second
}

func (w *podWorker) runProbe(ctx context.Context, c *ctr, p *corev1.Probe, ip string, pid int, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	switch {
	case p.HTTPGet != nil:
		port, err := resolvePort(p.HTTPGet.Port, &c.spec)
		if err != nil {
			return err
		}
		host := ip
		if p.HTTPGet.Host != "" {
			host = p.HTTPGet.Host
		}
		scheme := "http"
		if p.HTTPGet.Scheme == corev1.URISchemeHTTPS {
			scheme = "https"
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s://%s%s", scheme, net.JoinHostPort(host, strconv.Itoa(port)), p.HTTPGet.Path), nil)
		if err != nil {
			return err
		}
		for _, h := range p.HTTPGet.HTTPHeaders {
			req.Header.Add(h.Name, h.Value)
		}
		req.Header.Set("User-Agent", "kube-probe/1.36")
		client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, DisableKeepAlives: true}}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		_ = resp.Body.Close() // only the status counts
		if resp.StatusCode < 200 || resp.StatusCode >= 400 {
			return fmt.Errorf("HTTP probe: status %d", resp.StatusCode)
		}
		return nil
	case p.TCPSocket != nil:
		port, err := resolvePort(p.TCPSocket.Port, &c.spec)
		if err != nil {
			return err
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
		if err != nil {
			return err
		}
		return conn.Close()
	case p.Exec != nil:
		args := append([]string{"--target", strconv.Itoa(pid), "--net", "--mount", "--uts", "--"}, p.Exec.Command...)
		cmd := exec.CommandContext(ctx, "nsenter", args...)
		w.mu.Lock()
		cmd.Env = c.env
		w.mu.Unlock()
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("exec probe: %w: %s", err, out)
		}
		return nil
	case p.GRPC != nil:
		return fmt.Errorf("gRPC probes are not supported by the lab")
	}
	return fmt.Errorf("probe has no handler")
}

func resolvePort(port intstr.IntOrString, c *corev1.Container) (int, error) {
	if port.Type == intstr.Int {
		return port.IntValue(), nil
	}
	for _, p := range c.Ports {
		if p.Name == port.StrVal {
			return int(p.ContainerPort), nil
		}
	}
	return 0, fmt.Errorf("no container port named %q", port.StrVal)
}
