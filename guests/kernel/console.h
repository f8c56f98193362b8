/* Console output: the xencons ring (start_info console page + event
 * channel) once console_init() has switched to it, else
 * HYPERVISOR_console_io(CONSOLEIO_write). */
#ifndef AIOVMM_CONSOLE_H
#define AIOVMM_CONSOLE_H

#include "os.h"

/* Called by start_kernel(): cmdline `console=ring` (default) switches to
 * the ring, `console=hypercall` keeps console_io. */
void console_init(void);
/* Back to console_io for good (panic paths), after draining the ring. */
void console_use_hypercall(void);
/* Wait (bounded) until the backend has consumed everything in the ring. */
void console_flush(void);
int console_is_ring(void);

void console_write(const char *s, unsigned len);
int printk(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
