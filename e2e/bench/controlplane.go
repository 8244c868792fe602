package bench

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	authnv1 "k8s.io/api/authentication/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"

	"github.com/ambitmesh/ambit/controller/authz"
	ctrlxds "github.com/ambitmesh/ambit/controller/xds"
	"github.com/ambitmesh/ambit/ztunnel/state"
	"github.com/ambitmesh/ambit/ztunnel/xds"
)

const (
	// podsPerFakeNode keeps the fake nodes' pods within a /24 each.
	podsPerFakeNode = 100
	fakeNodeLabel   = "bench.ambit.dev/fake"
	policyName      = "bench-policy"
	// genPrefix marks each version of the policy: its one principal is
	// cluster.local/ns/bench-cp/sa/bench-gen-<k>.
	genPrefix = "bench-gen-"
)

var authzGVR = schema.GroupVersionResource{Group: "security.istio.io", Version: "v1", Resource: "authorizationpolicies"}

var genRE = regexp.MustCompile(genPrefix + `(\d+)`)

// controlPlane is case 6: Subscribers simulated node tunnels and FakePods
// pods that exist only as API objects; then, Runs times, PolicyChanges
// changes of one AuthorizationPolicy, each timed from the API call until
// every subscriber's store has applied it.
func (b *bench) controlPlane(ctx context.Context) error {
	b.progress("control plane: %d pods as API objects, %d subscribers", b.cfg.FakePods, b.cfg.Subscribers)
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	// Subscribers and the lease renewer stop here, on every return.
	defer wg.Wait()
	defer cancel()

	if err := b.lab.Apply(ctx, []byte(fmt.Sprintf(`
apiVersion: v1
kind: Namespace
metadata: {name: %[1]s, labels: {%[2]s: ambient}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: bench-xds, namespace: %[1]s}
`, nsCP, labelDataplaneMode))); err != nil {
		return err
	}
	if err := b.fakeNodes(ctx, &wg); err != nil {
		return err
	}
	t := time.Now()
	if err := b.fakePods(ctx); err != nil {
		return err
	}
	b.progress("control plane: %d pods created in %.1fs", b.cfg.FakePods, time.Since(t).Seconds())
	ctrl, err := b.controllerProc(ctx)
	if err != nil {
		return err
	}
	b.res.Lab.Procs = append(b.res.Lab.Procs, ctrl)

	wake := make(chan struct{}, 1)
	subs, err := b.startSubscribers(ctx, &wg, wake)
	if err != nil {
		return err
	}
	t = time.Now()
	uids := make([]string, b.cfg.FakePods)
	for i := range uids {
		uids[i] = ctrlxds.WorkloadUID(ctrlxds.DefaultClusterID, nsCP, fakePodName(i))
	}
	if err := waitFor(ctx, 3*time.Minute, 100*time.Millisecond, "every subscriber synced with every pod", func() (bool, string) {
		for _, s := range subs {
			select {
			case <-s.client.Synced():
			default:
				return false, fmt.Sprintf("subscriber %d not synced", s.id)
			}
			for _, uid := range uids {
				if s.store.WorkloadByUID(uid) == nil {
					return false, fmt.Sprintf("subscriber %d lacks %s", s.id, uid)
				}
			}
		}
		return true, ""
	}); err != nil {
		return err
	}
	var initial int64
	for _, s := range subs {
		initial += s.bytes.Load()
	}
	b.res.record("controlplane.initial_sync_s", "s", time.Since(t).Seconds())
	b.res.record("controlplane.initial_bytes_per_subscriber", "bytes", float64(initial)/float64(len(subs)))
	b.progress("control plane: %d subscribers synced in %.1fs", len(subs), time.Since(t).Seconds())

	dyn, err := b.dynamic()
	if err != nil {
		return err
	}
	gen := 0
	if _, err := dyn.Resource(authzGVR).Namespace(nsCP).Create(ctx, &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.istio.io/v1",
		"kind":       "AuthorizationPolicy",
		"metadata":   map[string]any{"name": policyName, "namespace": nsCP},
		"spec":       policySpec(gen),
	}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating the policy: %w", err)
	}
	if _, err := waitGen(ctx, subs, wake, gen, time.Now(), time.Minute); err != nil {
		return err
	}
	for r := 1; r <= b.cfg.Runs; r++ {
		var all, each []float64
		var bytes, responses int64
		for range b.cfg.PolicyChanges {
			gen++
			b0, r0 := totals(subs)
			patch, _ := json.Marshal(map[string]any{"spec": policySpec(gen)})
			t0 := time.Now()
			if _, err := dyn.Resource(authzGVR).Namespace(nsCP).Patch(ctx, policyName, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
				return fmt.Errorf("changing the policy: %w", err)
			}
			lats, err := waitGen(ctx, subs, wake, gen, t0, 30*time.Second)
			if err != nil {
				return err
			}
			b1, r1 := totals(subs)
			bytes += b1 - b0
			responses += r1 - r0
			for _, l := range lats {
				each = append(each, ms(l))
			}
			all = append(all, ms(slices.Max(lats)))
		}
		k := float64(b.cfg.PolicyChanges)
		b.res.record("controlplane.all.p50_ms", "ms", percentile(all, 50))
		b.res.record("controlplane.all.p99_ms", "ms", percentile(all, 99))
		b.res.record("controlplane.each.p50_ms", "ms", percentile(each, 50))
		b.res.record("controlplane.each.p99_ms", "ms", percentile(each, 99))
		b.res.record("controlplane.bytes_per_change", "bytes, all subscribers", float64(bytes)/k)
		b.res.record("controlplane.responses_per_change", "xDS responses, all subscribers", float64(responses)/k)
		rss, err := ctrl.memKB("VmRSS")
		if err != nil {
			return err
		}
		peak, err := ctrl.memKB("VmHWM")
		if err != nil {
			return err
		}
		b.res.record("controlplane.controller.rss_mb", "MB", float64(rss)/1024)
		b.res.record("controlplane.controller.peak_rss_mb", "MB", float64(peak)/1024)
		b.progress("run %d/%d: %s: p50 %.1f ms, p99 %.1f ms to all", r, b.cfg.Runs, caseControlPlane, percentile(all, 50), percentile(all, 99))
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func policySpec(gen int) map[string]any {
	// DENY for a principal no workload has: it changes what every node
	// must know and what no connection sees.
	return map[string]any{
		"action": "DENY",
		"rules": []any{map[string]any{"from": []any{map[string]any{"source": map[string]any{
			"principals": []any{"cluster.local/ns/" + nsCP + "/sa/" + genPrefix + strconv.Itoa(gen)},
		}}}}},
	}
}

func (b *bench) dynamic() (*dynamic.DynamicClient, error) {
	cfg, err := b.restConfig()
	if err != nil {
		return nil, err
	}
	return dynamic.NewForConfig(cfg)
}

func fakeNodeName(i int) string { return fmt.Sprintf("bench-fake-%d", i) }
func fakePodName(i int) string  { return fmt.Sprintf("fake-%04d", i) }

// fakeNodes registers the nodes the fake pods are bound to, Ready, with a
// NoSchedule taint so that nothing else lands there, and renews their
// Leases every 10 s (as the lab's node agent does) until ctx ends: a node
// without renewals goes NotReady after about 50 s and its pods with it.
// No kubelet serves them, so their pods never run.
func (b *bench) fakeNodes(ctx context.Context, wg *sync.WaitGroup) error {
	n := (b.cfg.FakePods + podsPerFakeNode - 1) / podsPerFakeNode
	now := metav1.Now()
	for i := range n {
		name := fakeNodeName(i)
		if _, err := b.cs.CoreV1().Nodes().Create(ctx, &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{fakeNodeLabel: "true", "kubernetes.io/hostname": name}},
			Spec:       corev1.NodeSpec{Taints: []corev1.Taint{{Key: fakeNodeLabel, Value: "true", Effect: corev1.TaintEffectNoSchedule}}},
		}, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating node %s: %w", name, err)
		}
		// A patch, not an update: kube-controller-manager writes to new
		// nodes (pod CIDR, taints) meanwhile.
		status, _ := json.Marshal(map[string]any{"status": corev1.NodeStatus{
			Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "BenchFakeNode",
				Message: "an API object for the bench; no kubelet", LastHeartbeatTime: now, LastTransitionTime: now}},
			Capacity:    corev1.ResourceList{corev1.ResourcePods: resourceQuantity(podsPerFakeNode + 10)},
			Allocatable: corev1.ResourceList{corev1.ResourcePods: resourceQuantity(podsPerFakeNode + 10)},
		}})
		if _, err := b.cs.CoreV1().Nodes().Patch(ctx, name, types.StrategicMergePatchType, status, metav1.PatchOptions{}, "status"); err != nil {
			return fmt.Errorf("setting the status of node %s: %w", name, err)
		}
		holder, dur := name, int32(40)
		if _, err := b.cs.CoordinationV1().Leases(corev1.NamespaceNodeLease).Create(ctx, &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: corev1.NamespaceNodeLease},
			Spec:       coordinationv1.LeaseSpec{HolderIdentity: &holder, LeaseDurationSeconds: &dur, RenewTime: &metav1.MicroTime{Time: time.Now()}},
		}, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating the lease of node %s: %w", name, err)
		}
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(10 * time.Second)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			for i := range n {
				l, err := b.cs.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, fakeNodeName(i), metav1.GetOptions{})
				if err != nil {
					continue // the next tick tries again, well within the grace period
				}
				l.Spec.RenewTime = &metav1.MicroTime{Time: time.Now()}
				_, _ = b.cs.CoordinationV1().Leases(corev1.NamespaceNodeLease).Update(ctx, l, metav1.UpdateOptions{})
			}
		}
	}()
	return nil
}

