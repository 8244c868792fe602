package bench

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The bench's namespaces. Plain and mesh hold the same pods; only mesh is
// enrolled. Idle holds the pods enrolled for the idle-RSS figure.
const (
	nsPlain = "bench-plain"
	nsMesh  = "bench-mesh"
	nsIdle  = "bench-idle"
	nsCP    = "bench-cp"

	portHTTP    = 8080  // fortio server
	portSink    = 5001  // benchnet bulk sink
	portEcho    = 5002  // benchnet echo (connection rate, round trips)
	portStunnel = 15443 // stunnel, in both pods of the plain namespace

	annotationRedirection = "ambient.istio.io/redirection"
	labelDataplaneMode    = "istio.io/dataplane-mode"

	stunnelDir  = "/etc/bench-stunnel"
	stunnelHost = "stunnel-server.bench"
)

// serverPod is the server of a path, on node-2: fortio's HTTP echo,
// benchnet's sink and echo, and in the plain namespace the server-side
// stunnel, which forwards to the sink over the pod's loopback.
func (b *bench) serverPod(ns string, withStunnel bool) string {
	tool := func(name string) string { return fmt.Sprintf("%q", filepath.Join(b.cfg.ToolDir, name)) }
	y := fmt.Sprintf(`
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: %[1]s, labels: {app: bench-server}}
spec:
  nodeName: node-2
  terminationGracePeriodSeconds: 1
  containers:
  - name: fortio
    image: ambit/sleep
    command: [%[2]s, server, -http-port, "%[4]d", -grpc-port, disabled, -redirect-port, disabled, -tcp-port, disabled, -udp-port, disabled, -loglevel, Warning]
    readinessProbe: {tcpSocket: {port: %[4]d}, periodSeconds: 1}
  - name: net
    image: ambit/sleep
    command: [%[3]s, serve, -sink, ":%[5]d", -echo, ":%[6]d"]
    readinessProbe: {tcpSocket: {port: %[5]d}, periodSeconds: 1}
`, ns, tool("fortio"), tool("benchnet"), portHTTP, portSink, portEcho)
	if withStunnel {
		y += stunnelContainer("stunnel-server", "server.conf")
	}
	return y
}

// clientPod is the client of a path, on node-1: the load runs in it with
// kubectl exec. In the plain namespace it has the client-side stunnel.
func (b *bench) clientPod(ns string, withStunnel bool) string {
	y := fmt.Sprintf(`
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: %s, labels: {app: bench-client}}
spec:
  nodeName: node-1
  terminationGracePeriodSeconds: 1
  containers:
  - {name: main, image: ambit/sleep}
`, ns)
	if withStunnel {
		y += stunnelContainer("stunnel-client", "client.conf")
	}
	return y
}

func stunnelContainer(secret, conf string) string {
	return fmt.Sprintf(`  - name: stunnel
    image: ambit/sleep
    command: [stunnel4, %s/%s]
    volumeMounts: [{name: stunnel, mountPath: %[1]s, readOnly: true}]
    readinessProbe: {tcpSocket: {port: %[3]d}, periodSeconds: 1}
  volumes:
  - {name: stunnel, secret: {secretName: %[4]s, defaultMode: 256}}
`, stunnelDir, conf, portStunnel, secret)
}

func namespace(name string) string {
	return fmt.Sprintf("apiVersion: v1\nkind: Namespace\nmetadata: {name: %s}\n", name)
}

