"""vCPU scheduling on the asyncio loop: Xen's credit scheduler, and sched_op.

Each vCPU is an asyncio task that runs a slice (a block budget or a wall-time bound enforced
by the engine), then yields to the loop. Slices run on the loop thread itself, so the loop is
one physical CPU: at most one vCPU runs at a time, and the scheduler decides which one runs
next and for how long. The vCPU tasks ask it (`acquire` before a slice, `release` after);
the engine (Unicorn or KVM) does not matter, only the measured time of each slice.

The policy is Xen's credit scheduler (xen/common/sched/credit.c), adapted to one CPU:
- every domain has a weight (default 256) and a cap (percent of one CPU, 0 = none);
- every ACCT_NS (30 ms, 3 ticks of 10 ms) the CPU time the active vCPUs burnt is handed out
  again as credit in proportion to weight (zero-sum, as on Xen where a period's credit
  equals the CPU time there is: here the loop also spends time outside slices, so the time
  actually burnt is what is distributed);
- a slice debits its thread CPU time (wall time minus what the host gave to other threads
  meanwhile) from the vCPU's credit at once (Xen's burn_credits);
- priority: BOOST (woken from block while UNDER, kept until it has run one tick), UNDER
  (credit >= 0), OVER (credit < 0); FIFO within a priority; OVER vCPUs run when nothing else
  wants the CPU (work-conserving);
- a capped domain may use cap% of each period's wall time in CPU time; a vCPU that used it
  up is parked (not queued at all) until the next accounting period (Xen parks and unparks
  in csched_acct);
- a blocked vCPU is in no queue and has no timer: it costs nothing.

Accounting a user sees (per vCPU, `VcpuSched`): CPU time in slices, run-queue wait (time
runnable but not running: Xen's RUNSTATE_runnable, which guests see as steal), and host steal
(wall time of slices the host did not give this thread: wall minus thread CPU time).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import logging
import os
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Iterable

from .abi import SCHED_POLL, Errno, SchedOp, ShutdownReason
from .errors import HypercallError

if TYPE_CHECKING:
    from .domain import Domain
    from .vcpu import VCPU

log = logging.getLogger("aiovmm.scheduler")

BUDGET_BLOCKS = 200_000       # compute-bound slices end on SLICE_NS (fewer slice entries)
SLICE_NS = 2_000_000          # wall-time bound of a slice (timer and I/O latency of others)
TICK_NS = 10_000_000          # CSCHED_MSECS_PER_TICK
ACCT_NS = 3 * TICK_NS         # CSCHED_TICKS_PER_ACCT ticks
MIN_SLICE_NS = 100_000        # a capped vCPU's last slice of a period is at least this
DEFAULT_WEIGHT = 256          # CSCHED_DEFAULT_WEIGHT
MAX_WEIGHT = 65535
SETTLE_ITERATIONS = 4         # loop turns a CPU-bound vCPU grants I/O before its slice
IO_ACTIVE_NS = 100_000_000    # ... while some vCPU woke from block this recently
CREDIT_BOUND_NS = ACCT_NS     # |credit| is clamped here (Xen: credits_per_tslice)
TSLICE_NS = 30_000_000        # Xen's sched_credit_tslice_ms: a slice nothing else waits for


class Pri(enum.IntEnum):
    """Xen's CSCHED_PRI_TS_*: higher runs first."""
    BOOST = 0
    UNDER = -1
    OVER = -2


@dataclasses.dataclass(slots=True)
class DomainSched:
    """Per-domain parameters (xl sched-credit) and the cap's budget for this period."""
    weight: int = DEFAULT_WEIGHT
    cap: int = 0                          # percent of one CPU, 0 = uncapped
    cap_left_ns: int = 0                  # CPU time the domain may still use this period


