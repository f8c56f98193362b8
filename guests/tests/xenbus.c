/* xenstore client test: read our domid, write/read/list keys under our
 * home, a watch and its events, a transaction (retried on EAGAIN), rm, and
 * the state-machine helpers on a node of our own.
 * cmdline `bench=<n>` runs only a benchmark instead: n writes, then n reads
 * of `data/bench` (relative: under our home), each phase timed with pvclock. */
#include "hypercall.h"
#include "console.h"
#include "sched.h"
#include "xenbus.h"
#include "time.h"
#include "lib.h"

static char home[64], path[256], buf[512];
static unsigned failures;

static void check(const char *what, int ok)
{
    if (!ok) { failures++; printk("xenbus: %s failed\n", what); }
}

#define BENCH_VALUE "value-0123456789"

static void bench(u64 n)
{
    u64 t0 = monotonic_ns();
    for (u64 i = 0; i < n; i++) {
        int rc = xenbus_write(XBT_NIL, "data/bench", BENCH_VALUE);
        if (rc) panic("xenbus bench write %lu failed: %d", (unsigned long)i, rc);
    }
    u64 t1 = monotonic_ns();
    printk("xenbus: bench writes=%lu ns=%lu\n", (unsigned long)n, (unsigned long)(t1 - t0));
    t0 = monotonic_ns();
    for (u64 i = 0; i < n; i++) {
        int rc = xenbus_read(XBT_NIL, "data/bench", buf, sizeof(buf));
        if (rc != (int)sizeof(BENCH_VALUE) - 1 || strcmp(buf, BENCH_VALUE))
            panic("xenbus bench read %lu failed: %d", (unsigned long)i, rc);
    }
    t1 = monotonic_ns();
    printk("xenbus: bench reads=%lu ns=%lu\n", (unsigned long)n, (unsigned long)(t1 - t0));
}

