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
void console_resume(void);   /* new console event channel after a suspend */
int console_is_ring(void);

void console_write(const char *s, unsigned len);

/* Input from the host: the ring's in[] (mapped on first use under
 * console=hypercall too; output stays on console_io there). */
/* Consume up to `len` available bytes into buf without blocking; returns the
 * count (0: nothing available), or -1 if the domain has no console ring.
 * Publishes in_cons and notifies the console event channel. */
int console_read(char *buf, int len);
/* Block (SCHEDOP_poll on the console port) until input is available or
 * system time reaches `deadline_ns` (0 = no deadline). Returns 1 if input is
 * available, 0 on timeout, -1 if there is no console ring. */
int console_wait_input(u64 deadline_ns);
/* Map the input ring and mask its port (we poll it): before announcing that input is
 * awaited, so input arriving at once is not an upcall nobody handles. 0, or -1: no ring. */
int console_input_open(void);
int printk(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
