package podspec

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

var (
	// ErrUnsupported is returned for a volume type, projected source or
	// env source the lab's node agent does not provide. The pod cannot
	// run in the lab as written.
	ErrUnsupported = errors.New("not supported by the lab node agent")

	// ErrNoVolume is returned by Path and Mounts for a volume name the pod
	// does not declare.
	ErrNoVolume = errors.New("no such volume in the pod")
)

const (
	// defaultTokenSeconds is the API default of
	// serviceAccountToken.expirationSeconds.
	defaultTokenSeconds int64 = 3600
	// maxTokenAge is kubelet's maxTTL: a token is refreshed after a day
	// whatever its lifetime.
	maxTokenAge = 24 * time.Hour
	// resyncPeriod is how often Refresh wants to re-read ConfigMaps and
	// Secrets; kubelet's pod sync period is a minute too.
	resyncPeriod = time.Minute
	// retryPeriod is how soon Refresh wants to be called again after an
	// error.
	retryPeriod = 10 * time.Second
)

// Volumes materialises the volumes of one pod under <root>/<podUID>/volumes/
// and refreshes them. It is safe for concurrent use.
type Volumes struct {
	client kubernetes.Interface
	dir    string // <root>/<podUID>
	log    *slog.Logger
	now    func() time.Time

	mu     sync.Mutex
	pod    *corev1.Pod
	tokens map[tokenKey]*token
}

// tokenKey names one serviceAccountToken source: its volume and its path.
type tokenKey struct{ volume, path string }

type token struct {
	data      []byte
	refreshAt time.Time
}

// Mount is one bind mount for a container: Source on the host, Target in
// the container's (the pod's) mount namespace.
type Mount struct {
	Source, Target string
	ReadOnly       bool
}

// NewVolumes returns the volumes of pod, kept under <root>/<podUID>. It does
// no I/O; call Setup. client needs the node's rights: get ConfigMaps,
// Secrets and the node, create service account tokens. A nil log logs to
// slog.Default().
func NewVolumes(client kubernetes.Interface, root string, pod *corev1.Pod, log *slog.Logger) *Volumes {
	if log == nil {
		log = slog.Default()
	}
	return &Volumes{
		client: client,
		dir:    filepath.Join(root, string(pod.UID)),
		log:    log.With("pod", pod.Namespace+"/"+pod.Name),
		now:    time.Now,
		pod:    pod,
		tokens: map[tokenKey]*token{},
	}
}

// UpdatePod gives Refresh a newer copy of the same pod, so that downwardAPI
// files follow label and annotation changes as they do under kubelet.
func (v *Volumes) UpdatePod(pod *corev1.Pod) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if pod.UID != v.pod.UID {
		return fmt.Errorf("updating pod %s/%s: UID %s, want %s", pod.Namespace, pod.Name, pod.UID, v.pod.UID)
	}
	v.pod = pod
	return nil
}

// Setup materialises every volume of the pod:
//
//   - emptyDir: a directory, mode 0777 like kubelet's; medium Memory is a
//     plain directory too, not tmpfs;
//   - hostPath: the host path as is, created for DirectoryOrCreate (0755)
//     and FileOrCreate (0644, parent must exist), checked for the other
//     types;
//   - configMap, secret, downwardAPI and projected: files written from the
//     API, see Refresh.
//
// Any other volume type is ErrUnsupported. Setup tries every volume and
// returns all errors, each naming its volume. Calling it again is safe.
func (v *Volumes) Setup(ctx context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := os.MkdirAll(filepath.Join(v.dir, "volumes"), 0o750); err != nil {
		return fmt.Errorf("creating pod directory: %w", err)
	}
	var errs []error
	for i := range v.pod.Spec.Volumes {
		vol := &v.pod.Spec.Volumes[i]
		if err := v.setup(ctx, vol); err != nil {
			errs = append(errs, fmt.Errorf("volume %q: %w", vol.Name, err))
		}
	}
	return errors.Join(errs...)
}

