//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0-only)
/*
 * A TCP socket iterator that puts a mark on every connection of the network
 * namespace it runs in. The node agent runs it in a pod's namespace just
 * before the capture routing goes in, with ztunnel's mark, which that
 * routing sends to the main table: connections the pod had before it was
 * enrolled keep going as they were, and only new ones are captured, as
 * Istio's capture does. See ConnectionKeeper in keep_linux.go.
 *
 * Only established connections (and closing ones) are marked. Listening
 * sockets are left alone (their accepted sockets would inherit the mark and
 * escape capture), and so are sockets not connected yet (TCP_CLOSE:
 * connected later, they would escape it too), connections still in their
 * handshake (a SYN retransmitted after the routing is in is captured, and
 * the connection goes through ztunnel; one answered just then is reset,
 * never sent in plaintext) and sockets that carry a mark already (the
 * app's own, or ztunnel's).
 *
 * A second run, after the routing is in (stragglers set), marks only the
 * connections the routing does not loop through lo: those opened between
 * the first run and the routing, whose SYN left uncaptured and whose next
 * packets would be captured and cut. Connections opened since are routed
 * through lo (to ztunnel) and stay captured; one whose route is not known
 * (no cached route) is left captured too.
 *
 * The kernel types are declared with the fields read only; CO-RE relocates
 * the offsets against the running kernel's BTF when the program loads.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define SOL_SOCKET 1 /* include/uapi/asm-generic/socket.h */
#define SO_MARK 36
#define AF_INET 2
#define AF_INET6 10

/* enum bpf_tcp_states in linux/bpf.h mirrors the kernel's TCP states. */

struct sock_common {
	unsigned short skc_family;
	volatile unsigned char skc_state;
} __attribute__((preserve_access_index));

struct net_device {
	int ifindex;
} __attribute__((preserve_access_index));

struct dst_entry {
	struct net_device *dev;
} __attribute__((preserve_access_index));

struct sock {
	__u32 sk_mark;
	struct dst_entry *sk_dst_cache;
} __attribute__((preserve_access_index));

struct bpf_iter_meta;
struct tcp_sock;

struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
} __attribute__((preserve_access_index));

#define LOOPBACK_IFINDEX 1 /* include/net/flow.h */

volatile const __u32 mark = 0;
/* Set for the run after the routing is in. */
__u32 stragglers = 0;
/* How many sockets the last run marked. */
__u32 marked = 0;

SEC("iter/tcp")
int mark_connections(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct tcp_sock *tp;
	struct sock *sk;
	__u32 m = mark;

	if (!skc)
		return 0;
	if (skc->skc_family != AF_INET && skc->skc_family != AF_INET6)
		return 0;
	switch (skc->skc_state) {
	case BPF_TCP_LISTEN:
	case BPF_TCP_CLOSE:
	case BPF_TCP_SYN_SENT:
	case BPF_TCP_SYN_RECV:
	case BPF_TCP_TIME_WAIT:    /* not a full socket */
	case BPF_TCP_NEW_SYN_RECV: /* a request, not a socket yet */
		return 0;
	}
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	sk = (struct sock *)tp;
	if (sk->sk_mark != 0)
		return 0;
	if (stragglers) {
		struct dst_entry *dst = sk->sk_dst_cache;
		struct net_device *dev;

		if (!dst)
			return 0;
		dev = dst->dev;
		if (!dev || dev->ifindex == LOOPBACK_IFINDEX)
			return 0;
	}
	if (bpf_setsockopt(tp, SOL_SOCKET, SO_MARK, &m, sizeof(m)) == 0)
		__sync_fetch_and_add(&marked, 1);
	return 0;
}

char __license[] SEC("license") = "Dual MIT/GPL";
