"""MachineMemory checks (alloc / free / the writable type) that bench/mutants.py found
untested (issue 9, mutation testing). The frame-freeing rule is reached the way a guest
reaches it, XENMEM_decrease_reservation; the allocator and the writable-reference
underflow guard (hypervisor bugs, not guest input) directly on the real object."""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor, lab
from aiovmm.abi import PAGE_SHIFT, _PAGE_ACCESSED, _PAGE_PRESENT, _PAGE_RW, _PAGE_USER, MmuExt
from aiovmm.audit import audit
from aiovmm.memory import MachineMemory, OutOfMemory, PageType
from conftest import kernel

MIB = 64
TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED


def run(coro):
    return asyncio.run(coro)


def _hook_table(a: lab.Parked, pin: bool) -> tuple[int, int]:
    """A spare frame made an L1 table (pinned or not) in a free L2 slot; returns
    (table frame, VA it maps)."""
    t = a.spare[0]
    va = a.free_l2_va()
    if pin:
        assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
    assert a.mmu_update((a.l2_entry(va), (t << PAGE_SHIFT) | TABLE)) == (0, 1)
    return t, va


def test_decrease_reservation_keeps_a_mapped_frame_until_unmapped():
    """A frame the guest still maps, read-only (a general reference, no type): Xen's
    guest_remove_page counts it done but the page lives while referenced. Handing it out
    now would leave the guest a mapping of the next domain's frame: it stays the domain's
    (and counted) until the mapping goes, then it is freed."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            t, va = _hook_table(a, pin=True)
            f = a.spare[1]
            pte = (t << PAGE_SHIFT) + 8 * 3
            assert a.mmu_update((pte, (f << PAGE_SHIFT) | _PAGE_PRESENT | _PAGE_USER)) == (0, 1)
            assert (hv.mem.refs[f], hv.mem.type_count[f], hv.mem.pinned[f]) == (1, 0, 0)
            free0 = hv.mem.free_frames
            assert a.decrease_reservation(f) == 1
            assert hv.mem.owner[f] == a.domid and f in a.dom.frames and hv.mem.free_frames == free0
            assert audit(hv) == []
            assert a.mmu_update((pte, 0)) == (0, 1)
            assert f not in a.dom.frames and hv.mem.owner[f] != a.domid and hv.mem.free_frames == free0 + 1
            assert audit(hv) == []
    run(main())


def test_decrease_reservation_keeps_a_live_unpinned_table_until_unhooked():
    """An L1 table hooked into an L2 but neither pinned nor mapped (a type reference only):
    freed now, the L2 would point at a frame the next owner writes. Counted done, it stays
    the domain's, still an L1, until the L2 entry goes."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            t, va = _hook_table(a, pin=False)
            assert (hv.mem.refs[t], hv.mem.type[t], hv.mem.pinned[t]) == (0, PageType.l1, 0)
            assert hv.mem.type_count[t] == 1
            assert a.decrease_reservation(t) == 1
            assert hv.mem.owner[t] == a.domid and hv.mem.type[t] == PageType.l1 and t in a.dom.frames
            assert audit(hv) == []
            assert a.mmu_update((a.l2_entry(va), 0)) == (0, 1)
            assert t not in a.dom.frames and hv.mem.owner[t] != a.domid
            assert audit(hv) == []
    run(main())


def test_alloc_is_all_or_nothing():
    """MachineMemory.alloc hands out exactly what is free: all the free frames work, one
    more is OutOfMemory with nothing taken (never a partial allocation)."""
    mem = MachineMemory(64 * 4096)
    try:
        n = mem.free_frames
        with pytest.raises(OutOfMemory):
            mem.alloc(1, n + 1)
        assert mem.free_frames == n
        frames = mem.alloc(1, n)
        assert len(set(frames)) == n and mem.free_frames == 0
        with pytest.raises(OutOfMemory):
            mem.alloc(1)
        mem.free(frames[:1])
        assert mem.alloc(2) == frames[:1]
    finally:
        mem.close()


def test_put_writable_underflow_is_refused():
    """put_writable without a matching get_writable (a hypervisor bug) raises instead of
    wrapping the count or dropping another type's reference: on an untyped frame, past the
    last reference, and on a page-table frame (a pinned L1 keeps its type and count)."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            mem = hv.mem
            f = a.spare[1]
            with pytest.raises(AssertionError):
                mem.put_writable(f)
            mem.get_writable(f)
            mem.put_writable(f)
            assert (mem.type[f], mem.type_count[f]) == (PageType.none, 0)
            with pytest.raises(AssertionError):
                mem.put_writable(f)
            t = a.spare[0]
            assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
            with pytest.raises(AssertionError):
                mem.put_writable(t)
            assert (mem.type[t], mem.type_count[t]) == (PageType.l1, 1)
            assert audit(hv) == []
    run(main())


def test_a_page_table_never_becomes_writable():
    """get_writable on a frame typed as a page table refuses (NotWritable): a guest's RW PTE
    naming its own pinned L1 is -EBUSY (Xen: get_page_type(PGT_writable_page) fails), the
    L1 keeps its type and count, and no writable reference appears."""
    from aiovmm.abi import Errno
    from aiovmm.memory import NotWritable

    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            t, _va = _hook_table(a, pin=True)
            assert (hv.mem.type[t], hv.mem.type_count[t]) == (PageType.l1, 2)
            with pytest.raises(NotWritable):
                hv.mem.get_writable(t)
            pte = (t << PAGE_SHIFT) + 8 * 7
            rc, done = a.mmu_update((pte, (t << PAGE_SHIFT) | _PAGE_PRESENT | _PAGE_RW | _PAGE_USER))
            assert (rc, done) == (-int(Errno.EBUSY), 0)
            assert hv.mem.read_u64(pte) == 0
            assert (hv.mem.type[t], hv.mem.type_count[t]) == (PageType.l1, 2)
            assert audit(hv) == []
    run(main())
