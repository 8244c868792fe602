// Command ztunnel is Ambit's node tunnel (a DaemonSet, host network): it
// gets its config from the controller over xDS and its workloads'
// certificates from the controller's CA, receives the node's enrolled pods
// from the node agent over ZDS, and carries their traffic over HBONE.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/ambitmesh/ambit/ztunnel/admin"
	"github.com/ambitmesh/ambit/ztunnel/identity"
	"github.com/ambitmesh/ambit/ztunnel/inpod"
	"github.com/ambitmesh/ambit/ztunnel/proxy"
	"github.com/ambitmesh/ambit/ztunnel/state"
	"github.com/ambitmesh/ambit/ztunnel/xds"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "ztunnel: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		controller  = flag.String("controller-address", "ambit-controller.istio-system.svc:15012", "controller xDS and CA address (gRPC over TLS)")
		rootCert    = flag.String("root-cert", "/var/run/secrets/istio/root-cert.pem", "mesh root certificate (the istio-ca-root-cert ConfigMap)")
		tokenFile   = flag.String("token", "/var/run/secrets/tokens/istio-token", "projected service-account token (audience istio-ca)")
		zdsSocket   = flag.String("zds-socket", "/var/run/ztunnel/ztunnel.sock", "node agent socket (ZDS)")
		trustDomain = flag.String("trust-domain", "cluster.local", "SPIFFE trust domain")
		clusterID   = flag.String("cluster-id", "Kubernetes", "cluster name in workload UIDs")
		adminAddr   = flag.String("admin-address", "127.0.0.1:15000", "admin endpoint (config dump, log level)")
		logLevel    = flag.String("log-level", "info", "debug, info, warn or error")
	)
	flag.Parse()
	var level slog.LevelVar
	if err := level.UnmarshalText([]byte(strings.ToUpper(*logLevel))); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: &level}))
	node := os.Getenv("NODE_NAME")
	if node == "" {
		return fmt.Errorf("NODE_NAME is not set: the DaemonSet sets it from spec.nodeName")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	rootPEM, err := os.ReadFile(*rootCert)
	if err != nil {
		return fmt.Errorf("reading the mesh root %s (is the istio-ca-root-cert ConfigMap published in this namespace?): %w", *rootCert, err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		return fmt.Errorf("no certificate in %s", *rootCert)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	certs, err := identity.NewManager(identity.Options{
		CAAddr:      *controller,
		CARoots:     roots,
		TokenFile:   *tokenFile,
		TrustDomain: *trustDomain,
		Log:         log.With("component", "identity"),
	})
	if err != nil {
		return err
	}
	store := state.New()
	xc, err := xds.New(xds.Options{
		Addr:   *controller,
		TLS:    &tls.Config{RootCAs: roots, ServerName: host(*controller), MinVersion: tls.VersionTLS12},
		Token:  func() (string, error) { b, err := os.ReadFile(*tokenFile); return strings.TrimSpace(string(b)), err },
		NodeID: "ztunnel~" + node,
		Store:  store,
		Log:    log.With("component", "xds"),
	})
	if err != nil {
		return err
	}
	px := proxy.New(proxy.Options{
		Store:       store,
		Certs:       certs,
		Metrics:     proxy.NewMetrics(reg),
		TrustDomain: *trustDomain,
		ClusterID:   *clusterID,
		Log:         log.With("component", "proxy"),
	})
	defer px.Close()
	zds := &inpod.Client{Path: *zdsSocket, Handler: px, Log: log.With("component", "zds")}

	errc := make(chan error, 3)
	go func() { errc <- xc.Run(ctx) }()
	// Serve pods only once the controller's config is in: before that
	// every destination would look unknown and go out as plaintext
	// passthrough. Until then the pods' captured connections find no
	// listener and wait or fail (fail closed).
	go func() {
		select {
		case <-xc.Synced():
			log.Info("config synced; serving enrolled pods", "zds", *zdsSocket)
			errc <- zds.Run(ctx)
		case <-ctx.Done():
			errc <- nil
		}
	}()
	go func() {
		errc <- admin.Serve(ctx, admin.Options{
			AdminAddr: *adminAddr, MetricsAddr: ":15020", ReadyAddr: ":15021",
			ConfigDump: func() any {
				return map[string]any{
					"node":         node,
					"config":       store.Dump(),
					"served":       px.Served(),
					"certificates": certs.Snapshot(),
				}
			},
			Ready: func() (bool, string) {
				select {
				case <-xc.Synced():
					return true, ""
				default:
					return false, "waiting for the first config from the controller at " + *controller
				}
			},
			Gatherer: reg,
			Level:    &level,
			Log:      log,
		})
	}()
	log.Info("ztunnel starting", "node", node, "controller", *controller, "zds", *zdsSocket)
	select {
	case <-ctx.Done():
	case err := <-errc:
		if err != nil {
			return err
		}
	}
	log.Info("ztunnel stopping")
	return nil
}

// host is the host part of a host:port address.
func host(addr string) string {
	h, _, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return h
}
