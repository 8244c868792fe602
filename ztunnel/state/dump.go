package state

import (
	"net/netip"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// Dump is the configuration in the form ztunnel's admin config dump serves
// (encoding/json). Entries are sorted by resource name, so two dumps of the
// same configuration are byte-identical.
type Dump struct {
	Workloads      []DumpEntry `json:"workloads"`
	Services       []DumpEntry `json:"services"`
	Authorizations []DumpEntry `json:"authorizations"`
}

// DumpEntry is one resource: its xDS name, its IPs in text form (protojson
// shows them as base64, which no operator can read), and the resource itself
// in protojson.
type DumpEntry struct {
	Name      string    `json:"name"`
	Addresses []string  `json:"addresses,omitempty"`
	Resource  ProtoJSON `json:"resource"`
}

// ProtoJSON makes encoding/json render a message with protojson (the
// canonical JSON mapping: enums by name, lowerCamelCase field names).
type ProtoJSON struct{ proto.Message }

// MarshalJSON implements json.Marshaler.
func (p ProtoJSON) MarshalJSON() ([]byte, error) {
	if p.Message == nil {
		return []byte("null"), nil
	}
	return protojson.Marshal(p.Message)
}

// Dump returns v's resources for the admin config dump.
func (v *View) Dump() Dump {
	d := Dump{Workloads: []DumpEntry{}, Services: []DumpEntry{}, Authorizations: []DumpEntry{}}
	for _, name := range v.AddressNames() {
		a := v.addresses[name]
		if w := a.GetWorkload(); w != nil {
			var ips []string
			for _, b := range w.GetAddresses() {
				ips = append(ips, ipString(b))
			}
			d.Workloads = append(d.Workloads, DumpEntry{Name: name, Addresses: ips, Resource: ProtoJSON{w}})
		} else if s := a.GetService(); s != nil {
			var ips []string
			for _, na := range s.GetAddresses() {
				ips = append(ips, ipString(na.GetAddress()))
			}
			d.Services = append(d.Services, DumpEntry{Name: name, Addresses: ips, Resource: ProtoJSON{s}})
		}
	}
	for _, name := range v.AuthorizationNames() {
		d.Authorizations = append(d.Authorizations, DumpEntry{Name: name, Resource: ProtoJSON{v.authorizations[name]}})
	}
	return d
}

func ipString(b []byte) string {
	ip, ok := netip.AddrFromSlice(b)
	if !ok {
		return "invalid"
	}
	return ip.String()
}
