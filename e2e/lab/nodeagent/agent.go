// Package nodeagent is the lab's stand-in for kubelet. It registers a Node
// and renews its Lease, runs the pods bound to it as processes (each pod in a
// network namespace made through the node's CNI chain, each container with
// its own UTS and mount namespaces and cgroup), runs their probes, writes
// their status, and serves the kubelet API that `kubectl exec`, `logs` and
// `port-forward` go through.
//
// It deliberately does not pull images (an image name maps to a binary built
// by this repo, see images.go), enforce resource limits, or run more than
// one pod sandbox per pod.
package nodeagent

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"

	"github.com/ambitmesh/ambit/e2e/lab/nodeagent/kubeletapi"
)

// Options configures a node agent.
type Options struct {
	NodeName string
	NodeIP   string
	PodCIDR  string
	// Dir holds the node's pods: volumes, logs, resolv.conf.
	Dir string
	// Root is the node's own filesystem root: hostPath volumes resolve
	// below it, except the shared paths in hostShared.
	Root string
	// LabDir is the lab's state directory (for the mount point log).
	LabDir string
	// NetnsPrefix prefixes pod network namespace names.
	NetnsPrefix string
	CNIConfDir  string
	// CNIBinDir is a PATH-style list of plugin directories.
	CNIBinDir string
	// BinDir holds the binaries images map to.
	BinDir string
	// Cgroup is the node's cgroup v2 directory; pods go below it.
	Cgroup     string
	ClusterDNS string
	// Serving certificate of the kubelet API and the CA of its clients.
	ServingCert, ServingKey, ClientCA string
	Client                            kubernetes.Interface
	Log                               *slog.Logger
}

// Agent is a running node agent.
type Agent struct {
	opts     Options
	log      *slog.Logger
	services listersv1.ServiceLister

	mu   sync.Mutex
	pods map[types.UID]*podWorker
	// stopping is set under mu when Run winds down; podChanged starts no
	// pod worker after that, so Run's wg.Wait covers every worker there
	// will ever be.
	stopping bool
	wg       sync.WaitGroup // pod workers; Add only under mu, with !stopping
}

// New returns an agent; Run starts it.
func New(opts Options) *Agent {
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	return &Agent{opts: opts, log: opts.Log.With("node", opts.NodeName), pods: map[types.UID]*podWorker{}}
}

// Run registers the node, serves the kubelet API and runs pods until ctx
// is done. Pods keep running when it returns: the lab removes them through
// their cgroups.
func (a *Agent) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for _, d := range []string{a.opts.Dir, a.opts.Cgroup} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if err := a.registerNode(ctx); err != nil {
		return err
	}
	srv, err := kubeletapi.New(kubeletapi.Options{
		Addr:         fmt.Sprintf("%s:10250", a.opts.NodeIP),
		TLSCertFile:  a.opts.ServingCert,
		TLSKeyFile:   a.opts.ServingKey,
		ClientCAFile: a.opts.ClientCA,
		Runtime:      a,
		Log:          a.log.With("component", "kubelet-api"),
	})
	if err != nil {
		return fmt.Errorf("starting the kubelet API: %w", err)
	}
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(ctx) }()
	go a.heartbeat(ctx)

	// Services feed the pods' service environment variables.
	all := informers.NewSharedInformerFactory(a.opts.Client, 0)
	a.services = all.Core().V1().Services().Lister()
	mine := informers.NewSharedInformerFactoryWithOptions(a.opts.Client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", a.opts.NodeName).String()
		}))
	podInformer := mine.Core().V1().Pods().Informer()
	if _, err := podInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { a.podChanged(ctx, obj.(*corev1.Pod)) },
		UpdateFunc: func(_, obj any) { a.podChanged(ctx, obj.(*corev1.Pod)) },
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if pod, ok := obj.(*corev1.Pod); ok {
				a.podGone(pod)
			}
		},
	}); err != nil {
		return err
	}
	all.Start(ctx.Done())
	all.WaitForCacheSync(ctx.Done())
	mine.Start(ctx.Done())
	a.log.Info("node agent running", "ip", a.opts.NodeIP, "podCIDR", a.opts.PodCIDR)
	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
		cancel()
	}
	a.log.Info("node agent stopping: killing its pods")
	a.mu.Lock()
	a.stopping = true
	a.mu.Unlock()
	a.wg.Wait()
	return runErr
}

