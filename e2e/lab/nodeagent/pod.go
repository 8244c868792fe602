package nodeagent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ambitmesh/ambit/e2e/lab/nodeagent/kubeletapi"
	"github.com/ambitmesh/ambit/e2e/lab/nodeagent/podspec"
)

// podWorker owns one pod from its first sight to its removal.
type podWorker struct {
	a   *Agent
	log *slog.Logger
	uid types.UID

	mu         sync.Mutex
	pod        *corev1.Pod
	sandbox    *sandbox
	volumes    *podspec.Volumes
	init       []*ctr
	ctrs       []*ctr
	initDone   bool
	startTime  *metav1.Time
	pending    *corev1.ContainerStateWaiting // why the pod cannot start yet
	deleting   chan struct{}
	deleteOnce sync.Once
	goneCh     chan struct{}
	goneOnce   sync.Once
	dirty      chan struct{}
}

// ctr is one container's runtime state.
type ctr struct {
	spec     corev1.Container
	isInit   bool
	restarts int32

	pid        int
	cgroup     string
	env        []string
	logPath    string
	prevLog    string
	started    bool
	ready      bool
	startedAt  metav1.Time
	waiting    *corev1.ContainerStateWaiting
	terminated *corev1.ContainerStateTerminated
	last       *corev1.ContainerStateTerminated
	done       chan struct{} // closed when the current process exits
	killed     bool          // stopped by us (liveness or deletion)
	stopping   bool
}

func newPodWorker(a *Agent, pod *corev1.Pod) *podWorker {
	w := &podWorker{
		a:        a,
		log:      a.log.With("pod", pod.Namespace+"/"+pod.Name),
		uid:      pod.UID,
		pod:      pod.DeepCopy(),
		deleting: make(chan struct{}),
		goneCh:   make(chan struct{}),
		dirty:    make(chan struct{}, 1),
	}
	for _, c := range pod.Spec.InitContainers {
		w.init = append(w.init, &ctr{spec: c, isInit: true, waiting: &corev1.ContainerStateWaiting{Reason: "PodInitializing"}})
	}
	for _, c := range pod.Spec.Containers {
		w.ctrs = append(w.ctrs, &ctr{spec: c, waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}})
	}
	return w
}

func (w *podWorker) current() *corev1.Pod {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.pod
}

func (w *podWorker) update(pod *corev1.Pod) {
	w.mu.Lock()
	w.pod = pod.DeepCopy()
	vols := w.volumes
	w.mu.Unlock()
	if vols != nil {
		// Downward API files follow label and annotation changes.
		if err := vols.UpdatePod(w.a.nodeLocalHostPaths(pod)); err != nil {
			w.log.Warn("updating downward API volumes", "error", err)
		}
	}
	if pod.DeletionTimestamp != nil {
		w.deleteOnce.Do(func() { close(w.deleting) })
	}
}

func (w *podWorker) gone() {
	w.goneOnce.Do(func() { close(w.goneCh) })
	w.deleteOnce.Do(func() { close(w.deleting) })
}

func (w *podWorker) markDirty() {
	select {
	case w.dirty <- struct{}{}:
	default:
	}
}

// run is the pod's life: prepare, init containers, containers, then
// termination once the pod is deleted.
func (w *podWorker) run(parent context.Context) {
	defer w.a.wg.Done()
	defer w.a.forget(w.uid)
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	statusDone := make(chan struct{})
	go func() { defer close(statusDone); w.statusLoop(ctx) }()
	w.markDirty()

	running := w.prepare(ctx) && w.runInit(ctx)
	if running {
		for _, c := range w.ctrs {
			go w.containerLoop(ctx, c)
		}
		go w.refreshVolumes(ctx)
	}
	select {
	case <-parent.Done():
		// The agent stops (the lab goes down): kill the containers and
		// reap them, so that no zombie outlives the agent; the lab
		// removes namespaces and files.
		w.kill()
		return
	case <-w.deleting:
	}
	w.terminate(parent)
	cancel()
	<-statusDone
	w.cleanup(parent)
}

