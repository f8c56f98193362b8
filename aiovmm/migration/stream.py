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

import array
import enum
import json
from dataclasses import dataclass
import struct

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
    # Optional records (bit 31): a receiver that does not know one skips it (libxc's
    # restore: "Ignoring optional record"), so a stream with them is still Xen's.
    stop_and_copy = 0x8000A001          # aiovmm: the sender's guest is suspending now (live)
    precopy_round_end = 0x8000A002      # aiovmm: a pre-copy round's pages all sent (live)


REC_OPTIONAL = 0x80000000
MAX_OPTIONAL_LEN = 1 << 16              # an unknown optional record is skipped up to this


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
    Rec.stop_and_copy: 0,
    Rec.precopy_round_end: 0,
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


def page_data_header(pfns: list[int], nr_data: int) -> bytes:
    """Record header, count and pfn[] of a PAGE_DATA record whose `nr_data` pages follow
    (written separately, straight from guest memory). `pfns` carry their type bits."""
    body_len = PAGE_DATA_HDR.size + 8 * len(pfns) + PAGE_SIZE * nr_data
    return (RH.pack(Rec.page_data, body_len) + PAGE_DATA_HDR.pack(len(pfns), 0)
            + array.array("Q", pfns).tobytes())


def vcpu_record(rtype: Rec, vcpu: int, content: bytes) -> bytes:
    return record(rtype, VCPU_HDR.pack(vcpu, 0) + content)


@dataclass(frozen=True)
class PfnRun:
    """A PAGE_DATA record's pfn[] that is `count` consecutive pfns from `first`, all of
    type `type` (notab or XALLOC)."""
    first: int
    count: int
    type: int


def uniform_run(raw: array.array, nr_pages: int) -> tuple[int, int] | None:
    """(type, first pfn) if `raw` (pfn[] entries) is consecutive pfns below `nr_pages`, all
    notab or all XALLOC, reserved bits clear; else None (the entry-by-entry checks run)."""
    n = len(raw)
    first = raw[0]
    t = first >> TYPE_SHIFT
    if t not in (PfnType.notab, PfnType.xalloc):
        return None
    pfn0 = first & PFN_MASK
    if first & PFN_RESERVED or pfn0 + n > nr_pages:
        return None
    if raw != array.array("Q", range(first, first + n)):
        return None
    return t, pfn0


class Source:
    """Where a stream comes from: `read_into(view)` fills as much of `view` as it can and
    returns the byte count (0 at the end). Files (files.py) and sockets implement it."""

    async def read_into(self, view: memoryview) -> int:
        raise NotImplementedError


