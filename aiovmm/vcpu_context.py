"""VCPUOP_initialise: a guest brings up a vCPU of its own from a struct vcpu_guest_context.

Xen's checks and their order (xen/common/domain.c default_initialise_vcpu,
xen/arch/x86/domain.c arch_set_info_guest), for a 64-bit PV guest:
1. the whole 5168-byte context is copied once (-EFAULT), then an initialised vCPU is
   refused (-EEXIST); everything below reads the copy, never guest memory again;
2. -EINVAL: debugreg[6]/[7] wider than 32 bits, a breakpoint address (debugreg[0..3]) in
   Xen's range, a non-canonical rip, rsp, kernel_sp, fs_base, gs_base_kernel, gs_base_user,
   event/syscall/failsafe callback, trap handler, or (with entries) LDT base; an LDT base
   in Xen's range, not page aligned, or more than 8192 entries;
3. selectors (cs, ss, kernel_ss, every trap cs) get RPL 3 (fixup_guest_*_selector: the
   guest kernel runs in ring 3), rflags keeps only architectural bits, IOPL becomes the
   virtual IOPL, IF is forced on;
4. -EINVAL: more than 16 GDT frames; a vCPU not starting in kernel mode without a user
   page-table root (ctrlreg[1]);
5. the GDT frames are taken as Xen's pv_set_gdt takes them (-EINVAL: not the domain's, or
   an unsafe descriptor); CR3 (ctrlreg[3]) must be a frame of the domain that validates as
   an L4 table (a type reference is taken, as by NEW_BASEPTR; -EINVAL for a frame that is
   not the domain's, the validation's errno otherwise); the same for a user root. On any
   failure every reference taken is dropped again;
6. only CR0.TS of ctrlreg[0] is kept, CR4 goes through the PV CR4 policy, debug registers
   through set_debugreg.
With VGCF_online in flags the vCPU is up at once; otherwise VCPUOP_up brings it up.

Engines: the vCPU enters the guest at rip/rsp with the context's CS and SS (RPL 3), loaded
as restore_all_guest's IRETQ loads them (start_segments: the checks of traps._iret_segments,
the load through traps.load_segments and each engine's load_segment): FLAT_USER_CS32 or a
32-bit code segment of the guest's GDT/LDT enters compatibility mode, as on Xen. Where that
IRETQ would fault (Xen takes the selectors unchecked and the guest gets the fault at its first
entry) the context is refused (-EINVAL) before anything is taken: a restore or
VCPUOP_initialise never builds a vCPU that cannot enter. Every GPR of user_regs is loaded, as Xen loads them; with
VGCF_i387_valid the FPU gets fpu_ctxt (an FXSAVE image), else its reset state.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .abi import FLAT_KERNEL_CS, FLAT_KERNEL_SS, HYPERVISOR_VIRT_END, PAGE_SHIFT, PAGE_SIZE, CallbackType, Errno, is_canonical
from .errors import HypercallError
from .memory import PageType
from .migration.context import SIZE as CONTEXT_SIZE, VGCF, VcpuContext
from .mmu import MMUError
from . import cpuid, descriptors, emulate, timers, vcpu_op

if TYPE_CHECKING:
    from .vcpu import VCPU

log = logging.getLogger("aiovmm.vcpu_op")

MAX_LDT_ENTS = 8192
MAX_GDT_FRAMES = 16
CR0_TS = 1 << 3
# X86_EFLAGS_ALL without IOPL (virtual), VM (discarded as IRET does), NT/RF/VIF/VIP/TF
# which the engines cannot honour at entry: arithmetic flags, DF, AC, ID.
RFLAGS_KEPT = 0x240CD5
RFLAGS_IF = 0x200
RFLAGS_MBS = 0x2
CALLBACKF_mask_events = 1


def _rpl3(sel: int) -> int:
    """Xen's __fixup_guest_selector for a 64-bit PV guest (GUEST_KERNEL_RPL = 3)."""
    return (sel & 0xFFFF) | 3


