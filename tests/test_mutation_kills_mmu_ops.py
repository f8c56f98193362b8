"""mmu_ops checks bench/mutants.py found untested (issue 9, mutation testing)."""
from __future__ import annotations

import asyncio

from aiovmm import Hypervisor, lab, mmu_ops
from aiovmm.abi import MMU_UPDATE, MMUEXT_OP, Errno, MmuExt
from conftest import kernel


def test_mmu_update_for_a_foreign_domain_is_refused():
    """An unprivileged domain naming another domain as FOREIGNDOM (or a bad page-owner
    domain in the upper half): Xen's get_pg_owner refuses (-ESRCH) before any request is
    read; the request that would have been applied is not."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            b = lab.park(hv, kernel(), 8, "b")
            pte = a.l1_of(a.lay.va(a.lay.start_info_pfn))     # a present L1 entry
            before = hv.mem.read_u64(pte)
            assert before
            reqs = a._args(MMU_UPDATE.pack(pte, 0), 64)     # would unmap start_info
            for fdom in (b.domid, b.domid | ((a.domid + 1) << 16), (a.domid + 5) << 16 | 0x7FF0):
                rc = lab._call(mmu_ops.do_mmu_update, a.v, reqs, 1, 0, fdom)
                assert rc in (-int(Errno.ESRCH), -int(Errno.EPERM)), (fdom, rc)
            assert hv.mem.read_u64(pte) == before
    asyncio.run(main())


def test_mmuext_op_for_a_foreign_domain_is_refused():
    """MMUEXT_OP with another domain as FOREIGNDOM from an unprivileged domain: -EPERM
    before any op runs (the pin it carries is not made)."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            b = lab.park(hv, kernel(), 8, "b")
            f = a.spare[0]
            ops = a._args(MMUEXT_OP.pack(MmuExt.PIN_L1_TABLE, f, 0), 64)
            rc = lab._call(mmu_ops.do_mmuext_op, a.v, ops, 1, 0, b.domid)
            assert rc == -int(Errno.EPERM)
            assert not hv.mem.pinned[f]
            assert a.mmuext(MmuExt.PIN_L1_TABLE, f) == 0          # as DOMID_SELF it works
            assert hv.mem.pinned[f]
    asyncio.run(main())
