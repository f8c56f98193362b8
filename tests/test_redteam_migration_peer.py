"""Red-team: a migration receiver that authenticates and then stops reading (a hostile or
hung peer that keeps its socket open: its kernel keeps acknowledging with a zero window,
so TCP never gives up). The sender's writes wait for the peer; without a bound on that wait
migrate() never returns, holding the guest-sized shadow copy, and if it happens during the
stop-and-copy the guest stays suspended for ever. Every wait on the peer is bounded by
IDLE_TIMEOUT, as the receiver's reads are: the migration fails with MigrationError and the
guest runs on where it was."""
from __future__ import annotations

import asyncio
import os

import pytest

from aiovmm import Hypervisor
from aiovmm.migration import live
from conftest import HV_MEMORY_MIB, guest

SECRET = b"redteam-secret-0123456789"


async def _silent_receiver(got: list[int]) -> asyncio.Server:
    """Does the receiver's half of the handshake, then reads nothing and keeps the socket."""
    held: list[asyncio.StreamWriter] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        live._bound_in_flight(w)             # the buffers the real receiver has
        nr = os.urandom(live.NONCE)
        w.write(live.MAGIC + nr)
        await w.drain()
        msg = await r.readexactly(len(live.MAGIC) + live.NONCE + live.MAC)
        ns = msg[len(live.MAGIC):len(live.MAGIC) + live.NONCE]
        w.write(live._mac(SECRET, b"receiver", ns, nr))
        await w.drain()
        got.append(1)
        held.append(w)                       # never read again, never closed by us
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    srv.held = held                          # type: ignore[attr-defined]
    return srv


async def test_a_receiver_that_stops_reading_fails_the_migration(monkeypatch):
    """(monkeypatch: IDLE_TIMEOUT 2 s instead of 30.)"""
    monkeypatch.setattr(live, "IDLE_TIMEOUT", 2.0)
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
        got: list[int] = []
        srv = await _silent_receiver(got)
        port = srv.sockets[0].getsockname()[1]
        try:
            # 4 MiB of pattern: far more than the socket buffers and the transport's limit.
            dom = await hv.create(guest("suspend"), memory_mib=16, cmdline="pages=1024 every=10")
            await dom.wait_for_line(r"uptime: ticks=10 ", 30)
            writers: list[asyncio.StreamWriter] = []
            real_open = asyncio.open_connection

            async def open_connection(*a, **kw):
                r, w = await real_open(*a, **kw)
                writers.append(w)
                return r, w
            monkeypatch.setattr(asyncio, "open_connection", open_connection)
            try:
                async with asyncio.timeout(30):          # without a bound: for ever
                    await live.migrate(dom, "127.0.0.1", port, SECRET)
            except live.MigrationError as e:
                suspended = e.source_suspended
            else:
                raise AssertionError("the migration to a peer that reads nothing succeeded")
            assert got == [1] and not suspended
            # The sender dropped what it had queued for the peer with the connection (a
            # close would keep both in this loop for as long as the peer keeps its end open).
            assert [w.transport.get_write_buffer_size() for w in writers] == [0]
            assert dom.suspended is None and not dom.dying
            assert await _ticks_on(dom, len(dom.console_lines)), dom.console_lines[-5:]
        finally:
            for w in srv.held:                           # type: ignore[attr-defined]
                w.transport.abort()
            srv.close()
            await srv.wait_closed()


async def _ticks_on(dom, n: int) -> bool:
    """The guest still runs: another uptime line within 20 s."""
    for _ in range(200):
        if any(l.startswith("uptime:") for l in dom.console_lines[n:]):
            return True
        await asyncio.sleep(0.1)
    return False


async def test_a_migration_cancelled_in_its_stop_and_copy_leaves_the_guest_running():
    """Cancelled (a daemon shutting down, the caller's task cancelled) after the guest was
    suspended and before GO: the guest is still the source's, so it must run on here as on
    any failure before the hand-over, not stay suspended for ever; the receiver drops its
    copy when the connection goes."""
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as src, Hypervisor(memory_mib=HV_MEMORY_MIB) as dst:
        rx = await live.serve(dst, "127.0.0.1", 0, SECRET)
        try:
            dom = await src.create(guest("suspend"), memory_mib=8, cmdline="pages=64 every=10")
            await dom.wait_for_line(r"uptime: ticks=10 ", 30)
            task: asyncio.Task | None = None
            phases: list[str] = []

            def progress(phase: str, _st) -> None:
                phases.append(phase)
                if phase == "final":              # suspended, whole stream written, no GO yet
                    assert dom.suspended is not None
                    task.cancel()
            task = asyncio.create_task(live.migrate(dom, "127.0.0.1", rx.port, SECRET, progress=progress))
            with pytest.raises(asyncio.CancelledError):
                await task
            assert "final" in phases
            assert dom.suspended is None and not dom.dying
            assert await _ticks_on(dom, len(dom.console_lines)), dom.console_lines[-5:]
            for _ in range(100):                  # the receiver discarded what it had built
                if not [d for d in dst.domains.values() if d.domid != 0]:
                    break
                await asyncio.sleep(0.1)
            assert not [d for d in dst.domains.values() if d.domid != 0], dst.domains
        finally:
            await rx.aclose()