// prepare materialises volumes and makes the sandbox, retrying until it
// works or the pod is deleted.
func (w *podWorker) prepare(ctx context.Context) bool {
	pod := w.current()
	for _, c := range append(append([]corev1.Container{}, pod.Spec.InitContainers...), pod.Spec.Containers...) {
		if _, err := resolveCommand(w.a.opts.BinDir, c.Image, c.Command, c.Args); err != nil {
			w.setPending("ErrImagePull", err.Error())
			w.log.Warn("refusing pod", "error", err)
			<-w.deleting
			return false
		}
	}
	backoff := time.Second
	for {
		err := w.tryPrepare(ctx)
		if err == nil {
			w.setPending("", "")
			return true
		}
		w.log.Warn("preparing pod", "error", err)
		reason := "ContainerCreating"
		var cfgErr configError
		if errors.As(err, &cfgErr) {
			reason = "CreateContainerConfigError"
		}
		w.setPending(reason, err.Error())
		select {
		case <-w.deleting:
			return false
		case <-ctx.Done():
			return false
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 30*time.Second)
	}
}

type configError struct{ error }

func (w *podWorker) tryPrepare(ctx context.Context) error {
	pod := w.current()
	w.mu.Lock()
	if w.volumes == nil {
		w.volumes = podspec.NewVolumes(w.a.opts.Client, filepath.Join(w.a.opts.Dir, "pods"), w.a.nodeLocalHostPaths(pod), w.log)
	}
	w.mu.Unlock()
	if err := w.volumes.Setup(ctx); err != nil {
		return configError{fmt.Errorf("setting up volumes: %w", err)}
	}
	w.mu.Lock()
	sb := w.sandbox
	w.mu.Unlock()
	if sb == nil {
		var err error
		sb, err = w.a.createSandbox(ctx, pod)
		if err != nil {
			return fmt.Errorf("creating pod sandbox: %w", err)
		}
		w.mu.Lock()
		w.sandbox = sb
		now := metav1.Now()
		w.startTime = &now
		w.mu.Unlock()
	}
	dir := w.a.podDir(pod.UID)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if rc := w.a.resolvConf(pod); rc != "" {
		if err := os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte(rc), 0o644); err != nil {
			return err
		}
	}
	if !pod.Spec.HostNetwork {
		if err := os.WriteFile(filepath.Join(dir, "hosts"), []byte(hostsFile(pod, sb.ip)), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func (w *podWorker) setPending(reason, msg string) {
	w.mu.Lock()
	if reason == "" {
		w.pending = nil
	} else {
		w.pending = &corev1.ContainerStateWaiting{Reason: reason, Message: msg}
	}
	w.mu.Unlock()
	w.markDirty()
}

// runInit runs the init containers one after another to completion.
func (w *podWorker) runInit(ctx context.Context) bool {
	policy := w.current().Spec.RestartPolicy
	for _, c := range w.init {
		backoff := time.Second
		for {
			code, err := w.runOnce(ctx, c)
			if err == nil && code == 0 {
				break
			}
			if policy == corev1.RestartPolicyNever {
				return false
			}
			w.mu.Lock()
			c.restarts++
			c.waiting = &corev1.ContainerStateWaiting{Reason: "CrashLoopBackOff", Message: fmt.Sprintf("back-off %s restarting failed container", backoff)}
			w.mu.Unlock()
			w.markDirty()
			select {
			case <-w.deleting:
				return false
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 30*time.Second)
		}
	}
	w.mu.Lock()
	w.initDone = true
	w.mu.Unlock()
	w.markDirty()
	return true
}

// containerLoop runs a container and restarts it by the pod's policy.
func (w *podWorker) containerLoop(ctx context.Context, c *ctr) {
	policy := w.current().Spec.RestartPolicy
	backoff := time.Second
	for {
		probeCtx, stopProbes := context.WithCancel(ctx)
		go w.probe(probeCtx, c)
		t0 := time.Now()
		code, err := w.runOnce(ctx, c)
		stopProbes()
		w.mu.Lock()
		stopping := c.stopping
		w.mu.Unlock()
		if stopping || ctx.Err() != nil {
			return
		}
		restart := policy == corev1.RestartPolicyAlways || policy == "" ||
			(policy == corev1.RestartPolicyOnFailure && (code != 0 || err != nil))
		if !restart {
			w.markDirty()
			return
		}
		if time.Since(t0) > time.Minute {
			backoff = time.Second
		}
		w.mu.Lock()
		c.restarts++
		c.waiting = &corev1.ContainerStateWaiting{Reason: "CrashLoopBackOff", Message: fmt.Sprintf("back-off %s restarting failed container %s", backoff, c.spec.Name)}
		w.mu.Unlock()
		w.markDirty()
		select {
		case <-ctx.Done():
			return
		case <-w.deleting:
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 30*time.Second)
	}
}

// runOnce starts the container's process and waits for it to exit.
func (w *podWorker) runOnce(ctx context.Context, c *ctr) (int, error) {
	cmd, err := w.startProcess(ctx, c)
	if err != nil {
		w.log.Warn("starting container", "container", c.spec.Name, "error", err)
		w.mu.Lock()
		c.waiting = &corev1.ContainerStateWaiting{Reason: "RunContainerError", Message: err.Error()}
		c.terminated = nil
		w.mu.Unlock()
		w.markDirty()
		return -1, err
	}
	w.markDirty()
	// A non-zero exit comes back as an *exec.ExitError; the exit status is
	// read from cmd.ProcessState instead, which also covers a signal. The
	// container's output goes to a file, so Wait has no copying to fail.
	_ = cmd.Wait()
	code := 0
	if cmd.ProcessState != nil {
		code = cmd.ProcessState.ExitCode()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			code = 128 + int(ws.Signal())
		}
	}
	w.mu.Lock()
	reason := "Completed"
	if code != 0 {
		reason = "Error"
	}
	t := &corev1.ContainerStateTerminated{
		ExitCode: int32(code), Reason: reason, StartedAt: c.startedAt, FinishedAt: metav1.Now(),
		ContainerID: w.containerID(c),
	}
	c.terminated, c.last = t, t
	c.ready = false
	c.pid = 0
	close(c.done)
	w.mu.Unlock()
	w.log.Info("container exited", "container", c.spec.Name, "exitCode", code)
	w.markDirty()
	return code, nil
}

func (w *podWorker) containerID(c *ctr) string {
	return fmt.Sprintf("lab://%s-%s-%d", w.uid, c.spec.Name, c.restarts)
}

// startProcess starts a container: pod-init in new UTS and mount namespaces
// and in the container's cgroup, which then enters the pod's network
// namespace and executes the container's command.
func (w *podWorker) startProcess(ctx context.Context, c *ctr) (*exec.Cmd, error) {
	pod := w.current()
	w.mu.Lock()
	sb := w.sandbox
	w.mu.Unlock()
	podWithIP := pod.DeepCopy()
	podWithIP.Status.PodIP = sb.ip
	podWithIP.Status.PodIPs = []corev1.PodIP{{IP: sb.ip}}
	podWithIP.Status.HostIP = w.a.opts.NodeIP
	services, _ := w.a.services.List(labels.Everything())
	env, err := podspec.Env(ctx, w.a.opts.Client, podWithIP, &c.spec, services, w.a.opts.NodeIP)
	if err != nil {
		return nil, fmt.Errorf("computing environment: %w", err)
	}
	// $(VAR) in command and args expands from the container's env, as
	// kubelet does, before the image's entrypoint is combined with them.
	command, args := podspec.ExpandCommand(&c.spec, env)
	argv, err := resolveCommand(w.a.opts.BinDir, c.spec.Image, command, args)
	if err != nil {
		return nil, err
	}
	env = withPath(env, w.a.opts.BinDir)
	vmounts, err := w.volumes.MountsWithEnv(&c.spec, env)
	if err != nil {
		return nil, err
	}
	var mounts []Mount
	for _, m := range vmounts {
		mounts = append(mounts, Mount{Source: m.Source, Target: m.Target, ReadOnly: m.ReadOnly, HostToContainer: propagates(&c.spec, m.Target)})
	}
	dir := w.a.podDir(w.uid)
	if _, err := os.Stat(filepath.Join(dir, "resolv.conf")); err == nil {
		mounts = append(mounts, Mount{Source: filepath.Join(dir, "resolv.conf"), Target: "/etc/resolv.conf", ReadOnly: true})
	}
	if _, err := os.Stat(filepath.Join(dir, "hosts")); err == nil {
		mounts = append(mounts, Mount{Source: filepath.Join(dir, "hosts"), Target: "/etc/hosts", ReadOnly: true})
	}
	hostname := podspec.Hostname(pod)
	if pod.Spec.HostNetwork {
		hostname = w.a.opts.NodeName
	}
	spec := InitSpec{
		Hostname:      hostname,
		NetNS:         sb.netnsPath,
		Mounts:        mounts,
		MountPointLog: filepath.Join(w.a.opts.LabDir, "mountpoints"),
		WorkingDir:    c.spec.WorkingDir,
		Argv:          argv,
		Env:           env,
	}
	specJSON, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	cg := filepath.Join(w.a.opts.Cgroup, string(w.uid), c.spec.Name)
	if err := os.MkdirAll(cg, 0o755); err != nil {
		return nil, fmt.Errorf("making cgroup: %w", err)
	}
	cgfd, err := syscall.Open(cg, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening cgroup %s: %w", cg, err)
	}
	defer func() { _ = syscall.Close(cgfd) }() // read-only; the child got its own
	logDir := filepath.Join(dir, "logs", c.spec.Name)
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return nil, err
	}
	logPath := filepath.Join(logDir, strconv.Itoa(int(c.restarts))+".log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	// The child writes to its own copy of the log fd; the agent never
	// writes to logf, so closing it has nothing to lose.
	defer func() { _ = logf.Close() }()
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, PodInitArg, string(specJSON))
	cmd.Env = []string{}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWUTS | syscall.CLONE_NEWNS | syscall.CLONE_NEWIPC,
		UseCgroupFD: true,
		CgroupFD:    cgfd,
		Setpgid:     true,
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %v: %w", argv, err)
	}
	w.mu.Lock()
	if c.logPath != "" && c.logPath != logPath {
		c.prevLog = c.logPath
	}
	c.logPath = logPath
	c.done = make(chan struct{})
	c.pid = cmd.Process.Pid
	c.cgroup = cg
	c.env = env
	c.started = true
	c.startedAt = metav1.Now()
	c.waiting, c.terminated = nil, nil
	c.killed = false
	c.ready = c.spec.ReadinessProbe == nil
	w.mu.Unlock()
	w.log.Info("container started", "container", c.spec.Name, "pid", cmd.Process.Pid, "argv", argv)
	return cmd, nil
}

