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
    CallbackType, Errno, FLAT_KERNEL_CS, FLAT_KERNEL_SS, FLAT_RING3_CS32, VcpuInfo, is_canonical,
    segment_base_limit,
)
from . import descriptors, emulate, ptwr
from .errors import HypercallError
from .mmu import XEN_GDT, GuestFault

if TYPE_CHECKING:
    from .vcpu import VCPU

log = logging.getLogger("aiovmm.traps")

RF_CF, RF_TF, RF_IF, RF_DF, RF_IOPL, RF_NT, RF_RF, RF_VM, RF_AC = (
    1, 0x100, 0x200, 0x400, 0x3000, 0x4000, 0x10000, 0x20000, 0x40000)
ARCH_FLAGS = 0x3F7FD7            # architectural RFLAGS bits a guest may set
USER_CS, USER_SS = 0xE033, 0xE02B
MAX_NESTED_FAULTS = 16


def bounce(v: "VCPU", handler: int, error_code: int | None = None, *, mask_events: bool,
           rip: int | None = None, rcx: int | None = None, r11: int | None = None,
           clear_df: bool = False, frame_cs: int | None = None,
           frame_ss: int | None = None, frame_rsp: int | None = None,
           extra: tuple[int, ...] = ()) -> bool:
    """Build a bounce frame and continue at `handler`. Returns False if the domain crashed.
    The frame's CS and SS are Xen's regs->cs/ss: the selectors the interrupted code ran
    with (CS with RPL cleared from kernel mode), unless given: `frame_cs`/`frame_ss` (after
    a refused iret, the frame's selectors; a SYSCALL's entry constants). The handler runs
    with FLAT_KERNEL_CS/SS (create_bounce_frame), loaded as segments (a guest returning from
    compatibility mode or with its own SS gets them back). `frame_rsp`: Xen's regs->rsp
    when it is not the guest's (sysenter_entry's 0): the frame's and, from kernel mode, the
    stack the frame goes on. `extra`: words between r11 and rip (the failsafe callback's
    ds, es, fs, gs)."""
    eng = v.engine
    cur_rip, rsp, rflags, cur_rcx, cur_r11, cur_cs, cur_ss = eng.read(
        ("rip", "rsp", "rflags", "rcx", "r11", "cs", "ss"))
    if frame_rsp is not None:
        rsp = frame_rsp
    if rip is None:
        rip = cur_rip
    was_kernel = v.kernel_mode
    old_mask = v.upcall_mask
    if not was_kernel:
        v.switch_to_kernel()
        stack = v.kernel_sp
    else:
        stack = rsp
    s = stack & ~0xF
    cs = cur_cs if frame_cs is None else frame_cs
    if was_kernel:
        cs &= ~3                                  # "Indicate kernel context to guest."
    ss = cur_ss if frame_ss is None else frame_ss
    saved_flags = (rflags & ~(RF_IF | RF_IOPL)) | (0 if old_mask else RF_IF)
    if emulate.architectural_iopl(v):      # Xen's create_bounce_frame: the virtual IOPL
        saved_flags |= v.iopl << 12
    frame = [cur_rcx if rcx is None else rcx, cur_r11 if r11 is None else r11]
    if error_code is not None:
        frame.append(error_code & 0xFFFFFFFF)
    frame += extra
    frame += [rip, (cs & 0xFFFF) | (old_mask << 32), saved_flags, rsp, ss & 0xFFFF]
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
        why = bounce_context(v, was_kernel, cur_cs, rip, rsp, handler, error_code)
        v.crash(f"cannot write bounce frame at {f.va:#x} ({why})")
        return False
    if mask_events:
        v.upcall_mask = 1
    new_flags = (rflags & ~(RF_TF | RF_NT | RF_RF | RF_VM | RF_AC | (RF_DF if clear_df else 0))) | RF_IF
    load_segments(v, FLAT_KERNEL_CS, XEN_GDT[FLAT_KERNEL_CS], FLAT_KERNEL_SS,
                  XEN_GDT[FLAT_KERNEL_SS], (cur_cs, cur_ss))
    eng.write({"rsp": new_rsp, "rip": handler, "rflags": new_flags})
    v.last_frame_rsp = new_rsp
    return True


