package podspec

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/utils/ptr"
)

// The API paths here are single Gets and a CreateToken, checked against
// client-go's fake clientset; the lab's end-to-end test runs them against a
// real API server under the Node authorizer.

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// clock is a settable time source for Volumes.now.
type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

// tokenServer answers CreateToken like the API server: it echoes the
// request with a token and an expiry, and records what it was asked.
type tokenServer struct {
	clock    *clock
	requests []tokenCall
	fail     error
}

type tokenCall struct {
	namespace, serviceAccount string
	spec                      authenticationv1.TokenRequestSpec
}

func (s *tokenServer) react(a k8stesting.Action) (bool, runtime.Object, error) {
	ca, ok := a.(k8stesting.CreateActionImpl)
	if !ok || ca.GetSubresource() != "token" {
		return false, nil, nil
	}
	if s.fail != nil {
		return true, nil, s.fail
	}
	req := ca.GetObject().(*authenticationv1.TokenRequest)
	s.requests = append(s.requests, tokenCall{a.GetNamespace(), ca.Name, *req.Spec.DeepCopy()})
	out := req.DeepCopy()
	out.Status.Token = fmt.Sprintf("token-%d", len(s.requests))
	out.Status.ExpirationTimestamp = metav1.NewTime(s.clock.now().Add(time.Duration(*req.Spec.ExpirationSeconds) * time.Second))
	return true, out, nil
}

func newTestVolumes(t *testing.T, pod *corev1.Pod, objs ...runtime.Object) (*Volumes, *fake.Clientset, *tokenServer, *clock) {
	t.Helper()
	client := fake.NewClientset(objs...)
	clk := &clock{t: t0}
	ts := &tokenServer{clock: clk}
	client.PrependReactor("create", "serviceaccounts", ts.react)
	v := NewVolumes(client, t.TempDir(), pod, slog.New(slog.DiscardHandler))
	v.now = clk.now
	return v, client, ts, clk
}

func configMap(ns, name string, data map[string]string) *corev1.ConfigMap {
	return &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Data: data}
}

func secret(ns, name string, data map[string]string) *corev1.Secret {
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Data: map[string][]byte{}}
	for k, v := range data {
		s.Data[k] = []byte(v)
	}
	return s
}

// kubeAPIAccess is the projected volume the ServiceAccount admission plugin
// adds to every pod.
func kubeAPIAccess() corev1.Volume {
	return corev1.Volume{Name: "kube-api-access", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
		DefaultMode: ptr.To[int32](0o644),
		Sources: []corev1.VolumeProjection{
			{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{ExpirationSeconds: ptr.To[int64](3607), Path: "token"}},
			{ConfigMap: &corev1.ConfigMapProjection{
				LocalObjectReference: corev1.LocalObjectReference{Name: "kube-root-ca.crt"},
				Items:                []corev1.KeyToPath{{Key: "ca.crt", Path: "ca.crt"}},
			}},
			{DownwardAPI: &corev1.DownwardAPIProjection{Items: []corev1.DownwardAPIVolumeFile{
				{Path: "namespace", FieldRef: &corev1.ObjectFieldSelector{APIVersion: "v1", FieldPath: "metadata.namespace"}},
			}}},
		},
	}}}
}

