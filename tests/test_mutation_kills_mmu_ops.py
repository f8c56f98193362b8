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


# -- second mutation run ----------------------------------------------------------------------
from aiovmm.abi import DOMID_SELF, MMU_MACHPHYS_UPDATE, PAGE_SHIFT, PAGE_SIZE, _PAGE_ACCESSED, \
    _PAGE_PRESENT, _PAGE_RW, _PAGE_USER  # noqa: E402
from aiovmm.audit import audit  # noqa: E402
from aiovmm.memory import PageType  # noqa: E402

TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED
EINVAL = -int(Errno.EINVAL)


def _rw_region(a, pages: int) -> int:
    """A VA of `pages` consecutive pages the parked guest maps read-write (its own data,
    never run): room for a batch longer than one argument page."""
    for pfn in range(0, a.lay.pt_pfn):
        ok = all(a.hv.mem.read_u64(a.l1_of(a.lay.va(p))) & _PAGE_RW for p in range(pfn, pfn + pages))
        if ok:
            return a.lay.va(pfn)
    raise LookupError("no RW region")


def test_a_batch_longer_than_a_chunk_continues_itself():
    """mmu_update of CHUNK + 3 entries: the first invocation does CHUNK of them and makes a
    continuation (Xen's hypercall_create_continuation: the SYSCALL re-executed with the
    request pointer advanced and the count marked MMU_UPDATE_PREEMPTED, *done = CHUNK); the
    re-executed call does the rest. A batch of at most CHUNK entries finishes in one call
    and leaves RIP alone."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            eng = a.v.engine
            f = a.spare[0]
            count = mmu_ops.CHUNK + 3
            va = _rw_region(a, -(-count * 16 // PAGE_SIZE) + 1)
            a.v.copy_to_guest(va, b"".join(MMU_UPDATE.pack((f << PAGE_SHIFT) | MMU_MACHPHYS_UPDATE, i)
                                           for i in range(count)))
            done_va = a._args(bytes(4), 0)
            rip = eng.get("rip")
            rc = lab._call(mmu_ops.do_mmu_update, a.v, va, 3, done_va, DOMID_SELF)
            assert rc == 0 and eng.get("rip") == rip and hv.mem.m2p[f] == 2
            assert int.from_bytes(a.v.copy_from_guest(done_va, 4), "little") == 3
            rc = lab._call(mmu_ops.do_mmu_update, a.v, va, count, done_va, DOMID_SELF)
            assert eng.get("rip") == rip - 2
            assert eng.get("rsi") == 3 | mmu_ops.PREEMPTED
            assert eng.get("rdi") == va + mmu_ops.CHUNK * 16
            assert int.from_bytes(a.v.copy_from_guest(done_va, 4), "little") == mmu_ops.CHUNK
            assert hv.mem.m2p[f] == mmu_ops.CHUNK - 1
            rc = lab._call(mmu_ops.do_mmu_update, a.v, eng.get("rdi"), eng.get("rsi"), done_va, DOMID_SELF)
            assert rc == 0 and eng.get("rip") == rip - 2
            assert int.from_bytes(a.v.copy_from_guest(done_va, 4), "little") == count
            assert hv.mem.m2p[f] == count - 1
    asyncio.run(main())


def test_m2p_update_only_of_own_frames():
    """MMU_MACHPHYS_UPDATE of another domain's frame or of a frame past memory: -EINVAL,
    the M2P unchanged; of an own frame it works."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            b = lab.park(hv, kernel(), 8, "b")
            theirs = b.spare[0]
            old = hv.mem.m2p[theirs]
            for mfn in (theirs, hv.mem.nr_frames, hv.mem.nr_frames + 7):
                assert a.mmu_update(((mfn << PAGE_SHIFT) | MMU_MACHPHYS_UPDATE, 0x55)) == (EINVAL, 0)
            assert hv.mem.m2p[theirs] == old
            assert a.mmu_update(((a.spare[0] << PAGE_SHIFT) | MMU_MACHPHYS_UPDATE, 0x55)) == (0, 1)
            assert hv.mem.m2p[a.spare[0]] == 0x55
    asyncio.run(main())