func (v *Volumes) setup(ctx context.Context, vol *corev1.Volume) error {
	switch {
	case vol.EmptyDir != nil:
		dir := v.volumeDir(vol.Name)
		if err := os.MkdirAll(dir, 0o777); err != nil {
			return err
		}
		if vol.EmptyDir.Medium == corev1.StorageMediumMemory {
			v.log.Debug("emptyDir medium Memory is a plain directory in the lab", "volume", vol.Name)
		}
		// MkdirAll is subject to the umask; any container user may write
		// an emptyDir.
		return os.Chmod(dir, 0o777)
	case vol.HostPath != nil:
		return setupHostPath(vol.HostPath)
	case isAPIData(vol):
		p, err := v.collect(ctx, vol)
		if err != nil {
			return err
		}
		return writePayload(v.volumeDir(vol.Name), p)
	default:
		return unsupported(vol)
	}
}

// Path returns the host path to bind-mount for the volume name: the hostPath
// of a hostPath volume, <root>/<podUID>/volumes/<name> otherwise.
func (v *Volumes) Path(name string) (string, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.path(name)
}

func (v *Volumes) path(name string) (string, error) {
	vol := v.volume(name)
	switch {
	case vol == nil:
		return "", fmt.Errorf("volume %q: %w", name, ErrNoVolume)
	case vol.HostPath != nil:
		return vol.HostPath.Path, nil
	case vol.EmptyDir != nil, isAPIData(vol):
		return v.volumeDir(name), nil
	default:
		return "", fmt.Errorf("volume %q: %w", name, unsupported(vol))
	}
}

// Refresh rewrites the configMap, secret, downwardAPI and projected volumes
// from the API, the way kubelet's periodic sync does: ConfigMaps and Secrets
// are read again every time; a service account token is requested again once
// 80% of its lifetime has passed (or a day, if sooner), and reused
// until then.
//
// When a source cannot be read the volume keeps its previous contents and
// the error is returned, naming the volume; the other volumes are still
// refreshed. An optional ConfigMap or Secret that was deleted empties its
// part of the volume, as with kubelet.
//
// next is when Refresh wants to run again: the earliest token refresh, at
// most a minute away, or 10 seconds after an error.
func (v *Volumes) Refresh(ctx context.Context) (next time.Time, err error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	now := v.now()
	next = now.Add(resyncPeriod)
	var errs []error
	for i := range v.pod.Spec.Volumes {
		vol := &v.pod.Spec.Volumes[i]
		if !isAPIData(vol) {
			continue
		}
		p, err := v.collect(ctx, vol)
		if err == nil {
			err = writePayload(v.volumeDir(vol.Name), p)
		}
		if err != nil {
			v.log.Warn("refreshing volume", "volume", vol.Name, "error", err)
			errs = append(errs, fmt.Errorf("volume %q: %w", vol.Name, err))
		}
	}
	retry := len(errs) > 0
	for _, t := range v.tokens {
		switch {
		case !t.refreshAt.After(now):
			// Due but not renewed: the request failed above.
			retry = true
		case t.refreshAt.Before(next):
			next = t.refreshAt
		}
	}
	if retry && now.Add(retryPeriod).Before(next) {
		next = now.Add(retryPeriod)
	}
	return next, errors.Join(errs...)
}

// Cleanup removes <root>/<podUID> and everything in it. The caller must
// have stopped the pod's processes and let go of its mount namespace first:
// Cleanup does not unmount. hostPath volumes are not touched.
func (v *Volumes) Cleanup() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := os.RemoveAll(v.dir); err != nil {
		return fmt.Errorf("removing pod directory: %w", err)
	}
	return nil
}

// Mounts resolves c's volumeMounts into bind mounts. A subPath becomes the
// file or directory at that path inside the volume; one that does not exist
// is created as a directory, as kubelet does. A subPathExpr needs the
// container's environment: use MountsWithEnv.
//
// ReadOnly is set for read-only mounts and always for configMap, secret,
// downwardAPI and projected volumes, which kubelet mounts read-only.
func (v *Volumes) Mounts(c *corev1.Container) ([]Mount, error) {
	return v.MountsWithEnv(c, nil)
}