def bounce_context(v: "VCPU", was_kernel: bool, cs: int, rip: int, rsp: int, handler: int,
                   error_code: int | None) -> str:
    """What a failed bounce was built from, for the crash message: the mode the vCPU was
    in, the stack it used (the interrupted RSP from kernel mode, else stack_switch's
    kernel_sp), the handler, the previous frame and the vCPU's hypercall count."""
    return (f"from {'kernel' if was_kernel else 'user'} mode cs {cs:#x} rip {rip:#x} rsp {rsp:#x}, "
            f"kernel_ss:sp {v.kernel_ss:#x}:{v.kernel_sp:#x}, handler {handler:#x}"
            + ("" if error_code is None else f" error {error_code:#x} cr2 {v.cr2:#x}")
            + f", upcall_mask {v.upcall_mask}, last frame {v.last_frame_rsp:#x}, "
            f"hypercalls {v.hypercalls}")


def load_segments(v: "VCPU", cs: int, cs_desc: int, ss: int, ss_desc: int,
                  current: tuple[int, int] | None = None) -> None:
    """Load CS and SS as the CPU's IRETQ/SYSRET would (the hidden part from the descriptor,
    which may switch between 64-bit and compatibility mode). `current`: the selectors
    already read; a Xen flat selector already in place is left as it is (the engines
    load them only through here, always with Xen's own descriptor)."""
    eng = v.engine
    cur_cs, cur_ss = current if current is not None else eng.read(("cs", "ss"))
    if cur_cs != cs or cs not in XEN_GDT:
        eng.load_segment("cs", cs, cs_desc)
    if cur_ss != ss or ss not in XEN_GDT:
        eng.load_segment("ss", ss, ss_desc)


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


def failsafe(v: "VCPU", selectors: tuple[int, int, int, int]) -> None:
    """Xen's load_segments (arch/x86/domain.c) when a data segment selector of the vCPU's
    context did not load (NUL loaded instead: vcpu_context.load_data_segments): the
    failsafe callback, events masked per VGCF_failsafe_disables_events, its frame [rcx r11
    ds es fs gs rip cs rflags rsp ss] holding the selectors asked for."""
    address, flags = v.callbacks.get(CallbackType.failsafe, (0, 0))
    log.info("%r: context selectors %s do not load: failsafe callback %#x", v,
             [hex(s) for s in selectors], address)
    bounce(v, address, mask_events=bool(flags & CALLBACKF_mask_events), extra=selectors)


def deliver_event(v: "VCPU") -> None:
    """Event upcall: evtchn_upcall_pending and not masked, and a callback is registered."""
    cb = v.callbacks.get(CallbackType.event)
    if not cb or not cb[0]:
        return
    bounce(v, cb[0], mask_events=True)


NMI_VECTOR = 2


def deliver_nmi(v: "VCPU") -> None:
    """Xen's process_nmi (x86_64/entry.S, on every return to the guest before the event
    check): a pending NMI is left pending while NMIs are masked (async_exception_mask's
    VCPU_TRAP_NMI: from a delivery until the guest's next HYPERVISOR_iret). Else it is no
    longer pending, and it is bounced to trap_ctxt[2] (set_trap_table's vector 2 or
    CALLBACKTYPE_nmi, set_guest_nmi_trapbounce) with NMIs masked, events masked per the
    entry's TI flag; without a handler it is dropped. The caller runs the event check
    after it, as test_all_events does. Every return path calls this one function (the
    slice's start, the hypercalls that can leave one deliverable: send_nmi to the calling
    vCPU, iret)."""
    if not v.nmi_pending or v.nmi_masked:
        return
    v.nmi_pending = False
    flags, _cs, handler = v.trap_table[NMI_VECTOR]
    if not handler:
        return
    v.nmi_masked = True
    log.debug("%r: NMI to %#x", v, handler)
    bounce(v, handler, mask_events=bool(flags & TI_FLAG_MASK_EVENTS))