func TestSetup(t *testing.T) {
	hostDir := filepath.Join(t.TempDir(), "new", "dir")
	hostFile := filepath.Join(t.TempDir(), "file")
	pod := testPod()
	pod.Spec.Volumes = []corev1.Volume{
		{Name: "cache", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
		{Name: "mem", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{Medium: corev1.StorageMediumMemory}}},
		{Name: "config", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: "web-config"},
			DefaultMode:          ptr.To[int32](0o640),
			Items: []corev1.KeyToPath{
				{Key: "app.yaml", Path: "conf/app.yaml", Mode: ptr.To[int32](0o600)},
				{Key: "level", Path: "level"},
			},
		}}},
		{Name: "tls", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{
			SecretName: "tls", DefaultMode: ptr.To[int32](0o400),
		}}},
		{Name: "opt-cm", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: "absent"}, Optional: ptr.To(true),
		}}},
		{Name: "opt-secret", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{
			SecretName: "absent", Optional: ptr.To(true),
		}}},
		{Name: "podinfo", VolumeSource: corev1.VolumeSource{DownwardAPI: &corev1.DownwardAPIVolumeSource{Items: []corev1.DownwardAPIVolumeFile{
			{Path: "name", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}},
			{Path: "namespace", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}},
			{Path: "uid", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.uid"}},
			{Path: "labels", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.labels"}},
			{Path: "annotations", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.annotations"}},
		}}}},
		kubeAPIAccess(),
		{Name: "mesh-token", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
			Sources: []corev1.VolumeProjection{{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Audience: "ambit", Path: "sa/token"}}},
		}}},
		{Name: "host-dir", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{
			Path: hostDir, Type: ptr.To(corev1.HostPathDirectoryOrCreate),
		}}},
		{Name: "host-file", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{
			Path: hostFile, Type: ptr.To(corev1.HostPathFileOrCreate),
		}}},
	}
	v, client, ts, _ := newTestVolumes(t, pod,
		configMap("shop", "web-config", map[string]string{"app.yaml": "port: 80", "level": "debug", "unused": "x"}),
		configMap("shop", "kube-root-ca.crt", map[string]string{"ca.crt": "CA"}),
		secret("shop", "tls", map[string]string{"tls.crt": "CERT", "tls.key": "KEY"}),
		configMap("other", "absent", map[string]string{"wrong": "namespace"}),
	)
	if err := v.Setup(context.Background()); err != nil {
		t.Fatal(err)
	}
	// The Node authorizer lets the node get what its pods reference and
	// create their tokens; it cannot list or watch.
	for _, a := range client.Actions() {
		if verb := a.GetVerb() + " " + a.GetResource().Resource + "/" + a.GetSubresource(); verb != "get configmaps/" &&
			verb != "get secrets/" && verb != "create serviceaccounts/token" {
			t.Errorf("Setup did %s", verb)
		}
	}

	wantFiles := map[string]map[string]string{
		"cache":      {},
		"mem":        {},
		"config":     {"conf/app.yaml": "port: 80 -rw-------", "level": "debug -rw-r-----"},
		"tls":        {"tls.crt": "CERT -r--------", "tls.key": "KEY -r--------"},
		"opt-cm":     {},
		"opt-secret": {},
		"podinfo": {
			"name":        "web-0 -rw-r--r--",
			"namespace":   "shop -rw-r--r--",
			"uid":         "4f9d2c1e-0000-4000-8000-000000000001 -rw-r--r--",
			"labels":      "app=\"web\"\ntier=\"front\" -rw-r--r--",
			"annotations": "example.com/owner=\"team-a\"\nnote=\"say \\\"hi\\\"\\n\" -rw-r--r--",
		},
		"kube-api-access": {"token": "token-1 -rw-r--r--", "ca.crt": "CA -rw-r--r--", "namespace": "shop -rw-r--r--"},
		"mesh-token":      {"sa/token": "token-2 -rw-r--r--"},
	}
	for name, want := range wantFiles {
		p, err := v.Path(name)
		if err != nil {
			t.Fatal(err)
		}
		if got := tree(t, p); !maps.Equal(got, want) {
			t.Errorf("volume %s: files = %v, want %v", name, got, want)
		}
	}
	for _, name := range []string{"cache", "mem"} {
		p, _ := v.Path(name)
		if st, err := os.Stat(p); err != nil || st.Mode().Perm() != 0o777 || !st.IsDir() {
			t.Errorf("emptyDir %s: %v %v, want a 0777 directory", name, st.Mode(), err)
		}
	}
	if st, err := os.Stat(hostDir); err != nil || !st.IsDir() {
		t.Errorf("DirectoryOrCreate did not create %s: %v", hostDir, err)
	}
	if st, err := os.Stat(hostFile); err != nil || !st.Mode().IsRegular() {
		t.Errorf("FileOrCreate did not create %s: %v", hostFile, err)
	}

	boundToPod := &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: "web-0", UID: pod.UID}
	want := []tokenCall{
		{"shop", "web", authenticationv1.TokenRequestSpec{ExpirationSeconds: ptr.To[int64](3607), BoundObjectRef: boundToPod}},
		{"shop", "web", authenticationv1.TokenRequestSpec{Audiences: []string{"ambit"}, ExpirationSeconds: ptr.To[int64](3600), BoundObjectRef: boundToPod}},
	}
	if len(ts.requests) != len(want) {
		t.Fatalf("token requests = %+v, want %+v", ts.requests, want)
	}
	for i, got := range ts.requests {
		w := want[i]
		if got.namespace != w.namespace || got.serviceAccount != w.serviceAccount ||
			!equalStrings(got.spec.Audiences, w.spec.Audiences) ||
			*got.spec.ExpirationSeconds != *w.spec.ExpirationSeconds ||
			got.spec.BoundObjectRef == nil || *got.spec.BoundObjectRef != *w.spec.BoundObjectRef {
			t.Errorf("token request %d = %s/%s %+v (bound to %+v), want %s/%s %+v (bound to %+v)", i,
				got.namespace, got.serviceAccount, got.spec, got.spec.BoundObjectRef,
				w.namespace, w.serviceAccount, w.spec, w.spec.BoundObjectRef)
		}
	}

	// Setup again (an agent restart) rewrites nothing that is unchanged.
	if err := v.Setup(context.Background()); err != nil {
		t.Fatal(err)
	}
	if len(ts.requests) != 2 {
		t.Errorf("second Setup requested %d more tokens, want 0 (still fresh)", len(ts.requests)-2)
	}
}

