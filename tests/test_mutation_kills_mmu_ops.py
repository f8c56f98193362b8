"""mmu_ops checks bench/mutants.py found untested (issue 9, mutation testing)."""
from __future__ import annotations

import asyncio

from aiovmm import Hypervisor, lab, mmu_ops
from aiovmm.abi import MMU_UPDATE, Errno
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