// withPath makes sure PATH is set and the lab's bin directory is on it, so
// `kubectl exec ... echo-client` finds the images' programs.
func withPath(env []string, binDir string) []string {
	for i, e := range env {
		if len(e) > 5 && e[:5] == "PATH=" {
			env[i] = e + ":" + binDir
			return env
		}
	}
	return append(env, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:"+binDir)
}

// terminate stops every container: SIGTERM to each process group, then,
// after the grace period, SIGKILL to everything left in the pod's cgroup.
func (w *podWorker) terminate(ctx context.Context) {
	pod := w.current()
	grace := 30 * time.Second
	if pod.DeletionGracePeriodSeconds != nil {
		grace = time.Duration(*pod.DeletionGracePeriodSeconds) * time.Second
	} else if pod.Spec.TerminationGracePeriodSeconds != nil {
		grace = time.Duration(*pod.Spec.TerminationGracePeriodSeconds) * time.Second
	}
	var dones []chan struct{}
	w.mu.Lock()
	for _, c := range append(append([]*ctr{}, w.init...), w.ctrs...) {
		c.stopping = true
		if c.pid > 0 {
			_ = syscall.Kill(-c.pid, syscall.SIGTERM)
			dones = append(dones, c.done)
		}
	}
	w.mu.Unlock()
	deadline := time.After(grace)
	for _, d := range dones {
		select {
		case <-d:
		case <-deadline:
		case <-ctx.Done():
		}
	}
	_ = killCgroup(filepath.Join(w.a.opts.Cgroup, string(w.uid)))
	for _, d := range dones {
		select {
		case <-d:
		case <-time.After(10 * time.Second):
			w.log.Error("container process did not exit after SIGKILL")
		}
	}
}

// kill SIGKILLs every process of the pod and waits for them to be reaped.
func (w *podWorker) kill() {
	var dones []chan struct{}
	w.mu.Lock()
	for _, c := range append(append([]*ctr{}, w.init...), w.ctrs...) {
		c.stopping = true
		if c.pid > 0 {
			dones = append(dones, c.done)
		}
	}
	w.mu.Unlock()
	_ = killCgroup(filepath.Join(w.a.opts.Cgroup, string(w.uid)))
	for _, d := range dones {
		select {
		case <-d:
		case <-time.After(5 * time.Second):
		}
	}
}

// cleanup removes the sandbox, volumes and cgroup, then the pod object.
func (w *podWorker) cleanup(ctx context.Context) {
	pod := w.current()
	w.mu.Lock()
	sb := w.sandbox
	w.mu.Unlock()
	if err := w.a.deleteSandbox(ctx, pod, sb); err != nil {
		w.log.Warn("deleting sandbox", "error", err)
	}
	if w.volumes != nil {
		if err := w.volumes.Cleanup(); err != nil {
			w.log.Warn("removing volumes", "error", err)
		}
	}
	_ = os.RemoveAll(w.a.podDir(w.uid))
	if err := removeCgroup(filepath.Join(w.a.opts.Cgroup, string(w.uid))); err != nil {
		w.log.Warn("removing cgroup", "error", err)
	}
	select {
	case <-w.goneCh:
		return // already removed from the API
	default:
	}
	// As kubelet does once the pod's resources are released: the final
	// delete with grace 0, guarded by the UID.
	err := w.a.opts.Client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: new(int64),
		Preconditions:      &metav1.Preconditions{UID: &w.uid},
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		w.log.Warn("deleting pod", "error", err)
	}
	w.log.Info("pod removed")
}