func equalStrings(a, b []string) bool {
	return strings.Join(a, "\x00") == strings.Join(b, "\x00") && len(a) == len(b)
}

func TestSetupErrors(t *testing.T) {
	cmVol := func(name string, optional *bool) corev1.Volume {
		return corev1.Volume{Name: "config", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: name}, Optional: optional,
		}}}
	}
	projected := func(srcs ...corev1.VolumeProjection) corev1.Volume {
		return corev1.Volume{Name: "proj", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{Sources: srcs}}}
	}
	tests := []struct {
		name            string
		volumes         []corev1.Volume
		tokenErr        error
		wantErr         []string
		wantUnsupported bool
	}{
		{
			name:    "missing ConfigMap",
			volumes: []corev1.Volume{cmVol("web-config", nil)},
			wantErr: []string{`volume "config"`, "ConfigMap shop/web-config not found and not marked optional"},
		},
		{
			name:    "missing ConfigMap, optional false",
			volumes: []corev1.Volume{cmVol("web-config", ptr.To(false))},
			wantErr: []string{"ConfigMap shop/web-config not found"},
		},
		{
			name:    "missing Secret",
			volumes: []corev1.Volume{{Name: "tls", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "tls"}}}},
			wantErr: []string{`volume "tls"`, "secret shop/tls not found and not marked optional"},
		},
		{
			name:    "missing Secret in a projection",
			volumes: []corev1.Volume{projected(corev1.VolumeProjection{Secret: &corev1.SecretProjection{LocalObjectReference: corev1.LocalObjectReference{Name: "tls"}}})},
			wantErr: []string{`volume "proj"`, "secret shop/tls not found"},
		},
		{
			name: "missing key of an existing ConfigMap",
			volumes: []corev1.Volume{{Name: "config", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
				LocalObjectReference: corev1.LocalObjectReference{Name: "present"},
				Items:                []corev1.KeyToPath{{Key: "nope", Path: "nope"}},
			}}}},
			wantErr: []string{`ConfigMap shop/present has no key "nope"`},
		},
		{
			name:     "token request refused",
			volumes:  []corev1.Volume{projected(corev1.VolumeProjection{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token"}})},
			tokenErr: errors.New("forbidden"),
			wantErr:  []string{`volume "proj"`, "requesting a token for ServiceAccount shop/web bound to the pod: forbidden"},
		},
		{
			name:            "clusterTrustBundle refused",
			volumes:         []corev1.Volume{projected(corev1.VolumeProjection{ClusterTrustBundle: &corev1.ClusterTrustBundleProjection{Path: "ca"}})},
			wantErr:         []string{`volume "proj"`, "clusterTrustBundle source"},
			wantUnsupported: true,
		},
		{
			name:            "persistentVolumeClaim refused",
			volumes:         []corev1.Volume{{Name: "data", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "data"}}}},
			wantErr:         []string{`volume "data"`, "volume type persistentVolumeClaim", "not supported by the lab node agent"},
			wantUnsupported: true,
		},
		{
			name: "every bad volume reported",
			volumes: []corev1.Volume{
				cmVol("web-config", nil),
				{Name: "data", VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{Driver: "x"}}},
			},
			wantErr:         []string{`volume "config"`, `volume "data": volume type csi`},
			wantUnsupported: true,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pod := testPod()
			pod.Spec.Volumes = tc.volumes
			v, _, ts, _ := newTestVolumes(t, pod, configMap("shop", "present", map[string]string{"a": "b"}))
			ts.fail = tc.tokenErr
			err := v.Setup(context.Background())
			if err == nil {
				t.Fatal("Setup succeeded")
			}
			for _, w := range tc.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			if got := errors.Is(err, ErrUnsupported); got != tc.wantUnsupported {
				t.Errorf("errors.Is(err, ErrUnsupported) = %v, want %v", got, tc.wantUnsupported)
			}
		})
	}
}

