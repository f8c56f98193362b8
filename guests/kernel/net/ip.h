/* A small IPv4 stack: Ethernet, ARP, IPv4 (no fragments), ICMP echo, UDP
 * (echo on port 7 plus a few sockets) and a minimal TCP server (HTTP/1.0 on
 * port 80). It is independent of the driver: the driver calls net_input()
 * for every received frame and the stack calls netif->xmit() to send one.
 *
 * Everything from the wire is untrusted: every length, checksum and field
 * is checked before use; a bad frame bumps a counter and is dropped.
 * Addresses and ports in this API are in host byte order.
 *
 * Not re-entrant: call net_input(), net_tick() and the send functions from
 * one context (the driver's poll loop), never from an event handler. */
#ifndef AIOVMM_NET_IP_H
#define AIOVMM_NET_IP_H

#include "os.h"

#define ETH_ALEN        6
#define ETH_HLEN        14
#define ETH_MTU         1500
#define ETH_FRAME_MAX   (ETH_HLEN + ETH_MTU)

struct net_stats {
    u64 rx, tx;          /* frames received (handed to net_input), sent */
    u64 bad;             /* malformed: short, bad lengths, bad checksums, fragments */
    u64 ignored;         /* well-formed but not for us / unsupported protocol */
    u64 tx_err;          /* xmit() failed or no ARP entry after retries */
};

struct netif {
    u8 mac[ETH_ALEN];
    u32 ip, mask, gw;    /* gw 0: no default route (off-link destinations fail) */
    int (*xmit)(struct netif *nif, const void *frame, int len);  /* 0 = sent */
    void *priv;          /* the driver's */
    struct net_stats stats;
};

/* Flags for net_input_flags(): the driver says the L4 checksum need not be
 * checked (NETRXF_data_validated / NETRXF_csum_blank from a local peer). */
#define NET_RX_CSUM_VALID 1

/* Make `nif` the stack's interface, reset all state and send a gratuitous ARP. */
void net_init(struct netif *nif);
void net_input(struct netif *nif, const void *frame, int len);
struct netif *net_current(void);   /* the interface given to net_init() */
void net_input_flags(struct netif *nif, const void *frame, int len, unsigned flags);
/* Timers (ARP retries, TCP retransmission, TIME_WAIT): call at least every
 * few ms while waiting; returns the next deadline in ns (0 = none). */
u64 net_tick(struct netif *nif);
/* Current time for the stack (defaults to monotonic_ns(); tests may override). */
extern u64 (*net_now_ns)(void);

/* Sends an IPv4 packet (payload after the IP header). Resolves the next hop
 * with ARP, queueing one packet per unresolved address. 0 or -1. */
int ip_output(u32 dst, u8 proto, const void *payload, int len);

/* ---- ICMP echo (ping) client ---- */
/* Sends echo request (id, seq) with `len` payload bytes; 0 or -1. */
int icmp_ping_send(u32 dst, u16 id, u16 seq, int len);
/* 1 if a matching reply arrived since the request was sent; *rtt_ns set. */
int icmp_ping_done(u16 id, u16 seq, u64 *rtt_ns);

/* ---- UDP ---- */
#define UDP_MAX_PAYLOAD (ETH_MTU - 20 - 8)
typedef void (*udp_handler_t)(u32 src, u16 sport, u16 dport, const void *data, int len);
/* Bind `port`. With a handler, datagrams are delivered to it; without, up to
 * UDP_QUEUE datagrams are queued for udp_recvfrom(). Returns a socket
 * number >= 0 or -1 (port in use or no free socket). */
int udp_bind(u16 port, udp_handler_t h);
void udp_close(int sock);
int udp_sendto(int sock, u32 dst, u16 dport, const void *data, int len);
/* Non-blocking: bytes copied (datagram truncated to `size`), or -1 if none. */
int udp_recvfrom(int sock, void *buf, int size, u32 *src, u16 *sport);
int udp_poll(int sock);       /* number of queued datagrams */

/* ---- TCP (tcp.c) ---- */
void tcp_init(void);
void tcp_input(u32 src, u32 dst, const u8 *seg, int len, int csum_ok);
u64 tcp_tick(u64 now);
/* Text inserted into the HTTP page (guest name, IP...); copied. */
void httpd_set_info(const char *name, const char *ip);
struct tcp_stats { u64 accepted, served, resets_sent, retransmits, aborted; };
extern struct tcp_stats tcp_stats;

/* ---- helpers ---- */
u16 ip_checksum(const void *data, int len);          /* one's complement of the sum */
u32 csum_partial(const void *data, int len, u32 sum);
u16 csum_fold(u32 sum);
u32 l4_pseudo_sum(u32 src, u32 dst, u8 proto, int len);
/* "a.b.c.d" -> host order; returns chars consumed or 0. */
int parse_ipv4(const char *s, u32 *ip);
/* "a.b.c.d/len" or "a.b.c.d": 1 on success. */
int parse_ipv4_cidr(const char *s, u32 *ip, u32 *mask);
/* "aa:bb:cc:dd:ee:ff": 1 on success. */
int parse_mac(const char *s, u8 mac[ETH_ALEN]);
void fmt_ipv4(char *buf, u32 ip);                    /* buf >= 16 bytes */
void fmt_mac(char *buf, const u8 mac[ETH_ALEN]);     /* buf >= 18 bytes */

static inline u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static inline u32 get32(const u8 *p)
{ return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static inline void put16(u8 *p, u16 v) { p[0] = v >> 8; p[1] = (u8)v; }
static inline void put32(u8 *p, u32 v)
{ p[0] = v >> 24; p[1] = (u8)(v >> 16); p[2] = (u8)(v >> 8); p[3] = (u8)v; }

#define IPPROTO_ICMP 1
#define IPPROTO_TCP  6
#define IPPROTO_UDP  17

#endif
