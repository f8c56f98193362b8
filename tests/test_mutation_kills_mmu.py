"""Page-table checks (mmu.py) that bench/mutants.py exercised (issue 9, mutation testing),
driven as a hostile guest would: a parked domain (lab.park) writes only its own frames and
makes mmu_update / mmuext_op / grant hypercalls; the auditor checks every count after."""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor, hypercall, lab
from aiovmm.abi import (HYPERVISOR_VIRT_END, HYPERVISOR_VIRT_START, PAGE_SHIFT, XEN_L4_FIRST,
                        XEN_L4_LAST, _PAGE_ACCESSED, _PAGE_PRESENT, _PAGE_RW, _PAGE_USER, Errno, Hypercall, MmuExt)
from aiovmm.audit import audit
from aiovmm.grants import GTF_permit_access, GntSt
from aiovmm.memory import PageType
from aiovmm.mmu import GuestFault
from conftest import kernel

TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED
RO = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED
EINVAL, EPERM, EBUSY = -int(Errno.EINVAL), -int(Errno.EPERM), -int(Errno.EBUSY)


def run(coro):
    return asyncio.run(coro)


def attacker_and_bystander(hv) -> tuple[lab.Parked, lab.Parked]:
    """Two parked domains of the project's kernel: a, which makes the calls, then b, whose
    frames a must not reach."""
    return lab.park(hv, kernel(), 8, "a"), lab.park(hv, kernel(), 8, "b")


def clean(hv) -> None:
    problems = audit(hv)
    assert not problems, "\n".join(problems[:10])


def test_l4_xen_slots_are_xens():
    """A new L4: whatever the guest left in Xen's slots (256..271, both ends included) is
    replaced by Xen's entries at validation and never validated as the guest's; the slots
    next to them (255, 272) are the guest's. mmu_update of a Xen slot is -EINVAL; unpinning
    the L4 drops no reference on Xen's tables."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a, b = attacker_and_bystander(hv)
            mem = hv.mem
            l4, l3 = a.spare[0], a.spare[1]
            foreign = (b.spare[0] << PAGE_SHIFT) | TABLE          # would be refused if validated
            for slot in (XEN_L4_FIRST, XEN_L4_LAST):
                mem.write_u64((l4 << PAGE_SHIFT) + 8 * slot, foreign)
            xen_counts = {s: (mem.type[e >> PAGE_SHIFT & ((1 << 40) - 1)], mem.type_count[e >> PAGE_SHIFT & ((1 << 40) - 1)])
                          for s, e in hv.xen.slots.items() if e & _PAGE_PRESENT}
            assert a.mmuext(MmuExt.PIN_L4_TABLE, l4) == 0
            for slot in range(XEN_L4_FIRST, XEN_L4_LAST + 1):
                assert mem.read_u64((l4 << PAGE_SHIFT) + 8 * slot) == hv.xen.slots.get(slot, 0)
            for slot in (XEN_L4_FIRST, XEN_L4_LAST):
                assert a.mmu_update(((l4 << PAGE_SHIFT) + 8 * slot, (l3 << PAGE_SHIFT) | TABLE)) == (EINVAL, 0)
            assert mem.type_count[l3] == 0
            for slot in (XEN_L4_FIRST - 1, XEN_L4_LAST + 1):
                assert a.mmu_update(((l4 << PAGE_SHIFT) + 8 * slot, (l3 << PAGE_SHIFT) | TABLE)) == (0, 1)
                assert a.mmu_update(((l4 << PAGE_SHIFT) + 8 * slot, 0)) == (0, 1)
            clean(hv)
            assert a.mmuext(MmuExt.UNPIN_TABLE, l4) == 0
            for s, e in hv.xen.slots.items():
                if e & _PAGE_PRESENT:
                    f = e >> PAGE_SHIFT & ((1 << 40) - 1)
                    assert (mem.type[f], mem.type_count[f]) == xen_counts[s]
            assert mem.type_count[b.spare[0]] == 0
            clean(hv)
    run(main())


def test_l1_entries_past_memory_are_eperm():
    """An L1 entry naming a frame at or past the end of machine memory is not RAM: -EPERM,
    by mmu_update and by pinning a table containing one; the last frames of memory exist
    (Xen's M2P, not the guest's: -EBUSY)."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            mem = hv.mem
            t = a.spare[0]
            assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
            nr = mem.nr_frames
            for frame in (nr, nr + 1, 2 * nr - 1, (1 << 40) - 1):
                assert a.mmu_update(((t << PAGE_SHIFT) + 8, (frame << PAGE_SHIFT) | RO)) == (EPERM, 0), frame
            assert a.mmu_update(((t << PAGE_SHIFT) + 8, ((nr - 1) << PAGE_SHIFT) | RO)) == (EBUSY, 0)
            u = a.spare[1]
            for frame in (nr, nr + 1, 2 * nr - 1):
                mem.write_u64((u << PAGE_SHIFT) + 16, (frame << PAGE_SHIFT) | RO)
                assert a.mmuext(MmuExt.PIN_L1_TABLE, u) == EPERM, frame
                assert mem.type_count[u] == 0
            mem.write_u64((u << PAGE_SHIFT) + 16, 0)
            clean(hv)
    run(main())


