package plugin

import (
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/ambitmesh/ambit/cni"
)

// TestAddPassesResultThrough runs ADD for an enrolled pod in every
// supported result version and pins the printed result: it must be
// prevResult, unchanged, in the config's version.
func TestAddPassesResultThrough(t *testing.T) {
	for _, version := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(version, func(t *testing.T) {
			var agent fakeAgent
			sock := agent.start(t)
			out, log, err := run(add, cmdArgs(stdin(version, socketConf(sock, 5), prevResults[version]), podCNIArgs))
			if err != nil {
				t.Fatalf("ADD: %v\nlog:\n%s", err, log)
			}
			golden(t, "add-"+version+".golden", []byte(out))
			if !jsonEqual(t, []byte(out), []byte(prevResults[version])) {
				t.Errorf("result is not prevResult:\n got %s\nwant %s", out, prevResults[version])
			}
			if adds, _ := agent.requests(); len(adds) != 1 {
				t.Errorf("agent got %d ADD requests, want 1", len(adds))
			}
			if !strings.Contains(log, "redirected=true") {
				t.Errorf("log does not say the pod was redirected:\n%s", log)
			}
		})
	}
}

// TestAddRequest pins the JSON the agent gets.
func TestAddRequest(t *testing.T) {
	var agent fakeAgent
	sock := agent.start(t)
	if _, log, err := run(add, cmdArgs(stdin("1.0.0", socketConf(sock, 5), prevResults["1.0.0"]), podCNIArgs)); err != nil {
		t.Fatalf("ADD: %v\nlog:\n%s", err, log)
	}
	adds, _ := agent.requests()
	if len(adds) != 1 {
		t.Fatalf("agent got %d ADD requests, want 1", len(adds))
	}
	want := `{"podNamespace":"default","podName":"web-1","podUID":"0b9f3c1e-4a51-4c1e-9a53-2c7d1f1e8a11",` +
		`"netns":"/var/run/netns/cni-5c0e","ips":["10.244.1.5","fd00:10:244:1::5"],"containerID":"5c0e0c4d1a"}`
	if got := string(adds[0]); got != want {
		t.Errorf("agent got\n%s\nwant\n%s", got, want)
	}
}

// TestAddNotEnrolled: the agent says the pod is not enrolled; the pod
// starts untouched.
func TestAddNotEnrolled(t *testing.T) {
	agent := fakeAgent{Add: func(w http.ResponseWriter, _ *http.Request, _ cni.PodRequest) {
		writeJSON(w, http.StatusOK, cni.AddResponse{Redirected: false})
	}}
	sock := agent.start(t)
	out, log, err := run(add, cmdArgs(stdin("1.0.0", socketConf(sock, 5), prevResults["1.0.0"]), podCNIArgs))
	if err != nil {
		t.Fatalf("ADD: %v\nlog:\n%s", err, log)
	}
	if !jsonEqual(t, []byte(out), []byte(prevResults["1.0.0"])) {
		t.Errorf("result is not prevResult: %s", out)
	}
	if !strings.Contains(log, "redirected=false") {
		t.Errorf("log does not say the pod was left alone:\n%s", log)
	}
}

// TestAddPassThrough: sandboxes the agent is not asked about.
func TestAddPassThrough(t *testing.T) {
	tests := []struct {
		name  string
		extra string
		args  string
		log   string
	}{
		{name: "not a Kubernetes pod", args: "IgnoreUnknown=1", log: "not a Kubernetes pod"},
		{name: "no CNI_ARGS", args: "", log: "not a Kubernetes pod"},
		{
			name:  "excluded namespace",
			extra: `,"exclude_namespaces":["kube-system"]`,
			args:  "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-0",
			log:   "exclude_namespaces",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// An agent that fails everything: it must not be asked.
			agent := fakeAgent{Add: func(w http.ResponseWriter, _ *http.Request, _ cni.PodRequest) {
				writeJSON(w, http.StatusInternalServerError, cni.ErrorResponse{Error: "should not be called"})
			}}
			sock := agent.start(t)
			out, log, err := run(add, cmdArgs(stdin("1.0.0", socketConf(sock, 5)+tc.extra, prevResults["1.0.0"]), tc.args))
			if err != nil {
				t.Fatalf("ADD: %v\nlog:\n%s", err, log)
			}
			if !jsonEqual(t, []byte(out), []byte(prevResults["1.0.0"])) {
				t.Errorf("result is not prevResult: %s", out)
			}
			if adds, _ := agent.requests(); len(adds) != 0 {
				t.Errorf("agent was asked: %s", adds)
			}
			if !strings.Contains(log, tc.log) {
				t.Errorf("log does not mention %q:\n%s", tc.log, log)
			}
		})
	}
}

