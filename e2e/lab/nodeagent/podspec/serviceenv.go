package podspec

import (
	"cmp"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// masterService is the one Service whose variables every pod gets, whatever
// its namespace and enableServiceLinks say: in-cluster clients find the API
// server through KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT.
const masterService = "kubernetes"

// ServiceEnv returns the service link variables kubelet gives a pod in
// namespace ns (kubelet's getServiceEnvVarMap and envvars.FromServices):
//
//   - the kubernetes Service of the default namespace, always;
//   - every Service of ns, when enableServiceLinks is true. A Service named
//     kubernetes in ns replaces the default one, as in kubelet;
//   - nothing for Services without a cluster IP (headless, ExternalName).
//
// For a Service "my-svc" with cluster IP 10.0.0.11 and a first port
// {name: http, port: 80, protocol: TCP} that is:
//
//	MY_SVC_SERVICE_HOST=10.0.0.11
//	MY_SVC_SERVICE_PORT=80
//	MY_SVC_SERVICE_PORT_HTTP=80
//	MY_SVC_PORT=tcp://10.0.0.11:80
//	MY_SVC_PORT_80_TCP=tcp://10.0.0.11:80
//	MY_SVC_PORT_80_TCP_PROTO=tcp
//	MY_SVC_PORT_80_TCP_PORT=80
//	MY_SVC_PORT_80_TCP_ADDR=10.0.0.11
//
// The result is ordered by Service name, then in kubelet's order, so that
// it is stable; kubelet itself returns a map.
func ServiceEnv(ns string, enableServiceLinks bool, services []*corev1.Service) []corev1.EnvVar {
	byName := make(map[string]*corev1.Service)
	for _, svc := range services {
		if !serviceIPSet(svc) {
			continue
		}
		switch {
		case svc.Namespace == metav1.NamespaceDefault && svc.Name == masterService:
			if _, ok := byName[svc.Name]; !ok {
				byName[svc.Name] = svc
			}
		case svc.Namespace == ns && enableServiceLinks:
			byName[svc.Name] = svc
		}
	}
	picked := make([]*corev1.Service, 0, len(byName))
	for _, svc := range byName {
		picked = append(picked, svc)
	}
	slices.SortFunc(picked, func(a, b *corev1.Service) int { return cmp.Compare(a.Name, b.Name) })

	var env []corev1.EnvVar
	for _, svc := range picked {
		env = append(env, serviceVars(svc)...)
	}
	return env
}

// serviceIPSet is v1helper.IsServiceIPSet: a Service has variables only when
// it has a cluster IP. Validation guarantees ports on such a Service; the
// length check keeps a hand-built object from panicking.
func serviceIPSet(svc *corev1.Service) bool {
	ip := svc.Spec.ClusterIP
	return ip != "" && ip != corev1.ClusterIPNone && len(svc.Spec.Ports) > 0
}

func serviceVars(svc *corev1.Service) []corev1.EnvVar {
	prefix := envName(svc.Name)
	ip := svc.Spec.ClusterIP
	first := svc.Spec.Ports[0]
	env := []corev1.EnvVar{
		{Name: prefix + "_SERVICE_HOST", Value: ip},
		{Name: prefix + "_SERVICE_PORT", Value: strconv.Itoa(int(first.Port))},
	}
	// Only the first port may be unnamed (validation); every named port gets
	// a variable of its own.
	for _, p := range svc.Spec.Ports {
		if p.Name != "" {
			env = append(env, corev1.EnvVar{
				Name:  prefix + "_SERVICE_PORT_" + envName(p.Name),
				Value: strconv.Itoa(int(p.Port)),
			})
		}
	}
	// Docker link variables.
	for i, p := range svc.Spec.Ports {
		proto := string(corev1.ProtocolTCP)
		if p.Protocol != "" {
			proto = string(p.Protocol)
		}
		lower := strings.ToLower(proto)
		url := lower + "://" + net.JoinHostPort(ip, strconv.Itoa(int(p.Port)))
		if i == 0 {
			env = append(env, corev1.EnvVar{Name: prefix + "_PORT", Value: url})
		}
		pp := fmt.Sprintf("%s_PORT_%d_%s", prefix, p.Port, strings.ToUpper(proto))
		env = append(env,
			corev1.EnvVar{Name: pp, Value: url},
			corev1.EnvVar{Name: pp + "_PROTO", Value: lower},
			corev1.EnvVar{Name: pp + "_PORT", Value: strconv.Itoa(int(p.Port))},
			corev1.EnvVar{Name: pp + "_ADDR", Value: ip},
		)
	}
	return env
}

// envName is kubelet's makeEnvVariableName: upper case, '-' to '_'.
func envName(s string) string {
	return strings.ToUpper(strings.ReplaceAll(s, "-", "_"))
}
