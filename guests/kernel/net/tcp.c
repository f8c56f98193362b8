/* A minimal TCP server: passive open on port 80 only, one HTTP/1.0 request
 * per connection, the response and our FIN sent in one segment (or, for
 * GET /stream/<bytes>, a generated body streamed in MSS-sized segments within
 * the peer's window, go-back-N on timeout: a download that outlives a
 * migration), our
 * unacknowledged segments retransmitted with an exponential timer, RST for
 * everything addressed to a closed port or an unknown connection.
 *
 * States used: SYN_RCVD -> ESTABLISHED -> (response sent) FIN_WAIT_1 ->
 * FIN_WAIT_2 / CLOSING -> TIME_WAIT, or ESTABLISHED with the peer's FIN
 * (CLOSE_WAIT) -> LAST_ACK. No out-of-order queue: a segment that does not
 * start at rcv_nxt is answered with a duplicate ACK and dropped. */
#include "net/ip.h"
#include "lib.h"

#define HTTP_PORT     80
#define TCP_CONNS     8
#define REQ_MAX       1024
#define RESP_MAX      536          /* fits the default MSS: one segment */
#define SEG_MAX       1400         /* stream segments (a LAN peer's MSS is 1460) */
#define STREAM_WND    (32 * SEG_MAX)
#define STREAM_MAX    (256u << 20)
#define TCP_RTO_NS    300000000UL
#define TCP_RETRIES   6
#define TIME_WAIT_NS  2000000000UL
#define IDLE_NS       30000000000UL /* a connection that never completes its request */

#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_PSH 0x08
#define TH_ACK 0x10

#define SEQ_LT(a, b)  ((s32)((a) - (b)) < 0)
#define SEQ_LEQ(a, b) ((s32)((a) - (b)) <= 0)

enum { CLOSED, SYN_RCVD, ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, CLOSING, TIME_WAIT, LAST_ACK };

struct tcb {
    int state;
    u32 rip;
    u16 rport;
    u32 iss, snd_una, snd_nxt;
    u32 rcv_nxt;
    int peer_fin;
    u64 rto, rto_deadline, deadline;   /* retransmission / state timeout */
    int retries;
    int req_len, resp_len;
    u32 stream_len;                    /* GET /stream/<n>: body bytes after resp */
    u32 snd_max;                       /* stream: next sequence number to transmit */
    u32 snd_wnd;                       /* stream: the peer's window */
    char req[REQ_MAX];
    char resp[RESP_MAX];
};

static struct tcb conns[TCP_CONNS];
struct tcp_stats tcp_stats;
static char info_name[64] = "aiovmm", info_ip[16] = "?";
static u32 iss_salt;

static void sanitize(char *dst, size_t size, const char *src)
{
    size_t i = 0;
    for (; src[i] && i + 1 < size; i++) {
        char c = src[i];
        dst[i] = (c < 0x20 || c > 0x7e || c == '<' || c == '>' || c == '&' || c == '"') ? '_' : c;
    }
    dst[i] = 0;
}

void httpd_set_info(const char *name, const char *ip)
{
    sanitize(info_name, sizeof(info_name), name);
    sanitize(info_ip, sizeof(info_ip), ip);
}

void tcp_init(void)
{
    memset(conns, 0, sizeof(conns));
    memset(&tcp_stats, 0, sizeof(tcp_stats));
    iss_salt = (u32)net_now_ns() * 2654435761u;
}

/* --- output --- */

static int tcp_send_raw(u32 dst, u16 sport, u16 dport, u32 seq, u32 ack, u8 flags,
                        u16 win, const void *data, int len, int mss_opt)
{
    static u8 buf[24 + SEG_MAX];
    int hl = mss_opt ? 24 : 20;
    if (len > SEG_MAX) return -1;
    put16(buf, sport);
    put16(buf + 2, dport);
    put32(buf + 4, seq);
    put32(buf + 8, ack);
    buf[12] = (u8)((hl / 4) << 4);
    buf[13] = flags;
    put16(buf + 14, win);
    put16(buf + 16, 0);
    put16(buf + 18, 0);
    if (mss_opt) {
        buf[20] = 2; buf[21] = 4;
        put16(buf + 22, ETH_MTU - 40);
    }
    if (len) memcpy(buf + hl, data, (size_t)len);
    u32 src = net_current()->ip;
    put16(buf + 16, csum_fold(csum_partial(buf, hl + len,
                                           l4_pseudo_sum(src, dst, IPPROTO_TCP, hl + len))));
    return ip_output(dst, IPPROTO_TCP, buf, hl + len);
}

static u16 rcv_wnd(const struct tcb *c)
{
    return c->state == ESTABLISHED || c->state == SYN_RCVD ? (u16)(REQ_MAX - c->req_len) : REQ_MAX;
}

