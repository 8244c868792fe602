package ca

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	refusals *prometheus.CounterVec
	issued   prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_ca_refusals_total",
			Help: "Certificate requests the mesh CA refused, by reason.",
		}, []string{"reason"}),
		issued: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ambit_ca_certificates_issued_total",
			Help: "Workload certificates the mesh CA issued.",
		}),
	}
	var err error
	if m.refusals, err = register(reg, m.refusals); err != nil {
		return nil, err
	}
	if m.issued, err = register(reg, m.issued); err != nil {
		return nil, err
	}
	// Every reason from the start, so that a rate() over a reason that has
	// not happened yet is 0 rather than absent.
	for _, r := range allReasons {
		m.refusals.WithLabelValues(r)
	}
	return m, nil
}

// register registers c, or returns the collector already registered under
// its name (a second Server in the same process shares the counters).
func register[C prometheus.Collector](reg prometheus.Registerer, c C) (C, error) {
	err := reg.Register(c)
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		if existing, ok := are.ExistingCollector.(C); ok {
			return existing, nil
		}
	}
	return c, err
}
