/* The network guest: netfront + the IPv4 stack. Serves ICMP echo, UDP echo
 * (port 7) and HTTP (port 80); optionally pings another host first.
 *
 * cmdline: ip=<a.b.c.d/len> [name=<n>] [gw=<a.b.c.d>] [ping=<a.b.c.d>
 *          count=<k> (default 4)] [serve=<seconds>] [vif=<devid> (default 0)]
 *          [sink=<port>] [blast=<a.b.c.d>:<port> bytes=<n> [size=<payload>]]
 *          [hotplug=<seconds>] [suspend=1 [suspend_delay=<ms>]]
 *          [disk=<records>]
 * suspend=1: serve Xen's cooperative suspend (control/shutdown) while
 * serving; after a resume in a new domain the vif (and disk) reconnect to the
 * new backends: "net: resumed rc=<0|1>". The guest sends no ARP of its own
 * then (the hypervisor announces it). suspend_delay=<ms>: that long between
 * acknowledging a suspend request and suspending, the rings not read.
 * disk=<n>: write records 0..n-1 to the first vbd, one 512-byte sector each
 * (record k at sector k: "rec <k>" then bytes (k*131+i)&255), one every
 * 2 ms while serving, synchronously; "disk: acked <k>" after every 20th
 * acknowledged write (k = records acknowledged so far), "disk: done <n>".  * hotplug=: the vif may not exist at boot (xl network-attach later): wait up
 * to <seconds> for device/vif/<devid> to appear, then connect.
 * serve=0 serves forever; without serve= the guest serves forever unless
 * ping= or blast= is given, in which case it powers off after them.
 * sink=: counts the UDP datagrams received on <port>; a datagram "sink?"
 * prints and answers the count. blast=: sends <n> bytes of UDP payload in
 * datagrams of <payload> bytes (default 1472) as fast as the tx ring allows. */
#include "console.h"
#include "lib.h"
#include "sched.h"
#include "time.h"
#include "gnttab.h"
#include "xenbus.h"
#include "net/ip.h"
#include "net/netfront.h"
#include "suspend.h"
#include "blkfront.h"

static struct netif nif;
static struct netfront *nf;
static int suspend_on;
static struct blkfront_dev *blk;
static u64 disk_records, disk_acked, disk_next;
static u8 disk_buf[512] __attribute__((aligned(512)));

static void disk_step(u64 now)
{
    if (!blk || disk_acked >= disk_records || now < disk_next) return;
    u64 k = disk_acked;
    int n = snprintf((char *)disk_buf, sizeof(disk_buf), "rec %lu\n", k);
    for (int i = n; i < 512; i++) disk_buf[i] = (u8)((k * 131 + (u64)i) & 255);
    int rc = blkfront_write(blk, k, disk_buf, 1);
    if (rc) { printk("disk: write %lu failed: %d\n", k, rc); blk = NULL; return; }
    disk_acked = k + 1;
    if (disk_acked % 20 == 0) printk("disk: acked %lu\n", disk_acked);
    if (disk_acked == disk_records) printk("disk: done %lu\n", disk_acked);
    disk_next = now + 2000000UL;
}

static void on_resume(void)
{
    if (netfront_resume(nf)) printk("net: resume: vif did not reconnect\n");
    if (blk && blkfront_resume(blk)) { printk("disk: resume: vbd did not reconnect\n"); blk = NULL; }
}

static int nf_xmit(struct netif *n, const void *frame, int len)
{
    return netfront_xmit(n->priv, frame, len);
}

static void nf_rx(void *arg, const void *frame, int len, unsigned flags)
{
    net_input_flags(&nif, frame, len, flags);
}

/* Run the network until `deadline` (0: forever) or until done() says so. */
static void run(u64 deadline, int (*done)(void))
{
    for (;;) {
        if (suspend_on) {
            int r = suspend_check(1);             /* a request queued? (no wait) */
            if (r >= 0) printk("net: resumed rc=%d\n", r);
        }
        netfront_poll(nf, nf_rx, NULL);
        u64 t = net_tick(&nif);
        if (done && done()) return;
        u64 now = monotonic_ns();
        disk_step(now);
        if (deadline && now >= deadline) return;
        u64 wake = deadline;
        if (t && (!wake || t < wake)) wake = t;
        if (blk && disk_acked < disk_records && (!wake || disk_next < wake)) wake = disk_next;
        if (suspend_on && (!wake || wake > now + 10000000UL)) wake = now + 10000000UL;
        netfront_wait(nf, wake);
    }
}

static u16 ping_id, ping_seq;
static int ping_replied(void) { return icmp_ping_done(ping_id, ping_seq, NULL); }

