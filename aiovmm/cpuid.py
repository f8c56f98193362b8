"""The CPUID and MSR policy a 64-bit PV guest sees, shared by every vCPU engine.

A guest must not be able to tell the engines apart except by speed, so the policy is not read
from whatever CPU happens to run the guest: it is one fixed CPU model (the one the emulated
engine implements: Unicorn's Haswell-class "GenuineIntel" model) filtered the way Xen filters
the host's features for a PV guest (xen/arch/x86/cpu-policy.c, the `A` annotations of
public/arch-x86/cpufeatureset.h), plus Xen's hypervisor leaves at 0x40000000
(xen/arch/x86/cpuid.c cpuid_hypervisor_leaves).

What PV cannot use is hidden, as on Xen: VME, PSE, PSE36, MTRR, PGE (the guest's page tables
never hold superpages or global entries), MONITOR/MWAIT, VMX, x2APIC, TSC-deadline, PCID,
SMEP/SMAP, DS, thermal and PMU leaves. Hidden besides, because this machine model does not
make them usable by a PV kernel (Xen would hide them on a host lacking them): XSAVE and what
depends on it (OSXSAVE, AVX, FMA, F16C; leaf 0xd) and FSGSBASE (CR4.FSGSBASE is not given to
the guest). ERMS ("enhanced", i.e. fast, REP MOVSB/STOSB) is hidden because it is false on this
machine model: the emulator runs REP STOSB/MOVSB one byte per dispatched iteration, so a kernel
that believes the hint clears and copies pages 8x slower than with the REP STOSQ/MOVSQ it uses
otherwise (measured: Linux's clear_page/memset were ~10% of a boot). Xen likewise shows a PV
guest no ERMS on a host without it.

XSAVE and AVX are offered after all where the engine cannot keep the guest's CPL-3 code from
using them (`Xstate`, the engine's `cpl3_xstate`; kvm-pvm): there the kernel must know the ymm
state exists to switch it between its processes (Xen offers a PV guest XSAVE and AVX on a host
that has them, and then the guest's XCR0 is what the hardware runs with).

The leaves are computed once (module level); `leaf()` adds the per-vCPU dynamic parts.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from .abi import XEN_VERSION_MAJOR, XEN_VERSION_MINOR

if TYPE_CHECKING:
    from .vcpu import VCPU


def _bits(*b: int) -> int:
    v = 0
    for x in b:
        v |= 1 << x
    return v


# -- the fixed model (Unicorn 2.1.4's x86_64 CPU, read with `cpuid` at CPL 0) -------------------
_VENDOR = (0x756E6547, 0x6C65746E, 0x49656E69)          # "Genu" "ntel" "ineI" (ebx, ecx, edx)
_MODEL_1 = (0x000306C4, 0x00000800, 0xCED82203, 0x078BFBFD)
_MODEL_2 = (0x00000001, 0x00000000, 0x00000000, 0x002C307D)
_MODEL_7_EBX = 0x00000389
_MODEL_X1 = (0x000306C4, 0x00000000, 0x00000021, 0x28100800)
_MODEL_BRAND = (
    (0x65746E49, 0x6F43206C, 0x50206572, 0x65636F72),    # "Intel Core Processor (Haswell)"
)
_MODEL_X5 = (0x01FF01FF, 0x01FF01FF, 0x40020140, 0x40020140)
_MODEL_X6 = (0x00000000, 0x42004200, 0x02008140, 0x00000000)
# Physical address bits a guest is told (leaf 0x80000008 EAX[7:0]): entry bits from here up to
# bit 51 are reserved (mmu.walk, Xen's guest_rsvd_bits).
PADDR_BITS = 40
_MODEL_X8 = (0x00003000 | PADDR_BITS, 0x00000000, 0x00000000, 0x00000000)


class Feat1C(enum.IntEnum):
    """CPUID.1:ECX bits that matter here."""
    SSE3 = 0
    PCLMULQDQ = 1
    MONITOR = 3
    VMX = 5
    SSSE3 = 9
    FMA = 12
    CX16 = 13
    PCID = 17
    SSE41 = 19
    SSE42 = 20
    X2APIC = 21
    MOVBE = 22
    POPCNT = 23
    TSC_DEADLINE = 24
    AES = 25
    XSAVE = 26
    OSXSAVE = 27
    AVX = 28
    F16C = 29
    RDRAND = 30
    HYPERVISOR = 31


# Xen's PV mask (features annotated `A` in cpufeatureset.h), then what this model cannot give.
_PV_1C = _bits(0, 1, 9, 12, 13, 19, 20, 22, 23, 25, 26, 28, 29, 30, 31)
_PV_1C &= ~_bits(Feat1C.XSAVE, Feat1C.FMA, Feat1C.AVX, Feat1C.F16C)
_PV_1D = _bits(0, 2, 4, 5, 6, 7, 8, 9, 11, 14, 15, 16, 19, 22, 23, 24, 25, 26, 27, 28)
_PV_7B = _bits(3, 5, 8, 9, 11, 16, 17, 18, 19, 21, 23, 24, 28, 29, 30, 31)   # FSGSBASE (0) hidden
FEAT7B_ERMS = 9
_PV_7B &= ~_bits(FEAT7B_ERMS)          # not fast on this model (module docstring)
_PV_X1C = _bits(0, 1, 5, 6, 7, 8, 11, 16, 21, 26, 30)
_PV_X1D = _bits(11, 20, 22, 25, 27, 29, 30, 31)
# Leaf 1 EDX also repeats the low bits of leaf 0x80000001 EDX on AMD only; Intel keeps them 0.

X86_FEATURE_RDTSCP_X1D = 27

XEN_CPUID_SIGNATURE = (0x566E6558, 0x65584D4D, 0x4D4D566E)   # "XenVMMXenVMM"
XEN_CPUID_MAX_NUM_LEAVES = 5
XEN_CPUID_FEAT1_MMU_PT_UPDATE_PRESERVE_AD = 1
XEN_CPUID_TSC_EMULATED, XEN_CPUID_HOST_TSC_RELIABLE, XEN_CPUID_RDTSCP_INSTR_AVAIL = 1, 2, 4
TSC_KHZ = 1_000_000                     # the guest TSC counts nanoseconds (timers.py)

Leaf = tuple[int, int, int, int]
_ZERO: Leaf = (0, 0, 0, 0)


def _static_leaves() -> dict[tuple[int, int], Leaf]:
    a, b, c, d = _MODEL_1
    leaves: dict[tuple[int, int], Leaf] = {
        (0, 0): (0xD, *_VENDOR),
        # EBX: APIC ID (bits 24-31) is cleared for PV guests (cpuid.c leaf 1 adjustments).
        (1, 0): (a, b & 0x00FFFFFF, (c & _PV_1C) | (1 << Feat1C.HYPERVISOR), d & _PV_1D),
        (2, 0): _MODEL_2,
        (7, 0): (0, _MODEL_7_EBX & _PV_7B, 0, 0),
        (0x80000000, 0): (0x80000008, *_VENDOR),
        (0x80000001, 0): (_MODEL_X1[0], 0, _MODEL_X1[2] & _PV_X1C, _MODEL_X1[3] & _PV_X1D),
        (0x80000005, 0): _MODEL_X5,
        (0x80000006, 0): _MODEL_X6,
        (0x80000008, 0): _MODEL_X8,
    }
    brand = "Intel Core Processor (Haswell)".encode().ljust(48, b"\0")
    for i in range(3):
        chunk = brand[16 * i:16 * i + 16]
        leaves[(0x80000002 + i, 0)] = tuple(int.from_bytes(chunk[j:j + 4], "little") for j in range(0, 16, 4))
    return leaves


_LEAVES = _static_leaves()
MAX_BASIC = 0xD
MAX_EXTD = 0x80000008


def has_rdtscp() -> bool:
    return bool(_LEAVES[(0x80000001, 0)][3] >> X86_FEATURE_RDTSCP_X1D & 1)


class Xcr0(enum.IntFlag):
    """XCR0 state components (Intel SDM vol. 1 13.1)."""
    X87 = 1
    SSE = 2
    AVX = 4
    OPMASK = 0x20
    ZMM_HI256 = 0x40
    HI16_ZMM = 0x80


XCR0_FP_SSE = Xcr0.X87 | Xcr0.SSE
XCR0_AVX512 = Xcr0.OPMASK | Xcr0.ZMM_HI256 | Xcr0.HI16_ZMM
# What Xen lets a PV guest enable (xstate.c valid_xcr0 under the PV policy): no MPX, PKRU or
# AMX state.
PV_XCR0 = XCR0_FP_SSE | Xcr0.AVX | XCR0_AVX512
FEAT7B_AVX512F = 16
_XSAVE_LEGACY_AND_HEADER = 576


@dataclass(frozen=True)
class Xstate:
    """XSAVE as offered to a PV kernel: the XCR0 components it may enable (beyond x87/SSE:
    AVX, maybe AVX-512) and each extended component's (size, offset) in the standard-format
    XSAVE area (CPUID leaf 0xd), as the CPU that runs the guest lays it out."""
    xcr0: int
    layout: Mapping[int, tuple[int, int]]

    def size(self, xcr0: int) -> int:
        """Bytes of a standard-format XSAVE area holding the components of `xcr0`."""
        end = _XSAVE_LEGACY_AND_HEADER
        for bit, (size, offset) in self.layout.items():
            if xcr0 >> bit & 1:
                end = max(end, offset + size)
        return end


def xstate(v: "VCPU") -> Xstate | None:
    """The XSAVE offer of this vCPU's engine: None where the engine enforces the guest's
    XCR0 itself (Unicorn has no AVX; hardware KVM loads the guest's XCR0), so XSAVE stays
    hidden and FXSAVE covers everything the guest can use."""
    return v.engine.cpl3_xstate


def has_xsave(v: "VCPU") -> bool:
    return xstate(v) is not None


def valid_xcr0(v: "VCPU", val: int) -> bool:
    """May this vCPU's XSETBV load `val` into XCR0? (xcr0_within its engine's offer.)"""
    return xcr0_within(xstate(v), val)


def xcr0_within(xs: Xstate | None, val: int) -> bool:
    """Is `val` an XCR0 the XSAVE offer `xs` can give? Xen's valid_xcr0 within the
    policy's maximum (handle_xsetbv; validate_xstate for a restored vCPU's XCR0 and
    XCR0_ACCUMULATED): x87 always, AVX needs SSE, AVX-512's three components together and
    with AVX, nothing outside the offer. Without an offer (no XSAVE: the policy's maximum
    is 0) no value is: XSETBV and a stream's XSAVE state are refused alike."""
    # int(): ~ of an IntFlag keeps only the flag's own bits (0x207 would pass an offer of 7)
    allowed = int(xs.xcr0) if xs is not None else 0
    if val & ~allowed or not val & Xcr0.X87:
        return False
    if val & Xcr0.AVX and not val & Xcr0.SSE:
        return False
    if val & XCR0_AVX512 and ((val & XCR0_AVX512) != XCR0_AVX512 or not val & Xcr0.AVX):
        return False
    return True


