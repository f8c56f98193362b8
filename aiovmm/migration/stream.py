"""Xen's migration stream v2, the record layer (no domain state here).

Layers, outermost first (xen/docs/specs/libxl-migration-stream.pandoc and
libxc-migration-stream.pandoc; the checker is tools/python/scripts/verify-stream-v2):

- xl's save-file header: 32 magic bytes, then byte-order marker, mandatory flags (bit 1:
  stream v2), optional flags, optional-data length (4 x u32), then that much optional data
  (xl puts the domain configuration there; aiovmm a JSON object).
- libxl's header (big-endian ident "LibxlFmt", version 2, options) and libxl records, each
  (type u32, length u32, body padded to 8 bytes). LIBXC_CONTEXT has length 0 and is followed
  by a whole libxc stream; END closes the libxl stream.
- libxc's image header (big-endian: marker ~0, "XENF", version, options, reserved), domain
  header (type x86 PV, page shift 12, Xen version), then records in the same (type, length,
  padded body) framing, ending with END.

The reader refuses anything it does not expect before acting on it: a length over the
record's maximum (no allocation from an untrusted count), a record type out of order,
non-zero reserved fields or padding, a truncated stream.
"""
from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Awaitable, Callable

PAGE_SIZE = 4096

XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"
XL_BYTEORDER = 0x01020304
XL_MANDATORY_STREAMV2 = 1 << 1
XL_HDR = struct.Struct("<IIII")
XL_MAX_CONFIG = 1 << 20

LIBXL_IDENT = 0x4C6962786C466D74            # "LibxlFmt"
LIBXL_VERSION = 2
LIBXL_HDR = struct.Struct(">QII")

IHDR = struct.Struct(">QIIHHI")
IHDR_MARKER = 0xFFFFFFFFFFFFFFFF
IHDR_IDENT = 0x58454E46                     # "XENF"
IHDR_VERSION = 2
DHDR = struct.Struct("<IHHII")
DHDR_TYPE_X86_PV = 1
XEN_MAJOR, XEN_MINOR = 4, 17                # the format of Xen 4.17's tools

RH = struct.Struct("<II")


class LibxlRec(enum.IntEnum):
    end = 0
    libxc_context = 1
    emulator_xenstore_data = 2
    emulator_context = 3
    checkpoint_end = 4
    checkpoint_state = 5


class Rec(enum.IntEnum):
    """libxc record types."""
    end = 0
    page_data = 1
    x86_pv_info = 2
    x86_pv_p2m_frames = 3
    x86_pv_vcpu_basic = 4
    x86_pv_vcpu_extended = 5
    x86_pv_vcpu_xsave = 6
    shared_info = 7
    x86_tsc_info = 8
    x86_pv_vcpu_msrs = 12


class PfnType(enum.IntEnum):
    """PAGE_DATA pfn[] bits 60-63: XEN_DOMCTL_PFINFO_* >> 28."""
    notab = 0x0
    l1 = 0x1
    l2 = 0x2
    l3 = 0x3
    l4 = 0x4
    pinned = 0x8          # or-ed with l1..l4
    broken = 0xD
    xalloc = 0xE
    xtab = 0xF


PFN_MASK = (1 << 52) - 1
PFN_RESERVED = ((1 << 60) - 1) & ~PFN_MASK
TYPE_SHIFT = 60
PAGES_PER_RECORD = 1024        # what libxc sends per PAGE_DATA record (MAX_BATCH_SIZE)

X86_PV_INFO = struct.Struct("<BBHI")
P2M_FRAMES_HDR = struct.Struct("<II")
VCPU_HDR = struct.Struct("<II")
TSC_INFO = struct.Struct("<IIQII")
PAGE_DATA_HDR = struct.Struct("<II")
MSR_ENTRY = struct.Struct("<IIQ")

