// Package admin serves ztunnel's operator endpoints: the admin port (config
// dump, log level, pprof; localhost only), Prometheus metrics, and the
// readiness probe. It knows nothing of the data path: callers hand it
// functions that produce what it shows.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Options configures the endpoints. Empty addresses are not served.
type Options struct {
	AdminAddr   string // default 127.0.0.1:15000
	MetricsAddr string // default :15020
	ReadyAddr   string // default :15021
	// ConfigDump returns what /config_dump shows, JSON-marshalable.
	ConfigDump func() any
	// Ready reports readiness and, when not ready, why.
	Ready    func() (bool, string)
	Gatherer prometheus.Gatherer
	Level    *slog.LevelVar
	Log      *slog.Logger
}

// Serve serves the endpoints until ctx is done.
func Serve(ctx context.Context, o Options) error {
	admin := http.NewServeMux()
	admin.HandleFunc("GET /config_dump", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(o.ConfigDump()); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
		}
	})
	admin.HandleFunc("/logging", func(w http.ResponseWriter, r *http.Request) {
		if lvl := r.URL.Query().Get("level"); lvl != "" {
			var l slog.Level
			if err := l.UnmarshalText([]byte(strings.ToUpper(lvl))); err != nil {
				http.Error(w, fmt.Sprintf("level %q: want debug, info, warn or error", lvl), http.StatusBadRequest)
				return
			}
			o.Level.Set(l)
			o.Log.Info("log level changed", "level", l)
		}
		// A failed write means the client went away: nobody to tell.
		_, _ = fmt.Fprintf(w, "level: %s\n", o.Level.Level())
	})
	admin.HandleFunc("/debug/pprof/", pprof.Index)
	admin.HandleFunc("/debug/pprof/profile", pprof.Profile)
	admin.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	admin.HandleFunc("/debug/pprof/trace", pprof.Trace)
	admin.Handle("GET /stats/prometheus", promhttp.HandlerFor(o.Gatherer, promhttp.HandlerOpts{}))

	metrics := http.NewServeMux()
	metrics.Handle("GET /metrics", promhttp.HandlerFor(o.Gatherer, promhttp.HandlerOpts{}))
	metrics.Handle("GET /stats/prometheus", promhttp.HandlerFor(o.Gatherer, promhttp.HandlerOpts{}))

	ready := http.NewServeMux()
	ready.HandleFunc("GET /healthz/ready", func(w http.ResponseWriter, _ *http.Request) {
		if ok, why := o.Ready(); !ok {
			http.Error(w, "not ready: "+why, http.StatusServiceUnavailable)
			return
		}
		_, _ = fmt.Fprintln(w, "ready") // as above: the prober went away
	})

	errc := make(chan error, 3)
	var servers []*http.Server
	for _, s := range []struct {
		addr string
		h    http.Handler
	}{{o.AdminAddr, admin}, {o.MetricsAddr, metrics}, {o.ReadyAddr, ready}} {
		if s.addr == "" {
			continue
		}
		ln, err := net.Listen("tcp", s.addr)
		if err != nil {
			return fmt.Errorf("listening on %s: %w", s.addr, err)
		}
		srv := &http.Server{Handler: s.h, ReadHeaderTimeout: 5 * time.Second}
		servers = append(servers, srv)
		go func() { errc <- srv.Serve(ln) }()
	}
	select {
	case <-ctx.Done():
	case err := <-errc:
		if !errors.Is(err, http.ErrServerClosed) {
			return err
		}
	}
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, s := range servers {
		_ = s.Shutdown(sctx)
	}
	return nil
}