class BufferedSource(Source):
    """Small reads (record headers, pfn[]) from a buffer filled by one large read; large
    reads (page runs) straight into their destination when the buffer is empty. Each
    read of the underlying source may cost a thread hop (aiofiles) or a syscall."""

    def __init__(self, src: Source, size: int = 1 << 20) -> None:
        self._src = src
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._pos = self._end = 0

    async def read_into(self, view: memoryview) -> int:
        if self._pos == self._end:
            if len(view) >= len(self._buf) // 4:
                return await self._src.read_into(view)
            self._pos, self._end = 0, await self._src.read_into(self._view)
            if self._end <= 0:
                self._end = 0
                return 0
        n = min(len(view), self._end - self._pos)
        view[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n


class BytesSource(Source):
    """A stream held in memory (tests, the fuzzer)."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    async def read_into(self, view: memoryview) -> int:
        n = min(len(view), len(self._data) - self._pos)
        view[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


class Reader:
    """Reads a stream from a Source, exactly: a short read is a StreamError."""

    def __init__(self, src: Source) -> None:
        self._src = src
        self.offset = 0

    async def into(self, view: memoryview) -> None:
        """Fill `view` completely (page data goes straight into guest frames)."""
        got, n = 0, len(view)
        while got < n:
            k = await self._src.read_into(view[got:])
            if k <= 0:
                raise StreamError(f"stream truncated at byte {self.offset + got} "
                                  f"(wanted {n - got} more bytes)")
            got += k
        self.offset += n

    async def exactly(self, n: int) -> bytes:
        buf = bytearray(n)
        await self.into(memoryview(buf))
        return bytes(buf)

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
        except RecursionError:               # [[[[... deeper than the parser recurses
            raise StreamError("xl header: configuration is nested too deeply") from None
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

    async def record_header(self) -> tuple[Rec, int]:
        """The next libxc record's (type, length); the length is checked against the
        type's maximum before anything of the body is read. An optional record of a type
        not known here is skipped (at most MAX_OPTIONAL_LEN bytes), as libxc does."""
        while True:
            rtype, length = RH.unpack(await self.exactly(RH.size))
            try:
                rt = Rec(rtype)
                break
            except ValueError:
                if not rtype & REC_OPTIONAL or length > MAX_OPTIONAL_LEN:
                    raise StreamError(f"libxc record type {rtype:#x} at byte {self.offset - 8} "
                                      "is not supported") from None
                await self.exactly(length + _pad(length))
        if length > MAX_LEN[rt]:
            raise StreamError(f"{rt.name} record of {length} bytes (at most {MAX_LEN[rt]})")
        return rt, length

    async def body(self, rt: Rec, length: int) -> bytes:
        raw = await self.exactly(length + _pad(length))
        if any(raw[length:]):
            raise StreamError(f"{rt.name} record: non-zero padding")
        return raw[:length]

    async def record(self) -> tuple[Rec, bytes]:
        """The next libxc record: (type, body without padding)."""
        rt, length = await self.record_header()
        return rt, await self.body(rt, length)

    async def page_data_pfns(self, length: int, nr_pages: int) -> "list[tuple[int, int]] | PfnRun":
        """The count and pfn[] of a PAGE_DATA record of `length` bytes: [(pfn, type)], or a
        PfnRun when they are consecutive pfns of one type (plain data or XALLOC: what most
        records are), checked (count within the record, pfns within the domain, types valid, pages
        present exactly for the pfns that have data) before any page is read."""
        if length < PAGE_DATA_HDR.size:
            raise StreamError("page_data record shorter than its header")
        count, res = PAGE_DATA_HDR.unpack(await self.exactly(PAGE_DATA_HDR.size))
        if res:
            raise StreamError("page_data record: reserved field set")
        if count == 0 or count > PAGES_PER_RECORD:
            raise StreamError(f"page_data record with {count} pfns (1..{PAGES_PER_RECORD})")
        if length < PAGE_DATA_HDR.size + 8 * count:
            raise StreamError(f"page_data record: {count} pfns do not fit in {length} bytes")
        raw = array.array("Q", await self.exactly(8 * count))
        run = uniform_run(raw, nr_pages)
        if run is not None:                  # one type, consecutive pfns: checked at C speed
            t, first = run
            ndata = 0 if t == PfnType.xalloc else count
            want = PAGE_DATA_HDR.size + 8 * count + PAGE_SIZE * ndata
            if length != want:
                raise StreamError(f"page_data: {length} bytes for {count} pfns with {ndata} pages "
                                  f"(want {want}: bytes after the last page or fewer pages than pfns)")
            return PfnRun(first, count, t)
        out = []
        ndata = 0
        for e in raw:
            pfn, t = e & PFN_MASK, e >> TYPE_SHIFT
            if e & PFN_RESERVED:
                raise StreamError(f"page_data: reserved bits set in pfn entry {e:#x}")
            if pfn >= nr_pages:
                raise StreamError(f"page_data: pfn {pfn:#x} beyond the domain's {nr_pages} pages")
            if t not in (PfnType.xtab, PfnType.broken, PfnType.xalloc):
                if t & 0x7 > 4 or (t & 0x8 and not t & 0x7):
                    raise StreamError(f"page_data: invalid type {t:#x} for pfn {pfn:#x}")
                ndata += 1
            out.append((pfn, t))
        want = PAGE_DATA_HDR.size + 8 * count + PAGE_SIZE * ndata
        if length != want:
            raise StreamError(f"page_data: {length} bytes for {count} pfns with {ndata} pages "
                              f"(want {want}: bytes after the last page or fewer pages than pfns)")
        return out
