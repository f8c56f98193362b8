"""vcpu_op (#24) with Xen's semantics (common/domain.c common_vcpu_op, x86/domain.c
arch_do_vcpu_op): timers, up/down/is_up, runstate, and the guest areas Xen keeps updating:
a relocated vcpu_info (register_vcpu_info), a runstate area and a vcpu_time_info copy.

Runstate accounting: a vCPU is `running` while it has a slice or is runnable on the loop, and
`blocked` while it sleeps in SCHEDOP_block/poll; `runnable` time is not measured (the loop
gives a woken vCPU its slice at once), so a guest sees no steal time. The area (a guest
virtual address, as on Xen) is rewritten at every change, with Xen's XEN_RUNSTATE_UPDATE
protocol when VMASST_TYPE_runstate_update_flag is on.
"""
from __future__ import annotations

import enum
import logging
import struct
from typing import TYPE_CHECKING

from .abi import (
    HYPERVISOR_VIRT_END, PAGE_SIZE, VCPU_INFO_SIZE, XEN_LEGACY_MAX_VCPUS, Errno,
    ShutdownReason, VcpuInfo, VcpuOp, VCPU_SET_SINGLESHOT_TIMER,
)
from .errors import HypercallError
from .memory import PageType
from .mmu import GuestFault, MMUError
from . import timers

if TYPE_CHECKING:
    from .domain import Domain
    from .vcpu import VCPU

log = logging.getLogger("aiovmm.vcpu_op")

VCPUOP_register_vcpu_time_memory_area = 13
VCPUOP_register_runstate_phys_area = 14
VCPUOP_register_vcpu_time_phys_area = 15
STIME_DELTA_MAX = (1 << 63) - 1
VMASST_TYPE_runstate_update_flag = 5
XEN_RUNSTATE_UPDATE = 1 << 63
RUNSTATE_INFO = struct.Struct("<i4xQ4Q")        # state, state_entry_time, time[4]  (48 bytes)
REGISTER_VCPU_INFO = struct.Struct("<QII")       # mfn, offset, rsvd


class RunState(enum.IntEnum):
    running = 0
    runnable = 1
    blocked = 2
    offline = 3


# vcpus = N: every vCPU has its vcpu_info slot in shared_info (Xen's legacy 32), so a guest
# never needs register_vcpu_info to bring one up; and all of them run on the one loop thread.
MAX_VCPUS = XEN_LEGACY_MAX_VCPUS


def _addr_ok(va: int, size: int) -> bool:
    """Xen's access_ok on x86_64: first and last byte below 2^47 or above Xen's range."""
    def ok(a: int) -> bool:
        return a < 1 << 47 or HYPERVISOR_VIRT_END <= a < 1 << 64
    return ok(va) and (size == 0 or ok(va + size - 1))


# ---------------------------------------------------------------------------- runstate
def set_runstate(v: "VCPU", state: RunState) -> None:
    """Account the time spent in the old state and publish the new one."""
    now = v.domain.hypervisor.system_time_ns()
    if state == v.runstate:
        return
    v.runstate_time[v.runstate] += now - v.runstate_entry
    v.runstate = state
    v.runstate_entry = now
    publish_runstate(v)


def publish_runstate(v: "VCPU") -> None:
    if not v.runstate_area:
        return
    entry = v.runstate_entry
    flag = v.domain.vm_assist & (1 << VMASST_TYPE_runstate_update_flag)
    try:
        if flag:
            v.copy_to_guest(v.runstate_area + 8, struct.pack("<Q", entry | XEN_RUNSTATE_UPDATE))
        v.copy_to_guest(v.runstate_area, RUNSTATE_INFO.pack(
            int(v.runstate), entry | (XEN_RUNSTATE_UPDATE if flag else 0), *v.runstate_time))
        if flag:
            v.copy_to_guest(v.runstate_area + 8, struct.pack("<Q", entry))
    except GuestFault:
        pass                     # Xen ignores an area the current page tables do not map


