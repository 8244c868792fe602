package install

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"

	"github.com/ambitmesh/ambit/cni"
)

// TestGolden installs into recorded conf dirs and uninstalls again. The
// goldens are the conf dir after each step: testdata/<case>/installed.golden
// and uninstalled.golden.
func TestGolden(t *testing.T) {
	tests := []struct {
		name string
		// primary is the conflist that gets the entry.
		primary string
		// roundTrip: Uninstall gives back the input, value for value; the
		// inputs that are already two-space indented come back byte for
		// byte.
		roundTrip bool
		// position of Ambit's entry among the plugins; -1 is last.
		position int
	}{
		{name: "lab", primary: "10-lab.conflist", roundTrip: true, position: -1},
		{name: "calico", primary: "10-calico.conflist", roundTrip: true, position: -1},
		{name: "flannel", primary: "10-flannel.conflist", roundTrip: true, position: -1},
		{name: "conf", primary: "10-bridge.conflist", roundTrip: true, position: -1},
		{name: "several", primary: "10-kindnet.conflist", roundTrip: true, position: -1},
		// An old entry is updated where it is, before a plugin someone
		// appended after it; the duplicate at the end goes.
		{name: "stale-entry", primary: "10-lab.conflist", position: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := filepath.Join("testdata", tc.name)
			confDir := copyDir(t, src)
			binDir := t.TempDir()
			opts := Options{ConfDir: confDir, BinDir: binDir, PluginBinary: fakeBinary(t, "ambit-cni v1")}

			res, err := Install(opts)
			if err != nil {
				t.Fatalf("Install: %v", err)
			}
			if want := filepath.Join(confDir, tc.primary); res.ConfFile != want || !res.ConfChanged || !res.BinaryChanged {
				t.Errorf("Install = %+v, want ConfFile %s and both changed", res, want)
			}
			golden(t, filepath.Join(src, "installed.golden"), dump(t, confDir))
			checkChain(t, res.ConfFile, opts.entryConfig(), tc.position)

			// Idempotence: nothing is written the second time.
			before := dump(t, confDir)
			st, err := os.Stat(res.ConfFile)
			if err != nil {
				t.Fatal(err)
			}
			res2, err := Install(opts)
			if err != nil {
				t.Fatalf("second Install: %v", err)
			}
			if res2.ConfChanged || res2.BinaryChanged || res2.ConfFile != res.ConfFile {
				t.Errorf("second Install = %+v, want nothing changed", res2)
			}
			if st2, err := os.Stat(res.ConfFile); err != nil || !os.SameFile(st, st2) || !st2.ModTime().Equal(st.ModTime()) {
				t.Errorf("second Install rewrote %s", res.ConfFile)
			}
			if after := dump(t, confDir); !bytes.Equal(before, after) {
				t.Errorf("second Install changed the conf dir:\n%s", after)
			}

			if err := Uninstall(opts); err != nil {
				t.Fatalf("Uninstall: %v", err)
			}
			golden(t, filepath.Join(src, "uninstalled.golden"), dump(t, confDir))
			if _, err := os.Stat(filepath.Join(binDir, cni.PluginType)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("binary still there after Uninstall: %v", err)
			}
			noTempFiles(t, confDir)
			noTempFiles(t, binDir)
			if tc.roundTrip {
				sameFiles(t, src, confDir)
			}
		})
	}
}

// checkChain loads the conflist as a runtime does and checks that it holds
// one Ambit entry, with pc, at position (-1: last), after the primary
// plugin.
func checkChain(t *testing.T, file string, pc cni.PluginConfig, position int) {
	t.Helper()
	list, err := libcni.ConfListFromFile(file)
	if err != nil {
		t.Fatalf("libcni cannot load %s: %v", file, err)
	}
	n := len(list.Plugins)
	if n < 2 {
		t.Fatalf("%s has %d plugins", file, n)
	}
	if position < 0 {
		position = n - 1
	}
	ours := list.Plugins[position]
	if ours.Network.Type != cni.PluginType {
		t.Fatalf("plugin %d is %q, want %q", position, ours.Network.Type, cni.PluginType)
	}
	var got cni.PluginConfig
	if err := json.Unmarshal(ours.Bytes, &got); err != nil {
		t.Fatal(err)
	}
	if got.AgentSocket != pc.AgentSocket || got.TimeoutSeconds != pc.TimeoutSeconds || got.LogLevel != pc.LogLevel {
		t.Errorf("entry = %+v, want %+v", got, pc)
	}
	for i, p := range list.Plugins {
		if i != position && p.Network.Type == cni.PluginType {
			t.Errorf("a second %s entry in %s", cni.PluginType, file)
		}
	}
}

