"""Save: a suspended domain written as xl's save file (libxl records around a libxc
stream), in the order Xen's save code writes a PV guest (xg_sr_save.c, xg_sr_save_x86_pv.c):
X86_PV_INFO, X86_PV_P2M_FRAMES, PAGE_DATA..., X86_TSC_INFO, SHARED_INFO, per vCPU
BASIC/EXTENDED/XSAVE/MSRS, END.

Page-table pages are canonicalised: every present entry's MFN becomes the PFN it has in
this domain; Xen's own L4 slots are cleared; an entry naming a frame outside the domain's
P2M (a foreign grant mapping, shared_info still mapped) makes the save fail, as in Xen
("Bad mfn for L%d").
"""
from __future__ import annotations

import array
import asyncio
import logging
import os
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from ..abi import (PAGE_SHIFT, PAGE_SIZE, PTE_FRAME_MASK, XEN_L4_FIRST, XEN_L4_LAST,
                   _PAGE_PRESENT, CallbackType, CALLBACKF_mask_events, StartInfo)
from ..memory import PageType
from ..mmu import GuestFault
from . import stream as S
from .. import cpuid
from .context import EXT, VGCF, VcpuContext, XsaveState
from .suspend import Suspended

if TYPE_CHECKING:
    from ..domain import Domain
    from .dirty import Shadow
    from ..vcpu import VCPU

log = logging.getLogger("aiovmm.migration")

MSR_TSC_AUX = 0xC0000103


class SaveError(Exception):
    """The domain cannot be saved (its page tables map frames it does not own, ...)."""


@dataclass
class SaveStats:
    pages: int = 0
    bytes: int = 0
    seconds: float = 0.0


Progress = Callable[[int, int], None]          # (pages done, pages total)


def check_saveable(dom: "Domain") -> None:
    """What restore cannot take back is refused before the guest is asked to suspend (a
    save that succeeded destroys the source): a domain whose vCPU 0 is down. Xen's stream
    carries the start_info frame in vCPU 0's state and its restore refuses a stream
    without vCPU 0's BASIC record ("Sender didn't send vcpu0's basic state")."""
    if not dom.vcpus or not dom.vcpus[0].online:
        raise SaveError(f"d{dom.domid}: vCPU 0 is down: a domain is saved with vCPU 0 up")


def saved_vcpus(dom: "Domain") -> list["VCPU"]:
    """The vCPUs whose records go into the stream: Xen's write_all_vcpu_information
    walks every id up to max_vcpu_id and skips a vCPU that is down (VPF_down: never
    initialised, or taken down with VCPUOP_down); the restore leaves those down."""
    return [v for v in dom.vcpus if v.id == 0 or v.online]


def config_of(dom: "Domain") -> dict:
    """The domain's configuration for the xl header (restore recreates devices from it)."""
    from .devices import describe
    return {"name": dom.name, "nr_pages": dom.nr_pages, "max_pages": dom.max_pages,
            "engine": dom.engine_kind, "suspend_cancel": dom.suspend_cancel,
            "vcpus": len(dom.vcpus), "aiovmm": 1, **describe(dom)}


def canonicalise(dom: "Domain", pfn: int, level: int, page: bytes | memoryview) -> bytes:
    """A page-table page with every present entry's MFN replaced by its PFN."""
    ents = array.array("Q", bytes(page))
    m2p, p2m, nr = dom.mem.m2p, dom.p2m, dom.nr_pages
    for i, e in enumerate(ents):
        if level == 4 and XEN_L4_FIRST <= i <= XEN_L4_LAST:
            ents[i] = 0
            continue
        if not e & _PAGE_PRESENT:
            continue
        mfn = (e & PTE_FRAME_MASK) >> PAGE_SHIFT
        p = m2p[mfn] if dom.mem.valid_mfn(mfn) else -1
        if not (0 <= p < nr and p2m[p] == mfn):
            raise SaveError(f"d{dom.domid}: L{level} page table at pfn {pfn:#x} entry {i} maps "
                            f"mfn {mfn:#x} outside the domain's P2M (unmap it before suspending)")
        ents[i] = (e & ~PTE_FRAME_MASK) | (p << PAGE_SHIFT)
    return ents.tobytes()