// deployApps creates the namespaces and pods, servers first: the
// client-side stunnel's configuration names the server pod's IP.
func (b *bench) deployApps(ctx context.Context) error {
	idle := b.cfg.IdlePods
	if !b.cfg.selected("idle") {
		idle = 0
	}
	b.progress("deploying the bench's pods (and %d idle pods)", idle)
	pki, err := newStunnelPKI()
	if err != nil {
		return err
	}
	docs := []string{namespace(nsPlain), namespace(nsMesh), namespace(nsIdle)}
	if err := b.lab.Apply(ctx, []byte(strings.Join(docs, "---\n"))); err != nil {
		return err
	}
	if err := b.createSecret(ctx, "stunnel-server", pki.files("server", stunnelServerConf)); err != nil {
		return err
	}
	docs = []string{b.serverPod(nsPlain, true), b.serverPod(nsMesh, false)}
	for i := range idle {
		docs = append(docs, fmt.Sprintf(`
apiVersion: v1
kind: Pod
metadata: {name: idle-%03d, namespace: %s, labels: {app: bench-idle}}
spec:
  nodeName: node-%d
  terminationGracePeriodSeconds: 1
  containers:
  - {name: main, image: ambit/sleep}
`, i, nsIdle, i%2+1))
	}
	if err := b.lab.Apply(ctx, []byte(strings.Join(docs, "---\n"))); err != nil {
		return err
	}
	for _, ns := range []string{nsPlain, nsMesh} {
		if err := b.waitPodsReady(ctx, ns, "app=bench-server", 1, 2*time.Minute); err != nil {
			return err
		}
	}
	for _, ns := range []string{nsPlain, nsMesh} {
		p, err := b.cs.CoreV1().Pods(ns).Get(ctx, "server", metav1.GetOptions{})
		if err != nil {
			return err
		}
		b.res.Lab.PodIPs[ns+"/server"] = p.Status.PodIP
	}
	b.plainServer, b.meshServer = b.res.Lab.PodIPs[nsPlain+"/server"], b.res.Lab.PodIPs[nsMesh+"/server"]
	clientConf := fmt.Sprintf(stunnelClientConf, b.plainServer, portStunnel)
	if err := b.createSecret(ctx, "stunnel-client", pki.files("client", clientConf)); err != nil {
		return err
	}
	if err := b.lab.Apply(ctx, []byte(b.clientPod(nsPlain, true)+"---\n"+b.clientPod(nsMesh, false))); err != nil {
		return err
	}
	for _, ns := range []string{nsPlain, nsMesh} {
		if err := b.waitPodsReady(ctx, ns, "app=bench-client", 1, 2*time.Minute); err != nil {
			return err
		}
		p, err := b.cs.CoreV1().Pods(ns).Get(ctx, "client", metav1.GetOptions{})
		if err != nil {
			return err
		}
		b.res.Lab.PodIPs[ns+"/client"] = p.Status.PodIP
	}
	return b.waitPodsReady(ctx, nsIdle, "app=bench-idle", idle, 5*time.Minute)
}

func (b *bench) createSecret(ctx context.Context, name string, data map[string][]byte) error {
	_, err := b.cs.CoreV1().Secrets(nsPlain).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: nsPlain},
		Data:       data,
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("creating secret %s: %w", name, err)
	}
	return nil
}

// The stunnel configurations: TLS 1.3 only, with the suite Go's crypto/tls
// picks on AES-NI hardware (Ambit's HBONE), certificates verified both
// ways against the bench's CA, as HBONE's mTLS does against the mesh root.
const (
	stunnelCommon = `foreground = yes
pid =
debug = warning
`
	stunnelTLS = `cert = ` + stunnelDir + `/tls.crt
key = ` + stunnelDir + `/tls.key
CAfile = ` + stunnelDir + `/ca.crt
verifyChain = yes
sslVersionMin = TLSv1.3
ciphersuites = TLS_AES_128_GCM_SHA256
`
	stunnelServerConf = stunnelCommon + `[bench]
accept = 15443
connect = 127.0.0.1:5001
` + stunnelTLS
	// stunnelClientConf takes the server pod's IP and port.
	stunnelClientConf = stunnelCommon + `[bench]
client = yes
accept = 0.0.0.0:15443
connect = %s:%d
checkHost = ` + stunnelHost + `
` + stunnelTLS
)

// stunnelPKI is a CA and a certificate for each stunnel: ECDSA P-256, as
// the mesh CA issues, with SPIFFE URIs as the mesh's.
type stunnelPKI struct {
	caPEM          []byte
	server, client [2][]byte // cert, key PEM
}

func newStunnelPKI() (*stunnelPKI, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "bench stunnel CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("making the stunnel CA: %w", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	leaf := func(serial int64, sa string, dns []string, usage x509.ExtKeyUsage) ([2][]byte, error) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return [2][]byte{}, err
		}
		id, _ := url.Parse("spiffe://cluster.local/ns/" + nsPlain + "/sa/" + sa)
		der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
			SerialNumber: big.NewInt(serial),
			Subject:      pkix.Name{CommonName: sa},
			NotBefore:    now.Add(-time.Hour),
			NotAfter:     now.Add(24 * time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{usage},
			URIs:         []*url.URL{id},
			DNSNames:     dns,
		}, ca, &key.PublicKey, caKey)
		if err != nil {
			return [2][]byte{}, fmt.Errorf("making the stunnel certificate for %s: %w", sa, err)
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return [2][]byte{}, err
		}
		return [2][]byte{
			pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
			pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		}, nil
	}
	p := &stunnelPKI{caPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})}
	if p.server, err = leaf(2, "server", []string{stunnelHost}, x509.ExtKeyUsageServerAuth); err != nil {
		return nil, err
	}
	if p.client, err = leaf(3, "client", nil, x509.ExtKeyUsageClientAuth); err != nil {
		return nil, err
	}
	return p, nil
}

