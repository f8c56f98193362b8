"""Red team (backends, 2026-12-02): what blkback reads from the disk into a guest page is
what the guest runs next, as on Xen, where the CPU runs the bytes in memory.

A READ's data lands in the granted frames from the I/O pool (preadv) or io_uring, written
through the host's mapping of guest memory: no vCPU sees the store. An emulated vCPU runs
its translations of the bytes it saw, which QEMU drops only on its own stores, so every host
write into guest frames must go through grants.frame_written (test_code_writes.py holds it
for grant copies and host_copy_to). blkback's reads did not: a page that had run code and
was then filled from disk (a Linux guest's page cache reused for a program's text) kept
running the old code on Unicorn.

The guest (guests/hostile/code_write.c, how=host) runs code from a page, grants that page
to domid 0 and waits; the real Blkback then serves a READ of one sector (a real file,
`mov eax, 1337; ret`) into that grant through its own request path (_drain: copy once,
validate, map, submit; _answer), and the guest calls the page again. The ring here is a
host page (only where the data lands is under test, not the ring protocol).
"""
from __future__ import annotations

import asyncio
import re
import struct

import pytest

from aiovmm import Hypervisor
from aiovmm.backends.block import Blkback, DiskConfig
from aiovmm.backends.block.device import _REQ, _RSP, _SEG, BLKIF_OP_READ, BLKIF_RSP_OKAY, Ring
from aiovmm.backends.block.uring import Uring
from conftest import BUILD, ENGINES, HV_MEMORY_MIB
from test_code_writes import host_wrote

pytestmark = ENGINES
ELF = str(BUILD / "hostile" / "code_write.elf")
CODE = bytes([0xB8, 0x39, 0x05, 0, 0, 0xC3])          # mov eax, 1337; ret


@pytest.mark.parametrize("path", ["pool", "uring", "disconnect"])
async def test_blkback_read_into_code_runs_the_new_bytes(engine, path, tmp_path):
    """`disconnect` (red team s19): the READ completes but the vbd disconnects before it is
    answered (`_disconnect` releases it unanswered); the bytes are in the guest's page all
    the same, as on Xen, so that vCPU runs them too."""
    img = tmp_path / "code.img"
    img.write_bytes(CODE.ljust(4096, b"\xcc"))
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        d = await hv.create(ELF, memory_mib=8, cmdline="how=host")
        line = await d.wait_for_line(r"code_write: ref code=\d+ flag=\d+", 30)
        m = re.search(r"code=(\d+) flag=(\d+)", line)
        code_ref, flag_ref = int(m.group(1)), int(m.group(2))

        bb = Blkback(d, 0, DiskConfig.parse(f"target={img},vdev=xvda"))
        bb.backing = await bb.open_backing()
        page = bytearray(4096)
        bb.ring = Ring([memoryview(page)])
        bb.persistent = False
        if path == "uring":
            bb.uring = Uring.open(bb.ring.nr_ents)
            if bb.uring is None:
                pytest.skip("io_uring unavailable here")
        try:
            raw = _REQ.pack(BLKIF_OP_READ, 1, 0, 7, 0) + _SEG.pack(code_ref, 0, 0)
            page[64:64 + len(raw)] = raw
            struct.pack_into("<I", page, 0, 1)                 # req_prod
            bb._drain()
            async with asyncio.timeout(10):
                while not bb._done:
                    await bb._kick.wait()
                    bb._kick.clear()
            if path == "disconnect":
                await bb._disconnect()
                assert _RSP.unpack_from(page, 64)[0] != 7          # never answered
            else:
                bb._answer()
                assert _RSP.unpack_from(page, 64) == (7, BLKIF_OP_READ, BLKIF_RSP_OKAY)
                assert bb.stats.rd_reqs == 1 and bb.stats.uring_reqs == (path == "uring")
        finally:
            if bb.uring is not None:
                bb.uring.close()
            bb.backing.close()
        res = await host_wrote(d, flag_ref)
    assert res["after_host"] == "1337", res              # the sector read from disk ran
