package plugin

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
)

// maxLogFile is the size past which the log file is moved to LogFile+".1"
// (replacing the one before) when the plugin starts. The plugin runs once
// per pod event, so the file would otherwise grow for the node's lifetime.
const maxLogFile = 5 << 20

// logLevel parses log_level. Unknown levels log at info rather than fail:
// a typo in a log setting must not stop pods from starting.
func logLevel(s string) (slog.Level, bool) {
	switch strings.ToLower(s) {
	case "debug":
		return slog.LevelDebug, true
	case "", "info":
		return slog.LevelInfo, true
	case "warn", "warning":
		return slog.LevelWarn, true
	case "error":
		return slog.LevelError, true
	}
	return slog.LevelInfo, false
}

// logger returns the log for one invocation, to conf.LogFile or else to
// stderr, and a func that closes it. conf may be nil (stdin did not parse).
func (p *Plugin) logger(conf *Config, cmd string, containerID string) (*slog.Logger, func()) {
	w, done := p.stderr(), func() {}
	var (
		level   = slog.LevelInfo
		badLvl  string
		fileErr error
	)
	if conf != nil {
		var ok bool
		if level, ok = logLevel(conf.LogLevel); !ok {
			badLvl = conf.LogLevel
		}
		if conf.LogFile != "" {
			if f, err := openLogFile(conf.LogFile); err != nil {
				fileErr = err
			} else {
				w, done = f, func() { _ = f.Close() }
			}
		}
	}
	log := slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level})).
		With("plugin", "ambit-cni", "cmd", cmd, "containerID", containerID)
	if fileErr != nil {
		log.Warn("cannot open log_file; logging to stderr", "error", fileErr)
	}
	if badLvl != "" {
		log.Warn("unknown log_level; using info", "log_level", badLvl)
	}
	return log, done
}

func openLogFile(path string) (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	// Several plugin processes may race here; the worst case is that one
	// of them rotates a file the other just rotated, losing a few lines.
	if st, err := os.Stat(path); err == nil && st.Size() > maxLogFile {
		_ = os.Rename(path, path+".1")
	}
	return os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
}
