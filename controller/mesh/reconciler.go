package mesh

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"unicode/utf8"

	"google.golang.org/protobuf/types/known/timestamppb"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/events"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"

	metav1alpha1 "istio.io/api/meta/v1alpha1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"

	"github.com/ambitmesh/ambit/controller/authz"
	"github.com/ambitmesh/ambit/controller/ca"
	"github.com/ambitmesh/ambit/controller/xds"
)

// ConditionZtunnelAccepted is the status condition Istio writes on
// AuthorizationPolicies bound to ztunnel: False with reason
// UnsupportedValue when some of the policy cannot be enforced at L4.
const ConditionZtunnelAccepted = "ZtunnelAccepted"

// Reconciler recomputes the whole mesh config on any change (one work item,
// so bursts coalesce) and pushes it; the xDS server sends each node only
// what changed. Every replica runs it so that every replica serves xDS; only
// the elected leader writes status and trust bundles.
type Reconciler struct {
	Client        client.Client
	Clientset     kubernetes.Interface
	XDS           *xds.Server
	RootPEM       []byte
	RootNamespace string
	TrustDomain   string
	ClusterID     string
	// Recorder writes events.k8s.io/v1 Events; kubectl shows them with
	// the regarding object as involvedObject.
	Recorder events.EventRecorder
	Log      *slog.Logger
	// Elected is closed once this replica leads.
	Elected <-chan struct{}

	mu        sync.Mutex
	published map[string]bool
}

var meshKey = reconcile.Request{NamespacedName: types.NamespacedName{Name: "mesh"}}

// SetupWithManager registers the reconciler and its watches.
func (r *Reconciler) SetupWithManager(mgr ctrl.Manager) error {
	r.published = map[string]bool{}
	all := handler.EnqueueRequestsFromMapFunc(func(context.Context, client.Object) []reconcile.Request {
		return []reconcile.Request{meshKey}
	})
	// Becoming leader is a change too: status and trust bundles are
	// written by the leader only, so the new one reconciles at once.
	elected := make(chan event.GenericEvent, 1)
	go func() {
		<-r.Elected
		elected <- event.GenericEvent{Object: &corev1.Namespace{}}
	}()
	return ctrl.NewControllerManagedBy(mgr).
		Named("mesh").
		WatchesRawSource(source.Channel(elected, all)).
		WithOptions(controller.Options{NeedLeaderElection: ptr.To(false), MaxConcurrentReconciles: 1}).
		Watches(&corev1.Namespace{}, all).
		Watches(&corev1.Pod{}, all).
		Watches(&corev1.Service{}, all).
		Watches(&discoveryv1.EndpointSlice{}, all).
		Watches(&securityv1.AuthorizationPolicy{}, all).
		Watches(&securityv1.PeerAuthentication{}, all).
		Complete(r)
}

