"""Red-team: page-table stores Xen's ptwr emulation refuses or takes differently (both
engines).

Xen (pv/ro-page-fault.c, ptwr_emulated_write/_cmpxchg/_update) takes a store of 1, 2, 4 or
8 bytes, naturally aligned, within the page of CR2; a smaller one is merged with the rest of
its entry. Any other store is unhandleable: nothing is written and the guest gets the
original #PF (pv_ro_page_fault returns 0). ptwr stepped every store over a scratch copy and
applied each entry it changed: a qword across two entries, a misaligned dword or word, a
store that began on the page before, and cmpxchg16b were all taken.

A 32-bit code segment's store is decoded as that mode reads it (emulate.disasm): `a3 moffs32`
is 5 bytes there, 9 in 64-bit mode (the step was aimed past the instruction and failed: the
kernel's own store was bounced back to it).

`pushfq` into an L1: the KVM engine's single step sets TF, which pushf stores; the entry
must hold the flags the guest pushes.

Hand-driven as test_redteam_ptwr_rep."""
from __future__ import annotations

import pytest

from aiovmm import mmu_ops, traps
from aiovmm.abi import IRET_CONTEXT
from hand_vcpu import CODE_VA, DATA_VA, hand_driven_vcpu
from test_redteam_iret_cs import USER_CODE_VA, _back
from test_redteam_ptwr_rep import ENGINES
from test_redteam_ptwr_step_loop import boot_map_l1s

REGS = ("rip", "rcx", "rsi", "rdi", "rsp", "rflags", "rax", "rdx", "rbx", "gs_base", "cr3")
TF, RF = 0x100, 0x10000


def _l1_with_room(hv, v) -> tuple[int, int, bytes, int]:
    """(VA, machine address, contents, k) of an L1 of the kernel mapped read-only in its boot
    map, whose entries k (even) and k + 1 are both empty."""
    for va, ma in boot_map_l1s(hv, v):
        table = hv.mem.read(ma, 4096)
        for k in range(2, 510, 2):
            if table[8 * k:8 * k + 16] == bytes(16):
                return va, ma, table, k
    raise AssertionError("no L1 with two empty entries in the boot map")


def _fault(v, cr2: int) -> None:
    """The store's #PF (present, write, kernel) as the engine reports it, then the step."""
    traps.inject_exception(v, 14, 3, cr2)
    if v.pending_ptwr is not None:
        traps.finish_ptwr(v)


