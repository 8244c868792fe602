package podspec

import (
	"fmt"
	"path"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// file is one file of a volume: its content and permission bits.
type file struct {
	data []byte
	mode int32
}

// payload maps a slash-separated path relative to the volume directory to
// the file that belongs there.
type payload map[string]file

// defaultMode is what the API server defaults defaultMode to for configMap,
// secret, downwardAPI and projected volumes; it applies when a pod object
// was never defaulted (built by hand, in tests).
const defaultMode int32 = 0o644

func modeOr(m *int32, def int32) int32 {
	if m != nil {
		return *m
	}
	return def
}

// configMapPayload is kubelet's configmap.MakePayload: all keys of Data and
// BinaryData as files named after them, or only the keys listed in items at
// their paths. A missing listed key is an error unless optional.
func configMapPayload(items []corev1.KeyToPath, cm *corev1.ConfigMap, mode int32, optional bool) (payload, error) {
	p := make(payload, len(cm.Data)+len(cm.BinaryData))
	if len(items) == 0 {
		for k, v := range cm.Data {
			p[k] = file{data: []byte(v), mode: mode}
		}
		for k, v := range cm.BinaryData {
			p[k] = file{data: v, mode: mode}
		}
		return p, nil
	}
	for _, it := range items {
		var data []byte
		if s, ok := cm.Data[it.Key]; ok {
			data = []byte(s)
		} else if b, ok := cm.BinaryData[it.Key]; ok {
			data = b
		} else if optional {
			continue
		} else {
			return nil, fmt.Errorf("ConfigMap %s/%s has no key %q", cm.Namespace, cm.Name, it.Key)
		}
		p[it.Path] = file{data: data, mode: modeOr(it.Mode, mode)}
	}
	return p, nil
}

// secretPayload is kubelet's secret.MakePayload; see configMapPayload.
func secretPayload(items []corev1.KeyToPath, s *corev1.Secret, mode int32, optional bool) (payload, error) {
	p := make(payload, len(s.Data))
	if len(items) == 0 {
		for k, v := range s.Data {
			p[k] = file{data: v, mode: mode}
		}
		return p, nil
	}
	for _, it := range items {
		data, ok := s.Data[it.Key]
		if !ok {
			if optional {
				continue
			}
			return nil, fmt.Errorf("secret %s/%s has no key %q", s.Namespace, s.Name, it.Key)
		}
		p[it.Path] = file{data: data, mode: modeOr(it.Mode, mode)}
	}
	return p, nil
}

// downwardAPIPayload is kubelet's downwardapi.CollectData. Volume files only
// carry metadata fields (validation), so hostIPs is not needed; allocatable
// is the node's, for resourceFieldRef limits the containers leave unset.
func downwardAPIPayload(items []corev1.DownwardAPIVolumeFile, pod *corev1.Pod, mode int32, allocatable corev1.ResourceList) (payload, error) {
	p := make(payload, len(items))
	for _, it := range items {
		var (
			v   string
			err error
		)
		switch {
		case it.FieldRef != nil:
			v, err = FieldRefValue(it.FieldRef, pod, nil)
		case it.ResourceFieldRef != nil:
			v, err = ResourceValue(it.ResourceFieldRef, pod, nil, allocatable)
		default:
			err = fmt.Errorf("neither fieldRef nor resourceFieldRef")
		}
		if err != nil {
			return nil, fmt.Errorf("downward API file %s: %w", it.Path, err)
		}
		p[it.Path] = file{data: []byte(v), mode: modeOr(it.Mode, mode)}
	}
	return p, nil
}

// cleanPayload checks every path as kubelet's AtomicWriter does (relative,
// no ".." element, not starting with "..", which also keeps user files
// apart from the "..tmp-" files the writer uses) and returns the payload
// with cleaned paths. It also refuses a path that is both a file and the
// directory of another file.
func cleanPayload(p payload) (payload, error) {
	out := make(payload, len(p))
	for name, f := range p {
		if err := validatePath(name); err != nil {
			return nil, err
		}
		clean := path.Clean(name)
		if clean == "." {
			return nil, fmt.Errorf("path %q: names the volume itself", name)
		}
		out[clean] = f
	}
	for name := range out {
		for dir := path.Dir(name); dir != "."; dir = path.Dir(dir) {
			if _, ok := out[dir]; ok {
				return nil, fmt.Errorf("path %q is a file and the directory of %q", dir, name)
			}
		}
	}
	return out, nil
}

func validatePath(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("empty path")
	case len(name) > 4096:
		return fmt.Errorf("path %.20q...: longer than 4096 bytes", name)
	case path.IsAbs(name):
		return fmt.Errorf("path %q: must be relative", name)
	case strings.HasPrefix(name, ".."):
		return fmt.Errorf("path %q: must not start with '..'", name)
	}
	for _, el := range strings.Split(name, "/") {
		if el == ".." {
			return fmt.Errorf("path %q: must not contain '..'", name)
		}
		if len(el) > 255 {
			return fmt.Errorf("path %q: element longer than 255 bytes", name)
		}
	}
	return nil
}
