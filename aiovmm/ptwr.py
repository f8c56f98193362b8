"""Writable page tables (the seed's "writeable page tables"; Xen's ptwr emulation).

A guest kernel may update its own L1 page tables with ordinary stores although they are
mapped read-only. The store faults (#PF, present+write, kernel mode); if the faulting page
is one of the domain's validated L1 tables, the hypervisor emulates the instruction:

1. copy the L1 frame into a scratch frame and point the faulting VA at the scratch copy,
   writable (a hypervisor write of the L1 entry, not visible as a guest mapping);
2. execute exactly that one instruction (capstone gives its length; the engine runs to the
   next instruction), so any store form works (mov, xchg, cmpxchg, or, and ...); a REP
   string store runs one iteration per fault, as Xen's emulator does (put_rep_prefix: the
   count drops by one and RIP stays on the instruction while it is not zero), so the guest
   re-executes it and each entry it stores faults, is validated and applied on its own;
3. restore the mapping, and apply every 8-byte entry the instruction changed through the
   normal validation (mmu.PageTables.update_entry): a refused entry is never written, and the
   guest gets the original #PF instead.

The store is therefore never applied unvalidated. It cannot run inside the fault hook (no
nested emulation), so the fault hook records the request and ends the slice; the vCPU loop
completes it before the next slice.
"""
from __future__ import annotations

import dataclasses
import logging
import struct
from typing import TYPE_CHECKING

from .abi import PAGE_SHIFT, PAGE_SIZE, PTE_FRAME_MASK, _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_PRESENT, _PAGE_RW
from .emulate import _LEGACY_PREFIXES, MAX_INSN_LEN
from .memory import PageType
from .mmu import GuestFault, MMUError
from .mmu_ops import written_all

if TYPE_CHECKING:
    from .vcpu import VCPU

log = logging.getLogger("aiovmm.ptwr")
_U64 = struct.Struct("<Q")


@dataclasses.dataclass
class PendingWrite:
    rip: int
    length: int
    va: int
    l1e_addr: int          # machine address of the L1 entry mapping the page-table page
    frame: int             # MFN of the guest L1 table being written
    error: int             # the #PF error code, for the bounce if emulation is refused
    mnemonic: str = ""     # the store instruction, decoded
    ops: str = ""
    code: bytes = b""      # its bytes as decoded: only these are ever stepped (traps.finish_ptwr)


def candidate(v: "VCPU", cr2: int, error: int, rip: int) -> PendingWrite | None:
    """Is this #PF a kernel store to one of the domain's own validated L1 tables?"""
    if not v.kernel_mode or error & 3 != 3:
        return None
    mem = v.domain.mem
    pt = v.domain.hypervisor.pagetables
    try:
        l1e_addr = pt.l1_entry_address(v.kernel_root, cr2)
    except MMUError:
        return None
    l1e = mem.read_u64(l1e_addr)
    # A fault the (KVM) TLB raised from a stale entry may find the PTE no longer present:
    # its frame bits are then the guest's to choose, never a frame to emulate a write to.
    if not l1e & _PAGE_PRESENT:
        return None
    # A present leaf is a validated entry or Xen's own: it names RAM. An RW leaf holds a
    # writable type on its frame (get_writable), which is then never an L1: the type test
    # below says both. A type is held with its count (put_type resets both).
    frame = (l1e & PTE_FRAME_MASK) >> PAGE_SHIFT
    if mem.owner[frame] != v.domain.domid:
        return None
    if mem.type[frame] != PageType.l1:
        return None
    try:
        code = v.copy_from_guest(rip, 15)
    except GuestFault:
        try:
            code = v.copy_from_guest(rip, PAGE_SIZE - (rip & (PAGE_SIZE - 1)))
        except GuestFault:
            return None
    decoded = v.engine.decode(code)
    if decoded is None:
        return None
    n, mnemonic, ops = decoded
    return PendingWrite(rip, n, cr2, l1e_addr, frame, error, mnemonic, ops, bytes(code[:n]))


_GPR64 = {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
          "r12", "r13", "r14", "r15"}


def try_fast(v: "VCPU", w: PendingWrite) -> bool | None:
    """The common forms, emulated without stepping: an aligned 8-byte `mov` of a register or
    immediate, or `xchg` with a register, into the faulting entry: its decoded address must
    be CR2 (a store from the page before the L1 faults at the L1's first byte, aligned, with
    only part of it there: Xen's ptwr takes only stores within the CR2 page, decoded).
    Returns True (applied), False
    (refused by validation: the caller bounces the #PF) or None (another form: step it)."""
    if w.va & 7:
        return None
    mnemonic, ops = w.mnemonic, w.ops
    if not ops.startswith("qword ptr [") or "], " not in ops:
        return None
    dst, src = ops[len("qword ptr ["):].split("], ", 1)
    src = src.strip()
    eng = v.engine
    if _address(eng, dst, w.rip + w.length) != w.va:
        return None          # not (only) at CR2: a store from the page before, ... (step it)
    if mnemonic == "mov":
        if src in _GPR64:
            value = eng.get(src)
        else:
            try:
                value = int(src, 0) & 0xFFFFFFFFFFFFFFFF     # imm32, sign-extended by capstone
            except ValueError:
                return None
        regs = {}
    elif mnemonic == "xchg" and src in _GPR64:
        value = eng.get(src)
        regs = {src: v.domain.mem.read_u64((w.frame << PAGE_SHIFT) | (w.va & (PAGE_SIZE - 1)))}
    else:
        return None
    ptr = (w.frame << PAGE_SHIFT) | (w.va & (PAGE_SIZE - 1))
    try:
        flush = v.domain.hypervisor.pagetables.update_entry(v.domain.domid, ptr, value)
    except MMUError as e:
        log.info("d%d: writable page-table store refused at %#x: %s", v.domain.domid, w.rip, e)
        return False
    regs["rip"] = w.rip + w.length
    eng.write(regs)
    if flush:                                  # only a replaced present entry can be cached
        written_all(v)
    v.ptwr_updates += 1
    return True


