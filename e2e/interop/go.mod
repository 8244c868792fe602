// Interoperability tests between Ambit's HBONE engine and Istio's Go HBONE
// implementation. A module of its own so that Ambit's product module never
// depends on istio.io/istio, and so that Ambit's newer requirements (grpc
// among them) stay out of the lab's echo apps (e2e/apps): against Istio's
// go-control-plane pin they do not compile there.
module github.com/ambitmesh/ambit/e2e/interop

go 1.26.0

require (
	github.com/ambitmesh/ambit v0.0.0-00010101000000-000000000000
	istio.io/istio v0.0.0-20260827124520-eed52ebb66ad
)

replace github.com/ambitmesh/ambit => ../..

// The same pins as e2e/apps, so Istio's code here is the code the lab runs.
replace istio.io/api => istio.io/api v1.31.1

replace github.com/envoyproxy/go-control-plane/envoy => github.com/envoyproxy/go-control-plane/envoy v1.37.0