static void do_pings(u32 dst, const char *dst_s, unsigned count)
{
    unsigned received = 0;
    ping_id = (u16)(monotonic_ns() >> 12) | 1;
    for (unsigned i = 1; i <= count; i++) {
        ping_seq = (u16)i;
        u64 t0 = monotonic_ns();
        if (icmp_ping_send(dst, ping_id, ping_seq, 56) < 0) {
            printk("net: ping %s seq=%u send failed\n", dst_s, i);
        } else {
            /* The first ping may need ARP (3 tries, 1 s apart). */
            run(t0 + (i == 1 ? 4000000000UL : 1000000000UL), ping_replied);
            u64 rtt;
            if (icmp_ping_done(ping_id, ping_seq, &rtt)) {
                received++;
                printk("net: ping %s seq=%u rtt_us=%lu\n", dst_s, i, rtt / 1000);
            } else {
                printk("net: ping %s seq=%u timeout\n", dst_s, i);
            }
        }
        u64 next = t0 + 100000000UL;                  /* at most 10 pings/s */
        if (i < count && monotonic_ns() < next) run(next, NULL);
    }
    printk("net: ping done %u/%u\n", received, count);
}

/* ---- sink: count datagrams on one port ---- */
static int sink_sock = -1;
static u16 sink_port;
static u64 sink_count, sink_bytes, sink_first, sink_last;

static int sink_report(char *buf, size_t size)
{
    u64 us = sink_count ? (sink_last - sink_first) / 1000 : 0;
    return snprintf(buf, size, "count=%lu bytes=%lu us=%lu", sink_count, sink_bytes, us);
}

static void sink_rx(u32 src, u16 sport, u16 dport, const void *data, int len)
{
    if (len == 5 && !memcmp(data, "sink?", 5)) {
        char r[96];
        int n = sink_report(r, sizeof(r));
        printk("net: sink %u %s\n", sink_port, r);
        udp_sendto(sink_sock, src, sport, r, n);
        return;
    }
    u64 now = monotonic_ns();
    if (!sink_count) sink_first = now;
    sink_last = now;
    sink_count++;
    sink_bytes += (u64)len;
}

/* ---- blast: bulk UDP sender ---- */
static void do_blast(u32 dst, const char *dst_s, u16 port, u64 bytes, unsigned size)
{
    static u8 payload[UDP_MAX_PAYLOAD];
    /* Resolve the peer first (the stack queues only one packet per address). */
    ping_id = (u16)(monotonic_ns() >> 12) | 1;
    ping_seq = 1;
    if (icmp_ping_send(dst, ping_id, ping_seq, 8) == 0)
        run(monotonic_ns() + 4000000000UL, ping_replied);
    if (!icmp_ping_done(ping_id, ping_seq, NULL)) {
        printk("net: blast %s: no reply to ping\n", dst_s);
        return;
    }
    int sock = udp_bind(40000 + (port % 1000), NULL);
    if (sock < 0) sock = udp_bind(41999, NULL);
    for (unsigned i = 0; i < size; i++) payload[i] = (u8)(i * 7 + 1);
    u64 sent = 0, nbytes = 0, seq = 0;
    u64 t0 = monotonic_ns();
    while (nbytes < bytes) {
        if (netfront_tx_space(nf) == 0) {
            netfront_poll(nf, nf_rx, NULL);
            if (netfront_tx_space(nf) == 0) netfront_wait(nf, monotonic_ns() + 10000000UL);
            continue;
        }
        unsigned n = (u64)size < bytes - nbytes ? size : (unsigned)(bytes - nbytes);
        if (n < 8) n = 8;
        memcpy(payload, &seq, 8);
        if (udp_sendto(sock, dst, port, payload, (int)n) < 0) {
            printk("net: blast %s:%u send failed after %lu datagrams\n", dst_s, port, sent);
            break;
        }
        seq++;
        sent++;
        nbytes += n;
        if ((sent & 63) == 0) netfront_poll(nf, nf_rx, NULL);
    }
    /* Done when the backend has answered every request. */
    u64 limit = monotonic_ns() + 5000000000UL;
    while (netfront_tx_space(nf) < 256 && monotonic_ns() < limit) {
        netfront_poll(nf, nf_rx, NULL);
        netfront_wait(nf, monotonic_ns() + 10000000UL);
    }
    u64 us = (monotonic_ns() - t0) / 1000;
    printk("net: blast %s:%u sent=%lu bytes=%lu us=%lu\n", dst_s, port, sent, nbytes, us);
    udp_close(sock);
}