# Largest body the reader accepts per record type (everything else is refused unread).
VCPU_BASIC_SIZE = 5168                 # struct vcpu_guest_context (x86_64)
MAX_LEN = {
    Rec.end: 0,
    Rec.page_data: PAGE_DATA_HDR.size + PAGES_PER_RECORD * (8 + PAGE_SIZE),
    Rec.x86_pv_info: X86_PV_INFO.size,
    Rec.x86_pv_p2m_frames: P2M_FRAMES_HDR.size + 8 * (1 << 16),   # P2M of up to 128 GiB
    Rec.x86_pv_vcpu_basic: VCPU_HDR.size + VCPU_BASIC_SIZE,
    Rec.x86_pv_vcpu_extended: VCPU_HDR.size + 128,
    Rec.x86_pv_vcpu_xsave: VCPU_HDR.size + 4096,
    Rec.x86_pv_vcpu_msrs: VCPU_HDR.size + 64 * MSR_ENTRY.size,
    Rec.shared_info: PAGE_SIZE,
    Rec.x86_tsc_info: TSC_INFO.size,
}


class StreamError(Exception):
    """The stream is not one aiovmm can restore (truncated, corrupt or hostile)."""


def _pad(n: int) -> int:
    return (-n) & 7


def record(rtype: int, body: bytes | bytearray | memoryview = b"") -> bytes:
    """One record in the shared (type, length, body, zero padding) framing."""
    return RH.pack(rtype, len(body)) + bytes(body) + b"\0" * _pad(len(body))


def xl_header(config: dict) -> bytes:
    data = json.dumps(config, sort_keys=True).encode() + b"\0"
    return XL_MAGIC + XL_HDR.pack(XL_BYTEORDER, XL_MANDATORY_STREAMV2, 0, len(data)) + data


def libxl_header() -> bytes:
    return LIBXL_HDR.pack(LIBXL_IDENT, LIBXL_VERSION, 0)


def libxc_headers() -> bytes:
    return (IHDR.pack(IHDR_MARKER, IHDR_IDENT, IHDR_VERSION, 0, 0, 0)
            + DHDR.pack(DHDR_TYPE_X86_PV, 12, 0, XEN_MAJOR, XEN_MINOR))


def page_data(pfns: list[int], pages: list[bytes | memoryview]) -> bytes:
    """`pfns` carry their type bits; `pages` one 4 KiB page per pfn that has data."""
    body = bytearray(PAGE_DATA_HDR.pack(len(pfns), 0))
    body += struct.pack(f"<{len(pfns)}Q", *pfns)
    for p in pages:
        body += p
    return record(Rec.page_data, body)


def vcpu_record(rtype: Rec, vcpu: int, content: bytes) -> bytes:
    return record(rtype, VCPU_HDR.pack(vcpu, 0) + content)


ReadExactly = Callable[[int], Awaitable[bytes]]


