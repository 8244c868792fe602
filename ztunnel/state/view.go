package state

import (
	"cmp"
	"net/netip"
	"slices"

	"github.com/ambitmesh/ambit/api/workloadapi"
	"github.com/ambitmesh/ambit/api/workloadapi/security"
)

// View is one immutable version of the configuration with its indexes.
// Lookups take no lock and do not allocate. The messages a View returns are
// shared: callers must not modify them.
type View struct {
	// The resources as received, by xDS resource name.
	addresses      map[string]*workloadapi.Address
	authorizations map[string]*security.Authorization

	workloadsByUID map[string]*workloadapi.Workload
	workloadsByIP  map[netip.Addr]*workloadapi.Workload
	servicesByKey  map[string]*workloadapi.Service
	servicesByIP   map[netip.Addr]*workloadapi.Service
	// Healthy workloads per service, keyed both by "namespace/hostname"
	// (which is what Workload.services uses, and which may name a service
	// the store has not received) and by the service message of this View
	// (so that Endpoints on a service from this View needs no key).
	endpointsByKey map[string][]*workloadapi.Workload
	endpointsBySvc map[*workloadapi.Service][]*workloadapi.Workload

	globalAuthz    []*security.Authorization
	namespaceAuthz map[string][]*security.Authorization
}

func newView(addresses map[string]*workloadapi.Address, authz map[string]*security.Authorization) *View {
	v := &View{addresses: addresses, authorizations: authz}
	v.indexAddresses()
	v.indexAuthorizations()
	return v
}

// withAuthorizations returns a View with v's addresses and indexes and the
// given policies: a policy change does not re-index workloads.
func (v *View) withAuthorizations(authz map[string]*security.Authorization) *View {
	nv := *v
	nv.authorizations = authz
	nv.indexAuthorizations()
	return &nv
}

func (v *View) indexAddresses() {
	v.workloadsByUID = make(map[string]*workloadapi.Workload)
	v.workloadsByIP = make(map[netip.Addr]*workloadapi.Workload)
	v.servicesByKey = make(map[string]*workloadapi.Service)
	v.servicesByIP = make(map[netip.Addr]*workloadapi.Service)
	v.endpointsByKey = make(map[string][]*workloadapi.Workload)
	for name, a := range v.addresses {
		switch t := a.GetType().(type) {
		case *workloadapi.Address_Workload:
			v.indexWorkload(name, t.Workload)
		case *workloadapi.Address_Service:
			v.indexService(t.Service)
		}
	}
	for _, eps := range v.endpointsByKey {
		slices.SortFunc(eps, func(a, b *workloadapi.Workload) int { return cmp.Compare(a.GetUid(), b.GetUid()) })
	}
	v.endpointsBySvc = make(map[*workloadapi.Service][]*workloadapi.Workload, len(v.servicesByKey))
	for key, svc := range v.servicesByKey {
		v.endpointsBySvc[svc] = v.endpointsByKey[key]
	}
}

func (v *View) indexWorkload(name string, w *workloadapi.Workload) {
	uid := w.GetUid()
	if uid == "" {
		uid = name
	}
	v.workloadsByUID[uid] = w
	if w.GetStatus() == workloadapi.WorkloadStatus_HEALTHY {
		for key := range w.GetServices() {
			v.endpointsByKey[key] = append(v.endpointsByKey[key], w)
		}
	}
	// A host-network workload shares its IP with the node and every other
	// host-network pod on it; the workload API says not to resolve those
	// by IP (NetworkMode HOST_NETWORK).
	if w.GetNetworkMode() == workloadapi.NetworkMode_HOST_NETWORK {
		return
	}
	for _, b := range w.GetAddresses() {
		ip, ok := netip.AddrFromSlice(b)
		if !ok {
			continue
		}
		ip = normalize(ip)
		if old := v.workloadsByIP[ip]; old == nil || preferWorkload(w, old) {
			v.workloadsByIP[ip] = w
		}
	}
}

// preferWorkload decides which of two workloads claiming one IP wins (a
// pod that is going away and its replacement can briefly share an IP): the
// healthy one, then the smaller UID, so that the choice does not depend on
// map order.
func preferWorkload(a, b *workloadapi.Workload) bool {
	ah := a.GetStatus() == workloadapi.WorkloadStatus_HEALTHY
	bh := b.GetStatus() == workloadapi.WorkloadStatus_HEALTHY
	if ah != bh {
		return ah
	}
	return a.GetUid() < b.GetUid()
}

func (v *View) indexService(svc *workloadapi.Service) {
	key := ServiceKey(svc)
	v.servicesByKey[key] = svc
	for _, na := range svc.GetAddresses() {
		ip, ok := netip.AddrFromSlice(na.GetAddress())
		if !ok {
			continue
		}
		// A prefix is not a VIP one can connect to.
		if na.Length != nil && int(na.GetLength()) != ip.BitLen() {
			continue
		}
		ip = normalize(ip)
		if old := v.servicesByIP[ip]; old == nil || key < ServiceKey(old) {
			v.servicesByIP[ip] = svc
		}
	}
}

