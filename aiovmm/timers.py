"""Time: pvclock, wall clock, and the per-vCPU timers (set_timer_op; vcpu_op.py uses them).

The guest TSC is the hypervisor's system time in nanoseconds (RDTSC is hooked, see
vcpu_engine.py), so the pvclock parameters are constant: tsc_to_system_mul = 2^31 with
tsc_shift = +1 is exactly 1 ns per tick, tsc_timestamp = system_time = 0. A guest computing
`system_time + ((tsc - tsc_timestamp) << 1) * mul >> 32` gets the hypervisor's clock exactly,
and the fields never need rewriting (they stay valid across slices, blocks and migrations).

Timers are event-loop timers; on expiry they raise VIRQ_TIMER on the vCPU. A vCPU's slice runs
on the loop thread, where no loop timer fires until it ends, so a slice is also cut at the
vCPU's next timer deadline and the timers due then are run before the guest is entered again
(`run_due`, `slice_until`; a timer armed from inside the slice cuts it: engine.cut_slice), as
Xen's timer interrupt preempts the guest at the deadline, but never sooner than TIMER_SLOP_NS
after the timers last ran (Xen's timer_slop: `_preempt_in`). A tick left to the end of a 2 ms
slice came up to 2 ms late, and Linux's sched_clock_local() holds local_clock() at the last
tick + TICK_NSEC (4 ms) until the next tick comes (until its late_initcall marks sched_clock
stable): printk stamped different boot lines with one timestamp (tests/test_timer_late.py).
"""
from __future__ import annotations

import asyncio
import enum
import logging
import struct
from typing import TYPE_CHECKING

from .abi import (
    SharedInfo, VcpuInfo, Virq, XEN_PVCLOCK_TSC_STABLE_BIT,
)
from .errors import HypercallError

if TYPE_CHECKING:
    from .vcpu import VCPU
    from .domain import Domain

log = logging.getLogger("aiovmm.timers")

TSC_MUL = 1 << 31
TSC_SHIFT = 1
_TIME_INFO = struct.Struct("<I4xQQIbB2x")
DEFAULT_PERIOD_NS = 10_000_000        # Xen arms a 10 ms periodic timer for PV vCPUs
MIN_PERIOD_NS = 1_000_000
FAR_FUTURE_NS = 1 << 50              # set_timer_op: 2^50 ns or more ahead is a wrap ...
HUGE_TIMEOUT_NS = 100_000_000         # ... answered with an event in 100 ms (Xen)


def _version_begin(buf, off: int) -> int:
    """Xen's version_update_begin: the u32 counter at `off` becomes odd (an update is in
    progress). It starts from what the guest left there (the page is the guest's to write),
    so it wraps at 2^32 as Xen's uint32_t does; returns the odd value written."""
    ver = ((struct.unpack_from("<I", buf, off)[0] + 1) | 1) & 0xFFFFFFFF
    struct.pack_into("<I", buf, off, ver)
    return ver


def _version_end(buf, off: int, ver: int) -> None:
    """Xen's version_update_end: even again (0 after 0xffffffff), the update is complete."""
    struct.pack_into("<I", buf, off, (ver + 1) & 0xFFFFFFFF)


def write_pvclock(v: "VCPU") -> None:
    """Publish vcpu_time_info with Xen's version protocol (odd while writing)."""
    m = v.domain.mem
    a = v.info_maddr + VcpuInfo.time
    ver = _version_begin(m.map, a)
    params = getattr(v.engine, "pvclock_params", None)      # engines whose guest TSC is real
    stamp, sys_ns, mul, shift = (params(v.domain.hypervisor.system_time_ns) if params
                                 else (0, 0, TSC_MUL, TSC_SHIFT))
    _TIME_INFO.pack_into(m.map, a, ver, stamp, sys_ns, mul, shift, XEN_PVCLOCK_TSC_STABLE_BIT)
    _version_end(m.map, a, ver)


def write_wallclock(dom: "Domain") -> None:
    """Unix time at system time 0, with the wc_version protocol."""
    m = dom.mem
    base = dom.shared_info_maddr
    boot_unix_ns = dom.hypervisor.boot_unix_ns
    sec, nsec = divmod(boot_unix_ns, 1_000_000_000)
    ver = _version_begin(m.map, base + SharedInfo.wc_version)
    struct.pack_into("<III", m.map, base + SharedInfo.wc_sec, sec & 0xFFFFFFFF, nsec, sec >> 32)
    _version_end(m.map, base + SharedInfo.wc_version, ver)


def _fire(v: "VCPU") -> None:
    if not v.domain.dying:
        v.domain.evtchn.send_virq(Virq.TIMER, v.id)


