package plugin

import (
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/containernetworking/cni/pkg/types"
)

var (
	// ErrInvalidConfig: the plugin's stdin is not a configuration it can
	// use (bad JSON, bad field, unparsable prevResult).
	ErrInvalidConfig = errors.New("invalid ambit-cni configuration")
	// ErrNotChained: ADD got no prevResult, so ambit-cni is first in its
	// conflist (or alone in a .conf), where it cannot work.
	ErrNotChained = errors.New("no prevResult: ambit-cni is a chained plugin and must come after the primary plugin in a conflist")
	// ErrAgentUnreachable: nothing answers on the agent's socket (no
	// socket file, nobody listening, or no permission).
	ErrAgentUnreachable = errors.New("ambit node agent unreachable")
	// ErrAgentTimeout: the agent took the request but did not answer
	// within timeout_seconds.
	ErrAgentTimeout = errors.New("ambit node agent timed out")
	// ErrAgentFailed: the agent answered with an error status, broke the
	// protocol, or dropped the connection before answering.
	ErrAgentFailed = errors.New("ambit node agent failed")
)

// AgentError is what ADD fails with (and DEL logs) when the node agent did
// not do its part. errors.Is matches its Kind (ErrAgentUnreachable,
// ErrAgentTimeout or ErrAgentFailed) and its cause.
type AgentError struct {
	Kind    error
	Cmd     string // "ADD" or "DEL"
	Pod     string // namespace/name
	Socket  string
	Timeout time.Duration // for ErrAgentTimeout
	Status  int           // the agent's HTTP status, when it answered
	Message string        // the agent's message, when it answered
	Err     error         // the transport error, when it did not
}

func (e *AgentError) Error() string {
	verb, doing := "set up", "setting up"
	if e.Cmd == "DEL" {
		verb, doing = "clean up after", "cleaning up after"
	}
	switch {
	case errors.Is(e.Kind, ErrAgentUnreachable):
		return fmt.Sprintf("cannot reach the ambit node agent at %s to %s pod %s: %v", e.Socket, verb, e.Pod, e.Err)
	case errors.Is(e.Kind, ErrAgentTimeout):
		return fmt.Sprintf("the ambit node agent at %s did not finish %s pod %s within %s", e.Socket, doing, e.Pod, e.Timeout)
	case e.Status != 0:
		return fmt.Sprintf("the ambit node agent at %s refused %s of pod %s (HTTP %d): %s", e.Socket, e.Cmd, e.Pod, e.Status, e.Message)
	default:
		return fmt.Sprintf("the ambit node agent at %s failed while %s pod %s: %v", e.Socket, doing, e.Pod, e.Err)
	}
}

func (e *AgentError) Unwrap() []error {
	if e.Err == nil {
		return []error{e.Kind}
	}
	return []error{e.Kind, e.Err}
}

// hint is what an operator should check, shown after the error.
func (e *AgentError) hint() string {
	switch {
	case errors.Is(e.Kind, ErrAgentUnreachable):
		return "is the ambit node agent running on this node? Until it is, pods that use the pod network cannot start on this node; kubelet retries"
	case errors.Is(e.Kind, ErrAgentTimeout):
		return "check the ambit node agent's log on this node; the limit is timeout_seconds in the ambit-cni entry of the node's CNI config; kubelet retries"
	default:
		return "check the ambit node agent's log on this node; kubelet retries"
	}
}

// toCNIError is the one place where a failure becomes what the runtime
// sees: a CNI error (spec section "Error"), whose code says whether to retry
// and whose message, with its details, kubelet puts in the pod's events.
// 11 ("try again later") marks conditions that clear up by themselves.
func toCNIError(err error) *types.Error {
	if te, ok := errors.AsType[*types.Error](err); ok {
		return te
	}
	msg := "ambit-cni: " + err.Error()
	if ae, ok := errors.AsType[*AgentError](err); ok {
		code := types.ErrInternal
		if errors.Is(ae.Kind, ErrAgentUnreachable) || errors.Is(ae.Kind, ErrAgentTimeout) || ae.Status == http.StatusServiceUnavailable {
			code = types.ErrTryAgainLater
		}
		return types.NewError(code, msg, ae.hint())
	}
	switch {
	case errors.Is(err, ErrNotChained):
		return types.NewError(types.ErrInvalidNetworkConfig, msg, "the ambit node agent appends ambit-cni to the end of the node's primary conflist; see the agent's log")
	case errors.Is(err, ErrInvalidConfig):
		return types.NewError(types.ErrInvalidNetworkConfig, msg, "")
	}
	return types.NewError(types.ErrInternal, msg, "")
}
