"""A PV vCPU's state as Xen's struct vcpu_guest_context (x86_64), the body of the
X86_PV_VCPU_BASIC record, and the extended context (struct xen_domctl_ext_vcpucontext).

Layout (public/arch-x86/xen.h, xen-x86_64.h): fpu_ctxt[512], flags, user_regs (struct
cpu_user_regs, 200 bytes), trap_ctxt[256] (16 bytes each), ldt_base, ldt_ents,
gdt_frames[16], gdt_ents, kernel_ss, kernel_sp, ctrlreg[8], debugreg[8],
event_callback_eip, failsafe_callback_eip, syscall_callback_eip, vm_assist, fs_base,
gs_base_kernel, gs_base_user: 5168 bytes. Frame numbers in it (ctrlreg[3], ctrlreg[1],
gdt_frames) are PFNs in a stream.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..cpuid import Xstate

SIZE = 5168
OFF_FLAGS = 512
OFF_REGS = 520
OFF_TRAPS = 720
OFF_TAIL = OFF_TRAPS + 256 * 16          # 4816
TRAP = struct.Struct("<BBHxxxxQ")
# user_regs: r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi, error_code u32,
# entry_vector u32, rip, cs u16 + saved_upcall_mask u8 (+5 pad), rflags, rsp, ss, es, ds, fs, gs
REGS = struct.Struct("<15QIIQHB5xQQ" + "H6x" * 5)
REG_ORDER = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
             "rdx", "rsi", "rdi")
TAIL = struct.Struct("<QQ16QQQQ8Q8QQQQQQQQ")
assert OFF_REGS + REGS.size == OFF_TRAPS and OFF_TAIL + TAIL.size == SIZE


class VGCF(enum.IntFlag):
    i387_valid = 1 << 0
    in_kernel = 1 << 2
    failsafe_disables_events = 1 << 3
    syscall_disables_events = 1 << 4
    online = 1 << 5


@dataclass
class VcpuContext:
    """The fields aiovmm keeps per PV vCPU, in Xen's terms."""
    flags: int = 0
    regs: dict[str, int] = field(default_factory=dict)     # GPRs, rip, rflags, selectors
    traps: list[tuple[int, int, int]] = field(default_factory=lambda: [(0, 0, 0)] * 256)
    ldt_base: int = 0
    ldt_ents: int = 0
    gdt_frames: list[int] = field(default_factory=list)
    gdt_ents: int = 0
    kernel_ss: int = 0
    kernel_sp: int = 0
    ctrlreg: list[int] = field(default_factory=lambda: [0] * 8)
    debugreg: list[int] = field(default_factory=lambda: [0] * 8)
    event_callback: int = 0
    failsafe_callback: int = 0
    syscall_callback: int = 0
    vm_assist: int = 0
    fs_base: int = 0
    gs_base_kernel: int = 0
    gs_base_user: int = 0
    fpu: bytes = bytes(512)                 # fpu_ctxt: an FXSAVE image (VGCF_i387_valid)

    def pack(self) -> bytes:
        out = bytearray(SIZE)
        out[:512] = self.fpu[:512].ljust(512, b"\0")
        struct.pack_into("<Q", out, OFF_FLAGS, self.flags)
        r = self.regs
        REGS.pack_into(out, OFF_REGS, *(r.get(n, 0) for n in REG_ORDER), 0, 0, r.get("rip", 0),
                       r.get("cs", 0), 0, r.get("rflags", 0), r.get("rsp", 0), r.get("ss", 0),
                       r.get("es", 0), r.get("ds", 0), r.get("fs", 0), r.get("gs", 0))
        for vec, (flags, cs, addr) in enumerate(self.traps):
            if addr:
                TRAP.pack_into(out, OFF_TRAPS + 16 * vec, vec, flags, cs, addr)
        gdt = (self.gdt_frames + [0] * 16)[:16]
        TAIL.pack_into(out, OFF_TAIL, self.ldt_base, self.ldt_ents, *gdt, self.gdt_ents,
                       self.kernel_ss, self.kernel_sp, *self.ctrlreg, *self.debugreg,
                       self.event_callback, self.failsafe_callback, self.syscall_callback,
                       self.vm_assist, self.fs_base, self.gs_base_kernel, self.gs_base_user)
        return bytes(out)

    @classmethod
    def unpack(cls, raw: bytes) -> "VcpuContext":
        if len(raw) != SIZE:
            raise ValueError(f"vcpu_guest_context of {len(raw)} bytes (want {SIZE})")
        c = cls()
        c.fpu = bytes(raw[:512])
        c.flags = struct.unpack_from("<Q", raw, OFF_FLAGS)[0]
        v = REGS.unpack_from(raw, OFF_REGS)
        c.regs = dict(zip(REG_ORDER, v[:15]))
        c.regs.update(rip=v[17], cs=v[18], rflags=v[20], rsp=v[21], ss=v[22], es=v[23],
                      ds=v[24], fs=v[25], gs=v[26])
        traps = []
        for vec in range(256):
            vector, flags, cs, addr = TRAP.unpack_from(raw, OFF_TRAPS + 16 * vec)
            traps.append((flags, cs, addr) if addr else (0, 0, 0))
        c.traps = traps
        t = TAIL.unpack_from(raw, OFF_TAIL)
        c.ldt_base, c.ldt_ents = t[0], t[1]
        c.gdt_ents = t[18]
        c.gdt_frames = list(t[2:2 + (c.gdt_ents + 511) // 512]) if c.gdt_ents <= 16 * 512 else list(t[2:18])
        c.kernel_ss, c.kernel_sp = t[19], t[20]
        c.ctrlreg, c.debugreg = list(t[21:29]), list(t[29:37])
        (c.event_callback, c.failsafe_callback, c.syscall_callback, c.vm_assist, c.fs_base,
         c.gs_base_kernel, c.gs_base_user) = t[37:44]
        return c


# struct xen_domctl_ext_vcpucontext (x86): vcpu, size, syscall32_callback_eip,
# sysenter_callback_eip, syscall32_callback_cs, sysenter_callback_cs,
# syscall32_disables_events, sysenter_disables_events, (pad), vmce (4 x u64)
EXT = struct.Struct("<IIQQHHBB2x4Q")
EXT_SIZE = EXT.size


# -- X86_PV_VCPU_XSAVE ---------------------------------------------------------------------------
# The record's content is what Xen's XEN_DOMCTL_getvcpuextstate hands out (xen/arch/x86/
# domctl.c): XCR0 (u64), XCR0_ACCUMULATED (u64: every component the vCPU ever enabled), then
# the XSAVE area in the standard (uncompressed) format, sized for XCR0_ACCUMULATED (nothing
# when that is 0: a vCPU that never used XSAVE). The area opens with the 512-byte legacy
# (FXSAVE) region and the 64-byte XSAVE header: XSTATE_BV, XCOMP_BV, 48 reserved bytes.
XSAVE_HDR = struct.Struct("<QQ")
XSTATE_HDR = struct.Struct("<QQ6Q")
XSTATE_HDR_OFF = 512
XSAVE_AREA_MIN = 576                  # legacy region + XSAVE header (XSTATE_AREA_MIN_SIZE)
XCR0_FP_SSE = 3


class XsaveRefused(ValueError):
    """A stream's X86_PV_VCPU_XSAVE content this host cannot take."""


def xsave_area_size(offer: "Xstate | None", xcr0: int) -> int:
    """Bytes of the standard-format area holding `xcr0`'s components on this host (Xen's
    xstate_uncompressed_size: 0 for none, the legacy region and header for x87/SSE, else up
    to the end of the furthest component in the offer's CPUID leaf 0xd layout)."""
    if not xcr0:
        return 0
    if not xcr0 & ~XCR0_FP_SSE or offer is None:
        return XSAVE_AREA_MIN
    return offer.size(xcr0)


@dataclass(frozen=True)
class XsaveState:
    """A vCPU's XSAVE state as the stream carries it (validated when it comes from one)."""
    xcr0: int
    xcr0_accum: int
    area: bytes = b""

    def pack(self) -> bytes:
        return XSAVE_HDR.pack(self.xcr0, self.xcr0_accum) + self.area

    @classmethod
    def from_engine(cls, offer: "Xstate", xcr0: int, xcr0_accum: int, raw: bytes) -> "XsaveState":
        """The record of a vCPU whose engine's whole XSAVE area is `raw` (standard format):
        cut to XCR0_ACCUMULATED's size, XSTATE_BV limited to those components (state the
        guest kernel never enabled is not the guest's to carry), XCOMP_BV and the reserved
        header bytes 0 (as Xen's expand_xsave_states writes them)."""
        if not xcr0_accum:
            return cls(0, 0)
        area = bytearray(raw[:xsave_area_size(offer, xcr0_accum)])
        bv = XSTATE_HDR.unpack_from(area, XSTATE_HDR_OFF)[0]
        XSTATE_HDR.pack_into(area, XSTATE_HDR_OFF, bv & xcr0_accum, 0, 0, 0, 0, 0, 0, 0)
        return cls(xcr0, xcr0_accum, bytes(area))

    @classmethod
    def parse(cls, content: bytes, offer: "Xstate | None", where: str) -> "XsaveState":
        """A stream's record content checked as Xen's XEN_DOMCTL_setvcpuextstate and
        validate_xstate check it, against this host's XSAVE offer `offer` (cpuid.Xstate of
        the destination engine, None: no XSAVE): XCR0 and XCR0_ACCUMULATED each a value
        the offer can give (cpuid.xcr0_within, the rule XSETBV uses), XCR0 and XSTATE_BV
        within XCR0_ACCUMULATED, no XCR0 without XCR0_ACCUMULATED, a standard-format area
        (XCOMP_BV 0) with zero reserved header bytes, of exactly XCR0_ACCUMULATED's size
        on this host, and nothing larger than the offer's whole area. XsaveRefused says
        why; `where` names the vCPU."""
        from ..cpuid import xcr0_within
        if len(content) < XSAVE_HDR.size:
            raise XsaveRefused(f"{where}: XSAVE record of {len(content)} bytes (at least 16)")
        xcr0, accum = XSAVE_HDR.unpack_from(content)
        offered = offer.xcr0 if offer is not None else 0
        if xcr0 & ~accum:
            raise XsaveRefused(f"{where}: XCR0 {xcr0:#x} outside XCR0_ACCUMULATED {accum:#x}")
        if accum:
            for what, val in (("XCR0", xcr0), ("XCR0_ACCUMULATED", accum)):
                if not xcr0_within(offer, val):
                    raise XsaveRefused(
                        f"{where}: the guest's {what} {val:#x} is not one this host's vCPU "
                        f"engine can give (it offers {'XCR0 ' + hex(offered) if offer else 'no XSAVE'}): "
                        "a guest saved with that XSAVE state would fault here")
        limit = XSAVE_HDR.size + xsave_area_size(offer, offered)
        if len(content) > limit:
            raise XsaveRefused(f"{where}: XSAVE record of {len(content)} bytes (this host's "
                               f"area is at most {limit})")
        area = bytes(content[XSAVE_HDR.size:])
        if not area:
            if accum:
                raise XsaveRefused(f"{where}: XCR0_ACCUMULATED {accum:#x} without an XSAVE area")
            return cls(0, 0)
        if len(area) < XSAVE_AREA_MIN:
            raise XsaveRefused(f"{where}: XSAVE area of {len(area)} bytes (at least {XSAVE_AREA_MIN})")
        want = xsave_area_size(offer, accum)
        if len(area) != want:
            raise XsaveRefused(f"{where}: XSAVE area of {len(area)} bytes for XCR0_ACCUMULATED "
                               f"{accum:#x} (want {want})")
        bv, comp, *reserved = XSTATE_HDR.unpack_from(area, XSTATE_HDR_OFF)
        if bv & ~accum:
            raise XsaveRefused(f"{where}: XSTATE_BV {bv:#x} outside XCR0_ACCUMULATED {accum:#x}")
        if comp:
            raise XsaveRefused(f"{where}: compressed XSAVE area (XCOMP_BV {comp:#x})")
        if any(reserved):
            raise XsaveRefused(f"{where}: reserved XSAVE header bytes set")
        return cls(xcr0, accum, area)
