// Package netload is the bench's own TCP load: a bulk sender and sink that
// measure throughput from the receiver's count, a connection-rate client
// and a round-trip client, with their echo server. It runs inside the lab's pods (command
// benchnet); the harness reads its JSON results.
//
// It measures what crossed the path, not what the sender wrote: the sink
// reports its running byte count back on the same connection, so data still
// in socket buffers of the (up to three) TCP hops at the end is not counted
// as carried. It needs no half-close, which not every tunnel passes on.
//
// It does not pace, shape or verify content: the bytes are zeros.
package netload

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"slices"
	"sync"
	"time"
)

// ReportEvery is how many bytes the sink receives between two reports of
// its count. At 20 Gbit/s that is about 300 reports a second, 8 bytes each.
const ReportEvery = 8 << 20

// bufSize is the read and write size: large writes keep the sender's
// syscall count, and so its CPU, out of the way of what is measured.
const bufSize = 256 << 10

// listenConfig turns MPTCP off: Go 1.24+ listeners default to it, and the
// bench should measure plain TCP as an app gets it by default from a
// dialer (Go dialers do not ask for MPTCP).
func listenConfig() *net.ListenConfig {
	lc := &net.ListenConfig{}
	lc.SetMultipathTCP(false)
	return lc
}

// Serve runs a sink on sinkAddr and a one-byte echo on echoAddr (either may
// be empty) until ctx is done.
func Serve(ctx context.Context, sinkAddr, echoAddr string) error {
	var wg sync.WaitGroup
	errc := make(chan error, 2)
	serve := func(addr string, handle func(net.Conn)) error {
		ln, err := listenConfig().Listen(ctx, "tcp", addr)
		if err != nil {
			return fmt.Errorf("listening on %s: %w", addr, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-ctx.Done()
			_ = ln.Close() // ends Accept below
		}()
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					if ctx.Err() == nil {
						errc <- fmt.Errorf("accepting on %s: %w", addr, err)
					}
					return
				}
				go handle(c)
			}
		}()
		return nil
	}
	if sinkAddr != "" {
		if err := serve(sinkAddr, sink); err != nil {
			return err
		}
	}
	if echoAddr != "" {
		if err := serve(echoAddr, echo); err != nil {
			return err
		}
	}
	select {
	case <-ctx.Done():
		wg.Wait()
		return nil
	case err := <-errc:
		return err
	}
}

// sink reads until the peer goes, writing its running count (8 bytes, big
// endian) after every ReportEvery bytes.
func sink(c net.Conn) {
	defer func() { _ = c.Close() }()
	buf := make([]byte, bufSize)
	var total, next uint64 = 0, ReportEvery
	var report [8]byte
	for {
		n, err := c.Read(buf)
		total += uint64(n)
		if total >= next {
			binary.BigEndian.PutUint64(report[:], total)
			if _, werr := c.Write(report[:]); werr != nil {
				return
			}
			next = total + ReportEvery
		}
		if err != nil {
			return
		}
	}
}

// rrMode is the first byte of a round-trip client: the echo then sends
// back whatever it reads until the client goes.
const rrMode = 'r'

// echo answers one byte with one byte and closes first, so that TIME_WAIT
// stays on the server side and a client making thousands of connections a
// second does not run out of ports. A first byte of rrMode instead turns
// the connection into a plain echo (RoundTrips).
func echo(c net.Conn) {
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return
	}
	if b[0] == rrMode {
		_ = c.SetDeadline(time.Time{})
		_, _ = io.CopyBuffer(c, c, make([]byte, 64<<10))
		return
	}
	_, _ = c.Write(b[:])
}

// RRResult is one round-trip run: the rate and the percentiles of the time
// from writing a message to having read its echo back, in µs.
type RRResult struct {
	RoundTrips int                `json:"roundTrips"`
	PerSec     float64            `json:"perSec"`
	Micros     map[string]float64 `json:"micros"` // "p50", "p90", "p99", "p99.9"
}

