"""Traps, callbacks and Xen's 64-bit bounce frame; HYPERVISOR_iret.

Exceptions, event upcalls and guest-user syscalls are delivered the way Xen's
create_bounce_frame does it (xen-pv-abi.md §5.4): switch to guest kernel mode if needed,
push [rcx, r11, (error code), rip, cs|saved_mask<<32, rflags, rsp, ss] on the kernel stack
(16-byte aligned), and continue at the handler. There is no IDT: the hypervisor sets RIP.

A guest that faults with no handler, whose bounce frame cannot be written, or that keeps
faulting inside its own fault handler is crashed; the host and other domains carry on.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .abi import (
    CALLBACK_REGISTER, CALLBACKF_mask_events, EXCEPTIONS_WITH_ERROR_CODE, HYPERVISOR_VIRT_END,
    HYPERVISOR_VIRT_START, IRET_CONTEXT, SEGBASE_FS, SEGBASE_GS_KERNEL, SEGBASE_GS_USER,
    SEGBASE_GS_USER_SEL, TI_FLAG_MASK_EVENTS, TRAP_INFO, TRAP_NAMES, VGCF_in_syscall, CallbackOp,
    CallbackType, Errno, FLAT_RING3_CS32, VcpuInfo, is_canonical,
)
from . import descriptors, emulate, ptwr
from .errors import HypercallError
from .mmu import GuestFault

if TYPE_CHECKING:
    from .vcpu import VCPU

log = logging.getLogger("aiovmm.traps")

RF_CF, RF_TF, RF_IF, RF_DF, RF_IOPL, RF_NT, RF_RF, RF_VM, RF_AC = (
    1, 0x100, 0x200, 0x400, 0x3000, 0x4000, 0x10000, 0x20000, 0x40000)
ARCH_FLAGS = 0x3F7FD7            # architectural RFLAGS bits a guest may set
KERNEL_CS_IN_FRAME = 0xE030      # kernel-mode CS as stored in a frame (RPL cleared)
USER_CS, USER_SS = 0xE033, 0xE02B
MAX_NESTED_FAULTS = 16


def bounce(v: "VCPU", handler: int, error_code: int | None = None, *, mask_events: bool,
           rip: int | None = None, rcx: int | None = None, r11: int | None = None,
           clear_df: bool = False, frame_cs: int | None = None) -> bool:
    """Build a bounce frame and continue at `handler`. Returns False if the domain crashed.
    `frame_cs`: the frame's CS instead of the current mode's flat one (Xen pushes regs->cs:
    after a refused iret, the refused selector)."""
    eng = v.engine
    cur_rip, rsp, rflags, cur_rcx, cur_r11 = eng.read(("rip", "rsp", "rflags", "rcx", "r11"))
    if rip is None:
        rip = cur_rip
    was_kernel = v.kernel_mode
    old_mask = v.upcall_mask
    if not was_kernel:
        v.switch_to_kernel()
        stack = v.kernel_sp
    else:
        stack = rsp
    cur_cs = eng.get("cs")
    if cur_cs != USER_CS:
        # Code in another segment (compatibility mode after an iret to FLAT_RING3_CS32,
        # from user or kernel mode): Xen's frame holds it, RPL cleared in kernel context,
        # and the handler runs with FLAT_KERNEL_CS, 64-bit mode (create_bounce_frame).
        eng.write({"cs": USER_CS})
        if frame_cs is None:
            frame_cs = cur_cs & ~3 if was_kernel else cur_cs
    s = stack & ~0xF
    if frame_cs is None:
        cs = KERNEL_CS_IN_FRAME if was_kernel else USER_CS
    else:
        cs = frame_cs
    saved_flags = (rflags & ~(RF_IF | RF_IOPL)) | (0 if old_mask else RF_IF)
    if emulate.architectural_iopl(v):      # Xen's create_bounce_frame: the virtual IOPL
        saved_flags |= v.iopl << 12
    frame = [cur_rcx if rcx is None else rcx, cur_r11 if r11 is None else r11]
    if error_code is not None:
        frame.append(error_code & 0xFFFFFFFF)
    frame += [rip, cs | (old_mask << 32), saved_flags, rsp, USER_SS]
    if bounce_stack_in_xen_range(s):
        v.crash(f"bounce frame below {s:#x} lies in Xen's range")
        return False
    # Xen's frame pointer arithmetic is 64-bit: below 0 it wraps to the top of the address
    # space, slot by slot (a stack under 56 bytes puts the upper slots at 0.. and the lower
    # ones at 0xFFFF_FFFF_FFFF_FFxx). Each slot is written where Xen writes it.
    new_rsp = (s - 8 * len(frame)) & _U64
    try:
        _write_frame(v, new_rsp, frame)
    except GuestFault as f:
        v.crash(f"cannot write bounce frame at {f.va:#x}")
        return False
    if mask_events:
        v.upcall_mask = 1
    new_flags = (rflags & ~(RF_TF | RF_NT | RF_RF | RF_VM | RF_AC | (RF_DF if clear_df else 0))) | RF_IF
    eng.write({"rsp": new_rsp, "rip": handler, "rflags": new_flags})
    v.last_frame_rsp = new_rsp
    return True


_U64 = (1 << 64) - 1


def bounce_stack_in_xen_range(s: int) -> bool:
    """Xen's create_bounce_frame check (x86_64/entry.S, create_bounce_frame_bad_sp): the
    guest stack pointer, 16-byte aligned and before the frame is pushed, in
    (HYPERVISOR_VIRT_START, HYPERVISOR_VIRT_END + 64) crashes the domain. Only that: the frame
    itself may end up below (from HYPERVISOR_VIRT_END + 64 it lies in the 56-64 bytes above
    HYPERVISOR_VIRT_END, guest space), and a frame that cannot be written (non-canonical,
    unmapped, Xen's area) crashes it at the store. The KVM C path (csrc/kvm.c
    fast_user_syscall) leaves every frame outside its narrower window to this one."""
    return HYPERVISOR_VIRT_START < s < HYPERVISOR_VIRT_END + 64


def _write_frame(v: "VCPU", new_rsp: int, frame: list[int]) -> None:
    """The frame's slots at new_rsp (mod 2**64), every address translated before any byte is
    written (a fault leaves guest memory untouched)."""
    if new_rsp + 8 * len(frame) <= _U64 + 1:
        v.copy_to_guest(new_rsp, b"".join(x.to_bytes(8, "little") for x in frame))
        return
    # The frame wraps at 2**64: translate every slot first, then write them.
    mmu = v.domain.hypervisor.pagetables
    root = v.current_root << 12
    addrs = [mmu.translate(root, (new_rsp + 8 * i) & _U64, True) for i in range(len(frame))]
    for ma, x in zip(addrs, frame):
        v.domain.mem.write_u64(ma, x)


def deliver_event(v: "VCPU") -> None:
    """Event upcall: evtchn_upcall_pending and not masked, and a callback is registered."""
    cb = v.callbacks.get(CallbackType.event)
    if not cb or not cb[0]:
        return
    bounce(v, cb[0], mask_events=True)


def exception(v: "VCPU", vector: int, error: int, cr2: int) -> None:
    """A CPU exception or software interrupt reported by the engine: a #GP(0) is first offered
    to the privileged-operation emulator (emulate.py), as Xen's do_general_protection does."""
    if vector == 13 and not v.in_ptwr_step and emulate.gp_fault(v, error):
        return
    if vector == 14 and v.desc_window is not None:
        r = descriptors.ldt_fault(v, cr2, error)
        if r is not None:
            if r == (0, 0):
                return                   # shadow LDT page mapped: retry the instruction
            error, cr2 = r               # the guest's #PF at its own LDT address
    inject_exception(v, vector, error, cr2)


