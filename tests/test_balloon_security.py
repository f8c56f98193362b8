"""The balloon interface a guest drives (XENMEM_decrease_reservation, increase_reservation,
populate_physmap, current/maximum_reservation), attacked through the real handlers on
parked domains (aiovmm.lab), the frame-table auditor after every step.

Rules (Xen's xen/common/memory.c; the deliberate difference is the one test_hostile.py
documents): a frame the domain does not own (another domain's, Xen's, out of range, already
given back) stops the batch (guest_remove_page's get_page fails: the count so far is
returned); a frame still referenced (a live or pinned page table, mapped by the domain's
own L1s, grant-mapped by another domain) counts as done, as in Xen, and is freed on its
last reference, staying the domain's until then: nobody keeps a mapping of a frame that
goes to someone else. A granted but unmapped frame goes back (a grant names a frame, it holds no
reference): the grantee's later map of that grant fails. Growing stops at the domain's
maximum (assign_pages refuses over-allocation); another domain's reservation is EPERM.
"""
from __future__ import annotations

import asyncio
import struct

from aiovmm import Hypervisor, lab, reservation
from aiovmm.abi import DOMID_INVALID, DOMID_SELF, DOMID_XEN, INVALID_M2P_ENTRY, PAGE_SHIFT, Errno, MmuExt, \
    _PAGE_ACCESSED, _PAGE_PRESENT, _PAGE_RW, _PAGE_USER
from aiovmm.audit import audit
from aiovmm.grants import GTF_permit_access, GntSt
from conftest import kernel

TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED
PTE_RO = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED
REF = 12


def clean(hv: Hypervisor) -> None:
    problems = audit(hv)
    assert not problems, "\n".join(problems[:20])


def reserve(p: lab.Parked, op: int, items: list[int], domid: int = DOMID_SELF, order: int = 0) -> tuple[int, list[int]]:
    """A reservation call (extent list at offset 1024 of the argument page); returns
    (extents done or -errno, the extent list as the guest reads it afterwards)."""
    ext = p._args(struct.pack(f"<{len(items)}Q", *items), 1024)
    arg = p._args(reservation.RESERVATION.pack(ext, len(items), order, 0, domid), 64)
    rc = lab._call(reservation.do_memory_op, p.v, op, arg)
    return rc, list(struct.unpack(f"<{len(items)}Q", p.v.copy_from_guest(ext, 8 * len(items))))


def query(p: lab.Parked, op: int, domid: int = DOMID_SELF) -> int:
    return lab._call(reservation.do_memory_op, p.v, op, p._args(struct.pack("<H", domid), 64))


def run(fn) -> None:
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            fn(hv)
    asyncio.run(main())


def test_balloon_down_and_up_again():
    """What Linux's balloon does: give frames back, then populate the same PFNs again; the
    new frames are the domain's, the M2P names their PFNs, the reservation counts follow."""
    def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 8, "balloon")
        mem = hv.mem
        total = query(a, reservation.XENMEM_current_reservation)
        assert total == a.dom.tot_pages and query(a, reservation.XENMEM_maximum_reservation) == total
        frames = a.spare[:4]
        pfns = [mem.m2p[f] for f in frames]
        free0 = mem.free_frames
        assert reserve(a, reservation.XENMEM_decrease_reservation, frames)[0] == 4
        assert query(a, reservation.XENMEM_current_reservation) == total - 4
        assert query(a, reservation.XENMEM_maximum_reservation) == total
        assert mem.free_frames == free0 + 4
        for f in frames:
            assert mem.owner[f] == DOMID_INVALID and mem.m2p[f] == INVALID_M2P_ENTRY
        clean(hv)
        # The same frame again: no longer the domain's, the batch stops there.
        assert reserve(a, reservation.XENMEM_decrease_reservation, frames[:1])[0] == 0
        rc, got = reserve(a, reservation.XENMEM_populate_physmap, pfns)
        assert rc == 4
        for pfn, mfn in zip(pfns, got):
            assert mem.owner[mfn] == a.domid and mem.m2p[mfn] == pfn
        assert query(a, reservation.XENMEM_current_reservation) == total
        clean(hv)
        lab.destroy(a)
        clean(hv)
    run(body)


def test_growing_stops_at_the_maximum():
    def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 8, "greedy")
        total = a.dom.tot_pages
        free0 = hv.mem.free_frames
        for op in (reservation.XENMEM_increase_reservation, reservation.XENMEM_populate_physmap):
            assert reserve(a, op, [0x100])[0] == 0
        assert hv.mem.free_frames == free0
        assert reserve(a, reservation.XENMEM_decrease_reservation, a.spare[:3])[0] == 3
        # Five asked, three fit under the maximum: the count says so, nothing more is taken.
        rc, got = reserve(a, reservation.XENMEM_populate_physmap, [0x10, 0x11, 0x12, 0x13, 0x14])
        assert rc == 3 and got[3:] == [0x13, 0x14]
        assert a.dom.tot_pages == total == a.dom.max_pages
        assert reserve(a, reservation.XENMEM_increase_reservation, [0])[0] == 0
        assert hv.mem.free_frames == free0
        clean(hv)
    run(body)