// RoundTrips sends size-byte messages on one connection to an echo server,
// each after the echo of the one before is back, for d, and times each
// round trip; those in the first warmup are left out.
func RoundTrips(ctx context.Context, addr string, size int, d, warmup time.Duration) (RRResult, error) {
	if size < 1 {
		return RRResult{}, errors.New("size must be at least 1")
	}
	var dialer net.Dialer
	c, err := dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return RRResult{}, err
	}
	defer func() { _ = c.Close() }()
	start := time.Now()
	if err := c.SetDeadline(start.Add(d + 10*time.Second)); err != nil {
		return RRResult{}, err
	}
	if _, err := c.Write([]byte{rrMode}); err != nil {
		return RRResult{}, err
	}
	msg, back := make([]byte, size), make([]byte, size)
	rtts := make([]time.Duration, 0, 1<<16)
	for ctx.Err() == nil {
		t0 := time.Now()
		if t0.Sub(start) >= d {
			break
		}
		if _, err := c.Write(msg); err != nil {
			return RRResult{}, err
		}
		if _, err := io.ReadFull(c, back); err != nil {
			return RRResult{}, err
		}
		if t0.Sub(start) >= warmup {
			rtts = append(rtts, time.Since(t0))
		}
	}
	if len(rtts) == 0 {
		return RRResult{}, fmt.Errorf("no round trip to %s after the warm-up", addr)
	}
	return RRResult{
		RoundTrips: len(rtts),
		PerSec:     float64(len(rtts)) / (d - warmup).Seconds(),
		Micros:     percentilesMicros(rtts),
	}, nil
}

// percentilesMicros returns p50, p90, p99 and p99.9 of ds (nearest rank),
// in µs. It sorts ds.
func percentilesMicros(ds []time.Duration) map[string]float64 {
	slices.Sort(ds)
	out := map[string]float64{}
	for _, p := range []struct {
		name string
		q    float64
	}{{"p50", 0.50}, {"p90", 0.90}, {"p99", 0.99}, {"p99.9", 0.999}} {
		i := int(math.Ceil(p.q*float64(len(ds)))) - 1
		out[p.name] = float64(ds[max(i, 0)]) / float64(time.Microsecond)
	}
	return out
}

// SendResult is one bulk run.
type SendResult struct {
	Streams int `json:"streams"`
	// Gbps is the sum of the streams' rates over the measured window.
	Gbps float64 `json:"gbps"`
	// Bytes is what the sink acknowledged in all, warm-up included.
	Bytes uint64 `json:"bytes"`
	// Seconds is the run's wall time, warm-up included.
	Seconds       float64   `json:"seconds"`
	PerStreamGbps []float64 `json:"perStreamGbps"`
	// Method is "receiver" when every stream's rate comes from the sink's
	// reports, "sender" when one had too few reports (a slow path) and
	// its rate is what it wrote over the run.
	Method string `json:"method"`
}

// report is one count from the sink, at a time since the run's start.
type report struct {
	at    time.Duration
	bytes uint64
}

// Send runs streams parallel bulk streams to addr for d. The first warmup
// of each stream (TCP slow start, the tunnel's connection setup) is left
// out of the rate.
func Send(ctx context.Context, addr string, streams int, d, warmup time.Duration) (SendResult, error) {
	if streams < 1 {
		return SendResult{}, errors.New("streams must be at least 1")
	}
	var dialer net.Dialer
	conns := make([]net.Conn, streams)
	for i := range conns {
		c, err := dialer.DialContext(ctx, "tcp", addr)
		if err != nil {
			for _, c := range conns[:i] {
				_ = c.Close()
			}
			return SendResult{}, fmt.Errorf("dialing %s: %w", addr, err)
		}
		conns[i] = c
	}
	start := time.Now()
	end := start.Add(d)
	type streamOut struct {
		reports []report
		written uint64
		err     error
	}
	outs := make([]streamOut, streams)
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			readDone := make(chan []report)
			go func() {
				var rs []report
				var b [8]byte
				for {
					if _, err := io.ReadFull(c, b[:]); err != nil {
						readDone <- rs
						return
					}
					rs = append(rs, report{at: time.Since(start), bytes: binary.BigEndian.Uint64(b[:])})
				}
			}()
			buf := make([]byte, bufSize)
			_ = c.SetWriteDeadline(end)
			var written uint64
			var werr error
			for time.Now().Before(end) && ctx.Err() == nil {
				n, err := c.Write(buf)
				written += uint64(n)
				if err != nil {
					// The write deadline is the run's end.
					if !errors.Is(err, os.ErrDeadlineExceeded) {
						werr = err
					}
					break
				}
			}
			_ = c.Close() // ends the report reader
			outs[i] = streamOut{reports: <-readDone, written: written, err: werr}
		}()
	}
	wg.Wait()
	res := SendResult{Streams: streams, Seconds: time.Since(start).Seconds(), Method: "receiver"}
	for i, o := range outs {
		if o.err != nil {
			return res, fmt.Errorf("stream %d: writing: %w", i, o.err)
		}
		gbps, acked, fromReports := streamRate(o.reports, warmup)
		if !fromReports {
			res.Method = "sender"
			gbps = float64(o.written) * 8 / 1e9 / d.Seconds()
			acked = o.written
		}
		res.PerStreamGbps = append(res.PerStreamGbps, gbps)
		res.Gbps += gbps
		res.Bytes += acked
	}
	if res.Bytes == 0 {
		return res, fmt.Errorf("nothing reached %s", addr)
	}
	return res, nil
}