def page_type(dom: "Domain", mfn: int) -> int:
    t = dom.mem.type[mfn]
    if PageType.l1 <= t <= PageType.l4 and dom.mem.type_count[mfn]:
        return int(t) | (S.PfnType.pinned if dom.mem.pinned[mfn] else 0)
    return S.PfnType.notab


def owned_mfn(dom: "Domain", pfn: int) -> int | None:
    """The frame behind `pfn` in the hypervisor's P2M if the domain still owns it, else
    None. A frame the guest gave back (decrease_reservation) may belong to another domain
    by now: Xen's saver goes through the guest's P2M and maps each frame as the guest's,
    so a frame the domain does not own goes as XTAB, never with the next owner's data."""
    mfn = dom.p2m[pfn]
    return mfn if dom.mem.owner[mfn] == dom.domid else None


def _pfn_of(dom: "Domain", mfn: int, what: str) -> int:
    p = dom.mem.m2p[mfn] if dom.mem.valid_mfn(mfn) else -1
    if not (0 <= p < dom.nr_pages and dom.p2m[p] == mfn):
        raise SaveError(f"d{dom.domid}: {what} mfn {mfn:#x} is not in the domain's P2M")
    return p


def p2m_frames(dom: "Domain", start_info_pfn: int) -> list[int]:
    """PFNs of the guest's own P2M list (start_info.mfn_list, a kernel VA), found through
    its page tables."""
    si = dom.p2m[start_info_pfn] << PAGE_SHIFT      # owned: suspend.py checked it, paused since
    va = dom.mem.read_u64(si + StartInfo.mfn_list)
    n = (dom.nr_pages * 8 + PAGE_SIZE - 1) // PAGE_SIZE
    pt = dom.hypervisor.pagetables
    root = dom.vcpus[0].kernel_root << PAGE_SHIFT
    out = []
    for i in range(n):
        try:
            ma = pt.translate(root, va + i * PAGE_SIZE, False)
        except GuestFault as e:                # the guest unmapped its P2M
            raise SaveError(f"d{dom.domid}: P2M list page {i} at {va + i * PAGE_SIZE:#x} "
                            f"is not mapped: {e}") from None
        out.append(_pfn_of(dom, ma >> PAGE_SHIFT, "P2M list"))
    return out