def test_not_owned_frames_stop_the_batch():
    """Another domain's frame, Xen's (the M2P), out of range: nothing freed from there on,
    the bystander's frame untouched."""
    def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 8, "attacker")
        b = lab.park(hv, kernel(), 8, "bystander")
        mem = hv.mem
        mem.write_u64(b.spare[0] << PAGE_SHIFT, 0x5EC12E7)
        spare = list(a.spare)
        for bad in (b.spare[0], mem.m2p_first, mem.nr_frames, 1 << 52):
            first, last = spare.pop(), spare.pop()
            assert reserve(a, reservation.XENMEM_decrease_reservation, [first, bad, last])[0] == 1
            assert mem.owner[first] == DOMID_INVALID and mem.owner[last] == a.domid
            clean(hv)
        assert mem.owner[b.spare[0]] == b.domid and mem.read_u64(b.spare[0] << PAGE_SHIFT) == 0x5EC12E7
        assert mem.owner[mem.m2p_first] == DOMID_XEN
        # The reservation of another domain: privileged.
        for op in (reservation.XENMEM_decrease_reservation, reservation.XENMEM_populate_physmap):
            assert reserve(a, op, [b.spare[1]], domid=b.domid)[0] == -int(Errno.EPERM)
        assert query(a, reservation.XENMEM_current_reservation, b.domid) == -int(Errno.EPERM)
        assert query(a, reservation.XENMEM_maximum_reservation, 999) == -int(Errno.ESRCH)
        assert mem.owner[b.spare[1]] == b.domid
        clean(hv)
    run(body)


def test_referenced_frames_are_freed_on_their_last_reference():
    """Xen's guest_remove_page: a frame still referenced (a pinned table, a frame its own L1
    maps) is given back all the same (the extent counts as done) but freed only when its
    last reference drops; until then it stays the domain's and counts to its reservation,
    so the domain cannot grow in its place. Xen's shared_info is not the domain's to give."""
    def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 8, "holder")
        mem = hv.mem
        dec = reservation.XENMEM_decrease_reservation
        t, f = a.spare[0], a.spare[1]
        assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
        va = a.free_l2_va()
        assert a.mmu_update((a.l2_entry(va), (t << PAGE_SHIFT) | TABLE)) == (0, 1)
        assert a.mmu_update(((t << PAGE_SHIFT) + 8, (f << PAGE_SHIFT) | PTE_RO)) == (0, 1)
        mem.write_u64(f << PAGE_SHIFT, 0xF00D)
        total, free0 = a.dom.tot_pages, mem.free_frames
        assert reserve(a, dec, [a.dom.shared_info_mfn])[0] == 0
        assert reserve(a, dec, [t, f])[0] == 2
        for frame in (t, f):
            assert mem.owner[frame] == a.domid and frame in a.dom.frames
        assert a.dom.tot_pages == query(a, reservation.XENMEM_current_reservation) == total
        assert mem.free_frames == free0
        assert mem.read_u64(f << PAGE_SHIFT) == 0xF00D and mem.refs[f] == 1
        assert reserve(a, reservation.XENMEM_populate_physmap, [0x10])[0] == 0   # still at its maximum
        clean(hv)
        # Given back again: done again, nothing changes (the allocation reference is gone).
        assert reserve(a, dec, [f])[0] == 1 and mem.owner[f] == a.domid and mem.free_frames == free0
        # The mapping goes: f is freed there and then.
        assert a.mmu_update(((t << PAGE_SHIFT) + 8, 0)) == (0, 1)
        assert mem.owner[f] == DOMID_INVALID and f not in a.dom.frames
        assert (a.dom.tot_pages, mem.free_frames) == (total - 1, free0 + 1)
        clean(hv)
        # The table, unhooked, is still pinned: still the domain's. Unpinned, it goes.
        assert a.mmu_update((a.l2_entry(va), 0)) == (0, 1)
        assert mem.owner[t] == a.domid
        assert a.mmuext(MmuExt.UNPIN_TABLE, t) == 0
        assert mem.owner[t] == DOMID_INVALID
        assert (a.dom.tot_pages, mem.free_frames) == (total - 2, free0 + 2)
        clean(hv)
        # A frame given back while mapped, then the domain dies: torn down with the rest.
        g = a.spare[2]
        va2 = a.free_l2_va()
        assert a.mmuext(MmuExt.PIN_L1_TABLE, t := a.spare[3]) == 0
        assert a.mmu_update((a.l2_entry(va2), (t << PAGE_SHIFT) | TABLE)) == (0, 1)
        assert a.mmu_update(((t << PAGE_SHIFT) + 8, (g << PAGE_SHIFT) | PTE_RO)) == (0, 1)
        assert reserve(a, dec, [g])[0] == 1
        clean(hv)
        before, owned = mem.free_frames, len(a.dom.frames)          # g among them, once
        lab.destroy(a)
        assert mem.owner[g] == DOMID_INVALID and not mem.released
        assert mem.free_frames == before + owned
        clean(hv)
    run(body)