void app_main(void)
{
    const char *cmd = (const char *)start_info->cmd_line;
    char buf[64], ip_s[16], name[64] = "aiovmm-net";

    if (!cmdline_str(cmd, "ip", buf, sizeof(buf)) || !parse_ipv4_cidr(buf, &nif.ip, &nif.mask))
        panic("net: need ip=<a.b.c.d/len> on the command line");
    cmdline_str(cmd, "name", name, sizeof(name));
    if (cmdline_str(cmd, "gw", buf, sizeof(buf)) && !parse_ipv4(buf, &nif.gw))
        panic("net: bad gw=%s", buf);
    u32 ping_dst = 0;
    char ping_s[16] = "";
    int do_ping = cmdline_str(cmd, "ping", ping_s, sizeof(ping_s));
    if (do_ping && !parse_ipv4(ping_s, &ping_dst))
        panic("net: bad ping=%s", ping_s);
    u64 count = cmdline_u64(cmd, "count", 4);
    int has_serve = cmdline_str(cmd, "serve", buf, sizeof(buf));
    u64 serve = cmdline_u64(cmd, "serve", 0);
    sink_port = (u16)cmdline_u64(cmd, "sink", 0);
    char blast_s[32] = "";
    u32 blast_dst = 0;
    u16 blast_port = 0;
    int do_blast_ = cmdline_str(cmd, "blast", blast_s, sizeof(blast_s));
    if (do_blast_) {
        char *colon = blast_s;
        while (*colon && *colon != ':') colon++;
        long pl = 0;
        if (*colon) *colon++ = 0;
        if (!parse_ipv4(blast_s, &blast_dst) || !parse_long(colon, &pl) || pl <= 0 || pl > 65535)
            panic("net: bad blast=<a.b.c.d>:<port>");
        blast_port = (u16)pl;
    }
    u64 blast_bytes = cmdline_u64(cmd, "bytes", 1000000);
    u64 blast_size = cmdline_u64(cmd, "size", UDP_MAX_PAYLOAD);
    if (blast_size < 8 || blast_size > UDP_MAX_PAYLOAD) panic("net: bad size=%lu", blast_size);
    char node[32];
    snprintf(node, sizeof(node), "device/vif/%lu", cmdline_u64(cmd, "vif", 0));

    int rc = xenbus_init();
    if (rc) panic("net: xenbus_init failed: %d", rc);
    long g = gnttab_init();
    if (g) panic("net: gnttab_init failed: %ld", g);
    u64 hotplug = cmdline_u64(cmd, "hotplug", 0);
    if (hotplug) {
        printk("net: waiting for %s\n", node);
        rc = xenbus_wait_for_node(node, hotplug * 1000000000UL);
        if (rc) panic("net: %s did not appear: %d", node, rc);
    }
    nf = netfront_init(node);
    if (!nf) panic("net: netfront init failed");
    disk_records = cmdline_u64(cmd, "disk", 0);
    if (disk_records) {
        struct blkfront_info bi;
        blk = blkfront_init(0, &bi);
        if (!blk) panic("disk: blkfront init failed");
        if (disk_records > bi.sectors) disk_records = bi.sectors;
        printk("disk: writing %lu records\n", disk_records);
    }
    suspend_on = (int)cmdline_u64(cmd, "suspend", 0);
    suspend_delay_ms = cmdline_u64(cmd, "suspend_delay", 0);
    if (suspend_on && suspend_init(on_resume)) panic("net: suspend_init failed");

    netfront_mac(nf, nif.mac);
    nif.xmit = nf_xmit;
    nif.priv = nf;
    fmt_ipv4(ip_s, nif.ip);
    httpd_set_info(name, ip_s);
    net_init(&nif);                                   /* sends a gratuitous ARP */
    char mac_s[18];
    fmt_mac(mac_s, nif.mac);
    if (sink_port && (sink_sock = udp_bind(sink_port, sink_rx)) < 0)
        panic("net: cannot bind sink port %u", sink_port);
    printk("net: up mac=%s ip=%s\n", mac_s, ip_s);

    if (do_ping)
        do_pings(ping_dst, ping_s, (unsigned)count);
    if (do_blast_)
        do_blast(blast_dst, blast_s, blast_port, blast_bytes, (unsigned)blast_size);
    if ((!do_ping && !do_blast_) || has_serve) {
        printk("net: serving%s\n", serve ? "" : " forever");
        run(serve ? monotonic_ns() + serve * 1000000000UL : 0, NULL);
    }

    if (sink_port) {
        char r[96];
        sink_report(r, sizeof(r));
        printk("net: sink %u %s\n", sink_port, r);
    }
    const struct netfront_stats *s = netfront_stats(nf);
    u64 dropped = nif.stats.bad + nif.stats.ignored + s->rx_err + s->rx_bad;
    printk("net: stats rx=%lu tx=%lu dropped=%lu bad=%lu ignored=%lu tx_err=%lu "
           "rx_err=%lu rx_bad=%lu tx_full=%lu http=%lu\n",
           nif.stats.rx, nif.stats.tx, dropped, nif.stats.bad, nif.stats.ignored,
           nif.stats.tx_err + s->tx_err, s->rx_err, s->rx_bad, s->tx_full, tcp_stats.served);
    netfront_shutdown(nf);
    poweroff();
}