class Reader:
    """Reads a stream through `read(n)` (returns exactly n bytes or raises
    asyncio.IncompleteReadError / EOFError on a short read)."""

    def __init__(self, read: ReadExactly) -> None:
        self._read = read
        self.offset = 0

    async def exactly(self, n: int) -> bytes:
        try:
            data = await self._read(n)
        except EOFError:
            data = b""
        if len(data) != n:
            raise StreamError(f"stream truncated at byte {self.offset + len(data)} "
                              f"(wanted {n} more bytes)")
        self.offset += n
        return data

    async def xl_header(self) -> dict:
        if await self.exactly(len(XL_MAGIC)) != XL_MAGIC:
            raise StreamError("not an xl save file (bad magic)")
        order, mand, _opt, optlen = XL_HDR.unpack(await self.exactly(XL_HDR.size))
        if order != XL_BYTEORDER:
            raise StreamError("xl header: not a little-endian stream")
        if mand != XL_MANDATORY_STREAMV2:
            raise StreamError(f"xl header: mandatory flags {mand:#x} (only stream v2 is supported)")
        if optlen > XL_MAX_CONFIG:
            raise StreamError(f"xl header: configuration of {optlen} bytes (limit {XL_MAX_CONFIG})")
        raw = await self.exactly(optlen)
        try:
            cfg = json.loads(raw.rstrip(b"\0").decode())
        except (UnicodeDecodeError, ValueError) as e:
            raise StreamError(f"xl header: configuration is not JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise StreamError("xl header: configuration is not a JSON object")
        return cfg

    async def libxl_header(self) -> None:
        ident, version, options = LIBXL_HDR.unpack(await self.exactly(LIBXL_HDR.size))
        if ident != LIBXL_IDENT or version != LIBXL_VERSION or options != 0:
            raise StreamError(f"libxl header: ident {ident:#x} version {version} options "
                              f"{options:#x} (want LibxlFmt v2, little-endian, not legacy)")

    async def libxl_record(self, want: set[LibxlRec]) -> LibxlRec:
        rtype, length = RH.unpack(await self.exactly(RH.size))
        if rtype not in {int(w) for w in want}:
            raise StreamError(f"libxl record type {rtype:#x} where "
                              f"{'/'.join(w.name for w in want)} was expected")
        if length != 0:
            raise StreamError(f"libxl {LibxlRec(rtype).name} record of length {length} (want 0)")
        return LibxlRec(rtype)

    async def libxc_headers(self) -> None:
        marker, ident, version, options, r1, r2 = IHDR.unpack(await self.exactly(IHDR.size))
        if marker != IHDR_MARKER or ident != IHDR_IDENT:
            raise StreamError("libxc image header: bad marker or ident")
        if version != IHDR_VERSION:
            raise StreamError(f"libxc image header: version {version} (want {IHDR_VERSION})")
        if options or r1 or r2:
            raise StreamError("libxc image header: options/reserved bits set (only little-endian)")
        gtype, shift, r, _maj, _min = DHDR.unpack(await self.exactly(DHDR.size))
        if gtype != DHDR_TYPE_X86_PV or shift != 12 or r:
            raise StreamError(f"libxc domain header: type {gtype} page shift {shift} (want x86 PV, 12)")

    async def record(self) -> tuple[Rec, bytes]:
        """The next libxc record: (type, body without padding). Its length is checked
        against the type's maximum before anything is read."""
        rtype, length = RH.unpack(await self.exactly(RH.size))
        try:
            rt = Rec(rtype)
        except ValueError:
            raise StreamError(f"libxc record type {rtype:#x} at byte {self.offset - 8} "
                              "is not supported") from None
        if length > MAX_LEN[rt]:
            raise StreamError(f"{rt.name} record of {length} bytes (at most {MAX_LEN[rt]})")
        raw = await self.exactly(length + _pad(length))
        if any(raw[length:]):
            raise StreamError(f"{rt.name} record: non-zero padding")
        return rt, raw[:length]


def parse_page_data(body: bytes, nr_pages: int) -> list[tuple[int, int, memoryview | None]]:
    """[(pfn, type, page or None)]. Every count is checked against the body's length and
    every pfn against the domain's size before a page is looked at."""
    if len(body) < PAGE_DATA_HDR.size:
        raise StreamError("page_data record shorter than its header")
    count, res = PAGE_DATA_HDR.unpack_from(body)
    if res:
        raise StreamError("page_data record: reserved field set")
    if count == 0 or count > PAGES_PER_RECORD:
        raise StreamError(f"page_data record with {count} pfns (1..{PAGES_PER_RECORD})")
    if len(body) < PAGE_DATA_HDR.size + 8 * count:
        raise StreamError(f"page_data record: {count} pfns do not fit in {len(body)} bytes")
    raw = struct.unpack_from(f"<{count}Q", body, PAGE_DATA_HDR.size)
    out: list[tuple[int, int, memoryview | None]] = []
    view = memoryview(body)
    off = PAGE_DATA_HDR.size + 8 * count
    for e in raw:
        pfn, t = e & PFN_MASK, e >> TYPE_SHIFT
        if e & PFN_RESERVED:
            raise StreamError(f"page_data: reserved bits set in pfn entry {e:#x}")
        if pfn >= nr_pages:
            raise StreamError(f"page_data: pfn {pfn:#x} beyond the domain's {nr_pages} pages")
        base = t & 0x7
        if t in (PfnType.xtab, PfnType.broken, PfnType.xalloc):
            out.append((pfn, t, None))
            continue
        if t & 0x8 and not 1 <= base <= 4 or base > 4:
            raise StreamError(f"page_data: invalid type {t:#x} for pfn {pfn:#x}")
        if off + PAGE_SIZE > len(body):
            raise StreamError("page_data: fewer pages than pfns with data")
        out.append((pfn, t, view[off:off + PAGE_SIZE]))
        off += PAGE_SIZE
    if off != len(body):
        raise StreamError(f"page_data: {len(body) - off} bytes after the last page")
    return out
