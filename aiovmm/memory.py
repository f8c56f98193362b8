"""Machine memory: one memfd of 4 KiB frames, the frame table, the M2P.

Why one memfd: every vCPU engine maps the whole of machine memory ONCE (a single Unicorn
region, NOTES.md: region counts scale badly), and later backends in other processes can map
granted frames of the same file. A frame number is an MFN; machine address = MFN << 12.
Isolation is not done here: a guest reaches a frame only through a validated page-table
entry (mmu.py), as on Xen.

The memfd is lazily backed: frames cost host memory only once touched.
"""
from __future__ import annotations

import array
import ctypes
import enum
import mmap
import os
import struct
from typing import Iterator

from .abi import (
    DOMID_INVALID, DOMID_XEN, INVALID_M2P_ENTRY, PAGE_SHIFT, PAGE_SIZE, _PAGE_ACCESSED, _PAGE_DIRTY,
    _PAGE_PRESENT,
)

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_ACCESSED_DIRTY = _PAGE_ACCESSED | _PAGE_DIRTY

# A full memory barrier, once guest code may run while the loop runs (a KVM engine's vCPU
# thread, kvm_engine.VCPU_THREAD_ENV); None while every guest runs on the loop thread,
# where the guest never runs between two of the loop's accesses.
_mb = None
# The same: MachineMemory's atomic_* read-modify-writes take the locked C helpers only once
# a guest may run while the loop runs. Before, the loop's plain read-modify-write cannot
# interleave with a guest store (the guest is stopped whenever Python runs), and a ctypes
# call per bit costs ~0.8 us: +31 % on netback's rx copy of a 64 KiB frame (bench/atomic_rmw.py).
_concurrent = False


def guest_runs_concurrently(barrier) -> None:
    """From now on guest code may run while the loop runs: mb() issues `barrier` and the
    atomic_* read-modify-writes are locked instructions."""
    global _mb, _concurrent
    _mb = barrier
    _concurrent = True


_ATOMIC_SO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_native", "atomic.so")
# PyDLL: called with the GIL held (a few instructions each; releasing and retaking the GIL
# around them cost ~15% of the call).
_atomic = ctypes.PyDLL(_ATOMIC_SO)
for _fn, _t in (("aiovmm_atomic_or8", ctypes.c_uint8), ("aiovmm_atomic_and8", ctypes.c_uint8),
                ("aiovmm_atomic_and16", ctypes.c_uint16)):
    getattr(_atomic, _fn).argtypes = [ctypes.c_void_p, _t]
    getattr(_atomic, _fn).restype = _t
_atomic.aiovmm_atomic_cmpxchg32.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32]
_atomic.aiovmm_atomic_cmpxchg32.restype = ctypes.c_uint32
_or8, _and8 = _atomic.aiovmm_atomic_or8, _atomic.aiovmm_atomic_and8
_and16, _cmpxchg32 = _atomic.aiovmm_atomic_and16, _atomic.aiovmm_atomic_cmpxchg32


def mb() -> None:
    """Xen's xen_mb() where the hypervisor's side of a shared-memory protocol stores and
    then loads what the guest stores and then loads (io/ring.h's event-index checks,
    evtchn_set_pending): x86 may let the load pass the store, and both sides would miss
    each other's update (a ring whose frontend waits for an event the backend found
    unwanted). Nothing while the guest never runs concurrently with the loop."""
    if _mb is not None:
        _mb()


class PageType(enum.IntEnum):
    """Xen's PGT_* frame types (page-table levels are 1..4 on purpose)."""
    none = 0
    l1 = 1
    l2 = 2
    l3 = 3
    l4 = 4
    seg_desc = 5
    shared = 6
    writable = 7


# Plain ints of the types the hot paths compare with (an enum attribute lookup per test
# costs more than the test).
_T_NONE, _T_WRITABLE = int(PageType.none), int(PageType.writable)


class OutOfMemory(Exception):
    """Machine memory has no free frames for the request."""


class FrameInUse(Exception):
    """A frame still referenced as a typed page cannot be freed."""


