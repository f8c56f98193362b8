"""Red-team: PHYSDEVOP_pirq_eoi_gmfn (v1/v2) names a frame Xen keeps a writable type
reference on for the domain's lifetime (xen/arch/x86/physdev.c: get_page_from_gfn +
get_page_type(PGT_writable_page), -EINVAL otherwise; released in
domain_relinquish_resources). Without that reference a guest can register one of its page
tables as the EOI map, or register a frame and then give it back with
decrease_reservation while the hypervisor still names it as the domain's EOI map: any
later EOI write would land in a frame of another domain (XSA-class: a write into a frame
after the guest gave it away). Driven through the real handlers (aiovmm.lab), the auditor
after every step.
"""
from __future__ import annotations

import asyncio
import struct

import pytest

from aiovmm import Hypervisor, lab, physdev
from aiovmm.abi import DOMID_INVALID, Errno, MmuExt
from aiovmm.audit import audit
from aiovmm.memory import PageType
from conftest import kernel

EINVAL = -int(Errno.EINVAL)


def clean(hv) -> None:
    problems = audit(hv)
    assert not problems, "\n".join(problems[:20])


def eoi_gmfn(p: lab.Parked, gmfn: int, op: int) -> int:
    va = p._args(struct.pack("<Q", gmfn), 64)
    return lab._call(physdev.do_physdev_op, p.v, op, va)


@pytest.mark.parametrize("op", [physdev.PhysdevOp.pirq_eoi_gmfn_v1, physdev.PhysdevOp.pirq_eoi_gmfn_v2])
def test_pirq_eoi_frame_cannot_be_a_page_table(op):
    """An own L1 (pinned) and the L4 in use cannot become the EOI map: -EINVAL as on Xen."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "attacker")
            l1 = a.spare[0]
            assert a.mmuext(MmuExt.PIN_L1_TABLE, l1) == 0
            assert eoi_gmfn(a, l1, op) == EINVAL
            assert eoi_gmfn(a, a.v.kernel_root, op) == EINVAL
            assert hv.mem.type[l1] == PageType.l1 and hv.mem.type_count[l1] == 1
            clean(hv)
            lab.destroy(a)
            clean(hv)
    asyncio.run(main())


@pytest.mark.parametrize("op", [physdev.PhysdevOp.pirq_eoi_gmfn_v1, physdev.PhysdevOp.pirq_eoi_gmfn_v2])
def test_pirq_eoi_frame_held_until_destroy(op):
    """The registered frame holds a writable type: it cannot be pinned as a page table.
    Given back with decrease_reservation, the extent is done (Xen's guest_remove_page) but
    the frame stays the domain's while the registration references it; destroy drops the
    reference and the frame is freed."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "attacker")
            f = a.spare[1]
            assert eoi_gmfn(a, f, op) == 0
            assert eoi_gmfn(a, a.spare[2], op) == -int(Errno.EBUSY)
            assert hv.mem.type[f] == PageType.writable and hv.mem.type_count[f] == 1
            assert a.mmuext(MmuExt.PIN_L1_TABLE, f) == EINVAL
            assert a.decrease_reservation(f) == 1
            assert hv.mem.owner[f] == a.domid and f in hv.mem.released
            assert a.mmuext(MmuExt.PIN_L1_TABLE, f) == EINVAL
            clean(hv)
            lab.destroy(a)
            assert hv.mem.type_count[f] == 0 and f not in hv.mem.released
            assert hv.mem.owner[f] == DOMID_INVALID
            clean(hv)
    asyncio.run(main())


@pytest.mark.xfail(strict=True, reason="Xen's put_page_from_l1e drops the shadow LDT (pv_destroy_ldt) "
                   "when the owner removes a mapping of a seg_desc page; here the shadow keeps the "
                   "frame (and its seg_desc type) until the next SET_LDT. Self-only: the frame cannot "
                   "become writable or be freed meanwhile. Fix belongs in mmu._put_entry.")
def test_ldt_shadow_dropped_when_its_mapping_goes():
    from aiovmm import descriptors
    from aiovmm.abi import PAGE_SHIFT, PAGE_SIZE

    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "ldt")
            f, l1 = a.spare[0], a.spare[1]
            assert a.mmuext(MmuExt.PIN_L1_TABLE, l1) == 0
            va = a.free_l2_va()
            assert a.mmu_update((a.l2_entry(va), (l1 << PAGE_SHIFT) | 0x67)) == (0, 1)
            assert a.mmu_update((l1 << PAGE_SHIFT, (f << PAGE_SHIFT) | 0x65)) == (0, 1)
            assert a.mmuext(MmuExt.SET_LDT, va, 512) == 0
            win = descriptors._area(a.v).va(a.v.desc_window) + 16 * PAGE_SIZE
            assert descriptors.ldt_fault(a.v, win, 0) == (0, 0)
            assert hv.mem.type[f] == PageType.seg_desc and hv.mem.type_count[f] == 1
            assert a.mmu_update((l1 << PAGE_SHIFT, 0)) == (0, 1)
            assert a.v.ldt_shadow == {} and hv.mem.type_count[f] == 0
    asyncio.run(main())
