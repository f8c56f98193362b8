"""Red team: the HELD message a migration peer sends after DONE (the frames its vifs held
for the guest, live._carried_frames) is read within the bounds put_rx keeps
(HELD_BYTES and HELD_MAX per vif of the guest), not up to HELD_MAX * MAX_DEVICES frames of
RX_BUF bytes each (4 GiB) held in memory before put_rx drops them."""
from __future__ import annotations

import asyncio

from aiovmm import Hypervisor
from aiovmm.migration import devices, live
from backends.net.device import RX_BUF, VNET_HDR_LEN
from conftest import guest

SECRET = b"test-secret-0123456789"


class _Counting:
    """The receiver's StreamReader, counting the bytes it takes."""

    def __init__(self, r: asyncio.StreamReader) -> None:
        self.r, self.n = r, 0

    async def read(self, n: int = -1) -> bytes:
        data = await self.r.read(n)
        self.n += len(data)
        return data

    async def readexactly(self, n: int) -> bytes:
        data = await self.r.readexactly(n)
        self.n += n
        return data


async def test_a_peer_cannot_make_the_receiver_hold_more_than_its_vifs_keep(monkeypatch):
    # The guest has no vif: nothing the peer sends after DONE can be kept.
    frame = b"\0" * VNET_HDR_LEN + b"\x02" * 6 + b"\0" * (RX_BUF - VNET_HDR_LEN - 6)
    monkeypatch.setattr(devices, "take_held", lambda dom: [(0, frame)] * 256)  # 16 MiB
    async with Hypervisor(memory_mib=128) as src, Hypervisor(memory_mib=128) as dst:
        counting: list[_Counting] = []
        arrived: list = []

        async def handle(r, w):
            counting.append(_Counting(r))
            arrived.append(await live.receive(dst, counting[-1], w, SECRET, realtime=False))
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        try:
            dom = await src.create(guest("suspend"), memory_mib=8, cmdline="pages=64 every=10")
            await dom.wait_for_line(r"uptime: ticks=20 ", 20)
            st = await live.migrate(dom, "127.0.0.1", server.sockets[0].getsockname()[1],
                                    SECRET, realtime=False)
            async with asyncio.timeout(10):
                while not arrived:
                    await asyncio.sleep(0.01)
            assert arrived[0] is not None           # the guest arrived all the same
            await arrived[0].wait_for_line(r"suspend: resumed rc=0", 10)
            stream = len(live.MAGIC) + live.NONCE + live.MAC + st.bytes_sent + len(live.GO)
            after_done = counting[0].n - stream
            assert 0 < after_done <= live.HELD.size + live.HELD_FRAME.size, after_done
        finally:
            server.close()
            await server.wait_closed()
