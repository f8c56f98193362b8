"""The hypercall dispatcher: one table from Xen's numbers to handlers.

Contract for a handler `fn(vcpu, a1, a2, a3, a4, a5) -> int | None`:
- it reads guest memory only through vcpu.copy_from_guest / read_struct (a bad pointer
  raises GuestFault, answered with -EFAULT);
- it refuses with HypercallError(errno) (answered with -errno);
- it returns the value for RAX, or None when it has set the registers itself (iret, or a
  continuation: RIP rewound onto the SYSCALL and the argument registers rewritten; a handler
  that may do that must be listed in _SELF_CONTINUING so that multicall can carry it);
- anything else it raises is a hypervisor bug: the domain is crashed and the bug logged,
  never propagated into the event loop.
After every hypercall a deliverable event is injected (Xen's test_all_events on exit).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from . import descriptors, emulate, events, grants, mmu_ops, physdev, reservation, scheduler, timers, traps, vcpu_op
from .abi import (
    CONSOLEIO_read, CONSOLEIO_write, MULTICALL_ENTRY, XEN_VERSION_MAJOR, XEN_VERSION_MINOR,
    Errno, Hypercall, XenVer, HYPERVISOR_VIRT_START,
)
from .errors import DomainCrash, HypercallError
from .mmu import GuestFault, MMUError
from .events import EventError

if TYPE_CHECKING:
    from .vcpu import VCPU

log = logging.getLogger("aiovmm.hypercall")
Handler = Callable[..., "int | None"]
MASK64 = (1 << 64) - 1


def do_console_io(v: "VCPU", cmd: int, count: int, buf: int, *_) -> int:
    count &= 0xFFFFFFFF
    if cmd == CONSOLEIO_write:
        if count > 1 << 16:
            raise HypercallError(Errno.EINVAL, "console write too large")
        v.domain.console_write(v.copy_from_guest(buf, count), hypercall=True)
        return 0
    if cmd == CONSOLEIO_read:
        return 0
    raise HypercallError(Errno.ENOSYS)


def _put_string(v: "VCPU", arg: int, text: bytes, size: int) -> int:
    v.copy_to_guest(arg, text[:size - 1].ljust(size, b"\0"))
    return 0


def do_xen_version(v: "VCPU", cmd: int, arg: int, *_) -> int:
    cmd &= 0xFFFFFFFF                            # Xen: do_xen_version(int cmd, ...)
    if cmd == XenVer.version:
        return (XEN_VERSION_MAJOR << 16) | XEN_VERSION_MINOR
    if cmd == XenVer.extraversion:
        return _put_string(v, arg, b"-aiovmm", 16)
    if cmd == XenVer.compile_info:
        info = (b"python".ljust(64, b"\0") + b"aiovmm".ljust(16, b"\0") +
                b"local".ljust(32, b"\0") + b"2026".ljust(32, b"\0"))
        v.copy_to_guest(arg, info)
        return 0
    if cmd == XenVer.capabilities:
        return _put_string(v, arg, b"xen-3.0-x86_64 ", 1024)
    if cmd == XenVer.changeset:
        return _put_string(v, arg, b"aiovmm", 64)
    if cmd == XenVer.platform_parameters:
        v.copy_to_guest(arg, HYPERVISOR_VIRT_START.to_bytes(8, "little"))
        return 0
    if cmd == XenVer.get_features:
        idx = int.from_bytes(v.copy_from_guest(arg, 4), "little")
        if idx != 0:
            raise HypercallError(Errno.EINVAL)
        v.copy_to_guest(arg + 4, pv_features(v).to_bytes(4, "little"))
        return 0
    if cmd == XenVer.pagesize:
        if arg:
            raise HypercallError(Errno.EINVAL)
        return 4096
    if cmd == XenVer.guest_handle:
        v.copy_to_guest(arg, v.domain.uuid.bytes)
        return 0
    if cmd == XenVer.commandline:
        return _put_string(v, arg, b"<denied>", 1024)
    if cmd in (XENVER_extraversion2, XENVER_capabilities2, XENVER_changeset2):
        text = {XENVER_extraversion2: b"-aiovmm", XENVER_capabilities2: b"xen-3.0-x86_64",
                XENVER_changeset2: b"aiovmm"}[cmd]
        return _varbuf(v, arg, text)
    if cmd in (XENVER_build_id, XENVER_commandline2):
        # The dummy XSM policy gives these to privileged domains only (XSM_PRIV).
        raise HypercallError(Errno.EPERM)
    raise HypercallError(Errno.ENOSYS)


XENVER_build_id, XENVER_extraversion2, XENVER_capabilities2 = 10, 11, 12
XENVER_changeset2, XENVER_commandline2 = 13, 14
XENFEAT_pae_pgdir_above_4gb, XENFEAT_mmu_pt_update_preserve_ad, XENFEAT_highmem_assist = 4, 5, 6
XENFEAT_gnttab_map_avail_bits, XENFEAT_direct_mapped = 7, 17
VMASST_TYPE_pae_extended_cr3 = 3


def pv_features(v: "VCPU") -> int:
    """XENVER_get_features submap 0 as Xen gives it to a PV domU (common/kernel.c), minus the
    bits for interfaces aiovmm does not implement (vnode info, the phys-area variants of
    runstate/time registration, MSI-X device-model writes). Linux refuses to boot as a PV
    guest without gnttab_map_avail_bits.
    Xen sets writable_page_tables only for translated guests, never for PV."""
    feats = (1 << XENFEAT_mmu_pt_update_preserve_ad) | (1 << XENFEAT_highmem_assist) | \
        (1 << XENFEAT_gnttab_map_avail_bits) | (1 << XENFEAT_direct_mapped)
    if v.domain.vm_assist & (1 << VMASST_TYPE_pae_extended_cr3):
        feats |= 1 << XENFEAT_pae_pgdir_above_4gb
    return feats


def _varbuf(v: "VCPU", arg: int, text: bytes) -> int:
    """xenver_varbuf_op: a NULL handle asks for the length; else len, then the bytes."""
    if arg == 0:
        return len(text)
    room = int.from_bytes(v.copy_from_guest(arg, 4), "little")
    if len(text) > room:
        raise HypercallError(Errno.ENOBUFS)
    v.copy_to_guest(arg + 4, text)
    return len(text)


def do_vm_assist(v: "VCPU", cmd: int, type_: int, *_) -> int:
    if cmd not in (0, 1):
        raise HypercallError(Errno.ENOSYS)
    if type_ not in (0, 1, 2, 3, 4, 5, 32):
        raise HypercallError(Errno.EINVAL)
    if cmd == 0:
        v.domain.vm_assist |= 1 << type_
    else:
        v.domain.vm_assist &= ~(1 << type_)
    return 0


# Sub-calls that may preempt themselves with a continuation (RIP rewound, argument registers
# rewritten, the engine stopped): inside a multicall their arguments are loaded into the
# registers first, so that what they rewrite can be carried back into the guest's entry.
_SELF_CONTINUING = frozenset({Hypercall.mmu_update, Hypercall.mmuext_op,
                              Hypercall.grant_table_op, Hypercall.memory_op})
_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8")


def _preempt_deadline(v: "VCPU") -> int:
    """When the running slice must end (monotonic ns): the engine's slice deadline if it has
    one, else one scheduler slice from now. A multicall checks it between entries, as Xen's
    do_multicall calls hypercall_preempt_check()."""
    dl = getattr(getattr(v.engine, "slice", None), "deadline_ns", 0)
    return dl or time.monotonic_ns() + v.domain.hypervisor.scheduler.slice_ns


def _continue_multicall(v: "VCPU", rip: int, calls: int, remaining: int) -> None:
    """Xen's hypercall_create_continuation(__HYPERVISOR_multicall, "hi", calls, remaining):
    re-execute the SYSCALL (RIP rewound to it) with the list advanced to the first entry not
    finished; the vCPU yields to the loop (events are delivered) before it re-enters."""
    v.engine.write({"rip": rip - 2, "rax": int(Hypercall.multicall),
                    "rdi": calls & MASK64, "rsi": remaining})
    v.engine.stop()


def do_multicall(v: "VCPU", calls: int, nr: int, *_) -> int | None:
    """Run `nr` entries of the guest's list, each as its own hypercall, writing each result
    back into its entry. The guest controls `nr` (up to 2^32-1), so the work per invocation is
    bounded: between entries the slice deadline is checked and, once it has passed, the rest
    continues in a later slice (continuation). A sub-call that preempted itself has its
    rewritten arguments stored back into its entry and the multicall continues at that entry.
    Nested multicalls are refused (-EINVAL), as in Xen."""
    if v.in_multicall:
        raise HypercallError(Errno.EINVAL, "nested multicall")
    nr &= 0xFFFFFFFF
    eng = v.engine
    rip = eng.get("rip")                         # the instruction after the SYSCALL
    deadline = _preempt_deadline(v)
    size = MULTICALL_ENTRY.size
    v.in_multicall = True
    try:
        for i in range(nr):
            va = calls + size * i
            if i and (eng.stop_requested or time.monotonic_ns() >= deadline):
                _continue_multicall(v, rip, va, nr - i)
                return None
            op, _result, *args = v.read_struct(va, MULTICALL_ENTRY)
            if op in _SELF_CONTINUING:
                eng.write(dict(zip(_ARG_REGS, args[:5])))
            ret = call(v, op, *args[:5])
            if ret is None:
                if op == Hypercall.iret or v.domain.dying:
                    return None                  # registers are the guest's now / crashed
                if eng.get("rip") == rip - 2:    # the sub-call made a continuation
                    if op not in _SELF_CONTINUING:
                        # Its arguments were not in the registers: carrying them back would
                        # corrupt the guest's entry. A hypervisor bug: add `op` to the set.
                        log.error("d%d: hypercall %d preempted itself inside a multicall but "
                                  "is not in _SELF_CONTINUING", v.domain.domid, op)
                        v.crash(f"hypercall {op} continuation inside a multicall")
                        return None
                    new = [eng.get(r) for r in _ARG_REGS]
                    try:
                        v.copy_to_guest(va, MULTICALL_ENTRY.pack(op, 0, *new, args[5]))
                    except GuestFault:
                        eng.set("rip", rip)      # Xen's hypercall_cancel_continuation
                        raise
                    _continue_multicall(v, rip, va, nr - i)
                    return None
                ret = 0
            v.copy_to_guest(va + 8, (ret & MASK64).to_bytes(8, "little"))
    finally:
        v.in_multicall = False
    if v.nmi_pending:                    # an entry's send_nmi to this vCPU: at the return
        traps.deliver_nmi_from_hypercall(v)
    return 0


def do_set_debugreg(v: "VCPU", reg: int, value: int, *_) -> int:
    return emulate.set_debugreg(v, reg & 0xFFFFFFFF, value)


def do_get_debugreg(v: "VCPU", reg: int, *_) -> int:
    val = emulate.get_debugreg(v, reg & 0xFFFFFFFF)
    return -Errno.ENODEV if val is None else val


TABLE: dict[int, Handler] = {
    Hypercall.set_trap_table: traps.do_set_trap_table,
    Hypercall.mmu_update: mmu_ops.do_mmu_update,
    Hypercall.stack_switch: traps.do_stack_switch,
    Hypercall.set_callbacks: traps.do_set_callbacks,
    Hypercall.fpu_taskswitch: traps.do_fpu_taskswitch,
    Hypercall.sched_op_compat: scheduler.do_sched_op_compat,
    Hypercall.memory_op: reservation.do_memory_op,
    Hypercall.multicall: do_multicall,
    Hypercall.update_va_mapping: mmu_ops.do_update_va_mapping,
    Hypercall.set_timer_op: timers.do_set_timer_op,
    Hypercall.xen_version: do_xen_version,
    Hypercall.console_io: do_console_io,
    Hypercall.vm_assist: do_vm_assist,
    Hypercall.grant_table_op: grants.do_grant_table_op,
    Hypercall.iret: traps.do_iret,
    Hypercall.vcpu_op: vcpu_op.do_vcpu_op,
    Hypercall.set_segment_base: traps.do_set_segment_base,
    Hypercall.mmuext_op: mmu_ops.do_mmuext_op,
    Hypercall.sched_op: scheduler.do_sched_op,
    Hypercall.callback_op: traps.do_callback_op,
    Hypercall.nmi_op: traps.do_nmi_op,
    Hypercall.event_channel_op: events.do_event_channel_op,
    # privileged-operation family (emulate.py, physdev.py)
    Hypercall.set_gdt: descriptors.do_set_gdt,
    Hypercall.update_descriptor: descriptors.do_update_descriptor,
    Hypercall.set_debugreg: do_set_debugreg,
    Hypercall.get_debugreg: do_get_debugreg,
    Hypercall.physdev_op: physdev.do_physdev_op,
    Hypercall.platform_op: physdev.do_platform_op,
    Hypercall.xenpmu_op: physdev.do_xenpmu_op,
}


def call(v: "VCPU", nr: int, a1: int = 0, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int | None:
    """Run one hypercall; map refusals to -errno in this one place."""
    fn = TABLE.get(nr)
    if fn is None:
        return -Errno.ENOSYS
    try:
        return fn(v, a1, a2, a3, a4, a5)
    except GuestFault:
        return -Errno.EFAULT
    except (HypercallError, MMUError, EventError) as e:
        return -e.errno
    except DomainCrash as e:
        v.crash(str(e))
        return None


def dispatch(v: "VCPU") -> None:
    """Entry from the SYSCALL hook in guest kernel mode (the hot path: keep it lean)."""
    eng = v.engine
    nr, a1, a2, a3, a4, a5 = eng.hypercall_args()
    pv = v.pv                                   # the PV state's one copy (vcpu.PVState)
    pv.hypercalls += 1
    pv.fault_depth = 0
    fn = TABLE.get(nr)
    if fn is None:
        ret = -Errno.ENOSYS
    else:
        counts = v.domain.hypercall_counts
        counts[nr] = counts.get(nr, 0) + 1
        try:
            ret = fn(v, a1, a2, a3, a4, a5)
        except GuestFault:
            ret = -Errno.EFAULT
        except (HypercallError, MMUError, EventError) as e:
            ret = -e.errno
        except DomainCrash as e:
            v.crash(str(e))
            ret = None
    if ret is not None:
        eng.set_rax(ret)
    if not eng.stop_requested and v.event_deliverable():
        traps.deliver_event(v)


def store_query_answers(v: "VCPU") -> None:
    """The answers an engine may give without this dispatcher (the KVM engine's C loop,
    csrc/kvm.c fast_query), each taken from the handler itself so that values and error codes
    come from one place: xen_version(XENVER_version), and vcpu_op naming a vCPU id no domain
    can have (vcpu_op.MAX_VCPUS and above: -ENOENT whatever the command)."""
    pv = v.pv
    pv.xenver_version = call(v, Hypercall.xen_version, XenVer.version) & MASK64
    pv.max_vcpus = vcpu_op.MAX_VCPUS
    pv.no_vcpu = call(v, Hypercall.vcpu_op, 0, vcpu_op.MAX_VCPUS) & MASK64


def completed_elsewhere(v: "VCPU", counts: dict[int, int], events: bool) -> None:
    """Hypercalls the engine completed without this dispatcher (the KVM engine's C loop:
    stack_switch, set_segment_base, iret, the singleshot timer's vcpu_ops, store_query_answers'
    queries; it already counted
    them in v.hypercalls): into the domain's statistics, a timer change onto the event loop's
    timer, and, when the last one left an event deliverable, the tail every hypercall has
    (dispatch above)."""
    dc = v.domain.hypercall_counts
    for nr, n in counts.items():
        dc[nr] = dc.get(nr, 0) + n
    timers.apply_engine_singleshot(v)
    if events and not v.engine.stop_requested and v.event_deliverable():
        traps.deliver_event(v)
