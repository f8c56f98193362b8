"""ptwr.candidate's filters (which #PF is a writable-page-table store), found unchecked by
bench/mutants.py. Xen emulates a store only for a kernel-mode write fault on a present,
read-only mapping of one of the domain's own validated L1 tables (fixup_page_fault gates on
guest_kernel_mode and PFEC_write_access; ptwr_do_page_fault on PGT_l1_page_table and the
owner); every other #PF goes to the guest."""
from __future__ import annotations

import asyncio
from typing import Callable

from aiovmm import Hypervisor, lab, ptwr
from aiovmm.abi import MmuExt, _PAGE_RW
from conftest import kernel

STORE = bytes.fromhex("488907")          # mov [rdi], rax


def on_parked_l1(check: Callable[[lab.Parked, int, int, int], None]) -> None:
    """check(d, l1_va, table, rip) on a parked domain of the project's kernel: l1_va is the
    kernel's read-only mapping of one of its L1 tables, table that table's machine address,
    rip a scratch code address in the argument page."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            d = lab.park(hv, kernel(), 8, "ptwr")
            l1_pfn = next(pfn for (lvl, _k), pfn in d.lay.tables.items() if lvl == 1)
            check(d, d.lay.va(l1_pfn), d.dom.p2m[l1_pfn] << 12, d.args_va + 0x800)
    asyncio.run(main())


def test_only_kernel_write_faults_on_own_l1_tables_are_emulated():
    def check(d: lab.Parked, l1_va: int, table: int, rip: int) -> None:
        v, lay, mem = d.v, d.lay, d.hv.mem
        l2_pfn = next(pfn for (lvl, _k), pfn in lay.tables.items() if lvl == 2)
        v.copy_to_guest(rip, STORE)
        assert not mem.read_u64(d.l1_of(l1_va)) & _PAGE_RW     # mapped read-only
        w = ptwr.candidate(v, l1_va + 8, 3, rip)
        assert w is not None and w.frame == table >> 12 and w.length == len(STORE)
        # Bytes that decode to no x86_64 instruction (push es): the #PF goes to the guest.
        v.copy_to_guest(rip + 64, bytes.fromhex("06") * 15)
        assert ptwr.candidate(v, l1_va + 8, 3, rip + 64) is None
        # Not a write fault on a present page: read fault, not-present write.
        assert ptwr.candidate(v, l1_va + 8, 1, rip) is None
        assert ptwr.candidate(v, l1_va + 8, 2, rip) is None
        # A user-mode write to the same table: the guest kernel's #PF, never emulated.
        # (The guest made its user tables the kernel's, so user mode sees the same code.)
        assert d.mmuext(MmuExt.NEW_USER_BASEPTR, v.kernel_root) == 0
        v.kernel_mode = False
        try:
            assert ptwr.candidate(v, l1_va + 8, 3, rip) is None
            assert ptwr.candidate(v, l1_va + 8, 7, rip) is None
        finally:
            v.kernel_mode = True
        # A read-only mapped L2 table is not an L1: no emulation (Xen: L1 pages only).
        l2_va = lay.va(l2_pfn)
        assert not mem.read_u64(d.l1_of(l2_va)) & _PAGE_RW
        assert ptwr.candidate(v, l2_va + 8, 3, rip) is None
        # A read-only data page (start_info) is not a page table either.
        si_va = lay.va(lay.start_info_pfn)
        if not mem.read_u64(d.l1_of(si_va)) & _PAGE_RW:
            assert ptwr.candidate(v, si_va, 3, rip) is None
    on_parked_l1(check)


def test_fast_path_takes_only_aligned_qword_stores():
    """try_fast applies only an aligned 8-byte mov/xchg into the faulting entry; any other
    form (a 4-byte store, an unaligned address, a read-modify-write) is left to the
    single-step path (None), never applied as if it were a whole-entry store; the unaligned
    one is refused outright (False: Xen's ptwr_emulated_update takes no misaligned store)."""
    def check(d: lab.Parked, l1_va: int, table: int, rip: int) -> None:
        v, mem = d.v, d.hv.mem
        before = mem.read(table, 4096)
        for code, off in (("8907", 8),            # mov dword ptr [rdi], eax
                          ("c70778563412", 8),    # mov dword ptr [rdi], 0x12345678
                          ("488907", 12),         # mov qword ptr [rdi], rax, unaligned
                          ("48ff07", 8)):         # inc qword ptr [rdi]
            v.copy_to_guest(rip, bytes.fromhex(code))
            w = ptwr.candidate(v, l1_va + off, 3, rip)
            assert w is not None
            assert ptwr.try_fast(v, w) is (False if off & 7 else None), code
        assert mem.read(table, 4096) == before
    on_parked_l1(check)


def test_a_store_whose_single_step_faults_is_not_applied():
    """The slow path steps the store against a scratch copy of the table. If the step itself
    faults (here `movsq`, whose source operand is unmapped), nothing is applied: complete()
    answers False (the #PF is bounced to the guest) with RIP back at the instruction and the
    table unchanged, never counted as an emulated page-table write."""
    def check(d: lab.Parked, l1_va: int, table: int, rip: int) -> None:
        v, mem = d.v, d.hv.mem
        v.copy_to_guest(rip, bytes.fromhex("48a5"))            # movsq [rdi], [rsi]
        unmapped = d.free_l2_va()
        v.engine.write({"rip": rip, "rdi": l1_va + 8, "rsi": unmapped})
        w = ptwr.candidate(v, l1_va + 8, 3, rip)
        assert w is not None and ptwr.try_fast(v, w) is None
        before = mem.read(table, 4096)
        n = v.ptwr_updates
        assert ptwr.complete(v, w) is False
        assert v.engine.get("rip") == rip
        assert mem.read(table, 4096) == before and v.ptwr_updates == n
        # The same store with a readable source is emulated (the entry is rewritten
        # through update_entry: here with the value it already has).
        v.engine.write({"rip": rip, "rdi": l1_va + 8, "rsi": l1_va + 8})
        assert ptwr.complete(v, w) is True
        assert v.engine.get("rip") == rip + 2 and v.ptwr_updates == n + 1
        assert mem.read(table, 4096) == before
    on_parked_l1(check)


def test_write_faults_through_a_foreign_or_not_present_entry_are_not_emulated():
    """Two #PFs whose L1 entry names a validated L1 table that is not the faulting
    domain's to write: (1) another domain's L1, which the domain maps read-only through a
    grant (Xen's ptwr_do_page_fault: the owner must be the current domain; emulating would
    at best turn a refused store into a silently completed one), and (2) a not-present
    entry whose frame bits name the domain's own L1 (a fault a stale TLB entry can raise
    under KVM after the PTE was cleared: the guest chose those bits). Neither is emulated."""
    from test_grants_security import Scene
    from aiovmm.abi import PAGE_SHIFT, _PAGE_PRESENT

    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            s = Scene(hv)
            a, mem = s.a, hv.mem
            rip = a.args_va + 0x800
            a.v.copy_to_guest(rip, STORE)
            # (1) b's L1 table, granted read-only to a and mapped by a at s.va.
            assert s.b.mmuext(MmuExt.PIN_L1_TABLE, s.f) == 0
            s.map(readonly=True)
            pte = a.l1_of(s.va)
            assert (mem.read_u64(pte) >> PAGE_SHIFT) & 0xFFFFFFFFFF == s.f
            assert ptwr.candidate(a.v, s.va + 8, 3, rip) is None
            # The same kind of mapping of a's own L1 (t, hooked in an L2 slot) is emulated:
            # the refusal above is the owner's, not the mapping's.
            own_va = s.va + 4096
            assert a.mmu_update((a.l1_of(own_va), (s.t << PAGE_SHIFT) | _PAGE_PRESENT)) == (0, 1)
            w = ptwr.candidate(a.v, own_va + 8, 3, rip)
            assert w is not None and w.frame == s.t
            # (2) The entry cleared, its frame bits left naming t.
            assert a.mmu_update((a.l1_of(own_va), s.t << PAGE_SHIFT)) == (0, 1)
            assert ptwr.candidate(a.v, own_va + 8, 3, rip) is None
    asyncio.run(main())
