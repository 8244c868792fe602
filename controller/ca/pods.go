package ca

import (
	"context"
	"errors"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// ErrPodNotFound is returned by Pods.Get for a pod that does not exist.
var ErrPodNotFound = errors.New("pod not found")

// Pods answers what the node check asks of the cluster. APIPods asks the
// API server on every request; the controller can supply one backed by its
// informer cache instead, as istiod does.
type Pods interface {
	// Get returns the pod namespace/name, or ErrPodNotFound.
	Get(ctx context.Context, namespace, name string) (PodRef, error)
	// OnNode returns the pods scheduled on node that have not terminated.
	OnNode(ctx context.Context, node string) ([]PodRef, error)
}

// APIPods is Pods read live from the API server.
func APIPods(client kubernetes.Interface) Pods { return apiPods{client} }

type apiPods struct{ client kubernetes.Interface }

func (a apiPods) Get(ctx context.Context, namespace, name string) (PodRef, error) {
	pod, err := a.client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return PodRef{}, fmt.Errorf("%w: %s/%s", ErrPodNotFound, namespace, name)
	}
	if err != nil {
		return PodRef{}, fmt.Errorf("getting pod %s/%s: %w", namespace, name, err)
	}
	return podRef(pod), nil
}

func (a apiPods) OnNode(ctx context.Context, node string) ([]PodRef, error) {
	list, err := a.client.CoreV1().Pods(corev1.NamespaceAll).List(ctx, metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("spec.nodeName", node).String(),
	})
	if err != nil {
		return nil, fmt.Errorf("listing pods on node %s: %w", node, err)
	}
	return running(list.Items, node), nil
}

// running returns the pods of list on node that have not terminated.
func running(list []corev1.Pod, node string) []PodRef {
	out := make([]PodRef, 0, len(list))
	for i := range list {
		pod := &list[i]
		// A pod that has terminated runs no workload to ask for; Istio's
		// node authorizer drops Failed pods the same way.
		if pod.Spec.NodeName != node || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			continue
		}
		out = append(out, podRef(pod))
	}
	return out
}

// NodeNameField is the field index CachedPods lists pods by.
const NodeNameField = "spec.nodeName"

// IndexPodsByNode registers the field index CachedPods needs; call it on
// the manager's field indexer before the manager starts.
func IndexPodsByNode(ctx context.Context, indexer client.FieldIndexer) error {
	return indexer.IndexField(ctx, &corev1.Pod{}, NodeNameField, PodNodeName)
}

// PodNodeName is the NodeNameField index's value of a pod.
func PodNodeName(o client.Object) []string {
	return []string{o.(*corev1.Pod).Spec.NodeName}
}

// CachedPods is Pods read from a cache (the controller's informers, as
// istiod reads them), with live as the authority on what the cache may not
// have yet: Get asks live for a pod the cache lacks, and the server asks
// live's OnNode again (Fresh) before it refuses a node tunnel, so that a
// pod scheduled a moment ago is never refused. A certificate request then
// costs the API server nothing in the usual case, instead of a list of the
// node's pods. The cache must index pods by NodeNameField.
func CachedPods(cache client.Reader, live Pods) Pods { return cachedPods{cache: cache, live: live} }

type cachedPods struct {
	cache client.Reader
	live  Pods
}

func (c cachedPods) Get(ctx context.Context, namespace, name string) (PodRef, error) {
	var pod corev1.Pod
	err := c.cache.Get(ctx, types.NamespacedName{Namespace: namespace, Name: name}, &pod)
	if apierrors.IsNotFound(err) {
		return c.live.Get(ctx, namespace, name)
	}
	if err != nil {
		return PodRef{}, fmt.Errorf("getting pod %s/%s from the cache: %w", namespace, name, err)
	}
	return podRef(&pod), nil
}

func (c cachedPods) OnNode(ctx context.Context, node string) ([]PodRef, error) {
	var list corev1.PodList
	if err := c.cache.List(ctx, &list, client.MatchingFields{NodeNameField: node}); err != nil {
		return nil, fmt.Errorf("listing pods on node %s from the cache: %w", node, err)
	}
	return running(list.Items, node), nil
}

// Fresh returns the live Pods, which the server asks before it refuses.
func (c cachedPods) Fresh() Pods { return c.live }

func podRef(pod *corev1.Pod) PodRef {
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		// The ServiceAccount admission plugin fills in "default"; a pod
		// created without it runs as "default" all the same.
		sa = "default"
	}
	return PodRef{
		Namespace:      pod.Namespace,
		Name:           pod.Name,
		UID:            string(pod.UID),
		ServiceAccount: sa,
		NodeName:       pod.Spec.NodeName,
	}
}