def _xstate_leaf(v: "VCPU", xs: Xstate, subleaf: int) -> Leaf:
    """CPUID leaf 0xd: sub 0 the offered components and area sizes (EBX for the vCPU's
    current XCR0, as Xen computes it), sub 1 no XSAVEOPT/XSAVEC/XSAVES, sub n the layout."""
    if subleaf == 0:
        return (xs.xcr0 & 0xFFFFFFFF, xs.size(v.xcr0), xs.size(xs.xcr0), xs.xcr0 >> 32)
    if subleaf >= 2 and xs.xcr0 >> subleaf & 1 and subleaf in xs.layout:
        size, offset = xs.layout[subleaf]
        return (size, offset, 0, 0)
    return _ZERO


def has_fsgsbase() -> bool:
    return bool(_LEAVES[(7, 0)][1] & 1)


def has_de() -> bool:
    return bool(_LEAVES[(1, 0)][3] >> 2 & 1)


def _hypervisor_leaf(v: "VCPU", idx: int, subleaf: int) -> Leaf:
    if idx == 0:
        return (0x40000000 + XEN_CPUID_MAX_NUM_LEAVES, *XEN_CPUID_SIGNATURE)
    if idx == 1:
        return ((XEN_VERSION_MAJOR << 16) | XEN_VERSION_MINOR, 0, 0, 0)
    if idx == 2:
        # One hypercall page; MSR base 0x40000000; PV: MMU_PT_UPDATE_PRESERVE_AD.
        return (1, 0x40000000, XEN_CPUID_FEAT1_MMU_PT_UPDATE_PRESERVE_AD, 0)
    if idx == 3:                  # time leaf: the TSC is always emulated (1 tick = 1 ns)
        if subleaf == 0:
            flags = XEN_CPUID_TSC_EMULATED | XEN_CPUID_HOST_TSC_RELIABLE
            if has_rdtscp():
                flags |= XEN_CPUID_RDTSCP_INSTR_AVAIL
            return (flags, 0, TSC_KHZ, 0)
        if subleaf == 1:          # offset 0; tsc->ns scale: mul_frac 2^31, shift +1
            return (0, 0, 1 << 31, 1)
        if subleaf == 2:
            return (TSC_KHZ, 0, 0, 0)
        return _ZERO
    if idx == 4:                  # HVM-only leaf
        return _ZERO
    if idx == 5 and subleaf == 0:  # PV: machine address width
        top = v.domain.mem.nr_frames - 1
        return (0, max(top.bit_length(), 1) + 12, 0, 0)
    return _ZERO