// streamRate is a stream's rate between its first report after warmup and
// its last one, and the last count. ok is false with fewer than two
// reports in that window.
func streamRate(rs []report, warmup time.Duration) (gbps float64, acked uint64, ok bool) {
	if len(rs) == 0 {
		return 0, 0, false
	}
	acked = rs[len(rs)-1].bytes
	first := -1
	for i, r := range rs {
		if r.at >= warmup {
			first = i
			break
		}
	}
	if first < 0 || first == len(rs)-1 {
		return 0, acked, false
	}
	a, b := rs[first], rs[len(rs)-1]
	secs := (b.at - a.at).Seconds()
	if secs <= 0 {
		return 0, acked, false
	}
	return float64(b.bytes-a.bytes) * 8 / 1e9 / secs, acked, true
}

// ConnResult is one connection-rate run.
type ConnResult struct {
	Conns   int     `json:"conns"`
	Errors  int     `json:"errors"`
	Seconds float64 `json:"seconds"`
	PerSec  float64 `json:"perSec"`
	// FirstError is the first failure, for the harness's message.
	FirstError string `json:"firstError,omitempty"`
}

// Conns opens new connections to an echo server with workers in parallel
// for d: each connects, sends one byte, reads the answer and closes. A
// connection counts once its answer is back, so a tunnel that accepts
// locally before reaching the server gains nothing.
func Conns(ctx context.Context, addr string, workers int, d time.Duration) (ConnResult, error) {
	if workers < 1 {
		return ConnResult{}, errors.New("workers must be at least 1")
	}
	start := time.Now()
	end := start.Add(d)
	var mu sync.Mutex
	res := ConnResult{}
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dialer := net.Dialer{Timeout: 5 * time.Second}
			ok, bad := 0, 0
			var first error
			var b [1]byte
			for time.Now().Before(end) && ctx.Err() == nil {
				err := func() error {
					c, err := dialer.DialContext(ctx, "tcp", addr)
					if err != nil {
						return err
					}
					defer func() { _ = c.Close() }()
					_ = c.SetDeadline(time.Now().Add(5 * time.Second))
					if _, err := c.Write([]byte{'x'}); err != nil {
						return err
					}
					_, err = io.ReadFull(c, b[:])
					return err
				}()
				if err != nil {
					bad++
					if first == nil {
						first = err
					}
					continue
				}
				ok++
			}
			mu.Lock()
			defer mu.Unlock()
			res.Conns += ok
			res.Errors += bad
			if first != nil && res.FirstError == "" {
				res.FirstError = first.Error()
			}
		}()
	}
	wg.Wait()
	res.Seconds = time.Since(start).Seconds()
	res.PerSec = float64(res.Conns) / res.Seconds
	if res.Conns == 0 {
		return res, fmt.Errorf("no connection to %s completed: %s", addr, res.FirstError)
	}
	return res, nil
}