// sameFiles checks that dir holds the input files of src, each with the
// same JSON tokens in the same order, and byte for byte where the input
// was already in Install's format.
func sameFiles(t *testing.T, src, dir string) {
	t.Helper()
	var inputs []string
	for _, name := range listDir(t, src) {
		if !strings.HasSuffix(name, ".golden") {
			inputs = append(inputs, name)
		}
	}
	if got := listDir(t, dir); strings.Join(got, " ") != strings.Join(inputs, " ") {
		t.Fatalf("after Uninstall the conf dir holds %v, want %v", got, inputs)
	}
	for _, name := range inputs {
		in, out := readFileT(t, filepath.Join(src, name)), readFileT(t, filepath.Join(dir, name))
		if !json.Valid(in) {
			if !bytes.Equal(in, out) {
				t.Errorf("%s changed", name)
			}
			continue
		}
		var ci, co bytes.Buffer
		if err := json.Compact(&ci, in); err != nil {
			t.Fatal(err)
		}
		if err := json.Compact(&co, out); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(ci.Bytes(), co.Bytes()) {
			t.Errorf("%s after Uninstall:\n%s\nwant\n%s", name, out, in)
		}
		if p, _ := pretty(in); bytes.Equal(p, in) && !bytes.Equal(in, out) {
			t.Errorf("%s not restored byte for byte:\n%s\nwant\n%s", name, out, in)
		}
	}
}