void app_main(void)
{
    int rc = xenbus_init();
    if (rc) panic("xenbus_init failed: %d", rc);

    u64 nbench = cmdline_u64((const char *)start_info->cmd_line, "bench", 0);
    if (nbench) {
        bench(nbench);
        poweroff();
    }

    long domid;
    rc = xenbus_read_long(XBT_NIL, "domid", &domid);
    if (rc) panic("xenbus read domid failed: %d", rc);
    printk("result domid %ld\n", domid);
    snprintf(home, sizeof(home), "/local/domain/%ld", domid);

    /* write / read */
    snprintf(path, sizeof(path), "%s/data/test", home);
    rc = xenbus_write(XBT_NIL, path, "hello xenstore");
    printk("result write %d\n", rc);
    check("write", rc == 0);
    rc = xenbus_read(XBT_NIL, path, buf, sizeof(buf));
    printk("result read %s\n", rc >= 0 ? buf : "(error)");
    check("read back", rc == 14 && !strcmp(buf, "hello xenstore"));
    snprintf(path, sizeof(path), "%s/data/second", home);
    check("write second", xenbus_write(XBT_NIL, path, "2") == 0);

    /* directory */
    snprintf(path, sizeof(path), "%s/data", home);
    rc = xenbus_directory(XBT_NIL, path, buf, sizeof(buf));
    printk("result dir_count %d\n", rc);
    int seen_test = 0, seen_second = 0;
    for (int i = 0, off = 0; i < rc; i++) {
        printk("result dir %s\n", buf + off);
        if (!strcmp(buf + off, "test")) seen_test = 1;
        if (!strcmp(buf + off, "second")) seen_second = 1;
        off += strlen(buf + off) + 1;
    }
    check("directory", seen_test && seen_second);

    /* watch: the initial event, then one for a write */
    char epath[256], etok[64];
    snprintf(path, sizeof(path), "%s/data/watched", home);
    rc = xenbus_watch(path, "tok1");
    printk("result watch %d\n", rc);
    rc = xenbus_wait_event("tok1", epath, sizeof(epath), etok, sizeof(etok), 0);
    printk("result watch_initial %d\n", rc == 0);
    check("initial watch event", rc == 0);
    xenbus_write(XBT_NIL, path, "x");
    rc = xenbus_wait_event("tok1", epath, sizeof(epath), etok, sizeof(etok), 0);
    printk("result watch_event %s\n", rc == 0 ? epath : "(timeout)");
    check("watch event", rc == 0 && !strcmp(epath, path));
    rc = xenbus_unwatch(path, "tok1");
    printk("result unwatch %d\n", rc);
    xenbus_write(XBT_NIL, path, "y");
    rc = xenbus_wait_event("tok1", NULL, 0, NULL, 0, monotonic_ns() + 200000000UL);
    printk("result event_after_unwatch %d\n", rc == 0);
    check("no event after unwatch", rc != 0);

    /* transaction: counter += 1, retried on EAGAIN */
    snprintf(path, sizeof(path), "%s/data/counter", home);
    unsigned retries = 0;
    for (;;) {
        xenbus_transaction_t t;
        rc = xenbus_transaction_start(&t);
        if (rc) break;
        long v = 0;
        int r = xenbus_read_long(t, path, &v);
        if (r && r != -2) { xenbus_transaction_end(t, 1); rc = r; break; }
        xenbus_printf(t, path, "%ld", v + 1);
        rc = xenbus_transaction_end(t, 0);
        if (rc == -11 && retries < 10) { retries++; continue; }
        break;
    }
    printk("result transaction %d\n", rc);
    printk("result tx_retries %u\n", retries);
    long v = -1;
    xenbus_read_long(XBT_NIL, path, &v);
    printk("result tx_value %ld\n", v);
    check("transaction", rc == 0 && v == 1);

    /* a conflicting write outside the transaction: commit gets EAGAIN
     * (once), the retry succeeds */
    retries = 0;
    for (;;) {
        xenbus_transaction_t t;
        rc = xenbus_transaction_start(&t);
        if (rc) break;
        long cv = 0;
        xenbus_read_long(t, path, &cv);
        if (retries == 0)
            xenbus_write(XBT_NIL, path, "100");  /* conflicts with t */
        xenbus_printf(t, path, "%ld", cv + 1);
        rc = xenbus_transaction_end(t, 0);
        if (rc == -11 && retries < 10) { retries++; continue; }
        break;
    }
    v = -1;
    xenbus_read_long(XBT_NIL, path, &v);
    printk("result tx_conflict %d retries=%u value=%ld\n", rc, retries, v);
    check("transaction conflict retry", rc == 0 && retries == 1 && v == 101);

    /* an aborted transaction leaves no trace */
    {
        xenbus_transaction_t t;
        char p2[256];
        snprintf(p2, sizeof(p2), "%s/data/aborted", home);
        if (!xenbus_transaction_start(&t)) {
            xenbus_write(t, p2, "nope");
            xenbus_transaction_end(t, 1);
        }
        rc = xenbus_read(XBT_NIL, p2, buf, sizeof(buf));
        printk("result tx_abort_read %d\n", rc);
        check("abort", rc == -2);
    }

    /* rm */
    snprintf(path, sizeof(path), "%s/data/test", home);
    rc = xenbus_rm(XBT_NIL, path);
    printk("result rm %d\n", rc);
    rc = xenbus_read(XBT_NIL, path, buf, sizeof(buf));
    printk("result read_after_rm %d\n", rc);
    check("rm", rc == -2);

    /* errors: a path outside our permissions */
    rc = xenbus_write(XBT_NIL, "/local/domain/0/aiovmm-test", "x");
    printk("result write_dom0 %d\n", rc);

    /* state machine helpers on a node of our own */
    snprintf(path, sizeof(path), "%s/data/dev", home);
    rc = xenbus_switch_state(XBT_NIL, path, XenbusStateInitialising);
    check("switch_state", rc == 0);
    rc = xenbus_switch_state(XBT_NIL, path, XenbusStateConnected);
    rc = xenbus_wait_for_state(path, XenbusStateConnected, 0, 0);
    printk("result state %d\n", rc);
    check("wait_for_state", rc == XenbusStateConnected);
    rc = xenbus_wait_for_state(path, XenbusStateClosed, 0, 300000000UL);
    printk("result state_timeout %d\n", rc);

    /* relative paths are under our home */
    rc = xenbus_write(XBT_NIL, "data/relative", "r");
    snprintf(path, sizeof(path), "%s/data/relative", home);
    int rc2 = xenbus_read(XBT_NIL, path, buf, sizeof(buf));
    printk("result relative %d\n", rc == 0 && rc2 == 1);
    check("relative path", rc == 0 && rc2 == 1);

    printk("result xenbus_ok %d\n", failures == 0);
    poweroff();
}
