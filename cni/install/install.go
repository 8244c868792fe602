package install

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"

	"github.com/ambitmesh/ambit/cni"
)

var (
	// ErrNoPrimaryConfig: the conf dir holds no network config yet. The
	// primary CNI writes one when it starts; Watch keeps trying.
	ErrNoPrimaryConfig = errors.New("no CNI network config (.conf, .conflist, .json) in the CNI conf dir yet")
	// ErrInvalidConfig: the primary config cannot be edited or would not
	// load (libcni is the judge, as the runtimes use it).
	ErrInvalidConfig = errors.New("unusable CNI network config")
	// ErrUnsupportedCNIVersion: the primary config's cniVersion is one the
	// plugin does not speak (cni.SupportedCNIVersions); installing would
	// fail every ADD on the node.
	ErrUnsupportedCNIVersion = errors.New("unsupported cniVersion")
	// ErrInvalidOptions: Options that would install a plugin that cannot
	// work.
	ErrInvalidOptions = errors.New("invalid install options")
)

// confExtensions are the files a container runtime reads network configs
// from (containerd and CRI-O: libcni.ConfFiles with these, sorted by file
// name); the first is the pod network. A runtime reads .conflist as a list
// and .conf and .json as a single plugin.
var confExtensions = []string{".conf", ".conflist", ".json"}

// DefaultInterval is how often Watch looks at the files.
const DefaultInterval = 5 * time.Second

// Options say where the node's CNI files are and what Ambit's entry says.
type Options struct {
	// ConfDir is the node's CNI conf dir (the host's /etc/cni/net.d, as
	// the agent sees it). Required.
	ConfDir string
	// BinDir is the directory the runtime finds CNI plugins in (the host's
	// /opt/cni/bin, as the agent sees it). Required with PluginBinary.
	BinDir string
	// PluginBinary is the ambit-cni binary to copy into BinDir as
	// cni.PluginType. Empty means the binary gets there some other way
	// and is not Install's or Uninstall's business (the lab's CNI path
	// includes the repo's bin/).
	PluginBinary string
	// Plugin is Ambit's entry. Install writes the defaults out (socket,
	// timeout, log level) so that the conflist says what the plugin does.
	Plugin cni.PluginConfig
	// Interval is how often Watch looks; zero means DefaultInterval.
	Interval time.Duration
	// Logger receives what Install, Uninstall and Watch change. Nil
	// discards.
	Logger *slog.Logger
}

func (o *Options) validate() error {
	switch {
	case o.ConfDir == "":
		return fmt.Errorf("%w: no ConfDir", ErrInvalidOptions)
	case o.PluginBinary != "" && o.BinDir == "":
		return fmt.Errorf("%w: PluginBinary without BinDir", ErrInvalidOptions)
	case o.Plugin.AgentSocket != "" && !filepath.IsAbs(o.Plugin.AgentSocket):
		return fmt.Errorf("%w: agent socket %q is not an absolute path", ErrInvalidOptions, o.Plugin.AgentSocket)
	case o.Plugin.TimeoutSeconds < 0:
		return fmt.Errorf("%w: negative timeout %d", ErrInvalidOptions, o.Plugin.TimeoutSeconds)
	}
	return nil
}

func (o *Options) logger() *slog.Logger {
	if o.Logger != nil {
		return o.Logger
	}
	return slog.New(slog.DiscardHandler)
}

// entryConfig is o.Plugin with the defaults written out.
func (o *Options) entryConfig() cni.PluginConfig {
	pc := o.Plugin
	if pc.AgentSocket == "" {
		pc.AgentSocket = cni.DefaultAgentSocket
	}
	if pc.TimeoutSeconds == 0 {
		pc.TimeoutSeconds = cni.DefaultTimeoutSeconds
	}
	if pc.LogLevel == "" {
		pc.LogLevel = "info"
	}
	return pc
}

// Result says what Install found and did.
type Result struct {
	// ConfFile is the conflist that holds Ambit's entry.
	ConfFile string
	// ConfChanged reports whether Install wrote it.
	ConfChanged bool
	// BinaryChanged reports whether Install wrote the binary.
	BinaryChanged bool
}

