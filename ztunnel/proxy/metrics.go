package proxy

import (
	"context"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambitmesh/ambit/api/workloadapi"
)

// The labels of Istio's standard TCP metrics, in Istio's order, so that
// dashboards and alerts written for Istio work on Ambit.
var tcpLabels = []string{
	"reporter",
	"source_workload", "source_canonical_service", "source_canonical_revision",
	"source_workload_namespace", "source_principal", "source_app", "source_version", "source_cluster",
	"destination_service", "destination_service_namespace", "destination_service_name",
	"destination_workload", "destination_canonical_service", "destination_canonical_revision",
	"destination_workload_namespace", "destination_principal", "destination_app", "destination_version", "destination_cluster",
	"request_protocol", "response_flags", "connection_security_policy",
}

// Metrics are Istio's TCP metrics.
type Metrics struct {
	opened, closed, sent, received *prometheus.CounterVec
}

// NewMetrics registers the metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	mk := func(name, help string) *prometheus.CounterVec {
		c := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, tcpLabels)
		reg.MustRegister(c)
		return c
	}
	return &Metrics{
		opened:   mk("istio_tcp_connections_opened_total", "Connections opened, by source and destination."),
		closed:   mk("istio_tcp_connections_closed_total", "Connections closed, by source and destination."),
		sent:     mk("istio_tcp_sent_bytes_total", "Bytes sent by the source to the destination during the connection."),
		received: mk("istio_tcp_received_bytes_total", "Bytes the destination sent back to the source during the connection."),
	}
}

// Reporter says which side counted a connection.
type Reporter string

const (
	ReporterSource      Reporter = "source"
	ReporterDestination Reporter = "destination"
)

// ConnInfo describes one proxied connection for metrics and the access log.
type ConnInfo struct {
	Reporter     Reporter
	Src, Dst     *workloadapi.Workload // nil when unknown
	SrcIdentity  string                // spiffe://..., "" for plaintext
	DstIdentity  string
	SrcAddr      string
	DstAddr      string
	DstService   *workloadapi.Service // nil unless the destination was a Service
	MutualTLS    bool
	Start        time.Time
	ResponseFlag string // "-" when none; Envoy/Istio flags such as "UF" (upstream failure), "UAEX" (denied)
}

func (ci *ConnInfo) labels() []string {
	pol := "none"
	if ci.MutualTLS {
		pol = "mutual_tls"
	}
	svc, svcNs, svcName := "unknown", "unknown", "unknown"
	if s := ci.DstService; s != nil {
		svc, svcNs, svcName = s.Hostname, s.Namespace, s.Name
	}
	flag := ci.ResponseFlag
	if flag == "" {
		flag = "-"
	}
	src, dst := workloadLabels(ci.Src), workloadLabels(ci.Dst)
	return []string{
		string(ci.Reporter),
		src.name, src.canonical, src.revision, src.namespace, principal(ci.SrcIdentity), src.canonical, src.revision, src.cluster,
		svc, svcNs, svcName,
		dst.name, dst.canonical, dst.revision, dst.namespace, principal(ci.DstIdentity), dst.canonical, dst.revision, dst.cluster,
		"tcp", flag, pol,
	}
}

type wlLabels struct{ name, canonical, revision, namespace, cluster string }

func workloadLabels(w *workloadapi.Workload) wlLabels {
	if w == nil {
		return wlLabels{"unknown", "unknown", "unknown", "unknown", "unknown"}
	}
	l := wlLabels{w.WorkloadName, w.CanonicalName, w.CanonicalRevision, w.Namespace, w.ClusterId}
	for _, p := range []*string{&l.name, &l.canonical, &l.revision, &l.namespace, &l.cluster} {
		if *p == "" {
			*p = "unknown"
		}
	}
	return l
}

// principal is Istio's label form of an identity: the SPIFFE ID without
// the scheme.
func principal(id string) string {
	if id == "" {
		return "unknown"
	}
	if len(id) > 9 && id[:9] == "spiffe://" {
		return id[9:]
	}
	return id
}

// tracked is a connection counted as opened, to be counted as closed once.
type tracked struct {
	m      *Metrics
	log    *slog.Logger
	info   *ConnInfo
	labels []string
}

// Open counts a connection as opened and returns the handle that closes it.
func (m *Metrics) Open(log *slog.Logger, ci *ConnInfo) *tracked {
	l := ci.labels()
	m.opened.WithLabelValues(l...).Inc()
	return &tracked{m: m, log: log, info: ci, labels: l}
}

// Close counts the connection's bytes and close and writes its access-log
// line. sent is source to destination, received the other way.
func (t *tracked) Close(sent, received int64, err error) {
	if t.info.ResponseFlag != "" && t.info.ResponseFlag != "-" {
		t.labels[len(t.labels)-2] = t.info.ResponseFlag
	}
	t.m.closed.WithLabelValues(t.labels...).Inc()
	t.m.sent.WithLabelValues(t.labels...).Add(float64(sent))
	t.m.received.WithLabelValues(t.labels...).Add(float64(received))
	h := t.log.Handler()
	if !h.Enabled(context.Background(), slog.LevelInfo) {
		return
	}
	// Straight to the handler: Logger.Info would take the caller's stack
	// (runtime.Callers) for a source the handler does not print, and box
	// every value; this line is written once per connection.
	src, dst := workloadLabels(t.info.Src), workloadLabels(t.info.Dst)
	r := slog.NewRecord(time.Now(), slog.LevelInfo, "connection complete", 0)
	r.AddAttrs(
		slog.String("reporter", string(t.info.Reporter)),
		slog.String("src.addr", t.info.SrcAddr), slog.String("src.workload", src.name), slog.String("src.namespace", src.namespace), slog.String("src.identity", t.info.SrcIdentity),
		slog.String("dst.addr", t.info.DstAddr), slog.String("dst.workload", dst.name), slog.String("dst.namespace", dst.namespace), slog.String("dst.identity", t.info.DstIdentity),
		slog.String("direction", direction(t.info.Reporter)), slog.Bool("mtls", t.info.MutualTLS),
		slog.Int64("bytes_sent", sent), slog.Int64("bytes_recv", received), slog.Duration("duration", time.Since(t.info.Start).Round(time.Microsecond)),
	)
	if t.info.DstService != nil {
		r.AddAttrs(slog.String("dst.service", t.info.DstService.Hostname))
	}
	if err != nil {
		r.AddAttrs(slog.String("error", err.Error()))
	}
	if t.info.ResponseFlag != "" && t.info.ResponseFlag != "-" {
		r.AddAttrs(slog.String("flags", t.info.ResponseFlag))
	}
	_ = h.Handle(context.Background(), r) // a log line that cannot be written is not the connection's failure
}

func direction(r Reporter) string {
	if r == ReporterSource {
		return "outbound"
	}
	return "inbound"
}
