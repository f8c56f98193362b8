"""Writable page tables (the seed's "writeable page tables"; Xen's ptwr emulation).

A guest kernel may update its own L1 page tables with ordinary stores although they are
mapped read-only. The store faults (#PF, present+write, kernel mode); if the faulting page
is one of the domain's validated L1 tables, the hypervisor emulates the instruction:

1. copy the L1 frame into a scratch frame and point the faulting VA at the scratch copy,
   writable (a hypervisor write of the L1 entry, not visible as a guest mapping);
2. execute exactly that one instruction (emulate.disasm gives its length, decoded as the
   vCPU's mode reads it: 64-bit or compatibility mode; the engine runs to the next
   instruction), so any store form works (mov, xchg, cmpxchg, or, and ...) that Xen's
   ptwr_emulated_update takes: 1, 2, 4 or 8 bytes, naturally aligned, within the page of
   CR2 (xen_refuses; a refused store writes nothing and the guest gets the original #PF); a REP
   string store runs one iteration per fault, as Xen's emulator does (put_rep_prefix: the
   count drops by one and RIP stays on the instruction while it is not zero), so the guest
   re-executes it and each entry it stores faults, is validated and applied on its own;
3. restore the mapping, and apply every 8-byte entry the instruction changed through the
   normal validation (mmu.PageTables.update_entry): a refused entry is never written, and the
   guest gets the original #PF instead.

Where the CPU runs it, not Xen's emulator: Xen decodes with the domain's width
(pv_ro_page_fault: addr_size 64 for a 64-bit PV domain, whatever CS is), here the step runs
the instruction as the vCPU's mode reads it, so it is decoded so too (`a3 moffs32` in a
32-bit code segment is 5 bytes, not a 9-byte `movabs`). A `pushf` stores the guest's TF,
never the step's own (the KVM engine steps with TF set).

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
from .emulate import _LEGACY_PREFIXES, MAX_INSN_LEN, disasm
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
    compat: bool = False   # decoded for compatibility mode (a 32-bit code segment)
    store: tuple[int, int] | None = None   # (linear address, bytes) of its store, if known


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
    compat = v.engine.compat_mode()
    decoded = disasm(code, compat)
    if decoded is None:
        return None
    n, mnemonic, ops = decoded
    return PendingWrite(rip, n, cr2, l1e_addr, frame, error, mnemonic, ops, bytes(code[:n]),
                        compat, _store(v.engine, code[:n], mnemonic, ops, compat, rip + n))


_GPR64 = {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
          "r12", "r13", "r14", "r15"}


# Where a decoded store writes (_store). The store's operand is the first one (Intel order),
# its size the `ptr` word, but for these: stack stores (push, pushf, call, enter: [RSP -
# width]) and state saves, which name no size (every one of them beyond 8 bytes).
_PUSHES = frozenset(("push", "pushf", "pushfd", "pushfq", "call", "enter"))
_WIDE = frozenset(("fxsave", "fxsave64", "xsave", "xsave64", "xsaveopt", "xsaveopt64", "xsavec",
                   "xsavec64", "xsaves", "xsaves64", "fnsave", "fsave", "fnstenv", "fstenv",
                   "sgdt", "sidt"))
_BIT_STORES = frozenset(("bts", "btr", "btc"))
_REG_PARTS: dict[str, tuple[str, int]] = {}
for _i, _r in enumerate(("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")):
    _REG_PARTS[_r] = (_r, 64)
    _REG_PARTS["e" + _r[1:]] = (_r, 32)
    _REG_PARTS[_r[1:]] = (_r, 16)
    _REG_PARTS[f"r{_i + 8}"] = (f"r{_i + 8}", 64)
    _REG_PARTS[f"r{_i + 8}d"] = (f"r{_i + 8}", 32)
    _REG_PARTS[f"r{_i + 8}w"] = (f"r{_i + 8}", 16)


def _reg_value(eng, name: str) -> int:
    reg, bits = _REG_PARTS[name]
    return eng.get(reg) & ((1 << bits) - 1)


_SIZES = {"byte": 1, "word": 2, "dword": 4, "fword": 6, "qword": 8, "tbyte": 10, "xword": 10,
          "xmmword": 16, "ymmword": 32, "zmmword": 64}


def _store(eng, code: bytes, mnemonic: str, ops: str, compat: bool,
           rip_next: int) -> tuple[int, int] | None:
    """(linear address, bytes) of the store of the decoded instruction (emulate.disasm's
    mnemonic and operands) as Xen's emulator hands it to ptwr_emulated_write/_cmpxchg, from
    the registers at the fault; None if it has no store this can tell (such an instruction
    is stepped and its changed entries are taken within the window around CR2, complete).
    Segment bases: FS's and GS's; the others are flat (Xen's PV segments: a guest's own LDT
    segment with a base is not followed, and then CR2 decides: xen_refuses)."""
    m = mnemonic.split()[-1]                       # "lock cmpxchg", "rep stosq"
    wrap = 0xFFFFFFFF if compat else 0xFFFFFFFFFFFFFFFF
    if m in _PUSHES:
        n = 0
        while n < len(code) and (code[n] in _LEGACY_PREFIXES or (not compat and 0x40 <= code[n] <= 0x4F)):
            n += 1
        width = 2 if 0x66 in code[:n] and m != "call" else 4 if compat else 8
        return ((eng.get("rsp") & wrap) - width) & wrap, width
    dst, _, src = ops.partition(", ")
    kind, _, rest = dst.partition(" ptr ")
    if not rest:
        kind, rest = "", dst
    seg, _, inner = rest.rpartition("[")
    if not inner.endswith("]") or seg not in ("", "es:", "cs:", "ss:", "ds:", "fs:", "gs:"):
        return None
    size = 512 if m in _WIDE else _SIZES.get(kind)
    if size is None:
        return None
    ea = _address(eng, inner[:-1], rip_next)
    if ea is None:
        return None
    addr, bits = ea
    if m in _BIT_STORES and size in (2, 4, 8) and src in _REG_PARTS:
        # bts/btr/btc with a register bit offset: the signed offset selects the operand
        # (SDM "BT": effective address + size * floor(offset / bits)).
        off = _reg_value(eng, src)
        width = 8 * size
        off -= (off >> (width - 1)) << width
        addr += (off >> width.bit_length() - 1) * size
    addr &= (1 << (bits or (32 if compat else 64))) - 1
    if seg in ("fs:", "gs:"):
        addr += eng.get(seg[0] + "s_base")
    return addr & wrap, size


def xen_refuses(w: PendingWrite) -> str | None:
    """Why Xen's ptwr_emulated_write/_cmpxchg/_update refuse the store, or None: a store of
    1, 2, 4 or 8 bytes, naturally aligned, within the page of CR2 (a smaller one is merged
    with the rest of its entry and the entry validated, as the step over the scratch copy
    does). Refused, the guest gets the original #PF (pv_ro_page_fault returns 0: the fault
    goes on to the guest as it was) and nothing is written. CR2 is the hardware's word on
    where the store starts unless it is the first byte of the page: then the store may
    have begun on the page before, as its decoded address says."""
    if w.store is None:
        return None
    addr, size = w.store
    if size not in (1, 2, 4, 8):
        return f"{size}-byte store"
    if w.va & (PAGE_SIZE - 1) or not 0 <= w.va - addr < size:
        addr = w.va
    if (addr ^ w.va) & ~(PAGE_SIZE - 1):
        return f"store at {addr:#x} begins outside the page of cr2 {w.va:#x}"
    if addr & (size - 1):
        return f"misaligned {size}-byte store at {addr:#x}"
    return None


def _refused(v: "VCPU", w: PendingWrite) -> bool:
    why = xen_refuses(w)
    if why is not None:
        log.info("d%d: page-table store at %#x refused (Xen's ptwr_emulated_update): %s",
                 v.domain.domid, w.rip, why)
    return why is not None


def try_fast(v: "VCPU", w: PendingWrite) -> bool | None:
    """The common forms, emulated without stepping: an aligned 8-byte `mov` of a register or
    immediate, or `xchg` with a register, into the faulting entry: its decoded address must
    be CR2 (a store from the page before the L1 faults at the L1's first byte, aligned, with
    only part of it there: Xen's ptwr takes only stores within the CR2 page, decoded).
    Returns True (applied), False
    (refused by validation: the caller bounces the #PF) or None (another form: step it)."""
    if _refused(v, w):
        return False
    if w.va & 7:
        return None
    mnemonic, ops = w.mnemonic, w.ops
    if not ops.startswith("qword ptr [") or "], " not in ops:
        return None
    dst, src = ops[len("qword ptr ["):].split("], ", 1)
    src = src.strip()
    eng = v.engine
    ea = _address(eng, dst, w.rip + w.length)
    if ea is None or ea[0] & 0xFFFFFFFFFFFFFFFF != w.va or ea[1] not in (0, 64):
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


def _address(eng, inner: str, rip_next: int) -> tuple[int, int] | None:
    """(offset, address size in bits, 0 if no register says) of a capstone memory
    operand's inside (`rdi + 8`, `rip + 0x10`, `rax + rcx*8 - 4`, `edi`, `bx + si`):
    registers, scale, displacement, unwrapped; None for another form."""
    total = bits = 0
    for term in inner.replace(" - ", " + -").split(" + "):
        neg = term.startswith("-")
        term = term.lstrip("-")
        reg, _, scale = term.partition("*")
        if reg in ("rip", "eip"):
            val = rip_next
            bits = 64 if reg == "rip" else 32
        elif reg in _REG_PARTS:
            val = _reg_value(eng, reg)
            bits = _REG_PARTS[reg][1]
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
    return total, bits


_STRING_STORES = frozenset((0x6C, 0x6D, 0xA4, 0xA5, 0xAA, 0xAB))     # ins, movs, stos
_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
         "r12", "r13", "r14", "r15", "rflags")


def _rep_count_mask(code: bytes, compat: bool = False) -> int | None:
    """The count register's mask (the address size: RCX, or ECX with a 67 prefix; in
    compatibility mode ECX, or CX with a 67 prefix) if `code` is a REP (F2/F3) string store;
    else None. In 64-bit mode a REX byte may stand anywhere among the legacy prefixes and
    repeat (`48 f3 ab`, `f3 48 48 ab`: the CPU ignores all but one REX right before the
    opcode): the prefixes are every legacy or REX byte before the opcode, as capstone and
    the CPU read them (in compatibility mode 40-4F are instructions, never prefixes).
    LOCK: #UD, never a store."""
    n = 0
    while n < len(code) and (code[n] in _LEGACY_PREFIXES or (not compat and 0x40 <= code[n] <= 0x4F)):
        if code[n] == 0xF0:
            return None
        n += 1
    if n >= min(len(code), MAX_INSN_LEN) or code[n] not in _STRING_STORES \
            or not {0xF2, 0xF3} & set(code[:n]):
        return None
    if compat:
        return 0xFFFF if 0x67 in code[:n] else 0xFFFFFFFF
    return 0xFFFFFFFF if 0x67 in code[:n] else 0xFFFFFFFFFFFFFFFF


def complete(v: "VCPU", w: PendingWrite) -> bool:
    """Emulate the recorded store. True if done; False: the caller bounces the #PF, with
    the registers as they were at the fault (Xen commits none on a refused write)."""
    hv = v.domain.hypervisor
    mem = v.domain.mem
    scratch = hv.ptwr_scratch
    eng = v.engine
    regs = dict(zip(_GPRS, eng.read(_GPRS)))
    mask = _rep_count_mask(w.code, w.compat)
    if mask is not None:
        count = regs["rcx"] & mask
        # The count as the CPU writes it: a 32-bit count zero-extends RCX (Xen's
        # put_loop_count), a 16-bit one keeps the rest of it.
        keep = regs["rcx"] & ~mask if mask == 0xFFFF else 0
        if not count:                          # nothing to store: the CPU goes past it
            eng.write({"rcx": keep | count, "rip": w.rip + w.length})
            return True
    if _refused(v, w):
        return False
    if mask is not None:
        eng.set("rcx", keep | 1)               # one iteration per fault (Xen's put_rep_prefix)
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
    if not ok and mask is not None:
        rip, rcx = eng.read(("rip", "rcx"))
        if rip == w.rip and not rcx & mask:
            # The one iteration ran (the count is 0: a faulting one leaves it at 1), but the
            # step's #DB came with RIP still on the instruction (measured: kvm-pvm, a
            # 32-bit code segment). With a zero count the CPU goes past it.
            eng.set("rip", w.rip + w.length)
            ok = True
    if not ok:
        eng.write(regs | {"rip": w.rip})
        return False
    if w.mnemonic.startswith("pushf") and w.store is not None:
        # The flags image holds TF as the guest had it: the KVM engine's step sets TF (its
        # #DB after the instruction), which pushf stores too. Xen's emulator pushes the
        # guest's own flags.
        at = (scratch << PAGE_SHIFT) + (w.store[0] & (PAGE_SIZE - 1)) + 1
        b = mem.read(at, 1)[0]
        mem.write(at, bytes([(b & ~1) | ((regs["rflags"] >> 8) & 1)]))
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
        eng.write({"rcx": keep | (count - 1), "rip": w.rip})
    written_all(v)
    v.ptwr_updates += 1
    return True