class TypeConflict(Exception):
    """A frame holds references of another type: it cannot take this one (Xen's
    get_page_type failing)."""

    def __init__(self, mfn: int, ptype: int, want: int) -> None:
        super().__init__(f"frame {mfn:#x} is a {PageType(ptype).name} page, not {PageType(want).name}")
        self.mfn, self.ptype = mfn, ptype


class NotWritable(TypeConflict):
    """A frame holds another type (a page table, a segment-descriptor page): it cannot take
    a writable type reference (Xen's get_page_type(PGT_writable_page) failing)."""

    def __init__(self, mfn: int, ptype: int) -> None:
        super().__init__(mfn, ptype, PageType.writable)


def _one_run(frames: list[int]) -> bool:
    """`frames` are consecutive ascending machine frames (with no frame twice, as on the
    free list and in a domain's P2M: sorted and spanning exactly len - 1)."""
    n = len(frames)
    return n > 1 and frames[-1] - frames[0] == n - 1 and frames == sorted(frames)


def _runs(ordered: list[int]) -> list[tuple[int, int]]:
    """The contiguous runs [start, end) of sorted frames."""
    runs: list[tuple[int, int]] = []
    if not ordered:
        return runs
    start = prev = ordered[0]
    for mfn in ordered:
        if mfn > prev + 1 or mfn < prev:
            runs.append((start, prev + 1))
            start = mfn
        prev = mfn
    runs.append((start, prev + 1))
    return runs


