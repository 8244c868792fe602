package bench

import (
	"math"
	"testing"
)

func TestSummarize(t *testing.T) {
	tests := []struct {
		name           string
		xs             []float64
		median, lo, hi float64
	}{
		{name: "one", xs: []float64{3}, median: 3, lo: 3, hi: 3},
		{name: "odd, unsorted", xs: []float64{5, 1, 3}, median: 3, lo: 1, hi: 5},
		{name: "even: mean of the middle two", xs: []float64{4, 1, 2, 10}, median: 3, lo: 1, hi: 10},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m, lo, hi := summarize(tc.xs)
			if m != tc.median || lo != tc.lo || hi != tc.hi {
				t.Errorf("summarize(%v) = %v, %v, %v; want %v, %v, %v", tc.xs, m, lo, hi, tc.median, tc.lo, tc.hi)
			}
		})
	}
	if m, _, _ := summarize(nil); !math.IsNaN(m) {
		t.Errorf("summarize(nil) median = %v, want NaN", m)
	}
}

func TestPercentile(t *testing.T) {
	xs := []float64{10, 1, 9, 2, 8, 3, 7, 4, 6, 5}
	tests := []struct {
		name string
		p    float64
		want float64
	}{
		{name: "p50", p: 50, want: 5},
		{name: "p90", p: 90, want: 9},
		{name: "p99 of 10 is the max", p: 99, want: 10},
		{name: "p100", p: 100, want: 10},
		{name: "tiny p is the min", p: 0.1, want: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := percentile(xs, tc.p); got != tc.want {
				t.Errorf("percentile(%v) = %v, want %v", tc.p, got, tc.want)
			}
		})
	}
}
