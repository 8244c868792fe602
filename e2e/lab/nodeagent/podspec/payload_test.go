package podspec

import (
	"maps"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

func f(data string, mode int32) file { return file{data: []byte(data), mode: mode} }

func samePayload(a, b payload) bool {
	return maps.EqualFunc(a, b, func(x, y file) bool { return string(x.data) == string(y.data) && x.mode == y.mode })
}

func TestConfigMapPayload(t *testing.T) {
	cm := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "web-config"},
		Data:       map[string]string{"app.yaml": "port: 80", "level": "debug"},
		BinaryData: map[string][]byte{"logo.png": {0x89, 'P', 'N', 'G'}},
	}
	tests := []struct {
		name     string
		items    []corev1.KeyToPath
		optional bool
		want     payload
		wantErr  string
	}{
		{
			name: "all keys, data and binary data",
			want: payload{"app.yaml": f("port: 80", 0o644), "level": f("debug", 0o644), "logo.png": f("\x89PNG", 0o644)},
		},
		{
			name:  "items map keys to paths",
			items: []corev1.KeyToPath{{Key: "app.yaml", Path: "conf/app.yaml"}, {Key: "logo.png", Path: "static/logo"}},
			want:  payload{"conf/app.yaml": f("port: 80", 0o644), "static/logo": f("\x89PNG", 0o644)},
		},
		{
			name:  "item mode overrides the default",
			items: []corev1.KeyToPath{{Key: "level", Path: "level", Mode: ptr.To[int32](0o400)}, {Key: "app.yaml", Path: "app.yaml"}},
			want:  payload{"level": f("debug", 0o400), "app.yaml": f("port: 80", 0o644)},
		},
		{
			name:    "missing item key is an error",
			items:   []corev1.KeyToPath{{Key: "nope", Path: "nope"}},
			wantErr: `ConfigMap shop/web-config has no key "nope"`,
		},
		{
			name:     "missing item key skipped when optional",
			items:    []corev1.KeyToPath{{Key: "nope", Path: "nope"}, {Key: "level", Path: "l"}},
			optional: true,
			want:     payload{"l": f("debug", 0o644)},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := configMapPayload(tc.items, cm, 0o644, tc.optional)
			checkErr(t, err, tc.wantErr)
			if err == nil && !samePayload(got, tc.want) {
				t.Errorf("payload = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestSecretPayload(t *testing.T) {
	s := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "tls"},
		Data:       map[string][]byte{"tls.crt": []byte("CERT"), "tls.key": []byte("KEY")},
	}
	tests := []struct {
		name     string
		items    []corev1.KeyToPath
		mode     int32
		optional bool
		want     payload
		wantErr  string
	}{
		{
			name: "all keys with the default mode", mode: 0o440,
			want: payload{"tls.crt": f("CERT", 0o440), "tls.key": f("KEY", 0o440)},
		},
		{
			name: "items and modes", mode: 0o644,
			items: []corev1.KeyToPath{{Key: "tls.key", Path: "private/key.pem", Mode: ptr.To[int32](0o600)}},
			want:  payload{"private/key.pem": f("KEY", 0o600)},
		},
		{
			name: "missing key", mode: 0o644,
			items:   []corev1.KeyToPath{{Key: "ca.crt", Path: "ca.crt"}},
			wantErr: `secret shop/tls has no key "ca.crt"`,
		},
		{
			name: "missing key, optional", mode: 0o644, optional: true,
			items: []corev1.KeyToPath{{Key: "ca.crt", Path: "ca.crt"}},
			want:  payload{},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := secretPayload(tc.items, s, tc.mode, tc.optional)
			checkErr(t, err, tc.wantErr)
			if err == nil && !samePayload(got, tc.want) {
				t.Errorf("payload = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestDownwardAPIPayload(t *testing.T) {
	field := func(p, fp string) corev1.DownwardAPIVolumeFile {
		return corev1.DownwardAPIVolumeFile{Path: p, FieldRef: &corev1.ObjectFieldSelector{FieldPath: fp}}
	}
	tests := []struct {
		name    string
		items   []corev1.DownwardAPIVolumeFile
		want    payload
		wantErr string
	}{
		{
			name: "metadata fields",
			items: []corev1.DownwardAPIVolumeFile{
				field("name", "metadata.name"),
				field("namespace", "metadata.namespace"),
				field("uid", "metadata.uid"),
				field("labels", "metadata.labels"),
				field("meta/annotations", "metadata.annotations"),
				field("app", "metadata.labels['app']"),
			},
			want: payload{
				"name":             f("web-0", 0o644),
				"namespace":        f("shop", 0o644),
				"uid":              f("4f9d2c1e-0000-4000-8000-000000000001", 0o644),
				"labels":           f("app=\"web\"\ntier=\"front\"", 0o644),
				"meta/annotations": f("example.com/owner=\"team-a\"\nnote=\"say \\\"hi\\\"\\n\"", 0o644),
				"app":              f("web", 0o644),
			},
		},
		{
			name:  "item mode",
			items: []corev1.DownwardAPIVolumeFile{{Path: "name", Mode: ptr.To[int32](0o400), FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
			want:  payload{"name": f("web-0", 0o400)},
		},
		{
			name: "resource field of a named container",
			items: []corev1.DownwardAPIVolumeFile{{Path: "cpu", ResourceFieldRef: &corev1.ResourceFieldSelector{
				ContainerName: "app", Resource: "limits.cpu", Divisor: resource.MustParse("1m"),
			}}},
			want: payload{"cpu": f("1500", 0o644)},
		},
		{
			name:    "bad field names the file",
			items:   []corev1.DownwardAPIVolumeFile{field("x", "spec.nope")},
			wantErr: "downward API file x: fieldRef spec.nope: unsupported field",
		},
		{
			name:    "empty item",
			items:   []corev1.DownwardAPIVolumeFile{{Path: "x"}},
			wantErr: "neither fieldRef nor resourceFieldRef",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := downwardAPIPayload(tc.items, testPod(), 0o644, nil)
			checkErr(t, err, tc.wantErr)
			if err == nil && !samePayload(got, tc.want) {
				t.Errorf("payload = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestCleanPayload(t *testing.T) {
	tests := []struct {
		name    string
		paths   []string
		want    []string
		wantErr string
	}{
		{name: "plain", paths: []string{"a", "b/c"}, want: []string{"a", "b/c"}},
		{name: "cleaned", paths: []string{"./a", "b//c", "d/./e/"}, want: []string{"a", "b/c", "d/e"}},
		{name: "dot files allowed", paths: []string{".hidden", "a/..b"}, want: []string{".hidden", "a/..b"}},
		{name: "empty", paths: []string{""}, wantErr: "empty path"},
		{name: "absolute", paths: []string{"/etc/passwd"}, wantErr: "must be relative"},
		{name: "backstep", paths: []string{"a/../../b"}, wantErr: "must not contain '..'"},
		{name: "leading dot-dot name", paths: []string{"..data"}, wantErr: "must not start with '..'"},
		{name: "the volume itself", paths: []string{"a/.."}, wantErr: "must not contain '..'"},
		{name: "dot", paths: []string{"."}, wantErr: "names the volume itself"},
		{name: "file and directory at once", paths: []string{"a", "a/b"}, wantErr: `path "a" is a file and the directory of "a/b"`},
		{name: "long element", paths: []string{strings.Repeat("x", 256)}, wantErr: "longer than 255"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := payload{}
			for _, name := range tc.paths {
				p[name] = f("x", 0o644)
			}
			got, err := cleanPayload(p)
			checkErr(t, err, tc.wantErr)
			if err != nil {
				return
			}
			want := payload{}
			for _, name := range tc.want {
				want[name] = f("x", 0o644)
			}
			if !samePayload(got, want) {
				t.Errorf("cleanPayload = %v, want paths %q", got, tc.want)
			}
		})
	}
}