class MachineMemory:
    """All machine frames, their owners and types, and the M2P.

    Per frame: owner domain id (DOMID_INVALID = free), type, type count, pinned flag.
    The frame table is plain arrays (not objects) so that 1 M frames stay cheap.
    """

    def __init__(self, size_bytes: int) -> None:
        if size_bytes % PAGE_SIZE:
            raise ValueError("machine memory must be a whole number of frames")
        self.size = size_bytes
        self.nr_frames = size_bytes >> PAGE_SHIFT
        self.fd = os.memfd_create("aiovmm-machine", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size_bytes)
        self.map = mmap.mmap(self.fd, size_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.map)
        # Host address of the mapping, for Unicorn's mem_map_ptr.
        self._anchor = (ctypes.c_char * size_bytes).from_buffer(self.map)
        self.fd_address = ctypes.addressof(self._anchor)
        n = self.nr_frames
        self.owner = array.array("H", [DOMID_INVALID]) * n
        self.type = array.array("B", [PageType.none]) * n
        self.type_count = array.array("I", [0]) * n
        self.pinned = array.array("B", [0]) * n
        self.pt_generation = 0          # bumped by every write_pte and pt_dropped
        # Objects with `written` and `dropped` sets of frames, an `ad_cleared` set of entry
        # addresses and a `flush_deferred` flag (kvm_engine._ShadowGuard).
        self.pt_watchers: list = []
        # Engines whose TLB is a cache the host must empty itself at the points where Xen
        # flushes whatever the guest asked (the Unicorn engine: `flush_tlb`), registered by
        # the engine and removed when it closes.
        self.tlb_engines: list = []
        # General references: one per present L1 entry (read-only or not) mapping the frame.
        # A referenced frame is never freed, so no guest keeps a mapping of a frame that has
        # been handed to someone else.
        self.refs = array.array("I", [0]) * n
        # 1 = the frame may hold old data and must be zeroed before reuse (a fresh memfd
        # frame reads as zero: no need to touch it, which also keeps it unbacked).
        self.dirty = array.array("B", [0]) * n
        # The M2P lives in machine frames at the top of memory, owned by Xen, so that guests
        # can read it through Xen's read-only mapping (L4 slot 256) as on real Xen.
        self.m2p_frames = (n * 8 + PAGE_SIZE - 1) >> PAGE_SHIFT
        self.m2p_first = n - self.m2p_frames
        m2p_off = self.m2p_first << PAGE_SHIFT
        self.view[m2p_off:m2p_off + self.m2p_frames * PAGE_SIZE] = b"\xff" * (self.m2p_frames * PAGE_SIZE)
        self.m2p = self.view[m2p_off:m2p_off + n * 8].cast("Q")
        for mfn in range(self.m2p_first, n):
            self.owner[mfn] = DOMID_XEN
            self.dirty[mfn] = 1
        self._iota = array.array("Q")          # set_m2p's consecutive pfns
        # Free list, handed out lowest first so a domain's frames tend to be contiguous.
        self._free = list(range(self.m2p_first - 1, -1, -1))
        # Frames their domain gave back (decrease_reservation) while still referenced: Xen
        # clears the page's allocation reference (_PGC_allocated) and frees it when its last
        # reference drops (put_page). Until then it stays owned by, and counted to, the
        # domain (its frame set, the value here), so it is never handed to anyone else
        # while a mapping or a type on it lives.
        self.released: dict[int, set[int]] = {}

    # -- allocation ---------------------------------------------------------------------
    @property
    def free_frames(self) -> int:
        return len(self._free)

    def alloc(self, owner: int, count: int = 1) -> list[int]:
        """Allocate `count` zeroed frames for `owner`; all or nothing."""
        free = self._free
        if count > len(free):
            raise OutOfMemory(f"need {count} frames, {len(free)} free")
        if count <= 0:
            return []
        cut = len(free) - count
        frames = free[:cut - 1:-1] if cut else free[::-1]    # the stack's top, popped in order
        del free[cut:]
        dirty = self.dirty
        if _one_run(frames):
            # One run of machine frames (the free stack hands them out lowest first): the
            # frame-table stores as slice assignments instead of one Python store per frame.
            first = frames[0]
            end = first + count
            self.owner[first:end] = array.array("H", [owner]) * count
            if b"\x01" in dirty[first:end].tobytes():
                for mfn in range(first, end):
                    if dirty[mfn]:
                        self.zero(mfn)
                dirty[first:end] = array.array("B", bytes(count))
            return frames
        for mfn in frames:
            self.owner[mfn] = owner
            if dirty[mfn]:
                self.zero(mfn)
                dirty[mfn] = 0
        return frames

    def set_m2p(self, frames: list[int], first_pfn: int = 0) -> None:
        """M2P entries for `frames` as consecutive pfns from `first_pfn` (a domain's build)."""
        n = len(frames)
        if _one_run(frames):
            end = first_pfn + n
            if len(self._iota) < end:             # 0, 1, 2, ... made once, not per build
                self._iota = array.array("Q", range(max(end, 2 * len(self._iota))))
            self.m2p[frames[0]:frames[0] + n] = self._iota[first_pfn:end]
            return
        m2p = self.m2p
        for pfn, mfn in enumerate(frames, first_pfn):
            m2p[mfn] = pfn

    def in_use(self, mfn: int) -> bool:
        """Something still references the frame: a type (page table, writable) or a mapping
        (an L1 entry, a grant mapping). A pin holds a type reference (MMUEXT_PIN_* goes
        through get_type), so the type count covers pinned frames."""
        return bool(self.type_count[mfn] or self.refs[mfn])

    def free(self, frames: list[int], force: bool = False) -> None:
        """Return frames to the pool.

        Refused (FrameInUse) for a frame that still has a type reference, e.g. a live page
        table, unless `force`: a dying domain's tables are torn down wholesale. A pinned
        frame always has one (a pin holds a type reference: MMUEXT_PIN_* goes through
        get_type), so the type count says it.
        """
        if not force:
            for mfn in frames:
                if self.in_use(mfn):
                    raise FrameInUse(f"frame {mfn:#x} is in use ({PageType(self.type[mfn]).name}, "
                                     f"{self.refs[mfn]} mappings)")
        self._stale_translations_unsafe()
        ordered = sorted(frames)
        if self.released:
            for mfn in ordered:
                self.released.pop(mfn, None)
        runs = _runs(ordered)
        for start, end in runs:             # the frame table per contiguous run, not per frame
            n = end - start
            self.owner[start:end] = array.array("H", [DOMID_INVALID]) * n
            self.type[start:end] = array.array("B", [PageType.none]) * n
            self.type_count[start:end] = array.array("I", [0]) * n
            self.pinned[start:end] = array.array("B", [0]) * n
            self.refs[start:end] = array.array("I", [0]) * n
            self.m2p[start:end] = array.array("Q", [INVALID_M2P_ENTRY]) * n
            self.dirty[start:end] = array.array("B", [1]) * n
        self._discard(runs)
        # The free list is a stack: the lowest of these frames is handed out first.
        self._free.extend(reversed(ordered))

    def _discard(self, runs: list[tuple[int, int]]) -> None:
        """Give freed frames' memory back to the host (MADV_REMOVE on the shared memfd
        mapping), per contiguous run [start, end): they read as zero afterwards, so the next
        owner needs no zeroing, and a destroyed guest's memory stops costing RSS."""
        for start, end in runs:
            try:
                self.map.madvise(mmap.MADV_REMOVE, start << PAGE_SHIFT, (end - start) << PAGE_SHIFT)
                self.dirty[start:end] = array.array("B", [0]) * (end - start)
            except (OSError, AttributeError):
                pass                            # stays dirty: zeroed when allocated

    def give_back(self, mfn: int, frames: set[int]) -> bool:
        """A domain gives back one of its frames (`frames`: its frame set). Freed now if
        nothing references it (True); otherwise released: freed by `unreferenced` when the
        last reference goes (False). Giving back a released frame again changes nothing,
        as in Xen, where the allocation reference is already gone."""
        if self.in_use(mfn):
            self.released[mfn] = frames
            return False
        self.free([mfn])
        frames.discard(mfn)
        return True

    def unreferenced(self, mfn: int) -> None:
        """Called wherever a reference on a frame is dropped: a released frame with none
        left is freed (Xen's put_page dropping the last count)."""
        if mfn in self.released and not self.in_use(mfn):
            self.released.pop(mfn).discard(mfn)
            self.free([mfn])

    def put_ref(self, mfn: int) -> None:
        """Drop a general reference (a mapping) taken with refs[mfn] += 1."""
        self.refs[mfn] -= 1
        if mfn in self.released:          # unreferenced's first test (hot: every unmapped PTE)
            self.unreferenced(mfn)

    def forget_released(self, frames: set[int]) -> None:
        """A dying domain's released frames are torn down with the rest of its frames."""
        for mfn in [m for m, fs in self.released.items() if fs is frames]:
            del self.released[mfn]

    def release_domain(self, domid: int, frames: list[int]) -> None:
        """Free all frames of a domain that is being destroyed."""
        for _ in self.release_domain_steps(domid, frames):
            pass

    def release_domain_steps(self, domid: int, frames: list[int], chunk: int = 512) -> Iterator[list[int]]:
        """release_domain in bounded steps, yielding each chunk of at most `chunk` frames
        once freed (the caller lets the loop run in between). The caller has fully released
        these frames (no type, no reference left): each chunk is free, and may be handed
        out, as soon as it is on the free list. Highest chunk first, so that the free list
        (a stack) still hands out the lowest frame first."""
        run = sorted(frames)
        for end in range(len(run), 0, -chunk):
            freed = [m for m in run[max(0, end - chunk):end] if self.owner[m] == domid]
            self.free(freed, force=True)
            yield freed

    # -- writable access: THE place that decides it -------------------------------------------
    def get_writable(self, mfn: int) -> None:
        """Take one writable type reference on `mfn` (Xen's get_page_type(PGT_writable_page)).

        Every path that lets a guest, or the hypervisor on a guest's behalf, write a frame
        calls this and holds the reference for as long as the write access lasts: a validated
        RW L1 entry, a writable grant mapping (guest or host backend), the destination of a
        grant copy by reference or by frame, host_copy_to, CLEAR_PAGE/COPY_PAGE, Xen's shared
        frames. A frame typed as anything else (page table, seg_desc) refuses (NotWritable),
        and while any writable reference is held the frame can never become a page table.
        Ownership is the caller's check: each path answers a foreign frame differently."""
        self.get_writable_many((mfn,))

    def get_writable_many(self, frames: "list[int] | tuple[int, ...]") -> None:
        """get_writable for each of `frames` in order (a frame may come more than once), all
        or nothing: the first that refuses raises NotWritable with none of them taken. The
        one implementation of the writable reference (take_type's rule for that type):
        validating an L1 table takes one per writable entry at once."""
        count, typ = self.type_count, self.type
        writable = _T_WRITABLE
        for k, mfn in enumerate(frames):
            if count[mfn]:
                if typ[mfn] != writable:
                    for m in frames[:k]:
                        self.put_writable(m)
                    raise NotWritable(mfn, typ[mfn])
                count[mfn] += 1
            else:
                typ[mfn] = writable
                count[mfn] = 1

    def take_type(self, mfn: int, ptype: PageType) -> bool:
        """One type reference on `mfn` as `ptype` (Xen's get_page_type): the one place that
        decides a type conflict, for writable access (get_writable) and for page tables and
        descriptor pages (PageTables.get_type). True if the frame has just taken the type
        (its count was 0): a page table must then be validated by the caller."""
        if ptype == _T_WRITABLE:
            first = not self.type_count[mfn]
            self.get_writable_many((mfn,))
            return first
        if self.type_count[mfn]:
            if self.type[mfn] != ptype:
                raise TypeConflict(mfn, self.type[mfn], ptype)
            self.type_count[mfn] += 1
            return False
        self.type[mfn] = ptype
        self.type_count[mfn] = 1
        self._stale_translations_unsafe()      # not writable (returned above)
        return True

    def put_writable(self, mfn: int) -> None:
        """Drop a writable type reference taken by get_writable. The type is only ever set
        and reset together with its count (get_writable, put_writable, free), so a frame
        typed writable has a count: the type test is the underflow check."""
        if self.type[mfn] != _T_WRITABLE:
            raise AssertionError(f"frame {mfn:#x}: writable reference underflow "
                                 f"({PageType(self.type[mfn]).name}, {self.type_count[mfn]})")
        self.type_count[mfn] -= 1
        if self.type_count[mfn] == 0:
            self.type[mfn] = _T_NONE
            self.unreferenced(mfn)

    # -- raw access (machine addresses) ---------------------------------------------------
    def valid_mfn(self, mfn: int) -> bool:
        return 0 <= mfn < self.nr_frames

    def zero(self, mfn: int) -> None:
        off = mfn << PAGE_SHIFT
        self.view[off:off + PAGE_SIZE] = bytes(PAGE_SIZE)

    def read(self, maddr: int, n: int) -> bytes:
        return bytes(self.view[maddr:maddr + n])

    def write(self, maddr: int, data: bytes) -> None:
        self.view[maddr:maddr + len(data)] = data

    # -- read-modify-writes of words the guest also updates (csrc/atomic.c) ----------------------
    # Every caller uses these, whether or not a guest runs concurrently: once one may
    # (guest_runs_concurrently), a plain read-modify-write would lose the guest's own locked
    # update of a neighbouring bit made between the read and the write, so they are locked
    # instructions; before, nothing runs between the read and the write and the plain one is
    # the same operation at a fraction of the cost.
    def atomic_or8(self, maddr: int, bits: int) -> int:
        """Locked `or` of `bits` into the byte at `maddr`; returns the byte before."""
        if not 0 <= maddr < self.size:
            raise IndexError(maddr)
        if _concurrent:
            return _or8(self.fd_address + maddr, bits)
        v = self.view
        old = v[maddr]
        v[maddr] = old | (bits & 0xFF)
        return old

    def atomic_and8(self, maddr: int, bits: int) -> int:
        """Locked `and` of the byte at `maddr` with `bits`; returns the byte before."""
        if not 0 <= maddr < self.size:
            raise IndexError(maddr)
        if _concurrent:
            return _and8(self.fd_address + maddr, bits)
        v = self.view
        old = v[maddr]
        v[maddr] = old & bits & 0xFF
        return old

    def atomic_and16(self, maddr: int, bits: int) -> int:
        """Locked `and` of the little-endian u16 at `maddr` (2-aligned); returns the value before."""
        if maddr & 1 or not 0 <= maddr < self.size - 1:
            raise IndexError(maddr)
        if _concurrent:
            return _and16(self.fd_address + maddr, bits)
        old = _U16.unpack_from(self.map, maddr)[0]
        _U16.pack_into(self.map, maddr, old & bits & 0xFFFF)
        return old

    def cmpxchg32(self, maddr: int, old: int, new: int) -> int:
        """Locked compare-exchange of the u32 at `maddr` (4-aligned): stores `new` iff it holds
        `old`; returns the value found (== `old` iff stored)."""
        if maddr & 3 or not 0 <= maddr < self.size - 3:
            raise IndexError(maddr)
        if _concurrent:
            return _cmpxchg32(self.fd_address + maddr, old, new)
        cur = _U32.unpack_from(self.map, maddr)[0]
        if cur == old & 0xFFFFFFFF:
            _U32.pack_into(self.map, maddr, new & 0xFFFFFFFF)
        return cur

    def read_u64(self, maddr: int) -> int:
        return _U64.unpack_from(self.map, maddr)[0]

    def write_u64(self, maddr: int, value: int) -> None:
        _U64.pack_into(self.map, maddr, value & 0xFFFFFFFFFFFFFFFF)

    def write_pte(self, maddr: int, value: int) -> None:
        """A host-side write of an entry of a validated guest page table: the only way the
        hypervisor changes one (mmu.py, grants.py, ptwr.py). Engines that keep their own copy
        of page tables (KVM's shadow pages, kvm_engine) learn which frames changed, and
        re-check before they run a vCPU again: even an entry that only became present (no
        TLB flush needed) links in a table that must be tracked before the guest can use it.
        An entry that stays present but loses its accessed or dirty bit is reported by
        address: the engine's copy may hold the bits the CPU set (KVM sets them in guest
        memory, so no snapshot shows them), and a cached writable translation would let
        the next write leave the entry clean (a guest that cleaned it loses the write)."""
        value &= 0xFFFFFFFFFFFFFFFF
        old = _U64.unpack_from(self.map, maddr)[0]
        _U64.pack_into(self.map, maddr, value)
        self.pt_generation += 1
        mfn = maddr >> PAGE_SHIFT
        ad_cleared = old & value & _PAGE_PRESENT and old & ~value & _ACCESSED_DIRTY
        for w in self.pt_watchers:
            w.written.add(mfn)
            if ad_cleared:
                w.ad_cleared.add(maddr)

    def _stale_translations_unsafe(self) -> None:
        """A frame is being freed (it may go to another domain) or takes a page-table or
        descriptor type (it must not stay writable anywhere): the points where Xen flushes
        TLBs whatever the guest asked (free_domheap_pages; get_page_type's tlbflush_filter).
        Engines that defer forgetting removed translations until the guest's own flush
        (kvm_engine._ShadowGuard) must forget them all before a vCPU runs again; engines
        whose TLB keeps translations until flushed (Unicorn's soft TLB, `tlb_engines`) are
        flushed here and now: the vCPU doing this may be inside a hypercall and go back to
        its guest without another check."""
        if self.pt_watchers:
            self.pt_generation += 1
            for w in self.pt_watchers:
                w.flush_deferred = True
        for eng in self.tlb_engines:
            eng.flush_tlb()

    def pt_dropped(self, mfn: int) -> None:
        """A page table was devalidated (mmu.py): from now on it may be written as data, so
        engines must forget their copies of it before they run a vCPU again."""
        self.pt_generation += 1
        for w in self.pt_watchers:
            w.dropped.add(mfn)

    def frame(self, mfn: int) -> memoryview:
        off = mfn << PAGE_SHIFT
        return self.view[off:off + PAGE_SIZE]

    def close(self) -> None:
        self.m2p.release()
        self.view.release()
        del self._anchor
        try:
            self.map.close()
        except BufferError:
            # An engine still exports a pointer into the mapping; the OS reclaims at exit.
            pass
        os.close(self.fd)


XEN_OWNER = DOMID_XEN
