/* Ethernet, ARP, IPv4, ICMP and UDP (see ip.h). TCP is in tcp.c. */
#include "net/ip.h"
#include "lib.h"
#include "console.h"
#include "time.h"

#define ETHERTYPE_IP  0x0800
#define ETHERTYPE_ARP 0x0806
#define IP_BROADCAST  0xffffffffu

static struct netif *nif;
u64 (*net_now_ns)(void) = monotonic_ns;

struct netif *net_current(void) { return nif; }

static const u8 bcast_mac[ETH_ALEN] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
static u8 txbuf[ETH_FRAME_MAX];
static u16 ip_ident;

/* ------------------------------------------------------------------ helpers */

u32 csum_partial(const void *data, int len, u32 sum)
{
    const u8 *p = data;
    for (; len > 1; len -= 2, p += 2)
        sum += (u32)(p[0] << 8 | p[1]);
    if (len > 0)
        sum += (u32)p[0] << 8;
    return sum;
}

u16 csum_fold(u32 sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

u16 ip_checksum(const void *data, int len) { return csum_fold(csum_partial(data, len, 0)); }

u32 l4_pseudo_sum(u32 src, u32 dst, u8 proto, int len)
{
    return (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + proto + (u32)len;
}

int parse_ipv4(const char *s, u32 *ip)
{
    const char *p = s;
    u32 v = 0;
    for (int i = 0; i < 4; i++) {
        if (*p < '0' || *p > '9') return 0;
        u32 o = 0;
        int n = 0;
        while (*p >= '0' && *p <= '9' && n < 4) { o = o * 10 + (u32)(*p++ - '0'); n++; }
        if (o > 255 || (*p >= '0' && *p <= '9')) return 0;
        v = v << 8 | o;
        if (i < 3) {
            if (*p != '.') return 0;
            p++;
        }
    }
    *ip = v;
    return (int)(p - s);
}

int parse_ipv4_cidr(const char *s, u32 *ip, u32 *mask)
{
    int n = parse_ipv4(s, ip);
    if (!n) return 0;
    s += n;
    if (!*s) { *mask = 0xffffff00u; return 1; }
    if (*s != '/') return 0;
    long bits;
    int m = parse_long(s + 1, &bits);
    if (!m || s[1 + m] || bits < 0 || bits > 32) return 0;
    *mask = bits ? 0xffffffffu << (32 - bits) : 0;
    return 1;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

int parse_mac(const char *s, u8 mac[ETH_ALEN])
{
    for (int i = 0; i < ETH_ALEN; i++) {
        int h = hexval(s[0]), l = hexval(s[1]);
        if (h < 0 || l < 0) return 0;
        mac[i] = (u8)(h << 4 | l);
        s += 2;
        if (i < ETH_ALEN - 1) {
            if (*s != ':') return 0;
            s++;
        }
    }
    return *s == 0 || *s == '\n';
}

void fmt_ipv4(char *buf, u32 ip)
{
    snprintf(buf, 16, "%u.%u.%u.%u", ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255);
}

void fmt_mac(char *buf, const u8 m[ETH_ALEN])
{
    snprintf(buf, 18, "%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
}

static void bad(const char *why)
{
    (void)why;
    nif->stats.bad++;
}

static void ignored(void) { nif->stats.ignored++; }

static int send_frame(const void *frame, int len)
{
    if (nif->xmit(nif, frame, len) != 0) {
        nif->stats.tx_err++;
        return -1;
    }
    nif->stats.tx++;
    return 0;
}

static void eth_header(u8 *f, const u8 *dst, u16 type)
{
    memcpy(f, dst, ETH_ALEN);
    memcpy(f + 6, nif->mac, ETH_ALEN);
    put16(f + 12, type);
}

/* -------------------------------------------------------------------- ARP */

#define ARP_ENTRIES   8
#define ARP_RETRY_NS  1000000000UL
#define ARP_TRIES     3

enum { ARP_FREE, ARP_PENDING, ARP_VALID };

struct arp_entry {
    int state;
    u32 ip;
    u8 mac[ETH_ALEN];
    u64 used;                 /* for replacement */
    int tries;
    u64 next_try;
    int pending_len;          /* one queued frame (eth header filled later) */
    u8 pending[ETH_FRAME_MAX];
};
static struct arp_entry arp_cache[ARP_ENTRIES];

static struct arp_entry *arp_find(u32 ip)
{
    for (int i = 0; i < ARP_ENTRIES; i++)
        if (arp_cache[i].state != ARP_FREE && arp_cache[i].ip == ip)
            return &arp_cache[i];
    return NULL;
}

static struct arp_entry *arp_alloc(u32 ip)
{
    struct arp_entry *victim = &arp_cache[0];
    for (int i = 0; i < ARP_ENTRIES; i++) {
        if (arp_cache[i].state == ARP_FREE) { victim = &arp_cache[i]; break; }
        if (arp_cache[i].used < victim->used) victim = &arp_cache[i];
    }
    if (victim->state == ARP_PENDING && victim->pending_len)
        nif->stats.tx_err++;
    victim->state = ARP_FREE;
    victim->ip = ip;
    victim->pending_len = 0;
    victim->tries = 0;
    victim->used = net_now_ns();
    return victim;
}

static void arp_send(u16 op, const u8 *tha, u32 tpa, const u8 *eth_dst)
{
    u8 f[ETH_HLEN + 28];
    eth_header(f, eth_dst, ETHERTYPE_ARP);
    u8 *a = f + ETH_HLEN;
    put16(a, 1);              /* Ethernet */
    put16(a + 2, ETHERTYPE_IP);
    a[4] = ETH_ALEN;
    a[5] = 4;
    put16(a + 6, op);
    memcpy(a + 8, nif->mac, ETH_ALEN);
    put32(a + 14, nif->ip);
    memcpy(a + 18, tha, ETH_ALEN);
    put32(a + 24, tpa);
    send_frame(f, sizeof(f));
}

static void arp_request(u32 ip)
{
    static const u8 zero[ETH_ALEN];
    arp_send(1, zero, ip, bcast_mac);
}

static void arp_resolved(struct arp_entry *e, const u8 *mac)
{
    memcpy(e->mac, mac, ETH_ALEN);
    e->used = net_now_ns();
    if (e->state == ARP_PENDING && e->pending_len) {
        memcpy(e->pending, mac, ETH_ALEN);
        e->state = ARP_VALID;
        int len = e->pending_len;
        e->pending_len = 0;
        send_frame(e->pending, len);
    }
    e->state = ARP_VALID;
}

static void arp_input(const u8 *a, int len)
{
    if (len < 28) return bad("arp short");
    if (get16(a) != 1 || get16(a + 2) != ETHERTYPE_IP || a[4] != ETH_ALEN || a[5] != 4)
        return ignored();
    u16 op = get16(a + 6);
    const u8 *sha = a + 8;
    u32 spa = get32(a + 14), tpa = get32(a + 24);
    if (op != 1 && op != 2) return bad("arp op");
    if (sha[0] & 1) return bad("arp multicast sender");       /* incl. broadcast */
    if (spa == nif->ip && spa) {
        if (memcmp(sha, nif->mac, ETH_ALEN)) {
            char m[18];
            fmt_mac(m, sha);
            printk("net: address conflict: %s claims our ip\n", m);
        }
        return ignored();
    }
    /* RFC 826 merge: update an existing entry; add one if it is for us. */
    struct arp_entry *e = spa ? arp_find(spa) : NULL;
    if (e)
        arp_resolved(e, sha);
    if (tpa != nif->ip || !nif->ip) {
        if (!e) ignored();
        return;
    }
    if (!e && spa && spa != IP_BROADCAST)
        arp_resolved(arp_alloc(spa), sha);
    if (op == 1)
        arp_send(2, sha, spa, sha);
}

/* ---------------------------------------------------------------- IPv4 out */

static int is_local_bcast(u32 ip)
{
    return ip == IP_BROADCAST || (nif->mask != 0xffffffffu && ip == (nif->ip | ~nif->mask));
}

int ip_output(u32 dst, u8 proto, const void *payload, int len)
{
    if (!nif || len < 0 || len > ETH_MTU - 20) return -1;
    u8 *f = txbuf;
    u8 *ip = f + ETH_HLEN;
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip + 2, (u16)(20 + len));
    put16(ip + 4, ip_ident++);
    put16(ip + 6, 0x4000);          /* DF */
    ip[8] = 64;
    ip[9] = proto;
    put16(ip + 10, 0);
    put32(ip + 12, nif->ip);
    put32(ip + 16, dst);
    put16(ip + 10, ip_checksum(ip, 20));
    memcpy(ip + 20, payload, (size_t)len);
    int flen = ETH_HLEN + 20 + len;

    if (is_local_bcast(dst)) {
        eth_header(f, bcast_mac, ETHERTYPE_IP);
        return send_frame(f, flen);
    }
    u32 hop = dst;
    if ((dst & nif->mask) != (nif->ip & nif->mask)) {
        if (!nif->gw) { nif->stats.tx_err++; return -1; }
        hop = nif->gw;
    }
    struct arp_entry *e = arp_find(hop);
    if (e && e->state == ARP_VALID) {
        e->used = net_now_ns();
        eth_header(f, e->mac, ETHERTYPE_IP);
        return send_frame(f, flen);
    }
    if (!e) {
        e = arp_alloc(hop);
        e->state = ARP_PENDING;
    }
    if (e->pending_len)
        nif->stats.tx_err++;        /* replace the older queued packet */
    eth_header(e->pending, bcast_mac, ETHERTYPE_IP);
    memcpy(e->pending + ETH_HLEN, ip, (size_t)(flen - ETH_HLEN));
    e->pending_len = flen;
    if (e->tries == 0) {
        e->tries = 1;
        e->next_try = net_now_ns() + ARP_RETRY_NS;
        arp_request(hop);
    }
    return 0;
}

/* -------------------------------------------------------------------- ICMP */

#define PING_SLOTS 16
static struct { u32 dst; u16 id, seq; int done; u64 sent, rtt; } pings[PING_SLOTS];
static unsigned ping_next;

int icmp_ping_send(u32 dst, u16 id, u16 seq, int len)
{
    static u8 buf[8 + 1024];
    if (len < 0) len = 0;
    if (len > 1024) len = 1024;
    buf[0] = 8; buf[1] = 0;
    put16(buf + 2, 0);
    put16(buf + 4, id);
    put16(buf + 6, seq);
    for (int i = 0; i < len; i++) buf[8 + i] = (u8)(i + 0x20);
    put16(buf + 2, ip_checksum(buf, 8 + len));
    unsigned s = ping_next++ % PING_SLOTS;
    pings[s].dst = dst; pings[s].id = id; pings[s].seq = seq;
    pings[s].done = 0;
    pings[s].sent = net_now_ns();
    return ip_output(dst, IPPROTO_ICMP, buf, 8 + len);
}

int icmp_ping_done(u16 id, u16 seq, u64 *rtt_ns)
{
    for (int i = 0; i < PING_SLOTS; i++)
        if (pings[i].done && pings[i].id == id && pings[i].seq == seq) {
            if (rtt_ns) *rtt_ns = pings[i].rtt;
            return 1;
        }
    return 0;
}

static void icmp_input(u32 src, u32 dst, const u8 *m, int len)
{
    static u8 reply[ETH_MTU - 20];
    if (len < 8) return bad("icmp short");
    if (ip_checksum(m, len) != 0) return bad("icmp checksum");
    if (m[0] == 8 && m[1] == 0) {                 /* echo request */
        if (dst != nif->ip) return ignored();     /* no broadcast pings */
        memcpy(reply, m, (size_t)len);
        reply[0] = 0;
        put16(reply + 2, 0);
        put16(reply + 2, ip_checksum(reply, len));
        ip_output(src, IPPROTO_ICMP, reply, len);
        return;
    }
    if (m[0] == 0 && m[1] == 0) {                 /* echo reply */
        u16 id = get16(m + 4), seq = get16(m + 6);
        for (int i = 0; i < PING_SLOTS; i++)
            if (!pings[i].done && pings[i].id == id && pings[i].seq == seq &&
                pings[i].dst == src && pings[i].sent) {
                pings[i].done = 1;
                pings[i].rtt = net_now_ns() - pings[i].sent;
                return;
            }
        return ignored();                         /* late or unsolicited */
    }
    ignored();
}

/* --------------------------------------------------------------------- UDP */

#define UDP_SOCKS 8
#define UDP_QUEUE 4
struct udp_dgram { u32 src; u16 sport; int len; u8 data[UDP_MAX_PAYLOAD]; };
static struct udp_sock {
    int used;
    u16 port;
    udp_handler_t h;
    unsigned head, count;
    struct udp_dgram q[UDP_QUEUE];
} socks[UDP_SOCKS];

int udp_bind(u16 port, udp_handler_t h)
{
    if (!port) return -1;
    int free = -1;
    for (int i = 0; i < UDP_SOCKS; i++) {
        if (socks[i].used && socks[i].port == port) return -1;
        if (!socks[i].used && free < 0) free = i;
    }
    if (free < 0) return -1;
    socks[free].used = 1;
    socks[free].port = port;
    socks[free].h = h;
    socks[free].head = socks[free].count = 0;
    return free;
}

void udp_close(int s)
{
    if (s >= 0 && s < UDP_SOCKS) socks[s].used = 0;
}

int udp_sendto(int s, u32 dst, u16 dport, const void *data, int len)
{
    static u8 buf[8 + UDP_MAX_PAYLOAD];
    if (s < 0 || s >= UDP_SOCKS || !socks[s].used || len < 0 || len > UDP_MAX_PAYLOAD || !dport)
        return -1;
    put16(buf, socks[s].port);
    put16(buf + 2, dport);
    put16(buf + 4, (u16)(8 + len));
    put16(buf + 6, 0);
    memcpy(buf + 8, data, (size_t)len);
    u16 c = csum_fold(csum_partial(buf, 8 + len, l4_pseudo_sum(nif->ip, dst, IPPROTO_UDP, 8 + len)));
    put16(buf + 6, c ? c : 0xffff);
    return ip_output(dst, IPPROTO_UDP, buf, 8 + len);
}

int udp_poll(int s)
{
    return (s >= 0 && s < UDP_SOCKS && socks[s].used) ? (int)socks[s].count : 0;
}

int udp_recvfrom(int s, void *buf, int size, u32 *src, u16 *sport)
{
    if (!udp_poll(s)) return -1;
    struct udp_sock *k = &socks[s];
    struct udp_dgram *d = &k->q[k->head];
    int n = d->len < size ? d->len : size;
    if (n > 0) memcpy(buf, d->data, (size_t)n);
    if (src) *src = d->src;
    if (sport) *sport = d->sport;
    k->head = (k->head + 1) % UDP_QUEUE;
    k->count--;
    return n;
}

static int echo_sock = -1;

static void udp_echo(u32 src, u16 sport, u16 dport, const void *data, int len)
{
    udp_sendto(echo_sock, src, sport, data, len);
}

static void udp_input(u32 src, u32 dst, const u8 *u, int len, int csum_ok)
{
    if (len < 8) return bad("udp short");
    int ulen = get16(u + 4);
    if (ulen < 8 || ulen > len) return bad("udp length");
    if (get16(u + 6) && !csum_ok &&
        csum_fold(csum_partial(u, ulen, l4_pseudo_sum(src, dst, IPPROTO_UDP, ulen))) != 0)
        return bad("udp checksum");
    u16 sport = get16(u), dport = get16(u + 2);
    if (!sport) return bad("udp source port 0");
    for (int i = 0; i < UDP_SOCKS; i++) {
        struct udp_sock *k = &socks[i];
        if (!k->used || k->port != dport) continue;
        if (k->h) {
            /* Echo only unicast, and never to well-known "reflector" ports. */
            if (k->h == udp_echo && (dst != nif->ip || sport == 7 || sport == 19))
                return ignored();
            k->h(src, sport, dport, u + 8, ulen - 8);
            return;
        }
        if (k->count == UDP_QUEUE) return ignored();     /* queue full */
        struct udp_dgram *d = &k->q[(k->head + k->count) % UDP_QUEUE];
        d->src = src;
        d->sport = sport;
        d->len = ulen - 8;
        memcpy(d->data, u + 8, (size_t)d->len);
        k->count++;
        return;
    }
    ignored();    /* closed port (no ICMP port unreachable) */
}

/* -------------------------------------------------------------------- IPv4 */

static void ip_input(const u8 *ip, int len, unsigned flags)
{
    if (len < 20) return bad("ip short");
    if ((ip[0] >> 4) != 4) return bad("ip version");
    int ihl = (ip[0] & 15) * 4;
    int tot = get16(ip + 2);
    if (ihl < 20 || tot < ihl || tot > len) return bad("ip length");
    if (ip_checksum(ip, ihl) != 0) return bad("ip checksum");
    if (get16(ip + 6) & 0x3fff) return bad("ip fragment");     /* MF or offset */
    u32 src = get32(ip + 12), dst = get32(ip + 16);
    if (dst != nif->ip && !is_local_bcast(dst)) return ignored();
    if (!src || src == IP_BROADCAST || (src >> 28) == 14 || src == nif->ip || is_local_bcast(src) ||
        (src >> 24) == 127)
        return bad("ip bogus source");
    const u8 *pl = ip + ihl;
    int plen = tot - ihl;                 /* trims Ethernet padding */
    int csum_ok = flags & NET_RX_CSUM_VALID;
    switch (ip[9]) {
    case IPPROTO_ICMP: icmp_input(src, dst, pl, plen); break;
    case IPPROTO_UDP:  udp_input(src, dst, pl, plen, csum_ok); break;
    case IPPROTO_TCP:
        if (dst != nif->ip) return ignored();
        tcp_input(src, dst, pl, plen, csum_ok);
        break;
    default: ignored();
    }
}

/* ---------------------------------------------------------------- Ethernet */

void net_input_flags(struct netif *n, const void *frame, int len, unsigned flags)
{
    if (!nif || n != nif) return;
    const u8 *f = frame;
    nif->stats.rx++;
    if (!f || len < ETH_HLEN || len > ETH_FRAME_MAX + 4) return bad("frame length");
    if (memcmp(f, nif->mac, ETH_ALEN) && memcmp(f, bcast_mac, ETH_ALEN))
        return ignored();                 /* other unicast, multicast */
    if (!memcmp(f + 6, nif->mac, ETH_ALEN) || (f[6] & 1))
        return bad("bogus source mac");   /* our own echo, or multicast source */
    u16 type = get16(f + 12);
    if (type == ETHERTYPE_ARP) arp_input(f + ETH_HLEN, len - ETH_HLEN);
    else if (type == ETHERTYPE_IP) ip_input(f + ETH_HLEN, len - ETH_HLEN, flags);
    else ignored();                       /* IPv6, VLAN, LLDP, ... */
}

void net_input(struct netif *n, const void *frame, int len)
{
    net_input_flags(n, frame, len, 0);
}

u64 net_tick(struct netif *n)
{
    if (!nif || n != nif) return 0;
    u64 now = net_now_ns(), next = 0;
    for (int i = 0; i < ARP_ENTRIES; i++) {
        struct arp_entry *e = &arp_cache[i];
        if (e->state != ARP_PENDING || !e->tries) continue;
        if (now >= e->next_try) {
            if (e->tries >= ARP_TRIES) {
                char b[16];
                fmt_ipv4(b, e->ip);
                printk("net: arp: no reply from %s\n", b);
                if (e->pending_len) nif->stats.tx_err++;
                e->state = ARP_FREE;
                e->pending_len = 0;
                continue;
            }
            e->tries++;
            e->next_try = now + ARP_RETRY_NS;
            arp_request(e->ip);
        }
        if (!next || e->next_try < next) next = e->next_try;
    }
    u64 t = tcp_tick(now);
    if (t && (!next || t < next)) next = t;
    return next;
}

void net_init(struct netif *n)
{
    nif = n;
    memset(&n->stats, 0, sizeof(n->stats));
    memset(arp_cache, 0, sizeof(arp_cache));
    memset(pings, 0, sizeof(pings));
    memset(socks, 0, sizeof(socks));
    ip_ident = (u16)net_now_ns();
    echo_sock = udp_bind(7, udp_echo);
    tcp_init();
    /* Gratuitous ARP: a request for our own address. */
    static const u8 zero[ETH_ALEN];
    arp_send(1, zero, n->ip, bcast_mac);
}
