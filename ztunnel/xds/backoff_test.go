package xds

import (
	"testing"
	"time"
)

func TestBackoff(t *testing.T) {
	b := backoff{initial: 100 * time.Millisecond, max: time.Second}
	b.reset()
	want := []time.Duration{100, 200, 400, 800, 1000, 1000}
	for i := range 3 { // jitter is random: try a few draws
		b.reset()
		for j, w := range want {
			w *= time.Millisecond
			if d := b.next(); d < w/2 || d > w {
				t.Fatalf("draw %d, attempt %d: delay %v outside [%v, %v]", i, j, d, w/2, w)
			}
		}
	}
	b.reset()
	if d := b.next(); d > 100*time.Millisecond {
		t.Errorf("after reset: %v, want at most the initial backoff", d)
	}
}
