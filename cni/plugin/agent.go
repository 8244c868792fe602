package plugin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/ambitmesh/ambit/cni"
)

// maxAnswer bounds what the plugin reads of an answer: a JSON object with
// a bool or a message.
const maxAnswer = 64 << 10

// agentClient speaks the plugin side of the protocol in package cni.
type agentClient struct {
	socket  string
	timeout time.Duration // for the whole request: dial, the agent's work, the answer
}

// dialError marks a failure to connect, as opposed to a failure after
// connecting: only the former means the agent is not there.
type dialError struct{ err error }

func (e dialError) Error() string { return e.err.Error() }
func (e dialError) Unwrap() error { return e.err }

func (c agentClient) httpClient() *http.Client {
	return &http.Client{
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				conn, err := d.DialContext(ctx, "unix", c.socket)
				if err != nil {
					return nil, dialError{err}
				}
				return conn, nil
			},
			// One request per process: nothing to keep alive.
			DisableKeepAlives: true,
		},
		// Redirects are not part of the protocol.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// add asks the agent to set the pod up and waits for its answer, at most
// c.timeout. Errors are *AgentError.
func (c agentClient) add(ctx context.Context, req cni.PodRequest) (cni.AddResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	status, body, err := c.post(ctx, cni.AddPath, req)
	if err != nil {
		return cni.AddResponse{}, c.transportError(ctx, "ADD", req, err)
	}
	if status != http.StatusOK {
		return cni.AddResponse{}, c.agentError(ErrAgentFailed, "ADD", req, status, errorMessage(body), nil)
	}
	var resp cni.AddResponse
	if err := json.Unmarshal(body, &resp); err != nil {
		return cni.AddResponse{}, c.agentError(ErrAgentFailed, "ADD", req, 0, "",
			fmt.Errorf("answer 200 is not {\"redirected\": bool}: %w", err))
	}
	return resp, nil
}

// del tells the agent the pod's sandbox is gone, waiting at most c.timeout.
func (c agentClient) del(ctx context.Context, req cni.PodRequest) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	status, body, err := c.post(ctx, cni.DelPath, req)
	if err != nil {
		return c.transportError(ctx, "DEL", req, err)
	}
	if status != http.StatusOK {
		return c.agentError(ErrAgentFailed, "DEL", req, status, errorMessage(body), nil)
	}
	return nil
}

func (c agentClient) post(ctx context.Context, path string, req cni.PodRequest) (status int, body []byte, err error) {
	data, err := json.Marshal(req)
	if err != nil {
		return 0, nil, err
	}
	// The host is meaningless on a Unix socket; it only has to be valid.
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://ambit-agent"+path, bytes.NewReader(data))
	if err != nil {
		return 0, nil, err
	}
	hreq.Header.Set("Content-Type", "application/json")
	hreq.Header.Set("User-Agent", cni.PluginType)
	resp, err := c.httpClient().Do(hreq)
	if err != nil {
		return 0, nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	body, err = io.ReadAll(io.LimitReader(resp.Body, maxAnswer))
	if err != nil {
		return 0, nil, fmt.Errorf("reading the answer: %w", err)
	}
	return resp.StatusCode, body, nil
}

func (c agentClient) agentError(kind error, cmd string, req cni.PodRequest, status int, msg string, err error) *AgentError {
	return &AgentError{Kind: kind, Cmd: cmd, Pod: req.PodNamespace + "/" + req.PodName, Socket: c.socket,
		Status: status, Message: msg, Err: err}
}

// transportError classifies a request that got no answer.
func (c agentClient) transportError(ctx context.Context, cmd string, req cni.PodRequest, err error) *AgentError {
	ae := c.agentError(ErrAgentFailed, cmd, req, 0, "", err)
	if de, ok := errors.AsType[dialError](err); ok {
		ae.Kind, ae.Err = ErrAgentUnreachable, de.err
	}
	// A deadline that passed while dialing is still a timeout: a socket
	// whose backlog is full is an agent that does not keep up.
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		ae.Kind, ae.Timeout = ErrAgentTimeout, c.timeout
	}
	return ae
}

// errorMessage is the agent's explanation in an error answer: the "error"
// of an ErrorResponse, or else the body as text.
func errorMessage(body []byte) string {
	var er cni.ErrorResponse
	if err := json.Unmarshal(body, &er); err == nil && er.Error != "" {
		return er.Error
	}
	if s := strings.TrimSpace(string(body)); s != "" {
		return s
	}
	return "(no message)"
}
