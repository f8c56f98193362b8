"""TapWriter: netback's guest -> tap writes, from a thread of their own (issue 14, network).

A write to a tap runs the host's whole receive path in the writer's context (tun_get_user ->
netif_rx -> bridge -> veth -> the peer's socket, and the wake-up of the process reading it).
Done on the loop thread, that work, and the preemption by the woken reader at the write's
return, stopped the loop and with it the guest's vCPU (KVM_RUN runs on the loop thread):
profiled on the KVM engine at load ~12, os.write took 1.8 ms per 64 KiB TSO frame and 4 ms
per small UDP reply, 40 % of the loop's wall time in a UDP request/response run and a third
in a guest -> host TCP stream. Here the loop only queues a frame it has already copied out
of the guest's grants and validated (netback answers the tx request at once, as Linux
netback does after its grant copy); this thread writes the frames in order.

The thread touches no hypervisor state: it owns a duplicate of the tap's fd (so a close on
the loop can never let it write into a reused descriptor number), the frames queued to it
(bytes the guest can no longer change), and two counters only it writes. The loop sees
`backlog()` (bytes queued, not yet written) and stops taking tx requests above BACKLOG_MAX
(they stay on the guest's ring, as with a rate limit); the thread calls `on_room` on the
loop (call_soon_threadsafe) once the backlog is below half of that again. A write the
kernel refuses is counted and reported to the loop the same way (`on_drop`), rare by
construction (the loop validated the virtio_net_hdr; tun does not block a write).
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("aiovmm.backends.net")

BACKLOG_MAX = 1 << 20          # bytes queued before netback leaves tx requests on the ring
_STOP = None                   # the queue's end marker


class TapWriter:
    """One thread writing one tap's frames in the order they were queued (module docstring)."""

    def __init__(self, fd: int, name: str, loop: asyncio.AbstractEventLoop,
                 on_room: Callable[[], None], on_drop: Callable[[bool], None],
                 limit: int = BACKLOG_MAX) -> None:
        self._fd = os.dup(fd)
        self.limit = limit
        self._loop = loop
        self._on_room = on_room
        self._on_drop = on_drop
        self._q: queue.SimpleQueue[bytes | bytearray | list | None] = queue.SimpleQueue()
        self.queued_bytes = 0          # written by the loop only
        self._staged: list[bytes | bytearray] = []     # stage() until flush(); loop only
        self.written_bytes = 0         # written by the thread only
        self.frames = 0                # written by the thread only
        self._want_room = False        # set by the loop, cleared by whoever calls on_room
        self._written_waiters: list[asyncio.Future] = []     # written(); loop only
        self._want_written = False     # set by the loop, cleared by the thread (as _want_room)
        self._stopped = False          # the end marker is queued (close); loop only
        self._ended: asyncio.Future[None] = loop.create_future()   # the thread's fd is closed
        self._thread = threading.Thread(target=self._run, name=f"tapw-{name}", daemon=True)
        self._thread.start()

    def backlog(self) -> int:
        return self.queued_bytes - self.written_bytes

    @property
    def native_id(self) -> int | None:
        """The thread's id for the host scheduler (a migration boosts it with the loop)."""
        return self._thread.native_id

    def stage(self, frame: bytes | bytearray) -> None:
        """Queue one frame (its virtio_net_hdr first) to go with the next flush() (netback's
        pass): one wake-up of an idle thread per pass instead of one per frame, each a
        context switch and a GIL hand-off (profiled on KVM under load: ~0.5 ms per put in a guest -> host stream).
        It counts in backlog() at once. Loop thread only."""
        self.queued_bytes += len(frame)
        self._staged.append(frame)

    def flush(self) -> None:
        """Hand the staged frames to the thread, in order, as one item. Loop thread only."""
        if self._staged:
            batch, self._staged = self._staged, []
            self._q.put(batch)

    def full(self) -> bool:
        """Is the backlog at `limit` (BACKLOG_MAX) or above? Then `on_room` is called once
        it has drained to half (asked before the second look, so a drain in between is not
        missed)."""
        if self.backlog() < self.limit:
            return False
        self._want_room = True
        if self.backlog() < self.limit:
            self._want_room = False
            return False
        return True

    def written(self) -> "asyncio.Future[None]":
        """A future done once everything queued so far (staged ones included) is written: the
        thread says so through the loop when its backlog reaches 0. A wait that polls the
        backlog instead never blocks on uvloop (it rounds a sub-millisecond sleep to none),
        and on a loop at real-time priority (a migration's downtime) that spin held a core
        the writer, boosted alike, then waited for: 100 ms, the wait's bound, when the other
        core was also held by one (bench/migrate.py --timeline, two processes). Loop thread."""
        fut = self._loop.create_future()
        self._written_waiters.append(fut)
        self._check_written()
        return fut

    def _check_written(self) -> None:
        """Resolve written()'s futures if nothing is left to write (loop thread); the flag is
        raised before the look, so a drain in between is not missed (as full())."""
        if not self._written_waiters:
            return
        self._want_written = True
        if self.backlog() > 0:
            return
        self._want_written = False
        waiters, self._written_waiters = self._written_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _run(self) -> None:
        fd, q = self._fd, self._q
        try:
            while True:
                item = q.get()
                if item is _STOP:
                    return
                for frame in item:                   # one flush()'s frames
                    self._write(fd, frame)
        finally:
            os.close(fd)
            self._report(self._end)

    def _write(self, fd: int, frame: bytes | bytearray) -> None:
        try:
            os.write(fd, frame)
            self.frames += 1
        except BlockingIOError:
            self._report(self._on_drop, False)
        except OSError as e:                  # the kernel refused the header (EINVAL)
            log.debug("%s: tap refused a frame: %s", self._thread.name, e)
            self._report(self._on_drop, True)
        self.written_bytes += len(frame)
        if self._want_room and self.backlog() < self.limit // 2:
            self._want_room = False
            self._report(self._on_room)
        if self._want_written and self.backlog() <= 0:
            self._want_written = False
            self._report(self._check_written)

    def _report(self, fn: Callable, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:                          # the loop is closed: nothing to tell
            pass

    def close(self) -> None:
        """Stop after the frames already queued, without waiting: the thread writes them,
        closes its duplicate of the tap's fd and ends on its own. Loop thread; `aclose` is
        the same and waits for that end without holding the loop."""
        self.flush()
        if not self._stopped:
            self._stopped = True
            self._q.put(_STOP)

    async def aclose(self, timeout: float = 2.0) -> bool:
        """close(), then wait (at most `timeout`) until the thread has written every frame
        queued and closed its fd; False if it is still writing then (it finishes on its
        own). No frame is dropped: each was answered OKAY, and Linux netback hands a frame
        to the host's stack within the same poll that answers its request, so a disconnect
        never loses one. The wait is a future the thread resolves through the loop
        (`_ended`): a join here held the loop, every guest and the control API, for as long
        as the queue took to write (67 ms measured with 1 MiB of gso_size-48 frames). A
        cancel of the wait leaves the thread to finish alike."""
        self.close()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._ended)
        except TimeoutError:
            log.warning("%s: still writing after %.1f s; left to finish", self._thread.name, timeout)
            return False
        return True

    def _end(self) -> None:
        if not self._ended.done():
            self._ended.set_result(None)
