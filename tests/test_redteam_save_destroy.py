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


async def _read_page_data(stream: bytes, nr_pages: int) -> dict[int, tuple[int, bytes]]:
    """The plain (notab) pages of the PAGE_DATA records in a (possibly cut) save stream, by
    pfn, with their offsets in the stream: read with the restore side's own Reader, up to
    where the stream ends."""
    from aiovmm.migration import stream as S
    rd = S.Reader(S.BytesSource(stream))
    await rd.xl_header()
    await rd.libxl_header()
    await rd.libxl_record({S.LibxlRec.libxc_context})
    await rd.libxc_headers()
    got: dict[int, tuple[int, bytes]] = {}
    try:
        while True:
            rt, length = await rd.record_header()
            if rt != S.Rec.page_data:
                await rd.body(rt, length)
                continue
            pfns = await rd.page_data_pfns(length, nr_pages)
            if isinstance(pfns, S.PfnRun):
                pfns = [(p, pfns.type) for p in range(pfns.first, pfns.first + pfns.count)]
            for pfn, t in pfns:
                if t == S.PfnType.xalloc:
                    continue
                at = rd.offset
                page = await rd.exactly(PAGE_SIZE)
                if t == 0:
                    got[pfn] = at, page
    except S.StreamError:                     # the stream ends where the save failed
        pass
    return got


async def test_a_file_save_never_writes_another_domains_frames(engine, tmp_path):
    """files.save_file hands runs of page data (up to 4 MiB) to an aiofiles worker thread.
    Here the file is a FIFO read slowly by the test: the thread is blocked in the middle of
    a run when the domain is destroyed; its teardown completes and a new domain is created
    (it may get the freed frames) before the rest of that run is read. Every page that
    reaches the file is still the saved domain's page as it was when it was suspended."""
    import os
    from aiovmm.migration import load as _load
    await _load("files")
    from aiovmm.migration import save as _save
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        dom = await hv.create(guest("suspend"), memory_mib=8, cmdline="pages=256 every=10")
        await dom.wait_for_line(r"uptime: ticks=20 ", 20)
        # Where the longest run of page data lies in the stream (a checkpoint: the guest
        # carries on, its layout stays): the destroy comes in the middle of that run.
        await dom.save(str(tmp_path / "layout.save"), checkpoint=True)
        layout = sorted(at for at, _ in (await _read_page_data(
            (tmp_path / "layout.save").read_bytes(), dom.nr_pages)).values())
        runs, start = [], 0
        for i in range(1, len(layout) + 1):
            if i == len(layout) or layout[i] != layout[i - 1] + PAGE_SIZE:
                runs.append((i - start, layout[start]))
                start = i
        run_pages, run_at = max(runs)
        assert run_pages * PAGE_SIZE >= 512 << 10, f"longest run of page data: {run_pages} pages"
        destroy_at = run_at + run_pages * PAGE_SIZE // 2
        path = tmp_path / "d.save"
        os.mkfifo(f"{path}.part")
        saving = asyncio.ensure_future(dom.save(str(path)))
        fd = await asyncio.to_thread(os.open, f"{path}.part", os.O_RDONLY)
        stream = bytearray()
        snapshot: dict[int, bytes] = {}
        dying_frames: set[int] = set()
        other = None
        try:
            while chunk := await asyncio.to_thread(os.read, fd, 16 << 10):
                stream += chunk
                if not snapshot and len(stream) >= destroy_at:    # in the middle of that run
                    assert dom.suspended is not None and not dom.destroyed
                    mem = hv.mem
                    snapshot = {pfn: bytes(mem.view[mfn * PAGE_SIZE:(mfn + 1) * PAGE_SIZE])
                                for pfn, mfn in enumerate(dom.p2m)}
                    dying_frames = set(dom.p2m)
                    dom.shutdown(ShutdownReason.poweroff)          # xl destroy mid-write
                    async with asyncio.timeout(30):                 # the destroy completes
                        while dom.domid in hv.domains:
                            await asyncio.sleep(0.001)
                    other = await hv.create(guest("suspend"), memory_mib=8, cmdline="pages=32 every=10")
                    await other.wait_for_line(r"uptime: ticks=10 ", 20)
        finally:
            os.close(fd)
            (saved,) = await asyncio.gather(saving, return_exceptions=True)
        assert isinstance(saved, _save.SaveError) and "destroyed" in str(saved), saved
        assert snapshot, "the save ended before the test could destroy the domain"
        assert other is not None and dying_frames & set(other.p2m), "the new domain got none of the freed frames"
        pages = await _read_page_data(bytes(stream), len(snapshot))
        assert max(at for at, _ in pages.values()) >= run_at + (run_pages - 1) * PAGE_SIZE
        wrong = sorted(pfn for pfn, (_, page) in pages.items() if page != snapshot[pfn])
        assert not wrong, f"{len(wrong)} of {len(pages)} pages in the file are not the saved domain's: pfns {wrong[:8]}"