static void send_ack(struct tcb *c)
{
    tcp_send_raw(c->rip, HTTP_PORT, c->rport, c->snd_nxt, c->rcv_nxt, TH_ACK, rcv_wnd(c), 0, 0, 0);
}

/* Byte `off` of a /stream body (tests compute the same). */
static u8 stream_byte(u32 off)
{
    return (u8)((off ^ (off >> 8) ^ (off >> 16)) * 167u + 13u);
}

/* Stream: transmit from snd_max while the peer's window (capped) allows; the
 * header from resp, then the body, then our FIN. `probe`: a zero window still
 * gets one byte (the retransmission timer's window probe). */
static void stream_push(struct tcb *c, int probe)
{
    static u8 seg[SEG_MAX];
    u32 base = c->iss + 1, data_end = c->snd_nxt - 1;
    u32 wnd = c->snd_wnd < STREAM_WND ? c->snd_wnd : STREAM_WND;
    if (!wnd && probe) wnd = 1;
    u32 limit = c->snd_una + wnd;
    if (SEQ_LT(c->snd_max, c->snd_una)) c->snd_max = c->snd_una;
    while (SEQ_LT(c->snd_max, c->snd_nxt)) {
        u32 n = data_end - c->snd_max;
        if (n > SEG_MAX) n = SEG_MAX;
        if (SEQ_LT(limit, c->snd_max + n)) n = limit - c->snd_max;
        int fin = c->snd_max + n == data_end;
        if (!n && !fin) break;                      /* window full */
        u32 off = c->snd_max - base;
        for (u32 i = 0; i < n; i++, off++)
            seg[i] = off < (u32)c->resp_len ? (u8)c->resp[off] : stream_byte(off - (u32)c->resp_len);
        u8 fl = TH_ACK | (fin ? TH_FIN | TH_PSH : 0);
        if (tcp_send_raw(c->rip, HTTP_PORT, c->rport, c->snd_max, c->rcv_nxt, fl, rcv_wnd(c),
                         seg, (int)n, 0) < 0)
            break;                                  /* tx ring full: ACK or timer resumes */
        c->snd_max += n + (u32)fin;
    }
}

/* (Re)send everything from snd_una: the SYN-ACK, or the rest of the
 * response followed by our FIN. */
static void send_pending(struct tcb *c)
{
    if (c->state == SYN_RCVD) {
        tcp_send_raw(c->rip, HTTP_PORT, c->rport, c->iss, c->rcv_nxt, TH_SYN | TH_ACK,
                     rcv_wnd(c), 0, 0, 1);
        return;
    }
    if (c->stream_len) {                       /* go back to the first unacked byte */
        c->snd_max = c->snd_una;
        stream_push(c, 1);
        return;
    }
    u32 off = c->snd_una - (c->iss + 1);       /* response bytes already acked */
    if (off > (u32)c->resp_len) off = (u32)c->resp_len;
    tcp_send_raw(c->rip, HTTP_PORT, c->rport, c->snd_una, c->rcv_nxt,
                 TH_ACK | TH_PSH | TH_FIN, rcv_wnd(c), c->resp + off, c->resp_len - (int)off, 0);
}

static void arm_rto(struct tcb *c, u64 now)
{
    c->rto = TCP_RTO_NS;
    c->retries = 0;
    c->rto_deadline = now + c->rto;
}

static void send_rst_for(u32 src, u16 sport, u16 dport, const u8 *th, int seglen)
{
    u8 flags = th[13];
    if (flags & TH_RST) return;
    tcp_stats.resets_sent++;
    if (flags & TH_ACK)
        tcp_send_raw(src, dport, sport, get32(th + 8), 0, TH_RST, 0, 0, 0, 0);
    else
        tcp_send_raw(src, dport, sport, 0, get32(th + 4) + (u32)seglen, TH_RST | TH_ACK, 0, 0, 0, 0);
}

/* --- HTTP --- */

