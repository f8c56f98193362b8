"""aiovmm/ring.py: the back-end half of Xen's shared I/O rings, on a real page-sized buffer the
test writes as a frontend would. The producer index is the frontend's: one past what the
ring can hold is refused (Linux's RING_REQUEST_PROD_OVERFLOW), exactly at the bound it is not.
"""
from __future__ import annotations

import struct

import pytest

from aiovmm.ring import SRING_HDR, BackRing

NR, SLOT = 32, 112                       # blkif geometry
U32 = struct.Struct("<I")


def ring() -> tuple[BackRing, bytearray]:
    page = bytearray(4096)
    return BackRing(memoryview(page), NR, SLOT), page


def publish(page: bytearray, req_prod: int) -> None:
    U32.pack_into(page, 0, req_prod & 0xFFFFFFFF)


@pytest.mark.parametrize("start", [0, 0xFFFFFFF0])       # also across the u32 wrap
def test_producer_overflow_bound_is_exact(start):
    r, page = ring()
    r.req_cons = r.rsp_prod_pvt = start
    publish(page, start + NR)
    assert r.unconsumed() == NR                          # a full ring is fine
    publish(page, start + NR + 1)
    assert r.unconsumed() == -1                          # one more is a broken frontend
    publish(page, start + 2 * NR)
    assert r.unconsumed() == -1
    publish(page, start - 1)                             # behind the responses: huge
    assert r.unconsumed() == -1


def test_requests_in_flight_count_against_the_ring():
    """Requests consumed but not yet answered still occupy their slots: the frontend may
    publish only as many new ones as slots are free."""
    r, page = ring()
    publish(page, 10)
    for _ in range(10):
        r.take()
    assert r.unconsumed() == 0
    publish(page, NR)                                    # 22 new + 10 unanswered = 32
    assert r.unconsumed() == NR - 10
    publish(page, NR + 1)
    assert r.unconsumed() == -1
    for _ in range(10):
        r.respond_done()
    publish(page, NR + 10)
    assert r.unconsumed() == NR


def test_take_copies_the_request_once():
    r, page = ring()
    off = SRING_HDR
    page[off:off + SLOT] = bytes(range(SLOT))
    publish(page, 1)
    raw = r.take()
    page[off:off + SLOT] = bytes(SLOT)                   # the frontend rewrites it afterwards
    assert raw == bytes(range(SLOT)) and r.req_cons == 1


def test_event_index_rules():
    r, page = ring()
    U32.pack_into(page, 12, 1)                           # rsp_event: notify at the first
    r.respond_done()
    assert r.push_responses() is True
    U32.pack_into(page, 12, 5)
    r.respond_done()
    assert r.push_responses() is False                   # 2 published, wants 5
    publish(page, 0)
    assert r.final_check() is False and U32.unpack_from(page, 4)[0] == 1
    publish(page, 1)
    assert r.final_check() is True


@pytest.mark.parametrize("start", [0, 0xFFFFFFFE])       # also across the u32 wrap
def test_event_asked_after_the_push(start):
    """netback's deferred tx event: the same test over the whole range published since
    `old`, against rsp_event as the frontend left it by the time it is asked."""
    r, page = ring()
    r.req_cons = r.rsp_prod_pvt = start
    U32.pack_into(page, 8, start)
    U32.pack_into(page, 12, (start + 1) & 0xFFFFFFFF)    # the frontend wants the next one
    old = r.rsp_prod_pvt
    r.respond_done()
    r.put(8, r.rsp_prod_pvt)                             # published, not yet decided
    r.respond_done()
    r.put(8, r.rsp_prod_pvt)                             # a second push in the same range
    assert r.responses_need_event(old) is True           # nothing consumed: still wanted
    U32.pack_into(page, 12, (start + 2) & 0xFFFFFFFF)    # consumed one, wants the second
    assert r.responses_need_event(old) is True
    U32.pack_into(page, 12, (start + 3) & 0xFFFFFFFF)    # consumed both (final check)
    assert r.responses_need_event(old) is False
    U32.pack_into(page, 12, start)                       # a stale rsp_event before the range
    assert r.responses_need_event(old) is False


def test_geometry_must_fit_the_page():
    with pytest.raises(ValueError):
        BackRing(memoryview(bytearray(4096)), 64, SLOT)   # 64 * 112 > a page
    with pytest.raises(ValueError):
        BackRing(memoryview(bytearray(4096)), 24, SLOT)   # not a power of two


def test_switching_slice_end_drains_is_one_rule_for_every_backend():
    """YieldDrained (netback's and blkback's switch between draining at the domain's slice
    ends and notifications): the choice is kept while disconnected and hooked only when
    connected; switched off while connected, the drain leaves the domain's list and a pass
    runs (it arms req_event again), once; `_armed` follows."""
    import asyncio

    from aiovmm import Hypervisor, lab
    from aiovmm.ring import YieldDrained
    from backends.block.device import Blkback
    from backends.net.device import Netback
    from conftest import kernel

    assert issubclass(Netback, YieldDrained) and issubclass(Blkback, YieldDrained)

    class Backend(YieldDrained):
        def __init__(self, dom) -> None:
            self.dom, self.drain_on_yield, self.connected, self.passes = dom, True, False, 0
            self._yield_fn = self._on_yield

        def _on_yield(self) -> None:
            pass

        def _rings_connected(self) -> bool:
            return self.connected

        def _pass_soon(self) -> None:
            self.passes += 1

    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            dom = lab.park(hv, kernel(), 8, "drains").dom
            b = Backend(dom)
            b.set_drain_on_yield(True)
            assert (dom.yield_drains, b.passes, b._armed()) == ([], 0, True)
            b.connected = True
            b.set_drain_on_yield(True)
            assert (dom.yield_drains, b.passes, b._armed()) == ([b._yield_fn], 0, False)
            b.set_drain_on_yield(True)
            assert dom.yield_drains == [b._yield_fn]
            b.set_drain_on_yield(False)
            assert (dom.yield_drains, b.passes, b._armed(), b.drain_on_yield) == ([], 1, True, False)
            b.set_drain_on_yield(False)
            assert b.passes == 1
    asyncio.run(main())
