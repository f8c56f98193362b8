"""Red team (backends, 2026-12-02): a netfront that never posts rx requests held the host
kernel's memory for as long as it liked.

Netback's receive flow control leaves frames for a guest with no room in the tap's queue
(the kernel keeps queueing, nothing is read). Nothing ended the wait: a guest that stops
posting rx requests (or posts too few for the frame waiting) kept the tap's whole queue,
up to its qlen (1000) of frames, each up to 64 KiB with TSO on: measured 700 frames of 65,000
bytes (45 MB) queued on one stalled vif's tap, and still there when the run ended. Linux
netback bounds the wait (rx_drain_timeout_msecs, 10 s: "otherwise other guests' packets
can get stuck there") and drops what a stalled frontend has no room for. Here the same
bound: a frame that waited RX_DRAIN_S ends the waiting, and until the frontend takes a
frame again what the tap holds for it is read and dropped (counted), never queued.

The real Netback on a parked domain's rings (the harness of test_mutation_kills_net.py:
the tap is the host end of a SOCK_SEQPACKET pair, one frame per datagram).
"""
from __future__ import annotations

import asyncio
import select

from aiovmm import Hypervisor
from aiovmm.audit import audit
from backends.net import device
from backends.net.device import VNET_HDR_LEN
from test_mutation_kills_net import PKT, Vif, _post_rx

FRAME = bytes(VNET_HDR_LEN) + PKT


def queued(v: Vif) -> bool:
    """Does the tap (the socket pair's host end) still hold a frame for the guest?"""
    p = select.poll()
    p.register(v.host, select.POLLIN)
    return bool(p.poll(0))


async def until(cond, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def test_a_frontend_without_rx_requests_holds_no_frames_after_the_drain_time(monkeypatch):
    monkeypatch.setattr(device, "RX_DRAIN_S", 0.2)

    async def main() -> None:
        async with Hypervisor(memory_mib=64) as hv:
            v = Vif(hv)
            nb = v.nb
            nb._stop = asyncio.get_running_loop().create_future()
            try:
                for _ in range(40):
                    v.out.send(FRAME)
                nb._tap_ready = True
                nb._process_rx()                  # no rx request: the first frame waits
                assert nb._rx_len and nb.stats.rx_waits == 1 and queued(v)
                await asyncio.sleep(0.1)          # within the bound: still waiting, nothing lost
                assert nb._rx_len and queued(v) and nb.stats.rx_dropped == 0
                # The bound passes with no request posted: the waiting frame and every frame
                # the tap held for it are dropped (counted), none left queued.
                await until(lambda: not queued(v) and not nb._rx_len)
                assert nb.stats.rx_dropped == 40 and nb.stats.rx_packets == 0
                # Still no room: a frame arriving now is read and dropped too.
                v.out.send(FRAME)
                await until(lambda: nb.stats.rx_dropped == 41)
                assert not queued(v) and not nb._rx_len
                # The frontend posts a request: the next frame is delivered, and the one
                # after it waits again (flow control as before; dropped only after the bound).
                _post_rx(v, 1)
                v.out.send(FRAME)
                await until(lambda: nb.stats.rx_packets == 1)
                v.out.send(FRAME)
                v.out.send(FRAME)
                await until(lambda: nb._rx_len != 0)
                await asyncio.sleep(0.05)
                assert nb._rx_len and queued(v) and nb.stats.rx_dropped == 41
            finally:
                nb._disconnect()
                v.close()
            assert nb._rx_drain_timer is None
            assert audit(hv) == []

    asyncio.run(main())
