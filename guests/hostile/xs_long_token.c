/* Xenstore watch whose events do not fit a message: a watch on the guest's own home
 * (readable) with a token as long as the WATCH request allows (path + token + 2 NULs =
 * XENSTORE_PAYLOAD_MAX). The registration event fits; an event for any node below the home
 * (memory/target, control/shutdown written by the toolstack) would be longer than 4096
 * bytes. Xen's xenstored does not send such an event (send_event: "Don't try to send
 * over-long events"); the toolstack's write must succeed all the same.
 *
 * cmdline `utf8=1`: the token is also not UTF-8 (bytes 0x80-0xff), which xenstore
 * tokens may be (they are bytes to Xen).
 *
 * Prints `result watch <rc>`, `result initial <rc>` (the registration event), `ready`, then
 * waits (up to 60 s) for the toolstack: `result target <value>` whenever memory/target
 * changes; powers off when control/shutdown says so (the hypervisor may shut it down first:
 * this kernel advertises no control/feature-poweroff). */
#include "hostile.h"
#include "xenbus.h"
#include "time.h"

static char token[XENSTORE_PAYLOAD_MAX];
static char home[64], path[96], buf[64], ev_path[256], ev_token[64];

void app_main(void)
{
    xenbus_init_home(home, sizeof(home));
    int non_utf8 = cmdline_u64((const char *)start_info->cmd_line, "utf8", 0) != 0;

    size_t n = XENSTORE_PAYLOAD_MAX - strlen(home) - 2;
    for (size_t i = 0; i < n; i++)
        token[i] = non_utf8 ? (char)(0x80 + i % 0x7f) : (char)('a' + i % 26);
    token[n] = 0;
    int rc = xenbus_watch(home, token);
    result("watch", rc);
    rc = xenbus_wait_event(NULL, ev_path, sizeof(ev_path), ev_token, sizeof(ev_token), 0);
    result("initial", rc);
    printk("ready\n");

    snprintf(path, sizeof(path), "%s/memory/target", home);
    long last = -1;
    u64 deadline = monotonic_ns() + 60000000000UL;
    while (monotonic_ns() < deadline) {
        long target;
        if (xenbus_read_long(XBT_NIL, path, &target) == 0 && target != last) {
            result("target", target);
            last = target;
        }
        snprintf(path, sizeof(path), "%s/control/shutdown", home);
        if (xenbus_read(XBT_NIL, path, buf, sizeof(buf)) > 0 && !strcmp(buf, "poweroff"))
            break;
        snprintf(path, sizeof(path), "%s/memory/target", home);
        xenbus_wait_event(NULL, ev_path, sizeof(ev_path), ev_token, sizeof(ev_token),
                          monotonic_ns() + 200000000UL);
        xenbus_flush_events(NULL);
    }
    poweroff();
}