def inject_exception(v: "VCPU", vector: int, error: int, cr2: int, *,
                     frame_cs: int | None = None) -> None:
    """Deliver an exception to the guest's trap table (no emulation); `frame_cs`: the CS the
    frame records when it is not the flat one of the current mode (a faulting iret's)."""
    dom = v.domain
    eng = v.engine
    if v.in_ptwr_step:                 # a fault while emulating a page-table store
        eng.stop()
        return
    name = TRAP_NAMES.get(vector, f"vector {vector}")
    rip, rsp = eng.read(("rip", "rsp"))
    if vector == 14:
        w = ptwr.candidate(v, cr2, error, rip)
        if w is not None:
            done = ptwr.try_fast(v, w)
            if done is True:
                return
            if done is None:                     # another store form: single-step it
                v.pending_ptwr = w
                eng.stop()
                return
            # refused: fall through and bounce the #PF to the guest
    if vector == 3 and len(dom.vcpus) > 1 and _stale_int3(v, rip):
        return
    software = vector == 0x80 or vector >= 32 or vector in (3, 4)
    flags, _cs, handler = v.trap_table[vector] if vector < 256 else (0, 0, 0)
    if software:
        insn_len = 1 if vector in (3, 4) and _byte_before(v, rip) in (0xCC, 0xCE) else 2
        dpl = flags & 3
        allowed = dpl >= 1 if v.kernel_mode else dpl == 3
        if not allowed or not handler:
            # Software INT to a gate the guest may not use: #GP(vector<<3 | 2) at the INT.
            eng.write({"rip": rip - insn_len})
            return inject_exception(v, 13, (vector << 3) | 2, 0)
    if vector == 14:
        m = dom.mem
        m.write_u64(v.info_maddr + VcpuInfo.arch_cr2, cr2)
        v.cr2 = cr2
        error = (error & ~4) | (0 if v.kernel_mode else 4)
    if not handler:
        v.crash(f"unhandled {name} (error {error:#x}{f', cr2 {cr2:#x}' if vector == 14 else ''})")
        return
    if v.kernel_mode and rsp <= v.last_frame_rsp + 64 and v.fault_depth:
        v.fault_depth += 1
    else:
        v.fault_depth = 1
    if v.fault_depth > MAX_NESTED_FAULTS:
        v.crash(f"{name} inside its own fault handler ({v.fault_depth} nested)")
        return
    log.debug("%r: bounce %s at %#x to %#x", v, name, rip, handler)
    bounce(v, handler, error if vector in EXCEPTIONS_WITH_ERROR_CODE else None,
           mask_events=bool(flags & TI_FLAG_MASK_EVENTS), frame_cs=frame_cs)


