// Package nodeagent is Ambit's CNI node agent (a DaemonSet, one per node):
// it decides which pods on its node are enrolled in the mesh (the
// istio.io/dataplane-mode label on the pod or its namespace), and for each
// one sets up redirection inside the pod's network namespace and hands the
// namespace to ztunnel over ZDS; it releases pods whose label goes. Pods
// already running are enrolled and released without restarts; new pods are
// enrolled by the chained CNI plugin before they start (the plugin asks the
// agent over a Unix socket, cni.AddPath).
//
// It redirects in one of two modes, chosen per node with a flag: eBPF (the
// default: an sk_lookup program from package bpf, plus the policy routing
// of package bpfroute) or nftables (package nft, for kernels without
// sk_lookup). Either way everything is inside the pod's network namespace.
// It does not proxy anything: ztunnel does.
package nodeagent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/ambitmesh/ambit/api/zdsapi"
	"github.com/ambitmesh/ambit/bpf"
	"github.com/ambitmesh/ambit/cni/bpfroute"
	"github.com/ambitmesh/ambit/cni/nft"
	"github.com/ambitmesh/ambit/ztunnel/inpod"
)

// Labels and annotations of Istio's ambient API.
const (
	LabelDataplaneMode    = "istio.io/dataplane-mode"
	DataplaneModeAmbient  = "ambient"
	DataplaneModeNone     = "none"
	AnnotationRedirection = "ambient.istio.io/redirection"
)

// Enrolled reports whether a pod is in the mesh: its own label decides when
// it is "ambient" or "none"; otherwise its namespace's label, where only
// "ambient" enrols. (The controller applies the same rule.)
func Enrolled(nsLabels, podLabels map[string]string) bool {
	switch podLabels[LabelDataplaneMode] {
	case DataplaneModeAmbient:
		return true
	case DataplaneModeNone:
		return false
	}
	return nsLabels[LabelDataplaneMode] == DataplaneModeAmbient
}

// Mode is how the agent redirects an enrolled pod's traffic.
type Mode string

// Capture modes.
const (
	ModeEBPF     Mode = "ebpf"
	ModeNFTables Mode = "nftables"
)

// DefaultPinDir is where eBPF mode pins each pod's objects, one directory
// per pod UID.
const DefaultPinDir = "/sys/fs/bpf/ambit"

// Options configures the agent.
type Options struct {
	NodeName string
	Client   kubernetes.Interface
	// ZDSSocket is where ztunnel connects (/var/run/ztunnel/ztunnel.sock).
	ZDSSocket string
	Log       *slog.Logger
	// Mode is the capture mode (default ModeEBPF).
	Mode Mode
	// PinDir is the eBPF mode's pin directory (default DefaultPinDir).
	PinDir string
}

// Agent is a running node agent.
type Agent struct {
	opts  Options
	log   *slog.Logger
	zds   *inpod.Server
	pods  listersv1.PodLister
	nss   listersv1.NamespaceLister
	queue workqueue.TypedRateLimitingInterface[types.NamespacedName]

	nodeIP string // where kubelet's probes come from
	// keeper marks an enrolling pod's open connections so that they
	// finish uncaptured (eBPF mode; nil if the kernel cannot).
	keeper *bpf.ConnectionKeeper

	mu       sync.Mutex
	enrolled map[types.UID]enrolment // pods whose traffic is redirected
}

type enrolment struct {
	netns string
	name  types.NamespacedName
}

// New returns an agent; Run starts it.
func New(opts Options) (*Agent, error) {
	if opts.Mode == "" {
		opts.Mode = ModeEBPF
	}
	if opts.Mode != ModeEBPF && opts.Mode != ModeNFTables {
		return nil, fmt.Errorf("unknown capture mode %q: want %q or %q", opts.Mode, ModeEBPF, ModeNFTables)
	}
	if opts.PinDir == "" {
		opts.PinDir = DefaultPinDir
	}
	zds, err := inpod.NewServer(opts.ZDSSocket, opts.Log.With("component", "zds"))
	if err != nil {
		return nil, err
	}
	a := &Agent{
		opts: opts, log: opts.Log, zds: zds, enrolled: map[types.UID]enrolment{},
		queue: workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[types.NamespacedName]()),
	}
	if opts.Mode == ModeEBPF {
		// Without it, enrolment resets the connections a pod has open
		// (their next packet is captured): worse, but never open.
		if a.keeper, err = bpf.NewConnectionKeeper(bpfroute.Mark); err != nil {
			a.log.Warn("connections open at enrolment will be reset: the kernel cannot mark them (iter/tcp with bpf_setsockopt needs Linux 5.16+ with BTF)", "error", err)
		}
	}
	return a, nil
}

