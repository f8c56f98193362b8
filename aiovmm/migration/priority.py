"""Real-time priority for the parts of a migration or restore that are the guest's downtime."""
from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger("aiovmm.migration")

REALTIME_PRIORITY = 1                   # SCHED_FIFO's lowest: above every normal task, below
REALTIME_LIMIT_S = 0.5                  # the kernel's own threads; never longer than this


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
    at real-time priority; the kernel's RT throttling is the last line behind that). It
    is the loop thread's alone: threads created during it start at normal priority.
    Without the privilege (CAP_SYS_NICE) it does nothing."""

    _depth = 0
    _saved: tuple[int, os.sched_param] | None = None

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._timer: asyncio.TimerHandle | None = None

    @property
    def active(self) -> bool:
        return RealTime._saved is not None

    def start(self) -> None:
        if not self.enabled or self._timer is not None:
            return
        if RealTime._depth == 0:
            try:
                saved = (os.sched_getscheduler(0), os.sched_getparam(0))
                # SCHED_RESET_ON_FORK: a thread created meanwhile (an executor's or blkback's
                # pool worker made on first use) starts at normal priority instead of
                # inheriting the boost and keeping it after the boost is dropped here.
                os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK,
                                      os.sched_param(REALTIME_PRIORITY))
                RealTime._saved = saved
            except OSError as e:
                log.debug("no real-time priority for the stop-and-copy: %s", e)
        RealTime._depth += 1
        self._timer = asyncio.get_running_loop().call_later(REALTIME_LIMIT_S, RealTime._restore)

    def stop(self) -> None:
        """Idempotent; a no-op if start() was not called."""
        if self._timer is None:
            return
        self._timer.cancel()
        self._timer = None
        RealTime._depth -= 1
        if RealTime._depth == 0:
            RealTime._restore()

    @staticmethod
    def _restore() -> None:
        if RealTime._saved is not None:
            policy, param = RealTime._saved
            RealTime._saved = None
            try:
                os.sched_setscheduler(0, policy, param)
            except OSError as e:              # it was allowed a moment ago
                log.error("cannot restore the loop thread's scheduling policy: %s", e)