// MountsWithEnv is Mounts with subPathExpr expanded against env, the
// container's environment as Env returns it. As in kubelet, a reference to
// a variable that is unset or empty is an error.
func (v *Volumes) MountsWithEnv(c *corev1.Container, env []string) ([]Mount, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if len(c.VolumeDevices) > 0 {
		return nil, fmt.Errorf("container %q: volumeDevices: %w", c.Name, ErrUnsupported)
	}
	mounts := make([]Mount, 0, len(c.VolumeMounts))
	for _, vm := range c.VolumeMounts {
		src, err := v.path(vm.Name)
		if err != nil {
			return nil, fmt.Errorf("container %q: %w", c.Name, err)
		}
		sub := vm.SubPath
		if vm.SubPathExpr != "" {
			if sub, err = expandSubPath(vm.SubPathExpr, env); err != nil {
				return nil, fmt.Errorf("container %q, volumeMount %q: subPathExpr %q: %w", c.Name, vm.Name, vm.SubPathExpr, err)
			}
		}
		if sub != "" {
			if src, err = subPath(src, sub); err != nil {
				return nil, fmt.Errorf("container %q, volumeMount %q: %w", c.Name, vm.Name, err)
			}
		}
		mounts = append(mounts, Mount{
			Source:   src,
			Target:   vm.MountPath,
			ReadOnly: vm.ReadOnly || isAPIData(v.volume(vm.Name)),
		})
	}
	return mounts, nil
}

func (v *Volumes) volume(name string) *corev1.Volume {
	for i := range v.pod.Spec.Volumes {
		if v.pod.Spec.Volumes[i].Name == name {
			return &v.pod.Spec.Volumes[i]
		}
	}
	return nil
}

func (v *Volumes) volumeDir(name string) string {
	return filepath.Join(v.dir, "volumes", name)
}

// isAPIData reports whether vol holds files written from the API.
func isAPIData(vol *corev1.Volume) bool {
	return vol.ConfigMap != nil || vol.Secret != nil || vol.DownwardAPI != nil || vol.Projected != nil
}

// collect builds the files of a configMap, secret, downwardAPI or projected
// volume.
func (v *Volumes) collect(ctx context.Context, vol *corev1.Volume) (payload, error) {
	switch {
	case vol.ConfigMap != nil:
		src := vol.ConfigMap
		cm, err := v.configMap(ctx, src.Name, src.Optional)
		if err != nil {
			return nil, err
		}
		return configMapPayload(src.Items, cm, modeOr(src.DefaultMode, defaultMode), isTrue(src.Optional))
	case vol.Secret != nil:
		src := vol.Secret
		s, err := v.secret(ctx, src.SecretName, src.Optional)
		if err != nil {
			return nil, err
		}
		return secretPayload(src.Items, s, modeOr(src.DefaultMode, defaultMode), isTrue(src.Optional))
	case vol.DownwardAPI != nil:
		alloc, err := v.allocatable(ctx, vol.DownwardAPI.Items)
		if err != nil {
			return nil, err
		}
		return downwardAPIPayload(vol.DownwardAPI.Items, v.pod, modeOr(vol.DownwardAPI.DefaultMode, defaultMode), alloc)
	case vol.Projected != nil:
		return v.collectProjected(ctx, vol.Name, vol.Projected)
	}
	return nil, unsupported(vol)
}

// collectProjected is kubelet's projected collectData: the sources' files
// merged in order, a later source overwriting an earlier one's path.
func (v *Volumes) collectProjected(ctx context.Context, volName string, src *corev1.ProjectedVolumeSource) (payload, error) {
	mode := modeOr(src.DefaultMode, defaultMode)
	out := payload{}
	for i, s := range src.Sources {
		var (
			p   payload
			err error
		)
		switch {
		case s.ConfigMap != nil:
			var cm *corev1.ConfigMap
			if cm, err = v.configMap(ctx, s.ConfigMap.Name, s.ConfigMap.Optional); err == nil {
				p, err = configMapPayload(s.ConfigMap.Items, cm, mode, isTrue(s.ConfigMap.Optional))
			}
		case s.Secret != nil:
			var sec *corev1.Secret
			if sec, err = v.secret(ctx, s.Secret.Name, s.Secret.Optional); err == nil {
				p, err = secretPayload(s.Secret.Items, sec, mode, isTrue(s.Secret.Optional))
			}
		case s.DownwardAPI != nil:
			var alloc corev1.ResourceList
			if alloc, err = v.allocatable(ctx, s.DownwardAPI.Items); err == nil {
				p, err = downwardAPIPayload(s.DownwardAPI.Items, v.pod, mode, alloc)
			}
		case s.ServiceAccountToken != nil:
			var data []byte
			if data, err = v.token(ctx, volName, s.ServiceAccountToken); err == nil {
				p = payload{s.ServiceAccountToken.Path: {data: data, mode: mode}}
			}
		case s.ClusterTrustBundle != nil:
			err = fmt.Errorf("clusterTrustBundle source: %w", ErrUnsupported)
		case s.PodCertificate != nil:
			err = fmt.Errorf("podCertificate source: %w", ErrUnsupported)
		default:
			err = fmt.Errorf("source %d: unknown kind: %w", i, ErrUnsupported)
		}
		if err != nil {
			return nil, err
		}
		for k, f := range p {
			out[k] = f
		}
	}
	return out, nil
}

