package nodeagent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ambitmesh/ambit/cni"
)

// ServePlugin answers the chained CNI plugin on a Unix socket at path until
// ctx is done: an ADD for an enrolled pod returns once the pod is handed
// to ztunnel and its traffic redirected, so the pod's containers never run
// uncaptured.
func (a *Agent) ServePlugin(ctx context.Context, path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	_ = os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("listening for the CNI plugin on %s: %w", path, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+cni.AddPath, a.pluginAdd)
	mux.HandleFunc("POST "+cni.DelPath, a.pluginDel)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { <-ctx.Done(); _ = srv.Close() }()
	a.log.Info("serving the CNI plugin", "socket", path)
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func (a *Agent) pluginAdd(w http.ResponseWriter, r *http.Request) {
	var req cni.PodRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		pluginError(w, http.StatusBadRequest, fmt.Sprintf("decoding the request: %v", err))
		return
	}
	// The informer may not have the pod yet: ask the API server.
	pod, err := a.opts.Client.CoreV1().Pods(req.PodNamespace).Get(r.Context(), req.PodName, metav1.GetOptions{})
	if err != nil {
		code := http.StatusServiceUnavailable
		if apierrors.IsNotFound(err) {
			code = http.StatusNotFound
		}
		pluginError(w, code, fmt.Sprintf("looking up pod %s/%s: %v", req.PodNamespace, req.PodName, err))
		return
	}
	if req.PodUID != "" && string(pod.UID) != req.PodUID {
		pluginError(w, http.StatusConflict, fmt.Sprintf("pod %s/%s has UID %s, not the runtime's %s", req.PodNamespace, req.PodName, pod.UID, req.PodUID))
		return
	}
	ns, err := a.opts.Client.CoreV1().Namespaces().Get(r.Context(), pod.Namespace, metav1.GetOptions{})
	if err != nil {
		pluginError(w, http.StatusServiceUnavailable, fmt.Sprintf("looking up namespace %s: %v", pod.Namespace, err))
		return
	}
	if pod.Spec.HostNetwork || !Enrolled(ns.Labels, pod.Labels) {
		writeJSON(w, cni.AddResponse{Redirected: false})
		return
	}
	if len(pod.Status.HostIPs) == 0 && pod.Status.HostIP == "" {
		pod.Status.HostIP = a.nodeIP
	}
	// kubelet reports the pod's addresses only after the sandbox is up:
	// take them from the primary plugin's result.
	if len(pod.Status.PodIPs) == 0 && len(req.IPs) > 0 {
		for _, ip := range req.IPs {
			pod.Status.PodIPs = append(pod.Status.PodIPs, corev1.PodIP{IP: ip.String()})
		}
		pod.Status.PodIP = req.IPs[0].String()
	}
	if err := a.enrol(r.Context(), pod, req.Netns); err != nil {
		pluginError(w, http.StatusInternalServerError, fmt.Sprintf("enrolling pod %s/%s: %v", pod.Namespace, pod.Name, err))
		return
	}
	writeJSON(w, cni.AddResponse{Redirected: true})
}

func (a *Agent) pluginDel(w http.ResponseWriter, r *http.Request) {
	var req cni.PodRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		pluginError(w, http.StatusBadRequest, fmt.Sprintf("decoding the request: %v", err))
		return
	}
	a.forgetByName(types.NamespacedName{Namespace: req.PodNamespace, Name: req.PodName})
	writeJSON(w, struct{}{})
}

func pluginError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(cni.ErrorResponse{Error: msg})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}
