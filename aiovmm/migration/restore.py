"""Restore: an xl save file (or a live stream) becomes a new domain, all or nothing.

The stream is untrusted input. The record layer (stream.py) bounds every length before
reading; here every number that names guest state is checked against what the stream
itself declared: PFNs against the domain size from the xl header, page-table entries
against the PFNs the domain owns (each localised PFN -> new MFN, then validated by the
same PageTables code that validates a running guest's tables), records against Xen's
order (X86_PV_INFO, X86_PV_P2M_FRAMES, PAGE_DATA..., then TSC/SHARED_INFO/vCPU records,
END). Any failure destroys the half-built domain before the error propagates; nothing else
on the host is touched (the domain's frames are new; xenstore is written only once the
domain is complete).
"""
from __future__ import annotations

import array
import asyncio
import dataclasses
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..abi import (PAGE_SHIFT, PAGE_SIZE, PTE_FRAME_MASK, XEN_L4_FIRST,
                   XEN_L4_LAST, XEN_LEGACY_MAX_VCPUS, VCPU_INFO_SIZE, _PAGE_PRESENT,
                   CallbackType, CALLBACKF_mask_events, StartInfo)
from ..errors import BuildError
from ..memory import NotWritable, OutOfMemory, PageType
from ..mmu import MMUError, xen_slot
from .. import cpuid
# What the end of a restore and the new domain's start use, imported with this module (in
# a worker thread: migration.load), not where it is used: a first import there fell in a
# live migration's downtime on a fresh destination (vcpu_context in _finish: 2-3 ms; the
# console backend at the domain's start). tests/test_migration_loop.py checks that a
# restore imports nothing.
from .. import vcpu_context, vcpu_op
from ..backends import console as _console                              # noqa: F401
from . import stream as S
from .context import EXT, SIZE as CTX_SIZE, VGCF, VcpuContext, XsaveRefused, XsaveState

if TYPE_CHECKING:
    from ..domain import Domain
    from ..hypervisor import Hypervisor

log = logging.getLogger("aiovmm.migration")

MAX_RESTORE_PAGES = 1 << 22           # 16 GiB: an xl header asking for more is refused
SHARED_INFO_EVTCHN_PENDING = 2048     # shared_info: vcpu_info[32] (2048 bytes), then
SHARED_INFO_EVTCHN_MASK = 2048 + 512  # evtchn_pending[64], evtchn_mask[64] (u64 each)
SHARED_INFO_ARCH = 3072 + 8 + 4       # after wc_version, wc_sec, wc_nsec(+wc_sec_hi): arch


@dataclass
class RestoreStats:
    pages: int = 0
    bytes: int = 0
    seconds: float = 0.0


# The longest the restore keeps the event loop between two yields while it validates page
# tables (other guests' vCPUs, backends and timers run on the same loop): validating one
# table takes up to ~1 ms in Python, a guest has hundreds to thousands of them.
YIELD_AFTER_S = 0.004


