"""Netback checks that bench/mutants.py found untested (issue 9, mutation testing).

complete_checksum parses a frame the guest wrote (NETTXF_csum_blank): every length and
offset in it is guest-controlled. Each case is checked against an independent RFC 1071
checksum computed here, and a refused frame must come back unchanged."""
from __future__ import annotations

import struct

import pytest

from backends.net.device import complete_checksum

SRC, DST = bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2))


def _sum(data: bytes) -> int:
    """RFC 1071 one's-complement sum of big-endian 16-bit words (folded, not inverted)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f">{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def frame(proto: int = 6, payload: bytes = b"hello, world", *, ihl: int = 5, version: int = 4,
          total: int | None = None, frag: int = 0, ethertype: int = 0x0800, vlan: bool = False,
          l4len: int | None = None, pad: int = 0) -> bytearray:
    """An Ethernet + IPv4 frame with a TCP (20-byte header) or UDP (8) segment whose
    checksum field holds a partial value (as a guest with csum_blank leaves it)."""
    if proto == 6:
        l4 = struct.pack(">HHIIBBHHH", 1234, 80, 1, 0, 5 << 4, 0x18, 512, 0xBEEF, 0) + payload
    elif proto == 17:
        l4 = struct.pack(">HHHH", 1234, 53, 8 + len(payload), 0xBEEF) + payload
    else:
        l4 = bytes(8) + payload
    if l4len is not None:
        l4 = l4[:l4len]
    opts = bytes(max(0, ihl - 5) * 4)
    iptotal = 4 * ihl + len(l4) if total is None else total
    ip = struct.pack(">BBHHHBBH4s4s", (version << 4) | ihl, 0, iptotal, 1, frag, 64, proto, 0,
                     SRC, DST)[:max(0, 4 * ihl) if ihl < 5 else 20] + opts
    eth = bytes(6) + bytes((0, 0x16, 0x3e, 1, 2, 3))
    eth += (struct.pack(">HH", 0x8100, 7) if vlan else b"") + struct.pack(">H", ethertype)
    return bytearray(eth + ip + l4 + bytes(pad))


def _l4_ok(f: bytearray, vlan: bool = False) -> bool:
    off = 18 if vlan else 14
    ihl = (f[off] & 15) * 4
    total = int.from_bytes(f[off + 2:off + 4], "big")
    proto = f[off + 9]
    seg = bytes(f[off + ihl:off + total])
    pseudo = bytes(f[off + 12:off + 20]) + bytes((0, proto)) + len(seg).to_bytes(2, "big")
    return _sum(pseudo + seg) == 0xFFFF


@pytest.mark.parametrize("proto", [6, 17])
@pytest.mark.parametrize("payload", [b"", b"x", b"hello, world" * 9])
@pytest.mark.parametrize("vlan", [False, True])
def test_checksum_completed(proto, payload, vlan):
    """Valid IPv4 TCP/UDP frames (no padding, minimal ones included, with a VLAN tag): the
    checksum is completed and verifies."""
    f = frame(proto, payload, vlan=vlan)
    assert complete_checksum(f)
    assert _l4_ok(f, vlan)


def test_checksum_with_ip_options_and_ethernet_padding():
    """IP options (ihl 6) and Ethernet padding after the IP packet: the segment is what the
    IP header's total length says, not the frame's end."""
    f = frame(6, b"abc", ihl=6, pad=20)
    assert complete_checksum(f)
    assert _l4_ok(f)


def test_tcp_header_exactly_up_to_its_checksum_field():
    """A TCP segment of exactly 18 bytes ends with its checksum field: completed."""
    f = frame(6, b"", l4len=18)
    assert complete_checksum(f)
    assert _l4_ok(f)


@pytest.mark.parametrize("case", [
    dict(ethertype=0x86DD), dict(ethertype=0x0806), dict(version=6), dict(version=5),
    dict(ihl=4), dict(ihl=0), dict(total=10), dict(total=19), dict(frag=1), dict(frag=0x2000),
    dict(frag=0x1FFF), dict(proto=1), dict(proto=47), dict(proto=6, l4len=17),
    dict(proto=6, l4len=10, pad=40), dict(proto=17, l4len=7), dict(proto=17, l4len=5, pad=40),
    dict(total=400), dict(total=0xFFFF), dict(total=20 + 32 + 1),
])
def test_checksum_refused_and_frame_unchanged(case):
    """Not IPv4 TCP/UDP, a bad version or header length, a total length shorter than the
    header or longer than the frame, a fragment, a segment too short to hold its checksum
    field: refused (Linux netback drops it), and the frame is not modified."""
    f = frame(**{"proto": 6, "payload": b"abcdefghijkl", **case})
    before = bytes(f)
    assert not complete_checksum(f)
    assert bytes(f) == before


@pytest.mark.parametrize("n", range(0, 14 + 20))
def test_truncated_frames_are_refused(n):
    """A frame cut anywhere inside its Ethernet or IP header: refused, no exception."""
    f = frame(6)[:n]
    before = bytes(f)
    assert not complete_checksum(f)
    assert bytes(f) == before


# -- the tx/rx rings: the real Netback on a parked domain's ring pages and grants ------------------
import asyncio  # noqa: E402
import socket  # noqa: E402

from aiovmm import Hypervisor, lab  # noqa: E402
from aiovmm.audit import audit  # noqa: E402
from aiovmm.grants import GTF_permit_access, GTF_readonly  # noqa: E402
from aiovmm.ring import BackRing, SRING_HDR  # noqa: E402
from backends.net.device import (MAX_PACKET, MAX_SLOTS, NETIF_RSP_ERROR, NETIF_RSP_NULL,  # noqa: E402
                                 NETIF_RSP_OKAY, NETTXF_extra_info, NETTXF_more_data, RING_SIZE,
                                 RX_SLOT, TX_SLOT, Netback, VifConfig, VifDisconnect, _TXREQ, _TXRSP)
from conftest import kernel  # noqa: E402

PKT = bytes(range(6)) * 2 + b"\x08\x00" + bytes(range(50))        # a 64-byte Ethernet frame


class Vif:
    """A parked domain as a netfront: tx ring page (spare 0), data pages granted read-only to
    the backend. The backend's tap is the host end of a SOCK_SEQPACKET pair (one frame per
    write, as a tap); `out` reads what it sent."""

    def __init__(self, hv) -> None:
        self.hv = hv
        self.d = lab.park(hv, kernel(), 16, "netfront")
        self.nb = Netback(self.d.dom, 0, VifConfig())
        self.tx_mfn, self.rx_mfn = self.d.spare[0], self.d.spare[1]
        self.nb.tx = BackRing(hv.mem.frame(self.tx_mfn), RING_SIZE, TX_SLOT)
        self.nb.rx = BackRing(hv.mem.frame(self.rx_mfn), RING_SIZE, RX_SLOT)
        self.host, self.out = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.host.setblocking(False)
        self.out.setblocking(False)
        for s in (self.host, self.out):          # room for a few hundred KiB, as a tap queue
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.nb.fd = self.host.fileno()
        self.prod = 0
        self.data_ref = 50
        for i in range(20):                     # grant refs 50.. -> spare data pages
            f = self.d.spare[2 + i]
            hv.mem.write(f << 12, PKT * 64)
            self.d.write_grant(50 + i, GTF_permit_access | GTF_readonly, 0, f)

    def close(self) -> None:
        self.host.close()
        self.out.close()

    def push(self, *reqs: tuple[int, int, int, int, int], publish: int | None = None) -> None:
        m = self.hv.mem.frame(self.tx_mfn)
        for r in reqs:
            _TXREQ.pack_into(m, SRING_HDR + (self.prod % RING_SIZE) * TX_SLOT, *r)
            self.prod += 1
        struct.pack_into("<I", m, 0, self.prod if publish is None else publish)

    def responses(self, n: int) -> list[tuple[int, int]]:
        m = self.hv.mem.frame(self.tx_mfn)
        return [_TXRSP.unpack_from(m, SRING_HDR + (i % RING_SIZE) * TX_SLOT) for i in range(n)]

    def sent(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.out.recv(70000))
            except BlockingIOError:
                return out


def with_vif(body):
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            v = Vif(hv)
            try:
                body(v)
            finally:
                v.close()
            assert audit(hv) == []
    asyncio.run(main())


def test_tx_empty_ring_is_quiet():
    """No request published: nothing happens (not a protocol error)."""
    def body(v):
        assert v.nb._process_tx() is False
        assert v.nb.stats.bad_indices == 0 and v.sent() == []
    with_vif(body)


def test_tx_index_overflow_disconnects():
    """req_prod more than a ring ahead of the responses: the vif disconnects."""
    def body(v):
        v.push(publish=RING_SIZE + 1)
        with pytest.raises(VifDisconnect):
            v.nb._process_tx()
    with_vif(body)


def test_tx_chain_past_req_prod_disconnects():
    """A packet whose NETTXF_more_data chain runs past req_prod is fatal (Linux netback's
    xenvif_count_requests), not waited for."""
    def body(v):
        v.push((50, 0, NETTXF_more_data, 1, 64), (51, 0, 0, 2, 0), publish=1)
        with pytest.raises(VifDisconnect):
            v.nb._process_tx()
        assert v.sent() == []
    with_vif(body)


def test_tx_extra_info_is_an_error_answered_null():
    """NETTXF_extra_info with no extra type negotiated: the packet is an error, its extra
    slot is consumed and answered NETIF_RSP_NULL; a later slot announcing extras makes its
    packet an error too. The next packet goes out."""
    def body(v):
        v.push((50, 0, NETTXF_extra_info, 1, 64), (0, 0, 0, 0xEE, 0),
               (51, 0, NETTXF_more_data, 3, 64), (52, 0, NETTXF_extra_info, 4, 0), (0, 0, 0, 0xEF, 0),
               (53, 0, 0, 5, 64))
        v.nb._process_tx()
        assert [s for _i, s in v.responses(6)] == [NETIF_RSP_ERROR, NETIF_RSP_NULL, NETIF_RSP_ERROR,
                                                   NETIF_RSP_ERROR, NETIF_RSP_NULL, NETIF_RSP_OKAY]
        assert v.sent() == [PKT]
    with_vif(body)


@pytest.mark.parametrize("nslots", [MAX_SLOTS, MAX_SLOTS + 1])
def test_tx_slot_limit(nslots):
    """A packet of MAX_SLOTS slots is sent; one slot more and it is an error (consumed whole,
    every slot answered)."""
    def body(v):
        reqs = [(50 + i % 20, 0, NETTXF_more_data, i, 4) for i in range(nslots)]
        reqs[-1] = (reqs[-1][0], 0, 0, nslots - 1, 4)
        total = 64 + 4 * (nslots - 1)
        reqs[0] = (50, 0, NETTXF_more_data, 0, total)
        v.push(*reqs)
        v.nb._process_tx()
        want = NETIF_RSP_OKAY if nslots <= MAX_SLOTS else NETIF_RSP_ERROR
        assert [s for _i, s in v.responses(nslots)] == [want] * nslots
        assert v.nb.tx.req_cons == nslots
        sent = v.sent()
        assert (len(sent), len(sent[0]) if sent else total) == (int(want == NETIF_RSP_OKAY), total)
    with_vif(body)


def test_tx_sizes():
    """The first slot's size is the packet's total: later slots adding up to more than it
    (a negative first part) or a total over 64 KiB - 1 are errors; a first slot carrying no
    data of its own (total == the rest) is a valid packet; so is one of exactly
    MAX_PACKET bytes."""
    def body(v):
        v.push((50, 0, NETTXF_more_data, 1, 30), (51, 0, 0, 2, 64))        # rest > total
        v.push((50, 0, NETTXF_more_data, 3, 64), (51, 0, 0, 4, 64))        # first carries 0
        v.nb._process_tx()
        assert [s for _i, s in v.responses(4)] == [NETIF_RSP_ERROR] * 2 + [NETIF_RSP_OKAY] * 2
        assert v.sent() == [PKT]
        for total in (MAX_PACKET, MAX_PACKET + 1):
            pages, last = divmod(total, 4096)
            sizes = [4096] * pages + ([last] if last else [])
            reqs = [(50 + k, 0, NETTXF_more_data, 10 + k, s) for k, s in enumerate(sizes)]
            reqs[0] = (50, 0, NETTXF_more_data, 10, total)
            reqs[-1] = (reqs[-1][0], 0, 0, reqs[-1][3], sizes[-1])
            if total > 0xFFFF:
                reqs = [(50, 0, NETTXF_more_data, 10, total & 0xFFFF)] + reqs[1:]
            start = v.prod
            v.push(*reqs)
            v.nb._process_tx()
            st = [s for _i, s in v.responses(v.prod)][start:]
            assert len(set(st)) == 1
            if total == MAX_PACKET:
                assert st[0] == NETIF_RSP_OKAY and len(v.sent()[0]) == MAX_PACKET
    with_vif(body)


def test_rx_waits_for_the_tap_and_checks_indices():
    """_process_rx does nothing while the tap has nothing to read (no read attempted); rx
    req_prod more than a ring ahead of the responses disconnects the vif."""
    def body(v):
        v.nb._tap_ready = False
        m = v.hv.mem.frame(v.rx_mfn)
        struct.pack_into("<I", m, 0, 1)
        v.out.send(PKT)
        assert v.nb._process_rx() is False
        assert v.nb.rx.req_cons == 0
        v.nb._tap_ready = True
        struct.pack_into("<I", m, 0, RING_SIZE + 1)
        with pytest.raises(VifDisconnect):
            v.nb._process_rx()
    with_vif(body)


@pytest.mark.parametrize("rx_copy", [None, "0", "2"])
def test_connect_requires_rx_copy(rx_copy):
    """A frontend that does not request rx-copy (the only receive mode offered, as Linux
    netback since flipping was removed) is refused before any ring is mapped; with
    request-rx-copy = 1 the same keys connect."""
    from aiovmm.xenbus import write_keys
    from backends.net import tap as taplib

    def body(v):
        nb, d = v.nb, v.d
        nb.tx = nb.rx = None
        store = v.hv.xenstore.store
        d.write_grant(8, GTF_permit_access, 0, v.tx_mfn)
        d.write_grant(9, GTF_permit_access, 0, v.rx_mfn)
        port = d.dom.evtchn.alloc_unbound(0)
        keys = {"tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": str(port)}
        if rx_copy is not None:
            keys["request-rx-copy"] = rx_copy
        write_keys(store, nb.front, keys, [f"n{d.domid}"])
        with pytest.raises(taplib.TapError):
            nb._connect()
        assert nb.tx is None and not nb._maps and 8 not in d.dom.grants.active
        write_keys(store, nb.front, {**keys, "request-rx-copy": "1"}, [f"n{d.domid}"])
        nb._connect()
        assert nb.tx is not None and nb.rx is not None
        nb._disconnect()
        assert not d.dom.grants.active
    with_vif(body)


def test_rate_limit_leaves_the_rest_on_the_rings():
    """A vif rate (1 kB/s, so only the 128 KiB minimum burst is available): a pass sends
    what the bucket allows and leaves the rest of the tx requests on the ring, and delivers
    only as many received frames into posted rx buffers; a timer is armed to come back."""
    from aiovmm.ratelimit import make_limit
    from backends.net.device import _RXREQ

    def body(v):
        nb, d = v.nb, v.d
        nb.set_rate(make_limit(1000, None, 100_000))
        reqs = [(50 + i % 20, 0, 0, i, 4096) for i in range(40)]
        v.push(*reqs)
        nb._process_tx()
        sent = v.sent()
        assert nb._tx_throttled and nb._throttle_handle is not None, (len(sent), nb.stats)
        assert 0 < len(sent) < 40 and nb.tx.req_cons == len(sent)
        nb._throttle_handle.cancel()
        nb._throttle_handle = None
        nb.rx_limit.set(make_limit(1000, None, 100_000))
        m = v.hv.mem.frame(v.rx_mfn)
        for i in range(40):
            d.write_grant(100 + i, GTF_permit_access, 0, d.spare[30 + i % 10])
            _RXREQ.pack_into(m, SRING_HDR + i * RX_SLOT, i, 100 + i)
        struct.pack_into("<I", m, 0, 40)
        for _ in range(40):
            v.out.send(PKT * 62)                              # 3968 bytes
        nb._tap_ready = True
        nb._process_rx()
        assert 0 < nb.rx.req_cons < 40 and nb.stats.rx_packets == nb.rx.req_cons
        nb._throttle_handle.cancel()
        nb._throttle_handle = None
    with_vif(body)
