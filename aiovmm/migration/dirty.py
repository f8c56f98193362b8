"""What the receiver of a live migration holds, page by page: a shadow copy of every page
as it was sent, and the pages that have changed since (the sender's dirty tracking).

Why a shadow copy and not the engines' dirty logs: KVM's dirty log sees only the vCPUs'
writes (not the hypervisor's or the backends' into guest frames) and Unicorn has none
(shared/research/unicorn/NOTES.md); a content comparison sees every writer on both
engines. Why not a digest per page (what this replaced): BLAKE2b costs 3-15 us a page,
memcmp against the shadow well under 1 us, and whole runs of unchanged pages compare in
one call. And the page is copied into the shadow first and sent from the copy, so what the
receiver gets is exactly what the next comparison starts from; a page written while it
was being sent (the guest runs on during pre-copy, a KVM vCPU in its own thread) is seen
as changed. Hashing the frame after sending it could miss exactly that write.

Cost: memory for the pages that hold data (an anonymous mapping of the guest's size: the
never-written frames, sent as XALLOC, are never touched in it and cost nothing).

Per pfn the shadow also keeps the stream type the page went with (table level and pinned
flag, or 0): a page whose type changed is sent again even if its bytes did not.
"""
from __future__ import annotations

import asyncio
import ctypes
import mmap
import re
import time
from typing import TYPE_CHECKING, Iterator

from ..abi import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from ..domain import Domain

_NONZERO = bytes([0]) + bytes([1]) * 255          # translate: 0 -> 0, anything else -> 1
_TABLE = bytes(range(5)) + bytes(251)             # PageType l1..l4 stay, every other type -> 0
_RUN = re.compile(rb"[^\x00]+")
CHUNK = 64                                         # pages compared in one call before page by page
SLICE_S = 0.001                                    # changed_yielding: loop turn after this long
# libc's memcmp on the two mappings directly: comparing slices of them would copy both.
_memcmp = ctypes.CDLL(None).memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int


def _flags(b: bytes | bytearray) -> int:
    return int.from_bytes(b, "little")


def _bytes(v: int, n: int) -> bytes:
    return v.to_bytes(n, "little")


