// Package e2e holds Ambit's end-to-end tests. They run against the lab
// (package lab): a real Kubernetes control plane and network-namespace nodes
// on this machine. They need root and skip without it.
package e2e
