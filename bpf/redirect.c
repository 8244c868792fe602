//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0-only)
/*
 * sk_lookup program that steers an enrolled pod's TCP connections into
 * ztunnel's listeners inside the pod's own network namespace. See doc.go for
 * the design; this file is the whole datapath.
 *
 * sk_lookup runs when the kernel looks for a listening socket for a new
 * connection (after the established lookup missed), so it sees each SYN once
 * and never touches established traffic. Context byte orders, from
 * include/uapi/linux/bpf.h (struct bpf_sk_lookup): remote_ip4 and local_ip4
 * are network order, local_port is host order, remote_port is network order
 * (unused here).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>

#define AF_INET 2      /* include/linux/socket.h */
#define IPPROTO_TCP 6  /* include/uapi/linux/in.h */
#define HBONE_PORT 15008
/* enum tcx_action_base (linux/bpf.h since 6.6; Debian's headers may be
 * older): go on to the next program, accept, drop. */
#define ZTUNNEL_MARK 0x539 /* ztunnel/inpod.Mark */
#define TCX_NEXT_ -1
#define TCX_PASS_ 0
#define TCX_DROP_ 2
#define MAX_ADDRS 4

/* Keep in sync with Config handling in redirect.go (bpf2go generates
 * redirectConfig from this struct). Addresses are network byte order; 0 marks
 * an unused slot. */
struct config {
	__u32 pod_ip4[MAX_ADDRS];   /* the pod's own addresses */
	__u32 probe_ip4[MAX_ADDRS]; /* where kubelet probes come from */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

/* Slot 0: ztunnel's outbound listener (:15001), slot 1: its inbound plaintext
 * listener (:15006). The value is 64 bits so that a userspace lookup returns
 * the socket's cookie (bpftool map dump shows which socket is in which slot).
 * A socket leaves the map when it is closed, which is what makes the program
 * fail closed when ztunnel is not running. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} listeners SEC(".maps");

#define SLOT_OUTBOUND 0
#define SLOT_INBOUND 1

/* The loopback device is ifindex 1 in every network namespace
 * (LOOPBACK_IFINDEX, include/net/flow.h). It is a constant rather than a
 * literal only so that the tests can rebind it: BPF_PROG_TEST_RUN for
 * sk_lookup rejects a non-zero ingress_ifindex in the input context and runs
 * the program with ingress_ifindex 0. */
volatile const __u32 lo_ifindex = 1;

static __always_inline int contains(const __u32 set[MAX_ADDRS], __u32 addr)
{
#pragma unroll
	for (int i = 0; i < MAX_ADDRS; i++) {
		if (set[i] != 0 && set[i] == addr)
			return 1;
	}
	return 0;
}

static __always_inline int configured(const struct config *cfg)
{
	return (cfg->pod_ip4[0] | cfg->pod_ip4[1] | cfg->pod_ip4[2] | cfg->pod_ip4[3]) != 0;
}

/* Hands the connection to the listener in slot. An empty slot means ztunnel
 * is not listening: drop the SYN so the client retries instead of reaching the
 * destination unproxied. */
static __always_inline int assign(struct bpf_sk_lookup *ctx, __u32 slot)
{
	struct bpf_sock *sk = bpf_map_lookup_elem(&listeners, &slot);
	long err;

	if (!sk)
		return SK_DROP;
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

SEC("sk_lookup")
int steer_to_ztunnel(struct bpf_sk_lookup *ctx)
{
	const __u32 zero = 0;
	const struct config *cfg;
	__u32 dst = ctx->local_ip4;

	if (ctx->family != AF_INET || ctx->protocol != IPPROTO_TCP)
		return SK_PASS;

	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || !configured(cfg))
		return SK_PASS;

	if ((bpf_ntohl(dst) >> 24) == 127)
		return SK_PASS;

	/* Addressed to the pod itself: the pod talking to itself, ztunnel
	 * dialling the app (transparently, from the client's address), or a
	 * connection from outside, which the tc program has already steered.
	 * The kernel reports the pod's interface as ingress_ifindex for the
	 * first two as well, so this program cannot tell them from the
	 * third: inbound is not decided here. */
	if (contains(cfg->pod_ip4, dst))
		return SK_PASS;

	/* Not addressed to the pod: only the pod's own connections, which policy
	 * routing loops back through lo, reach here with a foreign local_ip4. */
	if (ctx->ingress_ifindex == lo_ifindex)
		return assign(ctx, SLOT_OUTBOUND);
	return SK_PASS;
}

/* Inbound: a tc (tcx ingress) program on the pod's interface, so that it
 * only ever sees packets that came from outside the pod. A SYN to the pod
 * on any port but HBONE's, other than a kubelet probe, is assigned to
 * ztunnel's inbound listener; the connection's later packets find the
 * accepted socket by the usual lookup. With no listener in the slot the
 * SYN is dropped (the client retries): fail closed. Packets it leaves
 * alone go on to the next tcx program, if any (TCX_NEXT), so that it does
 * not cut other programs on the pod's interface out. */
SEC("tc")
int inbound_to_ztunnel(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	const __u32 zero = 0, slot = SLOT_INBOUND;
	const struct config *cfg;
	struct ethhdr *eth = data;
	struct bpf_sock *sk;
	struct tcphdr *tcp;
	struct iphdr *ip;
	long err;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TCX_NEXT_;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP || ip->ihl < 5)
		return TCX_NEXT_;
	if (ip->frag_off & bpf_htons(0x1fff)) /* not the first fragment */
		return TCX_NEXT_;
	tcp = (void *)ip + ip->ihl * 4;
	if ((void *)(tcp + 1) > end)
		return TCX_NEXT_;

	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || !configured(cfg) || !contains(cfg->pod_ip4, ip->daddr))
		return TCX_NEXT_;
	/* TCP to the pod carries ztunnel's mark, so that what the kernel
	 * sends back for it leaves like ztunnel's own packets instead of
	 * being captured by the policy routing: the app's replies on
	 * sockets it accepts directly (kubelet probes; tcp_fwmark_accept)
	 * and the resets for connections that ended at enrolment
	 * (fwmark_reflect), without which their peers retransmit for
	 * minutes. */
	skb->mark = ZTUNNEL_MARK;
	if (!tcp->syn || tcp->ack)
		return TCX_NEXT_;
	if (tcp->dest == bpf_htons(HBONE_PORT))
		return TCX_NEXT_;
	/* A kubelet probe reaches the app directly. */
	if (contains(cfg->probe_ip4, ip->saddr))
		return TCX_NEXT_;

	sk = bpf_map_lookup_elem(&listeners, &slot);
	if (!sk)
		return TCX_DROP_;
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	return err ? TCX_DROP_ : TCX_PASS_;
}

char __license[] SEC("license") = "Dual MIT/GPL";