// configMap gets a ConfigMap of the pod's namespace; a missing optional one
// reads as empty, which empties its part of the volume.
func (v *Volumes) configMap(ctx context.Context, name string, optional *bool) (*corev1.ConfigMap, error) {
	cm, err := getConfigMap(ctx, v.client, v.pod.Namespace, name, isTrue(optional))
	if cm == nil && err == nil {
		cm = &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: v.pod.Namespace, Name: name}}
	}
	return cm, err
}

// secret is configMap for Secrets.
func (v *Volumes) secret(ctx context.Context, name string, optional *bool) (*corev1.Secret, error) {
	s, err := getSecret(ctx, v.client, v.pod.Namespace, name, isTrue(optional))
	if s == nil && err == nil {
		s = &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: v.pod.Namespace, Name: name}}
	}
	return s, err
}

// getConfigMap gets a ConfigMap with a single Get, which the Node authorizer
// allows for ConfigMaps that pods bound to the node reference. A missing
// optional ConfigMap is (nil, nil).
func getConfigMap(ctx context.Context, client kubernetes.Interface, ns, name string, optional bool) (*corev1.ConfigMap, error) {
	cm, err := client.CoreV1().ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{})
	switch {
	case err == nil:
		return cm, nil
	case apierrors.IsNotFound(err) && optional:
		return nil, nil
	case apierrors.IsNotFound(err):
		return nil, fmt.Errorf("ConfigMap %s/%s not found and not marked optional: create it or set optional: true", ns, name)
	default:
		return nil, fmt.Errorf("getting ConfigMap %s/%s: %w", ns, name, err)
	}
}

// getSecret is getConfigMap for Secrets.
func getSecret(ctx context.Context, client kubernetes.Interface, ns, name string, optional bool) (*corev1.Secret, error) {
	s, err := client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	switch {
	case err == nil:
		return s, nil
	case apierrors.IsNotFound(err) && optional:
		return nil, nil
	case apierrors.IsNotFound(err):
		return nil, fmt.Errorf("secret %s/%s not found and not marked optional: create it or set optional: true", ns, name)
	default:
		return nil, fmt.Errorf("getting Secret %s/%s: %w", ns, name, err)
	}
}

// token returns the current token of a serviceAccountToken source,
// requesting a new one when there is none or it is due for refresh.
func (v *Volumes) token(ctx context.Context, volName string, src *corev1.ServiceAccountTokenProjection) ([]byte, error) {
	key := tokenKey{volName, src.Path}
	now := v.now()
	if t, ok := v.tokens[key]; ok && now.Before(t.refreshAt) {
		return t.data, nil
	}
	req := tokenRequest(v.pod, src)
	sa := v.pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	resp, err := v.client.CoreV1().ServiceAccounts(v.pod.Namespace).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		// The volume is not rewritten on an error, so the pod keeps the
		// old token until a retry succeeds; kubelet does the same.
		return nil, fmt.Errorf("requesting a token for ServiceAccount %s/%s bound to the pod: %w", v.pod.Namespace, sa, err)
	}
	if resp.Status.Token == "" {
		return nil, fmt.Errorf("requesting a token for ServiceAccount %s/%s: the API server returned an empty token", v.pod.Namespace, sa)
	}
	t := &token{
		data:      []byte(resp.Status.Token),
		refreshAt: tokenRefreshAt(now, *req.Spec.ExpirationSeconds, resp),
	}
	v.tokens[key] = t
	v.log.Debug("requested service account token", "volume", volName, "path", src.Path, "refresh_at", t.refreshAt)
	return t.data, nil
}

