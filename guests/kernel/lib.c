/* Freestanding string and formatting routines.
 * Copies and fills work 8 bytes at a time (stores are slow under the emulator). */
#include "lib.h"

void *memset(void *d, int c, size_t n)
{
    u8 *p = d;
    u64 pat = (u8)c * 0x0101010101010101UL;
    while (n && ((unsigned long)p & 7)) { *p++ = (u8)c; n--; }
    for (; n >= 8; n -= 8, p += 8)
        *(u64 *)p = pat;
    while (n--) *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    u8 *dp = d;
    const u8 *sp = s;
    if ((((unsigned long)dp ^ (unsigned long)sp) & 7) == 0) {
        while (n && ((unsigned long)dp & 7)) { *dp++ = *sp++; n--; }
    }
    for (; n >= 8; n -= 8, dp += 8, sp += 8)
        *(u64 *)dp = *(const u64 *)sp;
    while (n--) *dp++ = *sp++;
    return d;
}

void *memmove(void *d, const void *s, size_t n)
{
    u8 *dp = d;
    const u8 *sp = s;
    if (dp <= sp || dp >= sp + n)
        return memcpy(d, s, n);
    while (n--) dp[n] = sp[n];
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y) return *x - *y;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n]) n++;
    return n;
}

size_t strnlen(const char *s, size_t max)
{
    size_t n = 0;
    while (n < max && s[n]) n++;
    return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b) return (u8)*a - (u8)*b;
        if (!*a) return 0;
    }
    return 0;
}

/* ---- vsnprintf: %[-0][width][l|ll|z](d|i|u|x|X|p|s|c|%) ---- */

struct out { char *buf; size_t size, len; };

static void put(struct out *o, char c)
{
    if (o->len + 1 < o->size) o->buf[o->len] = c;
    o->len++;
}

static void put_num(struct out *o, u64 v, int base, int neg, int upper,
                    int width, int zero, int left)
{
    char tmp[24];
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    int n = 0;
    do { tmp[n++] = digits[v % base]; v /= base; } while (v);
    int len = n + neg;
    if (!left && !zero) for (; width > len; width--) put(o, ' ');
    if (neg) put(o, '-');
    if (!left && zero) for (; width > len; width--) put(o, '0');
    while (n) put(o, tmp[--n]);
    if (left) for (; width > len; width--) put(o, ' ');
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct out o = { buf, size, 0 };
    for (; *fmt; fmt++) {
        if (*fmt != '%') { put(&o, *fmt); continue; }
        fmt++;
        int zero = 0, left = 0, width = 0, lng = 0;
        for (;; fmt++) {
            if (*fmt == '0') zero = 1;
            else if (*fmt == '-') left = 1;
            else break;
        }
        while (*fmt >= '0' && *fmt <= '9') width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l' || *fmt == 'z') { lng = 1; fmt++; }
        switch (*fmt) {
        case 'd': case 'i': {
            s64 v = lng ? va_arg(ap, long) : va_arg(ap, int);
            put_num(&o, v < 0 ? -(u64)v : (u64)v, 10, v < 0, 0, width, zero, left);
            break;
        }
        case 'u': case 'x': case 'X': {
            u64 v = lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned int);
            put_num(&o, v, *fmt == 'u' ? 10 : 16, 0, *fmt == 'X', width, zero, left);
            break;
        }
        case 'p':
            put(&o, '0'); put(&o, 'x');
            put_num(&o, (u64)va_arg(ap, void *), 16, 0, 0, width, zero, left);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s) s = "(null)";
            int len = (int)strlen(s);
            if (!left) for (; width > len; width--) put(&o, ' ');
            while (*s) put(&o, *s++);
            if (left) for (; width > len; width--) put(&o, ' ');
            break;
        }
        case 'c':
            put(&o, (char)va_arg(ap, int));
            break;
        case '%':
            put(&o, '%');
            break;
        case 0:
            fmt--;
            break;
        default:
            put(&o, '%'); put(&o, *fmt);
            break;
        }
    }
    if (o.size) o.buf[o.len < o.size ? o.len : o.size - 1] = 0;
    return (int)o.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

u64 cmdline_u64(const char *cmd, const char *key, u64 dflt)
{
    size_t klen = strlen(key);
    const char *p = cmd;
    while (*p) {
        while (*p == ' ') p++;
        if (!strncmp(p, key, klen) && p[klen] == '=') {
            const char *q = p + klen + 1;
            if (*q < '0' || *q > '9') return dflt;
            u64 v = 0;
            while (*q >= '0' && *q <= '9') v = v * 10 + (u64)(*q++ - '0');
            return v;
        }
        while (*p && *p != ' ') p++;
    }
    return dflt;
}

int cmdline_str(const char *cmd, const char *key, char *buf, size_t size)
{
    size_t klen = strlen(key);
    const char *p = cmd;
    while (*p) {
        while (*p == ' ') p++;
        if (!strncmp(p, key, klen) && p[klen] == '=') {
            const char *q = p + klen + 1;
            size_t n = 0;
            while (q[n] && q[n] != ' ') n++;
            if (size) {
                if (n > size - 1) n = size - 1;
                memcpy(buf, q, n);
                buf[n] = 0;
            }
            return 1;
        }
        while (*p && *p != ' ') p++;
    }
    return 0;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b) { a++; b++; }
    return (u8)*a - (u8)*b;
}

int parse_long(const char *s, long *out)
{
    const char *p = s;
    int neg = 0;
    if (*p == '-') { neg = 1; p++; }
    if (*p < '0' || *p > '9') return 0;
    long v = 0;
    while (*p >= '0' && *p <= '9') v = v * 10 + (*p++ - '0');
    *out = neg ? -v : v;
    return (int)(p - s);
}
