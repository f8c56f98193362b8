"""netback's events and tap writes on the request/response path (issue 14, network;
bench/net_trace.py measured why): a tx-only event for small packets waits for an rx event or
its bound (TX_EVENT_DEFER_S), and is not sent at all if the frontend reaped the responses
meanwhile; large packets, TCP and a frontend far behind still get it at once; the frames of a
pass reach the writer thread together, in ring order.

The real Netback on a parked domain's ring pages, grants and event channel (a host endpoint
bound to a port the guest allocated); the tap is the host end of a SOCK_SEQPACKET pair."""
from __future__ import annotations

import asyncio
import struct

from aiovmm import Hypervisor
from aiovmm.audit import audit
from aiovmm.grants import GTF_permit_access
from aiovmm.ring import SRING_HDR
from backends.net.device import (LONE_MAX, NETIF_RSP_OKAY, TX_DEFER_MAX, TX_EVENT_DEFER_S,
                                 VNET_HDR_LEN, _RXREQ)
from backends.net.writer import TapWriter
from test_mutation_kills_net import PKT, Vif, _tcp4_frame
from test_net_writer import _recv_all, _wait


def _run(body) -> None:
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            v = Vif(hv)
            dom = v.d.dom
            gport = dom.evtchn.alloc_unbound(0)
            v.nb.port = hv.host.endpoint_bind(dom.domid, gport)
            v.gport = gport
            v.nb.defer_tx_events = True
            try:
                await body(v)
            finally:
                v.nb._cancel_tx_timer()
                v.nb._set_reader(False)
                v.nb.port.close()
                v.close()
            assert audit(hv) == []
    asyncio.run(main())


def _rsp_event(v, ring_mfn: int, value: int) -> None:
    """The frontend's rsp_event (sring offset 12): the response index it wants an event at."""
    struct.pack_into("<I", v.hv.mem.frame(ring_mfn), 12, value)


def _pending(v) -> bool:
    return v.d.dom.evtchn.is_pending(v.gport)


def _clear(v) -> None:
    """What the guest's handler does: clear the port's pending bit in shared_info."""
    from aiovmm.abi import SharedInfo
    v.d.dom.evtchn._clear_bit(SharedInfo.evtchn_pending, v.gport)


def test_small_tx_event_waits_for_its_bound_then_goes():
    """One 64-byte packet answered OKAY with the frontend asking for an event at the first
    response: no event from the pass; one after TX_EVENT_DEFER_S, as the frontend has not
    reaped it."""
    async def body(v):
        nb = v.nb
        _rsp_event(v, v.tx_mfn, 1)
        v.push((50, 0, 0, 7, len(PKT)))
        nb._pass()
        assert v.responses(1) == [(7, NETIF_RSP_OKAY)] and v.sent() == [PKT]
        assert nb.stats.events_sent == 0 and not _pending(v) and nb.stats.tx_events_deferred == 1
        await _wait(lambda: _pending(v), 2.0)
        assert nb.stats.events_sent == 1 and nb._tx_timer is None
    _run(body)


def test_no_event_when_the_frontend_reaped_meanwhile():
    """The frontend takes the response on its own (its next transmit reaps the ring and moves
    rsp_event past it) before the bound: no event at all."""
    async def body(v):
        nb = v.nb
        _rsp_event(v, v.tx_mfn, 1)
        v.push((50, 0, 0, 1, len(PKT)))
        nb._pass()
        assert nb.stats.events_sent == 0
        _rsp_event(v, v.tx_mfn, 2)                 # RING_FINAL_CHECK_FOR_RESPONSES after reaping
        await asyncio.sleep(TX_EVENT_DEFER_S * 3)
        assert nb.stats.events_sent == 0 and not _pending(v) and nb._tx_timer is None
    _run(body)