// fakeBinary is a stand-in for the plugin binary.
func fakeBinary(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ambit-cni")
	if err := os.WriteFile(path, []byte(content), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestInstallUpdatesEntryInPlace: a changed config rewrites Ambit's entry
// where it is, and nothing else; a plugin appended after it stays after it.
func TestInstallUpdatesEntryInPlace(t *testing.T) {
	confDir := t.TempDir()
	file := filepath.Join(confDir, "10-lab.conflist")
	writeFile(t, file, string(readFileT(t, "testdata/flannel/10-flannel.conflist")))
	opts := Options{ConfDir: confDir}
	if _, err := Install(opts); err != nil {
		t.Fatal(err)
	}
	// Another installer appends its plugin after Ambit's.
	l, err := parseConflist(readFileT(t, file))
	if err != nil {
		t.Fatal(err)
	}
	after, err := l.marshal(append(l.plugins, json.RawMessage(`{"type":"linkerd-cni","log_level":"info"}`)))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, file, string(after))

	opts.Plugin = cni.PluginConfig{AgentSocket: "/run/ambit/agent.sock", TimeoutSeconds: 10, LogLevel: "debug", ExcludeNamespaces: []string{"kube-system"}}
	res, err := Install(opts)
	if err != nil {
		t.Fatal(err)
	}
	if !res.ConfChanged {
		t.Error("changed options did not change the conflist")
	}
	got := readFileT(t, file)
	l, err = parseConflist(got)
	if err != nil {
		t.Fatal(err)
	}
	var types []string
	for _, p := range l.plugins {
		types = append(types, readPlugin(p).Type)
	}
	if want := "flannel portmap ambit-cni linkerd-cni"; strings.Join(types, " ") != want {
		t.Errorf("plugins = %v, want %s", types, want)
	}
	want := `{"type":"ambit-cni","agent_socket":"/run/ambit/agent.sock","timeout_seconds":10,"log_level":"debug","exclude_namespaces":["kube-system"]}`
	if !compactEqual(l.plugins[2], []byte(want)) {
		t.Errorf("entry = %s, want %s", l.plugins[2], want)
	}
	// Everything but the entry is as before.
	old, _ := parseConflist(after)
	for _, i := range []int{0, 1, 3} {
		if !compactEqual(l.plugins[i], old.plugins[i]) {
			t.Errorf("plugin %d changed: %s", i, l.plugins[i])
		}
	}
}

// TestInstallErrors: configs Install must not touch, and why.
func TestInstallErrors(t *testing.T) {
	tests := []struct {
		name  string
		files map[string]string
		opts  func(confDir string) Options
		want  error
	}{
		{name: "empty conf dir", want: ErrNoPrimaryConfig},
		{
			name: "no conf dir",
			opts: func(confDir string) Options { return Options{ConfDir: filepath.Join(confDir, "missing")} },
			want: ErrNoPrimaryConfig,
		},
		{
			name:  "only other files",
			files: map[string]string{"calico-kubeconfig": "x", "10-x.conflist.bak": "{}"},
			want:  ErrNoPrimaryConfig,
		},
		{
			name:  "cniVersion the plugin does not speak",
			files: map[string]string{"10-old.conflist": `{"cniVersion":"0.2.0","name":"old","plugins":[{"type":"bridge"}]}`},
			want:  ErrUnsupportedCNIVersion,
		},
		{
			name:  "no cniVersion",
			files: map[string]string{"10-old.conflist": `{"name":"old","plugins":[{"type":"bridge"}]}`},
			want:  ErrUnsupportedCNIVersion,
		},
		{
			name:  "single conf with an old cniVersion",
			files: map[string]string{"10-old.conf": `{"cniVersion":"0.2.0","name":"old","type":"bridge"}`},
			want:  ErrUnsupportedCNIVersion,
		},
		{
			name:  "not JSON",
			files: map[string]string{"10-bad.conflist": `{"cniVersion":"1.0.0",`},
			want:  ErrInvalidConfig,
		},
		{
			name:  "no plugins list",
			files: map[string]string{"10-bad.conflist": `{"cniVersion":"1.0.0","name":"x"}`},
			want:  ErrInvalidConfig,
		},
		{
			name:  "nothing to chain after",
			files: map[string]string{"10-bad.conflist": `{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"ambit-cni"}]}`},
			want:  ErrInvalidConfig,
		},
		{
			name:  "a plugin without a type",
			files: map[string]string{"10-bad.conflist": `{"cniVersion":"1.0.0","name":"x","plugins":[{"bridge":"cni0"}]}`},
			want:  ErrInvalidConfig,
		},
		{
			name:  "a list in a .conf",
			files: map[string]string{"10-bad.conf": `{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"bridge"}]}`},
			want:  ErrInvalidConfig,
		},
		{
			name: "the first file is bad, a later one is good: no guessing",
			files: map[string]string{
				"05-bad.conflist":  `{"cniVersion":"1.0.0","name":"x"}`,
				"10-good.conflist": `{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"bridge"}]}`,
			},
			want: ErrInvalidConfig,
		},
		{
			name: "a .conf shadowing someone else's .conflist of the same name",
			files: map[string]string{
				"10-x.conf":     `{"cniVersion":"1.0.0","name":"x","type":"bridge"}`,
				"10-x.conflist": `{"cniVersion":"1.0.0","name":"y","plugins":[{"type":"ptp"}]}`,
			},
			want: ErrInvalidConfig,
		},
		{
			name: "relative socket",
			files: map[string]string{
				"10-good.conflist": `{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"bridge"}]}`,
			},
			opts: func(confDir string) Options {
				return Options{ConfDir: confDir, Plugin: cni.PluginConfig{AgentSocket: "cni.sock"}}
			},
			want: ErrInvalidOptions,
		},
		{
			name: "binary without a bin dir",
			opts: func(confDir string) Options { return Options{ConfDir: confDir, PluginBinary: "/bin/true"} },
			want: ErrInvalidOptions,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			confDir := t.TempDir()
			for name, data := range tc.files {
				writeFile(t, filepath.Join(confDir, name), data)
			}
			opts := Options{ConfDir: confDir}
			if tc.opts != nil {
				opts = tc.opts(confDir)
			}
			before := dump(t, confDir)
			_, err := Install(opts)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Install: %v, want %v", err, tc.want)
			}
			if after := dump(t, confDir); !bytes.Equal(before, after) {
				t.Errorf("a failed Install changed the conf dir:\n%s", after)
			}
		})
	}
}

// TestEditPreservesValues: the values around Ambit's entry come back byte
// for byte (numbers beyond float64, escapes, HTML characters, duplicate
// keys), in their order.
func TestEditPreservesValues(t *testing.T) {
	in := `{"name":"x","cniVersion":"1.0.0","zz":1,"aa":2,"big":18446744073709551617,"f":1.50,` +
		`"s":"caf\u00e9 <&> \"q\"","name":"x","plugins":[{"type":"bridge","mtu":9000,"k":"\u003c"}],"disableCheck":true}`
	out, changed, err := withEntry([]byte(in), cni.PluginConfig{AgentSocket: "/run/a<b>.sock"})
	if err != nil || !changed {
		t.Fatalf("withEntry: changed %v, %v", changed, err)
	}
	for _, want := range []string{`"big": 18446744073709551617`, `"f": 1.50`, `"caf\u00e9 <&> \"q\""`, `"k": "\u003c"`, `"/run/a<b>.sock"`} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("output lacks %s:\n%s", want, out)
		}
	}
	back, found, restore, err := withoutEntry(out)
	if err != nil || !found || restore != "" {
		t.Fatalf("withoutEntry: found %v, restore %q, %v", found, restore, err)
	}
	var ci, cb bytes.Buffer
	_ = json.Compact(&ci, []byte(in))
	_ = json.Compact(&cb, back)
	if ci.String() != cb.String() {
		t.Errorf("round trip:\n%s\nwant\n%s", cb.String(), ci.String())
	}
}