// refreshVolumes keeps service-account tokens and projected ConfigMaps and
// Secrets fresh.
func (w *podWorker) refreshVolumes(ctx context.Context) {
	for {
		next, err := w.volumes.Refresh(ctx)
		if err != nil {
			w.log.Warn("refreshing volumes", "error", err)
			next = time.Now().Add(10 * time.Second)
		}
		d := time.Until(next)
		if d < time.Second {
			d = time.Second
		}
		if d > time.Minute {
			d = time.Minute
		}
		select {
		case <-ctx.Done():
			return
		case <-w.deleting:
			return
		case <-time.After(d):
		}
	}
}

func (w *podWorker) find(name string) (*ctr, error) {
	for _, c := range append(append([]*ctr{}, w.init...), w.ctrs...) {
		if c.spec.Name == name {
			return c, nil
		}
	}
	return nil, fmt.Errorf("container %q: %w", name, kubeletapi.ErrNotFound)
}

func (w *podWorker) container(name string) (kubeletapi.Container, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if name == "" && len(w.ctrs) > 0 {
		name = w.ctrs[0].spec.Name
	}
	c, err := w.find(name)
	if err != nil {
		return kubeletapi.Container{}, err
	}
	if c.pid == 0 {
		return kubeletapi.Container{}, fmt.Errorf("container %q is not running: %w", name, kubeletapi.ErrNotFound)
	}
	return kubeletapi.Container{PID: c.pid, CgroupPath: c.cgroup, Env: c.env}, nil
}

