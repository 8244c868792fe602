package lab

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Proc is a daemon the lab started. It is recorded by pid and start time so
// that a later `lab down`, in another process, stops exactly it and never a
// process that reused the pid.
type Proc struct {
	Name      string `json:"name"`
	PID       int    `json:"pid"`
	StartTime uint64 `json:"startTime"` // field 22 of /proc/<pid>/stat
	Log       string `json:"log"`
}

// startDaemon runs argv in the named network namespace (none: the host's), in
// a session of its own so that it outlives the command that started it, with
// stdout and stderr appended to logFile.
func startDaemon(name, netnsName, logFile string, env []string, argv ...string) (Proc, error) {
	if netnsName != "" {
		// nsenter rather than `ip netns exec`: the latter remounts /sys,
		// hiding bpffs and the cgroup2 mount from the daemon, and makes
		// the network namespaces the daemon creates invisible host-wide.
		argv = append([]string{"nsenter", "--net=" + netnsPath(netnsName), "--"}, argv...)
	}
	f, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return Proc{}, fmt.Errorf("opening log of %s: %w", name, err)
	}
	// The child has its own copy of the log fd; the parent never writes to f.
	defer func() { _ = f.Close() }()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return Proc{}, fmt.Errorf("starting %s: %w", name, err)
	}
	p := Proc{Name: name, PID: cmd.Process.Pid, Log: logFile}
	p.StartTime, _ = procStartTime(p.PID)
	// Reap it if it dies while we are still around; once we exit, init
	// does.
	go func() { _ = cmd.Wait() }()
	return p, nil
}

// Alive reports whether the recorded process still runs (and is not a
// zombie).
func (p Proc) Alive() bool {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.PID))
	if err != nil {
		return false
	}
	fields := statFields(string(st))
	if len(fields) < 20 || fields[0] == "Z" {
		return false
	}
	start, _ := strconv.ParseUint(fields[19], 10, 64)
	return p.StartTime == 0 || start == p.StartTime
}

// Stop sends SIGTERM to the process's group, waits up to grace for it to go,
// then SIGKILLs the group.
func (p Proc) Stop(grace time.Duration) error {
	if !p.Alive() {
		return nil
	}
	_ = syscall.Kill(-p.PID, syscall.SIGTERM)
	_ = syscall.Kill(p.PID, syscall.SIGTERM)
	if waitFor(grace, func() bool { return !p.Alive() }) {
		return nil
	}
	_ = syscall.Kill(-p.PID, syscall.SIGKILL)
	_ = syscall.Kill(p.PID, syscall.SIGKILL)
	if waitFor(5*time.Second, func() bool { return !p.Alive() }) {
		return nil
	}
	return fmt.Errorf("process %s (pid %d) did not exit after SIGKILL", p.Name, p.PID)
}

func procStartTime(pid int) (uint64, error) {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	fields := statFields(string(st))
	if len(fields) < 20 {
		return 0, errors.New("short /proc stat")
	}
	return strconv.ParseUint(fields[19], 10, 64)
}

// statFields returns the fields of /proc/<pid>/stat after the command name
// (which may contain spaces), so fields[0] is the state.
func statFields(stat string) []string {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(stat[i+1:])
}

// waitFor polls cond every 50 ms until it holds or d has passed.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}
