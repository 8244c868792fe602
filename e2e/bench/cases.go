package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"time"

	"github.com/ambitmesh/ambit/e2e/bench/netload"
)

// throughput is one run of case 1: (a) plain, (b) Ambit, (c) stunnel and
// (d) Ambit with parallel streams, each one benchnet send from the client
// pod, with the tunnels' CPU read around it.
func (b *bench) throughput(ctx context.Context) error {
	variants := []struct {
		key, ns, to string
		streams     int
		tunnels     []Proc
	}{
		{"plain", nsPlain, fmt.Sprintf("%s:%d", b.plainServer, portSink), 1, nil},
		{"ambit", nsMesh, fmt.Sprintf("%s:%d", b.meshServer, portSink), 1, b.ztunnels[:]},
		{"stunnel", nsPlain, fmt.Sprintf("127.0.0.1:%d", portStunnel), 1, b.stunnels},
		{"ambit-n", nsMesh, fmt.Sprintf("%s:%d", b.meshServer, portSink), b.cfg.Streams, b.ztunnels[:]},
	}
	var plain float64
	for _, v := range variants {
		cpu0, err := cpuOf(v.tunnels)
		if err != nil {
			return err
		}
		out, err := b.exec(ctx, b.cfg.ThroughputTime+time.Minute, v.ns, "client", "main", filepath.Join(b.cfg.ToolDir, "benchnet"), "send",
			"-to", v.to, "-streams", strconv.Itoa(v.streams), "-d", b.cfg.ThroughputTime.String())
		if err != nil {
			return fmt.Errorf("%s: %w", v.key, err)
		}
		cpu1, err := cpuOf(v.tunnels)
		if err != nil {
			return err
		}
		var res netload.SendResult
		if err := json.Unmarshal(out, &res); err != nil {
			return fmt.Errorf("%s: decoding benchnet's result %q: %w", v.key, out, err)
		}
		if res.Method != "receiver" {
			b.progress("warning: %s: too few reports from the sink; rate from what was written", v.key)
		}
		b.res.record("throughput."+v.key+".gbps", "Gbit/s", res.Gbps)
		b.res.record("throughput."+v.key+".bytes", "bytes", float64(res.Bytes))
		if v.key == "plain" {
			plain = res.Gbps
			continue
		}
		b.res.record("throughput."+v.key+".ratio", "ratio to plain, 1 stream", res.Gbps/plain)
		b.res.record("throughput."+v.key+".cpu_s_per_gb", "CPU-s per GB, both tunnels", (cpu1-cpu0)/(float64(res.Bytes)/1e9))
	}
	return nil
}

// fortioResult is the part of fortio's JSON output the bench reads.
type fortioResult struct {
	ActualQPS         float64
	ActualDuration    int64 // ns
	RetCodes          map[string]int64
	DurationHistogram struct {
		Count       int64
		Percentiles []struct {
			Percentile float64
			Value      float64 // seconds
		}
	}
}

var percentiles = []string{"p50", "p90", "p99", "p99.9"}

// latency is one run of case 2 (plain, then Ambit, at the fixed and at the
// maximum rate) and of case 3's load figures: the ztunnels' CPU and peak
// RSS over the Ambit runs.
func (b *bench) latency(ctx context.Context) error {
	if err := b.roundTrips(ctx); err != nil {
		return err
	}
	for _, load := range []struct {
		key string
		qps int
	}{{"fixed", b.cfg.FixedRPS}, {"max", 0}} {
		var plain map[string]float64
		for _, path := range []struct{ key, ns, server string }{{"plain", nsPlain, b.plainServer}, {"ambit", nsMesh, b.meshServer}} {
			var fp *footprint
			if path.key == "ambit" {
				var err error
				if fp, err = b.startFootprint(); err != nil {
					b.res.fail(caseFootprint, err)
				}
			}
			res, err := b.fortio(ctx, path.ns, path.server, load.qps)
			if err != nil {
				return fmt.Errorf("%s at %s rate: %w", path.key, load.key, err)
			}
			ps, err := res.percentilesMicros()
			if err != nil {
				return err
			}
			k := "latency." + load.key + "." + path.key + "."
			b.res.record(k+"rps", "req/s", res.ActualQPS)
			for _, p := range percentiles {
				b.res.record(k+p, "µs", ps[p])
			}
			if path.key == "plain" {
				plain = ps
				continue
			}
			for _, p := range percentiles {
				b.res.record("latency."+load.key+".added."+p, "µs", ps[p]-plain[p])
			}
			if fp != nil {
				if err := fp.finish(b, load.key, time.Duration(res.ActualDuration), res.ActualQPS); err != nil {
					b.res.fail(caseFootprint, err)
				}
			}
		}
	}
	return nil
}

// roundTrips is case 2's figure without idle time: 1 KB round trips on one
// connection, back to back (benchnet rr), plain then Ambit.
func (b *bench) roundTrips(ctx context.Context) error {
	var plain map[string]float64
	for _, path := range []struct{ key, ns, server string }{{"plain", nsPlain, b.plainServer}, {"ambit", nsMesh, b.meshServer}} {
		out, err := b.exec(ctx, b.cfg.LatencyTime+time.Minute, path.ns, "client", "main", filepath.Join(b.cfg.ToolDir, "benchnet"), "rr",
			"-to", fmt.Sprintf("%s:%d", path.server, portEcho), "-size", "1024", "-d", b.cfg.LatencyTime.String())
		if err != nil {
			return fmt.Errorf("round trips, %s: %w", path.key, err)
		}
		var res netload.RRResult
		if err := json.Unmarshal(out, &res); err != nil {
			return fmt.Errorf("round trips, %s: decoding benchnet's result %q: %w", path.key, out, err)
		}
		k := "latency.rr." + path.key + "."
		b.res.record(k+"rps", "round trips/s", res.PerSec)
		for _, p := range percentiles {
			b.res.record(k+p, "µs", res.Micros[p])
		}
		if path.key == "plain" {
			plain = res.Micros
			continue
		}
		for _, p := range percentiles {
			b.res.record("latency.rr.added."+p, "µs", res.Micros[p]-plain[p])
		}
	}
	return nil
}