def _delay_s(v: "VCPU", deadline_ns: int) -> float:
    return max(0, deadline_ns - v.domain.hypervisor.system_time_ns()) / 1e9


class EngineTimerOp(enum.IntEnum):
    """The last singleshot-timer change an engine made itself (PVState.sshot_op; csrc/kvm.c
    fast_vcpu_op): none, set at PVState.sshot_deadline, or stop."""
    none = 0
    set = 1
    stop = 2


def _arm_singleshot(v: "VCPU", expires_ns: int) -> None:
    """Xen's set_timer(&v->singleshot_timer, expires) with s_time_t `expires`: a deadline not
    in the future fires at once (Xen's timer softirq runs it before the guest is entered
    again, so the event is delivered on the hypercall's return); else an event-loop timer,
    which also fires while the vCPU is blocked or descheduled."""
    stop_singleshot(v)
    now = v.domain.hypervisor.system_time_ns()
    if expires_ns <= now:
        _fire(v)
        return
    v.singleshot_deadline_ns = expires_ns
    v.singleshot_handle = asyncio.get_running_loop().call_later(
        (expires_ns - now) / 1e9, _singleshot_expired, v)
    v.engine.cut_slice(_preempt_in(expires_ns, now))   # armed from inside the running slice


def vcpuop_set_singleshot(v: "VCPU", timeout_ns: int) -> None:
    """VCPUOP_set_singleshot_timer (Xen's common_vcpu_op): the flags are ignored (Xen 4.18
    dropped VCPU_SSHOTTMR_future's -ETIME); the u64 timeout is Xen's s_time_t expiry, so one
    of 2^63 or more is in the past, as is one below now: the event is sent at once. No
    100 ms clamp for huge timeouts here: that is set_timer_op's Linux workaround."""
    _arm_singleshot(v, timeout_ns - (1 << 64) if timeout_ns >= 1 << 63 else timeout_ns)


def _singleshot_expired(v: "VCPU") -> None:
    if v.engine.in_flight and v.pv.sshot_op != EngineTimerOp.none:
        # The vCPU, running on its engine's thread meanwhile (kvm_engine VCPU_THREAD), moved or
        # stopped this timer in C: Python applies that at the run's end (the handle goes then).
        return
    v.singleshot_handle = None
    _fire(v)


def stop_singleshot(v: "VCPU") -> None:
    """Stop the singleshot timer; a change an engine recorded and Python has not applied yet
    (apply_engine_singleshot) is older than this one and is dropped."""
    v.pv.sshot_op = EngineTimerOp.none
    if v.singleshot_handle is not None:
        v.singleshot_handle.cancel()
        v.singleshot_handle = None


def apply_engine_singleshot(v: "VCPU") -> None:
    """The singleshot change the engine completed itself (the KVM engine's C loop: a
    VCPUOP_set/stop_singleshot_timer it took without Python), onto the event-loop timer that
    owns it. Called whenever Python takes the engine's completed hypercalls (hypercall.py
    completed_elsewhere: at every slice end that had any, before the loop runs a callback, so
    a timer the guest moved or stopped never fires from its old deadline). Only the last
    change counts: each one replaces the timer whole. The deadline is re-read from the
    PVState here once; C accepted only one in the future (it may have passed since: then it
    fires now, as the loop timer would have)."""
    pv = v.pv
    op = pv.sshot_op
    if op == EngineTimerOp.set:
        _arm_singleshot(v, pv.sshot_deadline)      # clears sshot_op (stop_singleshot)
    elif op == EngineTimerOp.stop:
        stop_singleshot(v)
    elif op != EngineTimerOp.none:
        pv.sshot_op = EngineTimerOp.none
        log.error("d%d: vcpu %d: unknown engine timer op %d", v.domain.domid, v.id, op)


def set_periodic(v: "VCPU", period_ns: int) -> None:
    """VCPUOP_set_periodic_timer (and the 10 ms default every PV vCPU starts with), as Xen's
    vcpu_set_periodic_timer: the new period is measured from the vCPU's last periodic event,
    so the first event comes at once if a whole period has passed since then (at once for a
    vCPU that never had one), else when it has."""
    stop_periodic(v)
    v.periodic_ns = period_ns
    if period_ns:
        _periodic_work(v)