// Install puts the plugin on the node: it copies the binary into BinDir
// (when PluginBinary is set) and then puts Ambit's entry at the end of the
// primary conflist, the first network config in ConfDir by file name, as
// the runtime picks it. A single-plugin .conf or .json becomes a .conflist
// of the same base name holding that plugin and Ambit's entry (the runtime
// then picks it: X.conflist sorts right after X.conf, which is removed).
//
// Install is idempotent: with the entry already as wanted it writes
// nothing; an entry that differs is updated where it stands. Every file is
// written atomically (temporary file in the same directory, fsync,
// rename), so a runtime reading concurrently sees the old file or the new
// one, and the binary is in place before any config names it.
func Install(opts Options) (Result, error) {
	if err := opts.validate(); err != nil {
		return Result{}, err
	}
	var in installer
	return in.install(&opts)
}

// installer is Install with memory, for Watch: it remembers the binary it
// checked, so that Watch reads the binary again only when it changed.
type installer struct {
	bin fs.FileInfo
}

func (in *installer) install(opts *Options) (Result, error) {
	var res Result
	log := opts.logger()
	if opts.PluginBinary != "" {
		dst := filepath.Join(opts.BinDir, cni.PluginType)
		changed, err := in.ensureBinary(opts.PluginBinary, dst)
		if err != nil {
			return res, err
		}
		if res.BinaryChanged = changed; changed {
			log.Info("installed CNI plugin binary", "path", dst)
		}
	}
	file, changed, err := installConf(opts.ConfDir, opts.entryConfig())
	res.ConfFile, res.ConfChanged = file, changed
	if err != nil {
		return res, err
	}
	if changed {
		log.Info("installed CNI plugin entry", "conflist", file)
	}
	return res, nil
}

// ensureBinary copies src to dst unless dst is unchanged since the last
// look or already holds the same bytes.
func (in *installer) ensureBinary(src, dst string) (bool, error) {
	if st, err := os.Stat(dst); err == nil && in.bin != nil &&
		os.SameFile(st, in.bin) && st.Size() == in.bin.Size() && st.ModTime().Equal(in.bin.ModTime()) {
		return false, nil
	}
	changed, err := copyBinary(src, dst)
	if err != nil {
		return false, err
	}
	if in.bin, err = os.Stat(dst); err != nil {
		return changed, err
	}
	return changed, nil
}

// primaryConfig is the network config file the runtime uses.
func primaryConfig(dir string) (string, error) {
	files, err := libcni.ConfFiles(dir, confExtensions)
	if err != nil {
		return "", fmt.Errorf("reading CNI conf dir %s: %w", dir, err)
	}
	if len(files) == 0 {
		return "", fmt.Errorf("%w: %s", ErrNoPrimaryConfig, dir)
	}
	slices.Sort(files)
	return files[0], nil
}

func installConf(dir string, pc cni.PluginConfig) (file string, changed bool, err error) {
	primary, err := primaryConfig(dir)
	if err != nil {
		return "", false, err
	}
	data, perm, err := readFile(primary)
	if err != nil {
		return primary, false, err
	}
	if filepath.Ext(primary) == ".conflist" {
		out, changed, err := withEntry(data, pc)
		if err == nil {
			err = check(out)
		}
		if err != nil {
			return primary, false, fmt.Errorf("%s: %w", primary, err)
		}
		if !changed {
			return primary, false, nil
		}
		return primary, true, writeFileAtomic(primary, out, perm)
	}
	list := strings.TrimSuffix(primary, filepath.Ext(primary)) + ".conflist"
	if err := ownConversion(list, filepath.Base(primary)); err != nil {
		return primary, false, err
	}
	out, err := converted(filepath.Base(primary), data, pc)
	if err == nil {
		err = check(out)
	}
	if err != nil {
		return primary, false, fmt.Errorf("%s: %w", primary, err)
	}
	// The list first, then the original goes: the runtime always has a
	// network config to read.
	if err := writeFileAtomic(list, out, perm); err != nil {
		return list, false, err
	}
	if err := removeFile(primary); err != nil {
		return list, true, err
	}
	return list, true, nil
}

