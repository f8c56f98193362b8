/* The network guest: netfront + the IPv4 stack. Serves ICMP echo, UDP echo
 * (port 7) and HTTP (port 80); optionally pings another host first.
 *
 * cmdline: ip=<a.b.c.d/len> [name=<n>] [gw=<a.b.c.d>] [ping=<a.b.c.d>
 *          count=<k> (default 4)] [serve=<seconds>] [vif=<devid> (default 0)]
 * serve=0 serves forever; without serve= the guest serves forever unless
 * ping= is given, in which case it powers off after the pings. */
#include "console.h"
#include "lib.h"
#include "sched.h"
#include "time.h"
#include "gnttab.h"
#include "xenbus.h"
#include "net/ip.h"
#include "net/netfront.h"

static struct netif nif;
static struct netfront *nf;

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
        netfront_poll(nf, nf_rx, NULL);
        u64 t = net_tick(&nif);
        if (done && done()) return;
        u64 now = monotonic_ns();
        if (deadline && now >= deadline) return;
        u64 wake = deadline;
        if (t && (!wake || t < wake)) wake = t;
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
    char node[32];
    snprintf(node, sizeof(node), "device/vif/%lu", cmdline_u64(cmd, "vif", 0));

    int rc = xenbus_init();
    if (rc) panic("net: xenbus_init failed: %d", rc);
    long g = gnttab_init();
    if (g) panic("net: gnttab_init failed: %ld", g);
    nf = netfront_init(node);
    if (!nf) panic("net: netfront init failed");

    netfront_mac(nf, nif.mac);
    nif.xmit = nf_xmit;
    nif.priv = nf;
    fmt_ipv4(ip_s, nif.ip);
    httpd_set_info(name, ip_s);
    net_init(&nif);                                   /* sends a gratuitous ARP */
    char mac_s[18];
    fmt_mac(mac_s, nif.mac);
    printk("net: up mac=%s ip=%s\n", mac_s, ip_s);

    if (do_ping)
        do_pings(ping_dst, ping_s, (unsigned)count);
    if (!do_ping || has_serve) {
        printk("net: serving%s\n", serve ? "" : " forever");
        run(serve ? monotonic_ns() + serve * 1000000000UL : 0, NULL);
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