def validate_params(weight: int | None, cap: int | None, nr_vcpus: int = 1) -> None:
    """The one check of weight and cap (library, xl.cfg, control plane): Xen's
    csched_dom_cntl accepts weight 1..65535 and cap 0..100*nr_vcpus."""
    if weight is not None and not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be 1..{MAX_WEIGHT}")
    if cap is not None and not 0 <= cap <= 100 * max(1, nr_vcpus):
        raise ValueError(f"cap must be 0..{100 * max(1, nr_vcpus)} (percent of one CPU)")


@dataclasses.dataclass(slots=True, eq=False)
class VcpuSched:
    """Per-vCPU scheduler state and accounting."""
    credit_ns: int = 0
    pri: Pri = Pri.UNDER
    boost_run_ns: int = 0                 # run since boosted (boost ends after one tick)
    parked: bool = False
    active: bool = False                  # burnt CPU since the last accounting
    burnt_ns: int = 0                     # since the last accounting
    queued: bool = False
    enq_ns: int = 0
    waiter: asyncio.Future | None = None
    # Accounting (nanoseconds).
    cpu_ns: int = 0                       # wall time of its slices
    wait_ns: int = 0                      # runnable, waiting in the run queue
    host_steal_ns: int = 0                # slice wall time the host gave to other threads
    slices: int = 0
    long_slices: int = 0                  # of `slices`: lengthened, nothing else waited (begin)
    long_ns: int = 0                      # the running slice's lengthened bound, 0 = none
    _t0: int = 0
    _c0: int = 0


