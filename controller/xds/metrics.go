package xds

import "github.com/prometheus/client_golang/prometheus"

// metrics are the server's Prometheus series, labelled by type URL.
type metrics struct {
	pushes    *prometheus.CounterVec
	pushBytes *prometheus.CounterVec
	nacks     *prometheus.CounterVec
	streams   prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) metrics {
	m := metrics{
		pushes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_xds_pushes_total",
			Help: "xDS responses sent to nodes, by type URL.",
		}, []string{"type_url"}),
		pushBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_xds_push_bytes_total",
			Help: "Encoded size of the xDS responses sent to nodes, by type URL.",
		}, []string{"type_url"}),
		nacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_xds_nacks_total",
			Help: "xDS responses nodes rejected, by type URL.",
		}, []string{"type_url"}),
		streams: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ambit_xds_streams",
			Help: "Open delta ADS streams.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.pushes, m.pushBytes, m.nacks, m.streams)
	}
	return m
}