// fortio runs fortio's load from the namespace's client pod against its
// server's HTTP echo: POSTs of 1024 bytes, echoed back.
func (b *bench) fortio(ctx context.Context, ns, server string, qps int) (*fortioResult, error) {
	out, err := b.exec(ctx, b.cfg.LatencyTime+time.Minute, ns, "client", "main", filepath.Join(b.cfg.ToolDir, "fortio"), "load",
		"-quiet", "-qps", strconv.Itoa(qps), "-c", strconv.Itoa(b.cfg.LatencyConns), "-t", b.cfg.LatencyTime.String(),
		"-payload-size", "1024", "-r", "0.000001", "-p", "50,90,99,99.9", "-json", "-",
		fmt.Sprintf("http://%s:%d/echo", server, portHTTP))
	if err != nil {
		return nil, err
	}
	var res fortioResult
	if err := json.Unmarshal(out, &res); err != nil {
		return nil, fmt.Errorf("decoding fortio's result: %w", err)
	}
	for code, n := range res.RetCodes {
		if code != "200" && n > 0 {
			return nil, fmt.Errorf("fortio got %d answers with code %s (-1: connection error): %v", n, code, res.RetCodes)
		}
	}
	if res.DurationHistogram.Count == 0 {
		return nil, fmt.Errorf("fortio made no request")
	}
	return &res, nil
}

// percentilesMicros returns the percentiles by name, in µs.
func (r *fortioResult) percentilesMicros() (map[string]float64, error) {
	out := map[string]float64{}
	for _, p := range r.DurationHistogram.Percentiles {
		out["p"+strconv.FormatFloat(p.Percentile, 'f', -1, 64)] = p.Value * 1e6
	}
	for _, p := range percentiles {
		if _, ok := out[p]; !ok {
			return nil, fmt.Errorf("fortio's result lacks %s: %+v", p, r.DurationHistogram.Percentiles)
		}
	}
	return out, nil
}

// footprint is the ztunnels' CPU at the start of a load run; their peak
// RSS was reset then.
type footprint struct{ cpu [2]float64 }

func (b *bench) startFootprint() (*footprint, error) {
	var fp footprint
	for i, z := range b.ztunnels {
		if err := z.resetPeak(); err != nil {
			return nil, err
		}
		c, err := z.cpu()
		if err != nil {
			return nil, err
		}
		fp.cpu[i] = c
	}
	return &fp, nil
}

// finish records each ztunnel's vCPU per 1000 req/s and peak RSS for the
// run that just ended.
func (fp *footprint) finish(b *bench, load string, d time.Duration, qps float64) error {
	if d <= 0 || qps <= 0 {
		return fmt.Errorf("fortio reported %s at %.0f req/s", d, qps)
	}
	for i, z := range b.ztunnels {
		c, err := z.cpu()
		if err != nil {
			return err
		}
		peak, err := z.memKB("VmHWM")
		if err != nil {
			return err
		}
		k := fmt.Sprintf("footprint.%s.ztunnel-node-%d.", load, i+1)
		vcpu := (c - fp.cpu[i]) / d.Seconds()
		b.res.record(k+"vcpu", "vCPU", vcpu)
		b.res.record(k+"vcpu_per_krps", "vCPU per 1000 req/s", vcpu/(qps/1000))
		b.res.record(k+"peak_rss_mb", "MB", float64(peak)/1024)
	}
	return nil
}

// connRate is one run of case 4, plain then Ambit.
func (b *bench) connRate(ctx context.Context) error {
	var plain float64
	for _, path := range []struct{ key, ns, server string }{{"plain", nsPlain, b.plainServer}, {"ambit", nsMesh, b.meshServer}} {
		out, err := b.exec(ctx, b.cfg.ConnTime+time.Minute, path.ns, "client", "main", filepath.Join(b.cfg.ToolDir, "benchnet"), "conns",
			"-to", fmt.Sprintf("%s:%d", path.server, portEcho), "-c", strconv.Itoa(b.cfg.ConnWorkers), "-d", b.cfg.ConnTime.String())
		if err != nil {
			return fmt.Errorf("%s: %w", path.key, err)
		}
		var res netload.ConnResult
		if err := json.Unmarshal(out, &res); err != nil {
			return fmt.Errorf("%s: decoding benchnet's result %q: %w", path.key, out, err)
		}
		if res.Errors > 0 {
			b.progress("warning: %s: %d of %d connections failed: %s", path.key, res.Errors, res.Errors+res.Conns, res.FirstError)
		}
		b.res.record("connrate."+path.key+".per_s", "connections/s", res.PerSec)
		b.res.record("connrate."+path.key+".errors", "failed connections", float64(res.Errors))
		if path.key == "plain" {
			plain = res.PerSec
			continue
		}
		b.res.record("connrate."+path.key+".ratio", "ratio to plain", res.PerSec/plain)
	}
	return nil
}
