"""The KVM engine's shadow guard (kvm_engine._ShadowGuard) defers forgetting a removed or
reduced L1 entry of the domain's own frame until the guest flushes its TLB, as Xen leaves a
stale translation in the TLB after mmu_update, update_va_mapping without flush flags or a
ptwr store (the guest flushes when it needs to). Linux's mark_rodata_ro changes ~30,000
PTEs with one mmu_update each and flushes once: one invalidation run instead of one per
PTE. Where Xen flushes whatever the guest asked (a frame freed, or taking a page-table
type), the engine must forget them before the guest runs again: those are the attacks."""
from __future__ import annotations

import pytest

from aiovmm import kvm_engine
from conftest import _kvm_skip_reason
from hand_vcpu import (DATA_VA, check_freed_frame_unreachable, check_pinned_l1_not_writable, step_access as _access,
                       unmap_data_va)
from test_kvm import _hand_driven_vcpu

pytestmark = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=_kvm_skip_reason() or "")


def _targeted() -> None:
    if not kvm_engine._TARGETED:
        pytest.skip("targeted invalidation is for kvm-pvm (this host has hardware KVM)")


async def test_removed_mapping_is_forgotten_at_the_guests_flush():
    """An unmap without a flush (mmu_update) costs no invalidation run; the guest's flush
    (MMUEXT_TLB_FLUSH_LOCAL) then makes the page fault."""
    _targeted()
    async with _hand_driven_vcpu(("rip", "rax")) as (hv, dom, v):
        eng, pt, mem = v.engine, hv.pagetables, hv.mem
        mem.write_u64(pt.translate(v.kernel_root << 12, DATA_VA, False), 0x1122334455667788)
        assert _access(v, False) == ([], 0x1122334455667788)          # KVM shadows it now
        ptr = pt.l1_entry_address(v.kernel_root, DATA_VA)
        old = mem.read_u64(ptr)
        runs = eng.invalidations
        assert pt.update_entry(dom.domid, ptr, 0)
        eng.pt_written()                                   # what mmu_update does now
        _access(v, False)                                  # a KVM_RUN: nothing run for it
        assert eng.invalidations == runs
        eng.flush_tlb()                                    # the guest's flush
        assert _access(v, False) == ([(14, DATA_VA)], 0)
        assert eng.invalidations == runs + 1
        pt.update_entry(dom.domid, ptr, old)
        eng.flush_tlb()


async def test_unmapped_frame_freed_without_a_flush_is_not_reachable(monkeypatch):
    """Unmapped with no flush, then given back (decrease_reservation): the frame may go to
    another domain, so the stale translation must not survive until the guest flushes.
    The free's MADV_REMOVE of the frame would make KVM drop its mapping by itself (the MMU
    notifier); its fallback, where madvise fails and the frame is zeroed at the next
    allocation, must not depend on that, so it is the path taken here."""
    async with _hand_driven_vcpu(("rip", "rax")) as (hv, dom, v):
        check_freed_frame_unreachable(hv, dom, v, monkeypatch)


async def test_write_protected_frame_becoming_a_page_table_is_not_writable():
    """Write-protected with no flush (fork's wrprotect, a ptwr store), then validated as an
    L1: a stale writable translation would let the guest write a live page table."""
    async with _hand_driven_vcpu(("rip", "rax")) as (hv, dom, v):
        frame = hv.pagetables.translate(v.kernel_root << 12, DATA_VA, False) >> 12
        assert _access(v, True)[0] == []                   # KVM: writable shadow entry
        ptr, old = unmap_data_va(hv, dom, v, None)         # RW cleared
        assert _access(v, False)[0] == []                  # the guest runs on: not flushed
        check_pinned_l1_not_writable(hv, dom, v, frame, ptr, old)


async def test_foreign_entry_removed_without_a_flush_is_forgotten_at_once(monkeypatch):
    """The guard defers only entries that named the table's own domain's frames: one that
    named another domain's frame (a grant mapping) is forgotten before the next KVM_RUN on
    the guard's own account, whether or not the path that removed it flushes. Every such
    path flushes today (grant unmap, ptwr's scratch), so the unmap's flush is taken out
    here: the granter then reuses its frame, and the grantee's next read through the VA
    must fault, not see the granter's new contents through KVM's shadow."""
    from aiovmm import grants
    from conftest import kernel
    async with _hand_driven_vcpu(("rip", "rax")) as (hv, dom, v):
        eng, pt, mem = v.engine, hv.pagetables, hv.mem
        g = await hv.create(kernel(), memory_mib=8, cmdline="ticks=1 spin=0")
        g.paused = True
        frame = next(f for f in sorted(g.frames) if not mem.in_use(f))   # no type, no mapping
        ptr, old = unmap_data_va(hv, dom, v, 0)
        eng.flush_tlb()
        ref = 100
        g.grants.write_entry(ref, grants.GTF_permit_access | grants.GTF_readonly, dom.domid, frame)
        handle, _ = grants.map_grant(v, DATA_VA, grants.GNTMAP_host_map | grants.GNTMAP_readonly,
                                     ref, g.domid)
        mem.write_u64(frame << 12, 0x6767676767676767)
        assert _access(v, False) == ([], 0x6767676767676767)          # KVM shadows it now
        with monkeypatch.context() as m:
            m.setattr(grants, "_flush", lambda d: None)                 # a path without a flush
            grants.unmap_grant(dom, handle, DATA_VA)
        assert mem.read_u64(ptr) == 0 and not mem.in_use(frame)
        mem.write_u64(frame << 12, 0x5EC2E75EC2E75EC2)                # the granter's again
        assert _access(v, False) == ([(14, DATA_VA)], 0)
        g.grants.write_entry(ref, 0, 0, 0)
        pt.update_entry(dom.domid, ptr, old)
        eng.flush_tlb()
        g.destroy_requested = True
