"""Live migration's dirty tracking (aiovmm/migration/dirty.py) on a parked domain: every page
goes out through save.pages into the shadow, then the domain's frames are changed the ways a
guest, the hypervisor or a backend changes them, and Shadow.changed must name exactly those
pfns (and nothing the receiver already has)."""
from __future__ import annotations

import asyncio
import contextlib

from aiovmm import Hypervisor, lab
from aiovmm.abi import PAGE_SHIFT, PAGE_SIZE, MmuExt
from aiovmm.migration import save
from aiovmm.migration import stream as S
from aiovmm.migration.dirty import Shadow
from conftest import kernel


async def _sent(p: lab.Parked, pfns, shadow: Shadow) -> list[int]:
    """save.pages for `pfns` into `shadow`; returns the stream's pfn[] entries."""
    out: list[bytes] = []

    async def write(b) -> None:
        out.append(bytes(b))
    await save.pages(p.dom, pfns, write, save.data_map(p.dom), skip_tables=True, shadow=shadow)
    return out


@contextlib.asynccontextmanager
async def _all_sent():
    """A parked 8 MiB domain whose every page went out into a shadow: (parked, shadow)."""
    async with Hypervisor(memory_mib=64) as hv:
        p = lab.park(hv, kernel(), 8, "a")
        sh = Shadow(p.dom.nr_pages)
        try:
            await _sent(p, range(p.dom.nr_pages), sh)
            yield p, sh
        finally:
            sh.close()


def test_changed_names_exactly_what_differs_from_what_was_sent():
    async def main():
        async with _all_sent() as (p, sh):
            dom, mem = p.dom, p.dom.mem
            assert sh.changed(dom, save.data_map(dom)) == []
            pfn_of = {m: i for i, m in enumerate(dom.p2m)}
            # A data page written (any writer: here the hypervisor's own store), a spare
            # frame never written before (a hole, sent as XALLOC) written, and a data page
            # written back to the very bytes that were sent (nothing to send).
            data_pfn = next(i for i in range(dom.nr_pages) if save.data_map(dom)[dom.p2m[i]]
                            and not 1 <= mem.type[dom.p2m[i]] <= 4)
            m = dom.p2m[data_pfn]
            old = mem.read(m << PAGE_SHIFT, 8)
            mem.write((m << PAGE_SHIFT) + 8, b"\x5a")
            hole = p.spare[-1]
            assert not save.data_map(dom)[hole]
            mem.write((hole << PAGE_SHIFT) + 100, b"x")
            same = p.spare[-2]
            mem.write(same << PAGE_SHIFT, bytes(8))      # data now, but all zeros as sent
            got = sh.changed(dom, save.data_map(dom))
            assert got == sorted([data_pfn, pfn_of[hole]]), got
            # Once sent again the receiver has them: nothing left.
            await _sent(p, got, sh)
            assert sh.changed(dom, save.data_map(dom)) == []
            # The first byte of a page, the last byte of another one (page and chunk edges).
            mem.write(m << PAGE_SHIFT, bytes([old[0] ^ 1]))
            mem.write(((hole + 1) << PAGE_SHIFT) - 1, b"y")
            assert sh.changed(dom, save.data_map(dom)) == sorted([data_pfn, pfn_of[hole]])
            await _sent(p, [data_pfn, pfn_of[hole]], sh)
            # A frame that becomes a pinned page table, bytes unchanged: sent again, as a
            # table (and the page the hypercall's arguments were written to, as data).
            l1, args = p.spare[0], p.lay.stack_pfn
            assert p.mmuext(MmuExt.PIN_L1_TABLE, l1) == 0
            got = sh.changed(dom, save.data_map(dom))
            assert got == sorted([pfn_of[l1], args])
            recs = b"".join(await _sent(p, [pfn_of[l1]], sh))
            hdr = S.page_data_header([pfn_of[l1] | ((1 | S.PfnType.pinned) << S.TYPE_SHIFT)], 1)
            assert recs.startswith(hdr)
            assert sh.changed(dom, save.data_map(dom)) == [args]
            # ... and unpinned again: its type changes back.
            assert p.mmuext(MmuExt.UNPIN_TABLE, l1) == 0
            assert sh.changed(dom, save.data_map(dom)) == sorted([pfn_of[l1], args])
    asyncio.run(main())


def test_what_goes_out_is_the_copy_the_next_comparison_starts_from():
    """The page is copied first and sent from the copy: a write after the copy (the guest
    runs on while its pages are sent) is a change, even if it lands before the send."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            p = lab.park(hv, kernel(), 8, "a")
            dom, mem = p.dom, hv.mem
            frame = p.spare[3]
            pfn = dom.p2m.index(frame)
            mem.write(frame << PAGE_SHIFT, b"A" * PAGE_SIZE)
            sh = Shadow(dom.nr_pages)
            try:
                await _sent(p, range(dom.nr_pages), sh)
                mem.write(frame << PAGE_SHIFT, b"C")           # changed: to be sent again
                assert sh.changed(dom, save.data_map(dom)) == [pfn]
                sent: list[bytes] = []

                async def write(b) -> None:
                    if len(b) == PAGE_SIZE:                    # the page's data, about to go out:
                        mem.write(frame << PAGE_SHIFT, b"B")   # the guest writes it meanwhile
                    sent.append(bytes(b))
                await save.pages(dom, [pfn], write, save.data_map(dom), shadow=sh)
                assert sent[-1] == b"C" + b"A" * (PAGE_SIZE - 1)
                assert sh.changed(dom, save.data_map(dom)) == [pfn]
            finally:
                sh.close()
    asyncio.run(main())


def test_the_precopy_scan_lets_the_loop_run():
    """changed_yielding (pre-copy's scans) finds what changed as `changed` does, and gives
    the loop a turn whenever it has run `slice_s`: the guest on the loop goes on answering
    its peers during the scan (it stood still 3-4 ms for a 64 MiB guest, in the ping gap)."""
    async def main():
        async with _all_sent() as (p, sh):
            dom, mem = p.dom, p.dom.mem
            pfns = [i for i in range(0, dom.nr_pages, 97) if save.data_map(dom)[dom.p2m[i]]]
            for i in pfns:
                mem.view[(dom.p2m[i] << PAGE_SHIFT) + 7] ^= 0xFF
            turns = 0
            stop = asyncio.Event()

            async def ticker() -> None:
                nonlocal turns
                while not stop.is_set():
                    turns += 1
                    await asyncio.sleep(0)
            t = asyncio.ensure_future(ticker())
            await asyncio.sleep(0)
            turns = 0
            got = await sh.changed_yielding(dom, save.data_map(dom), slice_s=0.0)
            during = turns
            stop.set()
            await t
            assert got == sh.changed(dom, save.data_map(dom)) == pfns
            assert during >= len(pfns)      # a turn after every chunk compared
    asyncio.run(main())