class Scheduler:
    """Xen's credit scheduler over the one CPU the event loop is (module docstring)."""

    def __init__(self, budget_blocks: int = BUDGET_BLOCKS, slice_ns: int = SLICE_NS,
                 tslice_ns: int = TSLICE_NS) -> None:
        self.budget_blocks = budget_blocks
        self.slice_ns = slice_ns
        self.tslice_ns = tslice_ns            # a lone vCPU's slice (_lengthen); <= slice_ns: never
        self.current: "VCPU | None" = None
        self.queues: dict[Pri, collections.deque] = {p: collections.deque() for p in
                                                    sorted(Pri, reverse=True)}
        self.parked: set["VCPU"] = set()
        self.active: set["VCPU"] = set()
        self._acct_handle: asyncio.TimerHandle | None = None
        self._period_start = 0
        self._last_wake_ns = -IO_ACTIVE_NS
        self.periods = 0
        self._loop_poll: select.poll | None = None   # the loop's own epoll fd (_watch_loop)
        self._watched_loop = None
        self._io_watch: _IoWatch | None = None
        self.loop_cuts = 0                    # lengthened slices cut: the loop had work (loop_waits)

    # -- parameters -----------------------------------------------------------------------------
    @staticmethod
    def dom_state(dom: "Domain") -> DomainSched:
        st = getattr(dom, "sched", None)
        if st is None:
            st = dom.sched = DomainSched()
        return st

    @staticmethod
    def state(v: "VCPU") -> VcpuSched:
        st = getattr(v, "sched", None)
        if st is None:
            st = v.sched = VcpuSched()
        return st

    def set_params(self, dom: "Domain", weight: int | None = None, cap: int | None = None) -> DomainSched:
        """Set weight and/or cap at run time; takes effect from the next slice."""
        validate_params(weight, cap, len(dom.vcpus))
        ds = self.dom_state(dom)
        if weight is not None:
            ds.weight = weight
        if cap is not None:
            if cap and not ds.cap:
                ds.cap_left_ns = cap * ACCT_NS // 100
            ds.cap = cap
            if not cap:
                for v in list(self.parked):
                    if v.domain is dom:
                        self._unpark(v)
        log.info("d%d: sched-credit weight=%d cap=%d", dom.domid, ds.weight, ds.cap)
        return ds

    # -- the protocol the vCPU tasks follow -------------------------------------------------------
    def budget(self, v: "VCPU") -> int:
        s = self.state(v)
        if s.long_ns:
            return self.budget_blocks * (s.long_ns // self.slice_ns)
        return self.budget_blocks

    def slice_for(self, v: "VCPU") -> int:
        """Wall-time bound of v's next slice: a capped domain gets no more than its cap's
        remaining budget this period, so the cap is not overshot by a whole slice; a slice
        nothing else waits for is lengthened (begin, _lengthen)."""
        ds = self.dom_state(v.domain)
        if ds.cap:
            return max(MIN_SLICE_NS, min(self.slice_ns, ds.cap_left_ns))
        return self.state(v).long_ns or self.slice_ns

    def slice_left(self, v: "VCPU") -> int:
        """What is left of v's running slice (begin() to its bound, slice_for), in ns: the
        wall-time bound of its next engine run (vcpu.py runs the engine again inside one
        slice after a timer of its own ended a run)."""
        return self.slice_for(v) - (time.perf_counter_ns() - self.state(v)._t0)

    def goes_on(self, v: "VCPU", min_ns: int) -> bool:
        """Between two engine runs of v's slice: True if at least min_ns of it is left, and
        for a lengthened slice, if the loop has no I/O ready (loop_waits): the slice holds
        the loop thread, and what the scheduler does not see (a frame on a blocked guest's
        tap, a worker thread's block completion, a control-plane request) would otherwise
        wait up to TSLICE_NS, where Xen preempts the guest for the woken vCPU at once
        (csched_unit_wake boosts it, __runq_tickle). The I/O watcher (_IoWatch) ends the
        engine run when the loop's epoll fd turns readable inside a lengthened slice."""
        s = self.state(v)
        if s.long_ns and self.loop_waits():
            self.loop_cuts += 1
            return False
        return self.slice_left(v) >= min_ns

    def loop_waits(self) -> bool:
        """True if the event loop has I/O ready: its epoll fd is readable (an fd it watches
        is ready, or its self-pipe/eventfd was written by call_soon_threadsafe). One
        poll(2) with no timeout; False if the loop's epoll fd was not found (_watch_loop)."""
        return bool(self._loop_poll is not None and self._loop_poll.poll(0))

    def close(self) -> None:
        """Stop the I/O watcher thread (Hypervisor.__aexit__)."""
        if self._io_watch is not None:
            self._io_watch.close()
            self._io_watch = None
        self._loop_poll, self._watched_loop = None, None

    async def _watch_loop(self) -> None:
        """Find the running loop's epoll fd once per loop (asyncio's selector loop and
        uvloop alike: neither exposes it, so a socket is registered with the loop, and the
        eventpoll fd of this process whose /proc fdinfo lists it is the loop's)."""
        loop = asyncio.get_running_loop()
        if self._watched_loop is loop:
            return
        self._watched_loop, self._loop_poll = loop, None
        a, b = socket.socketpair()
        try:
            loop.add_reader(a.fileno(), lambda: None)
            try:
                await asyncio.sleep(0)                  # uvloop adds it at its next poll
                fd = _epoll_watching(a.fileno())
            finally:
                loop.remove_reader(a.fileno())
        finally:
            a.close()
            b.close()
        if fd is None:
            log.warning("the event loop's epoll fd was not found: lengthened slices do not "
                        "see its I/O")
            return
        self._loop_poll = select.poll()
        self._loop_poll.register(fd, select.POLLIN)
        if self._io_watch is not None:
            self._io_watch.close()
        self._io_watch = _IoWatch(fd)

    def _lengthen(self, v: "VCPU") -> int:
        """The bound of v's slice when nothing else waits for the CPU, else 0 (slice_ns).

        Xen's credit scheduler runs a vCPU for its whole time slice (sched_credit_tslice_ms,
        30 ms) when no other vCPU is runnable on its pCPU, and preempts it early only when
        one wakes (csched_unit_wake's tickle). Here a slice end costs a KVM exit and a loop
        turn (~100 us), and slice_ns (2 ms) is the latency bound of everything else on the
        loop, so a slice is lengthened (to tslice_ns) only while nothing else is known to
        wait: no other vCPU runnable (queued, or woken and not yet queued) or parked (a
        cap's), none woke from block within IO_ACTIVE_NS (I/O-driven guests, whose
        backends run on the loop between slices), and the slice ends before another vCPU's
        timer (singleshot, periodic, poll timeout) falls due, so that vCPU wakes on time.
        One that wakes during the slice cuts it back to slice_ns (unblocked); I/O the loop
        has ready (an fd it watches, a worker thread's call_soon_threadsafe) ends it
        (_IoWatch, goes_on), and none is lengthened while some is ready. Not seen: other
        loop timers (a backend's timer, the control plane's timeouts), which wait up to
        tslice_ns while a lone vCPU computes (tests/test_sched_tslice.py,
        tests/test_redteam_tslice_loop.py; bench/tslice.py measures what it saves,
        bench/tslice_bystander.py a bystander's round trip)."""
        if self.tslice_ns <= self.slice_ns or self.dom_state(v.domain).cap or self.parked \
                or self._io_active() or any(self.queues.values()) or self.loop_waits():
            return 0
        from .timers import next_wakeup_ns
        hv = v.domain.hypervisor
        now = hv.system_time_ns()
        until = self.tslice_ns
        for dom in hv.domains.values():
            for o in dom.vcpus:
                if o is v:
                    continue
                if self._wants_cpu(o, self.state(o)):
                    return 0            # runnable, on its way to a queue (a task not yet run)
                due = next_wakeup_ns(o)
                if due is not None:
                    until = min(until, due - now)
        return until if until > self.slice_ns else 0

    def unblocked(self, v: "VCPU") -> None:
        """v stops blocking (an event, the end of a poll, unpause, online): as Xen's
        vcpu_wake tickles the pCPU, a running slice that was lengthened only because nothing
        else waited is cut back to slice_ns from its start, and no slice is lengthened while
        vCPUs wake (IO_ACTIVE_NS). Called from inside a slice's handler or between slices."""
        self._last_wake_ns = time.perf_counter_ns()
        cur = self.current
        if cur is None or cur is v:
            return
        s = self.state(cur)
        if s.long_ns and s._t0:
            s.long_ns = 0
            cur.engine.cut_slice(max(1, self.slice_ns - (time.perf_counter_ns() - s._t0)))

    def woke(self, v: "VCPU") -> None:
        """v became runnable after blocking: Xen boosts it if it is UNDER (csched_unit_wake),
        so an I/O-bound vCPU runs ahead of CPU hogs."""
        s = self.state(v)
        self._last_wake_ns = time.perf_counter_ns()
        if s.pri == Pri.UNDER:
            s.pri = Pri.BOOST
            s.boost_run_ns = 0

    async def acquire(self, v: "VCPU") -> None:
        """Wait until v may run its next slice (it then owns the CPU until release()).

        Backends run on this same loop, so an I/O round trip is a chain of callbacks (tap
        readable -> netback -> event channel -> vCPU wake), one loop iteration per link, and
        a CPU-bound slice would run in each iteration. While vCPUs are waking for I/O, a
        non-boosted vCPU that got the CPU first lets the loop turn SETTLE_ITERATIONS times,
        and hands the CPU over if a vCPU was boosted meanwhile: the nearest thing to Xen's
        preemption of the running vCPU by a boosted one (a slice cannot be interrupted by
        I/O here, the loop is busy running it)."""
        s = self.state(v)
        self._ensure_ticking()
        if self._watched_loop is not asyncio.get_running_loop():
            await self._watch_loop()
        if s.parked:
            await self._wait_unparked(v, s)
        if self.current is not v:             # release() may have kept the CPU for it
            await self._take(v, s, front=False)
        if s.pri == Pri.BOOST or not (self._io_active() or self.loop_waits()):
            return
        try:
            for _ in range(SETTLE_ITERATIONS):
                await asyncio.sleep(0)
                if self.queues[Pri.BOOST] and self.current is v:
                    self.current = None
                    self._dispatch()
                    await self._take(v, s, front=True)
        except asyncio.CancelledError:
            if self.current is v:
                self.current = None
                self._dispatch()
            raise

    def _io_active(self) -> bool:
        return time.perf_counter_ns() - self._last_wake_ns < IO_ACTIVE_NS

    async def _wait_unparked(self, v: "VCPU", s: VcpuSched) -> None:
        from .vcpu_op import RunState, set_runstate
        set_runstate(v, RunState.runnable)
        t = time.perf_counter_ns()
        fut = s.waiter = asyncio.get_running_loop().create_future()
        try:
            await fut
        finally:
            s.waiter = None
            s.wait_ns += time.perf_counter_ns() - t

    async def _take(self, v: "VCPU", s: VcpuSched, front: bool) -> None:
        """Queue v at its priority (at the head if `front`) until _dispatch() grants it."""
        from .vcpu_op import RunState, set_runstate
        if self.current is None and not any(self.queues.values()):
            self.current = v
            return
        fut = asyncio.get_running_loop().create_future()
        s.waiter = fut
        s.queued = True
        s.enq_ns = time.perf_counter_ns()
        q = self.queues[s.pri]
        q.appendleft(v) if front else q.append(v)
        set_runstate(v, RunState.runnable)
        try:
            await fut
        except asyncio.CancelledError:
            if s.queued:
                s.queued = False
                self.queues[s.pri].remove(v)
            elif self.current is v:
                self.current = None
                self._dispatch()
            raise
        finally:
            s.waiter = None
            s.wait_ns += time.perf_counter_ns() - s.enq_ns

    def begin(self, v: "VCPU") -> None:
        """v's slice starts (vcpu.py: right after acquire, before its due timers and event
        bounces, which are charged to it as Xen charges from the context switch in)."""
        s = self.state(v)
        s.long_ns = self._lengthen(v)
        if s.long_ns:
            s.long_slices += 1
            if self._io_watch is not None and not v.engine.threaded:
                # (a vCPU thread's runs do not hold the loop: nothing to watch for)
                self._io_watch.arm(v.engine)
        s._t0 = time.perf_counter_ns()
        s._c0 = time.thread_time_ns()

    def release(self, v: "VCPU") -> None:
        """Right after v's slice (or after acquire when v no longer wants to run): charge
        the slice and hand the CPU to the next vCPU."""
        s = self.state(v)
        if self._io_watch is not None:
            self._io_watch.disarm()           # also when unblocked() cut the slice back
        s.long_ns = 0
        if s._t0:
            wall = time.perf_counter_ns() - s._t0
            cpu = time.thread_time_ns() - s._c0
            s._t0 = 0
            self._charge(v, s, wall, max(0, wall - cpu))
        if self.current is v:
            self.current = None
        if self._wants_cpu(v, s):
            best = next((p for p, q in self.queues.items() if q), None)
            if best is None or s.pri > best:
                self.current = v              # it still outranks every waiter
                return
        self._dispatch()

    def sleep(self, v: "VCPU") -> None:
        """v stops wanting the CPU (blocked, paused, offline) before its next acquire()."""
        if self.current is v:
            self.current = None
            self._dispatch()

    @staticmethod
    def _wants_cpu(v: "VCPU", s: VcpuSched) -> bool:
        d = v.domain
        return not (v.blocked or not v.online or d.paused or d.dying or s.parked)

    def forget(self, v: "VCPU") -> None:
        """v's task ends (domain destroyed): drop it from every queue."""
        s = self.state(v)
        if s.queued:
            s.queued = False
            try:
                self.queues[s.pri].remove(v)
            except ValueError:
                pass
        self.parked.discard(v)
        self.active.discard(v)
        if self.current is v:
            self.current = None
            self._dispatch()

    # Compatibility with the former seam (subclasses overriding these still work).
    async def yield_point(self, v: "VCPU") -> None:
        await asyncio.sleep(0)

    # -- internals ------------------------------------------------------------------------------------
    def _charge(self, v: "VCPU", s: VcpuSched, wall: int, steal: int) -> None:
        """Debit the slice's thread CPU time (wall minus host steal): what the vCPU got of
        the loop. A slice the host preempted lasts tens of ms of wall time; charged in wall
        time, every vCPU's credit sat at -CREDIT_BOUND_NS on a host at load ~14 and 256:512
        ran 1:1.2-1.6 (tests/test_sched.py)."""
        used = wall - steal
        s.cpu_ns += wall
        s.host_steal_ns += steal
        s.slices += 1
        s.burnt_ns += used
        s.credit_ns = max(-CREDIT_BOUND_NS, s.credit_ns - used)
        if not s.active:
            s.active = True
            self.active.add(v)
        if s.pri == Pri.BOOST:
            s.boost_run_ns += used
            if s.boost_run_ns >= TICK_NS:        # consuming CPU, not waiting for I/O
                s.pri = Pri.UNDER
        if s.pri != Pri.BOOST:
            s.pri = Pri.UNDER if s.credit_ns >= 0 else Pri.OVER
        ds = self.dom_state(v.domain)
        if ds.cap:
            ds.cap_left_ns -= used
            if ds.cap_left_ns <= 0:
                self._park(v, s)

    def _park(self, v: "VCPU", s: VcpuSched) -> None:
        if not s.parked:
            s.parked = True
            self.parked.add(v)
            log.debug("d%d: vcpu %d parked (cap %d%% used up)", v.domain.domid, v.id,
                      self.dom_state(v.domain).cap)

    def _unpark(self, v: "VCPU") -> None:
        s = self.state(v)
        s.parked = False
        self.parked.discard(v)
        if s.waiter is not None and not s.queued and not s.waiter.done():
            s.waiter.set_result(None)         # back to acquire(), which queues it

    def _dispatch(self) -> None:
        if self.current is not None:
            return
        for q in self.queues.values():
            while q:
                w = q.popleft()
                s = self.state(w)
                s.queued = False
                if s.waiter is None or s.waiter.done():
                    continue
                self.current = w
                s.waiter.set_result(None)
                return

    def _ensure_ticking(self) -> None:
        if self._acct_handle is None:
            loop = asyncio.get_running_loop()
            self._period_start = time.perf_counter_ns()
            self._acct_handle = loop.call_later(ACCT_NS / 1e9, self._acct)

    def _acct(self) -> None:
        """Every accounting period (Xen's csched_acct): hand the CPU time burnt in the period
        back out as credit by weight among the active vCPUs, refill caps, unpark. Stops
        itself when nothing ran (idle guests cost no timer)."""
        now = time.perf_counter_ns()
        period = now - self._period_start
        self._period_start = now
        self.periods += 1
        active = [v for v in self.active if not v.domain.dying]
        burnt = sum(self.state(v).burnt_ns for v in active)
        weights = {v: self.dom_state(v.domain).weight for v in active}
        total_w = sum(weights.values())
        for v in active:
            s = self.state(v)
            share = burnt * weights[v] // total_w if total_w else 0
            s.credit_ns = max(-CREDIT_BOUND_NS, min(CREDIT_BOUND_NS, s.credit_ns + share))
            if s.pri != Pri.BOOST:
                s.pri = Pri.UNDER if s.credit_ns >= 0 else Pri.OVER
            # Idle for a whole period (burnt nothing and does not want the CPU): leaves the
            # active set. A runnable vCPU that only waited stays: on a loaded host a period
            # often holds one slice, and the waiter dropped out of every other period's
            # hand-out (each vCPU got back what it burnt: 256:512 ran ~1:1.4).
            if not s.burnt_ns and not self._wants_cpu(v, s):
                s.active = False
                self.active.discard(v)
                s.credit_ns = s.credit_ns // 2 if s.credit_ns > 0 else s.credit_ns
            s.burnt_ns = 0
        seen: set[int] = set()
        for v in list(self.parked) + active:
            dom = v.domain
            if id(dom) in seen:
                continue
            seen.add(id(dom))
            ds = self.dom_state(dom)
            if ds.cap:
                # Debt carries over (a slice may overshoot), credit does not accumulate.
                ds.cap_left_ns = min(0, ds.cap_left_ns) + ds.cap * period // 100
        for v in list(self.parked):
            if v.domain.dying or self.dom_state(v.domain).cap_left_ns > 0 or not self.dom_state(v.domain).cap:
                self._unpark(v)
        if self.active or self.parked or self.current is not None or any(self.queues.values()):
            self._acct_handle = asyncio.get_running_loop().call_later(ACCT_NS / 1e9, self._acct)
        else:
            self._acct_handle = None

    # -- views ------------------------------------------------------------------------------------------
    def vcpu_seconds(self, v: "VCPU") -> float:
        return self.state(v).cpu_ns / 1e9

    def accounting(self, v: "VCPU") -> dict:
        """What vcpu-list, list -l and /metrics show for one vCPU."""
        s = self.state(v)
        return {"cpu_ns": s.cpu_ns, "wait_ns": s.wait_ns, "host_steal_ns": s.host_steal_ns,
                "slices": s.slices, "credit_ns": s.credit_ns, "pri": s.pri.name,
                "parked": s.parked}

    def domain_cpu_ns(self, vcpus: Iterable["VCPU"]) -> int:
        return sum(self.state(v).cpu_ns for v in vcpus)


class _IoWatch:
    """A thread that ends a lengthened slice's engine run when the loop's epoll fd turns
    readable (Scheduler.goes_on then ends the slice): while a slice is armed (begin), it
    waits in poll(2) on that fd and its own pipe; otherwise on the pipe only. Nothing runs
    per slice but arm()/disarm() (a lock, one pipe write), and no kick is sent while no
    I/O comes (then one per slice, sticky: engine.interrupted) (tests/test_redteam_tslice_loop.py; bench/tslice.py C: a kick every SLICE_NS
    of a lengthened slice instead cost the CPU-bound guest 21 %)."""

    def __init__(self, epfd: int) -> None:
        self._epfd = epfd
        self._lock = threading.Lock()
        self._engine = None                   # the armed slice's engine until interrupted
        self._armed = None                    # the armed slice's engine until disarm
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closed = False
        self.kicks = 0
        self._thread = threading.Thread(target=self._run, name="aiovmm-iowatch", daemon=True)
        self._thread.start()

    def arm(self, engine) -> None:
        with self._lock:
            if self._armed is not None:
                self._armed.interrupted = False
            engine.interrupted = False
            self._engine = self._armed = engine
        self._wake()

    def disarm(self) -> None:
        """After this returns no interrupt is sent for the slice that was armed, and its
        engine's `interrupted` is cleared: the next slice, lengthened or not, runs."""
        with self._lock:
            if self._armed is not None:
                self._armed.interrupted = False
            self._engine = self._armed = None

    def close(self) -> None:
        with self._lock:
            if self._armed is not None:
                self._armed.interrupted = False
            self._engine = self._armed = None
            self._closed = True
        self._wake()
        self._thread.join()
        os.close(self._r)
        os.close(self._w)

    def _wake(self) -> None:
        try:
            os.write(self._w, b"w")
        except BlockingIOError:               # a wake-up already waits in the pipe
            pass

    def _run(self) -> None:
        # SCHED_FIFO's lowest priority, as the stop-and-copy's (migration/priority.py): a
        # normal thread woke 5-20 ms late on this 2-core host at load 8, most of a long
        # slice. It cannot spin: it interrupts an armed slice once, and waits on its pipe
        # alone while none is armed.
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(1))
        except OSError as e:
            log.debug("I/O watcher at normal priority: %s", e)
        idle, armed = select.poll(), select.poll()
        idle.register(self._r, select.POLLIN)
        armed.register(self._r, select.POLLIN)
        armed.register(self._epfd, select.POLLIN)
        while True:
            with self._lock:
                if self._closed:
                    return
                watching = self._engine is not None
            evs = dict((armed if watching else idle).poll())
            if evs.get(self._r):
                try:
                    os.read(self._r, 4096)
                except BlockingIOError:
                    pass
            ev = evs.get(self._epfd, 0)
            if ev & (select.POLLNVAL | select.POLLERR):
                return                        # the loop's epoll fd is gone
            if ev & select.POLLIN:
                with self._lock:
                    if self._engine is not None:
                        # Sticky for the slice (engine.interrupted): a kick landing between
                        # two engine runs (the vCPU's own timer events) ends the next run.
                        self._engine.interrupt()
                        self._engine = None
                        self.kicks += 1