def finish_ptwr(v: "VCPU") -> None:
    """Complete a trapped page-table store outside emulation; on refusal bounce the #PF."""
    w, v.pending_ptwr = v.pending_ptwr, None
    if len(v.domain.vcpus) > 1:
        # Other vCPUs of the domain may have run since the fault and changed the mapping
        # or the table: decide again on the state as it is now; if it is not the same
        # store to the same L1 table, the instruction runs again (and faults again if due).
        now = ptwr.candidate(v, w.va, w.error, w.rip)
        if now is None or (now.l1e_addr, now.frame, now.length) != (w.l1e_addr, w.frame, w.length):
            v.engine.set("rip", w.rip)
            return
    if not ptwr.complete(v, w):
        v.domain.mem.write_u64(v.info_maddr + VcpuInfo.arch_cr2, w.va)
        v.cr2 = w.va
        flags, _cs, handler = v.trap_table[14]
        if not handler:
            v.domain.crash(f"refused page-table store at rip {w.rip:#x} and no #PF handler")
            return
        bounce(v, handler, w.error & ~4, mask_events=bool(flags & TI_FLAG_MASK_EVENTS))


def _stale_int3(v: "VCPU", rip: int) -> bool:
    """An int3 executed from translated code that another vCPU has rewritten since. Each
    emulated vCPU has its own translated-block cache and one vCPU's stores do not
    invalidate another's; Linux's text_poke_bp puts an int3 into kernel text and takes it
    out again while other CPUs run it. If memory no longer holds an int3 (CC, or CD 03)
    before RIP, the hardware would not have trapped: nothing is delivered, RIP goes back
    to the patched instruction and the vCPU's translated code is dropped before its next
    slice (not inside the hook)."""
    b1 = _byte_before(v, rip)
    if b1 == 0xCC or (b1 == 0x03 and _byte_before(v, rip - 1) == 0xCD):
        return False
    log.debug("%r: stale int3 at %#x (memory has %#04x): retranslating", v, rip - 1, b1)
    v.engine.write({"rip": rip - 1})
    v.flush_code_pending = True
    v.engine.stop()
    return True


