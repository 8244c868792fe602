// Package waypoint will be Ambit's L7 proxy: HTTPRoute matching and weighted
// backends, L7 AuthorizationPolicy and L7 metrics for traffic sent to it over
// HBONE.
//
// Nothing is implemented yet.
package waypoint