def leaf(v: "VCPU", leaf_: int, subleaf: int) -> Leaf:
    """What CPUID(leaf, subleaf) returns to this vCPU (Xen's guest_cpuid for a PV guest)."""
    leaf_ &= 0xFFFFFFFF
    subleaf &= 0xFFFFFFFF
    if 0x40000000 <= leaf_ <= 0x400001FF:
        idx = leaf_ & 0xFF if leaf_ < 0x40000100 else -1
        if idx < 0 or idx > XEN_CPUID_MAX_NUM_LEAVES:
            return _ZERO
        return _hypervisor_leaf(v, idx, subleaf)
    if leaf_ <= MAX_BASIC or 0x80000000 <= leaf_ <= MAX_EXTD:
        # Leaves 4 (cache), 0xb (topology), 0xd (xstate) are subleaf-indexed; the others
        # ignore the subleaf, as on hardware.
        key = (leaf_, subleaf if leaf_ in (4, 7, 0xB, 0xD) else 0)
        xs = xstate(v)
        if leaf_ == 0xD and xs is not None:
            return _xstate_leaf(v, xs, subleaf)
        res = _LEAVES.get(key, _ZERO)
        if leaf_ == 1 and xs is not None:
            a, b, c, d = res
            c |= 1 << Feat1C.XSAVE
            if xs.xcr0 & Xcr0.AVX:
                c |= 1 << Feat1C.AVX
            # OSXSAVE follows the guest's CR4, but the enlightened view of a kernel sees it
            # before it set CR4.OSXSAVE: Xen leaks its own CR4 there, and Linux's PV start
            # (xen_check_xsave) drops XSAVE unless it sees XSAVE and OSXSAVE together.
            if v.cr4 & CR4_OSXSAVE or v.kernel_mode:
                c |= 1 << Feat1C.OSXSAVE
            res = (a, b, c, d)
        elif leaf_ == 7 and subleaf == 0 and xs is not None and xs.xcr0 & Xcr0.OPMASK:
            a, b, c, d = res
            res = (a, b | 1 << FEAT7B_AVX512F, c, d)
        return res
    return _ZERO


