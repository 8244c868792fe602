package nodeagent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// InitSpec is what the pod-init trampoline does before it becomes the
// container's process. The node agent starts it with new UTS and mount
// namespaces and in the container's cgroup; pod-init finishes the job that
// cannot be done from outside: hostname, mounts, network namespace, exec.
type InitSpec struct {
	Hostname string `json:"hostname"`
	// NetNS is the pod's network namespace; empty for host-network pods,
	// which stay in the node's.
	NetNS  string  `json:"netns,omitempty"`
	Mounts []Mount `json:"mounts,omitempty"`
	// MountPointLog records, one per line, the directories and files
	// pod-init had to create on the host as mount points, so that the lab
	// removes them when it goes.
	MountPointLog string   `json:"mountPointLog,omitempty"`
	WorkingDir    string   `json:"workingDir,omitempty"`
	Argv          []string `json:"argv"`
	Env           []string `json:"env"`
}

// Mount is one bind mount into the container's mount namespace.
type Mount struct {
	Source   string `json:"source"`
	Target   string `json:"target"`
	ReadOnly bool   `json:"readOnly,omitempty"`
	// HostToContainer makes the mount a slave of the host's, so that
	// mounts made on the host later (new pod network namespaces under
	// /run/netns) appear in the container, as mountPropagation:
	// HostToContainer asks.
	HostToContainer bool `json:"hostToContainer,omitempty"`
}

// PodInitArg is the first argument that makes the lab binary run PodInit.
const PodInitArg = "pod-init"

// PodInit runs in the child the node agent started: it must be called from
// main with the main goroutine locked to its thread (setns changes only the
// calling thread's namespace; execve from that thread carries it to the
// new program). It returns only on error.
func PodInit(specJSON string) error {
	runtime.LockOSThread()
	var s InitSpec
	if err := json.Unmarshal([]byte(specJSON), &s); err != nil {
		return fmt.Errorf("reading the init spec: %w", err)
	}
	if err := unix.Sethostname([]byte(s.Hostname)); err != nil {
		return fmt.Errorf("setting hostname: %w", err)
	}
	// Nothing mounted here may propagate back to the host, but the
	// host's new mounts (pod network namespaces under /run/netns) may come
	// in: a slave of the host's mounts, as a container runtime's rslave
	// root.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
		return fmt.Errorf("making / a slave: %w", err)
	}
	for _, m := range s.Mounts {
		if err := bindMount(m, s.MountPointLog); err != nil {
			return err
		}
	}
	if s.NetNS != "" {
		fd, err := unix.Open(s.NetNS, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("opening netns %s: %w", s.NetNS, err)
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		_ = unix.Close(fd) // read-only; the thread stays in the namespace without it
		if err != nil {
			return fmt.Errorf("entering netns %s: %w", s.NetNS, err)
		}
	}
	if s.WorkingDir != "" {
		if err := os.Chdir(s.WorkingDir); err != nil {
			return fmt.Errorf("changing to workingDir %s: %w", s.WorkingDir, err)
		}
	}
	if len(s.Argv) == 0 {
		return errors.New("no command")
	}
	path := s.Argv[0]
	if !strings.Contains(path, "/") {
		for _, e := range s.Env {
			if p, ok := strings.CutPrefix(e, "PATH="); ok {
				if err := os.Setenv("PATH", p); err != nil {
					return fmt.Errorf("setting PATH for the command lookup: %w", err)
				}
			}
		}
		lp, err := exec.LookPath(path)
		if err != nil {
			return fmt.Errorf("finding %s in PATH: %w", path, err)
		}
		path = lp
	}
	err := syscall.Exec(path, s.Argv, s.Env)
	return fmt.Errorf("executing %s: %w", path, err)
}

func bindMount(m Mount, logFile string) error {
	st, err := os.Stat(m.Source)
	if err != nil {
		return fmt.Errorf("mount source %s: %w", m.Source, err)
	}
	if err := ensureMountPoint(m.Target, st.IsDir(), logFile); err != nil {
		return fmt.Errorf("making mount point %s: %w", m.Target, err)
	}
	if err := unix.Mount(m.Source, m.Target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind-mounting %s on %s: %w", m.Source, m.Target, err)
	}
	if m.HostToContainer {
		if err := unix.Mount("", m.Target, "", unix.MS_SLAVE|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("making %s a slave mount: %w", m.Target, err)
		}
	}
	if m.ReadOnly {
		if err := unix.Mount("", m.Target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("making %s read-only: %w", m.Target, err)
		}
	}
	return nil
}

// ensureMountPoint creates target (a directory, or an empty file) and any
// missing parents, logging each path it creates.
func ensureMountPoint(target string, dir bool, logFile string) error {
	if _, err := os.Lstat(target); err == nil {
		return nil
	}
	var created []string
	for p := filepath.Dir(target); p != "/"; p = filepath.Dir(p) {
		if _, err := os.Lstat(p); err == nil {
			break
		}
		created = append([]string{p}, created...)
	}
	for _, p := range created {
		if err := os.Mkdir(p, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
	}
	if dir {
		if err := os.Mkdir(target, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
	} else {
		f, err := os.OpenFile(target, os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
	}
	created = append(created, target)
	if logFile != "" {
		f, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		_, err = f.WriteString(strings.Join(created, "\n") + "\n")
		return errors.Join(err, f.Close())
	}
	return nil
}