def vcpu_context(dom: "Domain", vid: int, susp: Suspended) -> tuple[VcpuContext, bytes, list[tuple[int, int]]]:
    """(basic context with frames as PFNs, extended context, MSRs) of a stopped vCPU, as
    Xen's arch_get_info_guest and write_one_vcpu_basic give it. vCPU 0 stopped in its
    SCHEDOP_shutdown(suspend): RAX holds the hypercall's result (0, as on Xen once the
    hypercall has returned) and RDX the start_info PFN. Another vCPU stopped wherever its
    last slice ended, in kernel or user mode; an instruction the run loop would redo
    (a bounced fault, a trapped page-table store) is saved as not yet executed: it runs
    again on the new side."""
    from ..vcpu_engine import GPRS
    v = dom.vcpus[vid]
    if vid == 0 and susp.vcpu != 0:
        raise SaveError(f"d{dom.domid}: suspended by vCPU {susp.vcpu}: Xen's stream carries "
                        "the start_info frame in vCPU 0's RDX, so vCPU 0 must suspend")
    if vid == 0 and not v.kernel_mode:
        raise SaveError(f"d{dom.domid}v{vid}: suspended in user mode")
    eng = v.engine
    names = [n for n in GPRS] + ["fs_base", "gs_base", "cs", "ss", "ds", "es", "fs", "gs"]
    regs = dict(zip(names, eng.read(names))) if hasattr(eng, "read") else {n: eng.get(n) for n in names}
    c = VcpuContext()
    c.regs = {n: regs[n] for n in GPRS + ("cs", "ss", "ds", "es", "fs", "gs")}
    if vid == 0:
        c.regs["rax"], c.regs["rdx"] = 0, susp.start_info_pfn
    if v.pending_trap is not None:
        c.regs["rip"] = v.pending_trap[2]
    elif v.pending_ptwr is not None:
        c.regs["rip"] = v.pending_ptwr.rip
    c.regs["rflags"] = (c.regs["rflags"] & ~0x3000) | (v.iopl << 12)     # IOPL is virtual
    c.flags = VGCF.online | VGCF.i387_valid
    if v.kernel_mode:
        c.flags |= VGCF.in_kernel
    save_fpu = getattr(eng, "save_fpu", None)
    fpu = save_fpu() if save_fpu is not None else None
    c.traps = list(v.trap_table)
    if v.ldt_ents or v.gdt_ents:
        c.ldt_base, c.ldt_ents = v.ldt_base, v.ldt_ents
        c.gdt_frames = [_pfn_of(dom, f, "GDT frame") for f in v.gdt_frames]
        c.gdt_ents = v.gdt_ents
    c.kernel_ss, c.kernel_sp = v.kernel_ss, v.kernel_sp
    c.ctrlreg[0] = 8 if v.fpu_ts else 0
    c.ctrlreg[2] = v.cr2
    c.ctrlreg[3] = _pfn_of(dom, v.kernel_root, "CR3") << PAGE_SHIFT
    if v.user_root:                # Xen's stream marks a 64-bit guest's user root with bit 0
        c.ctrlreg[1] = 1 | _pfn_of(dom, v.user_root, "user CR3") << PAGE_SHIFT
    c.ctrlreg[4] = v.cr4
    c.debugreg = list(v.dr)
    cb = v.callbacks
    c.event_callback = cb.get(CallbackType.event, (0, 0))[0]
    fs = cb.get(CallbackType.failsafe, (0, 0))
    sc = cb.get(CallbackType.syscall, (0, 0))
    c.failsafe_callback, c.syscall_callback = fs[0], sc[0]
    if fs[1] & CALLBACKF_mask_events:
        c.flags |= VGCF.failsafe_disables_events
    if sc[1] & CALLBACKF_mask_events:
        c.flags |= VGCF.syscall_disables_events
    c.vm_assist = dom.vm_assist
    c.fs_base = regs["fs_base"]
    if v.kernel_mode:
        c.gs_base_kernel, c.gs_base_user = regs["gs_base"], v.user_gs_base
    else:
        c.gs_base_kernel, c.gs_base_user = v.kernel_gs_base, regs["gs_base"]
    if fpu is not None:
        c.fpu = fpu
    else:
        c.flags &= ~VGCF.i387_valid
    s32 = cb.get(CallbackType.syscall32, (0, 0))
    se = cb.get(CallbackType.sysenter, (0, 0))
    ext = EXT.pack(vid, EXT.size, s32[0], se[0], 0xE023 if s32[0] else 0, 0xE023 if se[0] else 0,
                   s32[1] & 1, se[1] & 1, 0, 0, 0, 0)
    msrs = [(MSR_TSC_AUX, v.tsc_aux)] if v.tsc_aux else []
    return c, ext, msrs


def vcpu_xsave(v: "VCPU") -> XsaveState | None:
    """A stopped vCPU's X86_PV_VCPU_XSAVE content, as Xen's write_one_vcpu_xsave writes it:
    none where the engine offers no XSAVE (Xen on a CPU without XSAVE writes no record);
    else XCR0, XCR0_ACCUMULATED and, once the guest has enabled XSAVE, the engine's XSAVE
    area for the accumulated components (XsaveState.from_engine)."""
    offer = cpuid.xstate(v)
    if offer is None:
        return None
    if not v.xcr0_accum:
        return XsaveState(0, 0)
    return XsaveState.from_engine(offer, v.xcr0, v.xcr0_accum, v.engine.save_xsave())


def data_map(dom: "Domain") -> bytearray:
    """Per MFN up to the domain's highest: 1 if the frame may hold data, 0 if it is a hole
    in the machine-memory file (never written since it was last freed: all zeros).
    SEEK_DATA/SEEK_HOLE on the memfd finds the holes without touching a page; such frames
    go out as XALLOC (populated, no data) and cost nothing on either side."""
    hi = max(dom.p2m) + 1
    out = bytearray(hi)
    fd, end = dom.mem.fd, hi << PAGE_SHIFT
    off = min(dom.p2m) << PAGE_SHIFT
    while off < end:
        try:
            d = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:                       # ENXIO: no data after off
            break
        if d >= end:
            break
        h = min(os.lseek(fd, d, os.SEEK_HOLE), end)
        out[d >> PAGE_SHIFT:(h + PAGE_SIZE - 1) >> PAGE_SHIFT] = b"\1" * (((h + PAGE_SIZE - 1) >> PAGE_SHIFT) - (d >> PAGE_SHIFT))
        off = h
    return out


