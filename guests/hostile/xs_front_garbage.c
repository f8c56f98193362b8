/* Frontend nodes the toolstack reads back for display: this guest writes what is not a
 * number into its vbd's and vif's frontend directories (ring-ref, event-channel,
 * tx-/rx-ring-ref): a word, 2000 digits, a superscript digit, a lone sign. The backends refuse to
 * connect; `list` and the device lists must still answer (those values shown as -1).
 *
 * Prints `result <node> <rc>` per write, then `ready`, then idles up to 60 s. */
#include "hostile.h"
#include "xenbus.h"
#include "time.h"

static char big[2001], path[96], ev[64];

static void put(const char *node, const char *value)
{
    int rc = xenbus_write(XBT_NIL, node, value);
    result(node, rc);
}

void app_main(void)
{
    int rc = xenbus_init();
    if (rc) panic("xenbus_init %d", rc);
    for (unsigned i = 0; i < sizeof(big) - 1; i++) big[i] = '9';
    put("device/vbd/51712/ring-ref", "garbage");
    put("device/vbd/51712/event-channel", big);
    put("device/vbd/51712/state", "3");              /* Initialised: the backend reads them */
    put("device/vif/0/tx-ring-ref", "\xc2\xb2");      /* superscript two: isdigit(), not int() */
    put("device/vif/0/rx-ring-ref", big);
    put("device/vif/0/event-channel", "-");
    printk("ready\n");
    u64 until = monotonic_ns() + 60000000000UL;
    while (monotonic_ns() < until)
        xenbus_wait_event(NULL, path, sizeof(path), ev, sizeof(ev), until);
    poweroff();
}
