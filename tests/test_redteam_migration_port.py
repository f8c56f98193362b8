"""Red team: the migration port is anyone's to connect to. Connections that never
authenticate are each held for AUTH_TIMEOUT; at most MAX_INCOMING at once
(live.Receiver._handle)."""
from __future__ import annotations

import asyncio

from aiovmm import Hypervisor
from aiovmm.migration import live

SECRET = b"test-secret-0123456789"


async def test_idle_unauthenticated_connections_take_at_most_max_incoming_sockets():
    """Anyone who can reach the migration port: connections that never authenticate are
    held for AUTH_TIMEOUT each; beyond MAX_INCOMING at once they are closed at once (each
    one held a socket of the hypervisor's process: its descriptors were anyone's)."""
    async with Hypervisor(memory_mib=128) as dst:
        rx = await live.serve(dst, "127.0.0.1", 0, SECRET)
        conns = []
        try:
            for _ in range(64):
                conns.append(await asyncio.open_connection("127.0.0.1", rx.port))
            await asyncio.sleep(0.3)
            open_ = 0
            for r, _w in conns:
                try:
                    async with asyncio.timeout(0.05):
                        data = await r.read(4096)           # the receiver's hello
                        while data:
                            data = await r.read(4096)
                except TimeoutError:
                    open_ += 1                              # still held by the receiver
                except ConnectionError:
                    pass
            assert open_ <= live.MAX_INCOMING, open_
        finally:
            for _r, w in conns:
                w.close()
            await rx.aclose()
