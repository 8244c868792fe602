// Package cni will be Ambit's chained CNI plugin and node agent, which set up
// in-pod redirection of enrolled pods' traffic to ztunnel.
//
// Nothing is implemented yet; see the capture issue.
package cni
