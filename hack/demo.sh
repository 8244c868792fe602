#!/usr/bin/env bash
# Installs Ambit into a running lab the way a user installs it on a real
# cluster (kubectl apply of deploy/), waits for it, and says what to try.
set -euo pipefail
bin=$1 kubeconfig=$2
lab=$(basename "$(dirname "$kubeconfig")")
kubectl() { "$bin/kube-v1.36.0/kubectl" --kubeconfig "$kubeconfig" "$@"; }
t=$(date +%s)
kubectl apply --server-side -f deploy/crds/istio/security.yaml >/dev/null
kubectl apply --server-side -f deploy/ambit.yaml >/dev/null
kubectl -n istio-system rollout status deploy/ambit-controller --timeout=120s >/dev/null
kubectl -n istio-system rollout status ds/ztunnel --timeout=120s >/dev/null
echo "demo: Ambit installed (controller and ztunnel ready) in $(( $(date +%s) - t ))s"
kubectl get nodes
kubectl get pods -A -o wide
cat <<MSG

Ambit's controller (mesh CA + xDS) and a ztunnel per node are running.
Label a namespace to enrol it:   kubectl label namespace default istio.io/dataplane-mode=ambient
Apply Istio AuthorizationPolicy / PeerAuthentication YAML as is.
See node-1 tunnel's live config: nsenter --net=/run/netns/${lab}-node1 curl -s 127.0.0.1:15000/config_dump


Not yet: the capture of pod traffic into ztunnel (the CNI plugin and node agent)
is the next issue; until then enrolled pods get identities, certificates and
config, and 'make test' steers test pods' traffic into ztunnel itself.
MSG