static void build_response(struct tcb *c)
{
    char body[300];
    int blen = snprintf(body, sizeof(body),
        "<html><head><title>%s</title></head><body><h1>aiovmm guest %s</h1>"
        "<p>ip %s</p></body></html>\n", info_name, info_name, info_ip);
    if (blen >= (int)sizeof(body)) blen = sizeof(body) - 1;
    int head_only = c->req_len >= 5 && !memcmp(c->req, "HEAD ", 5);
    int get = c->req_len >= 4 && !memcmp(c->req, "GET ", 4);
    int n;
    long want;
    c->stream_len = 0;
    if (get && c->req_len > 12 && !memcmp(c->req + 4, "/stream/", 8)) {
        char num[12];
        int i = 0;
        for (; i < 11 && 12 + i < c->req_len && c->req[12 + i] >= '0' && c->req[12 + i] <= '9'; i++)
            num[i] = c->req[12 + i];
        num[i] = 0;
        if (i && parse_long(num, &want) && want > 0 && want <= (long)STREAM_MAX) {
            c->stream_len = (u32)want;
            c->resp_len = snprintf(c->resp, RESP_MAX, "HTTP/1.0 200 OK\r\nContent-Type: "
                                   "application/octet-stream\r\nContent-Length: %u\r\n"
                                   "Connection: close\r\n\r\n", c->stream_len);
            return;
        }
    }
    if (get || head_only) {
        n = snprintf(c->resp, RESP_MAX, "HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n"
                     "Content-Length: %d\r\nConnection: close\r\n\r\n", blen);
        if (!head_only && n + blen < RESP_MAX) {
            memcpy(c->resp + n, body, (size_t)blen);
            n += blen;
        }
    } else {
        n = snprintf(c->resp, RESP_MAX, "HTTP/1.0 501 Not Implemented\r\n"
                     "Content-Length: 0\r\nConnection: close\r\n\r\n");
    }
    if (n >= RESP_MAX) n = RESP_MAX - 1;
    c->resp_len = n;
}

static int request_complete(const struct tcb *c)
{
    if (c->peer_fin || c->req_len == REQ_MAX) return 1;
    for (int i = 0; i + 1 < c->req_len; i++) {
        if (c->req[i] == '\n' && c->req[i + 1] == '\n') return 1;
        if (i + 3 < c->req_len && !memcmp(c->req + i, "\r\n\r\n", 4)) return 1;
    }
    return 0;
}

static void respond(struct tcb *c, u64 now)
{
    build_response(c);
    c->snd_nxt = c->iss + 1 + (u32)c->resp_len + c->stream_len + 1;    /* data + FIN */
    c->state = c->peer_fin ? LAST_ACK : FIN_WAIT_1;
    tcp_stats.served++;
    send_pending(c);
    arm_rto(c, now);
}

/* --- input --- */

static void drop_conn(struct tcb *c) { c->state = CLOSED; }

