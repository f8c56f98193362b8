"""Red-team attacks on the balloon interface (XENMEM_decrease_reservation,
increase_reservation, populate_physmap) through the real handler on parked domains
(aiovmm.lab), beyond tests/test_balloon_security.py: a frame listed twice, extent_order > 0,
a continuation start beyond the list, Xen's shared frames (shared_info, grant table), a list
that runs into unmapped memory, populating a PFN that is already populated. After every
step: the auditor is clean, the bystander's frames are unchanged and nothing leaked.

Xen's behaviour (xen/common/memory.c): do_memory_op returns start_extent at once when
start_extent >= nr_extents; decrease_reservation stops at the first extent that is not the
domain's (guest_remove_page's get_page fails), so a frame listed twice is freed once; an
extent list it cannot read ends the batch with the count so far (goto out).
"""
from __future__ import annotations

import struct

from aiovmm import Hypervisor, lab, reservation
from aiovmm.abi import DOMID_INVALID, DOMID_SELF, PAGE_SHIFT, MmuExt, _PAGE_ACCESSED, _PAGE_PRESENT, _PAGE_RW, \
    _PAGE_USER
from test_balloon_security import clean, reserve, run
from conftest import kernel

TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED
PTE_RW = TABLE


def _owned(hv: Hypervisor, p: lab.Parked) -> list[tuple[int, int]]:
    """The bystander's frames with their first word: what must never change."""
    return sorted((f, hv.mem.read_u64(f << PAGE_SHIFT)) for f in p.dom.frames)


def test_duplicate_frame_freed_once_and_batch_stops():
    def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 8, "dup")
        b = lab.park(hv, kernel(), 8, "bystander")
        hv.mem.write_u64(b.spare[0] << PAGE_SHIFT, 0xB57A)
        before = _owned(hv, b)
        free0, tot0 = hv.mem.free_frames, a.dom.tot_pages
        f, g = a.spare[0], a.spare[1]
        assert reserve(a, reservation.XENMEM_decrease_reservation, [f, f, g])[0] == 1
        assert hv.mem.owner[f] == DOMID_INVALID and hv.mem.owner[g] == a.domid
        assert hv.mem.free_frames == free0 + 1 and a.dom.tot_pages == tot0 - 1
        # The freed frame goes to the bystander's next population; the attacker's old
        # number for it is not its own any more.
        assert reserve(a, reservation.XENMEM_decrease_reservation, [f])[0] == 0
        assert _owned(hv, b) == before
        clean(hv)
        lab.destroy(a)
        assert hv.mem.free_frames >= free0 + tot0    # everything it had came back
        clean(hv)
    run(body)


def test_extent_order_and_bad_continuation_change_nothing():
    """extent_order > 0 (only 4 KiB extents here: returns start_extent, nothing done), a
    continuation start at or beyond nr_extents (Xen: returns start_extent), and a list
    longer than a continuation can encode: no frame moves either way."""
    def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 8, "order")
        mem = hv.mem
        free0, tot0 = mem.free_frames, a.dom.tot_pages
        frames = a.spare[:4]
        assert reserve(a, reservation.XENMEM_decrease_reservation, a.spare[:2])[0] == 2
        tot0 -= 2
        free0 += 2
        for order in (1, 9, 0xFFFFFFFF):
            for op in (reservation.XENMEM_decrease_reservation, reservation.XENMEM_increase_reservation,
                       reservation.XENMEM_populate_physmap):
                assert reserve(a, op, frames[2:], order=order)[0] == 0
        for start in (2, 3, 1 << 20, (0xFFFFFFFFFFFFFFFF >> 6)):
            for op in (reservation.XENMEM_decrease_reservation, reservation.XENMEM_populate_physmap):
                ext = a._args(struct.pack("<2Q", *frames[2:]), 1024)
                arg = a._args(reservation.RESERVATION.pack(ext, 2, 0, 0, DOMID_SELF), 64)
                assert lab._call(reservation.do_memory_op, a.v, op | (start << 6), arg) == start
        for n in (reservation.MAX_EXTENTS + 1, (1 << 64) - 1):
            ext = a._args(struct.pack("<2Q", *frames[2:]), 1024)
            arg = a._args(reservation.RESERVATION.pack(ext, n, 0, 0, DOMID_SELF), 64)
            for op in (reservation.XENMEM_decrease_reservation, reservation.XENMEM_populate_physmap):
                assert lab._call(reservation.do_memory_op, a.v, op, arg) == 0
        assert mem.free_frames == free0 and a.dom.tot_pages == tot0
        assert all(mem.owner[f] == a.domid for f in frames[2:])
        clean(hv)
    run(body)


def test_xen_shared_frames_are_not_given_back():
    """shared_info and the grant-table frames belong to the domain but are Xen's to
    share: decrease_reservation refuses every one of them and the batch stops there."""
    def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 8, "shared")
        # Use the grant table so its frames exist.
        a.write_grant(3, 0, 0, 0)
        shared = sorted(a.dom.shared_frames | {a.dom.shared_info_mfn})
        assert shared
        tot0 = a.dom.tot_pages
        for s in shared:
            assert reserve(a, reservation.XENMEM_decrease_reservation, [s, a.spare[0]])[0] == 0
            assert hv.mem.owner[s] == a.domid and hv.mem.owner[a.spare[0]] == a.domid
        assert a.dom.tot_pages == tot0
        clean(hv)
    run(body)