def test_an_l1_mapping_itself_read_only():
    """An L1 with a read-only entry mapping the L1 itself (Xen allows it: a general
    reference, no writable type): pin, unpin; every reference it took is dropped."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            mem = hv.mem
            t = a.spare[0]
            mem.write_u64((t << PAGE_SHIFT) + 8, (t << PAGE_SHIFT) | RO)
            assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
            assert mem.refs[t] == 1
            clean(hv)
            assert a.mmuext(MmuExt.UNPIN_TABLE, t) == 0
            assert (mem.refs[t], mem.type_count[t]) == (0, 0)
            clean(hv)
    run(main())


def test_hypervisor_area_is_not_guest_memory():
    """Guest buffers of hypercalls are guest virtual addresses outside Xen's area: a pointer
    into 0xffff800000000000.. (where Xen's M2P is mapped read-only) or a non-canonical one
    faults (-EFAULT) like an unmapped one; the guest's own pages work."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            v = a.v
            for va in (HYPERVISOR_VIRT_START, HYPERVISOR_VIRT_START + 4096, HYPERVISOR_VIRT_END - 8,
                       1 << 47, (1 << 63)):
                with pytest.raises(GuestFault):
                    v.copy_from_guest(va, 8)
            assert v.copy_from_guest(a.args_va, 8) is not None
            with pytest.raises(GuestFault):                      # read-only: no write
                v.copy_to_guest(a.lay.va(a.lay.pt_pfn), b"x")
    run(main())


def test_grant_map_through_a_linear_l2_entry_is_refused():
    """A read-only "linear" L2 entry naming another L2 table (Xen allows it): a VA mapped
    through it is not mapped through an L1, so GNTTABOP_map_grant_ref there is
    bad_virt_addr and the L2 table is not written."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            b = lab.park(hv, kernel(), 8, "granter")
            a = lab.park(hv, kernel(), 8, "grantee")
            mem = hv.mem
            va = a.free_l2_va()
            l2e = a.l2_entry(va)
            l2 = l2e >> PAGE_SHIFT
            other = a.spare[0]
            assert a.mmuext(MmuExt.PIN_L2_TABLE, other) == 0
            assert a.mmu_update((l2e, (other << PAGE_SHIFT) | RO)) == (0, 1)
            assert mem.type[other] == PageType.l2
            b.write_grant(10, GTF_permit_access, a.domid, b.spare[0])
            before = mem.read(other << PAGE_SHIFT, 4096)
            st, _h = a.map_grant(b.domid, 10, va + 3 * 4096)
            assert st == GntSt.bad_virt_addr
            assert mem.read(other << PAGE_SHIFT, 4096) == before
            assert a.mmu_update((l2e, 0)) == (0, 1)
            clean(hv)
    run(main())


def test_mmu_update_of_a_writable_data_frame_is_a_plain_store():
    """MMU_NORMAL_PT_UPDATE on a frame that is not a page table (untyped, or typed writable
    because the guest maps it RW) is a checked plain store, as Xen's writable-page case."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            mem = hv.mem
            t, d = a.spare[0], a.spare[1]
            assert a.mmu_update(((d << PAGE_SHIFT) + 8, 0x1122334455667788)) == (0, 1)
            assert mem.read_u64((d << PAGE_SHIFT) + 8) == 0x1122334455667788
            assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
            assert a.mmu_update(((t << PAGE_SHIFT) + 8, (d << PAGE_SHIFT) | TABLE)) == (0, 1)
            assert (mem.type[d], mem.type_count[d]) == (PageType.writable, 1)
            assert a.mmu_update(((d << PAGE_SHIFT) + 16, 0xABCDEF)) == (0, 1)
            assert mem.read_u64((d << PAGE_SHIFT) + 16) == 0xABCDEF
            clean(hv)
    run(main())


def test_pinning_an_l1_validates_every_entry():
    """Pinning an L1 validates all 512 entries as the guest wrote them (Xen's
    alloc_l1_table): an entry naming another domain's frame is -EBUSY, one with a flag an
    L1 entry may not carry (PCD/PWT/PAT cache attributes) -EINVAL; nothing is taken."""
    from aiovmm.abi import _PAGE_PCD

    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a, b = attacker_and_bystander(hv)
            mem = hv.mem
            t, d = a.spare[0], a.spare[1]
            for e, rc in (((b.spare[0] << PAGE_SHIFT) | RO, EBUSY),
                          ((d << PAGE_SHIFT) | RO | _PAGE_PCD, EINVAL)):
                mem.write_u64((t << PAGE_SHIFT) + 8 * 5, (d << PAGE_SHIFT) | RO)
                mem.write_u64((t << PAGE_SHIFT) + 8 * 9, e)
                assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == rc
                assert (mem.type_count[t], mem.refs[d], mem.refs[b.spare[0]]) == (0, 0, 0)
            mem.write_u64((t << PAGE_SHIFT) + 8 * 9, 0)
            assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0 and mem.refs[d] == 1
            clean(hv)
    run(main())


def test_pinning_an_l1_takes_its_writable_references_all_or_nothing():
    """Validating an L1 takes one writable reference per writable entry (twice for a frame
    mapped twice) and one general reference per entry. An entry refused (writable to a page
    table: -EBUSY) after others were accepted leaves none of theirs behind."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            mem = hv.mem
            t, d1, d2, pt = a.spare[:4]
            assert a.mmuext(MmuExt.PIN_L1_TABLE, pt) == 0
            base = t << PAGE_SHIFT
            for slot, f in ((3, d1), (4, d2), (5, d1), (7, pt)):
                mem.write_u64(base + 8 * slot, (f << PAGE_SHIFT) | RO | _PAGE_RW)
            assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == EBUSY
            assert [(mem.type[f], mem.type_count[f], mem.refs[f]) for f in (t, d1, d2)] == [(PageType.none, 0, 0)] * 3
            assert (mem.type[pt], mem.type_count[pt], mem.refs[pt]) == (PageType.l1, 1, 0)
            mem.write_u64(base + 8 * 7, (pt << PAGE_SHIFT) | RO)
            assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
            assert [(mem.type[f], mem.type_count[f], mem.refs[f]) for f in (d1, d2)] == \
                [(PageType.writable, 2, 2), (PageType.writable, 1, 1)]
            assert (mem.type_count[pt], mem.refs[pt]) == (1, 1)
            clean(hv)
            assert a.mmuext(MmuExt.UNPIN_TABLE, t) == 0
            assert [(mem.type[f], mem.type_count[f], mem.refs[f]) for f in (t, d1, d2)] == [(PageType.none, 0, 0)] * 3
            assert mem.refs[pt] == 0
            clean(hv)
    run(main())


def test_baseptr_past_memory_is_einval():
    """NEW_BASEPTR / NEW_USER_BASEPTR naming a frame past machine memory: -EINVAL (get_type
    checks the frame exists before anything else), the roots unchanged."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            kr, ur = a.v.kernel_root, a.v.user_root
            for cmd in (MmuExt.NEW_BASEPTR, MmuExt.NEW_USER_BASEPTR):
                for mfn in (hv.mem.nr_frames, hv.mem.nr_frames + 5, (1 << 40) - 1):
                    assert a.mmuext(cmd, mfn) == EINVAL
            assert (a.v.kernel_root, a.v.user_root) == (kr, ur)
    run(main())


def test_mmu_update_refuses_disallowed_flags():
    """mmu_update of an L1 entry with a cache-attribute flag (PCD) or of an L2 entry with
    PSE (a superpage: not for PV guests): -EINVAL, the entry unchanged."""
    from aiovmm.abi import _PAGE_PCD, _PAGE_PSE

    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            mem = hv.mem
            t, d = a.spare[0], a.spare[1]
            assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
            assert a.mmu_update(((t << PAGE_SHIFT) + 8, (d << PAGE_SHIFT) | RO | _PAGE_PCD)) == (EINVAL, 0)
            assert mem.read_u64((t << PAGE_SHIFT) + 8) == 0 and mem.refs[d] == 0
            l2e = a.l2_entry(a.free_l2_va())
            assert a.mmu_update((l2e, (t << PAGE_SHIFT) | TABLE | _PAGE_PSE)) == (EINVAL, 0)
            assert mem.read_u64(l2e) == 0 and mem.type_count[t] == 1
            clean(hv)
    run(main())


def test_linear_entry_to_another_domains_table_is_refused():
    """A read-only "linear" L2 entry naming another domain's validated L2 (same level, so
    the linear-entry rule would take it without get_type): -EINVAL, because an Ln entry
    may name only the caller's own frames; the foreign table's type count is unchanged and
    the L2 slot stays empty. (Accepting it would give read access to every frame b's L1s
    map.)"""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            b = lab.park(hv, kernel(), 8, "b")
            a = lab.park(hv, kernel(), 8, "a")
            mem = hv.mem
            foreign = b.spare[0]
            assert b.mmuext(MmuExt.PIN_L2_TABLE, foreign) == 0
            count = mem.type_count[foreign]
            va = a.free_l2_va()
            l2e = a.l2_entry(va)
            assert a.mmu_update((l2e, (foreign << PAGE_SHIFT) | RO)) == (EINVAL, 0)
            assert mem.type_count[foreign] == count
            assert not mem.read_u64(l2e) & _PAGE_PRESENT
            clean(hv)
    run(main())


def test_read_only_self_entry_takes_no_reference():
    """A read-only self entry (an L2 slot naming its own L2, the classic linear slot) is
    allowed and takes no type reference: writing and clearing it leaves the table's type
    count as it was (a reference to itself would keep the table alive forever)."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            mem = hv.mem
            va = a.free_l2_va()
            l2e = a.l2_entry(va)
            l2 = l2e >> PAGE_SHIFT
            count = mem.type_count[l2]
            assert a.mmu_update((l2e, (l2 << PAGE_SHIFT) | RO)) == (0, 1)
            assert mem.type_count[l2] == count
            assert a.mmu_update((l2e, 0)) == (0, 1)
            assert mem.type_count[l2] == count
            clean(hv)
    run(main())


def test_writable_linear_entry_is_refused():
    """A linear L2 entry naming another of the domain's validated L2s must be read-only
    (Xen's rule): written RW it would map that L2's entries - the L1 tables - writable,
    so the guest could write any PTE. -EINVAL, the slot stays empty, the target's type
    count unchanged; the read-only one is accepted."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            mem = hv.mem
            other = a.spare[0]
            assert a.mmuext(MmuExt.PIN_L2_TABLE, other) == 0
            count = mem.type_count[other]
            l2e = a.l2_entry(a.free_l2_va())
            assert a.mmu_update((l2e, (other << PAGE_SHIFT) | TABLE)) == (EINVAL, 0)
            assert not mem.read_u64(l2e) & _PAGE_PRESENT
            assert mem.type_count[other] == count
            assert a.mmu_update((l2e, (other << PAGE_SHIFT) | RO)) == (0, 1)
            assert mem.type_count[other] == count + 1
            assert a.mmu_update((l2e, 0)) == (0, 1)
            assert mem.type_count[other] == count
            clean(hv)
    run(main())


def test_mmu_update_of_another_domains_frame_is_refused():
    """MMU_NORMAL_PT_UPDATE whose ptr lies in another domain's frame (a data frame, or one
    of its page tables): -EINVAL, the frame unchanged - not a plain store into b's memory."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            b = lab.park(hv, kernel(), 8, "b")
            a = lab.park(hv, kernel(), 8, "a")
            mem = hv.mem
            for frame in (b.spare[1], b.v.kernel_root):
                before = mem.read(frame << PAGE_SHIFT, 4096)
                assert a.mmu_update(((frame << PAGE_SHIFT) + 8, 0x4141414141414000)) == (EINVAL, 0)
                assert mem.read(frame << PAGE_SHIFT, 4096) == before
            clean(hv)
    run(main())


def test_mmu_update_of_a_descriptor_page_is_refused():
    """A frame typed seg_desc (a GDT frame, set by HYPERVISOR_set_gdt) is neither a page
    table nor a data frame: MMU_NORMAL_PT_UPDATE into it is -EINVAL and it is unchanged."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            mem = hv.mem
            gdt = a.spare[0]
            mem.write(gdt << PAGE_SHIFT, bytes(4096))
            arg = a._args(gdt.to_bytes(8, "little"), 0)
            assert hypercall.call(a.v, Hypercall.set_gdt, arg, 16) == 0
            assert mem.type[gdt] == PageType.seg_desc
            for val in (0x00CF9A000000FFFF, 0xDEAD0000):          # present, and not present
                assert a.mmu_update(((gdt << PAGE_SHIFT) + 8, val)) == (EINVAL, 0)
            assert mem.read(gdt << PAGE_SHIFT, 4096) == bytes(4096)
    run(main())


def test_update_va_mapping_does_not_walk_a_not_present_entry():
    """A not-present L2 entry is the guest's to fill with any bits (here the frame number of
    one of its own L1s): update_va_mapping of a VA under it is -EINVAL (no L1 maps it), and
    that L1 is not written."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            mem = hv.mem
            l1 = a.l1_of(a.lay.va(0)) >> PAGE_SHIFT
            va = a.free_l2_va()
            l2e = a.l2_entry(va)
            assert a.mmu_update((l2e, l1 << PAGE_SHIFT)) == (0, 1)   # not present: any bits
            before = mem.read(l1 << PAGE_SHIFT, 4096)
            pte = (a.spare[1] << PAGE_SHIFT) | RO
            assert hypercall.call(a.v, Hypercall.update_va_mapping, va, pte, 0) == EINVAL
            assert mem.read(l1 << PAGE_SHIFT, 4096) == before
            assert a.mmu_update((l2e, 0)) == (0, 1)
            clean(hv)
    run(main())


def test_first_page_past_xens_area_is_guest_memory():
    """The first VA past Xen's area (HYPERVISOR_VIRT_END, L4 slot 272) is the guest's: with
    its own L3/L2/L1 there (Linux maps its direct map from 0xffff888000000000), a hypercall
    buffer at exactly that address works; 8 bytes below it is Xen's (-EFAULT)."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            v, mem = a.v, hv.mem
            l3, l2, l1, data = a.spare[:4]
            root = v.kernel_root << PAGE_SHIFT
            slot = (HYPERVISOR_VIRT_END >> 39) & 0x1FF
            assert slot == XEN_L4_LAST + 1
            assert a.mmu_update(((l3 << PAGE_SHIFT), (l2 << PAGE_SHIFT) | TABLE),
                                ((l2 << PAGE_SHIFT), (l1 << PAGE_SHIFT) | TABLE),
                                ((l1 << PAGE_SHIFT), (data << PAGE_SHIFT) | TABLE)) == (0, 3)
            assert a.mmu_update((root + 8 * slot, (l3 << PAGE_SHIFT) | TABLE)) == (0, 1)
            v.copy_to_guest(HYPERVISOR_VIRT_END, b"\xAA" * 16)
            assert mem.read(data << PAGE_SHIFT, 16) == b"\xAA" * 16
            XENVER_extraversion = 1
            assert hypercall.call(v, Hypercall.xen_version, XENVER_extraversion, HYPERVISOR_VIRT_END) == 0
            assert mem.read(data << PAGE_SHIFT, 16) != b"\xAA" * 16
            assert hypercall.call(v, Hypercall.xen_version, XENVER_extraversion,
                                  HYPERVISOR_VIRT_END - 8) == -int(Errno.EFAULT)
            clean(hv)
    run(main())


def test_teardown_of_a_domains_tables_is_silent(caplog):
    """Destroying a domain devalidates its tables (Xen's relinquish_memory) without a false
    "type count underflow": the L4 skips Xen's slots (Xen's tables hold no reference of the
    guest's), and a table already torn down (here an L1 with a lower frame number than the
    pinned L2 that references it) is not put again. That log line is the hypervisor's alarm
    for a broken count; a dying domain must not raise it."""
    import logging

    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            free0 = hv.mem.free_frames
            a = lab.park(hv, kernel(), 8, "a")
            lo, hi = sorted(a.spare[:2])
            hv.mem.write_u64(hi << PAGE_SHIFT, (lo << PAGE_SHIFT) | TABLE)
            assert a.mmuext(MmuExt.PIN_L2_TABLE, hi) == 0
            assert hv.mem.type[lo] == PageType.l1 and hv.mem.type_count[lo] == 1
            clean(hv)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="aiovmm"):
                lab.destroy(a)
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
            assert hv.mem.free_frames == free0
            clean(hv)
    run(main())
