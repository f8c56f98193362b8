"""Issue 9 findings 1, 2, 3 and 7, across domains, through the real hypercall handlers.

Each test drives parked domains (aiovmm.lab: built like any domain, vCPU never run) with
exactly what a guest can do: write its own grant entries and frames, and make hypercalls
whose arguments the handlers read from its memory. After every step the auditor
(aiovmm.audit) recomputes every frame's references and type counts and must agree with the
frame table. The single-guest forms of findings 1 and 2 are also real hostile guests
(guests/hostile/grant_copy_pt.c, grant_pte_teardown.c; tests/test_hostile_grants.py).
"""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor, lab
from aiovmm.abi import DOMID_SELF, DOMID_XEN, XEN_L4_FIRST, XEN_L4_LAST, PAGE_SHIFT, PTE_FRAME_MASK, Errno, MmuExt, _PAGE_ACCESSED, \
    _PAGE_PRESENT, _PAGE_RW, _PAGE_USER
from aiovmm.audit import audit
from aiovmm.grants import GNTCOPY_dest_gref, GNTCOPY_source_gref, GTF_permit_access, GTF_readonly, \
    GTF_reading, GTF_writing, GntSt
from aiovmm.memory import PageType
from conftest import kernel

MIB = 64
EINVAL = -int(Errno.EINVAL)
PTE_RW = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED
TABLE = PTE_RW
REF = 10


def run(coro):
    return asyncio.run(coro)


def clean(hv) -> None:
    problems = audit(hv)
    assert not problems, "\n".join(problems[:20])


class Scene:
    """Granter B grants its spare frame F to grantee A; A has an L1 table T (a spare frame,
    pinned and hooked into a free L2 slot) to map grants into at `va`."""

    def __init__(self, hv: Hypervisor, pin_t: bool = True) -> None:
        self.hv = hv
        self.b = lab.park(hv, kernel(), 8, "granter")
        self.a = lab.park(hv, kernel(), 8, "grantee")
        self.f = self.b.spare[0]
        self.t = self.a.spare[0]
        self.va = self.a.free_l2_va() + 5 * 4096
        self.l2e = self.a.l2_entry(self.va)
        if pin_t:
            assert self.a.mmuext(MmuExt.PIN_L1_TABLE, self.t) == 0
        assert self.a.mmu_update((self.l2e, (self.t << PAGE_SHIFT) | TABLE)) == (0, 1)
        self.b.write_grant(REF, GTF_permit_access, self.a.domid, self.f)
        clean(hv)

    def map(self, readonly: bool = False) -> int:
        st, h = self.a.map_grant(self.b.domid, REF, self.va, readonly)
        assert st == GntSt.okay
        clean(self.hv)
        return h


