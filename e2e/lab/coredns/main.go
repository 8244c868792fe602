// Command coredns is CoreDNS v1.15.0 with only the plugins the lab's cluster
// DNS uses: kubernetes, cache, errors, log, health, ready, reload,
// loadbalance, loop and metrics (whose directive is "prometheus").
//
// The upstream main imports core/plugin, which pulls in every plugin (cloud
// SDKs included). This one imports the few it needs and cuts
// dnsserver.Directives, the list that fixes plugin execution order, down to
// those, keeping upstream's order (plugin.cfg, see core/dnsserver/zdirectives.go).
package main

import (
	"fmt"
	"os"
	"slices"

	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

// directives are the Corefile directives this build supports; the order
// comes from upstream's dnsserver.Directives.
var directives = []string{
	"kubernetes", "cache", "errors", "log", "health", "ready",
	"reload", "loadbalance", "loop", "prometheus",
}

func main() {
	var ordered []string
	for _, d := range dnsserver.Directives {
		if slices.Contains(directives, d) {
			ordered = append(ordered, d)
		}
	}
	if len(ordered) != len(directives) {
		fmt.Fprintf(os.Stderr, "coredns: upstream directive list %v lacks some of %v\n", dnsserver.Directives, directives)
		os.Exit(1)
	}
	if err := dnsserver.SetDirectives(ordered); err != nil {
		fmt.Fprintf(os.Stderr, "coredns: %v\n", err)
		os.Exit(1)
	}
	coremain.Run()
}