# ---------------------------------------------------------------------------- guest areas
def _register_vcpu_info(caller: "VCPU", v: "VCPU", arg: int) -> int:
    mfn, offset, _rsvd = caller.read_struct(arg, REGISTER_VCPU_INFO)
    if offset >= PAGE_SIZE or mfn >= 1 << 52:
        raise HypercallError(Errno.EINVAL, "vcpu_info address")
    if v.info_frame:
        raise HypercallError(Errno.EBUSY, "vcpu_info already registered")
    if offset + VCPU_INFO_SIZE > PAGE_SIZE or offset & 7:
        raise HypercallError(Errno.ENXIO, "vcpu_info crosses a page or is misaligned")
    mem, dom = v.domain.mem, v.domain
    if not mem.valid_mfn(mfn) or mem.owner[mfn] != dom.domid:
        raise HypercallError(Errno.EINVAL, f"frame {mfn:#x} not owned")
    try:
        dom.hypervisor.pagetables.get_type(mfn, PageType.writable, dom.domid)
    except MMUError:
        raise HypercallError(Errno.EACCES, f"frame {mfn:#x} cannot be writable") from None
    new = (mfn << 12) + offset
    old = v.info_maddr
    # vcpu_info_populate: the new area starts as a copy of the old one; then everything is
    # marked pending so that no event is lost in the move.
    mem.map[new:new + VCPU_INFO_SIZE] = bytes(mem.map[old:old + VCPU_INFO_SIZE])
    v.set_info_maddr(new)
    v.info_frame = mfn
    mem.map[new + VcpuInfo.evtchn_upcall_pending] = 1
    mem.map[new + VcpuInfo.evtchn_pending_sel:new + VcpuInfo.evtchn_pending_sel + 8] = b"\xff" * 8
    timers.write_pvclock(v)
    log.debug("d%d: vcpu %d vcpu_info at %#x", dom.domid, v.id, new)
    return 0


def publish_time(v: "VCPU") -> None:
    """The registered vcpu_time_info copy (constant parameters: written when registered)."""
    if not v.time_area:
        return
    info = bytes(v.domain.mem.map[v.info_maddr + VcpuInfo.time:v.info_maddr + VcpuInfo.time + 32])
    try:
        v.copy_to_guest(v.time_area, info)
    except GuestFault:
        pass


def release(v: "VCPU") -> None:
    """vCPU teardown: point the vCPU back at its shared_info slot, then drop the writable
    reference on a registered vcpu_info frame (Xen's unmap_guest_area: vcpu_info_reset
    first). Events still reach a dying domain until its ports close; written into the old
    frame, they would land in whoever has it next if the guest gave it back."""
    if v.info_frame:
        v.set_info_maddr(v.domain.shared_info_maddr + VCPU_INFO_SIZE * v.id)
        v.domain.hypervisor.pagetables.put_type(v.info_frame)
        v.info_frame = 0


# ---------------------------------------------------------------------------- vCPUs 1..N-1
def create_secondary(dom: "Domain", vcpu_id: int, engine=None) -> "VCPU":
    """A vCPU as Xen creates vCPUs 1..N-1 of a PV domain: existing (is_up answers 0,
    bind_virq/bind_ipi may name it) but down and not initialised until the guest sends
    VCPUOP_initialise with a vcpu_guest_context (vcpu_context.py) and VCPUOP_up. Its own
    engine instance (`engine`: one made ahead, as a restore does while the pages arrive);
    its timers are armed when it first comes up."""
    from .vcpu import VCPU
    hv = dom.hypervisor
    eng = engine if engine is not None else hv.new_engine(dom, vcpu_id)
    v = VCPU(dom, vcpu_id, eng)
    eng.kernel_mode = lambda: v.kernel_mode
    v.online = False
    v.initialised = False
    v.runstate = RunState.offline
    v.periodic_ns = timers.DEFAULT_PERIOD_NS
    timers.write_pvclock(v)
    dom.vcpus.append(v)
    return v


def bring_up(v: "VCPU") -> None:
    """VCPUOP_up (or VGCF_online) of an initialised vCPU: clear "down", wake its task and
    restart its periodic timer."""
    if v.online:
        return
    v.online = True
    set_runstate(v, RunState.running)
    if v.periodic_ns and v.periodic_handle is None:
        timers.set_periodic(v, v.periodic_ns)
    log.info("d%d: vcpu %d up", v.domain.domid, v.id)
    v.wake()


# ---------------------------------------------------------------------------- the hypercall
_SET_SINGLESHOT_TIMER = int(VcpuOp.set_singleshot_timer)
_STOP_SINGLESHOT_TIMER = int(VcpuOp.stop_singleshot_timer)


