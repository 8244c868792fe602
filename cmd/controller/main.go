// Command controller is Ambit's control plane (a Deployment): the mesh CA
// and the xDS server the ztunnels connect to, on one gRPC port over TLS, fed
// by a controller-runtime manager watching the cluster.
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"

	"github.com/ambitmesh/ambit/controller/ca"
	"github.com/ambitmesh/ambit/controller/mesh"
	"github.com/ambitmesh/ambit/controller/xds"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "controller: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		namespace   = flag.String("namespace", "istio-system", "namespace Ambit runs in: CA secret, leader election")
		rootNS      = flag.String("root-namespace", "", "root namespace of mesh-wide policies (default: --namespace)")
		trustDomain = flag.String("trust-domain", "cluster.local", "SPIFFE trust domain")
		clusterID   = flag.String("cluster-id", "Kubernetes", "cluster name in workload UIDs")
		grpcAddr    = flag.String("grpc-address", ":15012", "CA and xDS (gRPC over TLS)")
		serviceName = flag.String("service-name", "ambit-controller", "the controller's Service, for its serving certificate")
		metricsAddr = flag.String("metrics-address", ":15014", "Prometheus metrics")
		probeAddr   = flag.String("health-address", ":15021", "health and readiness probes (/healthz, /readyz)")
		leaderElect = flag.Bool("leader-elect", true, "elect one replica to write status")
		logLevel    = flag.String("log-level", "info", "debug, info, warn or error")
	)
	flag.Parse()
	var level slog.LevelVar
	if err := level.UnmarshalText([]byte(strings.ToUpper(*logLevel))); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: &level}))
	ctrl.SetLogger(logr.FromSlogHandler(log.Handler()))
	if *rootNS == "" {
		*rootNS = *namespace
	}
	ctx := ctrl.SetupSignalHandler()

	cfg, err := ctrl.GetConfig()
	if err != nil {
		return fmt.Errorf("loading the cluster config: %w", err)
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return err
	}
	if err := securityv1.AddToScheme(scheme); err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                  scheme,
		LeaderElection:          *leaderElect,
		LeaderElectionID:        "ambit-controller",
		LeaderElectionNamespace: *namespace,
		// Hand the lease over on a clean stop instead of letting it
		// expire: the next replica writes status at once.
		LeaderElectionReleaseOnCancel: true,
		Metrics:                       metricsserver.Options{BindAddress: *metricsAddr},
		HealthProbeBindAddress:        *probeAddr,
	})
	if err != nil {
		return fmt.Errorf("creating the manager: %w", err)
	}

	authority, err := ca.LoadOrCreate(ctx, cs, *namespace, ca.Options{TrustDomain: *trustDomain, Log: log.With("component", "ca")})
	if err != nil {
		return err
	}
	// The node check reads pods from the manager's cache (the API server
	// only when the cache lacks a pod), not a list of the node's pods per
	// certificate.
	if err := ca.IndexPodsByNode(ctx, mgr.GetFieldIndexer()); err != nil {
		return fmt.Errorf("indexing pods by node: %w", err)
	}
	caServer, err := ca.NewServer(authority, cs, ca.ServerOptions{
		Log:        log.With("component", "ca"),
		Registerer: ctrlmetrics.Registry,
		Pods:       ca.CachedPods(mgr.GetCache(), ca.APIPods(cs)),
	})
	if err != nil {
		return err
	}
	xdsServer := xds.New(xds.Options{Log: log.With("component", "xds"), Registerer: ctrlmetrics.Registry})
	host := *serviceName + "." + *namespace + ".svc"
	tlsConf := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: authority.GetServingCertificate(24*time.Hour, host, host+".cluster.local", *serviceName),
	}
	g := grpc.NewServer(append([]grpc.ServerOption{
		grpc.Creds(credentials.NewTLS(tlsConf)),
		// xDS callers authenticate with their token, like CA callers.
		grpc.ChainStreamInterceptor(caServer.StreamAuthenticator("/envoy.service.discovery.v3.AggregatedDiscoveryService/")),
		// A reconnecting node lists every resource name it holds.
		grpc.MaxRecvMsgSize(64 << 20),
	}, xds.ServerKeepalive()...)...)
	caServer.Register(g)
	xdsServer.Register(g)
	if err := mgr.Add(grpcRunnable{g: g, addr: *grpcAddr, log: log}); err != nil {
		return err
	}

	r := &mesh.Reconciler{
		Client:        mgr.GetClient(),
		Clientset:     cs,
		XDS:           xdsServer,
		RootPEM:       authority.RootPEM(),
		RootNamespace: *rootNS,
		TrustDomain:   *trustDomain,
		ClusterID:     *clusterID,
		Recorder:      mgr.GetEventRecorder("ambit-controller"),
		Log:           log.With("component", "mesh"),
		Elected:       mgr.Elected(),
	}
	if err := r.SetupWithManager(mgr); err != nil {
		return err
	}
	if err := mgr.AddHealthzCheck("ping", healthz.Ping); err != nil {
		return err
	}
	if err := mgr.AddReadyzCheck("ping", healthz.Ping); err != nil {
		return err
	}
	log.Info("controller starting", "namespace", *namespace, "rootNamespace", *rootNS, "trustDomain", *trustDomain, "grpc", *grpcAddr)
	return mgr.Start(ctx)
}

// grpcRunnable serves the CA and xDS on every replica, leader or not.
type grpcRunnable struct {
	g    *grpc.Server
	addr string
	log  *slog.Logger
}

func (r grpcRunnable) NeedLeaderElection() bool { return false }

func (r grpcRunnable) Start(ctx context.Context) error {
	ln, err := net.Listen("tcp", r.addr)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", r.addr, err)
	}
	go func() {
		<-ctx.Done()
		r.g.GracefulStop()
	}()
	r.log.Info("serving CA and xDS", "address", r.addr)
	return r.g.Serve(ln)
}