func (a *Agent) podChanged(ctx context.Context, pod *corev1.Pod) {
	a.mu.Lock()
	defer a.mu.Unlock()
	w, ok := a.pods[pod.UID]
	if !ok {
		if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			if pod.DeletionTimestamp == nil {
				return // finished before we (re)started; nothing to run
			}
		}
		if a.stopping || ctx.Err() != nil {
			return
		}
		w = newPodWorker(a, pod)
		a.pods[pod.UID] = w
		a.wg.Add(1)
		go w.run(ctx)
		return
	}
	w.update(pod)
}

func (a *Agent) podGone(pod *corev1.Pod) {
	a.mu.Lock()
	w, ok := a.pods[pod.UID]
	a.mu.Unlock()
	if ok {
		w.gone()
	}
}

func (a *Agent) forget(uid types.UID) {
	a.mu.Lock()
	delete(a.pods, uid)
	a.mu.Unlock()
}

// registerNode creates (or updates) the Node with its pod range, addresses
// and capacity, and marks it Ready.
func (a *Agent) registerNode(ctx context.Context) error {
	nodes := a.opts.Client.CoreV1().Nodes()
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: a.opts.NodeName,
			Labels: map[string]string{
				"kubernetes.io/hostname": a.opts.NodeName,
				"kubernetes.io/os":       "linux",
				"kubernetes.io/arch":     "amd64",
			},
		},
		Spec: corev1.NodeSpec{PodCIDR: a.opts.PodCIDR, PodCIDRs: []string{a.opts.PodCIDR}},
	}
	err := retry(ctx, 60*time.Second, func() error {
		_, err := nodes.Create(ctx, node, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			return nil
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("registering node %s: %w", a.opts.NodeName, err)
	}
	return a.updateNodeStatus(ctx)
}

func (a *Agent) updateNodeStatus(ctx context.Context) error {
	nodes := a.opts.Client.CoreV1().Nodes()
	return retry(ctx, 30*time.Second, func() error {
		node, err := nodes.Get(ctx, a.opts.NodeName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		now := metav1.Now()
		capacity := corev1.ResourceList{
			corev1.ResourceCPU:              resource.MustParse("2"),
			corev1.ResourceMemory:           resource.MustParse("8Gi"),
			corev1.ResourcePods:             resource.MustParse("110"),
			corev1.ResourceEphemeralStorage: resource.MustParse("20Gi"),
		}
		cond := func(t corev1.NodeConditionType, s corev1.ConditionStatus, reason, msg string) corev1.NodeCondition {
			c := corev1.NodeCondition{Type: t, Status: s, Reason: reason, Message: msg, LastHeartbeatTime: now, LastTransitionTime: now}
			for _, old := range node.Status.Conditions {
				if old.Type == t && old.Status == s {
					c.LastTransitionTime = old.LastTransitionTime
				}
			}
			return c
		}
		node.Status = corev1.NodeStatus{
			Capacity:    capacity,
			Allocatable: capacity,
			Phase:       corev1.NodeRunning,
			Conditions: []corev1.NodeCondition{
				cond(corev1.NodeReady, corev1.ConditionTrue, "KubeletReady", "lab node agent is posting ready status"),
				cond(corev1.NodeMemoryPressure, corev1.ConditionFalse, "KubeletHasSufficientMemory", ""),
				cond(corev1.NodeDiskPressure, corev1.ConditionFalse, "KubeletHasNoDiskPressure", ""),
				cond(corev1.NodePIDPressure, corev1.ConditionFalse, "KubeletHasSufficientPID", ""),
			},
			Addresses: []corev1.NodeAddress{
				{Type: corev1.NodeInternalIP, Address: a.opts.NodeIP},
				{Type: corev1.NodeHostName, Address: a.opts.NodeName},
			},
			DaemonEndpoints: corev1.NodeDaemonEndpoints{KubeletEndpoint: corev1.DaemonEndpoint{Port: 10250}},
			NodeInfo: corev1.NodeSystemInfo{
				KubeletVersion:          "v1.36.0",
				OperatingSystem:         "linux",
				Architecture:            "amd64",
				ContainerRuntimeVersion: "ambit-lab://1",
				OSImage:                 "ambit lab node",
			},
		}
		_, err = nodes.UpdateStatus(ctx, node, metav1.UpdateOptions{})
		return err
	})
}

// heartbeat renews the node's Lease every 10 s (the node lifecycle
// controller marks a node Unknown about 40 s after the last renewal) and
// refreshes its status every minute.
func (a *Agent) heartbeat(ctx context.Context) {
	leases := a.opts.Client.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	lastStatus := time.Now()
	for {
		now := metav1.NewMicroTime(time.Now())
		lease, err := leases.Get(ctx, a.opts.NodeName, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			_, err = leases.Create(ctx, &coordinationv1.Lease{
				ObjectMeta: metav1.ObjectMeta{Name: a.opts.NodeName, Namespace: corev1.NamespaceNodeLease},
				Spec: coordinationv1.LeaseSpec{
					HolderIdentity:       ptr.To(a.opts.NodeName),
					LeaseDurationSeconds: ptr.To[int32](40),
					RenewTime:            &now,
				},
			}, metav1.CreateOptions{})
		case err == nil:
			lease.Spec.RenewTime = &now
			lease.Spec.HolderIdentity = ptr.To(a.opts.NodeName)
			_, err = leases.Update(ctx, lease, metav1.UpdateOptions{})
		}
		if err != nil && ctx.Err() == nil {
			a.log.Warn("renewing node lease", "error", err)
		}
		if time.Since(lastStatus) > time.Minute {
			if err := a.updateNodeStatus(ctx); err != nil && ctx.Err() == nil {
				a.log.Warn("updating node status", "error", err)
			}
			lastStatus = time.Now()
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// retry calls f until it succeeds or d has passed, backing off.
func retry(ctx context.Context, d time.Duration, f func() error) error {
	deadline := time.Now().Add(d)
	wait := 100 * time.Millisecond
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		wait = min(wait*2, 2*time.Second)
	}
}

// The kubelet API's view of the pods.
var _ kubeletapi.Runtime = (*Agent)(nil)

func (a *Agent) worker(namespace, pod string) (*podWorker, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, w := range a.pods {
		if p := w.current(); p.Namespace == namespace && p.Name == pod {
			return w, nil
		}
	}
	return nil, fmt.Errorf("pod %s/%s on node %s: %w", namespace, pod, a.opts.NodeName, kubeletapi.ErrNotFound)
}

// Container implements kubeletapi.Runtime.
func (a *Agent) Container(namespace, pod, container string) (kubeletapi.Container, error) {
	w, err := a.worker(namespace, pod)
	if err != nil {
		return kubeletapi.Container{}, err
	}
	return w.container(container)
}

// LogPath implements kubeletapi.Runtime.
func (a *Agent) LogPath(namespace, pod, container string, previous bool) (string, error) {
	w, err := a.worker(namespace, pod)
	if err != nil {
		return "", err
	}
	return w.logPath(container, previous)
}

// PodNetNS implements kubeletapi.Runtime.
func (a *Agent) PodNetNS(namespace, pod string) (string, error) {
	w, err := a.worker(namespace, pod)
	if err != nil {
		return "", err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.sandbox == nil {
		return "", fmt.Errorf("pod %s/%s has no sandbox yet: %w", namespace, pod, kubeletapi.ErrNotFound)
	}
	if w.sandbox.netnsPath == "" {
		return "/proc/self/ns/net", nil
	}
	return w.sandbox.netnsPath, nil
}

func (a *Agent) podDir(uid types.UID) string { return filepath.Join(a.opts.Dir, "pods", string(uid)) }
