package kubeletapi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/cri-streaming/pkg/streaming/remotecommand"
	utilexec "k8s.io/utils/exec"
)

// defaultPath is the PATH an exec'd command gets when the container's
// environment has none; containerd uses the same for images without one.
const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// outputGrace is how long an exec waits, after its command exited, for
// processes the command left in the background to close stdout and stderr.
const outputGrace = 2 * time.Second

var lookNsenter = sync.OnceValues(func() (string, error) { return exec.LookPath("nsenter") })

// runInContainer runs argv in c's net, mount and UTS namespaces, with c's
// working directory, environment and cgroup, and waits for it.
//
// A Go process cannot setns into a mount namespace (the kernel refuses it
// to a multithreaded process), so util-linux nsenter does the entering and
// then execs argv: the pid we start is the command's. CLONE_INTO_CGROUP
// (SysProcAttr.UseCgroupFD) puts it in the container's cgroup before it runs
// a single instruction.
func runInContainer(ctx context.Context, c Container, argv []string, in io.Reader, out, errw io.Writer, tty bool, resize <-chan remotecommand.TerminalSize) error {
	if c.PID <= 0 {
		return fmt.Errorf("container has no process (pid %d)", c.PID)
	}
	// Otherwise nsenter would fail with exit code 1, which reads as the
	// command's own.
	if err := syscall.Kill(c.PID, 0); errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("container process %d is gone: %w", c.PID, ErrNotFound)
	}
	nsenter, err := lookNsenter()
	if err != nil {
		return fmt.Errorf("finding nsenter (install util-linux): %w", err)
	}
	// --wd without a value: the working directory of the target process.
	args := append([]string{"--target", strconv.Itoa(c.PID), "--net", "--mount", "--uts", "--wd", "--"}, argv...)
	cmd := exec.CommandContext(ctx, nsenter, args...)
	cmd.Env = execEnv(c.Env, tty)
	cmd.SysProcAttr = &syscall.SysProcAttr{}
	// Kill the whole process group, not just the command, when the session
	// ends early; the group is the command's own (Setpgid, or Setsid for a
	// tty).
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = outputGrace
	if c.CgroupPath != "" {
		fd, err := unix.Open(c.CgroupPath, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("opening cgroup of container: %w", err)
		}
		defer func() { _ = unix.Close(fd) }() // read-only, only needed for the clone
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = fd
	}
	if tty {
		err = runTTY(cmd, in, out, resize)
	} else {
		err = runPipes(cmd, in, out, errw)
	}
	return exitError(err)
}

// execEnv is the environment of an exec'd command: the container's, never
// the node agent's.
func execEnv(env []string, tty bool) []string {
	e := append([]string{}, env...)
	hasPath, hasTerm := false, false
	for _, kv := range e {
		hasPath = hasPath || strings.HasPrefix(kv, "PATH=")
		hasTerm = hasTerm || strings.HasPrefix(kv, "TERM=")
	}
	if !hasPath {
		e = append(e, defaultPath)
	}
	if tty && !hasTerm {
		// What runc and the kubelet set for a tty.
		e = append(e, "TERM=xterm")
	}
	return e
}

// exitError turns the exit of a command that ran into the
// utilexec.ExitError that remotecommand.ServeExec reports as an exit code.
func exitError(err error) error {
	if errors.Is(err, exec.ErrWaitDelay) {
		// The command exited 0; something it left behind kept its output
		// open past outputGrace.
		return nil
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return err
	}
	code := ee.ExitCode()
	if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		// As a shell reports it.
		code = 128 + int(ws.Signal())
	}
	return utilexec.CodeExitError{Err: err, Code: code}
}

