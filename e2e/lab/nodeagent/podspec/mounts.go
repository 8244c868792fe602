package podspec

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// setupHostPath checks or creates a hostPath as its type asks (kubelet's
// hostpath plugin). The path itself is used as is.
func setupHostPath(hp *corev1.HostPathVolumeSource) error {
	p := hp.Path
	var typ corev1.HostPathType
	if hp.Type != nil {
		typ = *hp.Type
	}
	switch typ {
	case corev1.HostPathUnset:
		return nil
	case corev1.HostPathDirectoryOrCreate:
		if err := os.MkdirAll(p, 0o755); err != nil {
			return fmt.Errorf("hostPath %s (DirectoryOrCreate): %w", p, err)
		}
	case corev1.HostPathFileOrCreate:
		// Like kubelet, create the file but not its directory.
		// Opening an existing directory fails; the type check below says
		// so more clearly.
		if f, err := os.OpenFile(p, os.O_RDONLY|os.O_CREATE, 0o644); err == nil {
			_ = f.Close() // read-only, nothing written
		} else if _, serr := os.Stat(p); serr != nil {
			return fmt.Errorf("hostPath %s (FileOrCreate): %w", p, err)
		}
	}
	st, err := os.Stat(p)
	if err != nil {
		return fmt.Errorf("hostPath %s (%s): %w", p, typ, err)
	}
	if !hostPathTypeMatches(typ, st.Mode()) {
		return fmt.Errorf("hostPath %s is a %s, want %s", p, fileKind(st.Mode()), typ)
	}
	return nil
}

func hostPathTypeMatches(typ corev1.HostPathType, m fs.FileMode) bool {
	switch typ {
	case corev1.HostPathDirectory, corev1.HostPathDirectoryOrCreate:
		return m.IsDir()
	case corev1.HostPathFile, corev1.HostPathFileOrCreate:
		return m.IsRegular()
	case corev1.HostPathSocket:
		return m&fs.ModeSocket != 0
	case corev1.HostPathCharDev:
		return m&fs.ModeDevice != 0 && m&fs.ModeCharDevice != 0
	case corev1.HostPathBlockDev:
		return m&fs.ModeDevice != 0 && m&fs.ModeCharDevice == 0
	}
	return false
}

func fileKind(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "directory"
	case m.IsRegular():
		return "file"
	case m&fs.ModeSocket != 0:
		return "socket"
	case m&fs.ModeCharDevice != 0:
		return "character device"
	case m&fs.ModeDevice != 0:
		return "block device"
	}
	return "special file"
}

// subPath returns the host path of sub inside the volume at vol, symlinks
// resolved, creating
// it as a directory (with the volume directory's mode) when it does not
// exist, as kubelet does.
//
// Kubelet also guards against a container swapping a path component for a
// symlink between this check and the bind mount (PrepareSafeSubpath opens
// each component and mounts /proc/self/fd/N). The lab checks once that the
// resolved path stays inside the volume and trusts its pods after that.
func subPath(vol, sub string) (string, error) {
	if err := validateSubPath(sub); err != nil {
		return "", err
	}
	full := filepath.Join(vol, filepath.FromSlash(sub))
	if _, err := os.Lstat(full); errors.Is(err, fs.ErrNotExist) {
		st, err := os.Stat(vol)
		if err != nil {
			return "", fmt.Errorf("subPath %q: %w", sub, err)
		}
		if err := os.MkdirAll(full, st.Mode().Perm()); err != nil {
			return "", fmt.Errorf("creating subPath %q: %w", sub, err)
		}
	}
	realVol, err := filepath.EvalSymlinks(vol)
	if err != nil {
		return "", fmt.Errorf("subPath %q: resolving volume: %w", sub, err)
	}
	real, err := filepath.EvalSymlinks(full)
	if err != nil {
		return "", fmt.Errorf("subPath %q: %w", sub, err)
	}
	if rel, err := filepath.Rel(realVol, real); err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
		return "", fmt.Errorf("subPath %q resolves to %s, outside the volume", sub, real)
	}
	return real, nil
}

// validateSubPath is the kubelet check: relative and without "..".
func validateSubPath(sub string) error {
	if filepath.IsAbs(sub) || strings.HasPrefix(sub, "/") {
		return fmt.Errorf("subPath %q: must not be an absolute path", sub)
	}
	if slices.Contains(strings.Split(filepath.ToSlash(sub), "/"), "..") {
		return fmt.Errorf("subPath %q: must not contain '..'", sub)
	}
	return nil
}

// expandSubPath expands a subPathExpr against the container's environment
// (kubelet's ExpandContainerVolumeMounts): a reference to a variable that
// is unset or empty is an error rather than left as written.
func expandSubPath(expr string, env []string) (string, error) {
	vars := envMap(env)
	var missing []string
	out := Expand(expr, func(name string) (string, bool) {
		v := vars[name]
		if v == "" && !slices.Contains(missing, name) {
			missing = append(missing, name)
		}
		return v, true
	})
	if len(missing) > 0 {
		slices.Sort(missing)
		return "", fmt.Errorf("missing value for %s", strings.Join(missing, ", "))
	}
	return out, nil
}

func envMap(env []string) map[string]string {
	m := make(map[string]string, len(env))
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	return m
}
