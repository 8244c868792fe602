package plugin

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/ambitmesh/ambit/cni"
)

// fakeAgent is the node agent's side of the protocol, served on a real
// Unix socket: the agent is another process, so the test talks to it the
// way the plugin does. Add and Del decide the answer; nil means 200 with
// {"redirected": true} (Add) or {} (Del).
type fakeAgent struct {
	Add func(w http.ResponseWriter, r *http.Request, req cni.PodRequest)
	Del func(w http.ResponseWriter, r *http.Request, req cni.PodRequest)

	mu   sync.Mutex
	adds [][]byte // request bodies, as received
	dels [][]byte
}

// start serves the agent on a socket in a temporary directory and returns
// the socket's path.
func (a *fakeAgent) start(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(socketDir(t), "cni.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+cni.AddPath, func(w http.ResponseWriter, r *http.Request) {
		req := a.record(t, r, &a.adds)
		if a.Add == nil {
			writeJSON(w, http.StatusOK, cni.AddResponse{Redirected: true})
			return
		}
		a.Add(w, r, req)
	})
	mux.HandleFunc("POST "+cni.DelPath, func(w http.ResponseWriter, r *http.Request) {
		req := a.record(t, r, &a.dels)
		if a.Del == nil {
			writeJSON(w, http.StatusOK, struct{}{})
			return
		}
		a.Del(w, r, req)
	})
	srv := &http.Server{Handler: mux}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return sock
}

func (a *fakeAgent) record(t *testing.T, r *http.Request, into *[][]byte) cni.PodRequest {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		t.Errorf("agent: reading request: %v", err)
	}
	if ct := r.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("agent: Content-Type %q, want application/json", ct)
	}
	a.mu.Lock()
	*into = append(*into, body)
	a.mu.Unlock()
	var req cni.PodRequest
	if err := json.Unmarshal(body, &req); err != nil {
		t.Errorf("agent: request %s: %v", body, err)
	}
	return req
}

func (a *fakeAgent) requests() (adds, dels [][]byte) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([][]byte(nil), a.adds...), append([][]byte(nil), a.dels...)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// socketDir is a temporary directory whose path is short enough for a Unix
// socket (108 bytes on Linux): t.TempDir() carries the test's name.
func socketDir(t *testing.T) string {
	t.Helper()
	if d := t.TempDir(); len(d) < 80 {
		return d
	}
	d, err := os.MkdirTemp("", "ambit-cni")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(d) })
	return d
}

// Recorded primary-plugin results (ptp with host-local, dual-stack), as
// they appear in prevResult for each result version.
var prevResults = map[string]string{
	"0.3.1": `{"cniVersion":"0.3.1","interfaces":[{"name":"eth0","mac":"6e:2b:0c:51:4f:10","sandbox":"/var/run/netns/cni-5c0e"}],` +
		`"ips":[{"version":"4","interface":0,"address":"10.244.1.5/24","gateway":"10.244.1.1"}],` +
		`"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}`,
	"0.4.0": `{"cniVersion":"0.4.0","interfaces":[{"name":"veth6c1a0f2e","mac":"9a:61:5e:0d:2c:01"},{"name":"eth0","mac":"6e:2b:0c:51:4f:10","sandbox":"/var/run/netns/cni-5c0e"}],` +
		`"ips":[{"version":"4","interface":1,"address":"10.244.1.5/24","gateway":"10.244.1.1"},{"version":"6","interface":1,"address":"fd00:10:244:1::5/64","gateway":"fd00:10:244:1::1"}],` +
		`"routes":[{"dst":"0.0.0.0/0"},{"dst":"::/0"}],"dns":{"nameservers":["10.96.0.10"],"search":["default.svc.cluster.local"]}}`,
	"1.0.0": `{"cniVersion":"1.0.0","interfaces":[{"name":"veth6c1a0f2e","mac":"9a:61:5e:0d:2c:01"},{"name":"eth0","mac":"6e:2b:0c:51:4f:10","sandbox":"/var/run/netns/cni-5c0e"}],` +
		`"ips":[{"interface":1,"address":"10.244.1.5/24","gateway":"10.244.1.1"},{"interface":1,"address":"fd00:10:244:1::5/64","gateway":"fd00:10:244:1::1"}],` +
		`"routes":[{"dst":"0.0.0.0/0"},{"dst":"::/0"}],"dns":{"nameservers":["10.96.0.10"],"search":["default.svc.cluster.local"]}}`,
	"1.1.0": `{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","mac":"6e:2b:0c:51:4f:10","mtu":1500,"sandbox":"/var/run/netns/cni-5c0e"}],` +
		`"ips":[{"interface":0,"address":"10.244.1.5/24","gateway":"10.244.1.1"}],` +
		`"routes":[{"dst":"0.0.0.0/0","mtu":1400}]}`,
}

// stdin is the plugin's stdin as libcni builds it for the plugin's entry:
// the list's name and version injected, extra entry fields (a string that
// starts with a comma), and prevResult unless it is "".
func stdin(version, extra, prevResult string) []byte {
	s := fmt.Sprintf(`{"cniVersion":%q,"name":"lab","type":"ambit-cni"%s`, version, extra)
	if prevResult != "" {
		s += `,"prevResult":` + prevResult
	}
	return []byte(s + "}")
}

// socketConf is the extra entry fields for an agent on sock.
func socketConf(sock string, timeoutSeconds int) string {
	return fmt.Sprintf(`,"agent_socket":%q,"timeout_seconds":%d`, sock, timeoutSeconds)
}

// The CNI_ARGS containerd passes for pod default/web-1.
const podCNIArgs = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1;" +
	"K8S_POD_INFRA_CONTAINER_ID=5c0e0c4d1a;K8S_POD_UID=0b9f3c1e-4a51-4c1e-9a53-2c7d1f1e8a11"

func cmdArgs(stdin []byte, args string) *skel.CmdArgs {
	return &skel.CmdArgs{
		ContainerID: "5c0e0c4d1a",
		Netns:       "/var/run/netns/cni-5c0e",
		IfName:      "eth0",
		Args:        args,
		Path:        "/opt/cni/bin",
		StdinData:   stdin,
	}
}

// run runs one command of a Plugin that writes into buffers.
func run(cmd func(*Plugin, *skel.CmdArgs) error, args *skel.CmdArgs) (stdout, stderr string, err error) {
	var out, log bytes.Buffer
	p := &Plugin{Stdout: &out, Stderr: &log}
	err = cmd(p, args)
	return out.String(), log.String(), err
}

var (
	add = (*Plugin).Add
	del = (*Plugin).Del
)

var updateGolden = os.Getenv("UPDATE_GOLDEN") == "1"

// golden compares got with testdata/name, or writes it there when
// UPDATE_GOLDEN=1. Review the diff before committing a refreshed file.
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if updateGolden {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (UPDATE_GOLDEN=1 go test ./cni/plugin writes it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs (UPDATE_GOLDEN=1 to refresh, then review the diff)\ngot:\n%s\nwant:\n%s", path, got, want)
	}
}

// jsonEqual reports whether a and b hold the same JSON value.
func jsonEqual(t *testing.T, a, b []byte) bool {
	t.Helper()
	var va, vb any
	if err := json.Unmarshal(a, &va); err != nil {
		t.Fatalf("%s: %v", a, err)
	}
	if err := json.Unmarshal(b, &vb); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	ja, _ := json.Marshal(va)
	jb, _ := json.Marshal(vb)
	return bytes.Equal(ja, jb)
}
