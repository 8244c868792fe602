package podspec

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
)

// defaultPath is PATH when neither the pod nor the host sets one; it is
// what container runtimes use for images without a PATH.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Env computes the environment of container c of pod as "NAME=value"
// strings, as kubelet's makeEnvironmentVariables does and then a container
// runtime would:
//
//  1. envFrom, in order (configMapRef, secretRef, with prefix); a later
//     source overwrites an earlier one's keys;
//  2. env, in order: value with $(VAR) expanded against the variables so
//     far and the service variables, or valueFrom (fieldRef, see
//     FieldRefValue; resourceFieldRef, see ResourceValue; configMapKeyRef;
//     secretKeyRef). A missing optional ConfigMap, Secret or key leaves the
//     variable out; a missing non-optional one is an error naming it;
//  3. the service variables of ServiceEnv not already set;
//  4. HOSTNAME=Hostname(pod) and PATH from the agent's own environment,
//     unless set: the runtime's and the image's part of the environment.
//
// nodeIP is status.hostIP(s). status.podIP(s) come from pod.Status, which
// the caller fills in with the pod's addresses before it calls Env.
// services are the Services of the pod's namespace and of default (at
// least the kubernetes Service); Env picks what ServiceEnv picks.
//
// Env only Gets ConfigMaps, Secrets and, for a resourceFieldRef to an unset
// limit, the node: all allowed to the node's credentials.
func Env(ctx context.Context, client kubernetes.Interface, pod *corev1.Pod, c *corev1.Container, services []*corev1.Service, nodeIP string) ([]string, error) {
	var hostIPs []string
	if nodeIP != "" {
		hostIPs = []string{nodeIP}
	}
	enableLinks := pod.Spec.EnableServiceLinks == nil || *pod.Spec.EnableServiceLinks
	svcEnv := ServiceEnv(pod.Namespace, enableLinks, services)
	svcVars := make(map[string]string, len(svcEnv))
	for _, e := range svcEnv {
		svcVars[e.Name] = e.Value
	}

	var (
		env        orderedEnv
		configMaps = map[string]*corev1.ConfigMap{}
		secrets    = map[string]*corev1.Secret{}
		alloc      corev1.ResourceList
		haveAlloc  bool
	)
	configMap := func(name string, optional *bool) (*corev1.ConfigMap, error) {
		if cm, ok := configMaps[name]; ok {
			return cm, nil
		}
		cm, err := getConfigMap(ctx, client, pod.Namespace, name, isTrue(optional))
		if cm != nil {
			configMaps[name] = cm
		}
		return cm, err // nil, nil: missing and optional
	}
	secret := func(name string, optional *bool) (*corev1.Secret, error) {
		if s, ok := secrets[name]; ok {
			return s, nil
		}
		s, err := getSecret(ctx, client, pod.Namespace, name, isTrue(optional))
		if s != nil {
			secrets[name] = s
		}
		return s, err // nil, nil: missing and optional
	}

	for _, from := range c.EnvFrom {
		switch {
		case from.ConfigMapRef != nil:
			cm, err := configMap(from.ConfigMapRef.Name, from.ConfigMapRef.Optional)
			if err != nil {
				return nil, fmt.Errorf("envFrom: %w", err)
			}
			if cm == nil {
				continue
			}
			for _, k := range sortedKeys(cm.Data) {
				env.set(from.Prefix+k, cm.Data[k])
			}
		case from.SecretRef != nil:
			s, err := secret(from.SecretRef.Name, from.SecretRef.Optional)
			if err != nil {
				return nil, fmt.Errorf("envFrom: %w", err)
			}
			if s == nil {
				continue
			}
			for _, k := range sortedKeys(s.Data) {
				env.set(from.Prefix+k, string(s.Data[k]))
			}
		}
	}

	lookup := func(name string) (string, bool) {
		if v, ok := env.vars[name]; ok {
			return v, true
		}
		v, ok := svcVars[name]
		return v, ok
	}
	for _, e := range c.Env {
		if e.Value != "" || e.ValueFrom == nil {
			env.set(e.Name, Expand(e.Value, lookup))
			continue
		}
		var (
			val string
			ok  = true
			err error
		)
		switch from := e.ValueFrom; {
		case from.FieldRef != nil:
			val, err = FieldRefValue(from.FieldRef, pod, hostIPs)
		case from.ResourceFieldRef != nil:
			if !haveAlloc && needsAllocatable(from.ResourceFieldRef, pod, c) {
				alloc, err = nodeAllocatable(ctx, client, pod.Spec.NodeName)
				haveAlloc = err == nil
			}
			if err == nil {
				val, err = ResourceValue(from.ResourceFieldRef, pod, c, alloc)
			}
		case from.ConfigMapKeyRef != nil:
			ref := from.ConfigMapKeyRef
			var cm *corev1.ConfigMap
			if cm, err = configMap(ref.Name, ref.Optional); err == nil {
				if val, ok = configMapValue(cm, ref.Key); !ok && !isTrue(ref.Optional) {
					err = fmt.Errorf("ConfigMap %s/%s has no key %q", pod.Namespace, ref.Name, ref.Key)
				}
			}
		case from.SecretKeyRef != nil:
			ref := from.SecretKeyRef
			var s *corev1.Secret
			if s, err = secret(ref.Name, ref.Optional); err == nil {
				if val, ok = secretValue(s, ref.Key); !ok && !isTrue(ref.Optional) {
					err = fmt.Errorf("secret %s/%s has no key %q", pod.Namespace, ref.Name, ref.Key)
				}
			}
		case from.FileKeyRef != nil:
			err = fmt.Errorf("fileKeyRef: %w", ErrUnsupported)
		default:
			err = fmt.Errorf("empty valueFrom")
		}
		if err != nil {
			return nil, fmt.Errorf("env %s: %w", e.Name, err)
		}
		if ok {
			env.set(e.Name, val)
		}
	}

	for _, e := range svcEnv {
		env.setDefault(e.Name, e.Value)
	}
	if pod.Spec.HostNetwork {
		if h, err := os.Hostname(); err == nil {
			env.setDefault("HOSTNAME", h)
		}
	} else {
		env.setDefault("HOSTNAME", Hostname(pod))
	}
	path := os.Getenv("PATH")
	if path == "" {
		path = defaultPath
	}
	env.setDefault("PATH", path)
	return env.list(), nil
}