// TestWithoutEntryRestore: Uninstall converts back only what Install
// converted, and only into the conf dir.
func TestWithoutEntryRestore(t *testing.T) {
	tests := []struct {
		name    string
		list    string
		restore string
	}{
		{
			name:    "as converted",
			list:    `{"cniVersion":"0.4.0","name":"n","plugins":[{"cniVersion":"0.4.0","name":"n","type":"bridge"},{"type":"ambit-cni","converted_from":"10-b.conf"}]}`,
			restore: "10-b.conf",
		},
		{
			name: "someone added a plugin since",
			list: `{"cniVersion":"0.4.0","name":"n","plugins":[{"cniVersion":"0.4.0","name":"n","type":"bridge"},{"type":"portmap"},{"type":"ambit-cni","converted_from":"10-b.conf"}]}`,
		},
		{
			name: "someone changed the list's version",
			list: `{"cniVersion":"1.0.0","name":"n","plugins":[{"cniVersion":"0.4.0","name":"n","type":"bridge"},{"type":"ambit-cni","converted_from":"10-b.conf"}]}`,
		},
		{
			name: "someone added a key to the list",
			list: `{"cniVersion":"0.4.0","name":"n","disableCheck":true,"plugins":[{"cniVersion":"0.4.0","name":"n","type":"bridge"},{"type":"ambit-cni","converted_from":"10-b.conf"}]}`,
		},
		{
			name: "a path, not a file name",
			list: `{"cniVersion":"0.4.0","name":"n","plugins":[{"cniVersion":"0.4.0","name":"n","type":"bridge"},{"type":"ambit-cni","converted_from":"../../etc/b.conf"}]}`,
		},
		{
			name: "not a config file name",
			list: `{"cniVersion":"0.4.0","name":"n","plugins":[{"cniVersion":"0.4.0","name":"n","type":"bridge"},{"type":"ambit-cni","converted_from":"b.sh"}]}`,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, found, restore, err := withoutEntry([]byte(tc.list))
			if err != nil || !found {
				t.Fatalf("found %v, %v", found, err)
			}
			if restore != tc.restore {
				t.Errorf("restore = %q, want %q", restore, tc.restore)
			}
			if bytes.Contains(out, []byte("ambit-cni")) {
				t.Errorf("entry left in:\n%s", out)
			}
		})
	}
}

// TestInstallConfRewritten: the primary CNI writes its .conf again after
// Install converted it; Install converts it again, over its own earlier
// conversion.
func TestInstallConfRewritten(t *testing.T) {
	confDir := copyDir(t, "testdata/conf")
	opts := Options{ConfDir: confDir}
	if _, err := Install(opts); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(confDir, "10-bridge.conf"), `{"cniVersion":"1.0.0","name":"mynet","type":"bridge","bridge":"cni1"}`)
	res, err := Install(opts)
	if err != nil {
		t.Fatal(err)
	}
	if got := listDir(t, confDir); strings.Join(got, " ") != "10-bridge.conflist 99-loopback.conf" {
		t.Errorf("conf dir = %v", got)
	}
	if data := readFileT(t, res.ConfFile); !bytes.Contains(data, []byte(`"bridge": "cni1"`)) {
		t.Errorf("%s does not hold the newer .conf:\n%s", res.ConfFile, data)
	}
	checkChain(t, res.ConfFile, opts.entryConfig(), -1)
}

// TestUninstallConfRewritten: the primary CNI wrote its .conf again after
// Install converted it; Uninstall keeps the new .conf and drops the
// converted copy.
func TestUninstallConfRewritten(t *testing.T) {
	confDir := copyDir(t, "testdata/conf")
	opts := Options{ConfDir: confDir}
	if _, err := Install(opts); err != nil {
		t.Fatal(err)
	}
	newer := `{"cniVersion":"1.0.0","name":"mynet","type":"bridge","bridge":"cni1"}`
	writeFile(t, filepath.Join(confDir, "10-bridge.conf"), newer)
	if err := Uninstall(opts); err != nil {
		t.Fatal(err)
	}
	if got := listDir(t, confDir); strings.Join(got, " ") != "10-bridge.conf 99-loopback.conf" {
		t.Errorf("conf dir = %v", got)
	}
	if got := string(readFileT(t, filepath.Join(confDir, "10-bridge.conf"))); got != newer {
		t.Errorf("10-bridge.conf = %s, want the primary's newer file", got)
	}
}