def _xen_range(a: int) -> bool:
    """__addr_ok's complement: canonical upper half below Xen's end is Xen's."""
    return not (a < 1 << 47 or a >= HYPERVISOR_VIRT_END)


def check(c: VcpuContext) -> None:
    """Steps 2 and 4 of the module docstring: refuse a context before anything is taken."""
    dr = c.debugreg
    if dr[6] >> 32 or dr[7] >> 32:
        raise HypercallError(Errno.EINVAL, "debugreg[6]/[7] wider than 32 bits")
    for i in range(4):
        if not emulate.breakpoint_addr_ok(dr[i]):
            raise HypercallError(Errno.EINVAL, f"debugreg[{i}] {dr[i]:#x} in Xen's range")
    r = c.regs
    named = {"rip": r.get("rip", 0), "rsp": r.get("rsp", 0), "kernel_sp": c.kernel_sp,
             "fs_base": c.fs_base, "gs_base_kernel": c.gs_base_kernel,
             "gs_base_user": c.gs_base_user, "event_callback": c.event_callback,
             "syscall_callback": c.syscall_callback, "failsafe_callback": c.failsafe_callback}
    if c.ldt_ents:
        named["ldt_base"] = c.ldt_base
    for what, a in named.items():
        if not is_canonical(a):
            raise HypercallError(Errno.EINVAL, f"non-canonical {what} {a:#x}")
    for vec, (_f, _cs, a) in enumerate(c.traps):
        if not is_canonical(a):
            raise HypercallError(Errno.EINVAL, f"non-canonical trap {vec} handler {a:#x}")
    if _xen_range(c.ldt_base) or c.ldt_base & (PAGE_SIZE - 1) or c.ldt_ents > MAX_LDT_ENTS:
        raise HypercallError(Errno.EINVAL, f"LDT {c.ldt_base:#x}/{c.ldt_ents}")
    if (c.gdt_ents + 511) // 512 > MAX_GDT_FRAMES:
        raise HypercallError(Errno.EINVAL, f"{c.gdt_ents} GDT entries")
    if not c.flags & VGCF.in_kernel and not c.ctrlreg[1]:
        raise HypercallError(Errno.EINVAL, "user-mode start without a user page-table root")


def _take_root(v: "VCPU", cr3: int, what: str) -> int:
    """A CR3 value of the context -> its MFN with an L4 type reference (NEW_BASEPTR's rule)."""
    dom = v.domain
    mem = dom.mem
    mfn = cr3 >> PAGE_SHIFT
    if not mem.valid_mfn(mfn) or mem.owner[mfn] != dom.domid:
        raise HypercallError(Errno.EINVAL, f"{what} {cr3:#x} is not a frame of d{dom.domid}")
    dom.hypervisor.pagetables.get_type(mfn, PageType.l4, dom.domid)   # MMUError: its errno
    return mfn


def initialise(caller: "VCPU", v: "VCPU", arg: int) -> None:
    """VCPUOP_initialise of vCPU `v` by `caller` (the module docstring has the rules)."""
    raw = caller.copy_from_guest(arg, CONTEXT_SIZE)          # GuestFault: -EFAULT
    if v.initialised:
        raise HypercallError(Errno.EEXIST, f"vCPU {v.id} is already initialised")
    c = VcpuContext.unpack(raw)
    set_context(v, c)
    log.info("d%d: vcpu %d initialised by vcpu %d: rip %#x rsp %#x cr3 %#x", v.domain.domid,
             v.id, caller.id, c.regs.get("rip", 0), c.regs.get("rsp", 0), v.kernel_root << PAGE_SHIFT)
    if c.flags & VGCF.online:
        vcpu_op.bring_up(v)


