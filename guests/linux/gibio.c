/* gibio: move and checksum large amounts of data in the Linux test guests with few system
 * calls (1 MiB per read/write: busybox's md5sum reads 4 KiB at a time, and every guest system
 * call is a round trip through the hypervisor). Built by guests/linux/build.py.
 *
 *   gibio gen MiB [FILE]   MiB of fresh random data (getrandom) to FILE, opened O_DIRECT,
 *                          or to stdout; "<sha256> <bytes>" of it to stderr
 *   gibio sum [FILE]       read FILE with O_DIRECT (or stdin) to its end; "<sha256> <bytes>"
 *                          to stdout
 *
 * SHA-256 as FIPS 180-4 specifies it; its constants are computed at start (the fractional
 * parts of the square and cube roots of the first primes), the host checks the digests with
 * Python's hashlib. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#define CHUNK (1 << 20)

static uint32_t K[64], H[8];
static uint64_t total;
static unsigned char tail[64];
static size_t ntail;

/* floor(p^(1/k) * 2^32) mod 2^32 for k = 2, 3: the first 32 bits of the root's fractional
 * part, by bisection on integers (exact, no floating point). */
static uint32_t root_bits(unsigned p, int k)
{
    unsigned __int128 want = (unsigned __int128)p << (32 * k), lo = 0, hi = (unsigned __int128)1 << 40;
    while (lo + 1 < hi) {
        unsigned __int128 mid = (lo + hi) / 2, pw = mid * mid * (k == 3 ? mid : 1);
        if (pw <= want)
            lo = mid;
        else
            hi = mid;
    }
    return (uint32_t)lo;
}

static void constants(void)
{
    int n = 0;
    for (unsigned p = 2; n < 64; p++) {
        int prime = 1;
        for (unsigned d = 2; d * d <= p; d++)
            if (p % d == 0)
                prime = 0;
        if (!prime)
            continue;
        K[n] = root_bits(p, 3);
        if (n < 8)
            H[n] = root_bits(p, 2);
        n++;
    }
}

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void block(const unsigned char *p)
{
    uint32_t w[64], a = H[0], b = H[1], c = H[2], d = H[3], e = H[4], f = H[5], g = H[6], h = H[7];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    H[0] += a; H[1] += b; H[2] += c; H[3] += d; H[4] += e; H[5] += f; H[6] += g; H[7] += h;
}

static void update(const unsigned char *p, size_t n)
{
    total += n;
    if (ntail) {
        size_t k = 64 - ntail < n ? 64 - ntail : n;
        memcpy(tail + ntail, p, k);
        ntail += k, p += k, n -= k;
        if (ntail < 64)
            return;
        block(tail);
        ntail = 0;
    }
    for (; n >= 64; p += 64, n -= 64)
        block(p);
    memcpy(tail, p, n);
    ntail = n;
}

static void report(FILE *out)
{
    uint64_t bits = total * 8;
    unsigned char pad[72] = { 0x80 };
    size_t padlen = (ntail < 56 ? 56 : 120) - ntail;
    uint64_t saved = total;
    for (int i = 0; i < 8; i++)
        pad[padlen + i] = (unsigned char)(bits >> (56 - 8 * i));
    update(pad, padlen + 8);
    for (int i = 0; i < 8; i++)
        fprintf(out, "%08x", H[i]);
    fprintf(out, " %llu\n", (unsigned long long)saved);
    fflush(out);
}

static int fail(const char *what)
{
    fprintf(stderr, "gibio: %s: %s\n", what, strerror(errno));
    return 1;
}

int main(int argc, char **argv)
{
    unsigned char *buf;
    constants();
    if (posix_memalign((void **)&buf, 4096, CHUNK))
        return 1;
    if (argc >= 3 && !strcmp(argv[1], "gen")) {
        long mib = atol(argv[2]);
        int fd = argc > 3 ? open(argv[3], O_WRONLY | O_DIRECT) : 1;
        if (fd < 0)
            return fail(argv[3]);
        for (long i = 0; i < mib; i++) {
            for (size_t got = 0; got < CHUNK;) {
                ssize_t k = getrandom(buf + got, CHUNK - got, 0);
                if (k < 0 && errno != EINTR)
                    return fail("getrandom");
                got += k > 0 ? (size_t)k : 0;
            }
            update(buf, CHUNK);
            for (size_t put = 0; put < CHUNK;) {
                ssize_t k = write(fd, buf + put, CHUNK - put);
                if (k < 0 && errno != EINTR)
                    return fail("write");
                put += k > 0 ? (size_t)k : 0;
            }
        }
        if (fd != 1 && (fsync(fd) < 0 || close(fd) < 0))
            return fail("fsync");
        report(stderr);
        return 0;
    }
    if (argc >= 2 && !strcmp(argv[1], "sum")) {
        int fd = argc > 2 ? open(argv[2], O_RDONLY | O_DIRECT) : 0;
        if (fd < 0)
            return fail(argv[2]);
        for (;;) {
            ssize_t k = read(fd, buf, CHUNK);
            if (k < 0 && errno == EINTR)
                continue;
            if (k < 0)
                return fail("read");
            if (k == 0)
                break;
            update(buf, (size_t)k);
        }
        report(stdout);
        return 0;
    }
    fprintf(stderr, "usage: gibio gen MiB [FILE] | gibio sum [FILE]\n");
    return 2;
}
