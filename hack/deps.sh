#!/usr/bin/env bash
# Installs what building and testing Ambit needs on Debian, as root; prints
# what to install anywhere else. Idempotent: installs only what is missing.
set -euo pipefail

# command-or-file:package
needs=(
  ip:iproute2
  nsenter:util-linux
  nft:nftables
  iptables:iptables
  /usr/lib/cni/ptp:containernetworking-plugins
  curl:curl
  tcpdump:tcpdump
  clang:clang
  llc:llvm
  bpftool:bpftool
  /usr/include/bpf/bpf_helpers.h:libbpf-dev
  stunnel4:stunnel4
  protoc:protobuf-compiler
  /usr/include/google/protobuf/wrappers.proto:libprotobuf-dev
)

missing=()
for n in "${needs[@]}"; do
  what=${n%%:*} pkg=${n#*:}
  if [[ $what == /* ]]; then
    [[ -e $what ]] || missing+=("$pkg")
  else
    command -v "$what" >/dev/null 2>&1 || missing+=("$pkg")
  fi
done

if ((${#missing[@]} == 0)); then
  exit 0
fi
if [[ $(id -u) == 0 && -e /etc/debian_version ]] && command -v apt-get >/dev/null; then
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "deps: missing packages: ${missing[*]}" >&2
  echo "deps: install them with: apt-get install ${missing[*]}" >&2
  exit 1
fi
