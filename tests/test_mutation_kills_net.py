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