// Reconcile implements reconcile.Reconciler.
func (r *Reconciler) Reconcile(ctx context.Context, _ reconcile.Request) (reconcile.Result, error) {
	in, err := r.inputs(ctx)
	if err != nil {
		return reconcile.Result{}, err
	}
	out := Compute(in)
	av := r.XDS.SetAddresses(out.Addresses)
	pv := r.XDS.SetAuthorizations(out.Authorizations)
	r.Log.Debug("mesh config pushed", "addresses", len(out.Addresses), "authorizations", len(out.Authorizations), "addressVersion", av, "policyVersion", pv)
	if !r.leading() {
		return reconcile.Result{}, nil
	}
	var errs []string
	for _, ns := range append([]string{r.RootNamespace}, out.EnrolledNamespaces...) {
		if err := r.publishRoot(ctx, ns); err != nil {
			errs = append(errs, err.Error())
		}
	}
	for _, p := range in.AuthzPolicies {
		key := "AuthorizationPolicy/" + p.Namespace + "/" + p.Name
		if !out.ZtunnelPolicies[key] && len(out.Problems[key]) == 0 {
			continue // bound to a waypoint: its status is the waypoint's
		}
		if err := r.writeStatus(ctx, p, out.Problems[key]); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if len(errs) > 0 {
		return reconcile.Result{}, fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return reconcile.Result{}, nil
}

func (r *Reconciler) leading() bool {
	select {
	case <-r.Elected:
		return true
	default:
		return false
	}
}

func (r *Reconciler) inputs(ctx context.Context) (Inputs, error) {
	in := Inputs{RootNamespace: r.RootNamespace, TrustDomain: r.TrustDomain, ClusterID: r.ClusterID}
	var nss corev1.NamespaceList
	var pods corev1.PodList
	var svcs corev1.ServiceList
	var eps discoveryv1.EndpointSliceList
	var aps securityv1.AuthorizationPolicyList
	var pas securityv1.PeerAuthenticationList
	for _, l := range []client.ObjectList{&nss, &pods, &svcs, &eps, &aps, &pas} {
		if err := r.Client.List(ctx, l); err != nil {
			return in, fmt.Errorf("listing %T: %w", l, err)
		}
	}
	for i := range nss.Items {
		in.Namespaces = append(in.Namespaces, &nss.Items[i])
	}
	for i := range pods.Items {
		in.Pods = append(in.Pods, &pods.Items[i])
	}
	for i := range svcs.Items {
		in.Services = append(in.Services, &svcs.Items[i])
	}
	for i := range eps.Items {
		in.EndpointSlices = append(in.EndpointSlices, &eps.Items[i])
	}
	in.AuthzPolicies = append(in.AuthzPolicies, aps.Items...)
	in.PeerAuthns = append(in.PeerAuthns, pas.Items...)
	return in, nil
}

// publishRoot writes the trust bundle ConfigMap into a namespace once per
// controller lifetime.
func (r *Reconciler) publishRoot(ctx context.Context, ns string) error {
	r.mu.Lock()
	done := r.published[ns]
	r.mu.Unlock()
	if done {
		return nil
	}
	if err := ca.PublishRootCert(ctx, r.Clientset, ns, r.RootPEM); err != nil {
		if apierrors.IsNotFound(err) {
			return nil // namespace going away
		}
		return fmt.Errorf("publishing the trust bundle in %s: %w", ns, err)
	}
	r.mu.Lock()
	r.published[ns] = true
	r.mu.Unlock()
	return nil
}

// writeStatus sets the policy's ZtunnelAccepted condition (Istio's) and, on
// problems, records a Warning event naming each field ztunnel cannot
// enforce.
func (r *Reconciler) writeStatus(ctx context.Context, p *securityv1.AuthorizationPolicy, problems []authz.Problem) error {
	cond := &metav1alpha1.IstioCondition{Type: ConditionZtunnelAccepted, Status: "True", Reason: "Accepted", Message: "All policy rules are enforced by ztunnel"}
	if len(problems) > 0 {
		msgs := make([]string, 0, len(problems))
		for _, pr := range problems {
			msgs = append(msgs, pr.String())
		}
		cond.Status, cond.Reason, cond.Message = "False", "UnsupportedValue", strings.Join(msgs, "; ")
	}
	for _, c := range p.Status.GetConditions() {
		if c.GetType() == cond.Type && c.GetStatus() == cond.Status && c.GetReason() == cond.Reason && c.GetMessage() == cond.Message {
			return nil // unchanged
		}
	}
	if len(problems) > 0 {
		r.Recorder.Eventf(p, nil, corev1.EventTypeWarning, "UnsupportedValue", "Translate", "%s", eventNote(cond.Message))
	}
	cond.LastTransitionTime = timestamppb.Now()
	np := p.DeepCopy()
	conds := make([]*metav1alpha1.IstioCondition, 0, len(np.Status.GetConditions())+1)
	for _, c := range np.Status.GetConditions() {
		if c.GetType() != cond.Type {
			conds = append(conds, c)
		}
	}
	conds = append(conds, cond)
	np.Status.Conditions = conds
	np.Status.ObservedGeneration = p.Generation
	if err := r.Client.Status().Update(ctx, np); err != nil {
		if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
			return nil // a newer version will be reconciled
		}
		return fmt.Errorf("writing status of AuthorizationPolicy %s/%s: %w", p.Namespace, p.Name, err)
	}
	return nil
}

// noteLimit is the longest note the API server accepts on an
// events.k8s.io/v1 Event (NoteLengthLimit in Kubernetes'
// pkg/apis/core/validation/events.go); a longer one is refused and the
// event lost.
const noteLimit = 1024

// eventNote shortens msg to fit an event's note, on a UTF-8 boundary. The
// condition keeps the whole message.
func eventNote(msg string) string {
	if len(msg) <= noteLimit {
		return msg
	}
	const more = "... (see the ZtunnelAccepted condition)"
	cut := noteLimit - len(more)
	for cut > 0 && !utf8.RuneStart(msg[cut]) {
		cut--
	}
	return msg[:cut] + more
}
