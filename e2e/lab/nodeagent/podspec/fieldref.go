package podspec

import (
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"
)

// FieldRefValue resolves a downward API field of pod, for env valueFrom
// (kubelet's podFieldSelectorRuntimeValue) and for downwardAPI volume files
// (fieldpath.ExtractFieldPathAsString). hostIPs are the node's addresses,
// primary first.
//
// Pod IPs come from pod.Status.PodIPs (or PodIP): the caller puts the
// addresses it gave the pod's network namespace there before it asks. As in
// kubelet (#97979), the pod IP of the node's primary family comes first.
//
// Whole label and annotation maps use kubelet's format: one key="value" per
// line, keys sorted, values quoted as Go strings, no trailing newline.
func FieldRefValue(fs *corev1.ObjectFieldSelector, pod *corev1.Pod, hostIPs []string) (string, error) {
	if fs.APIVersion != "" && fs.APIVersion != "v1" {
		return "", fmt.Errorf("fieldRef %s: unsupported pod version %q", fs.FieldPath, fs.APIVersion)
	}
	path := fs.FieldPath
	if p, key, ok := splitSubscript(path); ok {
		switch p {
		case "metadata.labels":
			if errs := validation.IsQualifiedName(key); len(errs) != 0 {
				return "", fmt.Errorf("fieldRef %s: invalid key: %s", path, strings.Join(errs, "; "))
			}
			return pod.Labels[key], nil
		case "metadata.annotations":
			if errs := validation.IsQualifiedName(strings.ToLower(key)); len(errs) != 0 {
				return "", fmt.Errorf("fieldRef %s: invalid key: %s", path, strings.Join(errs, "; "))
			}
			return pod.Annotations[key], nil
		default:
			return "", fmt.Errorf("fieldRef %s: %s does not support a subscript", path, p)
		}
	}
	podIPs := sortedPodIPs(pod, hostIPs)
	switch path {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "metadata.labels":
		return FormatMap(pod.Labels), nil
	case "metadata.annotations":
		return FormatMap(pod.Annotations), nil
	case "spec.nodeName", "spec.host":
		return pod.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.hostIP":
		if len(hostIPs) == 0 {
			return "", fmt.Errorf("fieldRef %s: the node has no IP", path)
		}
		return hostIPs[0], nil
	case "status.hostIPs":
		if len(hostIPs) == 0 {
			return "", fmt.Errorf("fieldRef %s: the node has no IP", path)
		}
		return strings.Join(hostIPs, ","), nil
	case "status.podIP":
		if len(podIPs) == 0 {
			return "", nil
		}
		return podIPs[0], nil
	case "status.podIPs":
		return strings.Join(podIPs, ","), nil
	}
	return "", fmt.Errorf("fieldRef %s: unsupported field", path)
}

// splitSubscript splits "metadata.labels['k']" into ("metadata.labels",
// "k", true), as fieldpath.SplitMaybeSubscriptedPath.
func splitSubscript(path string) (string, string, bool) {
	s, ok := strings.CutSuffix(path, "']")
	if !ok {
		return path, "", false
	}
	p, key, ok := strings.Cut(s, "['")
	if !ok || p == "" {
		return path, "", false
	}
	return p, key, true
}

// FormatMap formats labels or annotations as kubelet does for the downward
// API (fieldpath.FormatMap): sorted key="quoted value" lines.
func FormatMap(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b []byte
	for i, k := range keys {
		if i > 0 {
			b = append(b, '\n')
		}
		b = append(b, k...)
		b = append(b, '=')
		b = strconv.AppendQuote(b, m[k])
	}
	return string(b)
}

// sortedPodIPs returns the pod's IPs with those of the node's primary
// address family first, keeping the order within a family.
func sortedPodIPs(pod *corev1.Pod, hostIPs []string) []string {
	var ips []string
	for _, ip := range pod.Status.PodIPs {
		ips = append(ips, ip.IP)
	}
	if len(ips) == 0 && pod.Status.PodIP != "" {
		ips = []string{pod.Status.PodIP}
	}
	if len(hostIPs) == 0 || len(ips) < 2 {
		return ips
	}
	node, err := netip.ParseAddr(hostIPs[0])
	if err != nil {
		return ips
	}
	slices.SortStableFunc(ips, func(a, b string) int {
		return familyRank(a, node.Is4()) - familyRank(b, node.Is4())
	})
	return ips
}

func familyRank(ip string, want4 bool) int {
	a, err := netip.ParseAddr(ip)
	if err == nil && a.Unmap().Is4() == want4 {
		return 0
	}
	return 1
}

// ResourceValue resolves a downward API resourceFieldRef (kubelet's
// containerResourceRuntimeValue after defaultPodLimitsForDownwardAPI). The
// container is fs.ContainerName, or c when that is empty (env). An unset
// or zero limit for cpu, memory or ephemeral-storage falls back to the
// node's allocatable, as kubelet does; with allocatable unknown too, the
// value is "0". Values are ceil(quantity / divisor), divisor 1 by default.
func ResourceValue(fs *corev1.ResourceFieldSelector, pod *corev1.Pod, c *corev1.Container, allocatable corev1.ResourceList) (string, error) {
	if fs.ContainerName != "" {
		c = findContainer(pod, fs.ContainerName)
		if c == nil {
			return "", fmt.Errorf("resourceFieldRef %s: no container %q in the pod", fs.Resource, fs.ContainerName)
		}
	}
	if c == nil {
		return "", fmt.Errorf("resourceFieldRef %s: no containerName", fs.Resource)
	}
	divisor := fs.Divisor
	if divisor.IsZero() {
		divisor = resource.MustParse("1")
	}

	kind, name, ok := strings.Cut(fs.Resource, ".")
	if !ok || (kind != "limits" && kind != "requests") {
		return "", fmt.Errorf("resourceFieldRef %s: unsupported resource", fs.Resource)
	}
	rn := corev1.ResourceName(name)
	switch {
	case rn == corev1.ResourceCPU, rn == corev1.ResourceMemory, rn == corev1.ResourceEphemeralStorage,
		strings.HasPrefix(name, corev1.ResourceHugePagesPrefix):
	default:
		return "", fmt.Errorf("resourceFieldRef %s: unsupported resource", fs.Resource)
	}

	var q resource.Quantity
	if kind == "requests" {
		q = c.Resources.Requests[rn]
	} else {
		q = c.Resources.Limits[rn]
		// Hugepages are never overcommitted, so they always have a limit
		// and kubelet does not default them.
		if q.IsZero() && !strings.HasPrefix(name, corev1.ResourceHugePagesPrefix) {
			q = allocatable[rn]
		}
	}
	var v float64
	if rn == corev1.ResourceCPU {
		v = math.Ceil(float64(q.MilliValue()) / float64(divisor.MilliValue()))
	} else {
		v = math.Ceil(float64(q.Value()) / float64(divisor.Value()))
	}
	return strconv.FormatInt(int64(v), 10), nil
}

func findContainer(pod *corev1.Pod, name string) *corev1.Container {
	for _, list := range [][]corev1.Container{pod.Spec.Containers, pod.Spec.InitContainers} {
		for i := range list {
			if list[i].Name == name {
				return &list[i]
			}
		}
	}
	return nil
}
