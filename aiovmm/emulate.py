"""Emulation of privileged operations for PV guests (Xen's pv/emul-priv-op.c), engine-agnostic.

A PV kernel runs at CPL 3, so its privileged instructions fault. Xen emulates a fixed list of
them for the guest kernel and bounces the fault for everything else; this module is that list,
with ONE decoder for faulting instructions. It fetches the instruction bytes through the
guest's own page tables (VCPU.copy_from_guest, i.e. mmu.PageTables.translate), never through
the engine, and touches the vCPU only through the engine interface (read/write of registers),
so the emulated (Unicorn) and the KVM engine share it unchanged.

Entry points, called by traps.py / vcpu.py when an engine reports a fault:
  gp_fault(v, error) -> bool     #GP(error): emulate the instruction at RIP if Xen would
  ud_fault(v) -> bool            #UD: Xen's forced-emulation prefix (ud2; .ascii "xen"; cpuid)
                                 and instructions this machine model lacks but PV has (rdtscp)
  port_in(v, port, size) -> int | None     an IN the engine intercepted itself (Unicorn does
  port_out(v, port, size, value) -> bool   not fault port I/O at CPL 3); None/False = #GP(0)
  cpuid(v, leaf, subleaf) -> (a, b, c, d)  a CPUID the engine intercepted (policy in cpuid.py)
  rdtsc(v) -> int                the guest TSC (same clock as pvclock: 1 tick = 1 ns)
True means handled: registers and RIP updated, or another exception injected (e.g. #GP for a
refused MSR, #UD for xsetbv without CR4.OSXSAVE). False: bounce the original fault.

What Xen emulates (validate() in emul-priv-op.c): in/out/ins/outs, clts, wbinvd, mov to/from
CR and DR, wrmsr, rdmsr, rdtsc, cpuid, xsetbv, rdtscp, and cli/sti as no-ops when the virtual
IOPL allows them (else #GP). Everything else (hlt, invd, lgdt, swapgs, ...) is #GP to the
guest. Privileged ones need guest kernel mode (Xen fakes DPL 0 for the kernel's CS/SS so that
x86_emulate's ring-0 checks pass); from guest user mode they are #GP.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import cpuid as policy
from .abi import HYPERVISOR_VIRT_END, MmuExt, is_canonical
from .cpuid import Msr
from .mmu import GuestFault, MMUError

if TYPE_CHECKING:
    from .domain import Domain
    from .vcpu import VCPU

log = logging.getLogger("aiovmm.emulate")

GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
MAX_INSN_LEN = 15
FORCED_EMULATION_PREFIX = b"\x0f\x0bxen"           # ud2; .ascii "xen"
_LEGACY_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3})
RF_IOPL = 0x3000
DR6_ONES, DR7_ONES = 0xFFFF0FF0, 0x400
DR7_GD = 1 << 13
DR7_ACTIVE = 0xFF
DR_IO = 2
UNDEF = object()


class Inject(Exception):
    """Emulation ends in an exception for the guest (vector, error code)."""

    def __init__(self, vector: int, error: int = 0, cr2: int = 0) -> None:
        super().__init__(vector)
        self.vector, self.error, self.cr2 = vector, error, cr2


class Unhandled(Exception):
    """Not an instruction Xen emulates here: the original fault goes to the guest."""


# ---------------------------------------------------------------------------- the decoder
class Insn:
    """A decoded faulting instruction: opcode (0x0fXX for two-byte), ModRM fields, length."""

    __slots__ = ("rip", "length", "opcode", "rex", "opsize16", "rep", "mod", "reg", "rm", "imm")

    def __init__(self) -> None:
        self.rex = 0
        self.opsize16 = False
        self.rep = False
        self.mod = self.reg = self.rm = 0
        self.imm = 0


def fetch(v: "VCPU", rip: int) -> bytes:
    """Up to 15 instruction bytes at RIP, through the guest's page tables; stops at the
    first unreadable page (a #PF at RIP itself is the caller's to report)."""
    out = b""
    va = rip
    while len(out) < MAX_INSN_LEN:
        n = min(MAX_INSN_LEN - len(out), 0x1000 - (va & 0xFFF))
        try:
            out += v.copy_from_guest(va, n)
        except GuestFault:
            break
        va += n
    return out


_capstone: dict[bool, object] = {}


def disasm(code: bytes, compat: bool = False) -> tuple[int, str, str] | None:
    """The one decoder of whole instructions (capstone), for both engines: (length,
    mnemonic, operands in Intel syntax) of the first instruction of `code` as the CPU reads
    it in 64-bit mode or, `compat`, in compatibility mode (a 32-bit code segment: 40-4F are
    inc/dec, never REX; operand and address size 32, a 67 prefix makes addresses 16-bit;
    moffs is 4 bytes); None if the bytes do not decode."""
    cs = _capstone.get(compat)
    if cs is None:
        import capstone
        cs = _capstone[compat] = capstone.Cs(capstone.CS_ARCH_X86,
                                             capstone.CS_MODE_32 if compat else capstone.CS_MODE_64)
    for _addr, size, mnemonic, ops in cs.disasm_lite(code, 0, 1):
        return size, mnemonic, ops
    return None


def legacy_prefixes(code: bytes, rex: bool = False) -> int | None:
    """How many legacy prefixes (and, `rex`: 64-bit mode, REX bytes among them) start
    `code`. The CPU ignores them on the instructions that take none (int3, int1, into,
    int n, sysenter: the engines' reports of those skip them here), but LOCK makes each of
    those #UD, and an instruction past MAX_INSN_LEN faults: None for both (the fault the
    engine reported stands)."""
    n = 0
    while n < len(code) and (code[n] in _LEGACY_PREFIXES or (rex and 0x40 <= code[n] <= 0x4F)):
        if code[n] == 0xF0:
            return None
        n += 1
    return n if n < MAX_INSN_LEN else None


def decode(code: bytes, rip: int) -> Insn:
    """Decode the prefixes, opcode and ModRM of the instructions this module emulates."""
    i = Insn()
    i.rip = rip
    p = 0
    n = len(code)

    def byte() -> int:
        nonlocal p
        if p >= n:
            raise Unhandled("truncated instruction")
        b = code[p]
        p += 1
        return b

    b = byte()
    while b in _LEGACY_PREFIXES:
        if b == 0x66:
            i.opsize16 = True
        elif b in (0xF2, 0xF3):
            i.rep = True
        elif b == 0xF0:
            raise Inject(6)                     # LOCK on anything emulated here: #UD
        b = byte()
    if 0x40 <= b <= 0x4F:
        i.rex = b
        b = byte()
    if b == 0x0F:
        b = 0x0F00 | byte()
        if b in (0x0F01, 0x0F20, 0x0F21, 0x0F22, 0x0F23):
            m = byte()
            i.mod, i.reg, i.rm = m >> 6, (m >> 3) & 7, m & 7
            if b in (0x0F20, 0x0F21, 0x0F22, 0x0F23):
                # MOV CR/DR always use the register form (mod is ignored).
                i.reg |= 8 if i.rex & 4 else 0
                i.rm |= 8 if i.rex & 1 else 0
    elif b in (0xE4, 0xE5, 0xE6, 0xE7):
        i.imm = byte()
    if p > MAX_INSN_LEN:
        raise Inject(13)
    i.opcode = b
    i.length = p
    return i


# ---------------------------------------------------------------------------- helpers
def _kernel_only(v: "VCPU") -> None:
    """x86_emulate's ring-0 check: Xen reports DPL 0 for the guest kernel's CS/SS."""
    if not v.kernel_mode:
        raise Inject(13)


def architectural_iopl(v: "VCPU") -> bool:
    """VMASST_TYPE_architectural_iopl (xen.h): the kernel counts as ring 0, HYPERVISOR_iret
    sets the virtual IOPL from its frame, bounce frames report it (traps.py)."""
    return bool(v.domain.vm_assist & (1 << VMASST_TYPE_architectural_iopl))


def iopl_ok(v: "VCPU") -> bool:
    """Xen's iopl_ok: the kernel counts as ring 1 (ring 0 with VMASST architectural_iopl)."""
    if v.kernel_mode:
        cpl = 0 if architectural_iopl(v) else 1
    else:
        cpl = 3
    return cpl <= v.iopl


VMASST_TYPE_architectural_iopl = 4


def _finish(v: "VCPU", insn: Insn, regs: dict[str, int] | None = None) -> None:
    regs = dict(regs or {})
    regs["rip"] = insn.rip + insn.length
    v.engine.write(regs)


def _reg(v: "VCPU", idx: int) -> int:
    return v.engine.get(GPR_NAMES[idx])


# ---------------------------------------------------------------------------- port I/O
def _io_allowed(v: "VCPU", port: int, size: int) -> bool:
    """guest_io_okay: the virtual IOPL, else the guest's I/O bitmap (PHYSDEVOP_set_iobitmap)."""
    if iopl_ok(v):
        return True
    base, nr = v.iobmp
    if nr and port + size <= nr:
        try:
            raw = v.copy_from_guest(base + (port >> 3), 2) if v.kernel_mode else _user_read_kernel(v, base + (port >> 3), 2)
        except GuestFault:
            return False
        mask = int.from_bytes(raw, "little")
        return not mask & (((1 << size) - 1) << (port & 7))
    return False


def _user_read_kernel(v: "VCPU", va: int, n: int) -> bytes:
    """Xen toggles to the kernel page tables to read the I/O bitmap for a user-mode access."""
    mmu = v.domain.hypervisor.pagetables
    ma = mmu.translate(v.kernel_root << 12, va, False)
    if (va & 0xFFF) + n > 0x1000:
        raise GuestFault(va, False)
    return bytes(v.domain.mem.view[ma:ma + n])


def _addr_ok(a: int) -> bool:
    """Xen's __addr_ok: below 2^47 or above Xen's range."""
    return a < 1 << 47 or a >= HYPERVISOR_VIRT_END


def port_in(v: "VCPU", port: int, size: int) -> int | None:
    """An IN the domain may issue reads all ones: a domU has no I/O ports granted, so Xen's
    guest_io_read gives ~0 for every port (PIT/CMOS/PCI config are the hardware domain's).
    None: not permitted -> #GP(0)."""
    if not _io_allowed(v, port & 0xFFFF, size):
        return None
    return (1 << (8 * size)) - 1


def port_policy_changed(dom: "Domain") -> None:
    """One of port_in's inputs changed (the domain's VM assists, a vCPU's IOPL or I/O
    bitmap): every vCPU of the domain forgets the INs its engine answers by itself
    (port_in_fixed), not only the one whose exit made the change, so no other vCPU answers
    all ones from its table where the policy now refuses. The one place of that rule:
    Domain.vm_assist, VCPU.iopl and VCPU.iobmp call it when they change."""
    for v in dom.vcpus:
        v.engine.forget_port_answers()


def port_in_fixed(v: "VCPU") -> bool:
    """True if port_in's answer right now depends on no guest memory: the virtual IOPL grants
    every port (no I/O bitmap the guest may rewrite without an exit). An engine may then
    repeat an answer until the hypervisor next handles an exit (kvm_engine's C fast path)."""
    return iopl_ok(v)


def port_out(v: "VCPU", port: int, size: int, value: int) -> bool:
    """An OUT the domain may issue is dropped (guest_io_write, no ports granted)."""
    return _io_allowed(v, port & 0xFFFF, size)


def _size(insn: Insn, opcode: int) -> int:
    if not opcode & 1:
        return 1
    return 2 if insn.opsize16 else 4


def _emulate_io(v: "VCPU", insn: Insn) -> None:
    op = insn.opcode
    size = _size(insn, op)
    port = insn.imm if op in (0xE4, 0xE5, 0xE6, 0xE7) else v.engine.get("rdx") & 0xFFFF
    if op in (0xE4, 0xE5, 0xEC, 0xED):                  # IN
        val = port_in(v, port, size)
        if val is None:
            raise Inject(13)
        rax = v.engine.get("rax")
        if size == 4:
            rax = val                                      # 32-bit writes zero-extend
        else:
            mask = (1 << (8 * size)) - 1
            rax = (rax & ~mask) | val
        _finish(v, insn, {"rax": rax})
        return
    if op in (0xE6, 0xE7, 0xEE, 0xEF):                  # OUT
        val = v.engine.get("rax") & ((1 << (8 * size)) - 1)
        if not port_out(v, port, size, val):
            raise Inject(13)
        _finish(v, insn)
        return
    # INS (6c/6d) / OUTS (6e/6f), with or without REP, 64-bit addressing.
    rcx, rdi, rsi, rflags = v.engine.read(("rcx", "rdi", "rsi", "rflags"))
    count = rcx if insn.rep else 1
    step = -size if rflags & 0x400 else size
    if not _io_allowed(v, port, size):
        raise Inject(13)
    done = 0
    try:
        while done < count and done < 4096:
            addr = rdi if op in (0x6C, 0x6D) else rsi
            if not _addr_ok(addr):
                raise Inject(13)                          # pv_emul_virt_to_linear
            if op in (0x6C, 0x6D):
                v.copy_to_guest(rdi, ((1 << (8 * size)) - 1).to_bytes(size, "little"))
                rdi = (rdi + step) & (2**64 - 1)
            else:
                v.copy_from_guest(rsi, size)
                rsi = (rsi + step) & (2**64 - 1)
            done += 1
    except (GuestFault, Inject) as f:
        regs = {"rdi": rdi, "rsi": rsi}
        if insn.rep:
            regs["rcx"] = rcx - done
        v.engine.write(regs)
        if isinstance(f, Inject):
            raise
        # x86_emul_pagefault(PFEC_write_access for INS, 0 for OUTS, address)
        raise Inject(14, 2 if f.write else 0, f.va) from None
    regs = {"rdi": rdi, "rsi": rsi}
    if insn.rep:
        regs["rcx"] = rcx - done
        if done < count:                                 # long string: resume it next time
            regs["rip"] = insn.rip
            v.engine.write(regs)
            return
    _finish(v, insn, regs)


# ---------------------------------------------------------------------------- control registers
def read_cr(v: "VCPU", n: int) -> int:
    if n == 0:
        return (policy.HOST_CR0 & ~policy.CR0_TS) | (policy.CR0_TS if v.fpu_ts else 0)
    if n == 2:
        return v.cr2
    if n == 3:
        return v.kernel_root << 12 if v.kernel_mode else v.user_root << 12
    if n == 4:
        return v.cr4
    raise Unhandled(f"read of CR{n}")


def write_cr(v: "VCPU", n: int, val: int) -> None:
    if n == 0:
        if (val ^ policy.HOST_CR0) & ~policy.CR0_TS:
            log.warning("d%d: attempt to change unmodifiable CR0 flags (%#x)", v.domain.domid, val)
            raise Unhandled("CR0")
        v.fpu_ts = bool(val & policy.CR0_TS)
        return
    if n == 2:
        v.cr2 = val
        v.domain.mem.write_u64(v.info_maddr + 16, val)  # vcpu_info.arch.cr2 (arch_set_cr2)
        return
    if n == 3:
        from . import mmu_ops
        try:
            mmu_ops._mmuext_one(v, MmuExt.NEW_BASEPTR, val >> 12, 0)
        except MMUError as e:
            raise Unhandled(f"CR3 {val:#x}: {e}") from None
        return
    if n == 4:
        v.cr4 = policy.fixup_guest_cr4(val, v)
        return
    raise Unhandled(f"write of CR{n}")


# ---------------------------------------------------------------------------- debug registers
def breakpoint_addr_ok(a: int) -> bool:
    return a < (1 << 47) or a >= HYPERVISOR_VIRT_END


def set_debugreg(v: "VCPU", reg: int, value: int) -> int:
    """Xen's set_debugreg: 0 or -errno (-ENODEV -> #UD, -EINVAL/-EPERM -> #GP in the
    emulator). Breakpoints are recorded (get_debugreg returns them) but the engines do not
    arm them: a guest sets them, it never sees them fire (documented limitation)."""
    value &= 2**64 - 1
    if reg in (0, 1, 2, 3):
        if not breakpoint_addr_ok(value):
            return -1
        v.dr[reg] = value
        return 0
    if reg in (4, 6):
        if reg == 4 and v.cr4 & policy.CR4_DE:
            return -19
        if value >> 32:
            return -22
        v.dr[6] = (value | DR6_ONES) & 0xFFFFFFFF & ~0x1000
        return 0
    if reg in (5, 7):
        if reg == 5 and v.cr4 & policy.CR4_DE:
            return -19
        if value >> 32:
            return -22
        value = (value & ~(0x3 << 14 | 1 << 11 | 1 << 12)) | DR7_ONES
        if value & DR7_GD:
            return -1
        if value & DR7_ACTIVE:
            for i in range(16, 32, 4):
                if (value >> i) & 3 == DR_IO and not v.cr4 & policy.CR4_DE:
                    return -1
        v.dr[7] = value
        return 0
    return -19


def get_debugreg(v: "VCPU", reg: int) -> int | None:
    """x86emul_read_dr: None for a register that does not exist (-> -ENODEV / #UD)."""
    if reg in (0, 1, 2, 3):
        return v.dr[reg]
    if reg in (4, 6):
        if reg == 4 and v.cr4 & policy.CR4_DE:
            return None
        return v.dr[6]
    if reg in (5, 7):
        if reg == 5 and v.cr4 & policy.CR4_DE:
            return None
        return v.dr[7]
    return None


# ---------------------------------------------------------------------------- MSRs
def read_msr(v: "VCPU", msr: int) -> int:
    """Xen's guest_rdmsr + read_msr for a 64-bit PV domU; Inject(13) when Xen gives #GP."""
    msr &= 0xFFFFFFFF
    eng = v.engine
    if msr == Msr.FS_BASE:
        return eng.get("fs_base")
    if msr == Msr.GS_BASE:
        return eng.get("gs_base")
    if msr == Msr.SHADOW_GS_BASE:
        return v.user_gs_base if v.kernel_mode else v.kernel_gs_base
    if msr == Msr.EFER:
        return policy.GUEST_EFER
    if msr == Msr.APIC_BASE:
        return policy.APIC_BASE_ENABLE | policy.APIC_DEFAULT_PHYS_BASE | (policy.APIC_BASE_BSP if v.id == 0 else 0)
    if msr == Msr.IA32_TSC:
        return rdtsc(v)
    if msr == Msr.CR_PAT:
        return policy.XEN_MSR_PAT
    if msr == Msr.IA32_MISC_ENABLE:
        return policy.GUEST_MISC_ENABLE
    if msr == Msr.IA32_PERF_CAPABILITIES:
        return 0
    if msr == Msr.IA32_FEATURE_CONTROL:
        return policy.FEATURE_CONTROL_LOCK
    if msr == Msr.UCODE_REV:
        return policy.MODEL_UCODE_REV              # "from Xen's last microcode load"
    if msr == Msr.INTEL_PLATFORM_INFO:
        return 0                                   # no CPUID faulting offered
    if msr == Msr.INTEL_MISC_FEATURES_ENABLES:
        return 0
    if msr in (Msr.IA32_PERF_STATUS, Msr.IA32_PERF_CTL, Msr.IA32_THERM_STATUS):
        return 0                                   # read-as-zero (Intel model)
    if msr == Msr.TSC_AUX:
        if not policy.has_rdtscp():
            raise Inject(13)
        return v.tsc_aux
    mce = _vmce(v, msr, None)
    if mce is not None:
        return mce
    if msr == XEN_MSR_HYPERCALL_PAGE:
        return 0                                   # guest_rdmsr_xen: reads as zero
    if 0x40000000 <= msr <= 0x400002FF:
        raise Inject(13)
    return _refuse_rdmsr(v, msr)


XEN_MSR_HYPERCALL_PAGE = 0x40000000


def _write_hypercall_page(v: "VCPU", val: int) -> None:
    """guest_wrmsr_xen: fill an own frame (that can be writable) with the hypercall page."""
    from .builder import hypercall_page
    from .memory import PageType
    mfn, index = val >> 12, val & 0xFFF
    mem, dom = v.domain.mem, v.domain
    if index or not mem.valid_mfn(mfn) or mem.owner[mfn] != dom.domid:
        raise Inject(13)
    pt = dom.hypervisor.pagetables
    try:
        pt.get_type(mfn, PageType.writable, dom.domid)
    except MMUError:
        raise Inject(13) from None
    try:
        mem.write(mfn << 12, hypercall_page())
    finally:
        pt.put_type(mfn)
    v.engine.flush_code()


def _refuse_rdmsr(v: "VCPU", msr: int) -> int:
    # read_msr's `done:` path: a guest with no #GP handler yet reading an MSR the CPU has
    # gets 0 ("faking RDMSR") instead of a fatal #GP.
    if not v.trap_table[13][2] and policy.model_has_msr(msr):
        log.warning("d%d: faking RDMSR %#010x", v.domain.domid, msr)
        return 0
    log.debug("d%d: RDMSR %#010x refused", v.domain.domid, msr)
    raise Inject(13)


def write_msr(v: "VCPU", msr: int, val: int) -> None:
    """Xen's guest_wrmsr + write_msr; Inject(13) when Xen gives #GP."""
    msr &= 0xFFFFFFFF
    eng = v.engine
    if msr in (Msr.FS_BASE, Msr.GS_BASE, Msr.SHADOW_GS_BASE):
        if not is_canonical(val):
            raise Inject(13)
        if msr == Msr.FS_BASE:
            eng.set("fs_base", val)
        elif msr == Msr.GS_BASE:
            eng.set("gs_base", val)
            if v.kernel_mode:
                v.kernel_gs_base = val
            else:
                v.user_gs_base = val
        else:
            # SHADOW_GS_BASE (the other mode's GS): the user GS base while in the kernel.
            if v.kernel_mode:
                v.user_gs_base = val
            else:
                v.kernel_gs_base = val
        return
    if msr == Msr.EFER:
        if val != policy.GUEST_EFER:           # Linux writes the current value back: allowed
            raise Inject(13)
        return
    if msr == Msr.IA32_MISC_ENABLE:
        return                                 # a different value is ignored ("invalid")
    if msr == Msr.UCODE_REV:
        if val:                                # Intel: writing 0 before reading it is allowed
            raise Inject(13)
        return
    if msr == Msr.INTEL_MISC_FEATURES_ENABLES:
        if val:                                # CPUID faulting not offered
            raise Inject(13)
        return
    if msr == Msr.TSC_AUX:
        if not policy.has_rdtscp() or val >> 32:
            raise Inject(13)
        v.tsc_aux = val
        v.engine.set_msr(Msr.TSC_AUX, val)        # what a native RDTSCP puts in ECX
        return
    if _vmce(v, msr, val) is not None:
        return
    if msr == XEN_MSR_HYPERCALL_PAGE:
        _write_hypercall_page(v, val)
        return
    if msr in (Msr.IA32_PLATFORM_ID, Msr.INTEL_PLATFORM_INFO, Msr.ARCH_CAPABILITIES,
               Msr.SPEC_CTRL, Msr.PRED_CMD):
        raise Inject(13)
    log.debug("d%d: WRMSR %#010x val %#x unimplemented", v.domain.domid, msr, val)
    raise Inject(13)


# Xen's virtual machine-check MSRs (cpu/mcheck/vmce.c), Intel flavour, 2 banks.
MCG_CAP, MCG_STATUS, MCG_CTL, MCG_EXT_CTL = 0x179, 0x17A, 0x17B, 0x4D0
MC0_CTL, MC0_CTL2, P5_MC_ADDR, P5_MC_TYPE = 0x400, 0x280, 0x0, 0x1
GUEST_MC_BANK_NUM = 2
MCG_CMCI_P, MCG_TES_P, MCG_SER_P = 1 << 10, 1 << 11, 1 << 24
GUEST_MCG_CAP = MCG_SER_P | MCG_TES_P | MCG_CMCI_P | GUEST_MC_BANK_NUM


def _vmce(v: "VCPU", msr: int, write: int | None) -> int | None:
    """vmce_rdmsr/vmce_wrmsr: the value read (or 0 for a write done), None if `msr` is not a
    machine-check MSR; Inject(13) where Xen's vMCE refuses. Nothing is ever injected, so the
    banks only hold what the guest cleared them to."""
    bank_msr = MC0_CTL <= msr < 0x480
    ctl2 = MC0_CTL2 <= msr < 0x2A0
    if msr not in (MCG_CAP, MCG_STATUS, MCG_CTL, MCG_EXT_CTL, P5_MC_ADDR, P5_MC_TYPE) \
            and not bank_msr and not ctl2:
        return None
    if msr == MCG_EXT_CTL:
        raise Inject(13)                    # no LMCE offered
    if write is None:
        if msr == MCG_CAP:
            return GUEST_MCG_CAP
        if msr == MCG_STATUS:
            return v.vmce.get("mcg_status", 0)
        if msr == MCG_CTL:
            return 0                        # no MCG_CTL_P
        if msr in (P5_MC_ADDR, P5_MC_TYPE):
            return v.vmce.get((1, 2 if msr == P5_MC_ADDR else 1), 0)
        if ctl2:
            return v.vmce.get((msr - MC0_CTL2, 4), 0) if msr - MC0_CTL2 < GUEST_MC_BANK_NUM else 0
        bank, reg = divmod(msr - MC0_CTL, 4)
        if reg == 0:
            return 2**64 - 1                # MCi_CTL reads all ones
        return v.vmce.get((bank, reg), 0) if bank < GUEST_MC_BANK_NUM else 0
    if msr == MCG_STATUS:
        v.vmce["mcg_status"] = write
    elif ctl2:
        if msr - MC0_CTL2 < GUEST_MC_BANK_NUM:
            v.vmce[(msr - MC0_CTL2, 4)] = write
    elif bank_msr:
        bank, reg = divmod(msr - MC0_CTL, 4)
        if reg and write:
            raise Inject(13)                # STATUS/ADDR/MISC may only be cleared
        if reg and bank < GUEST_MC_BANK_NUM:
            v.vmce[(bank, reg)] = 0
    elif msr in (P5_MC_ADDR, P5_MC_TYPE):
        raise Inject(13)
    return 0


# ---------------------------------------------------------------------------- time, CPUID
def rdtsc(v: "VCPU") -> int:
    """The guest TSC: the hypervisor's system time in ns (timers.py pvclock says 1 tick =
    1 ns, so TSC, RDTSCP and pvclock agree exactly)."""
    return v.domain.hypervisor.system_time_ns() & (2**64 - 1)


def cpuid(v: "VCPU", leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    return policy.leaf(v, leaf, subleaf)


def _emulate_cpuid(v: "VCPU", insn: Insn) -> None:
    rax, rcx = v.engine.read(("rax", "rcx"))
    a, b, c, d = cpuid(v, rax & 0xFFFFFFFF, rcx & 0xFFFFFFFF)
    _finish(v, insn, {"rax": a, "rbx": b, "rcx": c, "rdx": d})


def _emulate_rdtscp(v: "VCPU", insn: Insn) -> None:
    if not policy.has_rdtscp():
        raise Inject(6)
    t = rdtsc(v)
    _finish(v, insn, {"rax": t & 0xFFFFFFFF, "rdx": t >> 32, "rcx": v.tsc_aux})


def _emulate_xsetbv(v: "VCPU", insn: Insn) -> None:
    if not v.cr4 & policy.CR4_OSXSAVE:
        raise Inject(6)
    _kernel_only(v)
    rcx, rax, rdx = v.engine.read(("rcx", "rax", "rdx"))
    val = (rax & 0xFFFFFFFF) | (rdx & 0xFFFFFFFF) << 32
    # Only XCR0, and only what the policy offers (policy.valid_xcr0).
    if rcx & 0xFFFFFFFF or not policy.valid_xcr0(v, val):
        raise Inject(13)
    v.xcr0 = val
    v.xcr0_accum |= val
    _finish(v, insn)


# ---------------------------------------------------------------------------- entry points
def _execute(v: "VCPU", insn: Insn) -> None:
    op = insn.opcode
    if op in (0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF, 0x6C, 0x6D, 0x6E, 0x6F):
        _emulate_io(v, insn)
    elif op in (0xFA, 0xFB):                          # cli / sti: a no-op when IOPL allows
        if not iopl_ok(v):
            raise Unhandled("cli/sti without IOPL")
        _finish(v, insn)
    elif op == 0x0F06:                                # clts
        _kernel_only(v)
        v.fpu_ts = False
        _finish(v, insn)
    elif op == 0x0F09:                                # wbinvd: ignored without privilege
        _kernel_only(v)
        _finish(v, insn)
    elif op in (0x0F20, 0x0F22):                      # mov from/to CR
        _kernel_only(v)
        if op == 0x0F20:
            _finish(v, insn, {GPR_NAMES[insn.rm]: read_cr(v, insn.reg)})
        else:
            write_cr(v, insn.reg, _reg(v, insn.rm))
            _finish(v, insn)
    elif op in (0x0F21, 0x0F23):                      # mov from/to DR
        _kernel_only(v)
        if insn.reg > 7:
            raise Inject(6)
        if op == 0x0F21:
            val = get_debugreg(v, insn.reg)
            if val is None:
                raise Inject(6)
            _finish(v, insn, {GPR_NAMES[insn.rm]: val})
        else:
            rc = set_debugreg(v, insn.reg, _reg(v, insn.rm))
            if rc == -19:
                raise Inject(6)
            if rc:
                raise Inject(13)
            _finish(v, insn)
    elif op == 0x0F30:                                # wrmsr
        _kernel_only(v)
        rcx, rax, rdx = v.engine.read(("rcx", "rax", "rdx"))
        write_msr(v, rcx, (rax & 0xFFFFFFFF) | (rdx & 0xFFFFFFFF) << 32)
        _finish(v, insn)
    elif op == 0x0F32:                                # rdmsr
        _kernel_only(v)
        val = read_msr(v, v.engine.get("rcx"))
        _finish(v, insn, {"rax": val & 0xFFFFFFFF, "rdx": val >> 32})
    elif op == 0x0F31:                                # rdtsc
        t = rdtsc(v)
        _finish(v, insn, {"rax": t & 0xFFFFFFFF, "rdx": t >> 32})
    elif op == 0x0FA2:                                # cpuid
        _emulate_cpuid(v, insn)
    elif op == 0x0F01 and insn.mod == 3 and insn.rm == 1 and insn.reg == 2:
        _emulate_xsetbv(v, insn)
    elif op == 0x0F01 and insn.mod == 3 and insn.rm == 1 and insn.reg == 7:
        _emulate_rdtscp(v, insn)
    else:
        raise Unhandled(f"opcode {op:#x}")


def _run(v: "VCPU", insn_at: int, skip: int = 0) -> bool:
    from . import traps
    try:
        code = fetch(v, insn_at + skip)
        insn = decode(code, insn_at + skip)
        if skip:
            insn.rip = insn_at
            insn.length += skip
        _execute(v, insn)
    except Unhandled as e:
        log.debug("d%d: not emulated at %#x: %s", v.domain.domid, insn_at, e)
        return False
    except Inject as e:
        v.engine.set("rip", insn_at)
        traps.inject_exception(v, e.vector, e.error, e.cr2)
        return True
    except GuestFault as f:
        traps.inject_exception(v, 14, (2 if f.write else 0) | 4 * (not v.kernel_mode), f.va)
        return True
    v.emulated_here += 1
    return True


def gp_fault(v: "VCPU", error: int) -> bool:
    """#GP at RIP. Only #GP(0) is an emulation candidate (as in Xen's do_general_protection:
    a selector error code means a descriptor problem, bounced as it is)."""
    if error:
        return False
    rip = v.engine.get("rip")
    return _sysenter(v, fetch(v, rip)) or _run(v, rip)


def _sysenter(v: "VCPU", code: bytes) -> bool:
    """SYSENTER (0f 34) at RIP, which the policy's SEP offers and which neither engine's CPU
    runs in long mode (AMD and kvm-pvm raise #UD, or #GP(0) in compatibility mode): taken
    as Xen's sysenter_entry takes it (traps.sysenter), whichever fault reported it. Legacy
    prefixes do not change it (as on the Intel CPU Xen's SYSENTER path assumes; LOCK: #UD)."""
    n = legacy_prefixes(code)
    if n is None or code[n:n + 2] != b"\x0f\x34":
        return False
    from . import traps
    traps.sysenter(v)
    return True


def ud_fault(v: "VCPU") -> bool:
    """#UD at RIP: the forced-emulation prefix (Xen accepts it from the guest kernel and,
    with the prefix, emulates only CPUID), else an instruction the engine's CPU model lacks
    but the policy offers (rdtscp; SYSENTER: _sysenter)."""
    rip = v.engine.get("rip")
    code = fetch(v, rip)
    if _sysenter(v, code):
        return True
    if code.startswith(FORCED_EMULATION_PREFIX):
        # Xen's emulate_forced_invalid_op: exactly `0f a2` must follow; CPUID only, from
        # kernel or user mode (no CPUID faulting is offered).
        if code[len(FORCED_EMULATION_PREFIX):len(FORCED_EMULATION_PREFIX) + 2] != b"\x0f\xa2":
            return False
        return _run(v, rip, len(FORCED_EMULATION_PREFIX))
    if code[:3] == b"\x0f\x01\xf9" or code[:3] == b"\x0f\x01\xd1":
        return _run(v, rip)
    return False
