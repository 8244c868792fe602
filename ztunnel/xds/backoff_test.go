package xds

import (
	"testing"
	"time"
)

func TestBackoff(t *testing.T) {
	b := backoff{initial: 100 * time.Millisecond, max: time.Second}
	b.reset()
	const ms = time.Millisecond
	want := []time.Duration{100 * ms, 200 * ms, 400 * ms, 800 * ms, 1000 * ms, 1000 * ms}
	for i := range 3 { // jitter is random: try a few draws
		b.reset()
		for j, w := range want {
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
