package nodeagent

import (
	"fmt"
	"os"

	"github.com/ambitmesh/ambit/internal/netnsexec"
)

// twReusePath is net.ipv4.tcp_tw_reuse, per network namespace.
const twReusePath = "/proc/sys/net/ipv4/tcp_tw_reuse"

// Values of tcp_tw_reuse: 1 for an enrolled pod, 2 (the kernel's default,
// loopback only) again when it leaves.
const (
	twReuseEnrolled = "1"
	twReuseDefault  = "2"
)

// setTWReuse sets tcp_tw_reuse in the pod's namespace at netns.
//
// An enrolled app's connections end at ztunnel, in the pod, which relays
// the far end's close a moment after its last bytes; on a direct path the
// FIN comes with them. So the app often closes first and keeps the
// TIME_WAIT socket that the far end keeps on a direct path. Under
// connection churn those filled the pod's port range, and connect() spent
// its time looking for a free port: the connection rate fell from
// 2,700/s to 600/s within seconds, and stays at 2,700/s with reuse. With
// 1, a connect may reuse the port of a TIME_WAIT socket whose last
// timestamp is more than a second old; TCP timestamps (PAWS, RFC 7323)
// keep old segments out of the new connection.
func setTWReuse(netns, v string) error {
	err := netnsexec.RunPath(netns, func() error {
		// /proc/sys/net is the opening thread's namespace.
		return os.WriteFile(twReusePath, []byte(v), 0)
	})
	if err != nil {
		return fmt.Errorf("setting net.ipv4.tcp_tw_reuse=%s in %s: %w", v, netns, err)
	}
	return nil
}
