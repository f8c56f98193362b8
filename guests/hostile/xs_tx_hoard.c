/* Xenstore transactions as a store of host memory: open `tx` transactions (default 10, the
 * per-connection quota) and in each read `reads` distinct missing nodes (default 4096) with
 * paths of `len` bytes (default 3000; XENSTORE_ABS_PATH_MAX is 3072). Each read makes the
 * daemon remember the path and its generation until the transaction ends, so the host
 * keeps tx * reads * len bytes for the guest unless a quota stops it (Xen: 1024 nodes per
 * transaction, 2.5 MB of memory per domain).
 *
 * Prints `result tx<i> <rc>` for each start, then `result reads<i> <n>` (reads accepted)
 * and `result stop<i> <rc>` (the error that stopped that transaction, 0 if none), then
 * `ready`; holds the transactions for `hold` seconds (default 30), ends them (`result end
 * <rc>` each), prints `ended`, waits `linger` seconds (default 0) and powers off. */
#include "hostile.h"
#include "xenbus.h"
#include "time.h"

#define MAX_TX 16

static char path[3100], buf[16];

void app_main(void)
{
    int rc;
    const char *cl = (const char *)start_info->cmd_line;
    unsigned ntx = cmdline_u64(cl, "tx", 10), reads = cmdline_u64(cl, "reads", 4096);
    unsigned len = cmdline_u64(cl, "len", 3000);
    u64 hold = cmdline_u64(cl, "hold", 30), linger = cmdline_u64(cl, "linger", 0);
    if (ntx > MAX_TX) ntx = MAX_TX;
    if (len >= sizeof(path) - 16) len = sizeof(path) - 17;
    xenbus_transaction_t t[MAX_TX];
    xenbus_init_home(path, sizeof(path));
    unsigned n = strlen(path);
    path[n++] = '/';
    for (unsigned i = n; i < len; i++) path[i] = 'a' + i % 26;
    for (unsigned i = 0; i < ntx; i++) {
        rc = xenbus_transaction_start(&t[i]);
        snprintf(buf, sizeof(buf), "tx%u", i);
        result(buf, rc);
        if (rc) { ntx = i; break; }
        unsigned ok = 0;
        int stop = 0;
        for (unsigned j = 0; j < reads; j++) {
            snprintf(path + len, 16, "%u-%u", i, j);
            char v[8];
            rc = xenbus_read(t[i], path, v, sizeof(v));
            if (rc != -2 /* ENOENT */) { stop = rc; break; }
            ok++;
        }
        snprintf(buf, sizeof(buf), "reads%u", i);
        result(buf, ok);
        snprintf(buf, sizeof(buf), "stop%u", i);
        result(buf, stop);
    }
    printk("ready\n");
    u64 until = monotonic_ns() + hold * 1000000000UL;
    while (monotonic_ns() < until)
        xenbus_wait_event(NULL, path, 256, buf, sizeof(buf), until);
    for (unsigned i = 0; i < ntx; i++)
        result("end", xenbus_transaction_end(t[i], 1));
    printk("ended\n");
    until = monotonic_ns() + linger * 1000000000UL;
    while (monotonic_ns() < until)
        xenbus_wait_event(NULL, path, 256, buf, sizeof(buf), until);
    poweroff();
}
