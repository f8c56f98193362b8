"""The Unicorn engine's soft TLB is flushed where Xen flushes the real one, not after every
page-table write: a translation removed by mmu_update, update_va_mapping without flush
flags or a ptwr store stays usable until the guest flushes (as on Xen, where the guest
flushes when it needs to; Linux's boot then costs a few hundred flushes, not ~29,000).
Where Xen flushes whatever the guest asked, a frame freed (it may go to another domain) or
taking a page-table type (it must not stay writable), the stale translation must be gone
before the guest's next instruction: those are the attacks, and the first half of each
test shows that the translation really was still cached."""
from __future__ import annotations

import asyncio

from aiovmm import Hypervisor, ShutdownReason, mmu_ops
from conftest import HV_MEMORY_MIB, kernel
from hand_vcpu import (DATA_VA, check_freed_frame_unreachable, check_pinned_l1_not_writable,
                       hand_driven_vcpu, step_access as _access, unmap_data_va)


def _hand_driven_vcpu(regs: tuple[str, ...]):
    """hand_vcpu.hand_driven_vcpu on the Unicorn engine."""
    return hand_driven_vcpu(regs, engine="unicorn")


async def test_removed_mapping_is_forgotten_at_the_guests_flush():
    """An unmap without a flush flushes nothing (the old translation stays, as in Xen's
    TLB); the guest's flush (MMUEXT_TLB_FLUSH_LOCAL) then makes the page fault."""
    async with _hand_driven_vcpu(("rip", "rax")) as (hv, dom, v):
        eng, pt, mem = v.engine, hv.pagetables, hv.mem
        mem.write_u64(pt.translate(v.kernel_root << 12, DATA_VA, False), 0x1122334455667788)
        assert _access(v, False) == ([], 0x1122334455667788)      # in the soft TLB now
        flushes = eng.flushes
        ptr, old = unmap_data_va(hv, dom, v, 0)
        assert eng.flushes == flushes
        assert _access(v, False) == ([], 0x1122334455667788)      # stale, as on Xen
        mmu_ops._mmuext_one(v, mmu_ops.MmuExt.TLB_FLUSH_LOCAL, 0, 0)   # the guest's flush
        assert _access(v, False) == ([(14, DATA_VA)], 0)
        pt.update_entry(dom.domid, ptr, old)
        eng.flush_tlb()


async def test_unmapped_frame_freed_without_a_flush_is_not_reachable(monkeypatch):
    """Unmapped with no flush, then given back (decrease_reservation's free): the frame may
    go to another domain, so the stale translation must not survive until the guest
    flushes. The fallback where MADV_REMOVE fails (the frame keeps its bytes until it is
    zeroed at the next allocation) is the path taken, so the stale read would see them."""
    async with _hand_driven_vcpu(("rip", "rax")) as (hv, dom, v):
        check_freed_frame_unreachable(hv, dom, v, monkeypatch)


async def test_write_protected_frame_becoming_a_page_table_is_not_writable():
    """Write-protected with no flush (fork's wrprotect, Linux making a page-table page
    read-only before pinning it), then validated as an L1: a stale writable translation
    would let the guest write a live page table, i.e. map any frame."""
    async with _hand_driven_vcpu(("rip", "rax")) as (hv, dom, v):
        frame = hv.pagetables.translate(v.kernel_root << 12, DATA_VA, False) >> 12
        assert _access(v, True)[0] == []                   # a writable translation cached
        ptr, old = unmap_data_va(hv, dom, v, None)         # RW cleared
        assert _access(v, True)[0] == []                   # still writable: not flushed
        check_pinned_l1_not_writable(hv, dom, v, frame, ptr, old)


async def test_closed_engine_is_forgotten():
    """A destroyed domain's engines leave MachineMemory.tlb_engines (no flush of a closed
    Unicorn instance when a later frame is freed)."""
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
        dom = await hv.create(kernel(), memory_mib=8, cmdline="ticks=1 spin=0")
        await dom.wait_for_line(r"^spin 1$", timeout=30)
        engines = [v.engine for v in dom.vcpus]
        assert all(e in hv.mem.tlb_engines for e in engines)
        dom.shutdown(ShutdownReason.poweroff)
        await dom.wait()
        for _ in range(100):
            if not any(e in hv.mem.tlb_engines for e in engines):
                break
            await asyncio.sleep(0.05)
        assert not any(e in hv.mem.tlb_engines for e in engines)
