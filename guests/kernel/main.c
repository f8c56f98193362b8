/* The main aiovmm guest kernel: boot banner, traps, timer, user mode,
 * privileged-instruction trapping, then poweroff (or spin). */
#include "os.h"
#include "hypercall.h"
#include "console.h"
#include "lib.h"
#include "sched.h"
#include "traps.h"
#include "events.h"
#include "time.h"
#include "mm.h"
#include "user.h"

static const char *cmdline;

/* ---- timer ---- */
enum { TIMER_TICKS, TIMER_SPIN };
static volatile int timer_mode;
static volatile u64 ticks, ticks_target;
static u64 tick_last_ns;

static void timer_handler(evtchn_port_t port, struct regs *r)
{
    (void)port; (void)r;
    if (ticks_target && ticks >= ticks_target)
        return;                   /* extra ticks before the timer is stopped */
    ticks++;
    if (timer_mode == TIMER_TICKS) {
        tick_last_ns = monotonic_ns();
        printk("timer: tick %lu at %lu\n", ticks, tick_last_ns);
    } else {
        printk("spin %lu\n", ticks);
    }
}

static long set_periodic(u64 period_ms)
{
    struct vcpu_set_periodic_timer p = { .period_ns = period_ms * 1000000UL };
    return HYPERVISOR_vcpu_op(VCPUOP_set_periodic_timer, 0, &p);
}

static void stop_periodic(void)
{
    long rc = HYPERVISOR_vcpu_op(VCPUOP_stop_periodic_timer, 0, NULL);
    if (rc) panic("stop_periodic_timer failed: %ld", rc);
}

/* Block until `n` ticks (n == 0: forever). Returns with events masked. */
static void wait_ticks(u64 n)
{
    for (;;) {
        irq_disable();
        if (n && ticks >= n)
            break;
        sched_block();     /* unmasks events atomically with blocking */
    }
}

static void timer_test(void)
{
    u64 period = cmdline_u64(cmdline, "period_ms", 10);
    u64 n = cmdline_u64(cmdline, "ticks", 5);
    if (period == 0) period = 10;

    long port = bind_virq(VIRQ_TIMER, 0, timer_handler);
    if (port < 0) panic("bind_virq(VIRQ_TIMER) failed: %ld", port);

    timer_mode = TIMER_TICKS;
    ticks = 0;
    ticks_target = n;
    u64 t0 = monotonic_ns();
    long rc = set_periodic(period);
    if (rc) panic("set_periodic_timer failed: %ld", rc);
    rc = unmask_evtchn(port);
    if (rc) panic("evtchn unmask failed: %ld", rc);
    irq_enable();
    wait_ticks(n);
    stop_periodic();
    irq_enable();
    printk("timer: %lu ticks in %lu ns\n", ticks, tick_last_ns - t0);
}

/* ---- privileged instructions ---- */
static int gp_expected;

static int gp_handler(struct regs *r)
{
    if (!gp_expected || regs_from_user(r))
        return 0;
    u64 rip = r->rip;
    u8 op = *(u8 *)rip;
    if ((op != 0xfa && op != 0xf4) || !fixup_skip(r))
        return 0;
    printk("trap: #GP at 0x%lx (privileged instruction)\n", rip);
    return 1;
}

static void gp_test(void)
{
    set_trap_handler(13, gp_handler);
    gp_expected = 1;
    probe_cli();
    probe_hlt();
    gp_expected = 0;
    printk("gp: handled\n");
}

/* ---- spin mode ---- */
static void spin(u64 n)
{
    timer_mode = TIMER_SPIN;
    ticks = 0;
    ticks_target = n;
    long rc = set_periodic(cmdline_u64(cmdline, "period_ms", 10) ?: 10);
    if (rc) panic("set_periodic_timer failed: %ld", rc);
    wait_ticks(n);
    stop_periodic();
    irq_enable();
}

/* ---- console input echo (cmdline echo=1) ---- */
#define ECHO_LINE_MAX 256

static void echo_line(char *line, unsigned len, u64 *lines)
{
    line[len] = 0;
    printk("echo: %s\n", line);
    (*lines)++;
}

/* Echo input lines until `quit` or `echo_timeout` seconds without input.
 * `\n`, `\r` and `\r\n` end a line; longer lines are echoed in pieces of
 * ECHO_LINE_MAX bytes. */
static void echo_loop(void)
{
    u64 timeout_s = cmdline_u64(cmdline, "echo_timeout", 30);
    char line[ECHO_LINE_MAX + 1], buf[128];
    unsigned len = 0;
    u64 lines = 0;
    int last_cr = 0;
    const char *why = "timeout";

    console_input_open();    /* port masked before "ready": input may come at once */
    printk("echo: ready\n");
    for (;;) {
        u64 deadline = timeout_s ? monotonic_ns() + timeout_s * 1000000000UL : 0;
        int rc = console_wait_input(deadline);
        if (rc < 0) { why = "no console ring"; break; }
        if (rc == 0) break;
        int n = console_read(buf, sizeof(buf));
        for (int i = 0; i < n; i++) {
            char c = buf[i];
            if (c == '\n' && last_cr) { last_cr = 0; continue; }
            last_cr = c == '\r';
            if (c == '\n' || c == '\r') {
                if (len == 4 && !memcmp(line, "quit", 4)) { why = "quit"; goto out; }
                echo_line(line, len, &lines);
                len = 0;
                continue;
            }
            if (len == ECHO_LINE_MAX) {
                echo_line(line, len, &lines);
                len = 0;
            }
            line[len++] = c;
        }
    }
    if (len) echo_line(line, len, &lines);       /* unterminated last line */
out:
    printk("echo: done lines=%lu reason=%s\n", lines, why);
}

void app_main(void)
{
    cmdline = (const char *)start_info->cmd_line;

    printk("aiovmm guest kernel 0.1 booting\n");
    printk("cmdline: %s\n", cmdline);
    long ver = HYPERVISOR_xen_version(XENVER_version, NULL);
    if (ver < 0) panic("xen_version failed: %ld", ver);
    printk("xen version %lu.%lu\n", (u64)ver >> 16, (u64)ver & 0xffff);

    traps_init();

    printk("time: wallclock %lu\n", wallclock_sec());
    timer_test();

    user_setup();
    long status = user_run();
    if (status != 42) panic("user program exit status %ld", status);
    printk("user: round trip ok\n");

    gp_test();

    const char *sp = cmdline;
    int has_spin = 0;
    for (; *sp; sp++)
        if (!strncmp(sp, "spin=", 5) && (sp == cmdline || sp[-1] == ' '))
            has_spin = 1;
    if (has_spin)
        spin(cmdline_u64(cmdline, "spin", 0));

    if (cmdline_u64(cmdline, "echo", 0))
        echo_loop();

    poweroff();
}