func TestAddNotChained(t *testing.T) {
	var agent fakeAgent
	sock := agent.start(t)
	out, _, err := run(add, cmdArgs(stdin("1.0.0", socketConf(sock, 5), ""), podCNIArgs))
	te := cniError(t, err)
	if te.Code != types.ErrInvalidNetworkConfig || !strings.Contains(te.Msg, "chained plugin") {
		t.Errorf("error = %d %q, want %d and a word about chaining", te.Code, te.Error(), types.ErrInvalidNetworkConfig)
	}
	if out != "" {
		t.Errorf("stdout = %q, want nothing (skel prints the error)", out)
	}
	if adds, _ := agent.requests(); len(adds) != 0 {
		t.Errorf("agent was asked: %s", adds)
	}
}

// TestAddAgentFailures: every way the agent can fail an ADD fails it, with
// an error that names the pod and the socket and says what to check.
func TestAddAgentFailures(t *testing.T) {
	tests := []struct {
		name string
		// socket returns the agent's socket; it may start an agent.
		socket  func(t *testing.T) string
		timeout int
		kind    error
		code    uint
		msg     []string // in the error the runtime sees, besides the pod and the socket
	}{
		{
			name:   "agent down: no socket",
			socket: func(t *testing.T) string { return filepath.Join(socketDir(t), "cni.sock") },
			kind:   ErrAgentUnreachable,
			code:   types.ErrTryAgainLater,
			msg:    []string{"cannot reach the ambit node agent", "no such file or directory", "is the ambit node agent running on this node?"},
		},
		{
			name:   "agent down: stale socket",
			socket: staleSocket,
			kind:   ErrAgentUnreachable,
			code:   types.ErrTryAgainLater,
			msg:    []string{"connection refused", "is the ambit node agent running on this node?"},
		},
		{
			name: "agent refuses",
			socket: (&fakeAgent{Add: func(w http.ResponseWriter, _ *http.Request, _ cni.PodRequest) {
				writeJSON(w, http.StatusInternalServerError, cni.ErrorResponse{Error: "attaching sk_lookup in netns: permission denied"})
			}}).start,
			kind: ErrAgentFailed,
			code: types.ErrInternal,
			msg:  []string{"refused ADD of pod", "HTTP 500", "attaching sk_lookup in netns: permission denied", "check the ambit node agent's log"},
		},
		{
			name: "agent not ready",
			socket: (&fakeAgent{Add: func(w http.ResponseWriter, _ *http.Request, _ cni.PodRequest) {
				http.Error(w, "ztunnel not connected", http.StatusServiceUnavailable)
			}}).start,
			kind: ErrAgentFailed,
			code: types.ErrTryAgainLater,
			msg:  []string{"HTTP 503", "ztunnel not connected"},
		},
		{
			name: "agent breaks the protocol",
			socket: (&fakeAgent{Add: func(w http.ResponseWriter, _ *http.Request, _ cni.PodRequest) {
				_, _ = w.Write([]byte("ok"))
			}}).start,
			kind: ErrAgentFailed,
			code: types.ErrInternal,
			msg:  []string{`is not {"redirected": bool}`},
		},
		{
			name: "agent drops the connection",
			socket: (&fakeAgent{Add: func(w http.ResponseWriter, _ *http.Request, _ cni.PodRequest) {
				conn, _, err := http.NewResponseController(w).Hijack()
				if err == nil {
					_ = conn.Close()
				}
			}}).start,
			kind: ErrAgentFailed,
			code: types.ErrInternal,
			msg:  []string{"failed while setting up pod", "EOF"},
		},
		{
			name: "agent too slow",
			socket: (&fakeAgent{Add: func(_ http.ResponseWriter, r *http.Request, _ cni.PodRequest) {
				<-r.Context().Done()
			}}).start,
			timeout: 1,
			kind:    ErrAgentTimeout,
			code:    types.ErrTryAgainLater,
			msg:     []string{"did not finish setting up pod", "within 1s", "timeout_seconds"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sock := tc.socket(t)
			timeout := orDefault(tc.timeout, 5)
			start := time.Now()
			// What Add does, keeping the error before it becomes a
			// *types.Error, which wraps nothing.
			var stdout, stderr strings.Builder
			p := &Plugin{Stdout: &stdout, Stderr: &stderr}
			err := p.add(cmdArgs(stdin("1.0.0", socketConf(sock, timeout), prevResults["1.0.0"]), podCNIArgs))
			if took := time.Since(start); took > time.Duration(timeout)*time.Second+2*time.Second {
				t.Errorf("ADD took %s with timeout_seconds %d", took, timeout)
			}
			if !errors.Is(err, tc.kind) {
				t.Errorf("error %v is not %v", err, tc.kind)
			}
			te := toCNIError(err)
			out, log := stdout.String(), stderr.String()
			if te.Code != tc.code {
				t.Errorf("code = %d, want %d", te.Code, tc.code)
			}
			for _, want := range append([]string{"ambit-cni: ", "default/web-1", sock}, tc.msg...) {
				if !strings.Contains(te.Error(), want) {
					t.Errorf("error %q does not contain %q", te.Error(), want)
				}
			}
			if out != "" {
				t.Errorf("stdout = %q, want nothing (skel prints the error)", out)
			}
			if !strings.Contains(log, "level=ERROR") {
				t.Errorf("failure not logged:\n%s", log)
			}
		})
	}
}