def set_context(v: "VCPU", c: VcpuContext) -> None:
    """Xen's arch_set_info_guest for a 64-bit PV vCPU not yet initialised: steps 2-6 of
    the module docstring, frame numbers in `c` being MFNs; its fpu_ctxt is loaded when
    VGCF_i387_valid. Shared by VCPUOP_initialise and a restore
    (migration/restore.py, which converts the stream's PFNs first, as Xen's
    process_vcpu_basic does). The vCPU is left down: the caller brings it up."""
    check(c)
    dom = v.domain
    hv = dom.hypervisor
    pt = hv.pagetables
    in_kernel = bool(c.flags & VGCF.in_kernel)
    eng = v.engine
    # The engine's long mode first: the GDT window (set_gdt) points its GDTR after it.
    eng.setup_long_mode(0, hv.xen.GDT_VA, hv.xen.GDT_LIMIT)
    taken: list[int] = []
    old_root = v.kernel_root
    try:
        descriptors.set_gdt(v, list(c.gdt_frames), c.gdt_ents)
        taken.append(_take_root(v, c.ctrlreg[3], "CR3"))
        if c.ctrlreg[1]:
            taken.append(_take_root(v, c.ctrlreg[1], "user CR3"))
        if c.ldt_ents:
            descriptors.set_ldt(v, c.ldt_base, c.ldt_ents)
        # An LDT selector's page is found through the context's own kernel tables (Xen's
        # pv_map_ldt_shadow_page), never through whatever root the vCPU had before.
        v.kernel_root = taken[0]
        segs = start_segments(v, c)
    except (HypercallError, MMUError):
        v.kernel_root = old_root
        for mfn in taken:
            pt.put_type(mfn)
        descriptors.release(v)
        raise
    v.kernel_root = taken[0]
    v.user_root = taken[1] if len(taken) > 1 else 0
    v.kernel_mode = in_kernel
    v.trap_table = [(f, _rpl3(cs), a) if a else (0, 0, 0) for f, cs, a in c.traps]
    v.kernel_ss, v.kernel_sp = _rpl3(c.kernel_ss or FLAT_KERNEL_SS), c.kernel_sp
    cb: dict[int, tuple[int, int]] = {}
    if c.event_callback:
        cb[CallbackType.event] = (c.event_callback, CALLBACKF_mask_events)
    if c.failsafe_callback:
        cb[CallbackType.failsafe] = (c.failsafe_callback, CALLBACKF_mask_events
                                     if c.flags & VGCF.failsafe_disables_events else 0)
    if c.syscall_callback:
        cb[CallbackType.syscall] = (c.syscall_callback, CALLBACKF_mask_events
                                    if c.flags & VGCF.syscall_disables_events else 0)
    v.callbacks = cb
    v.fpu_ts = bool(c.ctrlreg[0] & CR0_TS)
    v.cr2 = 0
    v.cr4 = cpuid.fixup_guest_cr4(c.ctrlreg[4], v)
    v.dr = [0, 0, 0, 0, 0, 0, emulate.DR6_ONES, emulate.DR7_ONES]
    for i in (0, 1, 2, 3, 6, 7):
        emulate.set_debugreg(v, i, c.debugreg[i])        # Xen ignores its result here too
    r = c.regs
    rflags = r.get("rflags", 0)
    v.iopl = (rflags >> 12) & 3                          # IOPL privileges are virtualised
    v.kernel_gs_base, v.user_gs_base = c.gs_base_kernel, c.gs_base_user
    root = v.kernel_root if in_kernel else v.user_root
    eng.set_cr3(root << PAGE_SHIFT)
    gprs = {n: r.get(n, 0) for n in ("rax", "rcx", "rdx", "rbx", "rsi", "rdi", "rbp", "r8",
                                     "r9", "r10", "r11", "r12", "r13", "r14", "r15")}
    load_data_segments(v, c)
    enter(v, segs, gprs, r.get("rip", 0), r.get("rsp", 0),
          (rflags & RFLAGS_KEPT) | RFLAGS_IF | RFLAGS_MBS)
    eng.load_fpu(c.fpu if c.flags & VGCF.i387_valid else None)   # fpu_ctxt leads
    eng.write({"fs_base": c.fs_base,
               "gs_base": c.gs_base_kernel if in_kernel else c.gs_base_user})
    eng.flush_tlb()
    timers.write_pvclock(v)
    v.initialised = True