// ownConversion checks that the conflist a conversion of name would write
// is absent or an earlier conversion of name (the primary CNI wrote its
// .conf again since): any other file of that name belongs to someone else.
func ownConversion(list, name string) error {
	data, err := os.ReadFile(list)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if l, err := parseConflist(data); err == nil {
		for _, p := range l.plugins {
			if pp := readPlugin(p); pp.Type == cni.PluginType && pp.ConvertedFrom == name {
				return nil
			}
		}
	}
	return fmt.Errorf("%w: converting %s would overwrite %s, which is not an earlier conversion of it", ErrInvalidConfig, name, list)
}

// Uninstall takes the plugin off the node: Ambit's entries out of every
// conflist in ConfDir, each list otherwise as it was (a list Install
// converted from a single-plugin file goes back to that file, unless the
// primary CNI has written that file again meanwhile, in which case the
// converted copy is just removed), then the binary (when PluginBinary is
// set), last, so that no config names a missing plugin.
func Uninstall(opts Options) error {
	if err := opts.validate(); err != nil {
		return err
	}
	log := opts.logger()
	files, err := libcni.ConfFiles(opts.ConfDir, []string{".conflist"})
	if err != nil {
		return fmt.Errorf("reading CNI conf dir %s: %w", opts.ConfDir, err)
	}
	slices.Sort(files)
	var errs []error
	for _, f := range files {
		restored, err := uninstallConf(f)
		switch {
		case err != nil:
			errs = append(errs, err)
		case restored != "":
			log.Info("removed CNI plugin entry", "conflist", f, "config", restored)
		}
	}
	if len(errs) > 0 {
		// Keep the binary: some config may still name it.
		return errors.Join(errs...)
	}
	if opts.PluginBinary != "" {
		bin := filepath.Join(opts.BinDir, cni.PluginType)
		if err := removeFile(bin); err != nil {
			return err
		}
		log.Info("removed CNI plugin binary", "path", bin)
	}
	return nil
}

// uninstallConf removes Ambit's entries from the conflist f and returns the
// file that now holds what f held ("" when f had no entry).
func uninstallConf(f string) (string, error) {
	data, perm, err := readFile(f)
	if err != nil {
		return "", err
	}
	if !bytes.Contains(data, []byte(cni.PluginType)) {
		// Not ours, whatever else it is (even unparsable).
		return "", nil
	}
	out, found, restore, err := withoutEntry(data)
	if err != nil {
		return "", fmt.Errorf("%s: %w", f, err)
	}
	if !found {
		return "", nil
	}
	if restore == "" {
		return f, writeFileAtomic(f, out, perm)
	}
	orig := filepath.Join(filepath.Dir(f), restore)
	if _, err := os.Stat(orig); errors.Is(err, fs.ErrNotExist) {
		// The original first, then the list goes.
		if err := writeFileAtomic(orig, out, perm); err != nil {
			return "", err
		}
	}
	return orig, removeFile(f)
}

// Watch keeps the plugin installed until ctx is done: every Interval it runs
// Install again, which puts Ambit's entry back when something (the primary
// CNI, restarting) has rewritten the conflist without it, and the binary
// when it is gone or changed. It polls rather than using inotify: a few
// stat and read calls every few seconds cost nothing, and polling also
// sees a conf dir that did not exist yet or was replaced. Errors are logged
// (each distinct one once) and retried; Watch returns nil when ctx is done,
// or an error only for invalid Options.
func Watch(ctx context.Context, opts Options) error {
	if err := opts.validate(); err != nil {
		return err
	}
	interval := opts.Interval
	if interval <= 0 {
		interval = DefaultInterval
	}
	log := opts.logger()
	tick := time.NewTicker(interval)
	defer tick.Stop()
	var (
		in      installer
		lastErr string
	)
	for {
		res, err := in.install(&opts)
		switch {
		case err != nil && err.Error() != lastErr:
			log.Warn("cannot install the CNI plugin; retrying", "error", err, "retry", interval)
			lastErr = err.Error()
		case err == nil && lastErr != "":
			log.Info("CNI plugin installed", "conflist", res.ConfFile)
			lastErr = ""
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}