// fakePods creates the pods and marks each Running and Ready with an IP,
// as a kubelet would, so that the controller makes each a workload. The
// IPs are only words in the API: 10.244.100.0/22, outside the lab nodes'
// pod ranges; no interface has them.
func (b *bench) fakePods(ctx context.Context) error {
	idx := make(chan int)
	errc := make(chan error, 16)
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range idx {
				if err := b.fakePod(ctx, i); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	var err error
feed:
	for i := range b.cfg.FakePods {
		select {
		case idx <- i:
		case err = <-errc:
			break feed
		case <-ctx.Done():
			err = ctx.Err()
			break feed
		}
	}
	close(idx)
	wg.Wait()
	if err == nil {
		select {
		case err = <-errc:
		default:
		}
	}
	return err
}

func (b *bench) fakePod(ctx context.Context, i int) error {
	grace := int64(0)
	p, err := b.cs.CoreV1().Pods(nsCP).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name:        fakePodName(i),
			Namespace:   nsCP,
			Labels:      map[string]string{"app": fmt.Sprintf("fake-%d", i%20)},
			Annotations: map[string]string{annotationRedirection: "enabled"},
		},
		Spec: corev1.PodSpec{
			NodeName:                      fakeNodeName(i / podsPerFakeNode),
			Tolerations:                   []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
			TerminationGracePeriodSeconds: &grace,
			Containers:                    []corev1.Container{{Name: "main", Image: "ambit/sleep"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("creating pod %s: %w", fakePodName(i), err)
	}
	ip := fmt.Sprintf("10.244.%d.%d", 100+i/250, i%250+1)
	now := metav1.Now()
	status, _ := json.Marshal(map[string]any{"status": corev1.PodStatus{
		Phase:     corev1.PodRunning,
		PodIP:     ip,
		PodIPs:    []corev1.PodIP{{IP: ip}},
		StartTime: &now,
		Conditions: []corev1.PodCondition{
			{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.PodInitialized, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.ContainersReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
		},
	}})
	if _, err := b.cs.CoreV1().Pods(nsCP).Patch(ctx, p.Name, types.StrategicMergePatchType, status, metav1.PatchOptions{}, "status"); err != nil {
		return fmt.Errorf("setting the status of pod %s: %w", p.Name, err)
	}
	return nil
}

// subscriber is a simulated node tunnel: ztunnel's own xDS client and
// config store, with a stream interceptor counting what it receives.
type subscriber struct {
	id        int
	store     *state.Store
	client    *xds.Client
	bytes     atomic.Int64
	responses atomic.Int64

	mu  sync.Mutex
	gen int       // newest version of the policy applied, -1 for none
	at  time.Time // when it was applied
}

// startSubscribers connects Subscribers clients to the controller from
// node-1's network namespace, each over its own gRPC connection, as that
// many nodes' ztunnels would; they authenticate with a token of the
// bench's service account (audience istio-ca). Each signals wake when its
// store applies a new version of the policy.
func (b *bench) startSubscribers(ctx context.Context, wg *sync.WaitGroup, wake chan<- struct{}) ([]*subscriber, error) {
	tok, err := b.cs.CoreV1().ServiceAccounts(nsCP).CreateToken(ctx, "bench-xds", &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{Audiences: []string{"istio-ca"}, ExpirationSeconds: new(int64(3600))},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("creating a token for the subscribers: %w", err)
	}
	cm, err := b.cs.CoreV1().ConfigMaps("istio-system").Get(ctx, "istio-ca-root-cert", metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("reading the mesh root: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM([]byte(cm.Data["root-cert.pem"])) {
		return nil, fmt.Errorf("no certificate in istio-system/istio-ca-root-cert")
	}
	ctl, err := b.cs.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ambit-controller"})
	if err != nil {
		return nil, fmt.Errorf("finding the controller pod: %w", err)
	}
	if len(ctl.Items) != 1 || ctl.Items[0].Status.PodIP == "" {
		return nil, fmt.Errorf("want one controller pod with an IP, found %d pods", len(ctl.Items))
	}
	addr := net.JoinHostPort(ctl.Items[0].Status.PodIP, "15012")
	dial := b.nodes[0].dial
	policyKey := authz.PolicyKey(nsCP, policyName)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	var subs []*subscriber
	for i := range b.cfg.Subscribers {
		s := &subscriber{id: i, store: state.New(), gen: -1}
		s.store.Subscribe(func(ch state.Change) {
			if !slices.Contains(ch.AuthorizationsUpserted, policyKey) {
				return
			}
			a := ch.View.Authorization(policyKey)
			if a == nil {
				return
			}
			raw, _ := proto.Marshal(a)
			m := genRE.FindSubmatch(raw)
			if m == nil {
				return
			}
			g, _ := strconv.Atoi(string(m[1]))
			s.mu.Lock()
			if g > s.gen {
				s.gen, s.at = g, time.Now()
			}
			s.mu.Unlock()
			select {
			case wake <- struct{}{}:
			default:
			}
		})
		c, err := xds.New(xds.Options{
			Addr:   addr,
			TLS:    &tls.Config{RootCAs: roots, ServerName: "ambit-controller.istio-system.svc", MinVersion: tls.VersionTLS12},
			Token:  func() (string, error) { return tok.Status.Token, nil },
			NodeID: fmt.Sprintf("ztunnel~bench-sim-%02d", i),
			Store:  s.store,
			Log:    quiet,
			DialOptions: []grpc.DialOption{
				grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) { return dial(ctx, "tcp", a) }),
				grpc.WithStreamInterceptor(s.count),
			},
		})
		if err != nil {
			return nil, err
		}
		s.client = c
		subs = append(subs, s)
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = c.Run(ctx) // returns when ctx ends
		}()
	}
	return subs, nil
}

// count is a gRPC stream interceptor that counts the responses the
// subscriber receives and their encoded size.
func (s *subscriber) count(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	cs, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil {
		return nil, err
	}
	return &countedStream{ClientStream: cs, s: s}, nil
}

type countedStream struct {
	grpc.ClientStream
	s *subscriber
}

func (c *countedStream) RecvMsg(m any) error {
	err := c.ClientStream.RecvMsg(m)
	if pm, ok := m.(proto.Message); ok && err == nil {
		c.s.bytes.Add(int64(proto.Size(pm)))
		c.s.responses.Add(1)
	}
	return err
}

func totals(subs []*subscriber) (bytes, responses int64) {
	for _, s := range subs {
		bytes += s.bytes.Load()
		responses += s.responses.Load()
	}
	return bytes, responses
}

// waitGen waits until every subscriber has applied version gen of the
// policy and returns how long after t0 each did.
func waitGen(ctx context.Context, subs []*subscriber, wake <-chan struct{}, gen int, t0 time.Time, d time.Duration) ([]time.Duration, error) {
	timeout := time.NewTimer(d)
	defer timeout.Stop()
	for {
		lats := make([]time.Duration, 0, len(subs))
		behind := -1
		for _, s := range subs {
			s.mu.Lock()
			g, at := s.gen, s.at
			s.mu.Unlock()
			if g < gen {
				behind = s.id
				break
			}
			lats = append(lats, at.Sub(t0))
		}
		if behind < 0 {
			return lats, nil
		}
		select {
		case <-wake:
		case <-timeout.C:
			return nil, fmt.Errorf("policy version %d: subscriber %d does not have it after %s", gen, behind, d)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func resourceQuantity(n int) resource.Quantity {
	return *resource.NewQuantity(int64(n), resource.DecimalSI)
}
