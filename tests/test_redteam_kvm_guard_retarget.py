"""Red-team: the KVM shadow guard (kvm_engine._ShadowGuard, csrc/kvm.c aiovmm_kvm_guard_frame)
must track every table KVM can reach. A table is linked in not only by an entry that becomes
present: also by an upper-level entry that mmu_update retargets from one present table to
another (Xen's mod_l2_entry takes the new L1 and puts the old one in one write), and by an
entry cleared and set back to the same table in one batch (the table devalidated and
validated anew, the entry unchanged at the next check). If the guard does not track such a
table, its later changes (written by the host through the memfd, never seen by KVM) are never
invalidated, not even at the guest's TLB flush: the guest keeps a writable translation of a
frame it no longer maps, makes that frame an L1 (validated empty), writes an entry naming
another domain's frame into it through the stale translation and links it in.

Xen: the unmap plus MMUEXT_TLB_FLUSH_LOCAL leave no translation of the frame; the store after
them is #PF, and the L1 stays as validated. Hand-driven on the project's kernel (its boot map
ends at 0xFFFFFFFF80400000: the L2 slot of REGION is free), next to the bystander guest."""
from __future__ import annotations

import pytest

from aiovmm import mmu_ops
from aiovmm.memory import PageType
from conftest import _kvm_skip_reason
from hand_vcpu import CODE_VA
from test_hostile import bystander_after, start_bystander
from test_kvm import _hand_driven_vcpu

pytestmark = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=_kvm_skip_reason() or "")

REGION = 0xFFFFFFFF80400000            # the first 2 MiB past the kernel's boot map
ENTRY = 0x67                           # present, RW, user, accessed, dirty


def _store(v, va: int, value: int) -> list:
    """Step one `movabs %rax, va` with RAX = `value` from CODE_VA: the faults it raised."""
    eng = v.engine
    v.copy_to_guest(CODE_VA, b"\x48\xa3" + va.to_bytes(8, "little") + b"\xeb\xfe")
    faults = []
    on_exc, eng.on_exception = eng.on_exception, lambda vec, err, cr2: (faults.append((vec, cr2)), eng.stop())
    try:
        eng.write({"rip": CODE_VA, "rax": value})
        eng.step_to(CODE_VA + 10)
    finally:
        eng.on_exception = on_exc
    return faults


def _l2_slot(v, mem) -> int:
    """Machine address of REGION's entry in the kernel's L2 (free: the boot map ends there)."""
    t = v.kernel_root
    for shift in (39, 30):
        t = mem.read_u64((t << 12) + 8 * ((REGION >> shift) & 0x1FF)) >> 12 & 0xFFFFFFFFFF
    assert mem.type[t] == PageType.l2
    e = (t << 12) + 8 * ((REGION >> 21) & 0x1FF)
    assert mem.read_u64(e) == 0
    return e


