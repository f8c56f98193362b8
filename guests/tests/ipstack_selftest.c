/* Unit test of the IPv4 stack without a driver: canned frames go into
 * net_input(), a loopback xmit() captures what the stack sends, and a fake
 * clock drives the timers. Prints `result <case> ok|fail` per case, then
 * `result ipstack <passed>/<total>`. */
#include "console.h"
#include "lib.h"
#include "sched.h"
#include "net/ip.h"

static const u8 MY_MAC[6] = { 0x00, 0x16, 0x3e, 0x00, 0x00, 0x02 };
static const u8 PEER_MAC[6] = { 0x00, 0x16, 0x3e, 0x00, 0x00, 0x01 };
static const u8 BCAST[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
#define MY_IP   0xc6120002u    /* 198.18.0.2 */
#define PEER_IP 0xc6120001u    /* 198.18.0.1 */
#define NEW_IP  0xc6120003u    /* 198.18.0.3 */

/* ---- loopback driver and fake clock ---- */
#define CAP 16
static u8 cap[CAP][ETH_FRAME_MAX];
static int cap_len[CAP], cap_head, cap_count;
static int fail_xmit;
static u64 fake_ns = 1000000000UL;
static u64 now(void) { return fake_ns; }

static int loop_xmit(struct netif *n, const void *f, int len)
{
    if (fail_xmit) return -1;
    if (cap_count == CAP || len > ETH_FRAME_MAX) return -1;
    int i = (cap_head + cap_count++) % CAP;
    memcpy(cap[i], f, (size_t)len);
    cap_len[i] = len;
    return 0;
}

static const u8 *take(int *len)
{
    if (!cap_count) return NULL;
    int i = cap_head;
    cap_head = (cap_head + 1) % CAP;
    cap_count--;
    *len = cap_len[i];
    return cap[i];
}

static void flush(void) { cap_head = cap_count = 0; }

static struct netif nif;

/* ---- frame builders ---- */
static u8 fb[ETH_FRAME_MAX + 64];

static int build_ip(u8 proto, u32 src, u32 dst, const void *l4, int l4len)
{
    memcpy(fb, MY_MAC, 6);
    memcpy(fb + 6, PEER_MAC, 6);
    put16(fb + 12, 0x0800);
    u8 *ip = fb + 14;
    memset(ip, 0, 20);
    ip[0] = 0x45;
    put16(ip + 2, (u16)(20 + l4len));
    put16(ip + 4, 0x1234);
    ip[8] = 64;
    ip[9] = proto;
    put32(ip + 12, src);
    put32(ip + 16, dst);
    put16(ip + 10, ip_checksum(ip, 20));
    memcpy(ip + 20, l4, (size_t)l4len);
    return 14 + 20 + l4len;
}

static void l4_csum(u8 *l4, int len, u8 proto, u32 src, u32 dst, int off)
{
    put16(l4 + off, 0);
    put16(l4 + off, csum_fold(csum_partial(l4, len, l4_pseudo_sum(src, dst, proto, len))));
}

static int build_arp(u16 op, const u8 *sha, u32 spa, const u8 *tha, u32 tpa, const u8 *dst)
{
    memcpy(fb, dst, 6);
    memcpy(fb + 6, sha, 6);
    put16(fb + 12, 0x0806);
    u8 *a = fb + 14;
    put16(a, 1); put16(a + 2, 0x0800); a[4] = 6; a[5] = 4; put16(a + 6, op);
    memcpy(a + 8, sha, 6); put32(a + 14, spa);
    memcpy(a + 18, tha, 6); put32(a + 24, tpa);
    memset(fb + 42, 0, 18);        /* Ethernet padding to 60 bytes */
    return 60;
}

static int build_tcp(u16 sport, u16 dport, u32 seq, u32 ack, u8 flags, const char *data)
{
    u8 t[20 + 512];
    int dlen = data ? (int)strlen(data) : 0;
    memset(t, 0, 20);
    put16(t, sport); put16(t + 2, dport);
    put32(t + 4, seq); put32(t + 8, ack);
    t[12] = 5 << 4; t[13] = flags; put16(t + 14, 65535);
    if (dlen) memcpy(t + 20, data, (size_t)dlen);
    l4_csum(t, 20 + dlen, 6, PEER_IP, MY_IP, 16);
    return build_ip(6, PEER_IP, MY_IP, t, 20 + dlen);
}

/* ---- checkers ---- */

/* Checks Ethernet + IPv4 headers of an output frame; returns the L4 part. */
static const u8 *check_ip(const u8 *f, int len, u8 proto, const u8 *dmac, u32 dst, int *l4len)
{
    if (!f || len < 34) return NULL;
    if (memcmp(f, dmac, 6) || memcmp(f + 6, MY_MAC, 6) || get16(f + 12) != 0x0800) return NULL;
    const u8 *ip = f + 14;
    if (ip[0] != 0x45 || ip_checksum(ip, 20) != 0 || ip[9] != proto) return NULL;
    if (get32(ip + 12) != MY_IP || get32(ip + 16) != dst) return NULL;
    int tot = get16(ip + 2);
    if (tot < 20 || 14 + tot > len) return NULL;
    *l4len = tot - 20;
    const u8 *l4 = ip + 20;
    if (proto != 1 && csum_fold(csum_partial(l4, *l4len, l4_pseudo_sum(MY_IP, dst, proto, *l4len))))
        return NULL;
    if (proto == 1 && ip_checksum(l4, *l4len)) return NULL;
    return l4;
}

static const u8 *take_tcp(u8 flags, int *dlen)
{
    int len, l4;
    const u8 *f = take(&len);
    const u8 *t = check_ip(f, len, 6, PEER_MAC, PEER_IP, &l4);
    if (!t || t[13] != flags) return NULL;
    *dlen = l4 - (t[12] >> 4) * 4;
    return t;
}

static int passed, total;
static void result(const char *name, int ok)
{
    total++;
    passed += !!ok;
    printk("result %s %s\n", name, ok ? "ok" : "fail");
}

static u64 bad_before;
static int dropped_bad(void) { return nif.stats.bad > bad_before; }
static void mark(void) { bad_before = nif.stats.bad; flush(); }

/* ---- cases ---- */

static void t_garp(void)
{
    int len;
    const u8 *f = take(&len);
    int ok = f && len == 42 && !memcmp(f, BCAST, 6) && get16(f + 12) == 0x0806 &&
             get16(f + 20) == 1 && get32(f + 28) == MY_IP && get32(f + 38) == MY_IP &&
             !memcmp(f + 22, MY_MAC, 6);
    result("garp", ok && !cap_count);
}

static void t_arp(void)
{
    static const u8 zero[6];
    mark();
    net_input(&nif, fb, build_arp(1, PEER_MAC, PEER_IP, zero, MY_IP, BCAST));
    int len;
    const u8 *f = take(&len);
    int ok = f && len == 42 && !memcmp(f, PEER_MAC, 6) && get16(f + 20) == 2 &&
             !memcmp(f + 22, MY_MAC, 6) && get32(f + 28) == MY_IP &&
             !memcmp(f + 32, PEER_MAC, 6) && get32(f + 38) == PEER_IP;
    result("arp_reply", ok && !cap_count);

    mark();
    net_input(&nif, fb, build_arp(1, PEER_MAC, PEER_IP, zero, NEW_IP, BCAST));
    result("arp_not_ours", !cap_count);

    mark();
    int n = build_arp(1, PEER_MAC, PEER_IP, zero, MY_IP, BCAST);
    fb[14 + 5] = 16;                                   /* plen 16 */
    net_input(&nif, fb, n);
    net_input(&nif, fb, 14 + 20);                      /* truncated */
    result("arp_malformed", !cap_count);
}

static int build_echo(u16 id, u16 seq, int plen)
{
    u8 m[8 + 64];
    m[0] = 8; m[1] = 0; put16(m + 2, 0); put16(m + 4, id); put16(m + 6, seq);
    for (int i = 0; i < plen; i++) m[8 + i] = (u8)i;
    put16(m + 2, ip_checksum(m, 8 + plen));
    return build_ip(1, PEER_IP, MY_IP, m, 8 + plen);
}

static void t_icmp(void)
{
    mark();
    net_input(&nif, fb, build_echo(0x77, 3, 56));
    int len, l4;
    const u8 *f = take(&len);
    const u8 *m = check_ip(f, len, 1, PEER_MAC, PEER_IP, &l4);
    int ok = m && l4 == 64 && m[0] == 0 && get16(m + 4) == 0x77 && get16(m + 6) == 3 &&
             !memcmp(m + 8, fb + 14 + 20 + 8, 56);
    result("icmp_echo", ok && !cap_count);

    mark();
    int n = build_echo(1, 1, 8);
    fb[14 + 20 + 9] ^= 0x55;                            /* payload corrupt */
    net_input(&nif, fb, n);
    result("icmp_bad_csum", !cap_count && dropped_bad());

    mark();
    n = build_echo(1, 1, 8);
    fb[14 + 8] = 3;                                     /* TTL change, stale checksum */
    net_input(&nif, fb, n);
    result("ip_bad_csum", !cap_count && dropped_bad());

    mark();
    n = build_echo(1, 1, 8);
    put16(fb + 14 + 2, 200);                            /* total length > frame */
    put16(fb + 14 + 10, 0);
    put16(fb + 14 + 10, ip_checksum(fb + 14, 20));
    net_input(&nif, fb, n);
    result("ip_bad_len", !cap_count && dropped_bad());

    mark();
    n = build_echo(1, 1, 8);
    fb[14] = 0x44;                                      /* ihl 4 */
    put16(fb + 14 + 10, 0);
    put16(fb + 14 + 10, ip_checksum(fb + 14, 16));
    net_input(&nif, fb, n);
    result("ip_bad_ihl", !cap_count && dropped_bad());

    mark();
    n = build_echo(1, 1, 8);
    put16(fb + 14 + 6, 0x2000);                         /* MF */
    put16(fb + 14 + 10, 0);
    put16(fb + 14 + 10, ip_checksum(fb + 14, 20));
    net_input(&nif, fb, n);
    result("ip_fragment", !cap_count && dropped_bad());

    mark();
    net_input(&nif, fb, 0);
    net_input(&nif, fb, 13);
    net_input(&nif, fb, -5);
    net_input(&nif, NULL, 60);
    net_input(&nif, fb, 100000);
    result("short_frames", !cap_count && nif.stats.bad == bad_before + 5);

    mark();
    n = build_echo(1, 1, 8);
    fb[0] = 0x02;                                       /* another unicast MAC */
    net_input(&nif, fb, n);
    n = build_echo(1, 1, 8);
    put32(fb + 14 + 16, NEW_IP);                        /* another IP */
    put16(fb + 14 + 10, 0);
    put16(fb + 14 + 10, ip_checksum(fb + 14, 20));
    net_input(&nif, fb, n);
    result("not_for_us", !cap_count);

    /* Padding: a 60-byte frame whose IP packet is shorter is trimmed. */
    mark();
    n = build_echo(9, 9, 0);                            /* 42 bytes */
    memset(fb + n, 0xee, 18);
    net_input(&nif, fb, 60);
    f = take(&len);
    m = check_ip(f, len, 1, PEER_MAC, PEER_IP, &l4);
    result("eth_padding", m && l4 == 8 && get16(m + 6) == 9);
}

static int build_udp(u16 sport, u16 dport, const char *data)
{
    u8 u[8 + 256];
    int dlen = (int)strlen(data);
    put16(u, sport); put16(u + 2, dport); put16(u + 4, (u16)(8 + dlen)); put16(u + 6, 0);
    memcpy(u + 8, data, (size_t)dlen);
    l4_csum(u, 8 + dlen, 17, PEER_IP, MY_IP, 6);
    return build_ip(17, PEER_IP, MY_IP, u, 8 + dlen);
}

static void t_udp(void)
{
    mark();
    net_input(&nif, fb, build_udp(40000, 7, "hello echo"));
    int len, l4;
    const u8 *f = take(&len);
    const u8 *u = check_ip(f, len, 17, PEER_MAC, PEER_IP, &l4);
    int ok = u && l4 == 18 && get16(u) == 7 && get16(u + 2) == 40000 && get16(u + 4) == 18 &&
             !memcmp(u + 8, "hello echo", 10);
    result("udp_echo", ok && !cap_count);

    mark();
    int n = build_udp(40000, 7, "hello echo");
    put16(fb + 14 + 20 + 4, 100);                       /* ulen > IP payload */
    net_input(&nif, fb, n);
    n = build_udp(40000, 7, "hello echo");
    fb[14 + 20 + 9] ^= 1;                               /* checksum mismatch */
    net_input(&nif, fb, n);
    result("udp_malformed", !cap_count && nif.stats.bad == bad_before + 2);

    mark();
    net_input(&nif, fb, build_udp(7, 7, "loop"));       /* echo-to-echo loop guard */
    result("udp_echo_loop_guard", !cap_count);

    mark();
    int s = udp_bind(5000, NULL);
    net_input(&nif, fb, build_udp(1234, 5000, "datagram"));
    char buf[32];
    u32 src = 0;
    u16 sp = 0;
    int r = (s >= 0 && udp_poll(s) == 1) ? udp_recvfrom(s, buf, sizeof(buf), &src, &sp) : -1;
    ok = r == 8 && !memcmp(buf, "datagram", 8) && src == PEER_IP && sp == 1234 && !udp_poll(s);
    ok = ok && udp_sendto(s, PEER_IP, 1234, "back", 4) == 0;
    f = take(&len);
    u = check_ip(f, len, 17, PEER_MAC, PEER_IP, &l4);
    ok = ok && u && get16(u) == 5000 && get16(u + 2) == 1234 && !memcmp(u + 8, "back", 4);
    ok = ok && udp_bind(5000, NULL) < 0;
    udp_close(s);
    result("udp_socket", ok);
}

static void t_tcp(void)
{
    int dlen;
    const u8 *t;

    /* Closed port: RST|ACK acking the SYN. */
    mark();
    net_input(&nif, fb, build_tcp(33000, 81, 1000, 0, 0x02, NULL));
    t = take_tcp(0x14, &dlen);
    result("tcp_rst_closed_port", t && get32(t + 8) == 1001 && get16(t) == 81 && !cap_count);

    /* Unknown connection with ACK: RST with seq = their ack. */
    mark();
    net_input(&nif, fb, build_tcp(33001, 80, 5000, 0xabcdef, 0x10, NULL));
    t = take_tcp(0x04, &dlen);
    result("tcp_rst_unknown_conn", t && get32(t + 4) == 0xabcdef);

    mark();
    int n = build_tcp(33002, 80, 7000, 0, 0x02, NULL);
    fb[14 + 20 + 16] ^= 0xff;
    net_input(&nif, fb, n);
    result("tcp_bad_csum", !cap_count && dropped_bad());

    /* Handshake, request, response + FIN, close. */
    mark();
    u32 cseq = 100000;
    net_input(&nif, fb, build_tcp(33003, 80, cseq, 0, 0x02, NULL));
    t = take_tcp(0x12, &dlen);
    int ok = t && get32(t + 8) == cseq + 1 && (t[12] >> 4) == 6 && t[20] == 2;
    u32 sseq = t ? get32(t + 4) : 0;
    cseq++;
    net_input(&nif, fb, build_tcp(33003, 80, cseq, sseq + 1, 0x10, NULL));
    ok = ok && !cap_count;
    const char *req = "GET / HTTP/1.0\r\nHost: x\r\n\r\n";
    net_input(&nif, fb, build_tcp(33003, 80, cseq, sseq + 1, 0x18, req));
    cseq += (u32)strlen(req);
    t = take_tcp(0x19, &dlen);                          /* ACK|PSH|FIN + data */
    const char *d = t ? (const char *)t + (t[12] >> 4) * 4 : "";
    ok = ok && t && get32(t + 4) == sseq + 1 && get32(t + 8) == cseq && dlen > 40 &&
         !memcmp(d, "HTTP/1.0 200 OK\r\n", 17);
    int has_name = 0, has_ip = 0;
    for (int i = 0; i + 10 <= dlen; i++) {
        if (!memcmp(d + i, "selftest", 8)) has_name = 1;
        if (!memcmp(d + i, "198.18.0.2", 10)) has_ip = 1;
    }
    result("tcp_http_response", ok && has_name && has_ip);
    u32 fin_ack = sseq + 1 + (u32)dlen + 1;
    net_input(&nif, fb, build_tcp(33003, 80, cseq, fin_ack, 0x11, NULL));   /* ACK + FIN */
    t = take_tcp(0x10, &dlen);
    ok = t && get32(t + 8) == cseq + 1 && get32(t + 4) == fin_ack && !cap_count;
    net_input(&nif, fb, build_tcp(33003, 80, cseq, fin_ack, 0x11, NULL));   /* FIN again */
    t = take_tcp(0x10, &dlen);
    result("tcp_close", ok && t && get32(t + 8) == cseq + 1);
    fake_ns += 3000000000UL;                            /* TIME_WAIT expires */
    net_tick(&nif);
    flush();

    /* Retransmission of SYN-ACK and of the response. */
    mark();
    cseq = 200000;
    net_input(&nif, fb, build_tcp(33004, 80, cseq, 0, 0x02, NULL));
    t = take_tcp(0x12, &dlen);
    sseq = t ? get32(t + 4) : 0;
    fake_ns += 400000000UL;
    net_tick(&nif);
    t = take_tcp(0x12, &dlen);
    result("tcp_synack_retransmit", t && get32(t + 4) == sseq);
    cseq++;
    net_input(&nif, fb, build_tcp(33004, 80, cseq, sseq + 1, 0x18, "GET /x HTTP/1.0\n\n"));
    cseq += 17;
    const u8 *first = take_tcp(0x19, &dlen);
    int first_len = dlen;
    fake_ns += 400000000UL;
    net_tick(&nif);
    t = take_tcp(0x19, &dlen);
    ok = first && t && get32(t + 4) == sseq + 1 && dlen == first_len;
    fake_ns += 700000000UL;                             /* doubled RTO */
    net_tick(&nif);
    t = take_tcp(0x19, &dlen);
    ok = ok && t && dlen == first_len;
    net_input(&nif, fb, build_tcp(33004, 80, cseq, sseq + 1 + (u32)dlen + 1, 0x10, NULL));
    fake_ns += 5000000000UL;
    net_tick(&nif);
    result("tcp_response_retransmit", ok && !cap_count && tcp_stats.retransmits >= 3);

    /* Peer RST closes the connection; later segments get RST. */
    mark();
    cseq = 300000;
    net_input(&nif, fb, build_tcp(33005, 80, cseq, 0, 0x02, NULL));
    t = take_tcp(0x12, &dlen);
    sseq = t ? get32(t + 4) : 0;
    net_input(&nif, fb, build_tcp(33005, 80, cseq + 1, sseq + 1, 0x10, NULL));
    net_input(&nif, fb, build_tcp(33005, 80, cseq + 1, 0, 0x04, NULL));
    net_input(&nif, fb, build_tcp(33005, 80, cseq + 1, sseq + 1, 0x10, NULL));
    t = take_tcp(0x04, &dlen);
    result("tcp_peer_rst", t && get32(t + 4) == sseq + 1 && !cap_count);

    /* Out-of-order data: dup ACK, nothing accepted. */
    mark();
    cseq = 400000;
    net_input(&nif, fb, build_tcp(33006, 80, cseq, 0, 0x02, NULL));
    t = take_tcp(0x12, &dlen);
    sseq = t ? get32(t + 4) : 0;
    cseq++;
    net_input(&nif, fb, build_tcp(33006, 80, cseq, sseq + 1, 0x10, NULL));
    net_input(&nif, fb, build_tcp(33006, 80, cseq + 5, sseq + 1, 0x18, "\r\n\r\n"));
    t = take_tcp(0x10, &dlen);
    ok = t && get32(t + 8) == cseq;
    net_input(&nif, fb, build_tcp(33006, 80, cseq, sseq + 1, 0x18, "HEAD "));
    t = take_tcp(0x10, &dlen);
    ok = ok && t && get32(t + 8) == cseq + 5;
    net_input(&nif, fb, build_tcp(33006, 80, cseq + 5, sseq + 1, 0x18, "/ HTTP/1.0\r\n\r\n"));
    t = take_tcp(0x19, &dlen);
    const char *hd = t ? (const char *)t + 20 : "";
    ok = ok && t && !memcmp(hd, "HTTP/1.0 200 OK", 15) && memcmp(hd + dlen - 4, "\r\n\r\n", 4) == 0;
    result("tcp_out_of_order_and_head", ok);
    net_input(&nif, fb, build_tcp(33006, 80, cseq + 20, 0, 0x04, NULL));
    flush();
}

static void t_ping(void)
{
    mark();
    int rc = icmp_ping_send(NEW_IP, 0x42, 1, 32);
    int len;
    const u8 *f = take(&len);
    int ok = rc == 0 && f && !memcmp(f, BCAST, 6) && get16(f + 12) == 0x0806 &&
             get32(f + 38) == NEW_IP && !cap_count;
    static const u8 new_mac[6] = { 0x00, 0x16, 0x3e, 0x00, 0x00, 0x03 };
    fake_ns += 1000;
    net_input(&nif, fb, build_arp(2, new_mac, NEW_IP, MY_MAC, MY_IP, MY_MAC));
    int l4;
    f = take(&len);
    const u8 *m = check_ip(f, len, 1, new_mac, NEW_IP, &l4);
    ok = ok && m && m[0] == 8 && get16(m + 4) == 0x42 && get16(m + 6) == 1 && l4 == 40;
    result("arp_resolve_queued", ok);

    /* The reply comes from NEW_IP. */
    u8 r[64];
    memcpy(r, m ? m : (const u8 *)"", (size_t)(m ? l4 : 0));
    r[0] = 0; put16(r + 2, 0); put16(r + 2, ip_checksum(r, l4));
    fake_ns += 250000;
    build_ip(1, NEW_IP, MY_IP, r, l4);
    memcpy(fb + 6, new_mac, 6);
    u64 rtt = 0;
    int before = icmp_ping_done(0x42, 1, &rtt);
    net_input(&nif, fb, 14 + 20 + l4);
    result("ping_reply", !before && icmp_ping_done(0x42, 1, &rtt) && rtt == 251000);

    /* An address nobody answers for: 3 ARP tries, then give up. */
    mark();
    u64 err = nif.stats.tx_err;
    icmp_ping_send(0xc6120063u, 0x42, 2, 8);
    for (int i = 0; i < 5; i++) { fake_ns += 1000000000UL; net_tick(&nif); }
    int arps = 0;
    while (take(&len)) arps++;
    if (arps != 3 || nif.stats.tx_err != err + 1)
        printk("arp_timeout: arps=%d tx_err+%lu\n", arps, nif.stats.tx_err - err);
    result("arp_timeout", arps == 3 && nif.stats.tx_err == err + 1);

    /* Off-link without a gateway fails. */
    result("no_route", icmp_ping_send(0x08080808u, 1, 1, 8) == -1);
}

/* Random and mutated frames must never crash the stack or get an answer
 * that is not well-formed. */
static u32 rng = 12345;
static u32 rnd(void) { rng = rng * 1103515245u + 12345u; return rng >> 8; }

static void t_fuzz(void)
{
    int bad_replies = 0;
    for (int i = 0; i < 3000; i++) {
        int n;
        switch (i % 4) {
        case 0: n = build_echo((u16)i, (u16)i, (int)(rnd() % 64)); break;
        case 1: n = build_udp((u16)(rnd() | 1), 7, "fuzz"); break;
        case 2: n = build_tcp((u16)(rnd() | 1), 80, rnd(), rnd(), (u8)rnd(), "GET /"); break;
        default: {
            static const u8 zero[6];
            n = build_arp(1, PEER_MAC, PEER_IP, zero, MY_IP, BCAST);
        }
        }
        int flips = (int)(rnd() % 4);
        for (int k = 0; k < flips; k++)
            fb[14 + rnd() % (u32)(n - 14)] ^= (u8)(1 << (rnd() % 8));
        if (rnd() % 8 == 0) n = (int)(rnd() % (u32)n);
        net_input(&nif, fb, n);
        int len;
        const u8 *f;
        while ((f = take(&len)))
            if (len < 42 || memcmp(f + 6, MY_MAC, 6)) bad_replies++;
        if (i % 100 == 0) { fake_ns += 100000000UL; net_tick(&nif); flush(); }
    }
    result("fuzz", bad_replies == 0);
}

void app_main(void)
{
    net_now_ns = now;
    memcpy(nif.mac, MY_MAC, 6);
    nif.ip = MY_IP;
    nif.mask = 0xffffff00u;
    nif.xmit = loop_xmit;
    httpd_set_info("selftest", "198.18.0.2");
    net_init(&nif);

    t_garp();
    t_arp();
    t_icmp();
    t_udp();
    t_tcp();
    t_ping();
    t_fuzz();

    fail_xmit = 1;
    net_input(&nif, fb, build_echo(1, 1, 8));
    fail_xmit = 0;
    result("xmit_error_counted", nif.stats.tx_err > 0);

    printk("net: stats rx=%lu tx=%lu bad=%lu ignored=%lu tx_err=%lu\n", nif.stats.rx,
           nif.stats.tx, nif.stats.bad, nif.stats.ignored, nif.stats.tx_err);
    printk("result ipstack %d/%d\n", passed, total);
    poweroff();
}
