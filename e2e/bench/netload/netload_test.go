package netload

import (
	"context"
	"net"
	"testing"
	"time"
)

func TestStreamRate(t *testing.T) {
	ms := time.Millisecond
	tests := []struct {
		name      string
		reports   []report
		warmup    time.Duration
		wantGbps  float64
		wantAcked uint64
		wantOK    bool
	}{
		{name: "no reports", wantOK: false},
		{name: "one report", reports: []report{{at: 500 * ms, bytes: 100}}, wantAcked: 100, wantOK: false},
		{name: "all within warm-up but the last", reports: []report{{at: 10 * ms, bytes: 1}, {at: 200 * ms, bytes: 2}}, warmup: 100 * ms, wantAcked: 2, wantOK: false},
		{
			name: "warm-up left out",
			reports: []report{
				{at: 50 * ms, bytes: 1_000_000_000}, // slow start, not counted
				{at: 1000 * ms, bytes: 2_000_000_000},
				{at: 2000 * ms, bytes: 3_000_000_000},
			},
			warmup:    100 * ms,
			wantGbps:  8, // 1 GB in 1 s
			wantAcked: 3_000_000_000,
			wantOK:    true,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			gbps, acked, ok := streamRate(tc.reports, tc.warmup)
			if ok != tc.wantOK || acked != tc.wantAcked || (ok && gbps != tc.wantGbps) {
				t.Errorf("streamRate = %v, %v, %v; want %v, %v, %v", gbps, acked, ok, tc.wantGbps, tc.wantAcked, tc.wantOK)
			}
		})
	}
}

func TestPercentilesMicros(t *testing.T) {
	us := time.Microsecond
	ds := make([]time.Duration, 1000)
	for i := range ds {
		ds[len(ds)-1-i] = time.Duration(i+1) * us // 1000 µs down to 1 µs
	}
	got := percentilesMicros(ds)
	want := map[string]float64{"p50": 500, "p90": 900, "p99": 990, "p99.9": 999}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
	if one := percentilesMicros([]time.Duration{7 * us}); one["p50"] != 7 || one["p99.9"] != 7 {
		t.Errorf("one sample: %v, want 7 everywhere", one)
	}
}

// TestLoopback runs the sink, the echo and both clients over loopback.
func TestLoopback(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sinkAddr, echoAddr := freeAddr(t), freeAddr(t)
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, sinkAddr, echoAddr) }()
	// Serve listens before it blocks; wait for the listeners.
	waitListening(t, sinkAddr)
	waitListening(t, echoAddr)

	for _, streams := range []int{1, 3} {
		res, err := Send(ctx, sinkAddr, streams, 300*time.Millisecond, 50*time.Millisecond)
		if err != nil {
			t.Fatalf("Send with %d streams: %v", streams, err)
		}
		if res.Gbps <= 0 || res.Bytes == 0 || len(res.PerStreamGbps) != streams {
			t.Errorf("Send with %d streams: %+v", streams, res)
		}
	}
	cr, err := Conns(ctx, echoAddr, 2, 200*time.Millisecond)
	if err != nil {
		t.Fatalf("Conns: %v", err)
	}
	if cr.Conns == 0 || cr.Errors != 0 || cr.PerSec <= 0 {
		t.Errorf("Conns: %+v", cr)
	}
	rr, err := RoundTrips(ctx, echoAddr, 1024, 300*time.Millisecond, 50*time.Millisecond)
	if err != nil {
		t.Fatalf("RoundTrips: %v", err)
	}
	if rr.RoundTrips == 0 || rr.PerSec <= 0 || rr.Micros["p50"] <= 0 || rr.Micros["p50"] > rr.Micros["p99.9"] {
		t.Errorf("RoundTrips: %+v", rr)
	}
	cancel()
	if err := <-served; err != nil {
		t.Errorf("Serve: %v", err)
	}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close() // only asked the kernel for a free port
	return addr
}

func waitListening(t *testing.T, addr string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			_ = c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not listening: %v", addr, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