async def _page_batch(dom: "Domain", pfns: range, has_data: bytearray, skip_tables: bool = False,
                      shadow: "Shadow | None" = None) -> tuple[list[int], list[bytes | memoryview], int]:
    """(pfn[] with types, page data as few buffers as possible, data pages): runs of
    contiguous MFNs go out as one view of machine memory (no copy); page tables as
    canonical copies; never-written frames as XALLOC without data. With a `shadow` (live
    migration) every page is first copied into it and goes out from the copy (dirty.py),
    so runs are of consecutive pfns on consecutive MFNs and tables are canonicalised from
    the copy."""
    mem, p2m = dom.mem, dom.p2m
    typ, count, pinned = mem.type, mem.type_count, mem.pinned
    out_pfns: list[int] = []
    parts: list[bytes | memoryview] = []
    run_start = run_end = run_pfn = -1
    ndata = 0
    xalloc = S.PfnType.xalloc << S.TYPE_SHIFT
    xtab = S.PfnType.xtab << S.TYPE_SHIFT

    def flush() -> None:
        if run_start < 0:
            return
        if shadow is None:
            parts.append(mem.view[run_start << PAGE_SHIFT:run_end << PAGE_SHIFT])
        else:
            n = run_end - run_start
            parts.append(shadow.take(dom, run_pfn - n, run_start, n))
    for pfn in pfns:
        mfn = p2m[pfn]
        if owned_mfn(dom, pfn) is None:       # given back: maybe another domain's now
            out_pfns.append(pfn | xtab)
            if shadow is not None:            # not sent as data: looked at again each round
                shadow.forget(pfn)
            continue
        t = typ[mfn]
        if not has_data[mfn] and not (PageType.l1 <= t <= PageType.l4 and count[mfn]):
            out_pfns.append(pfn | xalloc)
            if shadow is not None:
                shadow.zero(dom, pfn, mfn)
            continue
        ndata += 1
        if PageType.l1 <= t <= PageType.l4 and count[mfn]:
            ty = int(t) | (S.PfnType.pinned if pinned[mfn] else 0)
            page = (shadow.take(dom, pfn, mfn) if shadow is not None
                    else mem.view[mfn << PAGE_SHIFT:(mfn + 1) << PAGE_SHIFT])
            try:
                canon = canonicalise(dom, pfn, int(t), page)
            except SaveError:
                if not skip_tables:
                    raise
                if shadow is not None:
                    shadow.forget(pfn)
                ndata -= 1                    # live pre-copy: this one goes later (it may
                continue                      # still map shared_info until the suspend)
            flush()
            run_start = -1
            parts.append(canon)
            out_pfns.append(pfn | (ty << S.TYPE_SHIFT))
            continue
        out_pfns.append(pfn)
        if run_start >= 0 and mfn == run_end and (shadow is None or pfn == run_pfn):
            run_end += 1
        else:
            flush()
            run_start, run_end = mfn, mfn + 1
        run_pfn = pfn + 1
    flush()
    return out_pfns, parts, ndata


def head(dom: "Domain") -> bytes:
    """Everything before the page data: xl header, libxl header and LIBXC_CONTEXT, libxc
    headers, X86_PV_INFO, X86_PV_P2M_FRAMES."""
    p2m_pfns = p2m_frames(dom, dom.start_info_pfn)
    return (S.xl_header(config_of(dom)) + S.libxl_header() + S.record(S.LibxlRec.libxc_context)
            + S.libxc_headers() + S.record(S.Rec.x86_pv_info, S.X86_PV_INFO.pack(8, 4, 0, 0))
            + S.record(S.Rec.x86_pv_p2m_frames, S.P2M_FRAMES_HDR.pack(0, dom.nr_pages - 1)
                       + struct.pack(f"<{len(p2m_pfns)}Q", *p2m_pfns)))


def check_alive(dom: "Domain") -> None:
    """SaveError once the domain is destroyed: its teardown (in slices, in the awaits of a
    save or a migration) frees its frames to other domains, so nothing of its memory may be
    read for the stream from then on (Xen's toolstack holds its foreign mappings instead)."""
    if dom.destroyed:
        raise SaveError(f"d{dom.domid} was destroyed during the save")