# ------------------------------------------------------------------------------ finding 1
@pytest.mark.parametrize("level", [1, 2, 3, 4])
@pytest.mark.parametrize("by", ["gref", "frame"])
def test_copy_into_own_page_table_refused(level, by):
    """A self-grant of an own page-table frame (or its frame number) as a copy destination:
    Xen's gnttab_copy_claim_buf cannot take PGT_writable_page -> GNTST_general_error, and the
    table is unchanged. The PTE the guest tries to plant maps another domain's frame RW."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            a = lab.park(hv, kernel(), 8, "attacker")
            victim = lab.park(hv, kernel(), 8, "victim")
            table = a.v.kernel_root
            mem = hv.mem
            va = a.lay.virt_base
            for shift in (39, 30, 21)[:4 - level]:
                e = mem.read_u64((table << PAGE_SHIFT) + 8 * ((va >> shift) & 0x1FF))
                table = (e & PTE_FRAME_MASK) >> PAGE_SHIFT
            assert mem.type[table] == PageType(level)
            data = a.spare[0]
            evil = (victim.spare[0] << PAGE_SHIFT) | PTE_RW
            mem.write_u64(data << PAGE_SHIFT, evil)          # a data page of its own
            slot = 300 if level == 4 else 400
            before = mem.read(table << PAGE_SHIFT, 4096)
            a.write_grant(REF, GTF_permit_access, a.domid, table)
            if by == "gref":
                st = a.grant_copy((data, DOMID_SELF, 0), (REF, DOMID_SELF, 8 * slot), 8, GNTCOPY_dest_gref)
            else:
                st = a.grant_copy((data, DOMID_SELF, 0), (table, DOMID_SELF, 8 * slot), 8, 0)
            assert st == GntSt.general_error
            assert mem.read(table << PAGE_SHIFT, 4096) == before
            assert a.grant_flags(REF) & (GTF_reading | GTF_writing) == 0
            clean(hv)
            # Control: the same copy into a data frame by self-grant works.
            a.write_grant(REF + 1, GTF_permit_access, a.domid, a.spare[1])
            st = a.grant_copy((data, DOMID_SELF, 0), (REF + 1, DOMID_SELF, 16), 8, GNTCOPY_dest_gref)
            assert st == GntSt.okay
            assert mem.read_u64((a.spare[1] << PAGE_SHIFT) + 16) == evil
            clean(hv)
    run(main())


def test_copy_into_foreign_granted_l1_refused():
    """The same through another domain's grant: B grants its pinned L1 to A; A's copy into it
    is general_error; a read-only grant copy from it still works (reading a table is fine)."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            s = Scene(hv)
            b, a = s.b, s.a
            l1 = b.spare[1]
            assert b.mmuext(MmuExt.PIN_L1_TABLE, l1) == 0
            b.write_grant(REF + 1, GTF_permit_access, a.domid, l1)
            hv.mem.write_u64(a.spare[1] << PAGE_SHIFT, (b.spare[2] << PAGE_SHIFT) | PTE_RW)
            st = a.grant_copy((a.spare[1], DOMID_SELF, 0), (REF + 1, b.domid, 0), 8, GNTCOPY_dest_gref)
            assert st == GntSt.general_error
            assert hv.mem.read_u64(l1 << PAGE_SHIFT) == 0
            st = a.grant_copy((REF + 1, b.domid, 0), (a.spare[2], DOMID_SELF, 0), 8, GNTCOPY_source_gref)
            assert st == GntSt.okay
            clean(hv)
    run(main())