// Run serves ZDS and keeps every pod of the node enrolled or released as
// its labels say, until ctx is done. Redirection stays in place when the
// agent stops (fail closed; a restarted agent picks the pods up again).
func (a *Agent) Run(ctx context.Context) error {
	defer func() { _ = a.zds.Close() }()
	if a.keeper != nil {
		defer func() { _ = a.keeper.Close() }()
	}
	if node, err := a.opts.Client.CoreV1().Nodes().Get(ctx, a.opts.NodeName, metav1.GetOptions{}); err == nil {
		for _, ad := range node.Status.Addresses {
			if ad.Type == corev1.NodeInternalIP {
				a.nodeIP = ad.Address
			}
		}
	}
	onNode := informers.NewSharedInformerFactoryWithOptions(a.opts.Client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", a.opts.NodeName).String()
	}))
	all := informers.NewSharedInformerFactory(a.opts.Client, 0)
	podInf := onNode.Core().V1().Pods()
	nsInf := all.Core().V1().Namespaces()
	a.pods, a.nss = podInf.Lister(), nsInf.Lister()
	enqueue := func(obj any) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = t.Obj
		}
		if p, ok := obj.(*corev1.Pod); ok {
			a.queue.Add(types.NamespacedName{Namespace: p.Namespace, Name: p.Name})
		}
	}
	if _, err := podInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueue, UpdateFunc: func(_, o any) { enqueue(o) }, DeleteFunc: enqueue,
	}); err != nil {
		return err
	}
	// A namespace label change touches every pod of the node in it.
	nsChanged := func(obj any) {
		ns, ok := obj.(*corev1.Namespace)
		if !ok {
			return
		}
		pods, _ := a.pods.Pods(ns.Name).List(labelsEverything())
		for _, p := range pods {
			enqueue(p)
		}
	}
	if _, err := nsInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: nsChanged, UpdateFunc: func(_, o any) { nsChanged(o) },
	}); err != nil {
		return err
	}
	onNode.Start(ctx.Done())
	all.Start(ctx.Done())
	onNode.WaitForCacheSync(ctx.Done())
	all.WaitForCacheSync(ctx.Done())
	// Take up the node's pods before answering ztunnel: the first
	// snapshot it gets must hold every enrolled pod, or ztunnel drops the
	// ones missing from it, closing their connections (after an agent
	// restart, when ztunnel reconnects at once). Until then ztunnel's
	// connection waits in the socket's backlog.
	pods, err := a.pods.List(labelsEverything())
	if err != nil {
		return err
	}
	for _, p := range pods {
		key := types.NamespacedName{Namespace: p.Namespace, Name: p.Name}
		if err := a.sync(ctx, key); err != nil {
			a.log.Warn("syncing pod", "pod", key.String(), "error", err)
			a.queue.AddRateLimited(key)
		}
	}
	go func() { _ = a.zds.Serve(ctx) }()
	a.log.Info("node agent running", "node", a.opts.NodeName, "mode", a.opts.Mode, "zds", a.opts.ZDSSocket, "pods", len(pods))
	go func() { <-ctx.Done(); a.queue.ShutDown() }()
	for a.next(ctx) {
	}
	return nil
}

func (a *Agent) next(ctx context.Context) bool {
	key, quit := a.queue.Get()
	if quit {
		return false
	}
	defer a.queue.Done(key)
	if err := a.sync(ctx, key); err != nil {
		a.log.Warn("syncing pod", "pod", key.String(), "error", err)
		a.queue.AddRateLimited(key)
		return true
	}
	a.queue.Forget(key)
	return true
}

