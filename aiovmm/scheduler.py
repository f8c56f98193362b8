"""vCPU scheduling on the asyncio loop, and sched_op.

Each vCPU is an asyncio task that runs a slice (a block budget enforced by the C hook),
then yields to the loop. Blocked vCPUs await an event and cost nothing. Slices run on the
loop thread itself: measured, a slice of BUDGET_BLOCKS takes ~0.3-2 ms, which bounds timer
latency; the hook callbacks (hypercalls, faults) touch hypervisor state and must run on the
loop anyway (docs/design.md explains the choice).

`Scheduler` is the seam for the credit scheduler (weights and caps per domain, later issue):
it decides each slice's budget and what happens between slices.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .abi import SCHED_POLL, Errno, SchedOp, ShutdownReason
from .errors import HypercallError

if TYPE_CHECKING:
    from .vcpu import VCPU

log = logging.getLogger("aiovmm.scheduler")

BUDGET_BLOCKS = 20_000
SLICE_NS = 2_000_000          # wall-time bound of a slice (hypercall-heavy guests)


class Scheduler:
    """Round-robin over runnable vCPUs, one slice each (FIFO order of the loop). A slice
    ends after BUDGET_BLOCKS translated blocks or SLICE_NS of wall time, whichever first."""

    def __init__(self, budget_blocks: int = BUDGET_BLOCKS, slice_ns: int = SLICE_NS) -> None:
        self.budget_blocks = budget_blocks
        self.slice_ns = slice_ns

    def budget(self, v: "VCPU") -> int:
        return self.budget_blocks

    async def yield_point(self, v: "VCPU") -> None:
        await asyncio.sleep(0)


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
            v.poll_timeout_handle = asyncio.get_running_loop().call_later(
                max(0, timeout - now) / 1e9, v.end_poll)
        v.blocked = True
        v._wake.clear()
        v.engine.stop()
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
