"""Save files: the stream written and read with aiofiles (file I/O off the event loop,
in aiofiles' worker threads), chunked so a 256 MiB guest never sits in memory twice."""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import aiofiles
import aiofiles.os

from . import save as _save, restore as _restore
from .stream import StreamError
from .suspend import resume_cancelled, suspend

if TYPE_CHECKING:
    from ..domain import Domain
    from ..hypervisor import Hypervisor

log = logging.getLogger("aiovmm.migration")

WRITE_CHUNK = 4 << 20
READ_CHUNK = 4 << 20


async def save_file(dom: "Domain", path: str, *, checkpoint: bool = False,
                    progress=None) -> _save.SaveStats:
    susp = await suspend(dom)
    tmp = f"{path}.part"
    ok = False
    try:
        async with aiofiles.open(tmp, "wb") as f:
            buf = bytearray()

            async def write(data: bytes) -> None:
                buf.extend(data)
                if len(buf) >= WRITE_CHUNK:
                    await f.write(bytes(buf))
                    buf.clear()

            stats = await _save.write_stream(dom, susp, write, progress)
            if buf:
                await f.write(bytes(buf))
        await aiofiles.os.replace(tmp, path)
        ok = True
        return stats
    finally:
        if not ok:
            try:
                await aiofiles.os.remove(tmp)
            except OSError:
                pass
        if checkpoint or not ok:
            resume_cancelled(dom)          # the guest carries on where it was
        else:
            log.info("d%d (%s): saved to %s; destroyed", dom.domid, dom.name, path)
            dom.suspended = None
            dom.shutdown(_save_reason())


def _save_reason():
    from ..abi import ShutdownReason
    return ShutdownReason.suspend


async def restore_file(hv: "Hypervisor", path: str, *, name: str | None = None,
                       on_console=None, progress=None):
    async with aiofiles.open(path, "rb") as f:
        buf = bytearray()
        pos = 0

        async def read(n: int) -> bytes:
            nonlocal buf, pos
            while len(buf) - pos < n:
                chunk = await f.read(max(READ_CHUNK, n - (len(buf) - pos)))
                if not chunk:
                    break
                if pos:
                    del buf[:pos]
                    pos = 0
                buf += chunk
            out = bytes(buf[pos:pos + n])
            pos += len(out)
            return out

        return await _restore.read_stream(hv, read, name=name, on_console=on_console,
                                          progress=progress)
