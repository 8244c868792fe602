package ca

import (
	"context"
	"errors"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/kubernetes"
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
	out := make([]PodRef, 0, len(list.Items))
	for i := range list.Items {
		pod := &list.Items[i]
		// A pod that has terminated runs no workload to ask for; Istio's
		// node authorizer drops Failed pods the same way.
		if pod.Spec.NodeName != node || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			continue
		}
		out = append(out, podRef(pod))
	}
	return out, nil
}

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