def test_pin_and_unpin_rules():
    """PIN of a foreign frame or one past memory: -EINVAL. PIN of an already pinned table:
    -EINVAL (Xen: "mfn already pinned"), its type count unchanged. UNPIN of a frame not
    pinned (a live but unpinned table), of another domain's pinned table, or past memory:
    -EINVAL, and nothing is dropped."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            b = lab.park(hv, kernel(), 8, "b")
            mem = hv.mem
            for mfn in (b.spare[0], mem.nr_frames, mem.nr_frames + 3):
                assert a.mmuext(MmuExt.PIN_L1_TABLE, mfn) == EINVAL
                assert a.mmuext(MmuExt.UNPIN_TABLE, mfn) == EINVAL
            t = a.spare[0]
            assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
            assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == EINVAL
            assert (mem.type[t], mem.type_count[t], mem.pinned[t]) == (PageType.l1, 1, 1)
            bt = b.spare[0]
            assert b.mmuext(MmuExt.PIN_L1_TABLE, bt) == 0
            assert a.mmuext(MmuExt.UNPIN_TABLE, bt) == EINVAL
            assert (mem.type[bt], mem.type_count[bt], mem.pinned[bt]) == (PageType.l1, 1, 1)
            # A live, unpinned L1 (hooked into an L2): unpin refuses, the hook's ref stays.
            u = a.spare[1]
            va = a.free_l2_va()
            assert a.mmu_update((a.l2_entry(va), (u << PAGE_SHIFT) | TABLE)) == (0, 1)
            assert a.mmuext(MmuExt.UNPIN_TABLE, u) == EINVAL
            assert (mem.type[u], mem.type_count[u]) == (PageType.l1, 1)
            assert a.mmuext(MmuExt.UNPIN_TABLE, t) == 0
            assert mem.type_count[t] == 0
            assert audit(hv) == []
    asyncio.run(main())


def test_a_table_keeps_its_level():
    """A frame typed as one page-table level cannot take a reference as another (take_type's
    type conflict; Xen's get_page_type fails, -EINVAL for pins and base pointers): a pinned
    L1 pinned again as L2, L3 or L4, or loaded as either root, is refused and keeps its type
    and count; the vCPU's roots are unchanged."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            mem = hv.mem
            t = a.spare[0]
            assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
            kr, ur = a.v.kernel_root, a.v.user_root
            for cmd in (MmuExt.PIN_L2_TABLE, MmuExt.PIN_L3_TABLE, MmuExt.PIN_L4_TABLE,
                        MmuExt.NEW_BASEPTR, MmuExt.NEW_USER_BASEPTR):
                assert a.mmuext(cmd, t) == EINVAL, cmd
                assert (mem.type[t], mem.type_count[t], mem.pinned[t]) == (PageType.l1, 1, 1)
                assert (a.v.kernel_root, a.v.user_root) == (kr, ur)
            assert a.mmuext(MmuExt.UNPIN_TABLE, t) == 0
            assert audit(hv) == []
    asyncio.run(main())


def test_baseptr_must_be_an_own_l4():
    """NEW_BASEPTR / NEW_USER_BASEPTR naming another domain's frame: -EINVAL (get_type
    refuses the owner), the vCPU's roots unchanged."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            b = lab.park(hv, kernel(), 8, "b")
            kr, ur = a.v.kernel_root, a.v.user_root
            for cmd in (MmuExt.NEW_BASEPTR, MmuExt.NEW_USER_BASEPTR):
                for mfn in (b.spare[0], b.v.kernel_root):
                    assert a.mmuext(cmd, mfn) == EINVAL
                    assert (a.v.kernel_root, a.v.user_root) == (kr, ur)
            assert hv.mem.type_count[b.spare[0]] == 0
            assert audit(hv) == []
    asyncio.run(main())


def test_clear_and_copy_page_rules():
    """CLEAR_PAGE / COPY_PAGE write the destination frame: it takes a writable type, so a
    page table (or another domain's frame) is refused, -EINVAL, and stays as it was; COPY's
    source must be the caller's own frame (another domain's, or past memory: -EINVAL)."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            b = lab.park(hv, kernel(), 8, "b")
            mem = hv.mem
            t, d, s = a.spare[0], a.spare[1], a.spare[2]
            assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
            pte = (s << PAGE_SHIFT) | _PAGE_PRESENT | _PAGE_USER
            assert a.mmu_update(((t << PAGE_SHIFT) + 8, pte)) == (0, 1)
            table = mem.read(t << PAGE_SHIFT, PAGE_SIZE)
            assert a.mmuext(MmuExt.CLEAR_PAGE, t) == EINVAL
            assert a.mmuext(MmuExt.COPY_PAGE, t, s) == EINVAL
            assert mem.read(t << PAGE_SHIFT, PAGE_SIZE) == table
            mem.write(b.spare[0] << PAGE_SHIFT, b"victim!!")
            assert a.mmuext(MmuExt.CLEAR_PAGE, b.spare[0]) == EINVAL
            assert mem.read(b.spare[0] << PAGE_SHIFT, 8) == b"victim!!"
            mem.write(d << PAGE_SHIFT, b"mine....")
            for src in (b.spare[0], mem.nr_frames, mem.nr_frames + 9):
                assert a.mmuext(MmuExt.COPY_PAGE, d, src) == EINVAL
                assert mem.read(d << PAGE_SHIFT, 8) == b"mine...."
            assert a.mmuext(MmuExt.COPY_PAGE, d, t) == 0           # reading a table is fine
            assert mem.read(d << PAGE_SHIFT, PAGE_SIZE) == mem.read(t << PAGE_SHIFT, PAGE_SIZE)
            assert a.mmuext(MmuExt.CLEAR_PAGE, d) == 0
            assert mem.read(d << PAGE_SHIFT, 8) == bytes(8)
            assert audit(hv) == []
    asyncio.run(main())


def test_privileged_and_removed_mmuext_ops():
    """MMUEXT_FLUSH_CACHE(_GLOBAL) needs cache-flush permission: -EACCES for a guest (Xen's
    cache_flush_permitted); MMUEXT_MARK_SUPER / UNMARK_SUPER: -EOPNOTSUPP (superpage
    support removed in Xen); an unknown command -ENOSYS."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            for cmd in (MmuExt.FLUSH_CACHE, MmuExt.FLUSH_CACHE_GLOBAL):
                assert a.mmuext(cmd) == -int(Errno.EACCES), cmd
            for cmd in (MmuExt.MARK_SUPER, MmuExt.UNMARK_SUPER):
                assert a.mmuext(cmd, a.spare[0]) == -int(Errno.EOPNOTSUPP), cmd
            assert a.mmuext(99) == -int(Errno.ENOSYS)
    asyncio.run(main())

