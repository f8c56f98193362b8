"""Xen shared I/O rings (io/ring.h), back-end side: the one implementation netback and
blkback share.

The page starts with the sring header (req_prod @0, req_event @4, rsp_prod @8, rsp_event @12,
padding to 64), then `nr_ents` slots of `slot` bytes (requests and responses share slots).
All indices are free-running u32. Everything in the page is the frontend's and untrusted:
the producer index is checked against what the ring can hold before anything is consumed
(Linux's RING_REQUEST_PROD_OVERFLOW), and requests are copied out once before use.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

from .memory import mb

SRING_HDR = 64
# Backends take a domain's requests when one of its vCPUs ends a slice (Domain.drain_backends)
# and leave req_event unarmed, so the frontend does not notify (issue 14). AIOVMM_DRAIN_ON_YIELD=0:
# notifications as before (the A/B of bench/blk.py and bench/net.py).
DRAIN_ON_YIELD = os.environ.get("AIOVMM_DRAIN_ON_YIELD", "1") != "0"


def hook_yield_drain(drains: list[Callable[[], None]], fn: Callable[[], None], on: bool) -> bool:
    """Put a backend's drain `fn` into a domain's `yield_drains` (on) or take it out, at most
    once either way, as every backend switching between slice-end drains and notifications
    must. Returns whether anything changed: a backend that has just unhooked its drain must
    run a pass, which arms req_event again, or the frontend would never notify it."""
    hooked = fn in drains
    if on and not hooked:
        drains.append(fn)
    elif not on and hooked:
        drains.remove(fn)
    else:
        return False
    return True


class YieldDrained:
    """The switch between taking a frontend's requests at its domain's slice ends and being
    notified, one rule for every backend (netback, blkback). The backend has `dom`,
    `drain_on_yield` (its choice, also while disconnected), `_yield_fn` (the one bound
    method it registers in dom.yield_drains, hooked at connect and unhooked at disconnect
    with hook_yield_drain), and says whether its rings are connected (_rings_connected)
    and how it runs a pass soon (_pass_soon)."""
    dom: Any
    drain_on_yield: bool
    _yield_fn: Callable[[], None]

    def _rings_connected(self) -> bool:
        raise NotImplementedError

    def _pass_soon(self) -> None:
        raise NotImplementedError

    def set_drain_on_yield(self, on: bool) -> None:
        """Switch between draining at the domain's slice ends and guest notifications, also
        while connected: switched off, a pass runs soon and arms req_event again, or the
        frontend would never notify."""
        self.drain_on_yield = on
        if on and not self._rings_connected():
            return                               # hooked when it connects
        if hook_yield_drain(self.dom.yield_drains, self._yield_fn, on) and not on:
            self._pass_soon()

    def _armed(self) -> bool:
        """Does the frontend have to notify (req_event armed)? Not while its domain's slice
        ends run the backend's pass."""
        return self._yield_fn not in self.dom.yield_drains


_U32 = struct.Struct("<I")
MASK32 = 0xFFFFFFFF


class BackRing:
    def __init__(self, view: memoryview, nr_ents: int, slot: int) -> None:
        if nr_ents & (nr_ents - 1) or SRING_HDR + nr_ents * slot > len(view):
            raise ValueError("ring geometry does not fit the page")
        self.v = view
        self.nr_ents = nr_ents
        self.slot = slot
        self.req_cons = 0           # next request to consume
        self.rsp_prod_pvt = 0       # next response slot to fill

    def get(self, off: int) -> int:
        return _U32.unpack_from(self.v, off)[0]

    def put(self, off: int, value: int) -> None:
        _U32.pack_into(self.v, off, value & MASK32)

    @property
    def req_prod(self) -> int:
        return self.get(0)

    def slot_off(self, idx: int) -> int:
        return SRING_HDR + (idx & (self.nr_ents - 1)) * self.slot

    def unconsumed(self) -> int:
        """Requests available, or -1 if the frontend published more requests than the ring
        has free slots (a misbehaving frontend: disconnect it)."""
        req_prod = self.get(0)
        if ((req_prod - self.rsp_prod_pvt) & MASK32) > self.nr_ents:
            return -1
        return (req_prod - self.req_cons) & MASK32

    def take(self) -> bytes:
        """Copy the next request out of shared memory (once) and consume it."""
        off = self.slot_off(self.req_cons)
        raw = bytes(self.v[off:off + self.slot])
        self.req_cons = (self.req_cons + 1) & MASK32
        return raw

    def next_response_off(self) -> int:
        """Offset of the next response slot; call respond_done() after filling it."""
        return self.slot_off(self.rsp_prod_pvt)

    def respond_done(self) -> None:
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & MASK32

    def push_responses(self) -> bool:
        """Publish responses; True if the frontend asked to be notified (event index)."""
        old = self.get(8)
        self.put(8, self.rsp_prod_pvt)
        mb()                                       # RING_PUSH_RESPONSES_AND_CHECK_NOTIFY's
        return self.responses_need_event(old)

    def responses_need_event(self, old: int) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY's test for the responses published after
        `old` up to rsp_prod_pvt: does the frontend's rsp_event fall in (old, new]? Asked
        later than the push (netback's deferred tx event), a frontend that has consumed
        them all has moved rsp_event beyond `new` and wants no event."""
        new = self.rsp_prod_pvt
        return ((new - self.get(12)) & MASK32) < ((new - old) & MASK32)

    def final_check(self) -> bool:
        """Ask to be notified of the next request; True if one already arrived."""
        self.put(4, self.req_cons + 1)
        mb()                                       # RING_FINAL_CHECK_FOR_REQUESTS's
        return ((self.get(0) - self.req_cons) & MASK32) != 0

    def more_requests(self, arm: bool) -> bool:
        """After a pass: True if requests arrived meanwhile. `arm`: also ask for a
        notification of the next one (final_check). A backend that drains at its domain's
        slice ends (Domain.yield_drains) does not arm: requests can only be published by the
        guest's vCPUs, inside slices, and every slice end runs its pass. req_event then stays
        where it was, behind req_prod, and RING_PUSH_REQUESTS_AND_CHECK_NOTIFY finds no
        notification wanted (a frontend that notifies anyway is still served)."""
        if arm:
            return self.final_check()
        return ((self.get(0) - self.req_cons) & MASK32) != 0