func TestHostPathTypes(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close() }()

	tests := []struct {
		name    string
		path    string
		typ     corev1.HostPathType
		wantErr string
	}{
		{name: "unset type, missing path", path: filepath.Join(dir, "nope"), typ: corev1.HostPathUnset},
		{name: "directory", path: dir, typ: corev1.HostPathDirectory},
		{name: "directory missing", path: filepath.Join(dir, "nope"), typ: corev1.HostPathDirectory, wantErr: "no such file"},
		{name: "directory is a file", path: file, typ: corev1.HostPathDirectory, wantErr: "is a file, want Directory"},
		{name: "DirectoryOrCreate on a file", path: file, typ: corev1.HostPathDirectoryOrCreate, wantErr: "not a directory"},
		{name: "file", path: file, typ: corev1.HostPathFile},
		{name: "file is a directory", path: dir, typ: corev1.HostPathFile, wantErr: "is a directory, want File"},
		{name: "FileOrCreate existing", path: file, typ: corev1.HostPathFileOrCreate},
		{name: "FileOrCreate on a directory", path: dir, typ: corev1.HostPathFileOrCreate, wantErr: "is a directory, want FileOrCreate"},
		{name: "FileOrCreate without parent", path: filepath.Join(dir, "no", "file"), typ: corev1.HostPathFileOrCreate, wantErr: "no such file"},
		{name: "socket", path: sock, typ: corev1.HostPathSocket},
		{name: "socket is a file", path: file, typ: corev1.HostPathSocket, wantErr: "is a file, want Socket"},
		{name: "char device", path: "/dev/null", typ: corev1.HostPathCharDev},
		{name: "char device is a directory", path: dir, typ: corev1.HostPathCharDev, wantErr: "is a directory, want CharDevice"},
		{name: "block device is a char device", path: "/dev/null", typ: corev1.HostPathBlockDev, wantErr: "is a character device, want BlockDevice"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := setupHostPath(&corev1.HostPathVolumeSource{Path: tc.path, Type: &tc.typ})
			checkErr(t, err, tc.wantErr)
		})
	}
}

