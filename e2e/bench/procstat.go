package bench

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// userHZ is the unit of utime and stime in /proc/<pid>/stat: USER_HZ,
// which the kernel fixes at 100 for user space on every architecture
// (proc(5): "measured in clock ticks (divide by sysconf(_SC_CLK_TCK))").
const userHZ = 100

// procCPU parses /proc/<pid>/stat: utime plus stime in seconds (all the
// process's threads), and the start time that, with the pid, names the
// process. The command name (field 2) may hold spaces and parentheses,
// so fields are counted from the last ')'.
func procCPU(stat string) (cpuSeconds float64, startTime uint64, err error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, 0, errors.New("no ')' in /proc stat")
	}
	f := strings.Fields(stat[i+1:]) // f[0] is field 3, state
	if len(f) < 20 {
		return 0, 0, fmt.Errorf("short /proc stat: %d fields", len(f)+2)
	}
	utime, err1 := strconv.ParseUint(f[14-3], 10, 64)
	stime, err2 := strconv.ParseUint(f[15-3], 10, 64)
	start, err3 := strconv.ParseUint(f[22-3], 10, 64)
	if err := errors.Join(err1, err2, err3); err != nil {
		return 0, 0, fmt.Errorf("parsing /proc stat: %w", err)
	}
	return float64(utime+stime) / userHZ, start, nil
}

// procStatusKB returns a "kB" line of /proc/<pid>/status, such as VmRSS
// (resident now) or VmHWM (peak resident since start or the last reset).
func procStatusKB(status, key string) (uint64, error) {
	for line := range strings.Lines(status) {
		rest, ok := strings.CutPrefix(line, key+":")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("unexpected %s line %q", key, strings.TrimSpace(line))
		}
		return strconv.ParseUint(f[0], 10, 64)
	}
	return 0, fmt.Errorf("no %s in /proc status", key)
}

// Proc is a process the harness measures (never signals): a tunnel or the
// controller, found through its container's cgroup.
type Proc struct {
	Role      string `json:"role"` // e.g. "ztunnel node-1"
	PID       int    `json:"pid"`
	StartTime uint64 `json:"startTime"` // field 22 of /proc/<pid>/stat
	Exe       string `json:"exe"`
}

// cpu returns the process's CPU seconds so far, checking that the pid
// still names the same process.
func (p Proc) cpu() (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.PID))
	if err != nil {
		return 0, fmt.Errorf("%s (pid %d): %w", p.Role, p.PID, err)
	}
	secs, start, err := procCPU(string(b))
	if err != nil {
		return 0, fmt.Errorf("%s (pid %d): %w", p.Role, p.PID, err)
	}
	if start != p.StartTime {
		return 0, fmt.Errorf("%s (pid %d) restarted during the bench", p.Role, p.PID)
	}
	return secs, nil
}

// memKB returns VmRSS or VmHWM in kB.
func (p Proc) memKB(key string) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.PID))
	if err != nil {
		return 0, fmt.Errorf("%s (pid %d): %w", p.Role, p.PID, err)
	}
	return procStatusKB(string(b), key)
}

// resetPeak resets VmHWM to the current RSS (proc(5), clear_refs: "5"), so
// that the next VmHWM is the peak of what follows.
func (p Proc) resetPeak() error {
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", p.PID), []byte("5"), 0); err != nil {
		return fmt.Errorf("resetting the peak RSS of %s (pid %d): %w", p.Role, p.PID, err)
	}
	return nil
}

// containerProcs returns the processes of a lab container: the lab's node
// agent runs each container in the cgroup
// <cgroup2>/ambit-lab-<lab>/<node>/<pod uid>/<container>.
func containerProcs(cgroupRoot, labName, node, podUID, container, role string) ([]Proc, error) {
	dir := filepath.Join(cgroupRoot, "ambit-lab-"+labName, node, podUID, container)
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil, fmt.Errorf("reading the processes of %s: %w", role, err)
	}
	var out []Proc
	for _, s := range strings.Fields(string(b)) {
		pid, err := strconv.Atoi(s)
		if err != nil {
			continue
		}
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue // exited meanwhile
		}
		_, start, err := procCPU(string(st))
		if err != nil {
			continue
		}
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		out = append(out, Proc{Role: role, PID: pid, StartTime: start, Exe: exe})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no process in %s (%s)", dir, role)
	}
	return out, nil
}

// cpuOf sums the CPU seconds of procs.
func cpuOf(procs []Proc) (float64, error) {
	var sum float64
	for _, p := range procs {
		s, err := p.cpu()
		if err != nil {
			return 0, err
		}
		sum += s
	}
	return sum, nil
}
