//go:build !linux

package kubeletapi

import (
	"context"
	"io"
	"net"

	"k8s.io/cri-streaming/pkg/streaming/remotecommand"
)

func runInContainer(context.Context, Container, []string, io.Reader, io.Writer, io.Writer, bool, <-chan remotecommand.TerminalSize) error {
	return ErrNotSupported
}

func dialInNetNS(context.Context, string, int32) (net.Conn, error) {
	return nil, ErrNotSupported
}