# (code, offset of the store from entry k's first byte, RAX) -- each changes entry k and/or
# k + 1 to a not-present (valid) value, so only Xen's alignment rules refuse it.
REFUSED = [
    ("488907", 4, 2 << 32),                 # mov [rdi], rax: a qword across entries k, k+1
    ("8907", 2, 0x20000),                   # mov [rdi], eax: a dword across a 4-byte boundary
    ("668907", 1, 0x200),                   # mov [rdi], ax: a word at an odd address
    ("488907", -4, 2 << 32),                # a qword begun on the page before the L1
    ("480fc70f", 0, 0),                     # cmpxchg16b [rdi]: 16 bytes (bad cmpxchg size)
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("code,off,rax", REFUSED,
                         ids=["qword-across", "dword-misaligned", "word-odd", "page-before", "cmpxchg16b"])
async def test_a_store_xen_refuses_is_the_guests_pf(engine, code, off, rax):
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        eng, mem = v.engine, hv.mem
        l1, ma, before, k = _l1_with_room(hv, v)
        k = 0 if off < 0 else k
        insn = bytes.fromhex(code)
        v.copy_to_guest(CODE_VA, insn + b"\xeb\xfe")
        handler = v.trap_table[14][2]
        assert handler
        at = l1 + 8 * k + off
        cr2 = max(at, l1)
        eng.write({"rip": CODE_VA, "rdi": at, "rax": rax, "rdx": 0, "rbx": 2, "rcx": 0})
        updates = v.ptwr_updates
        try:
            _fault(v, cr2)
            assert eng.get("rip") != CODE_VA + len(insn), "the store was emulated"
            assert mem.read(ma, 4096) == before
            assert v.ptwr_updates == updates
            assert (eng.get("rip"), v.cr2) == (handler, cr2), "not the original #PF"
            frame = v.copy_from_guest(eng.get("rsp"), 8 * 4)
            assert int.from_bytes(frame[16:24], "little") == 3      # its error code
            assert int.from_bytes(frame[24:32], "little") == CODE_VA  # at the store
        finally:
            for i in range(512):
                if mem.read_u64(ma + 8 * i) != int.from_bytes(before[8 * i:8 * i + 8], "little"):
                    hv.pagetables.update_entry(dom.domid, ma + 8 * i,
                                               int.from_bytes(before[8 * i:8 * i + 8], "little"))
        assert dom.shutdown_reason is None


# (code, the register that addresses the store, its value from entry k's first byte, the
# store's offset from it) -- a store Xen takes.
APPLIED = {
    "dword-upper-half": ("8907", "rdi", 4, 4),      # mov [rdi], eax: merged with the low half
    "pushfq": ("9c", "rsp", 8, 0),                  # the guest's flags, TF as it has it
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("form", list(APPLIED))
async def test_a_store_xen_takes_is_applied(engine, form):
    code, reg, at, off = APPLIED[form]
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        eng, mem = v.engine, hv.mem
        l1, ma, before, k = _l1_with_room(hv, v)
        insn = bytes.fromhex(code)
        v.copy_to_guest(CODE_VA, insn + b"\xeb\xfe")
        eng.write({"rip": CODE_VA, reg: l1 + 8 * k + at, "rax": 2})
        flags = eng.get("rflags")
        assert not flags & TF
        try:
            _fault(v, l1 + 8 * k + off)
            assert eng.get("rip") == CODE_VA + len(insn)
            got = mem.read_u64(ma + 8 * k)
            assert not got & TF, f"TF pushed: {got:#x}"
            assert got == (2 << 32 if reg == "rdi" else flags & ~RF), (hex(got), hex(flags))
        finally:
            hv.pagetables.update_entry(dom.domid, ma + 8 * k, 0)
        assert dom.shutdown_reason is None


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("form", ["moffs", "rep-stosd"])
async def test_a_compat_mode_store_is_decoded_as_compat_code(engine, form):
    """The kernel in compatibility mode (a kernel-mode iret to FLAT_RING3_CS32, RPL 0)
    stores EAX into its L1 that maps USER_CODE_VA, aliased read-only below 4 GiB:
    - `a3 moffs32` (5 bytes; 64-bit mode reads a 9-byte `movabs`): applied, RIP past it;
    - `rep stosd` with RCX 2 + 2^32: the count is ECX there (2 stores, one per fault), not
      RCX (64-bit mode's)."""
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        eng, mem, pt = v.engine, hv.mem, hv.pagetables
        # The user half in the kernel's root too (its L4 slot 0 names the user root's L3,
        # as Linux's roots do), so that kernel code below 4 GiB runs.
        l4e = v.kernel_root << 12
        saved_l4e = mem.read_u64(l4e)
        pt.update_entry(dom.domid, l4e, mem.read_u64(v.user_root << 12))
        mmu_ops.written_all(v)
        code_ma = pt.translate(v.kernel_root << 12, USER_CODE_VA, False)
        l1e = pt.l1_entry_address(v.kernel_root, USER_CODE_VA)
        table = l1e & ~0xFFF
        idx = next(i for i in range(511, 0, -1)
                   if not mem.read_u64(table + 8 * i) and not mem.read_u64(table + 8 * i - 8))
        alias = (USER_CODE_VA & ~0x1FFFFF) + 4096 * idx             # maps the table itself
        k = idx - 1                                                  # a free entry of it
        pt.update_entry(dom.domid, table + 8 * idx, table | 0x25)    # present, user, accessed
        mmu_ops.written_all(v)
        saved = bytes(mem.map[code_ma:code_ma + 8])
        target = alias + 8 * k
        code = b"\xa3" + target.to_bytes(4, "little") if form == "moffs" else b"\xf3\xab"
        mem.map[code_ma:code_ma + 8] = (code + b"\xeb\xfe" + bytes(8))[:8]
        try:
            v.copy_to_guest(DATA_VA, IRET_CONTEXT.pack(0, 0, 0, 0, USER_CODE_VA, 0xE020, 0x202,
                                                       DATA_VA + 0x800, 0xE02B))
            eng.write({"rsp": DATA_VA})
            traps.do_iret(v)
            assert v.kernel_mode and eng.get("cs") == 0xE023 and eng.get("rip") == USER_CODE_VA
            assert eng.compat_mode()
            eng.write({"rax": 0x1234_5678_0000_0002, "rdi": target, "rcx": (1 << 32) + 2})
            _fault(v, target)
            if form == "rep-stosd":
                assert eng.get("rip") == USER_CODE_VA and eng.get("rcx") & 0xFFFFFFFF == 1
                _fault(v, target + 4)
            assert eng.get("rip") == USER_CODE_VA + len(code), hex(eng.get("rip"))
            assert mem.read_u64(table + 8 * k) == (2 if form == "moffs" else 2 << 32 | 2)
        finally:
            mem.map[code_ma:code_ma + 8] = saved
            if mem.read_u64(table + 8 * k):
                pt.update_entry(dom.domid, table + 8 * k, 0)
            pt.update_entry(dom.domid, table + 8 * idx, 0)
            pt.update_entry(dom.domid, l4e, saved_l4e)
            mmu_ops.written_all(v)
            _back(v)
        assert dom.shutdown_reason is None
