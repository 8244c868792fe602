package xds

import (
	"net/netip"
	"regexp"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambitmesh/ambit/api/workloadapi"
)

// The enrolment label and its values (Istio's user-facing API).
const (
	LabelDataplaneMode   = "istio.io/dataplane-mode"
	DataplaneModeAmbient = "ambient"
	DataplaneModeNone    = "none"

	// AnnotationRedirection is set to RedirectionEnabled by the CNI node
	// agent once a pod's traffic is redirected to ztunnel (Istio's
	// annotation).
	AnnotationRedirection = "ambient.istio.io/redirection"
	RedirectionEnabled    = "enabled"
)

// Mesh settings used when Inputs leaves them empty.
const (
	DefaultTrustDomain  = "cluster.local"
	DefaultClusterID    = "Kubernetes"
	DefaultDomainSuffix = "cluster.local"
)

// Annotations istiod reads for a Service's subject alt names (the
// identities a client may accept for it besides each endpoint's own).
const (
	annotationKubernetesServiceAccounts = "alpha.istio.io/kubernetes-serviceaccounts"
	annotationCanonicalServiceAccounts  = "alpha.istio.io/canonical-serviceaccounts"
)

// Inputs is everything BuildAddresses reads: the objects of the informer
// caches, as they are, and the mesh settings.
type Inputs struct {
	Namespaces     []*corev1.Namespace
	Pods           []*corev1.Pod
	Services       []*corev1.Service
	EndpointSlices []*discoveryv1.EndpointSlice

	// TrustDomain of workload identities; DefaultTrustDomain if empty.
	TrustDomain string
	// ClusterID goes into workload UIDs and cluster_id; DefaultClusterID
	// ("Kubernetes", istiod's default) if empty.
	ClusterID string
	// Network of every address; Ambit runs one network, "".
	Network string
	// DomainSuffix of service hostnames; DefaultDomainSuffix if empty.
	DomainSuffix string

	// PolicyKeys returns the keys ("namespace/name") of the
	// selector-scoped Authorization resources that apply to pod. Namespace
	// and mesh-wide policies are not listed on workloads; ztunnel finds
	// those by scope. Nil means none.
	PolicyKeys func(pod *corev1.Pod) []string
}

// Enrolled reports whether a pod is in the mesh: the pod label
// istio.io/dataplane-mode decides when it is "ambient" or "none";
// otherwise the namespace's label does, and only "ambient" enrols.
func Enrolled(namespaceLabels, podLabels map[string]string) bool {
	switch podLabels[LabelDataplaneMode] {
	case DataplaneModeAmbient:
		return true
	case DataplaneModeNone:
		return false
	}
	return namespaceLabels[LabelDataplaneMode] == DataplaneModeAmbient
}

// WorkloadUID returns istiod's UID for a pod workload, which is also its
// Address resource name: "<cluster>/<group>/<kind>/<namespace>/<name>" with
// the core group empty, so "Kubernetes//Pod/default/echo-5d8f".
func WorkloadUID(clusterID, namespace, name string) string {
	return clusterID + "//Pod/" + namespace + "/" + name
}

// ServiceHostname returns a Service's cluster hostname.
func ServiceHostname(name, namespace, domainSuffix string) string {
	return name + "." + namespace + ".svc." + domainSuffix
}

// ServiceResourceName returns the Address resource name of a service and
// its key in Workload.services: "<namespace>/<hostname>".
func ServiceResourceName(namespace, hostname string) string {
	return namespace + "/" + hostname
}

// BuildAddresses returns the Address resources for the cluster, keyed by
// resource name: one Service per Kubernetes Service (except ExternalName,
// which has neither a VIP nor endpoints for ztunnel to use), one Workload per
// pod that has an IP.
//
// Pods in the mesh get TunnelProtocol HBONE; the others are sent too, with
// NONE, so that ztunnel can resolve them and pass their traffic through
// (istiod does the same). Pods are left out when:
//   - they have no IP yet (nothing to resolve; a Pending pod with an IP is
//     kept, as istiod does, since init containers can already talk);
//   - they are terminal (Succeeded, Failed): their IP may already belong to
//     another pod;
//   - they use the host network: their IP is the node's, shared with every
//     other host-network pod, so an IP lookup could not tell them apart,
//     and the mesh cannot capture them anyway.
func BuildAddresses(in Inputs) map[string]*workloadapi.Address {
	b := newBuilder(in)
	out := make(map[string]*workloadapi.Address, len(in.Pods)+len(in.Services))
	for _, svc := range in.Services {
		if s := b.service(svc); s != nil {
			out[ServiceResourceName(s.GetNamespace(), s.GetHostname())] = &workloadapi.Address{
				Type: &workloadapi.Address_Service{Service: s},
			}
		}
	}
	for _, pod := range in.Pods {
		if w := b.workload(pod); w != nil {
			out[w.GetUid()] = &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}}
		}
	}
	return out
}