func TestTokenRefreshAt(t *testing.T) {
	resp := func(specSeconds int64, exp time.Duration) *authenticationv1.TokenRequest {
		tr := &authenticationv1.TokenRequest{}
		if specSeconds != 0 {
			tr.Spec.ExpirationSeconds = &specSeconds
		}
		if exp != 0 {
			tr.Status.ExpirationTimestamp = metav1.NewTime(t0.Add(exp))
		}
		return tr
	}
	tests := []struct {
		name      string
		requested int64
		resp      *authenticationv1.TokenRequest
		want      time.Duration // after t0
	}{
		{"an hour: at 48 minutes", 3600, resp(3600, time.Hour), 48 * time.Minute},
		{"kube-api-access 3607s", 3607, resp(3607, 3607*time.Second), 3607 * time.Second * 4 / 5},
		{"shortened by the API server", 7200, resp(600, 10*time.Minute), 8 * time.Minute},
		{"no expiry in the response", 3600, resp(0, 0), 48 * time.Minute},
		{"long token: after a day", 7 * 24 * 3600, resp(7*24*3600, 7*24*time.Hour), 24 * time.Hour},
		{"issued late by the server clock", 3600, resp(3600, time.Hour+time.Minute), 49 * time.Minute},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := tokenRefreshAt(t0, tc.requested, tc.resp); !got.Equal(t0.Add(tc.want)) {
				t.Errorf("refresh at t0+%v, want t0+%v", got.Sub(t0), tc.want)
			}
		})
	}
}