// TestInstallBinaryAtomic: the binary is replaced by rename, never written
// in place: a process that has the old one open (a runtime exec'ing it)
// keeps reading the old bytes, and nothing is left half-written.
func TestInstallBinaryAtomic(t *testing.T) {
	confDir := copyDir(t, "testdata/lab")
	binDir := t.TempDir()
	dst := filepath.Join(binDir, cni.PluginType)
	opts := Options{ConfDir: confDir, BinDir: binDir, PluginBinary: fakeBinary(t, "ambit-cni v1")}
	if _, err := Install(opts); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(dst)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o755 {
		t.Errorf("binary mode %v, want 0755", st.Mode().Perm())
	}
	old, err := os.Open(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = old.Close() }()

	opts.PluginBinary = fakeBinary(t, "ambit-cni v2, longer")
	res, err := Install(opts)
	if err != nil {
		t.Fatal(err)
	}
	if !res.BinaryChanged || res.ConfChanged {
		t.Errorf("Install = %+v, want only the binary changed", res)
	}
	if got, _ := io.ReadAll(old); string(got) != "ambit-cni v1" {
		t.Errorf("the open old binary reads %q: it was written in place", got)
	}
	if got := string(readFileT(t, dst)); got != "ambit-cni v2, longer" {
		t.Errorf("binary = %q", got)
	}
	noTempFiles(t, binDir)

	// A copy that fails leaves the old binary whole and no temporary file.
	opts.PluginBinary = filepath.Join(t.TempDir(), "missing")
	if _, err := Install(opts); err == nil {
		t.Error("Install with a missing binary succeeded")
	}
	if got := string(readFileT(t, dst)); got != "ambit-cni v2, longer" {
		t.Errorf("binary after a failed copy = %q", got)
	}
	noTempFiles(t, binDir)

	// An unchanged binary is not rewritten.
	opts.PluginBinary = fakeBinary(t, "ambit-cni v2, longer")
	st, _ = os.Stat(dst)
	if res, err := Install(opts); err != nil || res.BinaryChanged {
		t.Errorf("Install = %+v, %v; want the binary unchanged", res, err)
	}
	if st2, _ := os.Stat(dst); !os.SameFile(st, st2) {
		t.Error("an identical binary was rewritten")
	}
}

func TestWriteFileAtomicKeepsMode(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "10-x.conflist")
	if err := writeFileAtomic(path, []byte("{}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", st.Mode().Perm())
	}
	if err := writeFileAtomic(filepath.Join(dir, "missing", "x"), []byte("{}"), 0o644); err == nil {
		t.Error("writing into a missing directory succeeded")
	}
	noTempFiles(t, dir)
}

// TestWatch: the conf dir starts empty; Watch installs once the primary CNI
// writes its config, and again after the primary rewrites it without
// Ambit's entry or the binary disappears.
func TestWatch(t *testing.T) {
	confDir, binDir := t.TempDir(), t.TempDir()
	opts := Options{ConfDir: confDir, BinDir: binDir, PluginBinary: fakeBinary(t, "ambit-cni v1"), Interval: 20 * time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Watch(ctx, opts) }()

	primary := filepath.Join(confDir, "10-lab.conflist")
	orig := string(readFileT(t, "testdata/lab/10-lab.conflist"))
	installed := func() bool {
		data, err := os.ReadFile(primary)
		return err == nil && bytes.Contains(data, []byte(`"type": "ambit-cni"`))
	}
	binary := func() bool {
		_, err := os.Stat(filepath.Join(binDir, cni.PluginType))
		return err == nil
	}

	time.Sleep(50 * time.Millisecond) // a few rounds with nothing to install into
	writeFile(t, primary, orig)
	waitFor(t, "entry installed", installed)

	writeFile(t, primary, orig) // the primary CNI restarts and rewrites its config
	waitFor(t, "entry restored", installed)

	if err := os.Remove(filepath.Join(binDir, cni.PluginType)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "binary restored", binary)

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Watch = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Watch did not return after cancel")
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
