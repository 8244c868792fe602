//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0-only)
/*
 * The local-hop shortcut: bytes between an enrolled pod's app and ztunnel
 * (both ends are sockets in the pod's network namespace) skip the kernel's
 * TCP path over lo. A sockops program puts both sockets of such a
 * connection into a SOCKHASH when they are established; an sk_msg program
 * on that SOCKHASH then moves what one end sends straight into the other
 * end's receive queue (bpf_msg_redirect_hash with BPF_F_INGRESS). The TCP
 * connections stay: handshakes, FIN and RST go the usual way, and a socket
 * whose peer is not in the SOCKHASH sends over TCP as before. See doc.go.
 *
 * Node-wide: the sockops program is attached to the node's root cgroup and
 * acts only on sockets in the network namespaces listed in `enrolled`
 * (keyed by netns cookie), which the node agent fills at enrolment.
 *
 * Context byte orders (include/uapi/linux/bpf.h, and the context rewrites in
 * net/core/filter.c): local_ip4 and remote_ip4 are network order;
 * local_port is host order; remote_port holds the network-order port in
 * its upper 16 bits on little-endian machines, so bpf_ntohl() of it is the
 * host-order port, in bpf_sock_ops and sk_msg_md alike.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2          /* include/linux/socket.h */
#define ZTUNNEL_MARK 0x539 /* ztunnel/inpod.Mark */
#define MAX_ADDRS 4

/* A pod enrolled in eBPF capture: its IPv4 addresses, network order, 0 for
 * an unused slot. */
struct pod {
	__u32 ip4[MAX_ADDRS];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64); /* netns cookie */
	__type(value, struct pod);
} enrolled SEC(".maps");

/* One end of a local connection, as that end sees it. */
struct end {
	__u64 netns;      /* netns cookie */
	__u32 local_ip4;  /* network order */
	__u32 remote_ip4; /* network order */
	__u32 local_port; /* host order */
	__u32 remote_port;/* host order */
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct end);
	__type(value, __u64);
} ends SEC(".maps");

/* Active ends paired and waiting for their passive end (a SOCKHASH lookup
 * would return a socket, which sockops programs cannot release). LRU: an
 * active end whose passive end never comes (its connection cut before the
 * ACK arrived) ages out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct end);
	__type(value, __u8);
} waiting SEC(".maps");

/* Per socket, what its first send found: once a socket has sent over TCP it
 * never switches to the shortcut, and the other way round, so that its
 * peer reads its bytes in order (a socket with bytes in both its TCP
 * receive queue and its sk_msg queue reads the latter first). */
#define UNDECIDED 0
#define SHORTCUT 1
#define TCP 2
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u32);
} route SEC(".maps");

/* Counters for the agent's metrics: sends that took the shortcut, sends
 * that went over TCP, ends put into the SOCKHASH. */
#define STAT_SHORTCUT 0
#define STAT_TCP 1
#define STAT_PAIRED 2
#define NSTATS 3
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NSTATS);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&stats, &stat);

	if (n)
		*n += 1;
}

static __always_inline int is_pod_ip(const struct pod *pod, __u32 addr)
{
#pragma unroll
	for (int i = 0; i < MAX_ADDRS; i++) {
		if (pod->ip4[i] != 0 && pod->ip4[i] == addr)
			return 1;
	}
	return 0;
}

/*
 * Which established sockets of an enrolled pod go into the SOCKHASH:
 *
 * - Active (connect) without ztunnel's mark: the app's own connections,
 *   which the sk_lookup program hands to ztunnel's :15001 in the same
 *   namespace (or the pod talking to itself), and ztunnel delivering an
 *   inbound connection to the app (its inbound mark, 0x111).
 * - Active with ztunnel's mark, to the pod's own address (ztunnel's HBONE
 *   to its own pod). ztunnel's other dials (HBONE, passthrough) go to
 *   other machines and stay out.
 * - Passive (accept), when the other end is already in: for a connection
 *   inside the namespace the active end is established (SYN-ACK) before
 *   the passive end (ACK). This takes in ztunnel's accepted outbound
 *   connections and the app's accepted deliveries, and leaves out
 *   everything accepted from the network.
 */
SEC("sockops")
int pair_local_ends(struct bpf_sock_ops *ops)
{
	const struct pod *pod;
	struct bpf_sock *sk;
	__u8 yes = 1;
	struct end self, other;
	__u64 ns;

	if (ops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    ops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (ops->family != AF_INET)
		return 1;
	ns = bpf_get_netns_cookie(ops);
	pod = bpf_map_lookup_elem(&enrolled, &ns);
	if (!pod)
		return 1;
	sk = ops->sk;
	if (!sk)
		return 1;

	self.netns = ns;
	self.local_ip4 = ops->local_ip4;
	self.remote_ip4 = ops->remote_ip4;
	self.local_port = ops->local_port;
	self.remote_port = bpf_ntohl(ops->remote_port);

	if (ops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		if (sk->mark == ZTUNNEL_MARK && !is_pod_ip(pod, self.remote_ip4))
			return 1;
		/* Fails for sockets a SOCKHASH does not take (MPTCP, say):
		 * they stay on TCP. */
		if (bpf_sock_hash_update(ops, &ends, &self, BPF_NOEXIST) != 0)
			return 1;
		bpf_map_update_elem(&waiting, &self, &yes, BPF_ANY);
		count(STAT_PAIRED);
		return 1;
	}
	other.netns = ns;
	other.local_ip4 = self.remote_ip4;
	other.remote_ip4 = self.local_ip4;
	other.local_port = self.remote_port;
	other.remote_port = self.local_port;
	if (bpf_map_delete_elem(&waiting, &other) != 0)
		return 1;
	if (bpf_sock_hash_update(ops, &ends, &self, BPF_NOEXIST) == 0)
		count(STAT_PAIRED);
	return 1;
}

SEC("sk_msg")
int shortcut_local_ends(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	struct end other;
	__u32 *route_of;

	if (!sk)
		return SK_PASS;
	route_of = bpf_sk_storage_get(&route, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!route_of || *route_of == TCP) {
		count(STAT_TCP);
		return SK_PASS;
	}
	other.netns = bpf_get_netns_cookie(msg);
	other.local_ip4 = msg->remote_ip4;
	other.remote_ip4 = msg->local_ip4;
	other.local_port = bpf_ntohl(msg->remote_port);
	other.remote_port = msg->local_port;
	if (bpf_msg_redirect_hash(msg, &ends, &other, BPF_F_INGRESS) == SK_PASS) {
		*route_of = SHORTCUT;
		count(STAT_SHORTCUT);
		return SK_PASS;
	}
	/* No peer: at the first send, TCP for good. Later, the peer has
	 * closed: TCP, whose reset tells the sender. */
	if (*route_of == UNDECIDED)
		*route_of = TCP;
	count(STAT_TCP);
	return SK_PASS;
}

char __license[] SEC("license") = "Dual MIT/GPL";
