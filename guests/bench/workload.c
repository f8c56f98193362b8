/* Freestanding "kernel-like" mixed workload: sorting, hashing, list walking,
 * memset/memcpy. No guest dependency: also built natively (workload_native.c).
 * Copies and fills move 8 bytes at a time (stores are slow under Unicorn). */
typedef unsigned long u64; typedef unsigned int u32; typedef unsigned char u8;

u64 work(void);

#define N 20000
static u32 arr[N];
static u64 bufa[65536 / 8], bufb[65536 / 8];
struct node { struct node *next; u64 val; };
static struct node nodes[4096];

static void copy64(u64 *d, const u64 *s, u64 n) { while (n--) *d++ = *s++; }
static void fill64(u64 *d, u8 c, u64 n) { u64 v = c * 0x0101010101010101UL; while (n--) *d++ = v; }

static void qsort_u32(u32 *a, long lo, long hi)
{
    while (lo < hi) {
        u32 p = a[(lo + hi) / 2];
        long i = lo, j = hi;
        while (i <= j) {
            while (a[i] < p) i++;
            while (a[j] > p) j--;
            if (i <= j) { u32 t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (j - lo < hi - i) { qsort_u32(a, lo, j); lo = i; }
        else { qsort_u32(a, i, hi); hi = j; }
    }
}

u64 work(void)
{
    u64 h = 1469598103934665603UL, x = 88172645463325252UL;
    for (int rep = 0; rep < 3; rep++) {
        for (int i = 0; i < N; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; arr[i] = (u32)x; }
        qsort_u32(arr, 0, N - 1);
        for (int i = 0; i < N; i++) { h ^= arr[i]; h *= 1099511628211UL; }
        for (int i = 0; i < 4096; i++) { nodes[i].next = &nodes[(i * 2654435761u) % 4096]; nodes[i].val = i; }
        struct node *n = &nodes[0];
        for (int i = 0; i < 200000; i++) { h += n->val; n = n->next; }
        for (int i = 0; i < 8; i++) {
            fill64(bufa, (u8)i, sizeof bufa / 8);
            copy64(bufb, bufa, sizeof bufb / 8);
            h += ((const u8 *)bufb)[i * 100];
        }
    }
    return h;
}