func orDefault(v, dflt int) int {
	if v == 0 {
		return dflt
	}
	return v
}

// cniError asserts that err is the *types.Error ADD and DEL return.
func cniError(t *testing.T, err error) *types.Error {
	t.Helper()
	if err == nil {
		t.Fatal("no error")
	}
	te, ok := errors.AsType[*types.Error](err)
	if !ok {
		t.Fatalf("error %T %v is not a *types.Error", err, err)
	}
	return te
}

// staleSocket is a socket file with nobody listening, as an agent that
// died leaves behind.
func staleSocket(t *testing.T) string {
	sock := filepath.Join(socketDir(t), "cni.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	_ = l.Close()
	if _, err := os.Stat(sock); err != nil {
		t.Fatal(err)
	}
	return sock
}

func TestDel(t *testing.T) {
	tests := []struct {
		name    string
		socket  func(t *testing.T) (sock string, agent *fakeAgent)
		stdin   func(sock string) []byte
		args    string
		asked   bool // the agent gets the DEL
		maxTime time.Duration
	}{
		{
			name:   "agent up",
			socket: agentUp(&fakeAgent{}),
			stdin:  func(sock string) []byte { return stdin("1.0.0", socketConf(sock, 5), "") },
			args:   podCNIArgs,
			asked:  true,
		},
		{
			name:   "agent up, prevResult given",
			socket: agentUp(&fakeAgent{}),
			stdin:  func(sock string) []byte { return stdin("1.0.0", socketConf(sock, 5), prevResults["1.0.0"]) },
			args:   podCNIArgs,
			asked:  true,
		},
		{
			name:   "agent down",
			socket: func(t *testing.T) (string, *fakeAgent) { return filepath.Join(socketDir(t), "cni.sock"), nil },
			stdin:  func(sock string) []byte { return stdin("1.0.0", socketConf(sock, 5), "") },
			args:   podCNIArgs,
		},
		{
			name: "agent fails",
			socket: agentUp(&fakeAgent{Del: func(w http.ResponseWriter, _ *http.Request, _ cni.PodRequest) {
				writeJSON(w, http.StatusInternalServerError, cni.ErrorResponse{Error: "boom"})
			}}),
			stdin: func(sock string) []byte { return stdin("1.0.0", socketConf(sock, 5), "") },
			args:  podCNIArgs,
			asked: true,
		},
		{
			name: "agent hangs: DEL waits at most 5s, less with a lower timeout_seconds",
			socket: agentUp(&fakeAgent{Del: func(w http.ResponseWriter, _ *http.Request, _ cni.PodRequest) {
				time.Sleep(3 * time.Second)
			}}),
			stdin:   func(sock string) []byte { return stdin("1.0.0", socketConf(sock, 1), "") },
			args:    podCNIArgs,
			asked:   true,
			maxTime: 2 * time.Second,
		},
		{
			name:   "unusable config",
			socket: agentUp(&fakeAgent{}),
			stdin: func(string) []byte {
				return []byte(`{"cniVersion":"1.0.0","name":"lab","type":"ambit-cni","timeout_seconds":-3}`)
			},
			args: podCNIArgs,
		},
		{
			name:   "not a Kubernetes pod",
			socket: agentUp(&fakeAgent{}),
			stdin:  func(sock string) []byte { return stdin("1.0.0", socketConf(sock, 5), "") },
			args:   "IgnoreUnknown=1",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sock, agent := tc.socket(t)
			args := cmdArgs(tc.stdin(sock), tc.args)
			args.Netns = "" // the runtime may have removed the namespace already
			start := time.Now()
			out, log, err := run(del, args)
			if err != nil {
				t.Fatalf("DEL failed: %v\nlog:\n%s", err, log)
			}
			if tc.maxTime != 0 && time.Since(start) > tc.maxTime {
				t.Errorf("DEL took %s, want at most %s", time.Since(start), tc.maxTime)
			}
			if out != "" {
				t.Errorf("DEL printed %q", out)
			}
			var dels [][]byte
			if agent != nil {
				_, dels = agent.requests()
			}
			if got := len(dels) == 1; got != tc.asked {
				t.Errorf("agent got %d DEL requests, want asked=%v", len(dels), tc.asked)
			}
		})
	}
	t.Run("request", func(t *testing.T) {
		agent := &fakeAgent{}
		sock := agent.start(t)
		if _, log, err := run(del, cmdArgs(stdin("1.0.0", socketConf(sock, 5), prevResults["1.0.0"]), podCNIArgs)); err != nil {
			t.Fatalf("DEL: %v\n%s", err, log)
		}
		_, dels := agent.requests()
		want := `{"podNamespace":"default","podName":"web-1","podUID":"0b9f3c1e-4a51-4c1e-9a53-2c7d1f1e8a11",` +
			`"netns":"/var/run/netns/cni-5c0e","ips":["10.244.1.5","fd00:10:244:1::5"],"containerID":"5c0e0c4d1a"}`
		if len(dels) != 1 || string(dels[0]) != want {
			t.Errorf("agent got %s\nwant %s", dels, want)
		}
	})
	t.Run("request without prevResult", func(t *testing.T) {
		agent := &fakeAgent{}
		sock := agent.start(t)
		args := cmdArgs(stdin("1.0.0", socketConf(sock, 5), ""), podCNIArgs)
		args.Netns = ""
		if _, log, err := run(del, args); err != nil {
			t.Fatalf("DEL: %v\n%s", err, log)
		}
		_, dels := agent.requests()
		want := `{"podNamespace":"default","podName":"web-1","podUID":"0b9f3c1e-4a51-4c1e-9a53-2c7d1f1e8a11",` +
			`"netns":"","ips":[],"containerID":"5c0e0c4d1a"}`
		if len(dels) != 1 || string(dels[0]) != want {
			t.Errorf("agent got %s\nwant %s", dels, want)
		}
	})
}

