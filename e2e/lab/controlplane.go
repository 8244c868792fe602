package lab

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/ambitmesh/ambit/e2e/lab/pki"
)

// makePKI writes the cluster CA and every certificate, key and kubeconfig
// the control plane, the node agents and kube-proxy use, under <dir>/pki.
func (l *Lab) makePKI() error {
	if err := os.MkdirAll(l.path("pki"), 0o700); err != nil {
		return err
	}
	ca, err := pki.NewCA("ambit-lab-"+l.opts.Name, 10*365*24*time.Hour)
	if err != nil {
		return err
	}
	if err := ca.WriteFiles(l.path("pki", "ca.crt"), l.path("pki", "ca.key")); err != nil {
		return err
	}
	issue := func(file string, r pki.Request) (pki.KeyPair, error) {
		kp, err := ca.Issue(r)
		if err != nil {
			return kp, fmt.Errorf("issuing %s: %w", file, err)
		}
		return kp, kp.WriteFiles(l.path("pki", file+".crt"), l.path("pki", file+".key"))
	}
	if _, err := issue("apiserver", pki.Request{
		CommonName: "kube-apiserver",
		DNSNames:   []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		IPs:        []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP(apiServiceIP), net.ParseIP(controlPlaneIP)},
		Server:     true,
	}); err != nil {
		return err
	}
	if _, err := issue("apiserver-kubelet-client", pki.Request{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}, Client: true}); err != nil {
		return err
	}
	priv, pub, err := pki.NewServiceAccountKey()
	if err != nil {
		return err
	}
	if err := os.WriteFile(l.path("pki", "sa.key"), priv, 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(l.path("pki", "sa.pub"), pub, 0o644); err != nil {
		return err
	}
	internal := fmt.Sprintf("https://%s:%d", controlPlaneIP, apiserverPort)
	clients := []struct {
		file, user string
		groups     []string
	}{
		{"admin", "kubernetes-admin", []string{"system:masters"}},
		{"controller-manager", "system:kube-controller-manager", nil},
		{"scheduler", "system:kube-scheduler", nil},
		{"kube-proxy", "system:kube-proxy", nil},
	}
	for i := 1; i <= l.opts.Nodes; i++ {
		clients = append(clients, struct {
			file, user string
			groups     []string
		}{"node-" + strconv.Itoa(i), "system:node:" + NodeName(i), []string{"system:nodes"}})
		if _, err := issue(NodeName(i)+"-serving", pki.Request{
			CommonName: "system:node:" + NodeName(i),
			DNSNames:   []string{NodeName(i)},
			IPs:        []net.IP{net.ParseIP(nodeIP(i))},
			Server:     true,
		}); err != nil {
			return err
		}
	}
	for _, c := range clients {
		kp, err := issue(c.file, pki.Request{CommonName: c.user, Organization: c.groups, Client: true})
		if err != nil {
			return err
		}
		if err := pki.WriteKubeconfig(l.path("pki", c.file+".kubeconfig"), internal, ca.CertPEM, c.user, kp); err != nil {
			return err
		}
	}
	return nil
}