def _periodic_work(v: "VCPU") -> None:
    """Xen's vcpu_periodic_timer_work: if a period has passed since the last event, send one
    and re-arm one period from now (not from when it was due: a late tick moves the phase,
    and missed ticks are not made up); a timer that fired early re-arms for the due time."""
    now = v.domain.hypervisor.system_time_ns()
    nxt = v.periodic_last_ns + v.periodic_ns
    if now >= nxt:
        _fire(v)
        v.periodic_last_ns = now
        nxt = now + v.periodic_ns
    v.periodic_next_ns = nxt
    v.periodic_handle = asyncio.get_running_loop().call_later((nxt - now) / 1e9, _periodic_expired, v)
    v.engine.cut_slice(_preempt_in(nxt, now))


def _periodic_expired(v: "VCPU") -> None:
    v.periodic_handle = None
    if v.periodic_ns:
        _periodic_work(v)


def stop_periodic(v: "VCPU") -> None:
    if v.periodic_handle is not None:
        v.periodic_handle.cancel()
        v.periodic_handle = None
    v.periodic_ns = 0


TIMER_SLOP_NS = 50_000                 # Xen's timer_slop (common/timer.c, default 50 us)


def _preempt_in(deadline_ns: int, now: int) -> int:
    """How long the guest runs before a timer due at `deadline_ns` preempts it: until the
    deadline, but at least TIMER_SLOP_NS. Xen's timer_softirq_action programs the timer
    hardware at MAX(deadline, now + timer_slop) each time it has run the due timers (also
    right after set_timer moved the earliest deadline: it raises the softirq, which runs
    before the return to the guest). Without that floor a guest re-arming a short timer from
    its handler was preempted before the first instruction after the hypercall, since the
    hypercall and the slice's turnaround here cost more than the timer's period: the timer
    was due again at every slice start and the guest never left its handler
    (tests/test_traps.py, the fault_storm guest's 50 us timer, never powering off)."""
    return max(TIMER_SLOP_NS, deadline_ns - now)


def run_due(v: "VCPU") -> int | None:
    """Right before the vCPU is entered (vcpu.py), as Xen's timer softirq before its return
    to the guest: run its timers whose deadline has passed (their loop timers have not fired
    yet: the slice that reached the deadline held the loop thread). Returns the system time of
    the next deadline of an armed timer, or None; `slice_until` ends the slice there."""
    now = v.domain.hypervisor.system_time_ns()
    if v.singleshot_handle is not None and v.singleshot_deadline_ns <= now:
        v.singleshot_handle.cancel()
        _singleshot_expired(v)
    if v.periodic_handle is not None and v.periodic_next_ns <= now:
        v.periodic_handle.cancel()
        _periodic_expired(v)
    due = [t for h, t in ((v.singleshot_handle, v.singleshot_deadline_ns),
                          (v.periodic_handle, v.periodic_next_ns)) if h is not None]
    return min(due) if due else None


def next_wakeup_ns(v: "VCPU") -> int | None:
    """System time of the earliest armed timer that raises an event for v or ends its
    SCHEDOP_poll (singleshot, periodic, poll timeout), or None: how long another vCPU's
    slice may run before v is due (scheduler._lengthen)."""
    due = [t for h, t in ((v.singleshot_handle, v.singleshot_deadline_ns),
                          (v.periodic_handle, v.periodic_next_ns),
                          (v.poll_timeout_handle, v.poll_deadline_ns)) if h is not None]
    return min(due) if due else None


def slice_until(v: "VCPU", due: int | None, slice_ns: int) -> int:
    """The wall-time bound of the slice about to run: `slice_ns`, cut at the deadline `due`
    (run_due's, Xen system time, which is CLOCK_MONOTONIC as the engines' slice deadlines),
    taken as late as possible so the slice ends at the deadline itself, and never sooner
    than Xen's timer_slop after the timers ran (`_preempt_in`; a shorter `slice_ns` stays)."""
    if due is None:
        return slice_ns
    return min(slice_ns, _preempt_in(due, v.domain.hypervisor.system_time_ns()))


# ---------------------------------------------------------------------------- hypercalls
def do_set_timer_op(v: "VCPU", timeout: int, *_) -> int:
    """Xen's do_set_timer_op: 0 stops the singleshot timer; a timeout wrapped negative (2^63
    or more as s_time_t) or 2^50 ns or more in the future is Linux's jiffy wrap (or "no timer
    at all" from old guests): an event in 100 ms; else the timer at `timeout` (at once if
    already passed)."""
    timeout &= (1 << 64) - 1
    if timeout == 0:
        stop_singleshot(v)
        return 0
    now = v.domain.hypervisor.system_time_ns()
    if timeout >= 1 << 63 or timeout - now >= FAR_FUTURE_NS:
        _arm_singleshot(v, now + HUGE_TIMEOUT_NS)
    else:
        _arm_singleshot(v, timeout)
    return 0
