package kubeletapi

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"time"
)

// followPoll is how often a following log request looks for new bytes and
// for a new container instance. Polling a few times a second is cheap next
// to a 2-core lab, and avoids an fsnotify dependency.
const followPoll = 250 * time.Millisecond

// logOptions are the query parameters of GET /containerLogs, as the
// apiserver sends them (pkg/registry/core/pod/strategy.go LogLocation).
type logOptions struct {
	follow   bool
	previous bool
	// tailLines is the number of last lines to send; -1 means all.
	tailLines int64
	// limitBytes caps the bytes sent, follow included; -1 means no cap.
	limitBytes int64
}

// parseLogOptions reads the log query. Options the lab cannot honour are
// refused with a reason rather than silently ignored, so `kubectl logs`
// tells the user instead of printing something else than asked:
//   - timestamps, sinceSeconds, sinceTime: the log file holds raw bytes with
//     no time of arrival.
//   - stream=Stdout or stream=Stderr: stdout and stderr share one file.
func parseLogOptions(q url.Values) (logOptions, error) {
	o := logOptions{tailLines: -1, limitBytes: -1}
	var err error
	if o.follow, err = parseBool(q, "follow"); err != nil {
		return o, err
	}
	if o.previous, err = parseBool(q, "previous"); err != nil {
		return o, err
	}
	ts, err := parseBool(q, "timestamps")
	if err != nil {
		return o, err
	}
	if ts {
		return o, badRequest{errors.New("timestamps are not supported in the lab: container logs are raw bytes without times")}
	}
	for _, k := range []string{"sinceSeconds", "sinceTime"} {
		if q.Get(k) != "" {
			return o, badRequest{fmt.Errorf("%s is not supported in the lab: container logs are raw bytes without times", k)}
		}
	}
	if s := q.Get("stream"); s != "" && s != "All" {
		return o, badRequest{fmt.Errorf("stream=%s is not supported in the lab: stdout and stderr are written to one log file", s)}
	}
	tail := q.Get("tailLines")
	// The kubelet still accepts the old "tail" parameter; "all" means no tail.
	if t := q.Get("tail"); t != "" && tail == "" && t != "all" {
		tail = t
	}
	if tail != "" {
		n, err := strconv.ParseInt(tail, 10, 64)
		if err != nil || n < 0 {
			return o, badRequest{fmt.Errorf("tailLines=%q: want an integer >= 0", tail)}
		}
		o.tailLines = n
	}
	if lb := q.Get("limitBytes"); lb != "" {
		n, err := strconv.ParseInt(lb, 10, 64)
		if err != nil || n < 1 {
			return o, badRequest{fmt.Errorf("limitBytes=%q: want an integer >= 1", lb)}
		}
		o.limitBytes = n
	}
	return o, nil
}

func parseBool(q url.Values, key string) (bool, error) {
	v := q.Get(key)
	if v == "" {
		return false, nil
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, badRequest{fmt.Errorf("%s=%q: want true or false", key, v)}
	}
	return b, nil
}

// tailOffset returns the offset in r (of size bytes) where its last n lines
// start. A line ends with '\n'; a last line without one still counts. n = 0
// gives size.
func tailOffset(r io.ReaderAt, size, n int64) (int64, error) {
	if n == 0 || size == 0 {
		return size, nil
	}
	var buf [32 * 1024]byte
	end := size
	// A final '\n' ends the last line; it does not start an empty one.
	if _, err := r.ReadAt(buf[:1], size-1); err != nil {
		return 0, err
	}
	if buf[0] == '\n' {
		end--
	}
	var seen int64
	for end > 0 {
		start := max(end-int64(len(buf)), 0)
		chunk := buf[:end-start]
		if _, err := r.ReadAt(chunk, start); err != nil && !errors.Is(err, io.EOF) {
			return 0, err
		}
		for i := len(chunk) - 1; i >= 0; i-- {
			if chunk[i] == '\n' {
				seen++
				if seen == n {
					return start + int64(i) + 1, nil
				}
			}
		}
		end = start
	}
	return 0, nil
}

// containerLogs serves GET /containerLogs/{namespace}/{pod}/{container}.
//
// With follow it streams what the container appends until the client goes
// away, limitBytes is reached, or the container instance it started on is
// gone (its PID changed or it stopped, or the log file was replaced).
func (s *Server) containerLogs(w http.ResponseWriter, r *http.Request) {
	ns, pod, ctr := r.PathValue("namespace"), r.PathValue("pod"), r.PathValue("container")
	opts, err := parseLogOptions(r.URL.Query())
	if err != nil {
		writeError(w, err)
		return
	}
	path, err := s.rt.LogPath(ns, pod, ctr, opts.previous)
	if err != nil {
		writeError(w, fmt.Errorf("finding log of container %s in pod %s/%s: %w", ctr, ns, pod, err))
		return
	}
	// Follow the instance running now. A container that is not running has
	// nothing more to say: its log is sent and the request ends, as the
	// kubelet does.
	follow, pid := false, 0
	if opts.follow && !opts.previous {
		c, err := s.rt.Container(ns, pod, ctr)
		switch {
		case err == nil:
			follow, pid = true, c.PID
		case !errors.Is(err, ErrNotFound):
			writeError(w, fmt.Errorf("looking up container %s in pod %s/%s: %w", ctr, ns, pod, err))
			return
		}
	}
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		err = fmt.Errorf("%w: %w", ErrNotFound, err)
	}
	if err != nil {
		writeError(w, fmt.Errorf("opening log of container %s in pod %s/%s: %w", ctr, ns, pod, err))
		return
	}
	defer func() { _ = f.Close() }() // read-only
	fi, err := f.Stat()
	if err != nil {
		writeError(w, fmt.Errorf("reading log %s: %w", path, err))
		return
	}
	start := int64(0)
	if opts.tailLines >= 0 {
		if start, err = tailOffset(f, fi.Size(), opts.tailLines); err != nil {
			writeError(w, fmt.Errorf("reading log %s: %w", path, err))
			return
		}
	}
	if _, err := f.Seek(start, io.SeekStart); err != nil {
		writeError(w, fmt.Errorf("reading log %s: %w", path, err))
		return
	}

	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	// Headers now: a follow of an empty log must not leave the client
	// waiting for a response.
	if err := rc.Flush(); err != nil {
		return
	}
	left := opts.limitBytes
	if left < 0 {
		left = math.MaxInt64
	}
	// send copies what the file holds past the last read; it reports whether
	// the request should go on.
	send := func() bool {
		n, err := io.Copy(w, io.LimitReader(f, left))
		left -= n
		if n > 0 {
			if ferr := rc.Flush(); ferr != nil {
				return false
			}
		}
		return err == nil && left > 0
	}
	if !send() || !follow {
		return
	}
	t := time.NewTicker(followPoll)
	defer t.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-t.C:
		}
		if !send() {
			return
		}
		if !s.sameInstance(ns, pod, ctr, pid, path, fi) {
			// Bytes written between the last read and the end.
			send()
			return
		}
	}
}

// sameInstance reports whether the container still runs as pid and still
// writes to the file fi was taken from.
func (s *Server) sameInstance(ns, pod, ctr string, pid int, path string, fi os.FileInfo) bool {
	c, err := s.rt.Container(ns, pod, ctr)
	if err != nil || c.PID != pid {
		return false
	}
	now, err := os.Stat(path)
	return err == nil && os.SameFile(fi, now)
}
