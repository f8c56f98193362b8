#include <stdarg.h>
#include "console.h"
#include "hypercall.h"
#include "lib.h"

void console_write(const char *s, unsigned len)
{
    if (len)
        HYPERVISOR_console_io(CONSOLEIO_write, len, s);
}

/* Formats into a stack buffer and writes it with one hypercall, so one
 * printk of a complete line reaches the console as one write. */
int printk(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(buf) - 1) n = sizeof(buf) - 1;
    console_write(buf, (unsigned)n);
    return n;
}
