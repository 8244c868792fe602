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
kubectl apply --server-side -f deploy/cni.yaml >/dev/null
kubectl -n istio-system rollout status deploy/ambit-controller --timeout=120s >/dev/null
kubectl -n istio-system rollout status ds/ztunnel --timeout=120s >/dev/null
kubectl -n istio-system rollout status ds/ambit-cni-node --timeout=120s >/dev/null
echo "demo: Ambit installed (controller, ztunnel and CNI node agent ready) in $(( $(date +%s) - t ))s"
kubectl get nodes
kubectl get pods -A -o wide
cat <<MSG

Ambit is running: the controller (mesh CA + xDS), and on every node a
ztunnel and the CNI node agent. Try it:

  export KUBECONFIG=$kubeconfig PATH=$bin/kube-v1.36.0:\$PATH
  kubectl create deployment echo --image=gcr.io/istio-testing/app
  kubectl expose deployment echo --port=80 --target-port=8080
  kubectl run client --image=curlimages/curl --command -- sleep infinity
  kubectl wait --for=condition=Available deploy/echo; kubectl wait --for=condition=Ready pod/client
  # plaintext (retried: kube-proxy takes a moment to program a new Service)
  kubectl exec client -- curl -s --retry 10 --retry-connrefused --retry-delay 1 http://echo/
  kubectl label namespace default istio.io/dataplane-mode=ambient
  kubectl exec client -- curl -s http://echo/             # now over HBONE (mTLS), no restart
  nsenter --net=/run/netns/${lab}-node1 curl -s 127.0.0.1:15020/metrics | grep istio_tcp
  nsenter --net=/run/netns/${lab}-node1 curl -s 127.0.0.1:15000/config_dump
  ls /run/ambit-lab/${lab}/nodes/node-*/root/sys/fs/bpf/ambit/   # eBPF capture: one pin dir per enrolled pod
  bpftool link show                                     # their sk_lookup and tcx links

Then apply Istio AuthorizationPolicy / PeerAuthentication YAML as is.
MSG