// files is the secret of one side: CA, certificate, key, configuration.
func (p *stunnelPKI) files(side, conf string) map[string][]byte {
	pair := p.client
	if side == "server" {
		pair = p.server
	}
	return map[string][]byte{
		"ca.crt":       p.caPEM,
		"tls.crt":      pair[0],
		"tls.key":      pair[1],
		side + ".conf": []byte(conf),
	}
}

// enrolMesh labels the mesh namespace, waits for both pods to be enrolled,
// and checks that traffic between them is HBONE: the server side's ztunnel
// counts an mTLS connection from the mesh namespace.
func (b *bench) enrolMesh(ctx context.Context) error {
	b.progress("enrolling namespace %s", nsMesh)
	if _, err := b.kubectl(ctx, "label", "namespace", nsMesh, labelDataplaneMode+"=ambient"); err != nil {
		return err
	}
	if err := b.waitAnnotated(ctx, nsMesh, 2, time.Minute); err != nil {
		return err
	}
	return waitFor(ctx, time.Minute, time.Second, "HBONE between the mesh pods", func() (bool, string) {
		if _, err := b.exec(ctx, 30*time.Second, nsMesh, "client", "main", filepath.Join(b.cfg.ToolDir, "benchnet"), "conns",
			"-to", fmt.Sprintf("%s:%d", b.meshServer, portEcho), "-c", "1", "-d", "100ms"); err != nil {
			return false, err.Error()
		}
		n, err := b.nodes[1].meshConnections(ctx, `reporter="destination"`, `source_workload_namespace="`+nsMesh+`"`, `connection_security_policy="mutual_tls"`)
		if err != nil {
			return false, err.Error()
		}
		return n > 0, "node-2's ztunnel has counted no mTLS connection from " + nsMesh
	})
}

// waitAnnotated waits until want pods of ns carry the CNI node agent's
// redirection annotation (want 0: until none does).
func (b *bench) waitAnnotated(ctx context.Context, ns string, want int, d time.Duration) error {
	return waitFor(ctx, d, 250*time.Millisecond, fmt.Sprintf("%d pods of %s enrolled", want, ns), func() (bool, string) {
		pods, err := b.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err.Error()
		}
		n := 0
		for _, p := range pods.Items {
			if p.Annotations[annotationRedirection] == "enabled" {
				n++
			}
		}
		return n == want, fmt.Sprintf("%d of %d pods annotated", n, len(pods.Items))
	})
}

// idleRSS measures both ztunnels' RSS with no pod enrolled, then with the
// idle pods enrolled (and served), then releases those pods again.
func (b *bench) idleRSS(ctx context.Context) error {
	if err := b.sampleRSS(ctx, "idle-0"); err != nil {
		return err
	}
	b.progress("enrolling %d idle pods", b.cfg.IdlePods)
	if _, err := b.kubectl(ctx, "label", "namespace", nsIdle, labelDataplaneMode+"=ambient"); err != nil {
		return err
	}
	if err := b.waitAnnotated(ctx, nsIdle, b.cfg.IdlePods, 3*time.Minute); err != nil {
		return err
	}
	if err := b.waitServed(ctx, nsIdle, b.cfg.IdlePods); err != nil {
		return err
	}
	if err := b.sampleRSS(ctx, "idle-enrolled"); err != nil {
		return err
	}
	b.progress("releasing the idle pods")
	if _, err := b.kubectl(ctx, "label", "namespace", nsIdle, labelDataplaneMode+"-"); err != nil {
		return err
	}
	if err := b.waitAnnotated(ctx, nsIdle, 0, 3*time.Minute); err != nil {
		return err
	}
	return b.waitServed(ctx, nsIdle, 0)
}

// waitServed waits until the two ztunnels together serve want pods of ns.
func (b *bench) waitServed(ctx context.Context, ns string, want int) error {
	return waitFor(ctx, 3*time.Minute, 250*time.Millisecond, fmt.Sprintf("ztunnels serving %d pods of %s", want, ns), func() (bool, string) {
		total := 0
		for _, n := range b.nodes {
			c, err := n.served(ctx, ns)
			if err != nil {
				return false, err.Error()
			}
			total += c
		}
		return total == want, fmt.Sprintf("%d served", total)
	})
}

// sampleRSS records each ztunnel's VmRSS Runs times, 200 ms apart.
func (b *bench) sampleRSS(ctx context.Context, label string) error {
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for i := range b.cfg.Runs {
		if i > 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-tick.C:
			}
		}
		for n, z := range b.ztunnels {
			kb, err := z.memKB("VmRSS")
			if err != nil {
				return err
			}
			b.res.record(fmt.Sprintf("footprint.%s.ztunnel-node-%d.rss_mb", label, n+1), "MB", float64(kb)/1024)
		}
	}
	return nil
}