def deliver_nmi_from_hypercall(v: "VCPU") -> None:
    """deliver_nmi at a hypercall's return; a delivery ends the slice, so that the next one
    starts with NMIs masked known to the engine (the KVM engine's C loop completes
    HYPERVISOR_iret only while none is masked: VCPU.nmi_masked, fast_hypercalls_ok)."""
    if v.nmi_pending and not v.nmi_masked:
        deliver_nmi(v)
        v.engine.stop()


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
                     frame_cs: int | None = None, frame_ss: int | None = None) -> None:
    """Deliver an exception to the guest's trap table (no emulation); `frame_cs`/`frame_ss`:
    the selectors the frame records when they are not the ones loaded (a faulting iret's,
    a SYSCALL's entry constants)."""
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
    if vector == 3 and len(dom.vcpus) > 1 and v.runs_translated_code() and _stale_int3(v, rip):
        return
    flags, _cs, handler = v.trap_table[vector] if vector < 256 else (0, 0, 0)
    if vector >= 32:
        # `int $n`: Xen's IDT gate is DPL 0, do_general_protection's permit_softint checks
        # the guest's gate. Not for 3 and 4 (int3, into, int $3, int $4): Xen's IDT gates
        # there are DPL 3 and do_int3/do_trap inject #BP/#OF whatever the guest's gate
        # says (no handler: the domain crashes below, as create_bounce_frame's null bounce).
        dpl = flags & 3
        allowed = dpl >= 1 if v.kernel_mode else dpl == 3
        if not allowed or not handler:
            # Software INT to a gate the guest may not use: #GP(vector<<3 | 2) at the INT,
            # prefixes and all (the engine's int_length: what it decoded, else `cd n`).
            eng.write({"rip": rip - eng.int_length})
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
           mask_events=bool(flags & TI_FLAG_MASK_EVENTS), frame_cs=frame_cs, frame_ss=frame_ss)


def finish_ptwr(v: "VCPU") -> None:
    """Complete a trapped page-table store outside emulation; on refusal bounce the #PF."""
    w, v.pending_ptwr = v.pending_ptwr, None
    try:
        now_code = v.copy_from_guest(w.rip, w.length)
    except GuestFault:
        now_code = b""
    if now_code != w.code:
        # The bytes at the store changed since the fault (another vCPU, a backend's write):
        # never step other bytes than the store decoded there (Xen emulates only that one);
        # the instruction runs again as it now is, and faults again if it is a store.
        v.engine.set("rip", w.rip)
        return
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
    slice (not inside the hook). Only on an engine that runs translated code
    (VCPU.runs_translated_code): on KVM the int3 is the CPU's own trap, delivered as Xen's
    do_int3 delivers a hardware #BP, memory never read again (the CPU may have run it
    through a translation the guest has not flushed yet; tests/test_redteam_kvm_int3.py)."""
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
    """SYSCALL from guest user mode in 64-bit mode: to the kernel's syscall callback (§5.6;
    Xen's lstar_enter -> switch_to_kernel)."""
    _syscall_bounce(v, CallbackType.syscall, FLAT_KERNEL_CS)


def syscall32(v: "VCPU") -> None:
    """SYSCALL from compatibility mode, in user or kernel mode alike (Xen's cstar_enter never
    makes it a hypercall): to the syscall32 callback (CALLBACKTYPE_syscall32), the frame
    recording FLAT_USER_CS32/SS32 whatever the code segment was."""
    _syscall_bounce(v, CallbackType.syscall32, FLAT_RING3_CS32)