def test_granted_frame_mapped_writable_cannot_be_pinned():
    """A frame granted and mapped writable by the grantee holds a writable type reference:
    the granter cannot make it a page table (pin or L2 entry: -EINVAL) until the unmap."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            s = Scene(hv)
            h = s.map()
            assert s.b.mmuext(MmuExt.PIN_L1_TABLE, s.f) == EINVAL
            l2e = s.b.l2_entry(s.b.free_l2_va())
            assert s.b.mmu_update((l2e, (s.f << PAGE_SHIFT) | TABLE))[0] == EINVAL
            # Read-only maps of it are fine, and a copy into it by gref or frame too.
            clean(hv)
            assert s.a.unmap_grant(h, s.va) == GntSt.okay
            assert s.b.mmuext(MmuExt.PIN_L1_TABLE, s.f) == 0
            # Now a page table: a writable map of the grant is refused, a read-only one works.
            st, _ = s.a.map_grant(s.b.domid, REF, s.va)
            assert st == GntSt.general_error
            st, h = s.a.map_grant(s.b.domid, REF, s.va, readonly=True)
            assert st == GntSt.okay
            clean(hv)
            assert s.a.unmap_grant(h) == GntSt.okay
            clean(hv)
    run(main())


# ------------------------------------------------------------------------------ finding 2
@pytest.mark.parametrize("how", ["unpin", "l2_replaced", "baseptr"])
def test_teardown_of_table_with_grant_pte(how):
    """A page-table teardown that meets a grant mapping's PTE never drops the grant's
    references: the grantee is crashed (Xen: implicit unmap of a granted PTE), the frame
    keeps its references until the grant is unmapped by the grantee's destruction, and only
    then can the granter retype it."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            s = Scene(hv, pin_t=(how == "unpin"))
            a, b, mem = s.a, s.b, hv.mem
            if how == "baseptr":
                # T reachable only through a private L3/L2 under L4 slot 1 of the boot L4;
                # then switch to a copy of the boot L4 without slot 1.
                l3, l2, l4b = a.spare[1], a.spare[2], a.spare[3]
                root = a.v.kernel_root
                assert a.mmu_update((s.l2e, 0)) == (0, 1)                 # T off the boot L2
                assert a.mmu_update(((l2 << PAGE_SHIFT), (s.t << PAGE_SHIFT) | TABLE),
                                    ((l3 << PAGE_SHIFT), (l2 << PAGE_SHIFT) | TABLE),
                                    ((root << PAGE_SHIFT) + 8, (l3 << PAGE_SHIFT) | TABLE)) == (0, 3)
                s.va = (1 << 39) + 5 * 4096
                for i in range(512):
                    e = mem.read_u64((root << PAGE_SHIFT) + 8 * i)
                    if e & _PAGE_PRESENT and i != 1 and not XEN_L4_FIRST <= i <= XEN_L4_LAST:
                        assert a.mmu_update(((l4b << PAGE_SHIFT) + 8 * i, e)) == (0, 1)
            h = s.map()
            f_refs = mem.refs[s.f]
            assert f_refs == 1 and mem.type[s.f] == PageType.writable
            if how == "unpin":
                assert a.mmu_update((s.l2e, 0)) == (0, 1)                 # unhooked, still pinned
                assert not a.dom.dying
                a.mmuext(MmuExt.UNPIN_TABLE, s.t)
            elif how == "l2_replaced":
                a.mmu_update((s.l2e, 0))
            else:
                assert a.mmuext(MmuExt.UNPIN_TABLE, a.v.kernel_root) == 0
                a.mmuext(MmuExt.NEW_BASEPTR, l4b)
            assert a.dom.dying and "implicitly unmap" in a.dom.crash_reason
            assert mem.refs[s.f] == f_refs and mem.type_count[s.f] == 1   # nothing dropped
            assert b.grant_flags(REF) & GTF_writing
            assert b.mmuext(MmuExt.PIN_L1_TABLE, s.f) == EINVAL
            clean(hv)
            lab.destroy(a)                                                 # the grant goes here
            assert mem.refs[s.f] == 0 and mem.type_count[s.f] == 0
            assert b.grant_flags(REF) & (GTF_reading | GTF_writing) == 0
            clean(hv)
            assert b.mmuext(MmuExt.PIN_L1_TABLE, s.f) == 0
            clean(hv)
            del h
    run(main())


def test_grant_pte_cannot_be_overwritten():
    """mmu_update over the grant PTE is refused (only unmap_grant_ref removes it)."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            s = Scene(hv)
            s.map()
            assert s.a.mmu_update((s.a.l1_of(s.va), 0))[0] == EINVAL
            assert s.a.mmu_update((s.a.l1_of(s.va), (s.a.spare[1] << PAGE_SHIFT) | PTE_RW))[0] == EINVAL
            assert not s.a.dom.dying
            clean(hv)
    run(main())


def test_destroy_grantee_with_grant_pte_inside():
    """A grantee that dies with a grant mapped inside its tables: the grant table is torn
    down first (no crash report, references dropped exactly once)."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            start = hv.mem.free_frames
            s = Scene(hv)
            s.map()
            lab.destroy(s.a)
            clean(hv)
            assert hv.mem.refs[s.f] == 0 and hv.mem.type_count[s.f] == 0
            assert s.b.grant_flags(REF) & (GTF_reading | GTF_writing) == 0
            lab.destroy(s.b)
            clean(hv)
            assert hv.mem.free_frames == start
    run(main())