class Shadow:
    """Pages as the receiver has them (indexed by pfn), and which ones differ now."""

    def __init__(self, nr_pages: int) -> None:
        self.nr = nr_pages
        self.buf = mmap.mmap(-1, nr_pages << PAGE_SHIFT, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.buf)
        self._anchor = ctypes.c_char.from_buffer(self.buf)     # its address, for memcmp
        self.address = ctypes.addressof(self._anchor)
        self.sent = bytearray(nr_pages)    # 1: the receiver has this pfn (as in the shadow)
        self.data = bytearray(nr_pages)    # 1: its shadow page may be non-zero
        self.stype = bytearray(nr_pages)   # stream type it went with (level | pinned << 3)
        self._ident: list[int] = []        # p2m of a domain on consecutive frames
        self._ones = _flags(b"\1" * nr_pages)

    def close(self) -> None:
        """Unmap now if nothing else holds a view of the copy (a transport torn down by a
        failed migration may still queue some: then it goes with the last of them)."""
        del self._anchor
        try:
            self.view.release()
            self.buf.close()
        except BufferError:
            pass

    # -- what was sent -----------------------------------------------------------------------
    def take(self, dom: "Domain", pfn: int, mfn: int, n: int = 1) -> memoryview:
        """Copy n pages (consecutive pfns on consecutive frames) into the shadow; returns the
        copy, which is what goes out."""
        src = dom.mem.view[mfn << PAGE_SHIFT:(mfn + n) << PAGE_SHIFT]
        dst = self.view[pfn << PAGE_SHIFT:(pfn + n) << PAGE_SHIFT]
        dst[:] = src
        self.sent[pfn:pfn + n] = b"\1" * n
        self.data[pfn:pfn + n] = b"\1" * n
        self.stype[pfn:pfn + n] = stream_types(dom, mfn, n)
        return dst

    def zero(self, dom: "Domain", pfn: int, mfn: int) -> None:
        """pfn went as XALLOC (no data): the receiver has zeros there."""
        if self.data[pfn]:
            self.view[pfn << PAGE_SHIFT:(pfn + 1) << PAGE_SHIFT] = bytes(PAGE_SIZE)
            self.data[pfn] = 0
        self.sent[pfn] = 1
        self.stype[pfn] = stream_types(dom, mfn, 1)[0]

    def forget(self, pfn: int) -> None:
        """pfn was not sent after all (a table that could not be canonicalised yet)."""
        self.sent[pfn] = 0

    # -- what changed ------------------------------------------------------------------------
    def changed(self, dom: "Domain", has_data: bytearray) -> list[int]:
        """Ascending pfns whose contents or stream type differ from what the receiver has
        (never sent, written since, freed since, retyped since). Frames that are holes in
        machine memory (`has_data` 0) are never read (reading one would allocate it)."""
        scan = self._scan(dom, has_data)
        while True:
            try:
                next(scan)
            except StopIteration as e:
                return e.value

    async def changed_yielding(self, dom: "Domain", has_data: bytearray,
                               slice_s: float = SLICE_S) -> list[int]:
        """`changed` with a turn of the loop after every `slice_s` of it, for the pre-copy
        rounds' scans: the guest runs (and answers its peers) meanwhile instead of standing
        still for the whole scan (3-4 ms of a 64 MiB guest, in the ping gap when it is the
        last one before the suspend). What the guest writes during the scan may be missed
        by it; the last scan, with the guest suspended, is `changed` (exact)."""
        scan = self._scan(dom, has_data)
        t = time.perf_counter()
        while True:
            try:
                next(scan)
            except StopIteration as e:
                return e.value
            if time.perf_counter() - t > slice_s:
                await asyncio.sleep(0)
                t = time.perf_counter()

    def _scan(self, dom: "Domain", has_data: bytearray) -> Iterator[None]:
        """`changed`'s work, pausing (a yield) after each chunk compared; its list of pfns
        is the generator's return value."""
        nr, p2m, mem = self.nr, dom.p2m, dom.mem
        base = p2m[0]
        if not self._ident or self._ident[0] != base:
            self._ident = list(range(base, base + nr))
        ident = p2m == self._ident
        if ident:
            data = bytes(has_data[base:base + nr])
            stype = stream_types(dom, base, nr)
        else:
            data = bytes(has_data[m] for m in p2m)
            stype = b"".join(stream_types(dom, m, 1) for m in p2m)
        ones = self._ones
        sent, shadow_data, d = _flags(self.sent), _flags(self.data), _flags(data)
        retyped = _flags((_flags(stype) ^ _flags(self.stype)).to_bytes(nr, "little").translate(_NONZERO))
        # Certainly changed: never sent, retyped, or a hole now where the receiver has data.
        certain = (sent ^ ones) | retyped | (shadow_data & (d ^ ones))
        # To compare: sent, same type, data now.
        compare = d & sent & (retyped ^ ones)
        out = [m.start() + i for m in _RUN.finditer(_bytes(certain, nr))
               for i in range(m.end() - m.start())] if certain else []
        ma, sa = mem.fd_address, self.address
        for m in _RUN.finditer(_bytes(compare, nr)):
            p0, p1 = m.start(), m.end()
            for c0 in range(p0, p1, CHUNK):
                c1 = min(p1, c0 + CHUNK)
                yield
                if ident and not _memcmp(ma + ((c0 + base) << PAGE_SHIFT), sa + (c0 << PAGE_SHIFT),
                                         (c1 - c0) << PAGE_SHIFT):
                    continue
                for p in range(c0, c1):
                    if _memcmp(ma + (p2m[p] << PAGE_SHIFT), sa + (p << PAGE_SHIFT), PAGE_SIZE):
                        out.append(p)
        out.sort()
        return out


def stream_types(dom: "Domain", mfn: int, n: int) -> bytes:
    """Per frame mfn..mfn+n-1: the page-table level it is validated as (1..4, 0 for any
    other type), with 8 added if pinned. A type is set and reset together with its count
    (memory.py), so a level here is a live table; save.page_type gives the same facts in
    the stream's encoding."""
    mem = dom.mem
    lv = _flags(mem.type[mfn:mfn + n].tobytes().translate(_TABLE))
    pin = _flags(mem.pinned[mfn:mfn + n].tobytes().translate(_NONZERO))
    return _bytes(lv | (pin << 3), n)