// tokenRequest is the TokenRequest kubelet sends for a projected
// serviceAccountToken source. The token is bound to the pod (name and UID);
// the API server adds the node it runs on to the claims. Ambit's node
// tunnel authenticates callers by those pod and node claims, so a token
// that is not pod-bound is useless to the lab.
func tokenRequest(pod *corev1.Pod, src *corev1.ServiceAccountTokenProjection) *authenticationv1.TokenRequest {
	var auds []string // empty: the API server's own audiences
	if src.Audience != "" {
		auds = []string{src.Audience}
	}
	exp := defaultTokenSeconds
	if src.ExpirationSeconds != nil {
		exp = *src.ExpirationSeconds
	}
	return &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			Audiences:         auds,
			ExpirationSeconds: &exp,
			BoundObjectRef: &authenticationv1.BoundObjectReference{
				Kind:       "Pod",
				APIVersion: "v1",
				Name:       pod.Name,
				UID:        pod.UID,
			},
		},
	}
}

// tokenRefreshAt is kubelet's token manager rule: refresh once 80% of the
// token's lifetime has passed, or after a day. The lifetime is the one in
// the response (the API server may shorten it), else the one requested. The
// API server extends a 3607-second token to a year but reports the
// requested lifetime in status.expirationTimestamp, so this refreshes it
// hourly, as kubelet does.
func tokenRefreshAt(now time.Time, requested int64, resp *authenticationv1.TokenRequest) time.Time {
	ttl := time.Duration(requested) * time.Second
	if s := resp.Spec.ExpirationSeconds; s != nil && *s > 0 {
		ttl = time.Duration(*s) * time.Second
	}
	exp := resp.Status.ExpirationTimestamp.Time
	if exp.IsZero() {
		exp = now.Add(ttl)
	}
	issued := exp.Add(-ttl)
	at := exp.Add(-ttl / 5)
	if day := issued.Add(maxTokenAge); day.Before(at) {
		at = day
	}
	return at
}

// allocatable returns the node's allocatable resources when items need them
// (a resourceFieldRef), nil otherwise.
func (v *Volumes) allocatable(ctx context.Context, items []corev1.DownwardAPIVolumeFile) (corev1.ResourceList, error) {
	for _, it := range items {
		if it.ResourceFieldRef != nil {
			return nodeAllocatable(ctx, v.client, v.pod.Spec.NodeName)
		}
	}
	return nil, nil
}

// nodeAllocatable gets the pod's node for its status.allocatable, which
// kubelet uses for limits a container leaves unset.
func nodeAllocatable(ctx context.Context, client kubernetes.Interface, nodeName string) (corev1.ResourceList, error) {
	if nodeName == "" {
		return nil, fmt.Errorf("resourceFieldRef needs the node's allocatable, and the pod has no spec.nodeName")
	}
	node, err := client.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("getting node %s for its allocatable resources: %w", nodeName, err)
	}
	return node.Status.Allocatable, nil
}

func unsupported(vol *corev1.Volume) error {
	return fmt.Errorf("volume type %s: %w", volumeType(vol), ErrUnsupported)
}

// volumeType names the volume source that is set, for error messages.
func volumeType(vol *corev1.Volume) string {
	s := vol.VolumeSource
	switch {
	case s.PersistentVolumeClaim != nil:
		return "persistentVolumeClaim"
	case s.CSI != nil:
		return "csi"
	case s.Ephemeral != nil:
		return "ephemeral"
	case s.Image != nil:
		return "image"
	case s.NFS != nil:
		return "nfs"
	case s.ISCSI != nil:
		return "iscsi"
	case s.FC != nil:
		return "fc"
	case s.Glusterfs != nil:
		return "glusterfs"
	case s.RBD != nil:
		return "rbd"
	case s.CephFS != nil:
		return "cephfs"
	case s.GitRepo != nil:
		return "gitRepo"
	}
	return "(other)"
}

func isTrue(b *bool) bool { return b != nil && *b }