type objKey struct{ namespace, name string }

// sliceRef is an EndpointSlice endpoint that names a pod.
type sliceRef struct {
	slice  *discoveryv1.EndpointSlice
	podUID string
}

type builder struct {
	in           Inputs
	nsLabels     map[string]map[string]string
	servicesByNS map[string][]*corev1.Service
	services     map[objKey]*corev1.Service
	// EndpointSlices by the Service they belong to, and by the pods their
	// endpoints name.
	slicesBySvc map[objKey][]*discoveryv1.EndpointSlice
	slicesByPod map[objKey][]sliceRef
}

func newBuilder(in Inputs) *builder {
	if in.TrustDomain == "" {
		in.TrustDomain = DefaultTrustDomain
	}
	if in.ClusterID == "" {
		in.ClusterID = DefaultClusterID
	}
	if in.DomainSuffix == "" {
		in.DomainSuffix = DefaultDomainSuffix
	}
	b := &builder{
		in:           in,
		nsLabels:     make(map[string]map[string]string, len(in.Namespaces)),
		servicesByNS: make(map[string][]*corev1.Service),
		services:     make(map[objKey]*corev1.Service, len(in.Services)),
		slicesBySvc:  make(map[objKey][]*discoveryv1.EndpointSlice),
		slicesByPod:  make(map[objKey][]sliceRef),
	}
	for _, ns := range in.Namespaces {
		b.nsLabels[ns.Name] = ns.Labels
	}
	for _, svc := range in.Services {
		b.servicesByNS[svc.Namespace] = append(b.servicesByNS[svc.Namespace], svc)
		b.services[objKey{svc.Namespace, svc.Name}] = svc
	}
	for _, es := range in.EndpointSlices {
		svcName := es.Labels[discoveryv1.LabelServiceName]
		if svcName == "" || es.AddressType == discoveryv1.AddressTypeFQDN {
			continue // not a Service's slice, or not addresses we can use
		}
		b.slicesBySvc[objKey{es.Namespace, svcName}] = append(b.slicesBySvc[objKey{es.Namespace, svcName}], es)
		for _, ep := range es.Endpoints {
			ref := ep.TargetRef
			if ref == nil || ref.Kind != "Pod" || (ref.Namespace != "" && ref.Namespace != es.Namespace) {
				continue
			}
			k := objKey{es.Namespace, ref.Name}
			b.slicesByPod[k] = append(b.slicesByPod[k], sliceRef{slice: es, podUID: string(ref.UID)})
		}
	}
	return b
}