void tcp_input(u32 src, u32 dst, const u8 *th, int len, int csum_ok)
{
    struct netif *nif = net_current();
    if (len < 20) { nif->stats.bad++; return; }
    int doff = (th[12] >> 4) * 4;
    if (doff < 20 || doff > len) { nif->stats.bad++; return; }
    if (!csum_ok && csum_fold(csum_partial(th, len, l4_pseudo_sum(src, dst, IPPROTO_TCP, len))) != 0) {
        nif->stats.bad++;
        return;
    }
    u16 sport = get16(th), dport = get16(th + 2);
    u32 seq = get32(th + 4), ack = get32(th + 8);
    u8 flags = th[13];
    const u8 *data = th + doff;
    int dlen = len - doff;
    int seglen = dlen + !!(flags & TH_SYN) + !!(flags & TH_FIN);
    u64 now = net_now_ns();
    if (!sport) { nif->stats.bad++; return; }
    if ((flags & TH_SYN) && (flags & (TH_FIN | TH_RST))) { nif->stats.bad++; return; }

    struct tcb *c = NULL;
    for (int i = 0; i < TCP_CONNS; i++)
        if (conns[i].state != CLOSED && conns[i].rip == src && conns[i].rport == sport &&
            dport == HTTP_PORT)
            c = &conns[i];

    /* A new SYN for a connection in TIME_WAIT reopens it. */
    if (c && c->state == TIME_WAIT && (flags & (TH_SYN | TH_ACK | TH_RST)) == TH_SYN &&
        SEQ_LT(c->rcv_nxt, seq)) {
        drop_conn(c);
        c = NULL;
    }
    if (!c) {
        if (dport == HTTP_PORT && (flags & (TH_SYN | TH_ACK | TH_RST)) == TH_SYN) {
            for (int i = 0; i < TCP_CONNS && !c; i++)
                if (conns[i].state == CLOSED) c = &conns[i];
            for (int i = 0; i < TCP_CONNS && !c; i++)
                if (conns[i].state == TIME_WAIT) c = &conns[i];
            if (!c) { nif->stats.ignored++; return; }   /* backlog full: let it retry */
            memset(c, 0, offsetof(struct tcb, req));
            c->state = SYN_RCVD;
            c->rip = src;
            c->rport = sport;
            c->rcv_nxt = seq + 1;
            c->iss = (u32)(now >> 10) + iss_salt + (src ^ ((u32)sport << 16)) * 2246822519u;
            c->snd_una = c->iss;
            c->snd_nxt = c->iss + 1;
            c->deadline = now + IDLE_NS;
            send_pending(c);
            arm_rto(c, now);
            return;
        }
        send_rst_for(src, sport, dport, th, seglen);
        return;
    }

    /* Acceptability (RFC 793 3.3, simplified to "starts inside the window"). */
    u32 wnd = REQ_MAX;
    int in_window = SEQ_LEQ(c->rcv_nxt, seq) ? SEQ_LT(seq, c->rcv_nxt + wnd)
                                             : SEQ_LT(c->rcv_nxt, seq + (u32)seglen);
    if (flags & TH_RST) {
        if (in_window || seq == c->rcv_nxt)
            drop_conn(c);
        return;
    }
    if (flags & TH_SYN) {
        if (c->state == SYN_RCVD && seq + 1 == c->rcv_nxt)
            send_pending(c);                  /* duplicate SYN: repeat SYN-ACK */
        else
            send_ack(c);                      /* challenge ACK (RFC 5961) */
        return;
    }
    if (!in_window && seglen) { send_ack(c); return; }
    if (!(flags & TH_ACK)) return;

    if (SEQ_LT(c->snd_nxt, ack)) {           /* acks something we never sent */
        if (c->state == SYN_RCVD) send_rst_for(src, sport, dport, th, seglen);
        else send_ack(c);
        return;
    }
    if (SEQ_LT(c->snd_una, ack)) {
        c->snd_una = ack;
        arm_rto(c, now);
    }
    c->snd_wnd = get16(th + 14);
    if (c->stream_len && c->state != SYN_RCVD)
        stream_push(c, 0);
    int all_acked = c->snd_una == c->snd_nxt;
    switch (c->state) {
    case SYN_RCVD:
        if (all_acked) { c->state = ESTABLISHED; tcp_stats.accepted++; }
        break;
    case FIN_WAIT_1:
        if (all_acked) { c->state = FIN_WAIT_2; c->deadline = now + IDLE_NS; }
        break;
    case CLOSING:
        if (all_acked) { c->state = TIME_WAIT; c->deadline = now + TIME_WAIT_NS; }
        break;
    case LAST_ACK:
        if (all_acked) { drop_conn(c); return; }
        break;
    }
    if (c->state == SYN_RCVD) return;

    /* Data and FIN, in order only. */
    if (seglen) {
        if (SEQ_LT(c->rcv_nxt, seq)) { send_ack(c); return; }   /* hole: dup ACK */
        u32 skip = c->rcv_nxt - seq;                /* already received prefix */
        if (skip > (u32)dlen) { send_ack(c); return; }          /* nothing new */
        int fin = !!(flags & TH_FIN);
        data += skip;
        dlen -= (int)skip;
        if (c->state == ESTABLISHED) {
            int room = REQ_MAX - c->req_len;
            int take = dlen < room ? dlen : room;
            memcpy(c->req + c->req_len, data, (size_t)take);
            c->req_len += take;
            c->rcv_nxt += (u32)take;
            if (take < dlen) fin = 0;               /* FIN not reached */
        } else if (c->state == FIN_WAIT_1 || c->state == FIN_WAIT_2) {
            c->rcv_nxt += (u32)dlen;                /* after our response: discard */
        } else {
            fin = 0;                                /* peer already closed */
        }
        if (fin && !c->peer_fin) {
            c->peer_fin = 1;
            c->rcv_nxt++;
            if (c->state == FIN_WAIT_1) c->state = CLOSING;
            else if (c->state == FIN_WAIT_2) {
                c->state = TIME_WAIT;
                c->deadline = now + TIME_WAIT_NS;
            }
        }
        if (c->state == ESTABLISHED && request_complete(c)) {
            respond(c, now);                        /* carries the ACK */
            return;
        }
        send_ack(c);
    }
}

u64 tcp_tick(u64 now)
{
    u64 next = 0;
    for (int i = 0; i < TCP_CONNS; i++) {
        struct tcb *c = &conns[i];
        if (c->state == CLOSED) continue;
        if (c->deadline && now >= c->deadline) {
            if (c->state != TIME_WAIT) {
                tcp_stats.aborted++;
                tcp_send_raw(c->rip, HTTP_PORT, c->rport, c->snd_nxt, 0, TH_RST, 0, 0, 0, 0);
            }
            drop_conn(c);
            continue;
        }
        if (c->snd_una != c->snd_nxt && c->state != TIME_WAIT && now >= c->rto_deadline) {
            if (++c->retries > TCP_RETRIES) {
                tcp_stats.aborted++;
                tcp_send_raw(c->rip, HTTP_PORT, c->rport, c->snd_nxt, 0, TH_RST, 0, 0, 0, 0);
                drop_conn(c);
                continue;
            }
            tcp_stats.retransmits++;
            c->rto *= 2;
            c->rto_deadline = now + c->rto;
            send_pending(c);
        }
        u64 t = c->deadline;
        if (c->snd_una != c->snd_nxt && c->state != TIME_WAIT && (!t || c->rto_deadline < t))
            t = c->rto_deadline;
        if (t && (!next || t < next)) next = t;
    }
    return next;
}
