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

require (
	github.com/cbeuw/connutil v1.0.1 // indirect
	github.com/go-jose/go-jose/v4 v4.1.4 // indirect
	github.com/go-logr/logr v1.4.4 // indirect
	github.com/golang/protobuf v1.5.4 // indirect
	github.com/inconshreveable/mousetrap v1.1.0 // indirect
	github.com/spf13/cobra v1.10.2 // indirect
	github.com/spf13/pflag v1.0.10 // indirect
	go.uber.org/multierr v1.11.0 // indirect
	go.uber.org/zap v1.28.0 // indirect
	golang.org/x/net v0.62.0 // indirect
	golang.org/x/text v0.43.0 // indirect
	google.golang.org/genproto/googleapis/api v0.0.0-20260817212433-ac3dfec99bb1 // indirect
	google.golang.org/grpc v1.85.0 // indirect
	google.golang.org/protobuf v1.36.12 // indirect
	gopkg.in/natefinch/lumberjack.v2 v2.2.1 // indirect
	istio.io/api v1.31.1 // indirect
	k8s.io/klog/v2 v2.140.0 // indirect
)

replace github.com/ambitmesh/ambit => ../..

// The same pins as e2e/apps, so Istio's code here is the code the lab runs.
replace istio.io/api => istio.io/api v1.31.1

replace github.com/envoyproxy/go-control-plane/envoy => github.com/envoyproxy/go-control-plane/envoy v1.37.0
