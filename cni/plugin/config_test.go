package plugin

import (
	"errors"
	"net/netip"
	"slices"
	"testing"

	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/ambitmesh/ambit/cni"
)

func TestParseConfig(t *testing.T) {
	tests := []struct {
		name    string
		stdin   string
		want    cni.PluginConfig
		prev    bool // a prevResult was parsed
		wantErr bool
	}{
		{
			name:  "defaults",
			stdin: `{"cniVersion":"1.0.0","name":"lab","type":"ambit-cni"}`,
			want:  cni.PluginConfig{AgentSocket: cni.DefaultAgentSocket, TimeoutSeconds: cni.DefaultTimeoutSeconds},
		},
		{
			name: "every field",
			stdin: `{"cniVersion":"1.0.0","name":"lab","type":"ambit-cni","agent_socket":"/run/x/agent.sock","timeout_seconds":5,` +
				`"log_level":"debug","log_file":"/var/log/ambit-cni.log","exclude_namespaces":["kube-system"]}`,
			want: cni.PluginConfig{AgentSocket: "/run/x/agent.sock", TimeoutSeconds: 5, LogLevel: "debug",
				LogFile: "/var/log/ambit-cni.log", ExcludeNamespaces: []string{"kube-system"}},
		},
		{
			name: "unknown fields are ignored",
			stdin: `{"cniVersion":"1.0.0","name":"lab","type":"ambit-cni","runtimeConfig":{"portMappings":[]},` +
				`"args":{"cni":{"x":1}},"converted_from":"10-bridge.conf"}`,
			want: cni.PluginConfig{AgentSocket: cni.DefaultAgentSocket, TimeoutSeconds: cni.DefaultTimeoutSeconds},
		},
		{
			name:  "prevResult 1.0.0",
			stdin: string(stdin("1.0.0", "", prevResults["1.0.0"])),
			want:  cni.PluginConfig{AgentSocket: cni.DefaultAgentSocket, TimeoutSeconds: cni.DefaultTimeoutSeconds},
			prev:  true,
		},
		{
			name:  "prevResult 0.4.0",
			stdin: string(stdin("0.4.0", "", prevResults["0.4.0"])),
			want:  cni.PluginConfig{AgentSocket: cni.DefaultAgentSocket, TimeoutSeconds: cni.DefaultTimeoutSeconds},
			prev:  true,
		},
		{name: "not JSON", stdin: `{"cniVersion":`, wantErr: true},
		{name: "relative socket", stdin: `{"cniVersion":"1.0.0","name":"lab","type":"ambit-cni","agent_socket":"run/cni.sock"}`, wantErr: true},
		{name: "negative timeout", stdin: `{"cniVersion":"1.0.0","name":"lab","type":"ambit-cni","timeout_seconds":-1}`, wantErr: true},
		{name: "timeout not a number", stdin: `{"cniVersion":"1.0.0","name":"lab","type":"ambit-cni","timeout_seconds":"30"}`, wantErr: true},
		{name: "bad prevResult", stdin: `{"cniVersion":"1.0.0","name":"lab","type":"ambit-cni","prevResult":{"ips":[{"address":"not-an-ip"}]}}`, wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			conf, err := parseConfig([]byte(tc.stdin))
			if tc.wantErr {
				if !errors.Is(err, ErrInvalidConfig) {
					t.Fatalf("err = %v, want ErrInvalidConfig", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := conf.PluginConfig; got.AgentSocket != tc.want.AgentSocket || got.TimeoutSeconds != tc.want.TimeoutSeconds ||
				got.LogLevel != tc.want.LogLevel || got.LogFile != tc.want.LogFile || !slices.Equal(got.ExcludeNamespaces, tc.want.ExcludeNamespaces) {
				t.Errorf("config = %+v, want %+v", got, tc.want)
			}
			if got := conf.PrevResult != nil; got != tc.prev {
				t.Errorf("prevResult parsed = %v, want %v", got, tc.prev)
			}
			if conf.RawPrevResult != nil {
				t.Error("RawPrevResult left set")
			}
		})
	}
}

func TestParseCNIArgs(t *testing.T) {
	tests := []struct {
		name string
		args string
		want podArgs
	}{
		{
			name: "containerd",
			args: podCNIArgs,
			want: podArgs{Namespace: "default", Name: "web-1", UID: "0b9f3c1e-4a51-4c1e-9a53-2c7d1f1e8a11", InfraContainerID: "5c0e0c4d1a"},
		},
		{
			name: "no UID (older runtimes)",
			args: "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-0;K8S_POD_INFRA_CONTAINER_ID=abc",
			want: podArgs{Namespace: "kube-system", Name: "coredns-0", InfraContainerID: "abc"},
		},
		{
			name: "unknown keys without IgnoreUnknown are ignored",
			args: "FOO=bar;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1",
			want: podArgs{Namespace: "default", Name: "web-1"},
		},
		{
			name: "value containing =",
			args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=a=b",
			want: podArgs{Namespace: "default", Name: "a=b"},
		},
		{
			name: "malformed pair is skipped",
			args: "garbage;K8S_POD_NAMESPACE=default;;K8S_POD_NAME=web-1",
			want: podArgs{Namespace: "default", Name: "web-1"},
		},
		{name: "empty", args: "", want: podArgs{}},
		{name: "not Kubernetes", args: "IgnoreUnknown=1", want: podArgs{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := parseCNIArgs(tc.args)
			if got != tc.want {
				t.Errorf("parseCNIArgs(%q) = %+v, want %+v", tc.args, got, tc.want)
			}
			if wantK8s := tc.want.Namespace != "" && tc.want.Name != ""; got.isKubernetes() != wantK8s {
				t.Errorf("isKubernetes = %v, want %v", got.isKubernetes(), wantK8s)
			}
		})
	}
}

func TestPodIPs(t *testing.T) {
	tests := []struct {
		name    string
		version string
		want    []string
	}{
		{name: "0.3.1 IPv4", version: "0.3.1", want: []string{"10.244.1.5"}},
		{name: "0.4.0 dual stack", version: "0.4.0", want: []string{"10.244.1.5", "fd00:10:244:1::5"}},
		{name: "1.0.0 dual stack", version: "1.0.0", want: []string{"10.244.1.5", "fd00:10:244:1::5"}},
		{name: "1.1.0", version: "1.1.0", want: []string{"10.244.1.5"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			conf, err := parseConfig(stdin(tc.version, "", prevResults[tc.version]))
			if err != nil {
				t.Fatal(err)
			}
			ips, err := podIPs(conf.PrevResult)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, ip := range ips {
				got = append(got, ip.String())
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("podIPs = %v, want %v", got, tc.want)
			}
		})
	}
	t.Run("duplicates and none", func(t *testing.T) {
		res := &current.Result{CNIVersion: "1.0.0"}
		ips, err := podIPs(res)
		if err != nil || ips == nil || len(ips) != 0 {
			t.Fatalf("podIPs(no IPs) = %#v, %v; want empty, non-nil", ips, err)
		}
		conf, err := parseConfig(stdin("1.0.0", "", `{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.1/24"},{"address":"10.0.0.1/32"}]}`))
		if err != nil {
			t.Fatal(err)
		}
		ips, err = podIPs(conf.PrevResult)
		if err != nil {
			t.Fatal(err)
		}
		if want := []netip.Addr{netip.MustParseAddr("10.0.0.1")}; !slices.Equal(ips, want) {
			t.Errorf("podIPs = %v, want %v", ips, want)
		}
	})
}
