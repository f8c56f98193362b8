"""Save files: the stream written and read with aiofiles (file I/O off the event loop,
in aiofiles' worker threads), chunked so a 256 MiB guest never sits in memory twice."""
from __future__ import annotations

import asyncio

import logging
import os
from typing import TYPE_CHECKING

import aiofiles
import aiofiles.os

from ..abi import ShutdownReason
from ..hostfile import open_own
# devices imports scapy and describes the backends (seconds, the first time): here, with
# the save code, not inside save.config_of after the guest has been suspended (the first
# save of a daemon kept its guest suspended for 3-4 s under load, a checkpoint included).
from ..backends import block as _block, net as _net                         # noqa: F401
from . import devices, save as _save, restore as _restore, stream as S      # noqa: F401
from .priority import RealTime
from .stream import StreamError
from .suspend import resume_cancelled, suspend

if TYPE_CHECKING:
    from ..domain import Domain
    from ..hypervisor import Hypervisor

log = logging.getLogger("aiovmm.migration")

WRITE_CHUNK = 4 << 20
READ_CHUNK = 4 << 20


class _FileSource(S.Source):
    def __init__(self, f) -> None:
        self.f = f

    async def read_into(self, view: memoryview) -> int:
        return await self.f.readinto(view) or 0


class _PlainSource(S.Source):
    """The reference for bench/migrate.py: blocking reads on the loop (what aiofiles
    saves the loop from)."""

    def __init__(self, f) -> None:
        self.f = f

    async def read_into(self, view: memoryview) -> int:
        return self.f.readinto(view) or 0


async def save_file(dom: "Domain", path: str, *, checkpoint: bool = False,
                    progress=None, abort: asyncio.Event | None = None) -> _save.SaveStats:
    """Suspend, write the stream to `path` (through `path`.part, renamed when complete),
    then destroy the domain (or resume it: `checkpoint`, or any failure). `abort` set (the
    user's Ctrl-C on `aiovmm save`, as xl's save ends with its process) fails the save
    at its next write: the partial file goes and the guest resumes."""
    _save.check_saveable(dom)
    if abort is not None and abort.is_set():
        raise _save.SaveError("save interrupted")
    susp = await suspend(dom)
    tmp = f"{path}.part"
    ok = False
    try:
        # <file>.part was not seen by the save-directory check: never through a symlink,
        # never into a file another user left there, 0600 (it is the guest's memory).
        async with aiofiles.open(tmp, "wb", opener=open_own) as f:
            small = bytearray()

            async def write(data: bytes | memoryview) -> None:
                # A page run (a view of machine memory, up to 4 MiB) is copied first thing,
                # on the loop, right after save.check_alive, before any await: the worker
                # thread reads what it is given while the loop runs on, and a destroy in
                # that time frees the domain's frames to other domains (Xen's toolstack
                # holds foreign mappings instead). About 0.5 ms a 4 MiB run
                # (tests/test_redteam_save_destroy.py). Small records are gathered.
                if abort is not None and abort.is_set():
                    raise _save.SaveError("save interrupted: the guest runs on")
                data = bytes(data)
                if len(data) < WRITE_CHUNK // 16:
                    small.extend(data)
                    if len(small) < WRITE_CHUNK // 16:
                        return
                    data, _ = bytes(small), small.clear()
                elif small:
                    await f.write(bytes(small))
                    small.clear()
                await f.write(data)

            stats = await _save.write_stream(dom, susp, write, progress)
            if small:
                await f.write(bytes(small))
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
            dom.shutdown(ShutdownReason.suspend)


async def restore_file(hv: "Hypervisor", path: str, *, name: str | None = None,
                       on_console=None, progress=None, plain: bool = False, realtime: bool = True):
    """`plain`: blocking reads on the loop instead of aiofiles (bench/migrate.py only).
    `realtime`: the loop thread runs the restore at real-time priority (priority.py; the
    guest is down until the restore ends)."""
    rt = RealTime(realtime)
    rt.start()
    try:
        if plain:
            with open(path, "rb", buffering=0) as pf:
                return await _restore.read_stream(hv, S.BufferedSource(_PlainSource(pf)), name=name,
                                                  on_console=on_console, progress=progress)
        async with aiofiles.open(path, "rb", buffering=0) as f:
            return await _restore.read_stream(hv, S.BufferedSource(_FileSource(f)), name=name,
                                              on_console=on_console, progress=progress)
    finally:
        rt.stop()
