//go:build !unix

package hbone

import "io"

// directSink is the frame reader's non-blocking path into a TCP socket;
// without one, the stream's goroutine does all the writing.
type directSink struct{}

func newDirectSink(io.Writer) *directSink { return nil }

func (*directSink) write([]byte) (int, error) { return 0, nil }