// startControlPlane starts etcd, kube-apiserver, the host forwarder,
// kube-controller-manager and kube-scheduler in the control-plane
// namespace and waits for the API server to be ready.
func (l *Lab) startControlPlane(ctx context.Context) error {
	cp := l.cpNetns()
	hk := l.kubeBin("hyperkube")
	p := func(f string) string { return l.path("pki", f) }
	start := func(name, netns string, argv ...string) error {
		proc, err := startDaemon(name, netns, l.path("logs", name+".log"), nil, argv...)
		if err != nil {
			return err
		}
		l.state.Procs = append(l.state.Procs, proc)
		return l.saveState()
	}
	if err := start("etcd", cp, l.kubeBin("etcd"),
		"--name=lab", "--data-dir="+l.path("etcd"),
		"--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=lab=http://127.0.0.1:2380",
		"--listen-metrics-urls=http://127.0.0.1:2381",
		"--quota-backend-bytes=2147483648", "--log-level=warn",
	); err != nil {
		return err
	}
	if err := start("kube-apiserver", cp, hk, "kube-apiserver",
		"--etcd-servers=http://127.0.0.1:2379",
		"--bind-address=0.0.0.0", fmt.Sprintf("--secure-port=%d", apiserverPort),
		"--advertise-address="+controlPlaneIP,
		"--tls-cert-file="+p("apiserver.crt"), "--tls-private-key-file="+p("apiserver.key"),
		"--client-ca-file="+p("ca.crt"),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+p("sa.pub"),
		"--service-account-signing-key-file="+p("sa.key"),
		"--service-cluster-ip-range="+serviceCIDR,
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		"--kubelet-client-certificate="+p("apiserver-kubelet-client.crt"),
		"--kubelet-client-key="+p("apiserver-kubelet-client.key"),
		"--kubelet-certificate-authority="+p("ca.crt"),
		"--kubelet-preferred-address-types=InternalIP",
		"--allow-privileged=true",
		"--profiling=false",
		"--v=1",
	); err != nil {
		return err
	}
	fwd, err := l.startForwarder()
	if err != nil {
		return err
	}
	l.state.Server = "https://" + fwd
	l.state.Kubeconfig = l.path("kubeconfig")
	if err := l.writeHostKubeconfig(); err != nil {
		return err
	}
	if err := l.waitReadyz(ctx, 90*time.Second); err != nil {
		return err
	}
	if err := start("kube-controller-manager", cp, hk, "kube-controller-manager",
		"--kubeconfig="+p("controller-manager.kubeconfig"),
		"--authentication-kubeconfig="+p("controller-manager.kubeconfig"),
		"--authorization-kubeconfig="+p("controller-manager.kubeconfig"),
		"--bind-address=127.0.0.1",
		"--service-account-private-key-file="+p("sa.key"),
		"--root-ca-file="+p("ca.crt"),
		"--use-service-account-credentials",
		"--cluster-cidr="+clusterCIDR, "--allocate-node-cidrs", "--node-cidr-mask-size=24",
		"--service-cluster-ip-range="+serviceCIDR,
		"--cluster-signing-cert-file="+p("ca.crt"), "--cluster-signing-key-file="+p("ca.key"),
		"--leader-elect=false",
		"--flex-volume-plugin-dir="+l.path("flexvolume"),
		"--profiling=false",
	); err != nil {
		return err
	}
	return start("kube-scheduler", cp, hk, "kube-scheduler",
		"--kubeconfig="+p("scheduler.kubeconfig"),
		"--authentication-kubeconfig="+p("scheduler.kubeconfig"),
		"--authorization-kubeconfig="+p("scheduler.kubeconfig"),
		"--bind-address=127.0.0.1",
		"--leader-elect=false",
		"--profiling=false",
	)
}

// startForwarder starts `lab forward` in the host namespace on a free
// loopback port, relaying to the API server inside the control-plane
// namespace, and returns its address.
func (l *Lab) startForwarder() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	addr := ln.Addr().String()
	_ = ln.Close() // only asked the kernel for a free port
	proc, err := startDaemon("forward", "", l.path("logs", "forward.log"), nil,
		l.labBin(), "forward", "--listen="+addr, "--netns="+l.cpNetns(),
		fmt.Sprintf("--to=%s:%d", controlPlaneIP, apiserverPort))
	if err != nil {
		return "", err
	}
	l.state.Procs = append(l.state.Procs, proc)
	return addr, l.saveState()
}

func (l *Lab) labBin() string { return l.opts.BinDir + "/lab" }

// writeHostKubeconfig writes the admin kubeconfig the host uses, pointing at
// the forwarder.
func (l *Lab) writeHostKubeconfig() error {
	caPEM, err := os.ReadFile(l.path("pki", "ca.crt"))
	if err != nil {
		return err
	}
	var kp pki.KeyPair
	if kp.CertPEM, err = os.ReadFile(l.path("pki", "admin.crt")); err != nil {
		return err
	}
	if kp.KeyPEM, err = os.ReadFile(l.path("pki", "admin.key")); err != nil {
		return err
	}
	return pki.WriteKubeconfig(l.state.Kubeconfig, l.state.Server, caPEM, "kubernetes-admin", kp)
}

// waitReadyz waits for a real 200 from /readyz: starting the controller
// manager before RBAC bootstrap finished makes it die on
// extension-apiserver-authentication being forbidden.
func (l *Lab) waitReadyz(ctx context.Context, d time.Duration) error {
	client, err := l.adminHTTPClient()
	if err != nil {
		return err
	}
	var last string
	ok := waitFor(d, func() bool {
		if ctx.Err() != nil {
			return true
		}
		resp, err := client.Get(l.state.Server + "/readyz")
		if err != nil {
			last = err.Error()
			return false
		}
		_ = resp.Body.Close()
		last = resp.Status
		return resp.StatusCode == http.StatusOK
	})
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if !ok {
		return fmt.Errorf("kube-apiserver not ready after %s (last: %s); see %s", d, last, l.path("logs", "kube-apiserver.log"))
	}
	return nil
}

func (l *Lab) adminHTTPClient() (*http.Client, error) {
	caPEM, err := os.ReadFile(l.path("pki", "ca.crt"))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	cert, err := tls.LoadX509KeyPair(l.path("pki", "admin.crt"), l.path("pki", "admin.key"))
	if err != nil {
		return nil, err
	}
	return &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}},
	}, nil
}