// sync brings one pod to its desired state.
func (a *Agent) sync(ctx context.Context, key types.NamespacedName) error {
	pod, err := a.pods.Pods(key.Namespace).Get(key.Name)
	if apierrors.IsNotFound(err) {
		a.forgetByName(key)
		return nil
	}
	if err != nil {
		return err
	}
	want := a.wants(pod)
	a.mu.Lock()
	cur, have := a.enrolled[pod.UID]
	a.mu.Unlock()
	// A pod the CNI plugin just enrolled has no IP in the informer's copy
	// until kubelet reports it: that is not a reason to release it.
	if have && !want && pod.Status.PodIP == "" && pod.DeletionTimestamp == nil &&
		pod.Status.Phase != corev1.PodSucceeded && pod.Status.Phase != corev1.PodFailed && a.labelsEnrol(pod) {
		return nil
	}
	switch {
	case want && !have:
		netns, err := FindNetns(podIP(pod))
		if err != nil {
			return err
		}
		return a.enrol(ctx, pod, netns)
	case !want && have:
		netns := cur.netns
		if _, err := os.Stat(netns); errors.Is(err, os.ErrNotExist) && pod.Status.PodIP != "" {
			// The process the path went through has ended; the pod
			// may well be running on.
			if found, err := FindNetns(podIP(pod)); err == nil {
				netns = found
			}
		}
		return a.release(ctx, pod, netns)
	case !want && pod.Annotations[AnnotationRedirection] == "enabled" && pod.DeletionTimestamp == nil && pod.Status.PodIP != "":
		// Enrolled by an earlier run of the agent and no longer wanted
		// (say the label went while the agent was down).
		netns, err := FindNetns(podIP(pod))
		if err != nil {
			return err
		}
		return a.release(ctx, pod, netns)
	}
	return nil
}

// wants reports whether pod should be redirected now.
func (a *Agent) wants(pod *corev1.Pod) bool {
	if pod.Spec.HostNetwork || pod.DeletionTimestamp != nil || pod.Status.PodIP == "" ||
		pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return false
	}
	return a.labelsEnrol(pod)
}

// labelsEnrol reports whether the pod's and its namespace's labels put it in
// the mesh.
func (a *Agent) labelsEnrol(pod *corev1.Pod) bool {
	ns, err := a.nss.Get(pod.Namespace)
	if err != nil {
		return false
	}
	return Enrolled(ns.Labels, pod.Labels)
}

// enrol hands the pod to ztunnel, then redirects its traffic: in that order
// so that redirected connections find ztunnel's listeners. If ztunnel is
// not connected the rules go in anyway (fail closed: the pod's traffic
// fails until ztunnel is back, and never leaves in plaintext); ztunnel gets
// the pod in its snapshot when it connects.
func (a *Agent) enrol(ctx context.Context, pod *corev1.Pod, netns string) error {
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	info := &zdsapi.WorkloadInfo{Name: pod.Name, Namespace: pod.Namespace, ServiceAccount: sa}
	var sockmap *os.File
	if a.opts.Mode == ModeEBPF {
		// The program drops what it would steer while ztunnel's
		// listeners are not in its map: attached before ztunnel has
		// them, inbound connections wait (their SYNs are retried)
		// instead of reaching the app in plaintext.
		var err error
		if sockmap, err = a.attachBPF(pod, netns); err != nil {
			return err
		}
	}
	if err := a.zds.Upsert(string(pod.UID), info, netns, sockmap); err != nil && !errors.Is(err, inpod.ErrNoZtunnel) {
		return fmt.Errorf("handing %s/%s to ztunnel: %w", pod.Namespace, pod.Name, err)
	}
	var err error
	if a.opts.Mode == ModeEBPF {
		err = bpfroute.Apply(netns, podIPs(pod), a.keeper)
	} else {
		err = nft.Apply(netns, probeSources(pod))
	}
	if err != nil {
		return err
	}
	if err := setTWReuse(netns, twReuseEnrolled); err != nil {
		return err
	}
	a.mu.Lock()
	a.enrolled[pod.UID] = enrolment{netns: netns, name: types.NamespacedName{Namespace: pod.Namespace, Name: pod.Name}}
	a.mu.Unlock()
	if err := a.annotate(ctx, pod, true); err != nil {
		return err
	}
	a.log.Info("pod enrolled", "pod", pod.Namespace+"/"+pod.Name, "netns", netns, "mode", a.opts.Mode)
	return nil
}

// release removes the redirection first, then tells ztunnel, so that no
// connection is redirected to listeners that are going away. It removes
// what either mode installs, so that pods enrolled before a mode change
// are released cleanly.
func (a *Agent) release(ctx context.Context, pod *corev1.Pod, netns string) error {
	if err := bpfroute.Remove(netns); err != nil {
		return err
	}
	if err := bpf.Detach(a.pinDir(pod.UID)); err != nil {
		return err
	}
	if err := nft.Remove(netns); err != nil {
		return err
	}
	if err := setTWReuse(netns, twReuseDefault); err != nil {
		return err
	}
	if err := a.zds.Remove(string(pod.UID)); err != nil && !errors.Is(err, inpod.ErrNoZtunnel) {
		a.log.Warn("telling ztunnel a pod left", "pod", pod.Namespace+"/"+pod.Name, "error", err)
	}
	a.mu.Lock()
	delete(a.enrolled, pod.UID)
	a.mu.Unlock()
	if err := a.annotate(ctx, pod, false); err != nil {
		return err
	}
	a.log.Info("pod released", "pod", pod.Namespace+"/"+pod.Name)
	return nil
}