async def _attack(link) -> None:
    """REGION -> L1 A -> X, stored to (KVM shadows A); then `link(v, pt, mem, dom, e, a,
    b, y)` gives KVM an L1 (returned) mapping REGION to Y, stored to; then the chain: Y
    unmapped, the TLB flushed, Y pinned as an empty L1, a store of an entry naming a
    bystander's frame through REGION, Y linked in, a store through REGION. On Xen both
    stores are #PF."""
    async with _hand_driven_vcpu(("rip", "rax")) as (hv, dom, v):
        by, before = await start_bystander(hv)
        eng, pt, mem = v.engine, hv.pagetables, hv.mem
        victim = sorted(by.p2m)[len(by.p2m) // 2]
        e = _l2_slot(v, mem)
        a, b, x, y = frames = mem.alloc(dom.domid, 4)                   # L1s A, B; data X, Y
        dom.frames.update(frames)
        faults = []
        try:
            mem.write_u64(a << 12, (x << 12) | ENTRY)
            mem.write_u64(b << 12, (y << 12) | ENTRY)
            pt.update_entry(dom.domid, e, (a << 12) | ENTRY)            # REGION -> L1 A -> X
            mmu_ops.written_all(v)
            assert _store(v, REGION, 1) == [] and mem.read_u64(x << 12) == 1
            l1 = link(v, pt, mem, dom.domid, e, a, b, y)
            mmu_ops.written_all(v)
            assert _store(v, REGION, 2) == [] and mem.read_u64(y << 12) == 2   # KVM shadows it
            assert pt.update_entry(dom.domid, l1 << 12, 0)              # Y unmapped ...
            mmu_ops.written_all(v)
            eng.flush_tlb()                                             # ... and the TLB flushed
            mem.zero(y)
            pt.get_type(y, PageType.l1, dom.domid)                      # Y: an empty, pinned L1
            # Through a stale writable translation this store would put an entry naming the
            # bystander's frame into a validated L1.
            faults += _store(v, REGION, (victim << 12) | ENTRY)
            landed = mem.read_u64(y << 12)
            pt.update_entry(dom.domid, e, (y << 12) | ENTRY)            # linked in
            mmu_ops.written_all(v)
            faults += _store(v, REGION, 0x5EC2E7)
        finally:
            mem.write_u64(y << 12, 0)             # nothing of a failed run taken as a reference
            pt.update_entry(dom.domid, e, 0)
            mmu_ops.written_all(v)
            if mem.type[y] == PageType.l1:
                pt.put_type(y)
            eng.flush_tlb()
        written = mem.read_u64(victim << 12)
        same, alive, hello = await bystander_after(hv, by, before)
        assert same, f"the bystander's frame was written through the guest's own L1: {written:#x}"
        assert landed == 0, f"a store landed in a pinned L1: {landed:#x}"
        assert faults == [(14, REGION), (14, REGION)]
        assert alive and any("hello" in line.lower() for line in hello)


def _retarget(v, pt, mem, dom, e, a, b, y) -> int:
    """REGION's L2 entry retargeted from A to B (-> Y) in one write."""
    assert pt.update_entry(dom, e, (b << 12) | ENTRY)
    return b


def _unlink_relink(v, pt, mem, dom, e, a, b, y) -> int:
    """One mmu_update batch: REGION's L2 entry cleared (A, no longer referenced, loses its
    type: devalidated) and set again to A, now mapping Y (validated anew): the entry ends as
    it was at the last check, A is a table again."""
    assert pt.update_entry(dom, e, 0)
    assert mem.type[a] == PageType.none
    mem.write_u64(a << 12, (y << 12) | ENTRY)
    pt.update_entry(dom, e, (a << 12) | ENTRY)
    return a


async def test_retargeted_l2_entry_tracks_the_new_l1():
    await _attack(_retarget)


async def test_l1_devalidated_and_relinked_in_one_batch_stays_tracked():
    await _attack(_unlink_relink)


def _tracked_as_data(v, pt, mem, dom, e, a, b, y) -> int:
    """An L2 T linked at a free slot of the kernel's L3 (tracked at level 2, checked), then
    in one batch: T unlinked (devalidated) and validated anew as an L1 mapping B, a data
    frame of zeros. At the check T is a page table again and was walked again at its old
    level 2: B, a data page, was tracked as an L1 with its contents (zeros) as the
    snapshot. Then B, holding an entry for Y, pinned and linked in at REGION's L2 entry in
    place of A: already tracked, it is not walked again, and its snapshot still says the
    entry is zero when mmu_update clears it (no change seen: not invalidated)."""
    t = mem.alloc(dom, 1)[0]
    v.domain.frames.add(t)
    l3 = v.kernel_root
    l3 = mem.read_u64((l3 << 12) + 8 * ((REGION >> 39) & 0x1FF)) >> 12 & 0xFFFFFFFFFF
    assert mem.type[l3] == PageType.l3
    l3e = next((l3 << 12) + 8 * i for i in range(509, 0, -1) if mem.read_u64((l3 << 12) + 8 * i) == 0)
    mem.zero(b)
    assert pt.update_entry(dom, l3e, (t << 12) | ENTRY) is not None      # T: an empty L2
    mmu_ops.written_all(v)
    assert _store(v, REGION, 3) == []                                    # checked: T tracked
    pt.update_entry(dom, l3e, 0)                                         # one batch: T untyped ...
    assert mem.type[t] == PageType.none
    mem.write_u64(t << 12, (b << 12) | 0x65)                             # ... and an L1 -> B (RO)
    pt.get_type(t, PageType.l1, dom)
    mmu_ops.written_all(v)
    assert _store(v, REGION, 4) == []                                    # checked
    pt.put_type(t)                                                       # T gone; B is data
    mmu_ops.written_all(v)
    assert mem.type[b] == PageType.none
    mem.write_u64(b << 12, (y << 12) | ENTRY)
    pt.update_entry(dom, e, (b << 12) | ENTRY)                           # B: an L1 in A's place
    return b


async def test_table_revalidated_at_a_lower_level_tracks_no_data_frame():
    """A table devalidated and validated anew at another level in one batch (an L2 made an
    L1) is walked again at the level its type has now, not at the one it was tracked at:
    walked as an L2, the L1's data frames were tracked as tables, with snapshots of their
    data; one made a page table later is already tracked and never walked again, and its
    entries' changes are diffed against that data (critical: the bystander's frame written)."""
    await _attack(_tracked_as_data)
