/* Console output through HYPERVISOR_console_io(CONSOLEIO_write). */
#ifndef AIOVMM_CONSOLE_H
#define AIOVMM_CONSOLE_H

#include "os.h"

void console_write(const char *s, unsigned len);
int printk(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
