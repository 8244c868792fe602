package podspec

import (
	"context"
	"errors"
	"maps"
	"os"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/utils/ptr"
)

func fieldEnv(name, path string) corev1.EnvVar {
	return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{APIVersion: "v1", FieldPath: path}}}
}

func resourceEnv(name, res, divisor string) corev1.EnvVar {
	return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{
		Resource: res, Divisor: resource.MustParse(divisor),
	}}}
}

func cmKeyEnv(name, cm, key string, optional *bool) corev1.EnvVar {
	return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{
		LocalObjectReference: corev1.LocalObjectReference{Name: cm}, Key: key, Optional: optional,
	}}}
}

func secretKeyEnv(name, s, key string, optional *bool) corev1.EnvVar {
	return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{
		LocalObjectReference: corev1.LocalObjectReference{Name: s}, Key: key, Optional: optional,
	}}}
}

func envObjects() []runtime.Object {
	return []runtime.Object{
		configMap("shop", "app-env", map[string]string{"B": "from-cm", "LEVEL": "debug"}),
		secret("shop", "creds", map[string]string{"USER": "u", "PASS": "p"}),
		&corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: "lab-node-1"},
			Status: corev1.NodeStatus{Allocatable: corev1.ResourceList{
				corev1.ResourceEphemeralStorage: resource.MustParse("20Gi"),
			}},
		},
	}
}

func envServices() []*corev1.Service {
	return []*corev1.Service{
		svc("default", "kubernetes", "10.96.0.1", port("https", 443, corev1.ProtocolTCP)),
		svc("shop", "web", "10.96.0.20", port("", 80, "")),
	}
}

var webVars = []string{
	"WEB_SERVICE_HOST=10.96.0.20",
	"WEB_SERVICE_PORT=80",
	"WEB_PORT=tcp://10.96.0.20:80",
	"WEB_PORT_80_TCP=tcp://10.96.0.20:80",
	"WEB_PORT_80_TCP_PROTO=tcp",
	"WEB_PORT_80_TCP_PORT=80",
	"WEB_PORT_80_TCP_ADDR=10.96.0.20",
}