def load_data_segments(v: "VCPU", c: VcpuContext) -> None:
    """The context's DS, ES, FS and GS selectors (user_regs, kept as given: arch_set_info_
    guest), loaded as Xen's load_segments loads them when the vCPU first runs: each as
    descriptors.data_segment finds it; one that does not load is NUL, and the vCPU then
    starts in its failsafe callback (VCPU.pending_failsafe, traps.failsafe; `enter` then
    takes it in directly, so that the bounce finds the context's registers). Before
    `enter` and before the FS/GS bases are written: those of the context win over the
    descriptors' (as Xen writes the bases after the selectors). Shared by
    VCPUOP_initialise and a restore."""
    r = c.regs
    asked = tuple(r.get(n, 0) & 0xFFFF for n in ("ds", "es", "fs", "gs"))
    found = [descriptors.data_segment(v, s) for s in asked]
    loads = [got or (0, 0) for got in found]
    eng = v.engine
    for name, (sel, desc) in zip(("ds", "es"), loads):
        eng.load_segment(name, sel, desc)           # with the hidden part (an IRETQ keeps it)
    eng.write({"fs": loads[2][0], "gs": loads[3][0]})
    v.pending_failsafe = asked if None in found else None


def start_segments(v: "VCPU", c: VcpuContext) -> tuple[int, int, int, int]:
    """The context's CS and SS (RPL 3, fixup_guest_code/stack_selector) as the IRETQ into
    the guest checks them (traps._iret_segments, the one rule HYPERVISOR_iret uses), with
    their descriptors from the vCPU's GDT/LDT (set before this); HypercallError(-EINVAL)
    naming the fault for a pair the CPU would refuse, or a compatibility-mode RIP beyond
    the code segment's limit."""
    from . import traps
    r = c.regs
    cs, ss, rip = _rpl3(r.get("cs", 0)), _rpl3(r.get("ss", 0)), r.get("rip", 0)
    target = traps._iret_segments(v, cs, ss, rip)
    if len(target) == 2:
        vector, error = target
        raise HypercallError(Errno.EINVAL, f"user_regs cs {cs:#x} ss {ss:#x} rip {rip:#x}: "
                             f"the IRETQ into the guest would raise "
                             f"{traps.TRAP_NAMES.get(vector, vector)}({error:#x})")
    return target          # type: ignore[return-value]


def enter(v: "VCPU", segs: tuple[int, int, int, int], gprs: dict[str, int], rip: int,
          rsp: int, rflags: int) -> None:
    """Arrange the vCPU's first entry at rip/rsp in the segments start_segments gave. Xen's
    flat 64-bit pair enters through the engine's start path as it always has; any other
    (compatibility mode, a segment of the guest's own tables) enters directly and is loaded
    through traps.load_segments, as HYPERVISOR_iret loads it; so does a vCPU that starts in
    its failsafe callback (load_data_segments: the bounce reads the registers it enters with)."""
    from . import traps
    hv = v.domain.hypervisor
    flat = (segs[0], segs[2]) == (FLAT_KERNEL_CS, FLAT_KERNEL_SS) and v.pending_failsafe is None
    v.engine.start_in_stub(hv.xen.STUB_VA, hv.xen.STUB_STACK_TOP, gprs, rip, rsp, rflags,
                           direct=not flat)
    if not flat:
        traps.load_segments(v, *segs, current=(-1, -1))     # nothing loaded yet