def do_vcpu_op(v: "VCPU", cmd: int, vcpuid: int, arg: int, *_) -> int:
    cmd &= 0xFFFFFFFF
    vcpuid &= 0xFFFFFFFF
    target = v.domain.vcpu(vcpuid)
    if target is None:
        raise HypercallError(Errno.ENOENT, f"no vCPU {vcpuid}")
    if cmd == _SET_SINGLESHOT_TIMER:
        # First, as plain ints (an enum attribute per test costs more than the test): once
        # per timer tick of every guest kernel (Linux's clockevent), the rest is rare.
        if target is not v:
            raise HypercallError(Errno.EINVAL)
        timeout, _flags = v.read_struct(arg, VCPU_SET_SINGLESHOT_TIMER)
        timers.vcpuop_set_singleshot(v, timeout)
        return 0
    if cmd == _STOP_SINGLESHOT_TIMER:
        if target is not v:
            raise HypercallError(Errno.EINVAL)
        timers.stop_singleshot(v)
        return 0
    dom = v.domain
    if cmd == VcpuOp.is_up:
        return 1 if target.online else 0
    if cmd == VcpuOp.up:
        # common_vcpu_op: an uninitialised vCPU cannot come up (-EINVAL).
        if not target.initialised:
            raise HypercallError(Errno.EINVAL, f"vCPU {target.id} is not initialised")
        bring_up(target)
        return 0
    if cmd == VcpuOp.down:
        if not any(o.online for o in dom.vcpus if o is not target):
            log.info("d%d: last vCPU going down: poweroff", dom.domid)
            dom.shutdown(ShutdownReason.poweroff)   # Xen: domain_shutdown(SHUTDOWN_poweroff)
            if target is v:
                v.engine.stop()
            return 0
        if target.online:
            target.online = False
            set_runstate(target, RunState.offline)
            if target.periodic_handle is not None:   # runs only while the vCPU is up
                target.periodic_handle.cancel()
                target.periodic_handle = None
            log.info("d%d: vcpu %d down", dom.domid, target.id)
        if target is v:
            v.engine.stop()
        return 0
    if cmd == VcpuOp.initialise:
        from . import vcpu_context
        vcpu_context.initialise(v, target, arg)
        return 0
    if cmd == VcpuOp.get_runstate_info:
        now = dom.hypervisor.system_time_ns()
        times = list(target.runstate_time)
        times[target.runstate] += now - target.runstate_entry
        v.copy_to_guest(arg, RUNSTATE_INFO.pack(int(target.runstate), target.runstate_entry, *times))
        return 0
    if cmd == VcpuOp.set_periodic_timer:
        period = int.from_bytes(v.copy_from_guest(arg, 8), "little")
        if period < timers.MIN_PERIOD_NS or period > STIME_DELTA_MAX:
            raise HypercallError(Errno.EINVAL, "period out of range")
        timers.set_periodic(target, period)
        return 0
    if cmd == VcpuOp.stop_periodic_timer:
        timers.stop_periodic(target)
        return 0
    if cmd == VcpuOp.register_vcpu_info:
        return _register_vcpu_info(v, target, arg)
    if cmd == VcpuOp.register_runstate_memory_area:
        addr = int.from_bytes(v.copy_from_guest(arg, 8), "little")
        if not _addr_ok(addr, 1):
            raise HypercallError(Errno.EFAULT)
        target.runstate_area = addr
        publish_runstate(target)
        return 0
    if cmd == VCPUOP_register_vcpu_time_memory_area:
        addr = int.from_bytes(v.copy_from_guest(arg, 8), "little")
        if not _addr_ok(addr, 1):
            raise HypercallError(Errno.EFAULT)
        target.time_area = addr
        publish_time(target)
        return 0
    if cmd == VcpuOp.get_physid:
        raise HypercallError(Errno.EINVAL, "not a hardware-domain pinned vCPU")
    if cmd == VcpuOp.send_nmi:
        return _send_nmi(v, target, arg)
    raise HypercallError(Errno.ENOSYS)


def _send_nmi(caller: "VCPU", target: "VCPU", arg: int) -> int:
    """VCPUOP_send_nmi (Xen: arch/x86/domain.c do_vcpu_op): a non-NULL argument is -EINVAL;
    else the target's NMI becomes pending (once: a second one before delivery is the same
    NMI) and the target is kicked (vcpu_kick: a block or poll ends). It is delivered, or
    dropped without a handler, at the target's next return to the guest
    (traps.deliver_nmi): for the calling vCPU itself, this hypercall's return."""
    if arg:
        raise HypercallError(Errno.EINVAL, "VCPUOP_send_nmi takes no argument")
    if not target.nmi_pending:
        target.nmi_pending = True
        target.kick()
    if target is caller and not caller.in_multicall:     # a multicall: at its return
        from . import traps
        traps.deliver_nmi_from_hypercall(caller)
    return 0
