// Command ambit-cni is Ambit's chained CNI plugin (package
// github.com/ambitmesh/ambit/cni/plugin). A container runtime runs it from
// the node's CNI bin dir after the primary plugin; the Ambit node agent
// installs it there (package cni/install). Build it as bin/ambit-cni:
//
//	go build -o bin/ambit-cni ./cmd/cni
package main

import (
	"github.com/containernetworking/cni/pkg/skel"

	"github.com/ambitmesh/ambit/cni/plugin"
)

func main() {
	var p plugin.Plugin
	skel.PluginMainFuncs(p.Funcs(), plugin.VersionInfo(), plugin.About)
}