// runPipes runs cmd with plain pipes.
func runPipes(cmd *exec.Cmd, in io.Reader, out, errw io.Writer) error {
	cmd.SysProcAttr.Setpgid = true
	cmd.Stdout, cmd.Stderr = out, errw
	// os/exec would wait for stdin to reach EOF before Wait returns, and a
	// client may keep stdin open after the command is done with it
	// (`kubectl exec -i pod -- true`). So stdin gets a pipe of its own that
	// is simply closed when the command exits.
	var stdinW *os.File
	if in != nil {
		r, w, err := os.Pipe()
		if err != nil {
			return fmt.Errorf("creating stdin pipe: %w", err)
		}
		cmd.Stdin, stdinW = r, w
		// For the paths where the copy below never starts; after it, this
		// Close only reports os.ErrClosed.
		defer func() { _ = w.Close() }()
	}
	err := cmd.Start()
	if r, ok := cmd.Stdin.(*os.File); ok {
		_ = r.Close() // the child has its own copy
	}
	if err != nil {
		return fmt.Errorf("starting nsenter: %w", err)
	}
	if stdinW != nil {
		go func() {
			_, _ = io.Copy(stdinW, in)
			_ = stdinW.Close()
		}()
	}
	return cmd.Wait()
}

// runTTY runs cmd on a new pseudo-terminal as its controlling terminal;
// stdout carries the terminal's output (there is no separate stderr).
func runTTY(cmd *exec.Cmd, in io.Reader, out io.Writer, resize <-chan remotecommand.TerminalSize) error {
	ptmx, pts, err := openPTY()
	if err != nil {
		return err
	}
	defer func() { _ = ptmx.Close() }() // also closed below on a slow exit
	cmd.Stdin, cmd.Stdout, cmd.Stderr = pts, pts, pts
	cmd.SysProcAttr.Setsid = true
	cmd.SysProcAttr.Setctty = true
	cmd.SysProcAttr.Ctty = 0 // the child's stdin
	err = cmd.Start()
	_ = pts.Close() // the child has its own copy
	if err != nil {
		return fmt.Errorf("starting nsenter: %w", err)
	}
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			select {
			case sz, ok := <-resize:
				if !ok {
					return
				}
				_ = setWinsize(ptmx, sz)
			case <-done:
				return
			}
		}
	}()
	if in != nil {
		go func() { _, _ = io.Copy(ptmx, in) }()
	}
	if out == nil {
		out = io.Discard
	}
	copied := make(chan struct{})
	go func() {
		// Ends with EIO once every holder of the terminal closed it.
		_, _ = io.Copy(out, ptmx)
		close(copied)
	}()
	err = cmd.Wait()
	select {
	case <-copied:
	case <-time.After(outputGrace):
		_ = ptmx.Close() // ends the copy
		<-copied
	}
	return err
}

// openPTY opens a new pseudo-terminal pair, as openpty(3) does: unlock the
// /dev/ptmx master, ask its number, open /dev/pts/<n>.
func openPTY() (ptmx, pts *os.File, err error) {
	ptmx, err = os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("opening /dev/ptmx for a tty: %w", err)
	}
	var n uint32
	rc, err := ptmx.SyscallConn()
	if err == nil {
		// Control, not Fd: Fd would put the master in blocking mode, and a
		// blocked Read could then not be interrupted by Close.
		cerr := rc.Control(func(fd uintptr) {
			if err = unix.IoctlSetPointerInt(int(fd), unix.TIOCSPTLCK, 0); err != nil {
				return
			}
			n, err = unix.IoctlGetUint32(int(fd), unix.TIOCGPTN)
		})
		err = errors.Join(err, cerr)
	}
	if err != nil {
		_ = ptmx.Close()
		return nil, nil, fmt.Errorf("unlocking tty: %w", err)
	}
	name := "/dev/pts/" + strconv.FormatUint(uint64(n), 10)
	pts, err = os.OpenFile(name, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		_ = ptmx.Close()
		return nil, nil, fmt.Errorf("opening %s: %w", name, err)
	}
	return ptmx, pts, nil
}

func setWinsize(ptmx *os.File, sz remotecommand.TerminalSize) error {
	rc, err := ptmx.SyscallConn()
	if err != nil {
		return err
	}
	var ierr error
	err = rc.Control(func(fd uintptr) {
		ierr = unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, &unix.Winsize{Row: sz.Height, Col: sz.Width})
	})
	return errors.Join(err, ierr)
}