// forgetByName drops the record of a deleted pod; its namespace went with
// it, so there is nothing to undo but ztunnel's state.
func (a *Agent) forgetByName(key types.NamespacedName) {
	a.mu.Lock()
	var gone []types.UID
	for uid, e := range a.enrolled {
		if e.name == key {
			gone = append(gone, uid)
		}
	}
	for _, uid := range gone {
		delete(a.enrolled, uid)
	}
	a.mu.Unlock()
	for _, uid := range gone {
		_ = a.zds.Remove(string(uid))
		if err := bpf.Detach(a.pinDir(uid)); err != nil {
			a.log.Warn("removing a deleted pod's pins", "uid", uid, "error", err)
		}
	}
}

// pinDir is where a pod's eBPF objects are pinned.
func (a *Agent) pinDir(uid types.UID) string { return filepath.Join(a.opts.PinDir, string(uid)) }

// attachBPF attaches the sk_lookup program to the pod's namespace (or
// finds it pinned from an earlier run) and returns the listener map for
// ztunnel.
func (a *Agent) attachBPF(pod *corev1.Pod, netns string) (*os.File, error) {
	r, err := bpf.Attach(netns, a.pinDir(pod.UID), bpf.Config{PodIPs: podIPs(pod), ProbeSources: probeSources(pod)})
	if err != nil {
		return nil, fmt.Errorf("attaching the capture program to %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	defer func() { _ = r.Close() }() // the pins hold it
	fd, err := unix.Dup(r.SockMap().FD())
	if err != nil {
		return nil, fmt.Errorf("duplicating the listener map's fd: %w", err)
	}
	// The ZDS server owns the file from here.
	return os.NewFile(uintptr(fd), "sockmap"), nil
}

// podIPs are the pod's addresses.
func podIPs(pod *corev1.Pod) []netip.Addr {
	var out []netip.Addr
	for _, p := range pod.Status.PodIPs {
		if ip, err := netip.ParseAddr(p.IP); err == nil {
			out = append(out, ip)
		}
	}
	if len(out) == 0 && podIP(pod).IsValid() {
		out = append(out, podIP(pod))
	}
	return out
}

// annotate sets or clears ambient.istio.io/redirection: enabled.
func (a *Agent) annotate(ctx context.Context, pod *corev1.Pod, on bool) error {
	var v any
	if on {
		if pod.Annotations[AnnotationRedirection] == "enabled" {
			return nil
		}
		v = "enabled"
	} else if _, ok := pod.Annotations[AnnotationRedirection]; !ok {
		return nil
	}
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]any{AnnotationRedirection: v}}})
	_, err := a.opts.Client.CoreV1().Pods(pod.Namespace).Patch(ctx, pod.Name, types.MergePatchType, patch, metav1.PatchOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

func podIP(pod *corev1.Pod) netip.Addr {
	ip, _ := netip.ParseAddr(pod.Status.PodIP)
	return ip
}

// probeSources are where kubelet's probes come from: the node's
// addresses, and the source the node's routing picks to reach the pod
// (with routed pod networks, the node's address on the pod's veth, not
// its InternalIP). The agent runs in the node's network namespace.
func probeSources(pod *corev1.Pod) []netip.Addr {
	var out []netip.Addr
	add := func(ip netip.Addr) {
		if ip.IsValid() && !slices.Contains(out, ip.Unmap()) {
			out = append(out, ip.Unmap())
		}
	}
	for _, h := range pod.Status.HostIPs {
		if ip, err := netip.ParseAddr(h.IP); err == nil {
			add(ip)
		}
	}
	if ip, err := netip.ParseAddr(pod.Status.HostIP); err == nil {
		add(ip)
	}
	for _, ip := range podIPs(pod) {
		if routes, err := netlink.RouteGet(ip.AsSlice()); err == nil && len(routes) > 0 {
			if src, ok := netip.AddrFromSlice(routes[0].Src); ok {
				add(src)
			}
		}
	}
	return out
}