def _byte_before(v: "VCPU", rip: int) -> int:
    try:
        return v.copy_from_guest(rip - 1, 1)[0]
    except GuestFault:
        return 0


def user_syscall(v: "VCPU") -> None:
    """SYSCALL from guest user mode: to the kernel's syscall callback (§5.6)."""
    _syscall_bounce(v, v.callbacks.get(CallbackType.syscall), None)


def compat_syscall(v: "VCPU") -> None:
    """SYSCALL from compatibility mode, user or kernel (Xen's cstar_enter -> switch_to_kernel
    for a 64-bit PV guest): never a hypercall; to the syscall32 callback, else the syscall
    one, the frame's CS FLAT_USER_CS32 (RPL cleared in kernel context); neither: #UD."""
    cb = v.callbacks.get(CallbackType.syscall32)
    if not cb or not cb[0]:
        cb = v.callbacks.get(CallbackType.syscall)
    _syscall_bounce(v, cb, FLAT_RING3_CS32 & ~3 if v.kernel_mode else FLAT_RING3_CS32)


def _syscall_bounce(v: "VCPU", cb: tuple[int, int] | None, frame_cs: int | None) -> None:
    """The SYSCALL's bounce to callback `cb` (RIP and RFLAGS are its RCX and R11 now), or
    #UD at the instruction without one; `frame_cs`: a compatibility-mode caller's CS."""
    rip_next, rflags = v.engine.read(("rip", "rflags"))
    if not cb or not cb[0]:
        v.engine.write({"rip": rip_next - 2} if frame_cs is None
                       else {"rip": rip_next - 2, "cs": FLAT_RING3_CS32})
        exception(v, 6, 0, 0)
        return
    if bounce(v, cb[0], mask_events=bool(cb[1] & CALLBACKF_mask_events),
              rcx=rip_next, r11=rflags, clear_df=True, frame_cs=frame_cs):
        if v.event_deliverable():
            deliver_event(v)


# ---------------------------------------------------------------------- hypercalls of this family
def do_set_trap_table(v: "VCPU", table: int, *_) -> int:
    if table == 0:
        v.trap_table = [(0, 0, 0)] * 256
        return 0
    new = list(v.trap_table)
    for i in range(256):
        vector, flags, cs, address = v.read_struct(table + 16 * i, TRAP_INFO)
        if address == 0:
            break
        if not is_canonical(address):
            raise HypercallError(Errno.EINVAL, "non-canonical handler")
        new[vector] = (flags, cs | 3, address)
    v.trap_table = new
    return 0


def _register(v: "VCPU", ctype: int, address: int, flags: int) -> None:
    if not is_canonical(address):
        raise HypercallError(Errno.EINVAL)
    if ctype in (CallbackType.event, CallbackType.nmi):
        flags |= CALLBACKF_mask_events
    v.set_callback(ctype, (address, flags))


def do_set_callbacks(v: "VCPU", event: int, failsafe: int, syscall: int, *_) -> int:
    for t, a in ((CallbackType.event, event), (CallbackType.failsafe, failsafe),
                 (CallbackType.syscall, syscall)):
        if not is_canonical(a):
            raise HypercallError(Errno.EINVAL)
    _register(v, CallbackType.event, event, 0)
    _register(v, CallbackType.failsafe, failsafe, 0)
    _register(v, CallbackType.syscall, syscall, 0)
    return 0


def do_callback_op(v: "VCPU", cmd: int, arg: int, *_) -> int:
    if cmd == CallbackOp.register:
        ctype, flags, address = v.read_struct(arg, CALLBACK_REGISTER)
        if ctype not in (CallbackType.event, CallbackType.failsafe, CallbackType.syscall,
                         CallbackType.nmi, CallbackType.syscall32, CallbackType.sysenter):
            raise HypercallError(Errno.ENOSYS)
        _register(v, ctype, address, flags)
        return 0
    if cmd == CallbackOp.unregister:
        ctype = int.from_bytes(v.copy_from_guest(arg, 2), "little")
        if ctype != CallbackType.nmi:
            raise HypercallError(Errno.EINVAL)
        v.set_callback(ctype, None)
        return 0
    raise HypercallError(Errno.ENOSYS)