# ------------------------------------------------------------------------------ findings 3, 7
FIELDS = {
    "frame": lambda e, s: (e[0], e[1], s.b.spare[1]),
    "frame_ffffffff": lambda e, s: (e[0], e[1], 0xFFFFFFFF),
    "flags_revoked": lambda e, s: (0, e[1], e[2]),
    "flags_readonly": lambda e, s: (e[0] | GTF_readonly, e[1], e[2]),
    "domid": lambda e, s: (e[0], 0x7FEF, e[2]),
    "all": lambda e, s: (0xFFFF, 0xFFFF, 0xFFFFFFFF),
}


@pytest.mark.parametrize("field", list(FIELDS))
def test_entry_rewritten_while_mapped(field):
    """The granter rewrites the in-use entry (any field): the existing mapping keeps the
    recorded frame; a further map by the same grantee uses the record (Xen: pinned entries
    are not re-read); the granter's death keeps exactly the recorded frame (orphaned, owner
    Xen) and frees the rest; a new domain never gets it; the grantee's last unmap frees it;
    no frame leaks."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            mem = hv.mem
            start = mem.free_frames
            s = Scene(hv)
            a, b = s.a, s.b
            h1 = s.map()
            e = b.dom.grants.read_entry(REF)
            b.write_grant(REF, *FIELDS[field](e, s))
            clean(hv)
            st, h2 = a.map_grant(b.domid, REF, s.va + 4096, readonly=True)
            assert st == GntSt.okay
            assert (mem.read_u64(a.l1_of(s.va + 4096)) & PTE_FRAME_MASK) >> PAGE_SHIFT == s.f
            # A copy re-reads the frame when it upgrades to a write pin: here one is held.
            clean(hv)
            lab.destroy(b)
            assert mem.owner[s.f] == DOMID_XEN and hv.orphan_frames == {s.f: b.domid}
            clean(hv)
            c = lab.park(hv, kernel(), 8, "next")
            assert s.f not in c.dom.frames
            clean(hv)
            mem.write_u64((s.f << PAGE_SHIFT), 0x1234)                 # A still writes F
            assert a.unmap_grant(h2) == GntSt.okay
            assert s.f in hv.orphan_frames
            assert a.unmap_grant(h1) == GntSt.okay
            assert s.f not in hv.orphan_frames and mem.owner[s.f] != DOMID_XEN
            clean(hv)
            lab.destroy(a)
            lab.destroy(c)
            clean(hv)
            assert mem.free_frames == start
    run(main())


def test_copy_upgrade_rechecks_frame():
    """A write pin taken by a copy on an entry that is active read-only re-reads the frame
    and refuses a changed one (Xen's acquire_grant_for_copy); the mapping is unaffected."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            s = Scene(hv)
            h = s.map(readonly=True)
            b, a = s.b, s.a
            b.write_grant(REF, GTF_permit_access, a.domid, b.spare[1])
            st = a.grant_copy((a.spare[1], DOMID_SELF, 0), (REF, b.domid, 0), 8, GNTCOPY_dest_gref)
            assert st == GntSt.general_error
            b.write_grant(REF, GTF_permit_access, a.domid, s.f)
            st = a.grant_copy((a.spare[1], DOMID_SELF, 0), (REF, b.domid, 0), 8, GNTCOPY_dest_gref)
            assert st == GntSt.okay
            clean(hv)
            assert a.unmap_grant(h) == GntSt.okay
            clean(hv)
    run(main())


def test_dying_granter_own_references_released():
    """Finding 7: the dying granter maps F itself (an RW entry of a pinned L1 of its own);
    destroy releases that reference, so the grantee's last unmap frees F. Over create/destroy
    cycles machine memory returns exactly to its start."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            mem = hv.mem
            start = mem.free_frames
            for _ in range(4):
                s = Scene(hv)
                b = s.b
                own_l1 = b.spare[2]
                assert b.mmu_update(((own_l1 << PAGE_SHIFT) + 8, (s.f << PAGE_SHIFT) | PTE_RW)) == (0, 1)
                assert b.mmuext(MmuExt.PIN_L1_TABLE, own_l1) == 0
                h = s.map()
                assert mem.refs[s.f] == 2 and mem.type_count[s.f] == 2
                lab.destroy(b)
                assert mem.refs[s.f] == 1 and mem.type_count[s.f] == 1
                clean(hv)
                assert s.a.unmap_grant(h) == GntSt.okay
                assert mem.owner[s.f] not in (DOMID_XEN, b.domid) and not hv.orphan_frames
                lab.destroy(s.a)
                clean(hv)
                assert mem.free_frames == start
    run(main())


# ------------------------------------------------------------------------------ containment
def test_teardown_failure_stays_in_the_domain():
    """A running granter with 0xffffffff in the frame field of an in-use entry shuts down:
    the hypervisor tears it down (orphaning the recorded frame), keeps the bystander running
    and boots another guest. Were teardown to fail, _run_domain's boundary logs it and the
    TaskGroup is untouched."""
    from conftest import guest
    from test_hostile import _p2m_hash, hostile

    async def main():
        async with Hypervisor(memory_mib=256) as hv:
            by = await hv.create(hostile("bystander"), memory_mib=8, name="bystander")
            await by.wait_for_line(r"^bystander: ready", timeout=30)
            h0 = _p2m_hash(hv, by)
            a = lab.park(hv, kernel(), 8, "grantee")
            b = await hv.create(guest("grant_pair"), memory_mib=8, name="offer",
                                cmdline=f"role=offer peer={a.domid} rounds=1")
            line = await b.wait_for_line(r"^result offer ref=", timeout=30)
            ref = int(line.split("ref=")[1].split()[0])
            va = a.free_l2_va() + 4096
            t = a.spare[0]
            assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
            assert a.mmu_update((a.l2_entry(va), (t << PAGE_SHIFT) | TABLE)) == (0, 1)
            st, h = a.map_grant(b.domid, ref, va)
            assert st == GntSt.okay
            f = (hv.mem.read_u64(a.l1_of(va)) & PTE_FRAME_MASK) >> PAGE_SHIFT
            fl, d, _fr = b.grants.read_entry(ref)
            b.grants.write_entry(ref, fl, d, 0xFFFFFFFF)               # the guest's own entry
            b.shutdown()
            async with asyncio.timeout(10):
                while b.domid in hv.domains:
                    await asyncio.sleep(0.01)
            assert hv.orphan_frames == {f: b.domid}
            clean(hv)
            assert a.unmap_grant(h) == GntSt.okay
            assert not hv.orphan_frames
            hello = await hv.create(guest("hello"), memory_mib=8, name="hello")
            assert await hello.wait() is not None
            assert not by.dying and _p2m_hash(hv, by) == h0
            lab.destroy(a)
            clean(hv)
    run(main())


# ------------------------------------------------------------------------------ found by the fuzzer
@pytest.mark.parametrize("how", ["pin", "l2_entry"])
def test_l1_mapping_itself_writable_refused(how):
    """An L1 whose own entry maps it writable (found by the stateful fuzzer): the frame is
    typed L1 while its entries are validated, so the RW self entry cannot take a writable
    type -> -EBUSY, the frame stays untyped and writable. A read-only self entry is fine."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            t = a.spare[0]
            mem = hv.mem
            mem.write_u64((t << PAGE_SHIFT) + 8 * 3, (t << PAGE_SHIFT) | PTE_RW)   # untyped: guest-writable
            l2e = a.l2_entry(a.free_l2_va())

            def make_table() -> int:
                if how == "pin":
                    return a.mmuext(MmuExt.PIN_L1_TABLE, t)
                return a.mmu_update((l2e, (t << PAGE_SHIFT) | TABLE))[0]
            assert make_table() == -int(Errno.EBUSY)
            assert mem.type_count[t] == 0 and mem.type[t] == PageType.none and mem.refs[t] == 0
            clean(hv)
            assert a.mmu_update(((t << PAGE_SHIFT) + 8 * 3, (t << PAGE_SHIFT) | (PTE_RW & ~_PAGE_RW))) == (0, 1)
            assert make_table() == 0
            assert mem.type[t] == PageType.l1 and mem.refs[t] == 1
            clean(hv)
    run(main())