func TestEnv(t *testing.T) {
	t.Setenv("PATH", "/test/bin:/usr/bin")
	pod := testPod()
	c := &pod.Spec.Containers[0]
	c.EnvFrom = []corev1.EnvFromSource{
		{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "app-env"}}},
		{Prefix: "DB_", SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "creds"}}},
		{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "absent"}, Optional: ptr.To(true)}},
	}
	c.Env = []corev1.EnvVar{
		{Name: "LEVEL", Value: "trace"},
		fieldEnv("POD_NAME", "metadata.name"),
		fieldEnv("POD_NS", "metadata.namespace"),
		fieldEnv("POD_UID", "metadata.uid"),
		fieldEnv("APP", "metadata.labels['app']"),
		fieldEnv("OWNER", "metadata.annotations['example.com/owner']"),
		fieldEnv("NODE", "spec.nodeName"),
		fieldEnv("SA", "spec.serviceAccountName"),
		fieldEnv("HOST_IP", "status.hostIP"),
		fieldEnv("HOST_IPS", "status.hostIPs"),
		fieldEnv("POD_IP", "status.podIP"),
		fieldEnv("POD_IPS", "status.podIPs"),
		resourceEnv("CPU_MILLIS", "limits.cpu", "1m"),
		resourceEnv("DISK_GI", "limits.ephemeral-storage", "1Gi"),
		cmKeyEnv("CM_KEY", "app-env", "B", nil),
		cmKeyEnv("CM_KEY_AGAIN", "app-env", "LEVEL", nil),
		cmKeyEnv("OPT_KEY", "app-env", "nope", ptr.To(true)),
		cmKeyEnv("OPT_CM", "absent", "x", ptr.To(true)),
		secretKeyEnv("SECRET_KEY", "creds", "PASS", nil),
		secretKeyEnv("OPT_SECRET", "absent", "x", ptr.To(true)),
		{Name: "URL", Value: "http://$(POD_NAME).$(POD_NS):$(KUBERNETES_SERVICE_PORT)/$(LATER)$$(POD_NAME)$(DB_USER)"},
		{Name: "LATER", Value: "x"},
		{Name: "EMPTY"},
	}
	client := fake.NewClientset(envObjects()...)

	got, err := Env(context.Background(), client, pod, c, envServices(), "192.168.1.10")
	if err != nil {
		t.Fatal(err)
	}
	want := slices.Concat([]string{
		"B=from-cm",
		"LEVEL=trace",
		"DB_PASS=p",
		"DB_USER=u",
		"POD_NAME=web-0",
		"POD_NS=shop",
		"POD_UID=4f9d2c1e-0000-4000-8000-000000000001",
		"APP=web",
		"OWNER=team-a",
		"NODE=lab-node-1",
		"SA=web",
		"HOST_IP=192.168.1.10",
		"HOST_IPS=192.168.1.10",
		"POD_IP=10.244.1.7",
		"POD_IPS=10.244.1.7,fd00:10:244::7",
		"CPU_MILLIS=1500",
		"DISK_GI=20",
		"CM_KEY=from-cm",
		"CM_KEY_AGAIN=debug",
		"SECRET_KEY=p",
		"URL=http://web-0.shop:443/$(LATER)$(POD_NAME)u",
		"LATER=x",
		"EMPTY=",
	}, kubernetesVars, webVars, []string{
		"HOSTNAME=web-0",
		"PATH=/test/bin:/usr/bin",
	})
	if !slices.Equal(got, want) {
		t.Errorf("Env =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	// The Node authorizer allows single Gets. An object that exists is read
	// once; a missing one is asked for again, as kubelet does.
	gets := map[string]int{}
	for _, a := range client.Actions() {
		if a.GetVerb() != "get" {
			t.Errorf("Env did %s %s; the node may only get", a.GetVerb(), a.GetResource().Resource)
		}
		gets[a.GetResource().Resource]++
	}
	if want := map[string]int{"configmaps": 3, "secrets": 2, "nodes": 1}; !maps.Equal(gets, want) {
		t.Errorf("gets = %v, want %v (app-env, absent twice; creds, absent; the node)", gets, want)
	}
}

func TestEnvCases(t *testing.T) {
	t.Setenv("PATH", "/host/bin")
	hostname, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		pod      func(*corev1.Pod)
		env      []corev1.EnvVar
		envFrom  []corev1.EnvFromSource
		objects  []runtime.Object
		want     []string // the whole environment
		contains []string // or some of it
		wantErr  string
		wantIs   error
	}{
		{
			name: "no service links: only the kubernetes service",
			pod:  func(p *corev1.Pod) { p.Spec.EnableServiceLinks = ptr.To(false) },
			want: slices.Concat(kubernetesVars, []string{"HOSTNAME=web-0", "PATH=/host/bin"}),
		},
		{
			name: "service links explicitly on",
			pod:  func(p *corev1.Pod) { p.Spec.EnableServiceLinks = ptr.To(true) },
			want: slices.Concat(kubernetesVars, webVars, []string{"HOSTNAME=web-0", "PATH=/host/bin"}),
		},
		{
			name: "pod's HOSTNAME, PATH and service variable win",
			pod:  func(p *corev1.Pod) { p.Spec.EnableServiceLinks = ptr.To(false) },
			env: []corev1.EnvVar{
				{Name: "PATH", Value: "/app/bin"},
				{Name: "HOSTNAME", Value: "custom"},
				{Name: "KUBERNETES_SERVICE_HOST", Value: "apiserver.local"},
			},
			want: slices.Concat(
				[]string{"PATH=/app/bin", "HOSTNAME=custom", "KUBERNETES_SERVICE_HOST=apiserver.local"},
				kubernetesVars[1:],
			),
		},
		{
			name:     "spec.hostname",
			pod:      func(p *corev1.Pod) { p.Spec.Hostname = "front" },
			contains: []string{"HOSTNAME=front"},
		},
		{
			name:     "host network uses the node's hostname",
			pod:      func(p *corev1.Pod) { p.Spec.HostNetwork = true },
			contains: []string{"HOSTNAME=" + hostname},
		},
		{
			name:     "expansion sees service variables and earlier env",
			env:      []corev1.EnvVar{{Name: "A", Value: "a"}, {Name: "ADDR", Value: "$(WEB_SERVICE_HOST):$(A)$(B)"}, {Name: "B", Value: "b"}},
			contains: []string{"ADDR=10.96.0.20:a$(B)"},
		},
		{
			name:     "expansion sees envFrom",
			envFrom:  []corev1.EnvFromSource{{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "app-env"}}}},
			env:      []corev1.EnvVar{{Name: "X", Value: "$(B)-$(LEVEL)"}},
			contains: []string{"X=from-cm-debug"},
		},
		{
			name: "later envFrom overwrites an earlier one",
			envFrom: []corev1.EnvFromSource{
				{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "app-env"}}},
				{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "more"}}},
			},
			objects:  []runtime.Object{configMap("shop", "more", map[string]string{"B": "from-more"})},
			contains: []string{"B=from-more", "LEVEL=debug"},
		},
		{
			name:     "limit set: the node is not needed",
			env:      []corev1.EnvVar{resourceEnv("CPU", "limits.cpu", "1")},
			objects:  []runtime.Object{}, // no node
			contains: []string{"CPU=2"},
		},
		{
			name:    "limit unset and no node",
			env:     []corev1.EnvVar{resourceEnv("DISK", "limits.ephemeral-storage", "1")},
			objects: []runtime.Object{},
			wantErr: "env DISK: getting node lab-node-1 for its allocatable resources",
		},
		{
			name:    "missing ConfigMap in envFrom",
			envFrom: []corev1.EnvFromSource{{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "absent"}}}},
			wantErr: "envFrom: ConfigMap shop/absent not found and not marked optional",
		},
		{
			name:    "missing Secret in envFrom",
			envFrom: []corev1.EnvFromSource{{SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "absent"}}}},
			wantErr: "envFrom: secret shop/absent not found",
		},
		{
			name:    "missing ConfigMap key",
			env:     []corev1.EnvVar{cmKeyEnv("X", "app-env", "nope", nil)},
			wantErr: `env X: ConfigMap shop/app-env has no key "nope"`,
		},
		{
			name:    "missing Secret key",
			env:     []corev1.EnvVar{secretKeyEnv("X", "creds", "nope", ptr.To(false))},
			wantErr: `env X: secret shop/creds has no key "nope"`,
		},
		{
			name:    "missing Secret",
			env:     []corev1.EnvVar{secretKeyEnv("X", "absent", "k", nil)},
			wantErr: "env X: secret shop/absent not found and not marked optional",
		},
		{
			name: "optional then required reference to a missing ConfigMap",
			env: []corev1.EnvVar{
				cmKeyEnv("X", "absent", "k", ptr.To(true)),
				cmKeyEnv("Y", "absent", "k", nil),
			},
			wantErr: "env Y: ConfigMap shop/absent not found",
		},
		{
			name:    "bad fieldRef",
			env:     []corev1.EnvVar{fieldEnv("X", "spec.nope")},
			wantErr: "env X: fieldRef spec.nope: unsupported field",
		},
		{
			name: "fileKeyRef refused",
			env: []corev1.EnvVar{{Name: "X", ValueFrom: &corev1.EnvVarSource{FileKeyRef: &corev1.FileKeySelector{
				VolumeName: "cache", Path: "env", Key: "X",
			}}}},
			wantErr: "env X: fileKeyRef", wantIs: ErrUnsupported,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pod := testPod()
			if tc.pod != nil {
				tc.pod(pod)
			}
			c := &pod.Spec.Containers[0]
			c.Env, c.EnvFrom = tc.env, tc.envFrom
			objects := tc.objects
			if objects == nil {
				objects = envObjects()
			} else {
				objects = append(objects, envObjects()[:2]...)
			}
			got, err := Env(context.Background(), fake.NewClientset(objects...), pod, c, envServices(), "192.168.1.10")
			checkErr(t, err, tc.wantErr)
			if tc.wantIs != nil && !errors.Is(err, tc.wantIs) {
				t.Errorf("error %v is not %v", err, tc.wantIs)
			}
			if err != nil {
				return
			}
			if tc.want != nil && !slices.Equal(got, tc.want) {
				t.Errorf("Env =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
			for _, w := range tc.contains {
				if !slices.Contains(got, w) {
					t.Errorf("Env lacks %q:\n%s", w, strings.Join(got, "\n"))
				}
			}
			names := map[string]bool{}
			for _, kv := range got {
				name, _, _ := strings.Cut(kv, "=")
				if names[name] {
					t.Errorf("%s set twice", name)
				}
				names[name] = true
			}
		})
	}
}