func (b *builder) workload(pod *corev1.Pod) *workloadapi.Workload {
	if pod.Spec.HostNetwork || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return nil
	}
	addrs := podIPs(pod)
	if len(addrs) == 0 {
		return nil
	}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default" // what the API server defaults it to
	}
	// Kubernetes has ready, serving and terminating; the workload API has
	// one bit. A terminating pod takes no new connections.
	status := workloadapi.WorkloadStatus_HEALTHY
	if !podReady(pod) || pod.DeletionTimestamp != nil {
		status = workloadapi.WorkloadStatus_UNHEALTHY
	}
	// HBONE only once the node agent has set up the pod's redirection
	// and handed it to ztunnel (it then annotates the pod), as istiod
	// waits for it: a peer sending HBONE earlier would find no listener.
	tunnel := workloadapi.TunnelProtocol_NONE
	if Enrolled(b.nsLabels[pod.Namespace], pod.Labels) && pod.Annotations[AnnotationRedirection] == RedirectionEnabled {
		tunnel = workloadapi.TunnelProtocol_HBONE
	}
	var policies []string
	if b.in.PolicyKeys != nil {
		policies = slices.Clone(b.in.PolicyKeys(pod))
		slices.Sort(policies)
		policies = slices.Compact(policies)
	}
	name := workloadName(pod)
	canonicalName, canonicalRevision := canonicalService(pod.Labels, name)
	return &workloadapi.Workload{
		Uid:                   WorkloadUID(b.in.ClusterID, pod.Namespace, pod.Name),
		Name:                  pod.Name,
		Namespace:             pod.Namespace,
		Addresses:             addrs,
		Network:               b.in.Network,
		TunnelProtocol:        tunnel,
		TrustDomain:           b.in.TrustDomain,
		ServiceAccount:        sa,
		Node:                  pod.Spec.NodeName,
		CanonicalName:         canonicalName,
		CanonicalRevision:     canonicalRevision,
		WorkloadType:          workloadapi.WorkloadType_POD, // istiod sends POD for every pod, for compatibility
		WorkloadName:          name,
		Services:              b.podServices(pod),
		AuthorizationPolicies: policies,
		Status:                status,
		ClusterId:             b.in.ClusterID,
	}
}