func agentUp(a *fakeAgent) func(t *testing.T) (string, *fakeAgent) {
	return func(t *testing.T) (string, *fakeAgent) {
		sock := a.start(t)
		return sock, a
	}
}

func TestCheck(t *testing.T) {
	if _, _, err := run((*Plugin).Check, cmdArgs(stdin("1.0.0", "", prevResults["1.0.0"]), podCNIArgs)); err != nil {
		t.Errorf("CHECK: %v", err)
	}
}

func TestLogFile(t *testing.T) {
	var agent fakeAgent
	sock := agent.start(t)
	logFile := filepath.Join(t.TempDir(), "log", "ambit-cni.log")
	extra := socketConf(sock, 5) + `,"log_file":"` + logFile + `","log_level":"debug"`
	_, stderr, err := run(add, cmdArgs(stdin("1.0.0", extra, prevResults["1.0.0"]), podCNIArgs))
	if err != nil {
		t.Fatal(err)
	}
	if stderr != "" {
		t.Errorf("logged to stderr with log_file set:\n%s", stderr)
	}
	data, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"plugin=ambit-cni", "cmd=ADD", "containerID=5c0e0c4d1a", "pod=default/web-1", "redirected=true"} {
		if !strings.Contains(string(data), want) {
			t.Errorf("log file does not contain %q:\n%s", want, data)
		}
	}
}

func TestToCNIError(t *testing.T) {
	tests := []struct {
		name string
		err  error
		code uint
	}{
		{name: "invalid config", err: ErrInvalidConfig, code: types.ErrInvalidNetworkConfig},
		{name: "not chained", err: ErrNotChained, code: types.ErrInvalidNetworkConfig},
		{name: "unreachable", err: &AgentError{Kind: ErrAgentUnreachable, Err: errors.New("x")}, code: types.ErrTryAgainLater},
		{name: "timeout", err: &AgentError{Kind: ErrAgentTimeout}, code: types.ErrTryAgainLater},
		{name: "503", err: &AgentError{Kind: ErrAgentFailed, Status: 503}, code: types.ErrTryAgainLater},
		{name: "500", err: &AgentError{Kind: ErrAgentFailed, Status: 500}, code: types.ErrInternal},
		{name: "other", err: errors.New("disk full"), code: types.ErrInternal},
		{name: "already a CNI error", err: types.NewError(types.ErrDecodingFailure, "x", ""), code: types.ErrDecodingFailure},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := toCNIError(tc.err); got.Code != tc.code {
				t.Errorf("code = %d, want %d", got.Code, tc.code)
			}
		})
	}
}