func (v *View) indexAuthorizations() {
	v.globalAuthz = nil
	v.namespaceAuthz = make(map[string][]*security.Authorization)
	keys := make([]string, 0, len(v.authorizations))
	for k := range v.authorizations {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		p := v.authorizations[k]
		switch p.GetScope() {
		case security.Scope_GLOBAL:
			v.globalAuthz = append(v.globalAuthz, p)
		case security.Scope_NAMESPACE:
			v.namespaceAuthz[p.GetNamespace()] = append(v.namespaceAuthz[p.GetNamespace()], p)
		}
	}
}

// ServiceKey returns the key Istio's workload API uses for a service, both
// as its xDS resource name and in Workload.services: "namespace/hostname".
func ServiceKey(svc *workloadapi.Service) string {
	return svc.GetNamespace() + "/" + svc.GetHostname()
}

// normalize makes the forms an IP can arrive in compare equal: an
// IPv4-mapped IPv6 address (what a dual-stack socket reports) is its IPv4
// address, and zones are dropped. It does not allocate.
func normalize(ip netip.Addr) netip.Addr {
	return ip.Unmap().WithZone("")
}

// WorkloadByIP returns the workload that owns ip, or nil if no workload
// does (a node IP, an address outside the cluster, a host-network pod). When
// two workloads claim one IP the healthy one wins.
func (v *View) WorkloadByIP(ip netip.Addr) *workloadapi.Workload {
	return v.workloadsByIP[normalize(ip)]
}

// WorkloadByUID returns the workload with that UID
// ("Kubernetes//Pod/<namespace>/<name>" for a pod), or nil.
func (v *View) WorkloadByUID(uid string) *workloadapi.Workload {
	return v.workloadsByUID[uid]
}

// ServiceByVIP returns the service whose virtual IP is dst's address and
// which serves dst's port, or nil. Traffic to a VIP on a port the service
// does not declare is not the service's (kube-proxy drops it);
// ServiceByAddr answers whether the address alone is a VIP.
func (v *View) ServiceByVIP(dst netip.AddrPort) *workloadapi.Service {
	svc := v.servicesByIP[normalize(dst.Addr())]
	if svc == nil {
		return nil
	}
	port := uint32(dst.Port())
	for _, p := range svc.GetPorts() {
		if p.GetServicePort() == port {
			return svc
		}
	}
	return nil
}

// ServiceByAddr returns the service with virtual IP ip, whatever the port,
// or nil.
func (v *View) ServiceByAddr(ip netip.Addr) *workloadapi.Service {
	return v.servicesByIP[normalize(ip)]
}

// ServiceByKey returns the service with key "namespace/hostname" (see
// ServiceKey), or nil. Waypoint addresses name services this way.
func (v *View) ServiceByKey(key string) *workloadapi.Service {
	return v.servicesByKey[key]
}

// Endpoints returns the healthy workloads whose services map lists svc,
// sorted by UID. The caller picks the target port from the workload's own
// PortList (Workload.services[ServiceKey(svc)]), since a named target port
// can resolve differently per pod. It does not allocate when svc came from
// this View; a service from an older View is looked up by key.
func (v *View) Endpoints(svc *workloadapi.Service) []*workloadapi.Workload {
	if eps, ok := v.endpointsBySvc[svc]; ok {
		return eps
	}
	if svc == nil {
		return nil
	}
	return v.endpointsByKey[ServiceKey(svc)]
}

// Authorizations returns every policy, by resource name. The map is shared
// and must not be modified.
func (v *View) Authorizations() map[string]*security.Authorization {
	return v.authorizations
}

// Authorization returns the policy with resource name key
// ("namespace/name", as in Workload.authorization_policies), or nil.
func (v *View) Authorization(key string) *security.Authorization {
	return v.authorizations[key]
}

// GlobalAuthorizations returns the policies of scope GLOBAL (the root
// namespace's policies without a selector: they apply to every workload),
// sorted by key. Selector-scoped policies reach a workload through its
// authorization_policies keys instead.
func (v *View) GlobalAuthorizations() []*security.Authorization {
	return v.globalAuthz
}

// NamespaceAuthorizations returns the policies of scope NAMESPACE for ns,
// sorted by key.
func (v *View) NamespaceAuthorizations(ns string) []*security.Authorization {
	return v.namespaceAuthz[ns]
}

// AddressNames returns the resource names of every Address, sorted. The xDS
// client sends them on reconnect so the server can tell it which ones are
// gone.
func (v *View) AddressNames() []string {
	return sortedKeys(v.addresses)
}

// AuthorizationNames returns the resource names of every policy, sorted.
func (v *View) AuthorizationNames() []string {
	return sortedKeys(v.authorizations)
}

// Counts returns the number of workloads, services and policies.
func (v *View) Counts() (workloads, services, authorizations int) {
	return len(v.workloadsByUID), len(v.servicesByKey), len(v.authorizations)
}

func sortedKeys[T any](m map[string]T) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