def sysenter(v: "VCPU") -> None:
    """SYSENTER from the guest (user or kernel mode: both run at CPL 3), which the guest's
    CPUID offers (SEP; the engines' CPUs refuse it in long mode with #UD, emulate.ud_fault).
    Xen's sysenter_entry (x86_64/entry.S): regs are rip 0, cs 3 ("ring 3 null cs"), rsp 0,
    ss FLAT_USER_SS, the guest's RFLAGS; bounced to the CALLBACKTYPE_sysenter callback,
    events masked per its own flag (sysenter_disables_events), DF kept; without one, the
    guest's #GP(0) from that same state through its trap table (events masked per the
    gate's flag), a domain crash without a #GP handler."""
    cb = v.callbacks.get(CallbackType.sysenter)
    regs = dict(rip=0, frame_cs=3, frame_ss=FLAT_KERNEL_SS, frame_rsp=0)
    if cb and cb[0]:
        ok = bounce(v, cb[0], mask_events=bool(cb[1] & CALLBACKF_mask_events), **regs)
    else:
        flags, _cs, handler = v.trap_table[13]
        if not handler:
            v.crash("SYSENTER without a sysenter callback or #GP handler")
            return
        ok = bounce(v, handler, 0, mask_events=bool(flags & TI_FLAG_MASK_EVENTS), **regs)
    if ok and v.event_deliverable():
        deliver_event(v)


def _syscall_bounce(v: "VCPU", ctype: int, frame_cs: int) -> None:
    """Xen's switch_to_kernel after lstar_enter/cstar_enter: the frame's CS/SS are the entry's
    constants (FLAT_KERNEL_CS64 or FLAT_USER_CS32; FLAT_KERNEL_SS = FLAT_USER_SS32); events
    are masked per VGCF_syscall_disables_events, the 64-bit callback's flag, for both; DF is
    cleared. No callback: the guest's #UD at the SYSCALL, through its trap table, DF kept."""
    rip_next, rflags = v.engine.read(("rip", "rflags"))
    cb = v.callbacks.get(ctype)
    if not cb or not cb[0]:
        v.engine.write({"rip": (rip_next - 2) & _U64})
        inject_exception(v, 6, 0, 0, frame_cs=frame_cs, frame_ss=FLAT_KERNEL_SS)
        return
    flags = v.callbacks.get(CallbackType.syscall) or (0, 0)
    if bounce(v, cb[0], mask_events=bool(flags[1] & CALLBACKF_mask_events),
              rcx=rip_next, r11=rflags, clear_df=True, frame_cs=frame_cs,
              frame_ss=FLAT_KERNEL_SS):
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
    if ctype == CallbackType.nmi:
        _set_nmi_entry(v, (TI_FLAG_MASK_EVENTS, FLAT_KERNEL_CS, address))
        return
    if ctype == CallbackType.event:
        flags |= CALLBACKF_mask_events
    v.set_callback(ctype, (address, flags))


def _set_nmi_entry(v: "VCPU", entry: tuple[int, int, int]) -> None:
    """Xen's register_guest_nmi_callback / unregister_guest_nmi_callback (pv/callback.c):
    the NMI handler is the trap table's vector 2 (trap_ctxt[2]), which set_trap_table
    writes too; a registered one has events masked (TI_SET_IF) and FLAT_KERNEL_CS.
    (Xen re-asserts a lost NMI for vCPU 0 only from a hardware NMI reason, which no
    domain of aiovmm has.)"""
    table = list(v.trap_table)
    table[NMI_VECTOR] = entry
    v.trap_table = table


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
        if ctype == CallbackType.nmi:
            _set_nmi_entry(v, (0, 0, 0))
            return 0
        if ctype in (CallbackType.event, CallbackType.failsafe, CallbackType.syscall,
                     CallbackType.syscall32, CallbackType.sysenter):
            raise HypercallError(Errno.EINVAL)
        raise HypercallError(Errno.ENOSYS)
    raise HypercallError(Errno.ENOSYS)


XENNMI_register_callback, XENNMI_unregister_callback = 0, 1