def do_iret(v: "VCPU", *_) -> None:
    """HYPERVISOR_iret (§5.7): the context is on the guest stack at the SYSCALL."""
    eng = v.engine
    rsp = eng.get("rsp")
    try:
        rax, r11, rcx, flags, rip, cs, rflags, ursp, ss = v.read_struct(rsp, IRET_CONTEXT)
    except GuestFault:
        v.crash("HYPERVISOR_iret: unreadable iret context")
        return None
    target = descriptors.iret_code_segment(v, cs, rip)
    if cs & 3 == 3:
        if not v.user_root:
            v.crash("HYPERVISOR_iret to user mode without a user page table")
            return None
        v.switch_to_user()
    if emulate.architectural_iopl(v):
        # The frame's IOPL is the new virtual IOPL (pv/iret.c); the C path (kvm.c
        # fast_iret) leaves every iret that would change it to this one.
        v.iopl = (rflags & RF_IOPL) >> 12
    new_flags = (rflags & ARCH_FLAGS & ~(RF_IOPL | RF_VM)) | RF_IF | 2
    regs = {"rip": rip, "rsp": ursp, "rflags": new_flags, "rax": rax}
    if flags & VGCF_in_syscall:
        # Xen leaves through SYSRET (restore_all_guest with TRAP_syscall): RCX gets the
        # return RIP and R11 the new RFLAGS, whatever the frame's rcx/r11 say.
        regs["rcx"] = rip
        regs["r11"] = new_flags
    else:
        regs["rcx"] = rcx
        regs["r11"] = r11
    # Xen: regs->cs = frame.cs | 3, left through restore_all_guest's IRETQ. A CS the CPU
    # refuses makes that IRETQ fault; entry.S replays the fault as the guest's own, from the
    # state the iret built (its RIP, RSP, RFLAGS, mode) and with the refused selector in the
    # frame's CS. A usable one is loaded (FLAT_RING3_CS32: compatibility mode).
    sel = (cs & 0xFFFF) | 3
    if not isinstance(target, tuple):
        regs["cs"] = sel
    eng.write(regs)
    v.upcall_mask = 0 if rflags & RF_IF else 1
    v.fault_depth = 0
    if isinstance(target, tuple):
        vector, error = target
        log.info("d%d: HYPERVISOR_iret to CS %#x: the IRETQ's %s(%#x) is the guest's",
                 v.domain.domid, sel, TRAP_NAMES.get(vector, vector), error)
        inject_exception(v, vector, error, 0, frame_cs=sel if not v.kernel_mode else sel & ~3)
    return None


def do_stack_switch(v: "VCPU", ss: int, sp: int, *_) -> int:
    v.kernel_ss = ss | 3
    v.kernel_sp = sp
    return 0


def do_set_segment_base(v: "VCPU", which: int, base: int, *_) -> int:
    # Xen's handler takes `unsigned int which`: the register's upper 32 bits are not part of
    # it (hypercall-defs.c), so 0x1_0000_0000 is SEGBASE_FS there, not an unknown `which`.
    which &= 0xFFFFFFFF
    if which == SEGBASE_GS_USER_SEL:
        # The selector goes into %gs (shared by both modes); the base it brings is the user
        # one, live only in user mode. Never refused (descriptors.load_user_gs).
        sel, gs_base = descriptors.load_user_gs(v, base)
        eng = v.engine
        eng.write({"gs": sel, "gs_base": gs_base if not v.kernel_mode else eng.get("gs_base")})
        v.user_gs_base = gs_base
        return 0
    if not is_canonical(base):
        raise HypercallError(Errno.EINVAL)
    if which == SEGBASE_FS:
        v.engine.set("fs_base", base)
    elif which == SEGBASE_GS_KERNEL:
        if v.kernel_mode:
            v.engine.set("gs_base", base)
        v.kernel_gs_base = base
    elif which == SEGBASE_GS_USER:
        if not v.kernel_mode:
            v.engine.set("gs_base", base)
        v.user_gs_base = base
    else:
        raise HypercallError(Errno.EINVAL)
    return 0


def do_fpu_taskswitch(v: "VCPU", set_: int, *_) -> int:
    # Virtual CR0.TS is recorded; #NM on first FPU use is not emulated yet (docs/status.md).
    v.fpu_ts = bool(set_)
    return 0