def _epoll_watching(fd: int) -> int | None:
    """The eventpoll fd of this process that watches `fd` (/proc/self/fdinfo's tfd lines)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/self/fdinfo/{name}") as f:
                if any(l.startswith("tfd:") and int(l.split()[1]) == fd for l in f):
                    return int(name)
        except (OSError, ValueError, IndexError):
            continue
    return None


# ------------------------------------------------------------------------------- sched_op
def _shutdown(v: "VCPU", reason: int, start_info_mfn: int = 0) -> None:
    try:
        r = ShutdownReason(reason)
    except ValueError:
        raise HypercallError(Errno.EINVAL, f"bad shutdown reason {reason}")
    if r == ShutdownReason.suspend:
        from .migration.suspend import guest_suspend
        if guest_suspend(v, start_info_mfn):       # the toolstack asked: the domain waits
            return
    v.domain.shutdown(r)
    v.engine.stop()


def do_sched_op(v: "VCPU", cmd: int, arg: int, a3: int = 0, *_) -> int:
    if cmd == SchedOp.yield_:
        v.engine.stop()                     # end the slice; the task yields to the loop
        return 0
    if cmd == SchedOp.block:
        v.upcall_mask = 0
        if not v.upcall_pending:
            v.block()
        return 0
    if cmd == SchedOp.shutdown:
        reason = int.from_bytes(v.copy_from_guest(arg, 4), "little")
        _shutdown(v, reason, a3)
        return 0
    if cmd == SchedOp.shutdown_code:
        reason = int.from_bytes(v.copy_from_guest(arg, 4), "little")
        v.domain.shutdown_code = reason
        return 0
    if cmd == SchedOp.poll:
        ports_va, nr, timeout = v.read_struct(arg, SCHED_POLL)
        if nr > 128:
            raise HypercallError(Errno.EINVAL)
        raw = v.copy_from_guest(ports_va, 4 * nr)
        ports = [int.from_bytes(raw[4 * i:4 * i + 4], "little") for i in range(nr)]
        ch = v.domain.evtchn
        for p in ports:
            if not 0 <= p < ch.nr_ports:
                raise HypercallError(Errno.EINVAL)
            if ch.is_pending(p):
                return 0
        v.polling = frozenset(ports)
        if timeout:
            now = v.domain.hypervisor.system_time_ns()
            v.poll_deadline_ns = timeout
            v.poll_timeout_handle = asyncio.get_running_loop().call_later(
                max(0, timeout - now) / 1e9, v.end_poll)
        v.block()                # Xen's do_poll: vcpu_block, its runstate `blocked`
        return 0
    if cmd == SchedOp.remote_shutdown:
        raise HypercallError(Errno.EPERM)
    if cmd == SchedOp.watchdog:
        raise HypercallError(Errno.ENOSYS)
    raise HypercallError(Errno.ENOSYS)


def do_sched_op_compat(v: "VCPU", cmd: int, arg: int, *_) -> int:
    if cmd == SchedOp.shutdown:
        _shutdown(v, arg)
        return 0
    if cmd in (SchedOp.yield_, SchedOp.block):
        return do_sched_op(v, cmd, 0)
    raise HypercallError(Errno.ENOSYS)
