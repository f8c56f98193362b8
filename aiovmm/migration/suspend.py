"""Xen's cooperative suspend of a PV guest.

The toolstack writes "suspend" to the guest's control/shutdown; the guest (watching it)
acknowledges by clearing the node, quiesces its devices, unmaps shared_info and its grant
frames, and calls SCHEDOP_shutdown(SHUTDOWN_suspend) with the MFN of its start_info page in
RDX (Linux's HYPERVISOR_suspend, mini-os's). On Xen the domain then sits in the shutdown
state "suspended" until the toolstack saves and destroys it, or resumes it: with 1 in RAX
(a cancelled suspend, XEN_DOMCTL_resumedomain) when the kernel declared
XEN_ELFNOTE_SUSPEND_CANCEL, otherwise as if it had been restored (0).

Here a suspend only takes effect while the toolstack asked for one (`request()`); a guest
suspending on its own keeps the old behaviour (the domain ends with reason suspend).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..abi import Errno
from ..errors import HypercallError
from ..xenbus import Watch, read_str

if TYPE_CHECKING:
    from ..domain import Domain
    from ..vcpu import VCPU

log = logging.getLogger("aiovmm.migration")

# How long a guest gets to suspend before the request is withdrawn: libxl waits 60 s
# (libxl_dom_suspend.c, the guest_timeout). Linux's suspend runs in stop_machine across
# all its vCPUs; with 2 vCPUs on the emulated engine at host load ~15 it took over 10 s.
DEFAULT_SUSPEND_TIMEOUT = 60.0


class SuspendError(Exception):
    """The guest did not suspend (no answer, bad start_info frame, it died)."""


@dataclass(frozen=True)
class Suspended:
    """What the guest handed over when it suspended (validated), and which vCPU made the
    SCHEDOP_shutdown(suspend) (its hypercall returns 0 or 1 on resume)."""
    start_info_pfn: int
    start_info_mfn: int
    vcpu: int = 0


def guest_suspend(v: "VCPU", start_info_mfn: int) -> bool:
    """Called from SCHEDOP_shutdown(SHUTDOWN_suspend). Returns False when no suspend was
    requested (the caller then shuts the domain down as before). The start_info MFN is
    checked once here and kept: it must be one of the domain's own P2M frames."""
    dom = v.domain
    fut: asyncio.Future | None = getattr(dom, "suspend_waiter", None)
    if fut is None or fut.done():
        return False
    mem = dom.mem
    pfn = mem.m2p[start_info_mfn] if mem.valid_mfn(start_info_mfn) else -1
    if not (start_info_mfn in dom.frames and 0 <= pfn < dom.nr_pages and dom.p2m[pfn] == start_info_mfn):
        log.warning("d%d: suspend with start_info mfn %#x the domain does not own", dom.domid,
                    start_info_mfn)
        fut.set_exception(SuspendError(
            f"d{dom.domid}: guest suspended with start_info frame {start_info_mfn:#x} it does not own"))
        raise HypercallError(Errno.EINVAL, "start_info frame not owned")
    dom.paused = True                  # every vCPU waits at the top of its run loop
    dom.suspended = Suspended(pfn, start_info_mfn, v.id)
    log.info("d%d (%s): suspended (start_info pfn %#x)", dom.domid, dom.name, pfn)
    fut.set_result(dom.suspended)
    v.engine.stop()
    return True


def _acknowledged(st, path: str) -> bool:
    """libxl's domain_suspend_pvcontrol_acked: the guest has taken the request once the
    node no longer reads "suspend" (Linux and mini-os clear it before they suspend)."""
    return read_str(st, path, "") != "suspend"


async def _first(*aws) -> None:
    """Wait until the first of `aws` (futures or coroutines) is done; the rest are
    cancelled (coroutines) or left alone (futures owned by others)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    own = [t for t, a in zip(tasks, aws) if t is not a]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in own:
            t.cancel()
        if own:
            await asyncio.gather(*own, return_exceptions=True)


async def suspend(dom: "Domain", timeout: float = DEFAULT_SUSPEND_TIMEOUT) -> Suspended:
    """Ask the guest to suspend through xenstore and wait until it has, in libxl's two
    steps (libxl_dom_suspend.c): up to `timeout` for the guest to acknowledge the request
    (clear control/shutdown), then up to `timeout` again, from the acknowledgement, for
    its SCHEDOP_shutdown(suspend). A guest that never acknowledges has the request
    withdrawn (control/shutdown cleared); either way SuspendError says which step failed:
    a kernel that took the request and then gave up (Linux when its freezer times out:
    "do_suspend: freeze processes failed") is not one that ignores control/shutdown."""
    if dom.dying:
        raise SuspendError(f"d{dom.domid} is not running ({dom.describe_end()})")
    if getattr(dom, "suspended", None) is not None:
        return dom.suspended
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()
    dom.suspend_waiter = fut
    st = dom.hypervisor.xenstore.store
    path = f"/local/domain/{dom.domid}/control/shutdown"
    st.write(path, "suspend")
    watch = Watch(st, path)
    acked = False
    try:
        try:
            async with asyncio.timeout(timeout):
                while not (fut.done() or dom.done.done()):
                    if _acknowledged(st, path):
                        acked = True
                        break
                    await _first(watch.next(), fut, dom.done)
        except TimeoutError:
            raise SuspendError(f"d{dom.domid}: guest did not suspend: it did not acknowledge the "
                               f"request within {timeout:g} s (does its kernel watch "
                               "control/shutdown?)") from None
        if acked:
            log.info("d%d: guest acknowledged the suspend request", dom.domid)
            try:
                async with asyncio.timeout(timeout):
                    await _first(fut, dom.done)
            except TimeoutError:
                raise SuspendError(f"d{dom.domid}: guest did not suspend within {timeout:g} s of "
                                   "acknowledging the request (its own suspend failed or "
                                   "stalled; its console may say why)") from None
        if fut.done():
            return fut.result()
        raise SuspendError(f"d{dom.domid} ended ({dom.describe_end()}) instead of suspending")
    finally:
        watch.close()
        dom.suspend_waiter = None
        if not fut.done():
            fut.cancel()
            if not dom.dying and st.exists(path) and not _acknowledged(st, path):
                st.write(path, "")


def resume_cancelled(dom: "Domain") -> None:
    """Resume a suspended domain in place (the save failed, or a checkpoint was taken):
    SCHEDOP_shutdown returns 1 to a kernel that declared SUSPEND_CANCEL. Xen's slow path
    for other kernels (reset the domain's event channels and return 0, as after a restore)
    is not implemented: such a kernel also gets 1 and a warning is logged."""
    if getattr(dom, "suspended", None) is None or dom.dying:
        return
    if not getattr(dom, "suspend_cancel", False):
        log.warning("d%d: kernel does not declare SUSPEND_CANCEL; resumed with 1 anyway", dom.domid)
    dom.vcpus[dom.suspended.vcpu].engine.set_rax(1)
    dom.suspended = None
    log.info("d%d (%s): suspend cancelled, resumed", dom.domid, dom.name)
    dom.unpause()