def test_large_packet_and_a_frontend_far_behind_get_the_event_at_once():
    """A packet above LONE_MAX: its completion is announced by the pass itself. So is a
    small one when more than TX_DEFER_MAX responses are unreaped."""
    async def body(v):
        nb = v.nb
        _rsp_event(v, v.tx_mfn, 1)
        big = PKT * ((LONE_MAX // len(PKT)) + 1)
        v.hv.mem.write(v.d.spare[2] << 12, big)
        v.push((50, 0, 0, 1, len(big)))
        nb._pass()
        assert nb.stats.events_sent == 1 and _pending(v) and nb.stats.tx_events_deferred == 0
        _clear(v)
        v.hv.mem.write(v.d.spare[2] << 12, PKT * 64)
        # The frontend asked at response 2 and has not reaped since: TX_DEFER_MAX small
        # packets go unannounced... and the next one is announced at once.
        _rsp_event(v, v.tx_mfn, 2)
        for i in range(TX_DEFER_MAX + 1):
            v.push((50, 0, 0, 2 + i, len(PKT)))
            nb._pass()
        assert nb.stats.events_sent == 2 and _pending(v)
    _run(body)


def test_a_small_tcp_segment_gets_its_event_at_once():
    """A 60-byte TCP segment: TCP small queues may hold the socket's next segment until
    this one is freed, so its completion is announced by the pass itself."""
    async def body(v):
        nb = v.nb
        _rsp_event(v, v.tx_mfn, 1)
        seg = _tcp4_frame(6)
        v.hv.mem.write(v.d.spare[2] << 12, seg)
        v.push((50, 0, 0, 1, len(seg)))
        nb._pass()
        assert v.sent() == [seg]
        assert nb.stats.events_sent == 1 and _pending(v) and nb.stats.tx_events_deferred == 0
    _run(body)


def test_an_rx_event_carries_the_deferred_tx_completion():
    """A small packet's event waits; a frame then delivered to a posted rx buffer sends one
    event for both rings, and the bound's timer goes with it."""
    async def body(v):
        nb, d = v.nb, v.d
        _rsp_event(v, v.tx_mfn, 1)
        _rsp_event(v, v.rx_mfn, 1)
        v.push((50, 0, 0, 1, len(PKT)))
        nb._pass()
        assert nb.stats.events_sent == 0 and nb._tx_timer is not None
        m = v.hv.mem.frame(v.rx_mfn)
        d.write_grant(100, GTF_permit_access, 0, d.spare[30])
        _RXREQ.pack_into(m, SRING_HDR, 0, 100)
        struct.pack_into("<I", m, 0, 1)
        v.out.send(bytes(VNET_HDR_LEN) + PKT)
        nb._tap_ready = True
        nb._pass()
        assert nb.stats.rx_packets == 1 and nb.stats.events_sent == 1 and _pending(v)
        assert nb._tx_timer is None
        await asyncio.sleep(TX_EVENT_DEFER_S * 3)
        assert nb.stats.events_sent == 1
    _run(body)


def test_a_pass_hands_its_frames_to_the_writer_together_in_ring_order():
    """With the writer thread serving, a pass stages every frame it copied (they count in
    the backlog at once) and hands them over at its end as one item; the thread writes them
    in ring order, each as granted, after their OKAY responses."""
    async def body(v):
        nb = v.nb
        loop = asyncio.get_running_loop()
        w = nb._writer = TapWriter(v.host.fileno(), "tb", loop, lambda: None, lambda refused: None)
        try:
            v.push(*[(50 + i, 0, 0, i, 60 + i) for i in range(5)])
            nb._pass()
            assert w._staged == [] and w.backlog() in range(0, sum(VNET_HDR_LEN + 60 + i for i in range(5)) + 1)
            assert v.responses(5) == [(i, NETIF_RSP_OKAY) for i in range(5)]
            got: list[bytes] = []
            await _wait(lambda: got.extend(_recv_all(v.out)) or len(got) == 5)
            assert [f[VNET_HDR_LEN:] for f in got] == [v.hv.mem.read(v.d.spare[2 + i] << 12, 60 + i)
                                                      for i in range(5)]
            assert w.frames == 5 and w.backlog() == 0
        finally:
            nb._writer = None
            await w.aclose()
    _run(body)
