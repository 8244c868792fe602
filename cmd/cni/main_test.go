package main

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/ambitmesh/ambit/cni"
	"github.com/ambitmesh/ambit/cni/install"
)

// The test binary is also the plugins: run under the name ambit-cni it is
// this command's main, under the name fake-primary it is a primary plugin
// that "makes" the pod's network. libcni runs them as a runtime would.
func TestMain(m *testing.M) {
	switch filepath.Base(os.Args[0]) {
	case cni.PluginType:
		main()
		os.Exit(0)
	case "fake-primary":
		fakePrimary()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func fakePrimary() {
	add := func(args *skel.CmdArgs) error {
		var conf types.PluginConf
		if err := json.Unmarshal(args.StdinData, &conf); err != nil {
			return err
		}
		ip, err := types.ParseCIDR("10.244.1.5/24")
		if err != nil {
			return err
		}
		res := &current.Result{
			CNIVersion: current.ImplementedSpecVersion,
			Interfaces: []*current.Interface{{Name: args.IfName, Mac: "6e:2b:0c:51:4f:10", Sandbox: args.Netns}},
			IPs:        []*current.IPConfig{{Interface: current.Int(0), Address: *ip}},
		}
		return types.PrintResult(res, conf.CNIVersion)
	}
	nop := func(*skel.CmdArgs) error { return nil }
	skel.PluginMainFuncs(skel.CNIFuncs{Add: add, Del: nop, Check: nop}, version.All, "fake primary plugin")
}

// agent is the node agent's side of the protocol, recording requests.
type agent struct {
	mu   sync.Mutex
	reqs map[string][]cni.PodRequest
}

func (a *agent) serve(t *testing.T, sock string) *http.Server {
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	a.reqs = map[string][]cni.PodRequest{}
	handle := func(w http.ResponseWriter, r *http.Request) {
		var req cni.PodRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		a.mu.Lock()
		a.reqs[r.URL.Path] = append(a.reqs[r.URL.Path], req)
		a.mu.Unlock()
		_ = json.NewEncoder(w).Encode(cni.AddResponse{Redirected: true})
	}
	srv := &http.Server{Handler: http.HandlerFunc(handle)}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return srv
}

func (a *agent) got(path string) []cni.PodRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.reqs[path])
}

// TestChain installs the plugin with package install into a conf dir whose
// primary plugin is fake-primary, then runs ADD, CHECK and DEL through
// libcni against the conflist Install wrote, with the agent up and down.
func TestChain(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	confDir, binDir, cacheDir := filepath.Join(dir, "net.d"), filepath.Join(dir, "bin"), filepath.Join(dir, "cache")
	for _, d := range []string{confDir, binDir, cacheDir} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(self, filepath.Join(binDir, "fake-primary")); err != nil {
		t.Fatal(err)
	}
	conf := `{"cniVersion":"1.0.0","name":"test","plugins":[{"type":"fake-primary"}]}`
	if err := os.WriteFile(filepath.Join(confDir, "10-test.conflist"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "ambit-cni") // short enough for a socket path
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "cni.sock")
	logFile := filepath.Join(dir, "ambit-cni.log")

	// The test binary is the plugin binary Install copies.
	res, err := install.Install(install.Options{
		ConfDir:      confDir,
		BinDir:       binDir,
		PluginBinary: self,
		Plugin:       cni.PluginConfig{AgentSocket: sock, TimeoutSeconds: 5, LogFile: logFile},
	})
	if err != nil {
		t.Fatal(err)
	}
	list, err := libcni.ConfListFromFile(res.ConfFile)
	if err != nil {
		t.Fatal(err)
	}
	runtime := libcni.NewCNIConfigWithCacheDir([]string{binDir}, cacheDir, nil)
	rt := &libcni.RuntimeConf{
		ContainerID: "5c0e0c4d1a",
		NetNS:       filepath.Join(dir, "netns"), // not a netns: the plugins do not enter it
		IfName:      "eth0",
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", "default"},
			{"K8S_POD_NAME", "web-1"},
			{"K8S_POD_INFRA_CONTAINER_ID", "5c0e0c4d1a"},
			{"K8S_POD_UID", "0b9f3c1e"},
		},
	}
	ctx := context.Background()

	vi, err := runtime.GetVersionInfo(ctx, cni.PluginType)
	if err != nil {
		t.Fatal(err)
	}
	if got := vi.SupportedVersions(); !slices.Equal(got, cni.SupportedCNIVersions()) {
		t.Errorf("VERSION = %v, want %v", got, cni.SupportedCNIVersions())
	}

	t.Run("agent down", func(t *testing.T) {
		_, err := runtime.AddNetworkList(ctx, list, rt)
		if err == nil {
			t.Fatal("ADD succeeded with no agent")
		}
		for _, want := range []string{"default/web-1", sock, "is the ambit node agent running on this node?"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q lacks %q", err, want)
			}
		}
		if err := runtime.DelNetworkList(ctx, list, rt); err != nil {
			t.Errorf("DEL with no agent: %v", err)
		}
	})

	t.Run("agent up", func(t *testing.T) {
		var a agent
		a.serve(t, sock)
		r, err := runtime.AddNetworkList(ctx, list, rt)
		if err != nil {
			t.Fatalf("ADD: %v", err)
		}
		cur, err := current.NewResultFromResult(r)
		if err != nil {
			t.Fatal(err)
		}
		if len(cur.IPs) != 1 || cur.IPs[0].Address.String() != "10.244.1.5/24" {
			t.Errorf("result IPs = %v, want the primary's 10.244.1.5/24", cur.IPs)
		}
		adds := a.got(cni.AddPath)
		if len(adds) != 1 {
			t.Fatalf("agent got %d ADDs", len(adds))
		}
		if got := adds[0]; got.PodNamespace != "default" || got.PodName != "web-1" || got.PodUID != "0b9f3c1e" ||
			got.ContainerID != "5c0e0c4d1a" || got.Netns != rt.NetNS || len(got.IPs) != 1 || got.IPs[0].String() != "10.244.1.5" {
			t.Errorf("agent got %+v", got)
		}
		if err := runtime.CheckNetworkList(ctx, list, rt); err != nil {
			t.Errorf("CHECK: %v", err)
		}
		if err := runtime.DelNetworkList(ctx, list, rt); err != nil {
			t.Errorf("DEL: %v", err)
		}
		if dels := a.got(cni.DelPath); len(dels) != 1 || dels[0].PodName != "web-1" {
			t.Errorf("agent got DELs %+v", dels)
		}
	})

	if data, err := os.ReadFile(logFile); err != nil || !strings.Contains(string(data), "redirected=true") {
		t.Errorf("plugin log %s: %v\n%s", logFile, err, data)
	}
}
