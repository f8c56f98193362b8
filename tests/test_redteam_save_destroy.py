"""Red-team: a domain destroyed (xl destroy: shutdown(poweroff)) while its save writes its
pages to a slow sink. migration/save.py sends runs of page data as views of machine memory
(no copy); the sink awaits between two runs of one PAGE_DATA batch, the domain's teardown
runs in those pauses (Domain.destroy_preemptible), frees its frames and a new domain may get
them. Xen: the saving toolstack's foreign mappings hold references, so the frames it reads
are never another domain's. Here: no page data is written once the domain is destroyed
(SaveError), so the stream never carries a frame that is no longer the domain's. Both
engines (the page data path is the engine's neither way, but the guest runs on it)."""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor, ShutdownReason
from aiovmm.abi import PAGE_SIZE
from aiovmm.migration import load
from conftest import HV_MEMORY_MIB, guest

ALL_ENGINES = True


async def test_no_page_data_written_after_the_domain_is_destroyed(engine):
    await load("save")
    from aiovmm.migration import save as _save
    from aiovmm.migration.suspend import suspend
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        dom = await hv.create(guest("suspend"), memory_mib=8, cmdline="pages=32 every=10")
        await dom.wait_for_line(r"uptime: ticks=20 ", 20)
        await suspend(dom)
        after_destroy: list[int] = []
        runs = 0

        async def slow_sink(data: bytes | memoryview) -> None:
            """A slow disk: the first run of page data waits until the domain is gone."""
            nonlocal runs
            if dom.destroyed:
                after_destroy.append(len(data))
            if isinstance(data, memoryview) and len(data) >= PAGE_SIZE:
                runs += 1
                if runs == 1:
                    dom.shutdown(ShutdownReason.poweroff)       # xl destroy mid-save
                    async with asyncio.timeout(30):
                        while dom.domid in hv.domains:
                            await asyncio.sleep(0.001)

        with pytest.raises(_save.SaveError, match="destroyed"):
            await _save.pages(dom, range(dom.nr_pages), slow_sink)
        assert runs >= 1
        assert after_destroy == [], f"{len(after_destroy)} writes ({sum(after_destroy)} bytes) after the destroy"


async def test_no_tail_from_a_destroyed_domain(engine):
    """Live migration's last step (live.py: quiesce awaits, then tail) on a domain destroyed
    meanwhile: its shared_info frame is free, maybe another domain's, and its vCPUs gone.
    The tail is refused (SaveError), never built from that frame."""
    await load("save")
    from aiovmm.migration import save as _save
    from aiovmm.migration.suspend import suspend
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        dom = await hv.create(guest("suspend"), memory_mib=8, cmdline="pages=32 every=10")
        await dom.wait_for_line(r"uptime: ticks=20 ", 20)
        susp = await suspend(dom)
        _save.tail(dom, susp)                  # suspended and alive: built
        dom.shutdown(ShutdownReason.poweroff)
        async with asyncio.timeout(30):
            while dom.domid in hv.domains:
                await asyncio.sleep(0.001)
        assert hv.mem.owner[dom.shared_info_mfn] != dom.domid
        with pytest.raises(_save.SaveError, match="destroyed"):
            _save.tail(dom, susp)
