package bench

import (
	"math"
	"slices"
)

// Metric is one figure over the runs: its raw samples (one per run, in run
// order) and their median, min and max.
type Metric struct {
	Unit    string    `json:"unit"`
	Samples []float64 `json:"samples"`
	Median  float64   `json:"median"`
	Min     float64   `json:"min"`
	Max     float64   `json:"max"`
}

// add appends a sample and updates the summary.
func (m *Metric) add(v float64) {
	m.Samples = append(m.Samples, v)
	m.Median, m.Min, m.Max = summarize(m.Samples)
}

// summarize returns the median (the mean of the middle two for an even
// count), min and max; NaN for no samples.
func summarize(xs []float64) (median, lo, hi float64) {
	if len(xs) == 0 {
		return math.NaN(), math.NaN(), math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	median = s[n/2]
	if n%2 == 0 {
		median = (s[n/2-1] + s[n/2]) / 2
	}
	return median, s[0], s[n-1]
}

// percentile is the nearest-rank percentile p (0 < p <= 100) of xs: the
// smallest sample with at least p% of the samples at or below it. NaN for
// no samples.
func percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	rank := int(math.Ceil(p / 100 * float64(len(s))))
	return s[min(max(rank, 1), len(s))-1]
}