# -- control registers (pv/domain.c pv_fixup_guest_cr4; emul-priv-op.c read_cr) ------------------
CR0_TS = 1 << 3
# What a PV guest reads from CR0 besides its virtual TS: Xen's own CR0
# (PE MP ET NE WP AM PG).
HOST_CR0 = 0x80050033
CR4_TSD, CR4_DE, CR4_PAE, CR4_MCE = 1 << 2, 1 << 3, 1 << 5, 1 << 6
CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_FSGSBASE, CR4_OSXSAVE = 1 << 9, 1 << 10, 1 << 16, 1 << 18
PV_CR4_GUEST_MASK = CR4_TSD | CR4_DE | CR4_FSGSBASE | CR4_OSXSAVE
PV_CR4_GUEST_VISIBLE_MASK = CR4_PAE | CR4_MCE | CR4_OSFXSR | CR4_OSXMMEXCPT
HOST_CR4 = CR4_PAE | CR4_MCE | CR4_OSFXSR | CR4_OSXMMEXCPT


def fixup_guest_cr4(cr4: int, v: "VCPU | None" = None) -> int:
    """The CR4 a PV guest (vCPU `v`; None: one not offered XSAVE) sees after writing `cr4`:
    its policy-allowed controllable bits and Xen's visible settings. CR4.TSD is dropped
    besides: the engines do not fault RDTSC at CPL 3, so a TSD the guest could see would be
    a lie (deviation, documented here)."""
    allowed = CR4_DE if has_de() else 0
    if has_fsgsbase():
        allowed |= CR4_FSGSBASE
    if v is not None and has_xsave(v):
        allowed |= CR4_OSXSAVE
    return (cr4 & PV_CR4_GUEST_MASK & allowed) | (HOST_CR4 & PV_CR4_GUEST_VISIBLE_MASK)


