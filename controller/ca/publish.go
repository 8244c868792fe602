package ca

import (
	"bytes"
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/retry"
)

const (
	// RootCertConfigMap is the ConfigMap the trust bundle is published in,
	// in every enrolled namespace, under RootCertKey: Istio's name, so that
	// workloads and tools that mount it find it where they expect.
	RootCertConfigMap = "istio-ca-root-cert"
	// istioConfigLabel is the label istiod puts on the ConfigMap.
	istioConfigLabel = "istio.io/config"
)

// PublishRootCert writes rootPEM to the ConfigMap istio-ca-root-cert, key
// root-cert.pem, in namespace, creating it or updating it if it differs.
// Other keys and labels on an existing ConfigMap are kept.
func PublishRootCert(ctx context.Context, client kubernetes.Interface, namespace string, rootPEM []byte) error {
	cms := client.CoreV1().ConfigMaps(namespace)
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cm, err := cms.Get(ctx, RootCertConfigMap, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			_, err = cms.Create(ctx, &corev1.ConfigMap{
				ObjectMeta: metav1.ObjectMeta{
					Name:      RootCertConfigMap,
					Namespace: namespace,
					Labels:    map[string]string{istioConfigLabel: "true"},
				},
				Data: map[string]string{RootCertKey: string(rootPEM)},
			}, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				// Another replica created it: read it and compare.
				return apierrors.NewConflict(corev1.Resource("configmaps"), RootCertConfigMap, err)
			}
			return err
		}
		if err != nil {
			return err
		}
		if bytes.Equal([]byte(cm.Data[RootCertKey]), rootPEM) {
			return nil
		}
		cm = cm.DeepCopy()
		if cm.Data == nil {
			cm.Data = map[string]string{}
		}
		cm.Data[RootCertKey] = string(rootPEM)
		_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("publishing trust bundle to ConfigMap %s/%s: %w", namespace, RootCertConfigMap, err)
	}
	return nil
}
