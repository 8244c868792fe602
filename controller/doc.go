// Package controller will be Ambit's control plane: the mesh CA issuing
// SPIFFE certificates, xDS push of workloads, services and policies to
// ztunnels and waypoints, and waypoint deployment for Gateways of class
// ambit-waypoint.
//
// Nothing is implemented yet; see the node tunnel issue.
package controller
