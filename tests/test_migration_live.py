"""Live migration between two hypervisors over loopback TCP (aiovmm/migration/live.py):
the guest's uptime counter and memory checksum carry on at the destination, the source is
gone; a wrong secret is refused before any stream byte is parsed; the connection cut in
each phase leaves the source running and nothing at the destination."""
from __future__ import annotations

import asyncio
import re

import pytest

from aiovmm import Hypervisor
from aiovmm.migration import live
from conftest import ENGINES, HV_MEMORY_MIB, guest

pytestmark = ENGINES
SECRET = b"test-secret-0123456789"


def uptime(dom) -> tuple[int, str]:
    for line in reversed(dom.console_lines):
        m = re.fullmatch(r"uptime: ticks=(\d+) sum=(0x[0-9a-f]+)", line)
        if m:
            return int(m.group(1)), m.group(2)
    raise AssertionError(dom.console_lines[-5:])


@pytest.fixture
async def pair(engine):
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as src, \
            Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as dst:
        if engine == "kvm":          # Xen-area frames KVM allocates once per hypervisor
            from aiovmm.kvm_engine import ring0
            ring0(dst.xen)
        arrived = []
        rx = await live.serve(dst, "127.0.0.1", 0, SECRET, arrived.append)
        try:
            yield src, dst, rx, arrived
        finally:
            await rx.aclose()


async def _guest(hv, cmdline="pages=64 every=10"):
    dom = await hv.create(guest("suspend"), memory_mib=8, cmdline=cmdline)
    await dom.wait_for_line(r"uptime: ticks=20 ", 20)
    return dom


async def test_live_migration_carries_on(pair):
    src, dst, rx, arrived = pair
    dom = await _guest(src)
    before = dst.mem.free_frames
    st = await live.migrate(dom, "127.0.0.1", rx.port, SECRET, downtime_ms=30)
    t, s = uptime(dom)
    await asyncio.wait([dom.task])
    assert dom.dying and dom.domid not in src.domains and dom.destroyed
    assert len(arrived) == 1 and arrived[0].domid == st.domid
    new = arrived[0]
    await new.wait_for_line(r"suspend: resumed rc=0", 10)
    await new.wait_for_line(rf"uptime: ticks={t + 20} ", 10)
    assert uptime(new)[1] == s
    assert st.rounds >= 1 and st.pages_sent >= dom.nr_pages
    assert st.pages_sent <= 1.3 * dom.nr_pages, st
    assert 0 < st.downtime_ms < 2000
    assert dst.mem.free_frames < before
    new.shutdown()


async def test_live_migration_two_vcpus(pair):
    """A guest whose vCPU 1 counts in r12 and xmm3 (suspend.c smp=1) migrates live: the
    same stream as a save, so vCPU 1 arrives online with its registers, counting on from
    the count in its memory; vCPU 0's uptime and checksum carry on."""
    from test_migration import smp_uptime
    src, dst, rx, arrived = pair
    dom = await src.create(guest("suspend"), memory_mib=8, cmdline="pages=64 every=10 smp=1", vcpus=2)
    await dom.wait_for_line(r"uptime: ticks=20 .* ap=[1-9]", 30)
    st = await live.migrate(dom, "127.0.0.1", rx.port, SECRET, downtime_ms=30)
    t, s, ap, bad = smp_uptime(dom)
    await asyncio.wait([dom.task])
    assert dom.destroyed and len(arrived) == 1 and arrived[0].domid == st.domid
    new = arrived[0]
    assert [v.online for v in new.vcpus] == [True, True]
    await new.wait_for_line(rf"uptime: ticks={t + 20} ", 20)
    t2, s2, ap2, bad2 = smp_uptime(new)
    assert s2 == s and bad == bad2 == 0 and ap2 > ap, (ap, ap2, bad2)
    new.shutdown()


async def test_wrong_secret_refused_before_parsing(pair):
    src, dst, rx, arrived = pair
    dom = await _guest(src)
    free = dst.mem.free_frames
    with pytest.raises(live.AuthError):
        await live.migrate(dom, "127.0.0.1", rx.port, b"not-the-secret-at-all")
    assert not dom.dying and arrived == [] and dst.mem.free_frames == free and not dst.domains
    t, _ = uptime(dom)
    await dom.wait_for_line(rf"uptime: ticks={t + 10} ", 10)
    dom.shutdown()


class CutProxy:
    """Forwards sender -> receiver until `limit` bytes went through, then drops both
    connections (the receiver's answers pass untouched)."""

    def __init__(self, port: int, limit: int) -> None:
        self.port, self.limit, self.passed = port, limit, 0
        self.tasks: set = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, r, w) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.port)

        async def up() -> None:
            while self.passed < self.limit:
                data = await r.read(min(65536, self.limit - self.passed))
                if not data:
                    break
                self.passed += len(data)
                uw.write(data)
                await uw.drain()

        async def down() -> None:
            while data := await ur.read(65536):
                w.write(data)
                await w.drain()
        t = asyncio.ensure_future(down())
        try:
            await up()
        finally:
            t.cancel()
            await asyncio.gather(t, return_exceptions=True)
            for x in (w, uw):
                x.close()

    async def aclose(self) -> None:
        self.server.close()


@pytest.mark.parametrize("cut", [10, 100, 5000, 200_000, -8])
async def test_connection_cut_leaves_source_running(pair, cut):
    """Cut during the handshake (10, 100), in the head or round 0 (5000, 200000), and just
    before the last bytes of the stream (-8: END missing)."""
    src, dst, rx, arrived = pair
    dom = await _guest(src)
    if cut < 0:                  # measure the stream once to cut near its end
        probe = await _guest(src)
        st = await live.migrate(probe, "127.0.0.1", rx.port, SECRET)
        arrived.pop().shutdown()
        cut = st.bytes_sent + 16 + 32 + 32 + cut - 64        # within the tail
    free = dst.mem.free_frames
    await asyncio.sleep(0.1)
    free = dst.mem.free_frames
    proxy = CutProxy(rx.port, cut)
    port = await proxy.start()
    try:
        with pytest.raises(live.MigrationError) as ei:
            await live.migrate(dom, "127.0.0.1", port, SECRET)
        assert not ei.value.source_suspended
    finally:
        await proxy.aclose()
    await asyncio.sleep(0.2)
    assert not dom.dying and arrived == []
    assert dst.mem.free_frames == free and not dst.domains
    t, s = uptime(dom)
    await dom.wait_for_line(rf"uptime: ticks={t + 10} ", 10)
    assert uptime(dom)[1] == s
    dom.shutdown()