def test_granted_frame_mapped_by_another_is_freed_when_unmapped():
    """B grants its frame to A and A maps it: B's decrease_reservation counts it done (Xen)
    but the frame stays B's while A's mapping lives. A's unmap frees it; A's new map of the
    same grant then fails (the entry names a frame B no longer owns), also once the frame
    belongs to someone else. If B dies first, the frame is an orphan, freed once by A's unmap."""
    def body(hv: Hypervisor) -> None:
        b = lab.park(hv, kernel(), 8, "granter")
        a = lab.park(hv, kernel(), 8, "grantee")
        mem = hv.mem
        dec = reservation.XENMEM_decrease_reservation
        f, t = b.spare[0], a.spare[0]
        assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
        va = a.free_l2_va() + 3 * 4096
        assert a.mmu_update((a.l2_entry(va), (t << PAGE_SHIFT) | TABLE)) == (0, 1)
        b.write_grant(REF, GTF_permit_access, a.domid, f)
        st, h = a.map_grant(b.domid, REF, va)
        assert st == GntSt.okay
        mem.write_u64(f << PAGE_SHIFT, 0xB0B)
        free0, total = mem.free_frames, b.dom.tot_pages
        assert reserve(b, dec, [f])[0] == 1
        assert mem.owner[f] == b.domid and f in b.dom.frames and b.dom.tot_pages == total
        assert mem.free_frames == free0 and mem.read_u64(f << PAGE_SHIFT) == 0xB0B
        clean(hv)
        assert a.unmap_grant(h, va) == GntSt.okay
        assert mem.owner[f] == DOMID_INVALID and f not in b.dom.frames
        assert (mem.free_frames, b.dom.tot_pages) == (free0 + 1, total - 1)
        st, _ = a.map_grant(b.domid, REF, va)
        assert st != GntSt.okay
        assert mem.read_u64(t << PAGE_SHIFT) == 0                  # nothing mapped
        clean(hv)
        # Reused by someone else, the frame stays out of A's reach through B's old grant.
        c = lab.park(hv, kernel(), 8, "next-owner")
        assert f in c.dom.frames
        st, _ = a.map_grant(b.domid, REF, va)
        assert st != GntSt.okay
        clean(hv)
        # Given back while A maps it, then B dies: an orphan until A's unmap frees it, once.
        g = b.spare[1]
        b.write_grant(REF + 1, GTF_permit_access, a.domid, g)
        st, h = a.map_grant(b.domid, REF + 1, va)
        assert st == GntSt.okay
        assert reserve(b, dec, [g])[0] == 1
        lab.destroy(b)
        assert mem.owner[g] == DOMID_XEN and g in hv.orphan_frames and not mem.released
        clean(hv)
        free1 = mem.free_frames
        assert a.unmap_grant(h, va) == GntSt.okay
        assert mem.owner[g] == DOMID_INVALID and mem.free_frames == free1 + 1
        clean(hv)
    run(body)


def test_long_lists_continue_in_chunks():
    """A list as long as the domain is worked through CHUNK extents per invocation (Xen's
    continuation: the SYSCALL re-executed with the next extent in cmd >> 6), so one call
    never holds the loop for the whole list; the guest sees one call and the total."""
    def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 8, "long-list")
        n = reservation.CHUNK + 88
        frames = a.spare[:n]
        assert len(frames) == n
        # The list fills more than the argument page: it goes over the first pages of the
        # parked kernel's own image (mapped RW by the builder; this vCPU never runs).
        ext = a.lay.virt_base
        a.v.copy_to_guest(ext, struct.pack(f"<{n}Q", *frames))
        arg = a._args(reservation.RESERVATION.pack(ext, n, 0, 0, DOMID_SELF), 64)
        eng = a.v.engine
        rip = 0x1000_0000
        eng.write({"rip": rip})
        cmd = reservation.XENMEM_decrease_reservation
        assert reservation.do_memory_op(a.v, cmd, arg) is None
        assert eng.get("rip") == rip - 2
        assert eng.get("rdi") == cmd | (reservation.CHUNK << reservation.MEMOP_EXTENT_SHIFT)
        assert eng.get("rsi") == arg
        assert a.dom.tot_pages == a.dom.max_pages - reservation.CHUNK
        clean(hv)
        assert reservation.do_memory_op(a.v, eng.get("rdi"), arg) == n
        assert a.dom.tot_pages == a.dom.max_pages - n
        # Beyond what a continuation can encode: refused at once, as Xen.
        big = a._args(reservation.RESERVATION.pack(ext, reservation.MAX_EXTENTS + 1, 0, 0, DOMID_SELF), 64)
        assert reservation.do_memory_op(a.v, reservation.XENMEM_populate_physmap, big) == 0
        clean(hv)
    run(body)