func (w *podWorker) logPath(name string, previous bool) (string, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if name == "" && len(w.ctrs) > 0 {
		name = w.ctrs[0].spec.Name
	}
	c, err := w.find(name)
	if err != nil {
		return "", err
	}
	p := c.logPath
	if previous {
		p = c.prevLog
	}
	if p == "" {
		return "", fmt.Errorf("container %q has no log yet: %w", name, kubeletapi.ErrNotFound)
	}
	return p, nil
}

// killCgroup kills every process in a cgroup tree.
func killCgroup(dir string) error {
	err := os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// removeCgroup removes a pod's cgroup and its containers' below it.
func removeCgroup(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	_ = killCgroup(dir)
	var errs []error
	for _, e := range entries {
		if e.IsDir() {
			errs = append(errs, removeCgroup(filepath.Join(dir, e.Name())))
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := os.Remove(dir)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			break
		}
		if time.Now().After(deadline) {
			errs = append(errs, fmt.Errorf("removing cgroup %s: %w", dir, err))
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	return errors.Join(errs...)
}

// propagates reports whether the container's mount at target asks for
// host-to-container (or bidirectional) propagation.
func propagates(c *corev1.Container, target string) bool {
	for _, vm := range c.VolumeMounts {
		if vm.MountPath == target && vm.MountPropagation != nil &&
			(*vm.MountPropagation == corev1.MountPropagationHostToContainer || *vm.MountPropagation == corev1.MountPropagationBidirectional) {
			return true
		}
	}
	return false
}
