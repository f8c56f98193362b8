/* Freestanding string, formatting and command-line helpers. */
#ifndef AIOVMM_LIB_H
#define AIOVMM_LIB_H

#include <stdarg.h>
#include "os.h"

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int strncmp(const char *a, const char *b, size_t n);

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Look up "key=<decimal>" in a space-separated command line. */
u64 cmdline_u64(const char *cmdline, const char *key, u64 dflt);
/* Copy the value of "key=<word>" into buf (NUL-terminated); 1 if found. */
int cmdline_str(const char *cmdline, const char *key, char *buf, size_t size);
int strcmp(const char *a, const char *b);
/* Parse a decimal (optionally signed) number; returns chars consumed (0 = none). */
int parse_long(const char *s, long *out);

#endif