class _Pacer:
    """Yield to the loop once YIELD_AFTER_S of the restore's work has gone by since the
    last yield: a small guest's restore (and a live migration's downtime) never yields,
    a big one never holds the loop for more than one table past that."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.yields = 0

    async def __call__(self) -> None:
        if time.perf_counter() - self.t >= YIELD_AFTER_S:
            await asyncio.sleep(0)
            self.yields += 1
            self.t = time.perf_counter()


@dataclass
class _State:
    nr_pages: int
    phase: int = 0                      # 0 pv_info, 1 p2m_frames, 2 pages, 3 state
    p2m_pfns: list[int] = field(default_factory=list)
    types: dict[int, int] = field(default_factory=dict)     # pfn -> type (tables only)
    # L1 tables validated as they arrived (one type reference each, `_hold_l1`): the
    # final pinning then finds them validated; dropped at the end (`_release_held`).
    held: dict[int, int] = field(default_factory=dict)      # pfn -> mfn
    # Tables validated ahead of the pinning, children first (`_validate_ahead`): one type
    # reference each, dropped with the arrival-time ones (`_release_held`).
    ahead: list[int] = field(default_factory=list)          # mfns
    pace: "_Pacer" = field(default_factory=lambda: _Pacer())
    engine: object = None               # vCPU 0's engine, made before the pages arrive
    engines: dict[int, object] = field(default_factory=dict)   # vCPUs 1..: the same
    nr_vcpus: int = 1                   # the domain's vCPUs (xl header): ids 0..nr_vcpus-1
    seen: bytearray = field(default_factory=bytearray)
    shinfo: bytes | None = None
    revalidated: bool = False           # _validate_ahead started over without held tables
    ctx: dict[int, VcpuContext] = field(default_factory=dict)
    ext: dict[int, bytes] = field(default_factory=dict)
    msrs: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    xsave: dict[int, XsaveState] = field(default_factory=dict)


def _config(cfg: dict) -> tuple[str, int, str, bool, int]:
    from ..domain import valid_name
    from ..vcpu_op import MAX_VCPUS
    try:
        name = str(cfg.get("name", "restored"))
        nr = int(cfg["nr_pages"])
        engine = str(cfg.get("engine", "unicorn"))
        cancel = bool(cfg.get("suspend_cancel", False))
        vcpus = int(cfg.get("vcpus", 1))
    except (KeyError, TypeError, ValueError) as e:
        raise S.StreamError(f"xl header: configuration lacks a valid {e}") from None
    if not 1 <= nr <= MAX_RESTORE_PAGES:
        raise S.StreamError(f"xl header: {nr} pages (1..{MAX_RESTORE_PAGES})")
    if engine not in ("unicorn", "kvm"):
        raise S.StreamError(f"xl header: unknown engine {engine!r}")
    if not 1 <= vcpus <= MAX_VCPUS:
        raise S.StreamError(f"xl header: {vcpus} vCPUs (1..{MAX_VCPUS})")
    if not valid_name(name):                 # it becomes part of a file name (log_dir)
        raise S.StreamError(f"xl header: bad domain name {name[:80]!r}")
    return name, nr, engine, cancel, vcpus


def localise(dom: "Domain", pfn: int, level: int, page: memoryview | bytes) -> bytes:
    """A canonical page-table page with every present entry's PFN replaced by the new MFN;
    an entry naming a PFN the stream does not own is refused."""
    ents = array.array("Q", bytes(page))
    p2m, nr = dom.p2m, dom.nr_pages
    if level != 4 and len(p2m) == nr:
        # One comprehension for the whole table (restore localises every table of the
        # guest: 5 ms of a 64 MiB restore entry by entry). A PFN past the stream's pages
        # is an IndexError here (p2m has exactly nr_pages entries; the PFN field cannot
        # be negative): then the entry-by-entry loop below names it. L4s go entry by
        # entry (Xen's slots must be empty; one L4 per address space).
        try:
            return array.array("Q", [(e & ~PTE_FRAME_MASK) | (p2m[(e & PTE_FRAME_MASK) >> PAGE_SHIFT] << PAGE_SHIFT)
                                     if e & _PAGE_PRESENT else e for e in ents]).tobytes()
        except IndexError:
            pass
    for i, e in enumerate(ents):
        if not e & _PAGE_PRESENT:
            continue
        if level == 4 and XEN_L4_FIRST <= i <= XEN_L4_LAST:
            raise S.StreamError(f"L4 at pfn {pfn:#x}: entry {i} in Xen's slots is set")
        p = (e & PTE_FRAME_MASK) >> PAGE_SHIFT
        if p >= nr:
            raise S.StreamError(f"L{level} page table at pfn {pfn:#x} entry {i} names pfn "
                                f"{p:#x}, not one of the stream's {nr} pages")
        ents[i] = (e & ~PTE_FRAME_MASK) | (p2m[p] << PAGE_SHIFT)
    return ents.tobytes()


def _record(dom: "Domain", st: _State, rt: S.Rec, body: bytes) -> None:
    """Apply one record (checked: order, sizes, every number)."""
    mem = dom.mem
    if rt == S.Rec.x86_pv_info:
        if st.phase != 0 or len(body) != S.X86_PV_INFO.size:
            raise S.StreamError("X86_PV_INFO out of order or of the wrong size")
        width, levels, r1, r2 = S.X86_PV_INFO.unpack(body)
        if (width, levels, r1, r2) != (8, 4, 0, 0):
            raise S.StreamError(f"X86_PV_INFO: width {width} levels {levels} (only 64-bit, 4 levels)")
        st.phase = 1
    elif rt == S.Rec.x86_pv_p2m_frames:
        if st.phase != 1:
            raise S.StreamError("X86_PV_P2M_FRAMES out of order")
        if len(body) < 8 or len(body) % 8:
            raise S.StreamError("X86_PV_P2M_FRAMES: bad length")
        start, end = S.P2M_FRAMES_HDR.unpack_from(body)
        want = (st.nr_pages * 8 + PAGE_SIZE - 1) // PAGE_SIZE
        pfns = list(struct.unpack_from(f"<{(len(body) - 8) // 8}Q", body, 8))
        if start != 0 or end != st.nr_pages - 1 or len(pfns) != want:
            raise S.StreamError(f"X86_PV_P2M_FRAMES: pfns {start}..{end} in {len(pfns)} frames "
                                f"(the domain has {st.nr_pages} pages: {want} frames)")
        if any(p >= st.nr_pages for p in pfns) or len(set(pfns)) != len(pfns):
            raise S.StreamError("X86_PV_P2M_FRAMES: a frame outside the domain or listed twice")
        st.p2m_pfns = pfns
        st.phase = 2
    elif rt in (S.Rec.x86_tsc_info, S.Rec.shared_info, S.Rec.x86_pv_vcpu_basic,
                S.Rec.x86_pv_vcpu_extended, S.Rec.x86_pv_vcpu_msrs, S.Rec.x86_pv_vcpu_xsave):
        if st.phase not in (2, 3):
            raise S.StreamError(f"{rt.name} before the page data")
        st.phase = 3
        if rt == S.Rec.shared_info:
            if len(body) != PAGE_SIZE or st.shinfo is not None:
                raise S.StreamError("SHARED_INFO: wrong size or repeated")
            st.shinfo = body
        elif rt == S.Rec.x86_tsc_info:
            if len(body) != S.TSC_INFO.size or S.TSC_INFO.unpack(body)[4]:
                raise S.StreamError("X86_TSC_INFO: wrong size or reserved bits set")
        else:
            if len(body) < S.VCPU_HDR.size:
                raise S.StreamError(f"{rt.name}: shorter than its header")
            vid, res = S.VCPU_HDR.unpack_from(body)
            if vid >= st.nr_vcpus or res:
                raise S.StreamError(f"{rt.name}: vcpu {vid} (the domain has {st.nr_vcpus}) "
                                    "or reserved bits set")
            content = body[S.VCPU_HDR.size:]
            if not content:                   # Xen tolerates empty ones (old senders)
                return
            if rt == S.Rec.x86_pv_vcpu_basic:
                if len(content) != CTX_SIZE or vid in st.ctx:
                    raise S.StreamError(f"X86_PV_VCPU_BASIC: {len(content)} bytes (want {CTX_SIZE}) or repeated")
                st.ctx[vid] = VcpuContext.unpack(content)
            elif rt == S.Rec.x86_pv_vcpu_extended:
                if len(content) != EXT.size:
                    raise S.StreamError(f"X86_PV_VCPU_EXTENDED: {len(content)} bytes (want {EXT.size})")
                st.ext[vid] = content
            elif rt == S.Rec.x86_pv_vcpu_msrs:
                if len(content) % S.MSR_ENTRY.size:
                    raise S.StreamError("X86_PV_VCPU_MSRS: not a whole number of entries")
                st.msrs[vid] = [(i, v) for i, _f, v in S.MSR_ENTRY.iter_unpack(content)]
            elif rt == S.Rec.x86_pv_vcpu_xsave:
                if vid in st.xsave:
                    raise S.StreamError(f"X86_PV_VCPU_XSAVE: vcpu {vid} repeated")
                # Checked against the XSAVE this host's engine offers (the engines are
                # made before the records arrive; all of a domain's are of one kind).
                try:
                    st.xsave[vid] = XsaveState.parse(content, st.engine.cpl3_xstate, f"vcpu {vid}")
                except XsaveRefused as e:
                    raise S.StreamError(f"X86_PV_VCPU_XSAVE: {e}") from None
    else:
        raise S.StreamError(f"unexpected {rt.name} record")


async def _page_run(dom: "Domain", st: _State, rd: S.Reader, run: S.PfnRun) -> int | None:
    """Consecutive pfns of one type whose frames are consecutive MFNs (a new domain's
    usually are): one read for the data, or nothing for XALLOC pages not seen before.
    None: not that simple, the caller goes entry by entry."""
    p0, n = run.first, run.count
    m0 = dom.p2m[p0]
    if dom.p2m[p0:p0 + n] != list(range(m0, m0 + n)):
        return None
    if st.held:
        for p in [p for p in st.held if p0 <= p < p0 + n]:
            _unhold(dom, st, p)
    if run.type == S.PfnType.xalloc:
        if st.seen[p0:p0 + n].count(1):
            return None                       # some were sent before: zeroed one by one
        data = 0
    else:
        await rd.into(dom.mem.view[m0 << PAGE_SHIFT:(m0 + n) << PAGE_SHIFT])
        data = n
    st.seen[p0:p0 + n] = b"\1" * n
    if st.types:
        for p in [p for p in st.types if p0 <= p < p0 + n]:
            del st.types[p]
    return data


async def _page_data(dom: "Domain", st: _State, rd: S.Reader, length: int) -> int:
    """A PAGE_DATA record, its pfn[] checked first; then data pages are read straight into
    the new domain's frames (runs of contiguous MFNs in one read), page tables into a
    buffer and localised. Returns the number of pages."""
    if st.phase != 2:
        raise S.StreamError("PAGE_DATA out of order (before the P2M frames or after vCPU state)")
    entries = await rd.page_data_pfns(length, st.nr_pages)
    mem, p2m = dom.mem, dom.p2m
    view = mem.view
    if isinstance(entries, S.PfnRun):
        done = await _page_run(dom, st, rd, entries)
        if done is not None:
            return done
        entries = [(p, entries.type) for p in range(entries.first, entries.first + entries.count)]
    run_start = run_end = -1
    n = 0

    async def flush() -> None:
        if run_start >= 0:
            await rd.into(view[run_start << PAGE_SHIFT:run_end << PAGE_SHIFT])
    for pfn, t in entries:
        if t in (S.PfnType.xtab, S.PfnType.broken):
            st.types.pop(pfn, None)           # Xen's set_page_type: no page, no table to pin
            continue
        mfn = p2m[pfn]
        if pfn in st.held:                    # sent again: its old contents lose their references
            _unhold(dom, st, pfn)
        if t == S.PfnType.xalloc:             # populated, no data: a zero page
            if st.seen[pfn]:
                await flush()
                run_start = -1
                mem.zero(mfn)
            st.types.pop(pfn, None)
            st.seen[pfn] = 1
            continue
        level = t & 7
        st.seen[pfn] = 1
        n += 1
        if level:
            await flush()
            run_start = -1
            buf = bytearray(PAGE_SIZE)
            await rd.into(memoryview(buf))
            view[mfn << PAGE_SHIFT:(mfn + 1) << PAGE_SHIFT] = localise(dom, pfn, level, buf)
            st.types[pfn] = t
            if level == 1:
                _hold_l1(dom, st, pfn)
            await st.pace()               # a record can hold a thousand tables
            continue
        st.types.pop(pfn, None)
        if run_start >= 0 and mfn == run_end:
            run_end += 1
        else:
            await flush()
            run_start, run_end = mfn, mfn + 1
    await flush()
    return n


def _hold_l1(dom: "Domain", st: _State, pfn: int) -> None:
    """Validate an L1 table as it arrives (pre-copy of a live migration, or the page data
    of a file), by the same PageTables rules as ever: L1 validation is nearly all of the
    pinning's cost, and done here it is off the migration's downtime. A table that does
    not validate yet (the snapshot of a running guest need not be consistent until its
    last round) is left for the final pinning, which applies the rules again."""
    mfn = dom.p2m[pfn]
    try:
        dom.hypervisor.pagetables.get_type(mfn, PageType.l1, dom.domid)
    except MMUError:
        return
    st.held[pfn] = mfn


def _unhold(dom: "Domain", st: _State, pfn: int) -> None:
    dom.hypervisor.pagetables.put_type(st.held.pop(pfn))


def _writable(dom: "Domain", pfn: int, what: str) -> int:
    """The frame of `pfn` with a writable type reference (the caller drops it after its
    writes): the restorer writes a frame only as Xen's writes it, through a writable
    mapping, which a page table or descriptor page refuses (rule 2)."""
    mfn = dom.p2m[pfn]
    try:
        dom.mem.get_writable(mfn)
    except NotWritable as e:
        raise S.StreamError(f"{what} pfn {pfn:#x} is not writable: {e}") from None
    return mfn


def _release_held(dom: "Domain", st: _State) -> None:
    """Drop the arrival-time references (and those taken ahead of the pinning): a table
    the final page tables use keeps its validation through their references; one they no
    longer use (a stale copy of a frame the guest stopped using as a table) becomes an
    ordinary page again."""
    pt = dom.hypervisor.pagetables
    while st.ahead:                           # parents first: they were taken last
        pt.put_type(st.ahead.pop())
    for pfn in list(st.held):
        _unhold(dom, st, pfn)


async def _pin_order(dom: "Domain", st: _State) -> list[tuple[int, int]]:
    """(mfn, level) of every table that pinning the stream's pinned tables (`_pin_tables`:
    levels 4 to 1, pfns in order, entries in order) would validate, each after the tables
    its entries take, i.e. in the order that recursive validation completes them. Only
    reads (yielding as the validation does): an entry the validation would refuse is
    followed or not, the validation itself decides (the walk just stops where a frame is
    not one of the domain's)."""
    mem, p2m, domid = dom.mem, dom.p2m, dom.domid
    tc, ty, owner = mem.type_count, mem.type, mem.owner
    seen: dict[int, int] = {}                 # mfn -> level it is walked as
    order: list[tuple[int, int]] = []
    unpack = struct.Struct("<512Q").unpack_from
    nr = mem.nr_frames
    same = {lv: PageType(lv) for lv in (1, 2, 3, 4)}

    async def walk(mfn: int, level: int) -> None:
        if mfn not in seen and tc[mfn]:
            # A pinned table with a type already (validated on arrival, or a frame
            # something maps writable): the pinning's own get_type decides, so here too.
            seen[mfn] = level
            order.append((mfn, level))
            return
        # Iterative post-order (depth <= 4, but no recursion limit to think about).
        stack = [(mfn, level, None)]
        while stack:
            m, lv, it = stack.pop()
            if it is None:
                await st.pace()
                if m in seen or tc[m] or not mem.valid_mfn(m) or owner[m] != domid:
                    continue                  # taken already (or refused by the validation)
                seen[m] = lv
                if lv == 1:
                    order.append((m, 1))
                    continue
                it = iter(enumerate(unpack(mem.map, m << PAGE_SHIFT)))
            for i, e in it:
                if not e & _PAGE_PRESENT or xen_slot(lv, i):
                    continue
                c = (e & PTE_FRAME_MASK) >> PAGE_SHIFT
                if c >= nr or c == m or seen.get(c) == lv or (tc[c] and ty[c] == same[lv]):
                    continue                  # not RAM, self or same-level ("linear") entry
                stack.append((m, lv, it))
                stack.append((c, lv - 1, None))
                break
            else:
                order.append((m, lv))
    for level in (4, 3, 2, 1):
        for pfn, t in sorted(st.types.items()):
            if t & 7 == level and t & S.PfnType.pinned:
                await walk(p2m[pfn], level)
    return order


async def _validate_ahead(dom: "Domain", st: _State) -> None:
    """Validate, ahead of `_finish` and yielding to the loop (st.pace), the tables the
    pinning would validate in one synchronous go (seconds for a guest with thousands of
    tables: every other guest on the loop stopped meanwhile). Same PageTables rules, the
    tables taken children first, so the pinning then only takes references. A refusal
    stops it: the pinning meets the same table and refuses the stream. If arrival-time
    validations were held, a refusal may be theirs (a stale copy mapping a table
    writable): they are dropped and it starts over once, as `_finish` would."""
    pt = dom.hypervisor.pagetables
    c = st.ctx.get(0)
    for pfn in (*st.p2m_pfns, c.regs.get("rdx", -1) if c else -1):
        if pfn in st.held:                    # `_finish` writes these: no validation stands
            _unhold(dom, st, pfn)
    for attempt in (0, 1):
        try:
            for mfn, level in await _pin_order(dom, st):
                await st.pace()
                pt.get_type(mfn, PageType(level), dom.domid)
                st.ahead.append(mfn)
            return
        except MMUError:
            if attempt or not st.held:
                st.revalidated = True         # `_finish` refuses, no synchronous retry
                return
            _release_held(dom, st)


def _pin_tables(dom: "Domain", st: _State) -> None:
    """Pin the stream's pinned tables, top level first (each validated by Xen's rules);
    all or nothing: on a refusal the pins taken here are dropped again."""
    pt, mem, p2m = dom.hypervisor.pagetables, dom.mem, dom.p2m
    done: list[int] = []
    try:
        for level in (4, 3, 2, 1):
            for pfn, t in sorted(st.types.items()):
                if t & 7 == level and t & S.PfnType.pinned:
                    try:
                        pt.get_type(p2m[pfn], PageType(level), dom.domid)
                    except MMUError as e:
                        raise S.StreamError(f"pinned L{level} table at pfn {pfn:#x} refused: {e}") from None
                    mem.pinned[p2m[pfn]] = 1
                    done.append(p2m[pfn])
    except S.StreamError:
        for mfn in reversed(done):
            mem.pinned[mfn] = 0
            pt.put_type(mfn)
        raise


def _finish(hv: "Hypervisor", dom: "Domain", st: _State) -> None:
    """After END: rewrite the guest's P2M, pin its page tables, seed grants and start_info,
    build vCPU 0. Every check raises StreamError; the caller destroys the domain then."""
    from .. import timers
    from ..grants import GTF_permit_access, GNTTAB_RESERVED_CONSOLE, GNTTAB_RESERVED_XENSTORE, HOST_DOMID
    mem, p2m = dom.mem, dom.p2m
    if st.phase != 3 or 0 not in st.ctx or st.shinfo is None:
        raise S.StreamError("stream ended before the vCPU and shared_info records")
    # The frames written here (the P2M list, start_info) lose their arrival-time
    # validation: what they hold is about to change, so it cannot stand for a validation.
    for pfn in (*st.p2m_pfns, st.ctx[0].regs.get("rdx", -1)):
        if pfn in st.held:
            _unhold(dom, st, pfn)
    # Page tables: pinned ones are pinned again (validated by Xen's rules), top level first.
    # A stale arrival-time validation (an L1 copy mapping writable a frame that is a table
    # by the end) can stand in the way: then the pinning starts over without any.
    try:
        _pin_tables(dom, st)
    except S.StreamError:
        if not st.held or st.revalidated:
            raise
        _release_held(dom, st)
        _pin_tables(dom, st)
    # The guest's P2M list: the new MFNs, written after the pinning as Xen's
    # update_guest_p2m writes them (through a writable mapping, which a table refuses).
    p2m_bytes = array.array("Q", p2m).tobytes()
    for i, pfn in enumerate(st.p2m_pfns):
        chunk = p2m_bytes[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        mfn = _writable(dom, pfn, "P2M frame")
        mem.view[mfn << PAGE_SHIFT:(mfn << PAGE_SHIFT) + PAGE_SIZE] = chunk + bytes(PAGE_SIZE - len(chunk))
        mem.put_writable(mfn)
    c = st.ctx[0]
    cr3_pfn = c.ctrlreg[3] >> PAGE_SHIFT
    if c.ctrlreg[3] & (PAGE_SIZE - 1) or cr3_pfn >= dom.nr_pages or st.types.get(cr3_pfn, 0) & 7 != 4:
        raise S.StreamError(f"vcpu 0: CR3 pfn {cr3_pfn:#x} is not an L4 table of the stream")
    user_pfn = c.ctrlreg[1] >> PAGE_SHIFT
    if c.ctrlreg[1] and (user_pfn >= dom.nr_pages or st.types.get(user_pfn, 0) & 7 != 4):
        raise S.StreamError(f"vcpu 0: user CR3 pfn {user_pfn:#x} is not an L4 table of the stream")
    si_pfn = c.regs.get("rdx", -1)
    if not 0 <= si_pfn < dom.nr_pages or not st.seen[si_pfn]:
        raise S.StreamError(f"vcpu 0: start_info pfn {si_pfn:#x} (RDX) is not a page of the stream")
    if not VGCF.in_kernel & c.flags:
        raise S.StreamError("vcpu 0 was not suspended in kernel mode")
    for addr in (c.regs.get("rip", 0), c.event_callback, c.failsafe_callback, c.syscall_callback,
                 c.fs_base, c.gs_base_kernel, c.gs_base_user, *(a for _f, _c, a in c.traps)):
        if not (addr < 1 << 47 or addr >= 0xFFFF800000000000):
            raise S.StreamError(f"vcpu 0: non-canonical address {addr:#x}")
    dom.start_info_pfn = si_pfn
    si_mfn = _writable(dom, si_pfn, "start_info")
    try:
        _start_info(dom, si_mfn << PAGE_SHIFT)
    finally:
        mem.put_writable(si_mfn)
    dom.grants.write_entry(GNTTAB_RESERVED_CONSOLE, GTF_permit_access, HOST_DOMID, dom.console_mfn)
    dom.grants.write_entry(GNTTAB_RESERVED_XENSTORE, GTF_permit_access, HOST_DOMID, dom.store_mfn)
    # shared_info as Xen's restore leaves it: vcpu_info and arch copied, no event pending,
    # every event masked (the guest rebinds and unmasks its channels).
    sh = dom.shared_info_maddr
    mem.view[sh:sh + VCPU_INFO_SIZE * XEN_LEGACY_MAX_VCPUS] = st.shinfo[:VCPU_INFO_SIZE * XEN_LEGACY_MAX_VCPUS]
    for i in range(XEN_LEGACY_MAX_VCPUS):
        mem.write_u64(sh + VCPU_INFO_SIZE * i + 8, 0)          # evtchn_pending_sel
        mem.map[sh + VCPU_INFO_SIZE * i] = 0                     # evtchn_upcall_pending
    mem.view[sh + SHARED_INFO_EVTCHN_PENDING:sh + SHARED_INFO_EVTCHN_PENDING + 512] = bytes(512)
    mem.view[sh + SHARED_INFO_EVTCHN_MASK:sh + SHARED_INFO_EVTCHN_MASK + 512] = b"\xff" * 512
    _make_vcpu(hv, dom, c, p2m[cr3_pfn], p2m[user_pfn] if c.ctrlreg[1] else 0, st)
    _secondary_vcpus(dom, st)
    _release_held(dom, st)
    timers.write_pvclock(dom.vcpus[0])
    timers.write_wallclock(dom)


def _start_info(dom: "Domain", si: int) -> None:
    """Rewrite start_info (at machine address `si`, held writable by the caller): the
    store and console pages come as PFNs (the guest canonicalised them)."""
    mem, p2m = dom.mem, dom.p2m
    store_pfn = mem.read_u64(si + StartInfo.store_mfn)
    cons_pfn = mem.read_u64(si + StartInfo.console_mfn)
    for what, p in (("xenstore", store_pfn), ("console", cons_pfn)):
        if p >= dom.nr_pages:
            raise S.StreamError(f"start_info: {what} pfn {p:#x} out of range")
    dom.store_mfn, dom.console_mfn = p2m[store_pfn], p2m[cons_pfn]
    mem.write_u64(si + StartInfo.store_mfn, dom.store_mfn)
    struct.pack_into("<I", mem.map, si + StartInfo.store_evtchn, dom.store_port)
    mem.write_u64(si + StartInfo.console_mfn, dom.console_mfn)
    struct.pack_into("<I", mem.map, si + StartInfo.console_evtchn, dom.console_port)
    mem.write_u64(si + StartInfo.nr_pages, dom.nr_pages)
    mem.write_u64(si + StartInfo.shared_info, dom.shared_info_maddr)
    struct.pack_into("<I", mem.map, si + StartInfo.flags, 0)


def _make_vcpu(hv: "Hypervisor", dom: "Domain", c: VcpuContext, root: int, user_root: int,
               st: _State) -> None:
    from ..vcpu import VCPU
    eng, st.engine = st.engine or hv.new_engine(dom, 0), None
    v = VCPU(dom, 0, eng)
    eng.kernel_mode = lambda: v.kernel_mode
    dom.vcpus.append(v)
    pt = hv.pagetables
    try:
        pt.get_type(root, PageType.l4, dom.domid)          # the CR3 reference
        v.kernel_root = root
        if user_root:
            pt.get_type(user_root, PageType.l4, dom.domid)
            v.user_root = user_root
    except MMUError as e:
        raise S.StreamError(f"vcpu 0: page-table root refused: {e}") from None
    v.trap_table = list(c.traps)
    v.kernel_ss, v.kernel_sp = c.kernel_ss, c.kernel_sp
    cb: dict[int, tuple[int, int]] = {}
    if c.event_callback:
        cb[CallbackType.event] = (c.event_callback, CALLBACKF_mask_events)
    if c.failsafe_callback:
        cb[CallbackType.failsafe] = (c.failsafe_callback,
                                     CALLBACKF_mask_events if c.flags & VGCF.failsafe_disables_events else 0)
    if c.syscall_callback:
        cb[CallbackType.syscall] = (c.syscall_callback,
                                    CALLBACKF_mask_events if c.flags & VGCF.syscall_disables_events else 0)
    v.callbacks = cb
    v.fpu_ts = bool(c.ctrlreg[0] & 8)
    v.user_gs_base = c.gs_base_user
    v.kernel_gs_base = c.gs_base_kernel
    v.iopl = (c.regs.get("rflags", 0) >> 12) & 3           # IOPL privileges are virtual
    dom.vm_assist = c.vm_assist & 0xFFFFFFFF
    _extended(v, c, st)
    eng.setup_long_mode(root << PAGE_SHIFT, hv.xen.GDT_VA, hv.xen.GDT_LIMIT)
    _descriptor_tables(dom, v, c, st)
    r = c.regs
    gprs = {n: r.get(n, 0) for n in ("rbx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11",
                                     "r12", "r13", "r14", "r15")}
    rflags = (r.get("rflags", 0) & 0x3C0DD5) | 0x202      # arithmetic flags, AC, ID; IF on
    from .. import vcpu_context
    from ..errors import HypercallError
    try:
        segs = vcpu_context.start_segments(v, c)
    except HypercallError as e:
        raise S.StreamError(f"vcpu 0: context refused: {e}") from None
    vcpu_context.load_data_segments(v, c)
    vcpu_context.enter(v, segs, gprs, r.get("rip", 0), r.get("rsp", 0), rflags)
    eng.write({"fs_base": c.fs_base, "gs_base": c.gs_base_kernel})
    eng.load_fpu(c.fpu if c.flags & VGCF.i387_valid else None)
    v.cr4 = cpuid.fixup_guest_cr4(c.ctrlreg[4], v)      # as arch_set_info_guest takes it
    _xstate(v, st)
    # SCHEDOP_shutdown returns 0 in the new domain (the stub starts with rax = 0); Xen
    # also hands the new start_info MFN back in RDX: our stubs clobber RDX, as the
    # hypercall ABI allows, and no kernel reads it.


def _xstate(v, st: _State) -> None:
    """A vCPU's X86_PV_VCPU_XSAVE record, validated when it arrived, applied after its
    BASIC record as Xen's restore applies it (setvcpuextstate after setvcpucontext):
    XCR0 and XCR0_ACCUMULATED, and the area (when the guest had enabled XSAVE) replaces the
    FPU state fpu_ctxt gave. A stream without one leaves the vCPU as a new one is."""
    xs = st.xsave.get(v.id)
    if xs is None or not xs.xcr0_accum:
        return
    v.xcr0, v.xcr0_accum = xs.xcr0, xs.xcr0_accum
    try:                                # parse() let an area through only for an offer:
        v.engine.load_xsave(xs.area)    # an engine with XSAVE (KVM's load_xsave)
    except OSError as e:                # KVM_SET_XSAVE's own checks (EINVAL)
        raise S.StreamError(f"X86_PV_VCPU_XSAVE: vcpu {v.id}: area refused by the engine: {e}") from None


def _extended(v, c: VcpuContext, st: _State) -> None:
    """What a vCPU's BASIC record leaves to the others: CR2, the 32-bit syscall and
    sysenter callbacks (X86_PV_VCPU_EXTENDED), TSC_AUX (X86_PV_VCPU_MSRS)."""
    v.cr2 = c.ctrlreg[2]
    ext = st.ext.get(v.id)
    if ext:
        _v, _s, s32, se, _c1, _c2, s32m, sem, *_ = EXT.unpack(ext)
        if s32:
            v.set_callback(CallbackType.syscall32, (s32, s32m & 1))
        if se:
            v.set_callback(CallbackType.sysenter, (se, sem & 1))
    for idx, val in st.msrs.get(v.id, []):
        if idx == 0xC0000103:
            v.tsc_aux = val & 0xFFFFFFFF


def _table_pfn(dom: "Domain", st: _State, vid: int, what: str, pfn: int, level: int) -> int:
    """A frame a vCPU record names, as Xen's process_vcpu_basic checks it: a PFN of the
    stream with the type the record needs (a GDT frame: no table; a root: an L4)."""
    if pfn >= dom.nr_pages or not st.seen[pfn] or st.types.get(pfn, 0) & 7 != level:
        raise S.StreamError(f"vcpu {vid}: {what} pfn {pfn:#x} is not "
                            f"{'an L4 table' if level else 'a data page'} of the stream")
    return dom.p2m[pfn]


def _secondary_vcpus(dom: "Domain", st: _State) -> None:
    """vCPUs 1..N-1 as Xen's restore leaves them: each exists (created down, as a new
    domain's are); one with a BASIC record gets it through arch_set_info_guest (the same
    checks as VCPUOP_initialise: vcpu_context.set_context) with its frames turned into
    the new MFNs, and is online; one without (it was down at the save) stays down and
    uninitialised until the guest brings it up again."""
    from ..errors import HypercallError
    for vid in range(1, st.nr_vcpus):
        v = vcpu_op.create_secondary(dom, vid, st.engines.pop(vid, None))
        rec = st.ctx.get(vid)
        if rec is None:
            continue
        c = dataclasses.replace(rec, ctrlreg=list(rec.ctrlreg), regs=dict(rec.regs))
        c.gdt_frames = [_table_pfn(dom, st, vid, "GDT frame", p, 0) for p in rec.gdt_frames]
        if c.ctrlreg[3] & (PAGE_SIZE - 1):
            raise S.StreamError(f"vcpu {vid}: CR3 {c.ctrlreg[3]:#x} is not a frame")
        c.ctrlreg[3] = _table_pfn(dom, st, vid, "CR3", c.ctrlreg[3] >> PAGE_SHIFT, 4) << PAGE_SHIFT
        if c.ctrlreg[1]:
            c.ctrlreg[1] = _table_pfn(dom, st, vid, "user CR3", c.ctrlreg[1] >> PAGE_SHIFT, 4) << PAGE_SHIFT
        try:
            vcpu_context.set_context(v, c)
        except (HypercallError, MMUError) as e:
            raise S.StreamError(f"vcpu {vid}: context refused: {e}") from None
        _extended(v, c, st)
        _xstate(v, st)
        v.online = True                       # Xen's restore sets VGCF_online; the domain
        v.runstate = vcpu_op.RunState.running  # arms its timers when it starts
        log.debug("d%d: vcpu %d restored at rip %#x", dom.domid, vid, c.regs.get("rip", 0))


def _descriptor_tables(dom: "Domain", v, c: VcpuContext, st: _State) -> None:
    """The guest's own GDT (Linux's per-CPU GDT page) and LDT, taken as Xen's restore takes
    them (arch_set_info_guest -> pv_set_gdt): the frames come as PFNs of the stream and
    each must validate as a descriptor page, the same rule set_gdt applies."""
    from .. import descriptors
    from ..errors import HypercallError
    if not c.gdt_ents and not c.ldt_ents:
        return
    frames = []
    for pfn in c.gdt_frames:
        if pfn >= dom.nr_pages or not st.seen[pfn]:
            raise S.StreamError(f"vcpu {v.id}: GDT frame pfn {pfn:#x} is not a page of the stream")
        frames.append(dom.p2m[pfn])
    try:
        if c.gdt_ents:
            descriptors.set_gdt(v, frames, c.gdt_ents)
        if c.ldt_ents:
            descriptors.set_ldt(v, c.ldt_base, c.ldt_ents)
    except (HypercallError, MMUError) as e:
        raise S.StreamError(f"vcpu {v.id}: descriptor tables refused: {e}") from None


async def read_stream(hv: "Hypervisor", src: S.Source, *, name: str | None = None,
                      on_console=None, progress: Callable[[int, int], None] | None = None,
                      start: bool = True, claim: bool = True, announce: bool = True,
                      prepare: bool = False,
                      on_end: Callable[["Domain"], None] | None = None,
                      on_record: Callable[[S.Rec], None] | None = None) -> tuple["Domain", RestoreStats]:
    """Read a whole save stream and return the running new domain (or raise StreamError /
    BuildError with nothing left behind). `start=False`: built, not yet running (live
    migration starts it once the sender has let go: `hv.start_domain`, or `discard`).
    Devices are recreated from the xl header (devices.py); `claim=False` leaves the disks'
    claims to the caller (live migration claims after GO); `announce`: the vifs announce
    the guest on this host when it starts; `prepare`: their taps are made and attached
    while the pages arrive (devices.prepare), off the migration's downtime; `on_end` is
    called once the whole stream is in and the taps are ready, before the domain is
    finished (live migration announces the guest here: see live.receive); `on_record`
    is called with the type of each libxc record after the headers before it is read
    (live.receive follows the sender's STOP_AND_COPY and PRECOPY_ROUND_END with it;
    those records are otherwise ignored)."""
    from ..domain import Domain
    from . import devices
    t0 = time.perf_counter()
    stats = RestoreStats()
    rd = S.Reader(src)
    cfg = await rd.xl_header()
    cname, nr, engine, cancel, nr_vcpus = _config(cfg)
    vifs, disks = devices.parse(hv, cfg)
    await devices.check(hv, vifs, disks)
    await rd.libxl_header()
    await rd.libxl_record({S.LibxlRec.libxc_context})
    await rd.libxc_headers()
    from ..kvm_engine import KVMUnavailable, choose_engine
    try:
        # The source's engine: the guest's hypercall page is that engine's own.
        engine_kind = choose_engine(engine)
    except KVMUnavailable as e:
        raise BuildError(f"the stream is of a KVM-engine guest and KVM is unavailable here: {e}") from None
    domid = hv._next_domid
    try:
        dom = Domain(hv, domid, name or cname, nr, on_console, log_dir=hv.log_dir)
    except OutOfMemory as e:
        raise BuildError(f"not enough machine memory for {nr} pages: {e}") from None
    hv._next_domid += 1
    dom.engine_kind = engine_kind
    dom.suspend_cancel = cancel
    st = _State(nr, seen=bytearray(nr), nr_vcpus=nr_vcpus)
    prep: asyncio.Future | None = None
    try:
        devices.create(hv, dom, vifs, disks, announce=announce)
        if prepare:                           # awaited on every path below
            prep = asyncio.ensure_future(devices.prepare(dom))
        if engine_kind == "kvm":
            from ..kvm_engine import ring0
            ring0(hv.xen)
        # The engine now, not after the stream: making one (a Unicorn instance with
        # machine memory mapped, or a KVM vCPU) is most of what is left of _finish.
        st.engine = hv.new_engine(dom, 0)
        for i in range(1, nr_vcpus):          # and the others' (Unicorn: ~20 ms each)
            st.engines[i] = hv.new_engine(dom, i)
        done = 0
        while True:
            rt, length = await rd.record_header()
            if rt == S.Rec.end:
                await rd.body(rt, length)
                break
            if on_record is not None:
                on_record(rt)
            if rt in (S.Rec.stop_and_copy, S.Rec.precopy_round_end):
                await rd.body(rt, length)
                continue
            if rt == S.Rec.page_data:
                done += await _page_data(dom, st, rd, length)
                if progress is not None:
                    progress(done, nr)
                continue
            _record(dom, st, rt, await rd.body(rt, length))
        await rd.libxl_record({S.LibxlRec.end})
        if prep is not None:
            await prep
        if on_end is not None:
            on_end(dom)
        await _validate_ahead(dom, st)
        _finish(hv, dom, st)
        hv.domains[domid] = dom
        from .. import toolstack
        toolstack.introduce(hv, dom)
        devices.publish(dom)
        if prep is not None:
            await prep
        if claim:
            await devices.claim(hv, dom)
    except BaseException:
        if prep is not None and not prep.done():
            prep.cancel()
            await asyncio.wait([prep])
        hv.domains.pop(domid, None)
        for eng in [st.engine, *st.engines.values()]:
            if eng is not None:               # made, not yet given to a vCPU
                eng.close()
        from .. import toolstack
        devices.release(hv, dom)
        devices.close(dom)
        toolstack.release(hv, dom)
        # The validations taken as pages arrived (_hold_l1) and ahead of the pinning are the
        # restore's own references: dropped here, or the teardown finds them held by no one
        # (it devalidates those tables by force, "still referenced after teardown").
        _release_held(dom, st)
        dom.destroy()
        raise
    if start:
        hv.start_domain(dom)
    stats.pages, stats.bytes = sum(st.seen), rd.offset
    stats.seconds = time.perf_counter() - t0
    log.info("d%d: restored %d pages from %d bytes in %.1f ms", domid, stats.pages, stats.bytes,
             stats.seconds * 1e3)
    return dom, stats


def discard(hv: "Hypervisor", dom: "Domain") -> None:
    """Tear down a restored domain that was never started (a live migration called off)."""
    from .. import toolstack
    from . import devices
    hv.domains.pop(dom.domid, None)
    devices.release(hv, dom)
    devices.close(dom)
    toolstack.release(hv, dom)
    dom.destroy()