def _address(eng, inner: str, rip_next: int) -> int | None:
    """The linear address of a capstone memory operand's inside (`rdi + 8`, `rip + 0x10`,
    `rax + rcx*8 - 4`): 64-bit registers, scale, displacement; None for another form."""
    total = 0
    for term in inner.replace(" - ", " + -").split(" + "):
        neg = term.startswith("-")
        term = term.lstrip("-")
        reg, _, scale = term.partition("*")
        if reg == "rip":
            val = rip_next
        elif reg in _GPR64:
            val = eng.get(reg)
        else:
            try:
                val = int(reg, 0)
            except ValueError:
                return None
        if scale:
            if scale not in ("1", "2", "4", "8"):
                return None
            val *= int(scale)
        total += -val if neg else val
    return total & 0xFFFFFFFFFFFFFFFF


_STRING_STORES = frozenset((0x6C, 0x6D, 0xA4, 0xA5, 0xAA, 0xAB))     # ins, movs, stos
_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
         "r12", "r13", "r14", "r15", "rflags")


def _rep_count_mask(code: bytes) -> int | None:
    """The count register's mask (the address size: RCX, or ECX with a 67 prefix) if `code`
    is a REP (F2/F3) string store; else None. In 64-bit mode a REX byte may stand anywhere
    among the legacy prefixes and repeat (`48 f3 ab`, `f3 48 48 ab`: the CPU ignores all but
    one REX right before the opcode): the prefixes are every legacy or REX byte before the
    opcode, as capstone and the CPU read them. LOCK: #UD, never a store."""
    n = 0
    while n < len(code) and (code[n] in _LEGACY_PREFIXES or 0x40 <= code[n] <= 0x4F):
        if code[n] == 0xF0:
            return None
        n += 1
    if n >= min(len(code), MAX_INSN_LEN) or code[n] not in _STRING_STORES \
            or not {0xF2, 0xF3} & set(code[:n]):
        return None
    return 0xFFFFFFFF if 0x67 in code[:n] else 0xFFFFFFFFFFFFFFFF


def complete(v: "VCPU", w: PendingWrite) -> bool:
    """Emulate the recorded store. True if done; False: the caller bounces the #PF, with
    the registers as they were at the fault (Xen commits none on a refused write)."""
    hv = v.domain.hypervisor
    mem = v.domain.mem
    scratch = hv.ptwr_scratch
    eng = v.engine
    regs = dict(zip(_GPRS, eng.read(_GPRS)))
    mask = _rep_count_mask(w.code)
    if mask is not None:
        count = regs["rcx"] & mask
        if not count:                          # nothing to store: the CPU goes past it
            eng.write({"rcx": count, "rip": w.rip + w.length})
            return True
        eng.set("rcx", 1)                      # one iteration per fault (Xen's put_rep_prefix)
    before = mem.read(w.frame << PAGE_SHIFT, PAGE_SIZE)
    mem.write(scratch << PAGE_SHIFT, before)
    l1e = mem.read_u64(w.l1e_addr)
    mem.write_pte(w.l1e_addr, (l1e & ~PTE_FRAME_MASK) | (scratch << PAGE_SHIFT) | _PAGE_RW | _PAGE_ACCESSED | _PAGE_DIRTY)
    eng.flush_tlb()
    v.in_ptwr_step = True
    try:
        ok = eng.step_to(w.rip + w.length)
    finally:
        v.in_ptwr_step = False
        mem.write_pte(w.l1e_addr, l1e)
        eng.flush_tlb()
    if not ok:
        eng.write(regs | {"rip": w.rip})
        return False
    # A store of up to 16 bytes at CR2 (cmpxchg16b) changes only the entries around it.
    # A wider one (fxsave, fnsave, AVX) that changed any other entry is refused whole, as
    # Xen's ptwr takes no store wider than an entry (ptwr_emulated_update: unhandleable, the
    # #PF goes to the guest); it was half-applied, the rest of it dropped.
    first = max(0, ((w.va & (PAGE_SIZE - 1)) >> 3) - 1)
    last = min(511, first + 3)
    after = mem.read(scratch << PAGE_SHIFT, PAGE_SIZE)
    if after[:8 * first] != before[:8 * first] or after[8 * (last + 1):] != before[8 * (last + 1):]:
        log.info("d%d: page-table store at %#x wider than an entry: refused", v.domain.domid, w.rip)
        eng.write(regs | {"rip": w.rip})
        return False
    pt = hv.pagetables
    for i in range(first, last + 1):
        a = _U64.unpack_from(before, 8 * i)[0]
        b = _U64.unpack_from(after, 8 * i)[0]
        if a != b:
            try:
                pt.update_entry(v.domain.domid, (w.frame << PAGE_SHIFT) + 8 * i, b)
            except MMUError as e:
                log.info("d%d: writable page-table store refused at %#x: %s", v.domain.domid, w.rip, e)
                eng.write(regs | {"rip": w.rip})     # re-run from the fault's state after the #PF
                return False
    if mask is not None and count > 1:
        # (Xen's put_loop_count: a 32-bit count zero-extends RCX.)
        eng.write({"rcx": count - 1, "rip": w.rip})
    written_all(v)
    v.ptwr_updates += 1
    return True