// podIPs returns the pod's IPs as bytes, or nil if it has none or one does
// not parse (nothing a ztunnel could match on).
func podIPs(pod *corev1.Pod) [][]byte {
	ips := pod.Status.PodIPs
	if len(ips) == 0 && pod.Status.PodIP != "" {
		ips = []corev1.PodIP{{IP: pod.Status.PodIP}}
	}
	out := make([][]byte, 0, len(ips))
	for _, pip := range ips {
		a, err := netip.ParseAddr(pip.IP)
		if err != nil {
			return nil
		}
		out = append(out, a.Unmap().AsSlice())
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

func podReady(pod *corev1.Pod) bool {
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// podServices returns the services the pod backs, keyed by
// ServiceResourceName, each with its ports as seen by this pod: service
// port to the pod's target port. A Service with a selector backs the pods
// it selects in its namespace; a named target port is looked up in the
// pod's container ports and the port is left out for a pod that does not
// declare it (kube-proxy would not send it there either). A Service without
// a selector backs the pods its EndpointSlices name, on the ports the
// slices give.
func (b *builder) podServices(pod *corev1.Pod) map[string]*workloadapi.PortList {
	out := map[string]*workloadapi.PortList{}
	for _, svc := range b.servicesByNS[pod.Namespace] {
		if svc.Spec.Type == corev1.ServiceTypeExternalName || len(svc.Spec.Selector) == 0 || !selects(svc.Spec.Selector, pod.Labels) {
			continue
		}
		pl := &workloadapi.PortList{}
		for _, sp := range svc.Spec.Ports {
			if !isTCP(sp.Protocol) {
				continue
			}
			if tp, ok := podTargetPort(pod, sp); ok {
				pl.Ports = append(pl.Ports, &workloadapi.Port{ServicePort: uint32(sp.Port), TargetPort: tp})
			}
		}
		out[b.serviceKey(svc)] = pl
	}
	for _, ref := range b.slicesByPod[objKey{pod.Namespace, pod.Name}] {
		if ref.podUID != "" && pod.UID != "" && ref.podUID != string(pod.UID) {
			continue // names an earlier pod of the same name
		}
		svc := b.services[objKey{ref.slice.Namespace, ref.slice.Labels[discoveryv1.LabelServiceName]}]
		if svc == nil || len(svc.Spec.Selector) > 0 || svc.Spec.Type == corev1.ServiceTypeExternalName {
			continue
		}
		key := b.serviceKey(svc)
		pl := out[key]
		if pl == nil {
			pl = &workloadapi.PortList{}
			out[key] = pl
		}
		for _, sp := range svc.Spec.Ports {
			if !isTCP(sp.Protocol) || hasServicePort(pl, sp.Port) {
				continue
			}
			for _, ep := range ref.slice.Ports {
				if ep.Port != nil && ptrOr(ep.Name, "") == sp.Name && isTCP(ptrOr(ep.Protocol, corev1.ProtocolTCP)) {
					pl.Ports = append(pl.Ports, &workloadapi.Port{ServicePort: uint32(sp.Port), TargetPort: uint32(*ep.Port)})
					break
				}
			}
		}
	}
	return out
}

func hasServicePort(pl *workloadapi.PortList, port int32) bool {
	for _, p := range pl.GetPorts() {
		if p.GetServicePort() == uint32(port) {
			return true
		}
	}
	return false
}

// podTargetPort resolves a service port's target port on one pod.
func podTargetPort(pod *corev1.Pod, sp corev1.ServicePort) (uint32, bool) {
	if sp.TargetPort.Type == intstr.String && sp.TargetPort.StrVal != "" {
		for _, c := range pod.Spec.Containers {
			for _, cp := range c.Ports {
				if cp.Name == sp.TargetPort.StrVal && isTCP(cp.Protocol) {
					return uint32(cp.ContainerPort), true
				}
			}
		}
		return 0, false
	}
	return numericTargetPort(sp), true
}

// numericTargetPort is the target port when it is a number; an unset one
// means the service port (the API server fills it in, but objects built in
// tests and by hand may not have it).
func numericTargetPort(sp corev1.ServicePort) uint32 {
	if sp.TargetPort.Type == intstr.Int && sp.TargetPort.IntVal != 0 {
		return uint32(sp.TargetPort.IntVal)
	}
	return uint32(sp.Port)
}

func selects(selector, labels map[string]string) bool {
	for k, v := range selector {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// isTCP reports whether a port carries TCP, the only traffic ztunnel
// proxies; the workload API's Port has no protocol, so a UDP port of the
// same number (DNS) would otherwise shadow the TCP one.
func isTCP(p corev1.Protocol) bool { return p == "" || p == corev1.ProtocolTCP }

func ptrOr[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}

func (b *builder) serviceKey(svc *corev1.Service) string {
	return ServiceResourceName(svc.Namespace, ServiceHostname(svc.Name, svc.Namespace, b.in.DomainSuffix))
}

func (b *builder) service(svc *corev1.Service) *workloadapi.Service {
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return nil
	}
	out := &workloadapi.Service{
		Name:            svc.Name,
		Namespace:       svc.Namespace,
		Hostname:        ServiceHostname(svc.Name, svc.Namespace, b.in.DomainSuffix),
		Addresses:       b.serviceVIPs(svc),
		SubjectAltNames: b.subjectAltNames(svc),
		LoadBalancing:   loadBalancing(svc),
	}
	for _, sp := range svc.Spec.Ports {
		if !isTCP(sp.Protocol) {
			continue
		}
		tp := numericTargetPort(sp)
		if sp.TargetPort.Type == intstr.String && sp.TargetPort.StrVal != "" {
			tp = b.namedTargetPort(svc, sp)
		}
		out.Ports = append(out.Ports, &workloadapi.Port{ServicePort: uint32(sp.Port), TargetPort: tp})
	}
	return out
}

// namedTargetPort resolves a named target port for the Service resource
// from the EndpointSlices, whose ports carry the service port's name and
// the number the endpoints controller resolved. When the endpoints
// disagree (pods of two versions naming different numbers) or there are
// none, it is 0: the workload API's "see each workload's services map",
// which is always exact.
func (b *builder) namedTargetPort(svc *corev1.Service, sp corev1.ServicePort) uint32 {
	var found int32
	for _, es := range b.slicesBySvc[objKey{svc.Namespace, svc.Name}] {
		if len(es.Endpoints) == 0 {
			continue
		}
		for _, ep := range es.Ports {
			if ep.Port == nil || ptrOr(ep.Name, "") != sp.Name || !isTCP(ptrOr(ep.Protocol, corev1.ProtocolTCP)) {
				continue
			}
			if found != 0 && found != *ep.Port {
				return 0
			}
			found = *ep.Port
		}
	}
	return uint32(found)
}

func (b *builder) serviceVIPs(svc *corev1.Service) []*workloadapi.NetworkAddress {
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 && svc.Spec.ClusterIP != "" {
		ips = []string{svc.Spec.ClusterIP}
	}
	var out []*workloadapi.NetworkAddress
	for _, s := range ips {
		if s == corev1.ClusterIPNone {
			continue // headless
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			continue
		}
		out = append(out, &workloadapi.NetworkAddress{Network: b.in.Network, Address: a.Unmap().AsSlice()})
	}
	return out
}

// subjectAltNames reads istiod's service account annotations: the
// Kubernetes form lists service accounts of the Service's namespace, the
// canonical form lists identities as they are.
func (b *builder) subjectAltNames(svc *corev1.Service) []string {
	var out []string
	for _, sa := range splitList(svc.Annotations[annotationKubernetesServiceAccounts]) {
		out = append(out, "spiffe://"+b.in.TrustDomain+"/ns/"+svc.Namespace+"/sa/"+sa)
	}
	out = append(out, splitList(svc.Annotations[annotationCanonicalServiceAccounts])...)
	return out
}

func splitList(s string) []string {
	var out []string
	for part := range strings.SplitSeq(s, ",") {
		if part = strings.TrimSpace(part); part != "" {
			out = append(out, part)
		}
	}
	return out
}

// loadBalancing maps the Service fields kube-proxy honours for endpoint
// choice onto the workload API, as istiod does.
func loadBalancing(svc *corev1.Service) *workloadapi.LoadBalancing {
	if p := svc.Spec.InternalTrafficPolicy; p != nil && *p == corev1.ServiceInternalTrafficPolicyLocal {
		return &workloadapi.LoadBalancing{
			RoutingPreference: []workloadapi.LoadBalancing_Scope{workloadapi.LoadBalancing_NODE},
			Mode:              workloadapi.LoadBalancing_STRICT,
		}
	}
	if td := svc.Spec.TrafficDistribution; td != nil {
		scopes := []workloadapi.LoadBalancing_Scope{
			workloadapi.LoadBalancing_NETWORK,
			workloadapi.LoadBalancing_REGION,
			workloadapi.LoadBalancing_ZONE,
			workloadapi.LoadBalancing_SUBZONE,
		}
		switch *td {
		case corev1.ServiceTrafficDistributionPreferClose, corev1.ServiceTrafficDistributionPreferSameZone:
		case corev1.ServiceTrafficDistributionPreferSameNode:
			scopes = append(scopes, workloadapi.LoadBalancing_NODE)
		default:
			return nil
		}
		return &workloadapi.LoadBalancing{RoutingPreference: scopes, Mode: workloadapi.LoadBalancing_FAILOVER}
	}
	return nil
}

// Labels istiod reads for telemetry names, in order of preference.
var (
	canonicalNameLabels     = []string{"service.istio.io/canonical-name", "app.kubernetes.io/name", "app"}
	canonicalRevisionLabels = []string{"service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"}
)

const labelWorkloadName = "service.istio.io/workload-name"

func canonicalService(labels map[string]string, workloadName string) (name, revision string) {
	name, revision = workloadName, "latest"
	for _, l := range canonicalNameLabels {
		if v, ok := labels[l]; ok {
			name = v
			break
		}
	}
	for _, l := range canonicalRevisionLabels {
		if v, ok := labels[l]; ok {
			revision = v
			break
		}
	}
	return name, revision
}

// cronJobName matches the "-<timestamp>" suffix the CronJob controller puts
// on the Jobs it creates.
var cronJobName = regexp.MustCompile(`^(.+)-\d{8,10}$`)

// workloadName is what istiod reports as the workload a pod belongs to: the
// label override, else the Deployment (a ReplicaSet owner named
// "<deployment>-<pod-template-hash>"), the CronJob (a Job owner named
// "<cronjob>-<timestamp>"), the controller, or the pod itself.
func workloadName(pod *corev1.Pod) string {
	if v, ok := pod.Labels[labelWorkloadName]; ok {
		return v
	}
	if pod.GenerateName == "" {
		return pod.Name
	}
	i := slices.IndexFunc(pod.OwnerReferences, func(r metav1.OwnerReference) bool {
		return r.Controller != nil && *r.Controller
	})
	if i < 0 || pod.OwnerReferences[i].Name == "" {
		return pod.Name
	}
	ref := pod.OwnerReferences[i]
	if hash := pod.Labels["pod-template-hash"]; ref.Kind == "ReplicaSet" && hash != "" && strings.HasSuffix(ref.Name, "-"+hash) {
		return strings.TrimSuffix(ref.Name, "-"+hash)
	}
	if m := cronJobName.FindStringSubmatch(ref.Name); ref.Kind == "Job" && m != nil {
		return m[1]
	}
	return ref.Name
}
