#!/usr/bin/env bash
# Generates Go for Istio's workload API (istio.workload.Address and
# istio.security.Authorization, the xDS resource types Ambit's controller
# pushes to ztunnels) and for ZDS (istio.workload.zds, the node agent to
# ztunnel protocol), from the .proto files in the pinned istio.io/istio
# module. Only go_package changes: the proto packages, message names and
# field numbers stay Istio's, so the type URLs and the wire format are the
# same as Istio's and either side can talk to Istio's.
set -euo pipefail
cd "$(dirname "$0")/.."
ISTIO_VERSION=$(grep -oE 'istio.io/istio v[^ ]+' e2e/apps/go.mod | head -1 | cut -d' ' -f2)
dir=$(cd e2e/apps && go mod download -json "istio.io/istio@${ISTIO_VERSION}" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
[[ -d $dir ]] || { echo "workloadapi: istio.io/istio ${ISTIO_VERSION} not found" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/workloadapi/security" "$tmp/zdsapi"
sed 's|^option go_package=.*|option go_package="github.com/ambitmesh/ambit/api/zdsapi";|' \
  "$dir/pkg/zdsapi/zds.proto" > "$tmp/zdsapi/zds.proto"
sed 's|^option go_package=.*|option go_package="github.com/ambitmesh/ambit/api/workloadapi";|' \
  "$dir/pkg/workloadapi/workload.proto" > "$tmp/workloadapi/workload.proto"
sed 's|^option go_package=.*|option go_package="github.com/ambitmesh/ambit/api/workloadapi/security";|' \
  "$dir/pkg/workloadapi/security/authorization.proto" > "$tmp/workloadapi/security/authorization.proto"
plugin=$(mktemp -d)/protoc-gen-go
go build -o "$plugin" google.golang.org/protobuf/cmd/protoc-gen-go
# Into a directory of its own first: a failing protoc leaves the committed
# files alone.
mkdir -p "$tmp/out"
protoc -I "$tmp" -I /usr/include --plugin=protoc-gen-go="$plugin" \
  --go_out="$tmp/out" --go_opt=module=github.com/ambitmesh/ambit \
  workloadapi/workload.proto workloadapi/security/authorization.proto zdsapi/zds.proto
rm -f api/workloadapi/*.pb.go api/workloadapi/security/*.pb.go api/zdsapi/*.pb.go
cp -r "$tmp/out/api/." api/
cp "$tmp/zdsapi/zds.proto" api/zdsapi/zds.proto
cp "$tmp/workloadapi/workload.proto" api/workloadapi/workload.proto
cp "$tmp/workloadapi/security/authorization.proto" api/workloadapi/security/authorization.proto
rm -rf "$(dirname "$plugin")"