def test_list_running_into_unmapped_memory():
    """The extent list's second slot is on a page the guest has not mapped: the first
    frame is given back and the count says 1 (Xen: the copy fails, goto out: nr_done),
    never -EFAULT that hides what was done. populate_physmap likewise: the count is what
    the guest could be told about."""
    def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 8, "fault")
        mem = hv.mem
        t, f, g, h = a.spare[:4]
        assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
        va = a.free_l2_va()
        assert a.mmu_update((a.l2_entry(va), (t << PAGE_SHIFT) | TABLE)) == (0, 1)
        assert a.mmu_update(((t << PAGE_SHIFT), (f << PAGE_SHIFT) | PTE_RW)) == (0, 1)
        slot = va + 4096 - 8                      # slot 1 is on the unmapped page va + 4096
        a.v.copy_to_guest(slot, struct.pack("<Q", g))
        tot0 = a.dom.tot_pages
        for op, want in ((reservation.XENMEM_decrease_reservation, 1), (reservation.XENMEM_populate_physmap, 1)):
            arg = a._args(reservation.RESERVATION.pack(slot, 2, 0, 0, DOMID_SELF), 64)
            if op == reservation.XENMEM_decrease_reservation:
                a.v.copy_to_guest(slot, struct.pack("<Q", g))
            else:
                a.v.copy_to_guest(slot, struct.pack("<Q", 0x40))
            assert lab._call(reservation.do_memory_op, a.v, op, arg) == want
            clean(hv)
        got = struct.unpack("<Q", a.v.copy_from_guest(slot, 8))[0]
        assert mem.owner[g] == DOMID_INVALID or got == g
        assert mem.owner[got] == a.domid and mem.m2p[got] == 0x40
        # The one frame of the list whose slot was unreadable: h was never listed and stays.
        assert mem.owner[h] == a.domid
        assert a.dom.tot_pages == tot0          # one given back, one populated
        clean(hv)
    run(body)


def test_populate_already_populated_pfn():
    """PV has no P2M in Xen: populate_physmap for a PFN that already has a frame just
    gives a new frame whose M2P names that PFN (the guest's own bookkeeping); it is
    counted against the reservation, and an absurd PFN leaves the M2P entry invalid."""
    def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 8, "repop")
        mem = hv.mem
        f = a.spare[0]
        pfn = mem.m2p[f]
        assert reserve(a, reservation.XENMEM_decrease_reservation, a.spare[1:3])[0] == 2
        rc, got = reserve(a, reservation.XENMEM_populate_physmap, [pfn, 1 << 60])
        assert rc == 2
        assert mem.owner[got[0]] == mem.owner[got[1]] == a.domid
        assert mem.m2p[got[0]] == pfn and mem.m2p[f] == pfn and got[0] != f
        assert a.dom.tot_pages == a.dom.max_pages
        # Past the maximum now: nothing more.
        assert reserve(a, reservation.XENMEM_populate_physmap, [pfn])[0] == 0
        clean(hv)
        lab.destroy(a)
        clean(hv)
    run(body)


def test_frames_xen_writes_into_are_not_given_back():
    """A frame holding the relocated vcpu_info (VCPUOP_register_vcpu_info: Xen writes
    event bits and time into it, from a writable type reference) and the domain's own
    L4 (the running page tables): decrease_reservation counts both done (Xen) but they stay
    the domain's while referenced, so Xen never writes into a frame that has gone to
    someone else; the domain's death frees them."""
    from aiovmm import vcpu_op
    from aiovmm.abi import VcpuOp

    def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 8, "vinfo")
        b = lab.park(hv, kernel(), 8, "bystander")
        mem = hv.mem
        x = a.spare[0]
        arg = a._args(vcpu_op.REGISTER_VCPU_INFO.pack(x, 64, 0), 64)
        assert lab._call(vcpu_op.do_vcpu_op, a.v, VcpuOp.register_vcpu_info, 0, arg) == 0
        root = a.v.kernel_root
        free0 = mem.free_frames
        for frame in (x, root):
            assert reserve(a, reservation.XENMEM_decrease_reservation, [frame])[0] == 1
            assert mem.owner[frame] == a.domid and frame in a.dom.frames
        assert mem.free_frames == free0
        clean(hv)
        before = _owned(hv, b)
        lab.destroy(a)
        c = lab.park(hv, kernel(), 8, "next")
        assert _owned(hv, b) == before
        clean(hv)
        lab.destroy(c)
        clean(hv)
    run(body)


def test_populate_into_a_read_only_list():
    """populate_physmap whose extent list is mapped read-only: the guest could never be told
    the MFN, so nothing is allocated and the count is 0 (Xen allocates, fails the copy and
    returns the count so far; the frame it took stays the domain's unreported: here none
    is taken). decrease_reservation only reads the list: a read-only list works."""
    def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 8, "rolist")
        mem = hv.mem
        t, f, g = a.spare[:3]
        assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
        va = a.free_l2_va()
        ro = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED
        assert a.mmu_update((a.l2_entry(va), (t << PAGE_SHIFT) | TABLE)) == (0, 1)
        assert a.mmu_update(((t << PAGE_SHIFT), (f << PAGE_SHIFT) | ro)) == (0, 1)
        mem.write_u64(f << PAGE_SHIFT, g)
        arg = a._args(reservation.RESERVATION.pack(va, 1, 0, 0, DOMID_SELF), 64)
        assert lab._call(reservation.do_memory_op, a.v, reservation.XENMEM_decrease_reservation, arg) == 1
        assert mem.owner[g] == DOMID_INVALID
        free0, tot0 = mem.free_frames, a.dom.tot_pages
        assert lab._call(reservation.do_memory_op, a.v, reservation.XENMEM_populate_physmap, arg) == 0
        assert mem.free_frames == free0 and a.dom.tot_pages == tot0
        assert mem.read_u64(f << PAGE_SHIFT) == g
        clean(hv)
    run(body)