// configMapValue reads a key of Data (not BinaryData, as in kubelet) of a
// ConfigMap that may be missing.
func configMapValue(cm *corev1.ConfigMap, key string) (string, bool) {
	if cm == nil {
		return "", false
	}
	v, ok := cm.Data[key]
	return v, ok
}

func secretValue(s *corev1.Secret, key string) (string, bool) {
	if s == nil {
		return "", false
	}
	v, ok := s.Data[key]
	return string(v), ok
}

// needsAllocatable reports whether fs reads a limit the container leaves
// unset, for which ResourceValue needs the node's allocatable.
func needsAllocatable(fs *corev1.ResourceFieldSelector, pod *corev1.Pod, c *corev1.Container) bool {
	name, ok := strings.CutPrefix(fs.Resource, "limits.")
	if !ok || strings.HasPrefix(name, corev1.ResourceHugePagesPrefix) {
		return false
	}
	if fs.ContainerName != "" {
		if c = findContainer(pod, fs.ContainerName); c == nil {
			return false // ResourceValue reports it
		}
	}
	q := c.Resources.Limits[corev1.ResourceName(name)]
	return q.IsZero()
}

// Hostname is the hostname kubelet gives the pod's UTS namespace, which a
// runtime also puts in HOSTNAME: spec.hostnameOverride, else spec.hostname,
// else the pod's name, cut to 63 bytes without a trailing '-' or '.'.
func Hostname(pod *corev1.Pod) string {
	h := pod.Name
	switch {
	case pod.Spec.HostnameOverride != nil && *pod.Spec.HostnameOverride != "":
		h = *pod.Spec.HostnameOverride
	case pod.Spec.Hostname != "":
		h = pod.Spec.Hostname
	}
	if len(h) > 63 {
		h = strings.TrimRight(h[:63], "-.")
	}
	return h
}

// orderedEnv is a set of variables that remembers the order they were
// first set in, so that Env's output is stable.
type orderedEnv struct {
	names []string
	vars  map[string]string
}

func (e *orderedEnv) set(name, value string) {
	if e.vars == nil {
		e.vars = map[string]string{}
	}
	if _, ok := e.vars[name]; !ok {
		e.names = append(e.names, name)
	}
	e.vars[name] = value
}

func (e *orderedEnv) setDefault(name, value string) {
	if _, ok := e.vars[name]; !ok {
		e.set(name, value)
	}
}

func (e *orderedEnv) list() []string {
	out := make([]string, 0, len(e.names))
	for _, n := range e.names {
		out = append(out, n+"="+e.vars[n])
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
