"""Real-time priority for the parts of a migration or restore that are the guest's downtime."""
from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("aiovmm.migration")

REALTIME_PRIORITY = 1                   # SCHED_FIFO's lowest: above every normal task, below
REALTIME_LIMIT_S = 0.5                  # the kernel's own threads; never longer than this
# The budget across boosts (RealTime._grant): at most BUDGET_S of boosted time at once,
# earned back at BUDGET_RATE seconds per second. A migration's boosts come to about
# REALTIME_LIMIT_S (its pre-copy rounds' waits and the hand-over); without a budget a peer
# with the migration secret re-armed one per record pair (PRECOPY_ROUND_END, PAGE_DATA) or
# per connection (STOP_AND_COPY) and kept the guest-running loop at SCHED_FIFO for good.
BUDGET_S = 4 * REALTIME_LIMIT_S
BUDGET_RATE = 0.2


class _Limit:
    """One thread per process that drops the boost when its deadline passes: made on first
    use (RealTime()), which is before a downtime, so that starting a boost costs a notify
    and not a thread creation (~200 us measured here)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadline: float | None = None
        threading.Thread(target=self._run, name="aiovmm-rt-limit", daemon=True).start()

    def arm(self, seconds: float) -> None:
        with self._cond:
            self._deadline = time.monotonic() + seconds
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._deadline is None or self._deadline > time.monotonic():
                    self._cond.wait(None if self._deadline is None
                                    else self._deadline - time.monotonic())
                self._deadline = None
            RealTime._restore()               # outside the condition: start() arms under
                                              # RealTime._lock, which _restore takes


_limit: _Limit | None = None
_limit_lock = threading.Lock()


def _the_limit() -> _Limit:
    global _limit
    with _limit_lock:
        if _limit is None:
            _limit = _Limit()
        return _limit


class RealTime:
    """The loop thread at real-time priority (SCHED_FIFO) for the stop-and-copy, so that
    the guest's downtime is the CPU time the hand-over needs and not that plus the time
    the thread waits for a core. Used by live migration (sender: suspend to DONE;
    receiver: end of stream to DONE) and by the restore of a save file (the whole restore:
    the guest is down until it ends). Measured on 2 cores shared by ~8 busy processes: the
    downtime was 2-5 times the CPU time spent in it; with this, close to 1 time.

    Nested uses (sender and receiver in one process) share one boost: the first sets it,
    the last restores the thread's own policy. It is dropped after REALTIME_LIMIT_S
    whatever happens (a receiver that never answers must not leave a guest-running loop
    at real-time priority; the kernel's RT throttling is the last line behind that), and
    all boosts of the process together spend one budget (_grant: BUDGET_S, earned back at
    BUDGET_RATE), so that no sequence of them (a migration peer's records or connections)
    keeps the loop boosted. The
    limit is kept by a thread (_Limit), not by a loop timer: part of the downtime's work is
    synchronous and sized by the guest (the final scan of its pages, the pinning of its
    tables), and a loop timer would wait for the next await. It is the loop thread's
    alone: threads created during it start at normal priority (SCHED_RESET_ON_FORK).
    Without the privilege (CAP_SYS_NICE) it does nothing."""

    _depth = 0
    _saved: tuple[int, os.sched_param] | None = None
    _tid = 0                            # the boosted thread (the loop's)
    _others: dict[int, tuple[int, os.sched_param]] = {}   # also(): thread id -> its policy
    _lock = threading.Lock()            # _Limit's thread drops the boost too
    _budget = BUDGET_S                  # seconds of boost left (_grant), as of _budget_at
    _budget_at = 0.0
    _since = 0.0                        # time.monotonic() the current boost started

    def __init__(self, enabled: bool = True, limit_s: float = REALTIME_LIMIT_S) -> None:
        self.enabled = enabled
        self.limit_s = limit_s              # at most REALTIME_LIMIT_S (a nested start: the
                                            # first one's limit holds)
        self._started = False
        self._limit = _the_limit() if enabled else None

    @property
    def active(self) -> bool:
        return RealTime._saved is not None

    def start(self) -> None:
        if self._limit is None or self._started:
            return
        self._started = True
        with RealTime._lock:
            grant = RealTime._grant(min(self.limit_s, REALTIME_LIMIT_S)) \
                if RealTime._depth == 0 else 0.0
            if grant > 0:
                try:
                    saved = (os.sched_getscheduler(0), os.sched_getparam(0))
                    # SCHED_RESET_ON_FORK: a thread created meanwhile (an executor's or
                    # blkback's pool worker made on first use) starts at normal priority
                    # instead of inheriting the boost and keeping it after it is dropped.
                    os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK,
                                          os.sched_param(REALTIME_PRIORITY))
                    RealTime._saved, RealTime._tid = saved, threading.get_native_id()
                    RealTime._since = time.monotonic()
                    self._limit.arm(grant)
                except OSError as e:
                    log.debug("no real-time priority for the stop-and-copy: %s", e)
            RealTime._depth += 1

    def also(self, tids: list[int]) -> None:
        """Boost these threads of the process with the loop's, for as long as its boost
        lasts (the same limit drops both): threads the guest's downtime waits for, which
        at normal priority waited for a core behind the other processes while the loop
        had one (the source's tap writers with the suspended guest's last frames, the
        destination's with its first replies). A no-op when the loop is not boosted."""
        with RealTime._lock:
            if RealTime._saved is None:
                return
            for tid in tids:
                if tid in RealTime._others or tid == RealTime._tid:
                    continue
                try:
                    saved = (os.sched_getscheduler(tid), os.sched_getparam(tid))
                    os.sched_setscheduler(tid, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK,
                                          os.sched_param(REALTIME_PRIORITY))
                except OSError as e:          # the thread has ended
                    log.debug("thread %d not boosted: %s", tid, e)
                    continue
                RealTime._others[tid] = saved

    def stop(self) -> None:
        """Idempotent; a no-op if start() was not called."""
        if not self._started:
            return
        self._started = False
        with RealTime._lock:
            RealTime._depth -= 1
            last = RealTime._depth == 0
        if last:
            self._limit.disarm()
            RealTime._restore()

    @staticmethod
    def _grant(want: float) -> float:
        """The one budget across all boosts of the process (under _lock): how long the
        next one may last, at most `want` and what is left of BUDGET_S after the boosts
        so far (earned back at BUDGET_RATE per second); 0: none now. _restore charges
        each boost's time."""
        now = time.monotonic()
        if RealTime._budget_at:
            RealTime._budget = min(BUDGET_S, RealTime._budget
                                   + (now - RealTime._budget_at) * BUDGET_RATE)
        RealTime._budget_at = now
        return min(want, RealTime._budget) if RealTime._budget >= 0.001 else 0.0

    @staticmethod
    def _restore() -> None:
        """The boosted thread's own policy back (from that thread, or from _Limit's)."""
        with RealTime._lock:
            if RealTime._saved is None:
                return
            (policy, param), tid = RealTime._saved, RealTime._tid
            RealTime._saved = None
            RealTime._grant(0.0)              # earned up to now, then this boost charged
            RealTime._budget -= time.monotonic() - RealTime._since
            others, RealTime._others = RealTime._others, {}
            try:
                os.sched_setscheduler(tid, policy, param)
            except OSError as e:              # it was allowed a moment ago
                log.error("cannot restore the loop thread's scheduling policy: %s", e)
            for t, (policy, param) in others.items():
                try:
                    os.sched_setscheduler(t, policy, param)
                except OSError as e:          # the thread has ended meanwhile
                    log.debug("thread %d: policy not restored: %s", t, e)