# -- MSRs (emul-priv-op.c read_msr/write_msr, msr.c guest_rdmsr/guest_wrmsr) ---------------------
class Msr(enum.IntEnum):
    IA32_TSC = 0x10
    IA32_PLATFORM_ID = 0x17
    APIC_BASE = 0x1B
    IA32_FEATURE_CONTROL = 0x3A
    UCODE_REV = 0x8B
    IA32_PERF_CAPABILITIES = 0x345
    INTEL_PLATFORM_INFO = 0xCE
    MTRRCAP = 0xFE
    IA32_SYSENTER_CS = 0x174
    IA32_MCG_CAP = 0x179
    IA32_PERF_STATUS = 0x198
    IA32_PERF_CTL = 0x199
    IA32_THERM_STATUS = 0x19C
    IA32_MISC_ENABLE = 0x1A0
    INTEL_MISC_FEATURES_ENABLES = 0x140
    CR_PAT = 0x277
    MTRR_DEF_TYPE = 0x2FF
    SPEC_CTRL = 0x48
    PRED_CMD = 0x49
    ARCH_CAPABILITIES = 0x10A
    X2APIC_FIRST = 0x800
    X2APIC_LAST = 0x8FF
    EFER = 0xC0000080
    STAR = 0xC0000081
    LSTAR = 0xC0000082
    FS_BASE = 0xC0000100
    GS_BASE = 0xC0000101
    SHADOW_GS_BASE = 0xC0000102
    TSC_AUX = 0xC0000103


APIC_BASE_BSP, APIC_BASE_ENABLE, APIC_DEFAULT_PHYS_BASE = 1 << 8, 1 << 11, 0xFEE00000
XEN_MSR_PAT = 0x0000050100070406
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1, 1 << 8, 1 << 10, 1 << 11
GUEST_EFER = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE
# MISC_ENABLE of the model (fast strings, TM1, BTS/PEBS unavailable) as Xen edits it for a
# guest: PERF_AVAIL and MONITOR_ENABLE cleared, BTS_UNAVAIL, PEBS_UNAVAIL, XTPR_DISABLE set.
MISC_ENABLE_BTS_UNAVAIL, MISC_ENABLE_PEBS_UNAVAIL, MISC_ENABLE_XTPR_DISABLE = 1 << 11, 1 << 12, 1 << 23
GUEST_MISC_ENABLE = 1 | MISC_ENABLE_BTS_UNAVAIL | MISC_ENABLE_PEBS_UNAVAIL | MISC_ENABLE_XTPR_DISABLE
PLATFORM_INFO_CPUID_FAULTING = 1 << 31
MODEL_UCODE_REV = 0                     # the model CPU has no microcode loaded
MISC_FEATURES_CPUID_FAULTING = 1
FEATURE_CONTROL_LOCK = 1

# MSRs the model CPU implements: where Xen would fake a read of 0 for a guest that has no #GP
# handler yet (read_msr's `done:` path: "faking RDMSR"), it does so only for MSRs the host
# really has.
_MODEL_MSRS = frozenset({
    0x10, 0x17, 0x1B, 0x3A, 0x8B, 0xCE, 0xFE, 0x140, 0x174, 0x175, 0x176, 0x179, 0x17A,
    0x198, 0x199, 0x19C, 0x1A0, 0x277, 0x2FF, *range(0x200, 0x210), 0x250, 0x258, 0x259,
    *range(0x268, 0x270), *range(0x400, 0x414),
    0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000100, 0xC0000101,
    0xC0000102, 0xC0000103,
})


def model_has_msr(msr: int) -> bool:
    return msr in _MODEL_MSRS


def table(v: "VCPU") -> list[tuple[int, int, int, int, int, int]]:
    """Every (leaf, subleaf, eax, ebx, ecx, edx) of this vCPU's policy, for an engine whose
    CPU answers CPUID itself from a table (KVM_SET_CPUID2). Entries whose value depends on
    guest state (leaf 1 OSXSAVE from CR4) must be refreshed when that state changes; with
    XSAVE hidden none does."""
    out = []
    for leaf_ in list(range(0, MAX_BASIC + 1)) + list(range(0x80000000, MAX_EXTD + 1)):
        subs = range(4) if leaf_ in (4, 7, 0xB, 0xD) else (0,)
        for sub in subs:
            out.append((leaf_, sub, *leaf(v, leaf_, sub)))
    for idx in range(XEN_CPUID_MAX_NUM_LEAVES + 1):
        for sub in (range(3) if idx == 3 else (0,)):
            out.append((0x40000000 + idx, sub, *leaf(v, 0x40000000 + idx, sub)))
    return out
