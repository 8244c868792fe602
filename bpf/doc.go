// Package bpf will hold the eBPF programs (C, compiled with bpf2go) that
// redirect an enrolled pod's traffic to ztunnel inside the pod's network
// namespace. It is the only package that imports cilium/ebpf.
//
// Nothing is implemented yet; see the capture issue.
package bpf