func TestRefresh(t *testing.T) {
	ctx := context.Background()
	pod := testPod()
	pod.Spec.Volumes = []corev1.Volume{
		kubeAPIAccess(),
		{Name: "config", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: "web-config"},
		}}},
		{Name: "flags", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: "flags"}, Optional: ptr.To(true),
		}}},
		{Name: "podinfo", VolumeSource: corev1.VolumeSource{DownwardAPI: &corev1.DownwardAPIVolumeSource{Items: []corev1.DownwardAPIVolumeFile{
			{Path: "labels", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.labels"}},
		}}}},
		{Name: "cache", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
	}
	v, client, ts, clk := newTestVolumes(t, pod,
		configMap("shop", "web-config", map[string]string{"level": "debug"}),
		configMap("shop", "kube-root-ca.crt", map[string]string{"ca.crt": "CA"}),
	)
	if err := v.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	read := func(vol, name string) string {
		t.Helper()
		p, err := v.Path(vol)
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(p, name))
		if err != nil {
			return "<" + err.Error() + ">"
		}
		return string(b)
	}
	refresh := func(wantNext time.Time, wantErr string) {
		t.Helper()
		next, err := v.Refresh(ctx)
		checkErr(t, err, wantErr)
		if !next.Equal(wantNext) {
			t.Errorf("next refresh at t0+%v, want t0+%v", next.Sub(t0), wantNext.Sub(t0))
		}
	}
	tokenDue := t0.Add(3607 * time.Second * 4 / 5)

	// A minute later: ConfigMap changes and a new optional one show up; the
	// token is reused.
	clk.t = t0.Add(time.Minute)
	if _, err := client.CoreV1().ConfigMaps("shop").Update(ctx, configMap("shop", "web-config", map[string]string{"level": "info"}), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.CoreV1().ConfigMaps("shop").Create(ctx, configMap("shop", "flags", map[string]string{"beta": "on"}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	newPod := pod.DeepCopy()
	newPod.Labels["version"] = "2"
	if err := v.UpdatePod(newPod); err != nil {
		t.Fatal(err)
	}
	refresh(clk.t.Add(time.Minute), "")
	if got := read("config", "level"); got != "info" {
		t.Errorf("config/level = %q after the update, want info", got)
	}
	if got := read("flags", "beta"); got != "on" {
		t.Errorf("flags/beta = %q after the optional ConfigMap appeared, want on", got)
	}
	if got, want := read("podinfo", "labels"), "app=\"web\"\ntier=\"front\"\nversion=\"2\""; got != want {
		t.Errorf("podinfo/labels = %q, want %q", got, want)
	}
	if len(ts.requests) != 1 {
		t.Errorf("%d token requests, want 1: the token is not due", len(ts.requests))
	}

	// Close to the token's refresh time, Refresh asks to be called then.
	clk.t = tokenDue.Add(-30 * time.Second)
	refresh(tokenDue, "")

	// At 80% of its lifetime the token is requested again.
	clk.t = tokenDue
	refresh(tokenDue.Add(time.Minute), "")
	if len(ts.requests) != 2 {
		t.Fatalf("%d token requests, want 2", len(ts.requests))
	}
	if got := read("kube-api-access", "token"); got != "token-2" {
		t.Errorf("token = %q, want the new token-2", got)
	}

	// A deleted required ConfigMap: the old files stay, the error names
	// it, and Refresh wants to retry soon. A deleted optional one empties
	// its volume.
	for _, name := range []string{"web-config", "flags"} {
		if err := client.CoreV1().ConfigMaps("shop").Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	clk.t = tokenDue.Add(time.Minute)
	refresh(clk.t.Add(retryPeriod), `volume "config": ConfigMap shop/web-config not found`)
	if got := read("config", "level"); got != "info" {
		t.Errorf("config/level = %q after the ConfigMap was deleted, want the old info", got)
	}
	if p, _ := v.Path("flags"); len(tree(t, p)) != 0 {
		t.Errorf("flags = %v after the optional ConfigMap was deleted, want empty", tree(t, p))
	}

	// A failed token request keeps the old token and retries soon.
	if _, err := client.CoreV1().ConfigMaps("shop").Create(ctx, configMap("shop", "web-config", nil), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ts.fail = errors.New("apiserver down")
	clk.t = tokenDue.Add(24 * time.Hour)
	refresh(clk.t.Add(retryPeriod), "apiserver down")
	if got := read("kube-api-access", "token"); got != "token-2" {
		t.Errorf("token = %q after a failed request, want the old token-2", got)
	}
}

func TestUpdatePodOtherUID(t *testing.T) {
	v, _, _, _ := newTestVolumes(t, testPod())
	other := testPod()
	other.UID = "another"
	if err := v.UpdatePod(other); err == nil {
		t.Error("UpdatePod accepted a pod with another UID")
	}
}

func TestPath(t *testing.T) {
	pod := testPod()
	pod.Spec.Volumes = []corev1.Volume{
		{Name: "cache", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
		{Name: "host", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/var/log"}}},
		{Name: "config", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{}}},
		{Name: "data", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{}}},
	}
	v := NewVolumes(nil, "/var/lib/lab/pods", pod, nil)
	tests := []struct {
		name, volume, want string
		wantErr            error
	}{
		{name: "emptyDir", volume: "cache", want: "/var/lib/lab/pods/" + string(pod.UID) + "/volumes/cache"},
		{name: "configMap", volume: "config", want: "/var/lib/lab/pods/" + string(pod.UID) + "/volumes/config"},
		{name: "hostPath as is", volume: "host", want: "/var/log"},
		{name: "unknown volume", volume: "nope", wantErr: ErrNoVolume},
		{name: "unsupported volume", volume: "data", wantErr: ErrUnsupported},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := v.Path(tc.volume)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Path(%s) error = %v, want %v", tc.volume, err, tc.wantErr)
			}
			if got != tc.want {
				t.Errorf("Path(%s) = %q, want %q", tc.volume, got, tc.want)
			}
		})
	}
}

func TestMounts(t *testing.T) {
	host := t.TempDir()
	outside := t.TempDir()
	pod := testPod()
	pod.Spec.Volumes = []corev1.Volume{
		{Name: "cache", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
		{Name: "config", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: "web-config"},
			Items:                []corev1.KeyToPath{{Key: "app.yaml", Path: "conf/app.yaml"}},
		}}},
		{Name: "host", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: host}}},
		kubeAPIAccess(),
	}
	v, _, _, _ := newTestVolumes(t, pod,
		configMap("shop", "web-config", map[string]string{"app.yaml": "port: 80"}),
		configMap("shop", "kube-root-ca.crt", map[string]string{"ca.crt": "CA"}),
	)
	if err := v.Setup(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(host, "escape")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(host, "real"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("real", filepath.Join(host, "inside")); err != nil {
		t.Fatal(err)
	}
	vol := func(name string) string {
		p, err := v.Path(name)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	cache, config := vol("cache"), vol("config")

	tests := []struct {
		name    string
		c       corev1.Container
		env     []string
		want    []Mount
		wantErr string
		wantIs  error
		check   func(t *testing.T)
	}{
		{
			name: "whole volumes",
			c: corev1.Container{VolumeMounts: []corev1.VolumeMount{
				{Name: "cache", MountPath: "/cache"},
				{Name: "host", MountPath: "/host", ReadOnly: true},
				{Name: "kube-api-access", MountPath: "/var/run/secrets/kubernetes.io/serviceaccount"},
			}},
			want: []Mount{
				{Source: cache, Target: "/cache"},
				{Source: host, Target: "/host", ReadOnly: true},
				{Source: vol("kube-api-access"), Target: "/var/run/secrets/kubernetes.io/serviceaccount", ReadOnly: true},
			},
		},
		{
			name: "configMap always read-only",
			c:    corev1.Container{VolumeMounts: []corev1.VolumeMount{{Name: "config", MountPath: "/etc/app"}}},
			want: []Mount{{Source: config, Target: "/etc/app", ReadOnly: true}},
		},
		{
			name: "subPath to a file",
			c:    corev1.Container{VolumeMounts: []corev1.VolumeMount{{Name: "config", MountPath: "/etc/app.yaml", SubPath: "conf/app.yaml"}}},
			want: []Mount{{Source: filepath.Join(config, "conf", "app.yaml"), Target: "/etc/app.yaml", ReadOnly: true}},
		},
		{
			name: "subPath to a missing directory creates it",
			c:    corev1.Container{VolumeMounts: []corev1.VolumeMount{{Name: "cache", MountPath: "/data", SubPath: "a/b"}}},
			want: []Mount{{Source: filepath.Join(cache, "a", "b"), Target: "/data"}},
			check: func(t *testing.T) {
				st, err := os.Stat(filepath.Join(cache, "a", "b"))
				if err != nil || !st.IsDir() || st.Mode().Perm() != 0o777&^umask(t) {
					t.Errorf("subPath dir: %v %v, want a directory with the volume's mode", st.Mode(), err)
				}
			},
		},
		{
			name: "subPath through a symlink inside the volume",
			c:    corev1.Container{VolumeMounts: []corev1.VolumeMount{{Name: "host", MountPath: "/x", SubPath: "inside"}}},
			want: []Mount{{Source: filepath.Join(host, "real"), Target: "/x"}},
		},
		{
			name:    "subPath through a symlink out of the volume",
			c:       corev1.Container{VolumeMounts: []corev1.VolumeMount{{Name: "host", MountPath: "/x", SubPath: "escape"}}},
			wantErr: "outside the volume",
		},
		{
			name:    "subPath with backsteps",
			c:       corev1.Container{VolumeMounts: []corev1.VolumeMount{{Name: "cache", MountPath: "/x", SubPath: "a/../../b"}}},
			wantErr: "must not contain '..'",
		},
		{
			name:    "absolute subPath",
			c:       corev1.Container{VolumeMounts: []corev1.VolumeMount{{Name: "cache", MountPath: "/x", SubPath: "/etc"}}},
			wantErr: "must not be an absolute path",
		},
		{
			name: "subPathExpr",
			c:    corev1.Container{VolumeMounts: []corev1.VolumeMount{{Name: "cache", MountPath: "/logs", SubPathExpr: "logs/$(POD_NAME)"}}},
			env:  []string{"POD_NAME=web-0"},
			want: []Mount{{Source: filepath.Join(cache, "logs", "web-0"), Target: "/logs"}},
		},
		{
			name:    "subPathExpr with an unset variable",
			c:       corev1.Container{VolumeMounts: []corev1.VolumeMount{{Name: "cache", MountPath: "/logs", SubPathExpr: "$(B)/$(A)/$(POD_NAME)"}}},
			env:     []string{"POD_NAME=web-0", "A="},
			wantErr: "missing value for A, B",
		},
		{
			name:    "subPathExpr needs MountsWithEnv",
			c:       corev1.Container{VolumeMounts: []corev1.VolumeMount{{Name: "cache", MountPath: "/logs", SubPathExpr: "$(POD_NAME)"}}},
			wantErr: "missing value for POD_NAME",
		},
		{
			name:    "subPathExpr expanding to backsteps",
			c:       corev1.Container{VolumeMounts: []corev1.VolumeMount{{Name: "cache", MountPath: "/logs", SubPathExpr: "$(D)"}}},
			env:     []string{"D=.."},
			wantErr: "must not contain '..'",
		},
		{
			name:   "unknown volume",
			c:      corev1.Container{Name: "app", VolumeMounts: []corev1.VolumeMount{{Name: "nope", MountPath: "/x"}}},
			wantIs: ErrNoVolume, wantErr: `container "app": volume "nope"`,
		},
		{
			name:   "volumeDevices",
			c:      corev1.Container{VolumeDevices: []corev1.VolumeDevice{{Name: "cache", DevicePath: "/dev/xvda"}}},
			wantIs: ErrUnsupported, wantErr: "volumeDevices",
		},
		{name: "no mounts", want: []Mount{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := v.MountsWithEnv(&tc.c, tc.env)
			checkErr(t, err, tc.wantErr)
			if tc.wantIs != nil && !errors.Is(err, tc.wantIs) {
				t.Errorf("error %v is not %v", err, tc.wantIs)
			}
			if err != nil {
				return
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("mounts = %+v, want %+v", got, tc.want)
			}
			if tc.check != nil {
				tc.check(t)
			}
		})
	}

	// Mounts is MountsWithEnv without an environment.
	got, err := v.Mounts(&corev1.Container{VolumeMounts: []corev1.VolumeMount{{Name: "cache", MountPath: "/c"}}})
	if err != nil || len(got) != 1 || got[0].Source != cache {
		t.Errorf("Mounts = %+v, %v", got, err)
	}
}

// umask is the test process's umask, which MkdirAll applies.
func umask(t *testing.T) os.FileMode {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "umask-probe")
	if err := os.Mkdir(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	return 0o777 &^ st.Mode().Perm()
}

func TestCleanup(t *testing.T) {
	host := t.TempDir()
	pod := testPod()
	pod.Spec.Volumes = []corev1.Volume{
		{Name: "cache", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
		{Name: "host", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: host}}},
	}
	v, _, _, _ := newTestVolumes(t, pod)
	if err := v.Setup(context.Background()); err != nil {
		t.Fatal(err)
	}
	cache, _ := v.Path("cache")
	if err := os.WriteFile(filepath.Join(cache, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := v.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Dir(filepath.Dir(cache))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pod directory still there: %v", err)
	}
	if _, err := os.Stat(host); err != nil {
		t.Errorf("hostPath removed: %v", err)
	}
	if err := v.Cleanup(); err != nil {
		t.Errorf("second Cleanup: %v", err)
	}
}