def do_nmi_op(v: "VCPU", cmd: int, arg: int, *_) -> int:
    """nmi_op (#28, pv/callback.c do_nmi_op): the same NMI handler as CALLBACKTYPE_nmi;
    struct xennmi_callback {handler_address, pad}."""
    cmd &= 0xFFFFFFFF
    if cmd == XENNMI_register_callback:
        address = int.from_bytes(v.copy_from_guest(arg, 16)[:8], "little")
        _register(v, CallbackType.nmi, address, 0)
        return 0
    if cmd == XENNMI_unregister_callback:
        _set_nmi_entry(v, (0, 0, 0))
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
    # Xen: regs->cs = frame.cs | 3, regs->ss = frame.ss | 3, then restore_all_guest. With
    # VGCF_in_syscall and a canonical RIP it leaves through SYSRET: CS and SS come from
    # MSR_STAR (sysretl to FLAT_USER_CS32 if regs->cs is that, else sysretq to
    # FLAT_RING3_CS64; SS FLAT_RING3_SS), whatever else the frame says. Otherwise through
    # IRETQ, which checks CS, then SS, then (compatibility mode) RIP against the CS limit; a
    # fault there is replayed by entry.S as the guest's own, from the state the iret built
    # (its RIP, RSP, RFLAGS, mode) with the frame's selectors in the bounce frame.
    sel, ss_sel = (cs & 0xFFFF) | 3, (ss & 0xFFFF) | 3
    sysret = bool(flags & VGCF_in_syscall) and is_canonical(rip)
    new_rip = rip
    if sysret:
        sel = FLAT_RING3_CS32 if sel == FLAT_RING3_CS32 else FLAT_KERNEL_CS
        if sel == FLAT_RING3_CS32:
            # SYSRETL loads EIP = ECX, zero-extended: compatibility mode never gets a RIP
            # above 32 bits (RCX keeps the whole one, as restore_all_guest loaded it).
            new_rip = rip & 0xFFFFFFFF
        ss_sel = FLAT_KERNEL_SS
        target: tuple[int, int] | tuple[int, int, int, int] = (
            sel, XEN_GDT[sel], ss_sel, XEN_GDT[ss_sel])
    else:
        target = _iret_segments(v, sel, ss_sel, rip)
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
    regs = {"rip": new_rip, "rsp": ursp, "rflags": new_flags, "rax": rax}
    if flags & VGCF_in_syscall:
        # Xen leaves through SYSRET (restore_all_guest with TRAP_syscall): RCX gets the
        # return RIP and R11 the new RFLAGS, whatever the frame's rcx/r11 say.
        regs["rcx"] = rip
        regs["r11"] = new_flags
    else:
        regs["rcx"] = rcx
        regs["r11"] = r11
    eng.write(regs)
    v.upcall_mask = 0 if rflags & RF_IF else 1
    v.fault_depth = 0
    if len(target) == 2:
        vector, error = target
        log.info("d%d: HYPERVISOR_iret to %#x:%#x: the IRETQ's %s(%#x) is the guest's",
                 v.domain.domid, sel, ss_sel, TRAP_NAMES.get(vector, vector), error)
        inject_exception(v, vector, error, 0, frame_cs=sel, frame_ss=ss_sel)
    else:
        load_segments(v, *target)
    # async_exception_cleanup: the NMI mask set at the last delivery goes; a pending NMI is
    # delivered at this return (test_all_events).
    if v.nmi_masked:
        v.nmi_masked = False
        deliver_nmi_from_hypercall(v)
    return None


def _iret_segments(v: "VCPU", cs: int, ss: int,
                   rip: int) -> tuple[int, int] | tuple[int, int, int, int]:
    """The IRETQ's checks in the CPU's order (descriptors.iret_code_segment, then
    iret_stack_segment, then a compatibility-mode RIP beyond the CS limit: #GP(0)): the
    fault (vector, error), or (cs, its descriptor, ss, its descriptor) to load. The loads
    set the descriptors' accessed bits, as the CPU's do."""
    cs_desc = descriptors.iret_code_segment(v, cs)
    if isinstance(cs_desc, tuple):
        return cs_desc
    ss_desc = descriptors.iret_stack_segment(v, ss)
    if isinstance(ss_desc, tuple):
        return ss_desc
    if not cs_desc & descriptors.SEG_L << 32 and rip > segment_base_limit(cs_desc)[1]:
        return (13, 0)
    descriptors.set_accessed(v, cs)
    descriptors.set_accessed(v, ss)
    return cs, cs_desc | descriptors.SEG_ACCESSED << 32, ss, ss_desc | descriptors.SEG_ACCESSED << 32


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