def tail(dom: "Domain", susp: Suspended) -> bytes:
    """Everything after the page data of a suspended domain: TSC info, shared_info, vCPU
    records, END (libxc), END (libxl)."""
    check_alive(dom)
    ctxs = [(v.id, *vcpu_context(dom, v.id, susp), vcpu_xsave(v)) for v in saved_vcpus(dom)]
    out = [S.record(S.Rec.x86_tsc_info, S.TSC_INFO.pack(0, 1_000_000, dom.hypervisor.system_time_ns(), 0, 0))]
    mem = dom.mem
    out.append(S.record(S.Rec.shared_info, bytes(mem.view[dom.shared_info_maddr:dom.shared_info_maddr + PAGE_SIZE])))
    for vid, c, ext, msrs, xsave in ctxs:
        out.append(S.vcpu_record(S.Rec.x86_pv_vcpu_basic, vid, c.pack()))
        out.append(S.vcpu_record(S.Rec.x86_pv_vcpu_extended, vid, ext))
        if xsave is not None:
            out.append(S.vcpu_record(S.Rec.x86_pv_vcpu_xsave, vid, xsave.pack()))
        if msrs:
            out.append(S.vcpu_record(S.Rec.x86_pv_vcpu_msrs, vid,
                                     b"".join(S.MSR_ENTRY.pack(i, 0, val) for i, val in msrs)))
    out.append(S.record(S.Rec.end) + S.record(S.LibxlRec.end))
    return b"".join(out)


async def pages(dom: "Domain", pfns: list[int] | range, write: Callable[[bytes | memoryview], Awaitable[None]],
                has_data: bytearray | None = None, skip_tables: bool = False,
                shadow: "Shadow | None" = None) -> int:
    """PAGE_DATA records for `pfns` (ascending), at most PAGES_PER_RECORD each; returns
    the bytes written. `skip_tables`: page tables that cannot be canonicalised yet are
    left out (a running guest's tables may map shared_info, outside its P2M, until it
    suspends). `shadow`: live migration's copy of what was sent (see _page_batch)."""
    has_data = data_map(dom) if has_data is None else has_data

    def alive() -> None:
        # Page runs are views of machine memory: each await of `write` lets the domain's
        # teardown run (destroy_preemptible), which frees its frames to other domains. So
        # checked before every write, not once a batch (tests/test_redteam_save_destroy.py).
        check_alive(dom)
    n = 0
    for i in range(0, len(pfns), S.PAGES_PER_RECORD):
        alive()
        batch, parts, ndata = await _page_batch(dom, pfns[i:i + S.PAGES_PER_RECORD], has_data, skip_tables,
                                                shadow)
        if not batch:
            continue
        hdr = S.page_data_header(batch, ndata)
        alive()
        await write(hdr)
        n += len(hdr)
        for part in parts:
            alive()
            await write(part)
            n += len(part)
        await asyncio.sleep(0)                # the guests run on this loop too
    return n


async def write_stream(dom: "Domain", susp: Suspended, write: Callable[[bytes | memoryview], Awaitable[None]],
                       progress: Progress | None = None) -> SaveStats:
    """Write the whole save stream of a suspended domain through `write`."""
    t0 = time.perf_counter()
    stats = SaveStats()
    if dom.suspended is None:
        raise SaveError(f"d{dom.domid} is not suspended")
    dom.start_info_pfn = susp.start_info_pfn
    # Everything that can fail is computed before the first byte goes out.
    first, last = head(dom), tail(dom, susp)
    stats.bytes += len(first)
    await write(first)
    nr = dom.nr_pages
    has_data = data_map(dom)
    for base in range(0, nr, S.PAGES_PER_RECORD):
        stats.bytes += await pages(dom, range(base, min(nr, base + S.PAGES_PER_RECORD)), write, has_data)
        stats.pages = min(nr, base + S.PAGES_PER_RECORD)
        if progress is not None:
            progress(stats.pages, nr)
    stats.bytes += len(last)
    await write(last)
    stats.seconds = time.perf_counter() - t0
    log.info("d%d: saved %d pages, %d bytes in %.1f ms", dom.domid, stats.pages, stats.bytes,
             stats.seconds * 1e3)
    return stats
