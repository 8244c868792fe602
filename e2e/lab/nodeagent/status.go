package nodeagent

import (
	"context"
	"encoding/json"
	"reflect"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// statusLoop writes the pod's status whenever it changes, coalescing bursts.
func (w *podWorker) statusLoop(ctx context.Context) {
	var last *corev1.PodStatus
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.dirty:
		}
		st := w.status()
		if last != nil && reflect.DeepEqual(*last, st) {
			continue
		}
		if err := w.writeStatus(ctx, st); err != nil {
			if apierrors.IsNotFound(err) || apierrors.IsConflict(err) || ctx.Err() != nil {
				continue
			}
			w.log.Warn("writing pod status", "error", err)
			time.AfterFunc(time.Second, w.markDirty)
			continue
		}
		last = &st
	}
}

// writeStatus merge-patches the status subresource; the UID in the patch is
// a precondition, so a pod recreated under the same name is not touched.
func (w *podWorker) writeStatus(ctx context.Context, st corev1.PodStatus) error {
	pod := w.current()
	patch, err := json.Marshal(map[string]any{
		"metadata": map[string]any{"uid": w.uid},
		"status":   st,
	})
	if err != nil {
		return err
	}
	_, err = w.a.opts.Client.CoreV1().Pods(pod.Namespace).Patch(ctx, pod.Name, types.MergePatchType, patch, metav1.PatchOptions{}, "status")
	return err
}

// status computes the pod's status from its containers, as kubelet does.
func (w *podWorker) status() corev1.PodStatus {
	w.mu.Lock()
	defer w.mu.Unlock()
	pod := w.pod
	st := corev1.PodStatus{
		HostIP:    w.a.opts.NodeIP,
		HostIPs:   []corev1.HostIP{{IP: w.a.opts.NodeIP}},
		StartTime: w.startTime,
		QOSClass:  pod.Status.QOSClass,
	}
	if w.sandbox != nil {
		st.PodIP = w.sandbox.ip
		st.PodIPs = []corev1.PodIP{{IP: w.sandbox.ip}}
	}
	cstat := func(c *ctr) corev1.ContainerStatus {
		cs := corev1.ContainerStatus{
			Name:         c.spec.Name,
			Image:        c.spec.Image,
			ImageID:      "lab://" + imageName(c.spec.Image),
			RestartCount: c.restarts,
			Ready:        c.ready && c.pid != 0,
			Started:      ptrBool(c.pid != 0),
		}
		if c.started {
			cs.ContainerID = w.containerID(c)
		}
		switch {
		case w.pending != nil && !c.started:
			cs.State.Waiting = w.pending.DeepCopy()
		case c.pid != 0:
			cs.State.Running = &corev1.ContainerStateRunning{StartedAt: c.startedAt}
		case c.waiting != nil:
			cs.State.Waiting = c.waiting.DeepCopy()
		case c.terminated != nil:
			cs.State.Terminated = c.terminated.DeepCopy()
		default:
			cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}
		}
		if c.last != nil && cs.State.Terminated == nil {
			cs.LastTerminationState.Terminated = c.last.DeepCopy()
		}
		return cs
	}
	for _, c := range w.init {
		st.InitContainerStatuses = append(st.InitContainerStatuses, cstat(c))
	}
	allReady, running, finished, failed := true, 0, 0, 0
	policy := pod.Spec.RestartPolicy
	for _, c := range w.ctrs {
		cs := cstat(c)
		st.ContainerStatuses = append(st.ContainerStatuses, cs)
		if !cs.Ready {
			allReady = false
		}
		switch {
		case c.pid != 0:
			running++
		case c.terminated != nil && c.waiting == nil:
			if policy == corev1.RestartPolicyNever || (policy == corev1.RestartPolicyOnFailure && c.terminated.ExitCode == 0) {
				finished++
				if c.terminated.ExitCode != 0 {
					failed++
				}
			}
		}
	}
	initFailed := false
	for _, c := range w.init {
		if policy == corev1.RestartPolicyNever && c.terminated != nil && c.terminated.ExitCode != 0 {
			initFailed = true
		}
	}
	switch {
	case initFailed:
		st.Phase = corev1.PodFailed
	case len(w.ctrs) > 0 && finished == len(w.ctrs):
		st.Phase = corev1.PodSucceeded
		if failed > 0 {
			st.Phase = corev1.PodFailed
		}
	case w.initDone && (running > 0 || anyStarted(w.ctrs)):
		st.Phase = corev1.PodRunning
	default:
		st.Phase = corev1.PodPending
	}
	now := metav1.Now()
	cond := func(t corev1.PodConditionType, ok bool, reason string) corev1.PodCondition {
		s := corev1.ConditionFalse
		if ok {
			s = corev1.ConditionTrue
		}
		c := corev1.PodCondition{Type: t, Status: s, Reason: reason, LastTransitionTime: now}
		if ok {
			c.Reason = ""
		}
		for _, old := range pod.Status.Conditions {
			if old.Type == t && old.Status == s {
				c.LastTransitionTime = old.LastTransitionTime
			}
		}
		return c
	}
	ready := allReady && st.Phase == corev1.PodRunning
	st.Conditions = []corev1.PodCondition{
		cond(corev1.PodReadyToStartContainers, w.sandbox != nil, ""),
		cond(corev1.PodInitialized, w.initDone, "ContainersNotInitialized"),
		cond(corev1.ContainersReady, ready, "ContainersNotReady"),
		cond(corev1.PodReady, ready, "ContainersNotReady"),
	}
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodScheduled {
			st.Conditions = append(st.Conditions, c)
		}
	}
	return st
}

func anyStarted(cs []*ctr) bool {
	for _, c := range cs {
		if c.started {
			return true
		}
	}
	return false
}

func ptrBool(b bool) *bool { return &b }
