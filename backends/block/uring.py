"""io_uring for blkback's reads and writes, through the raw system calls (ctypes, no
liburing).

Why: the thread pool costs two thread hand-offs per job (~90-140 us here); io_uring submits
a batch with one io_uring_enter on the loop thread and its completions wake the loop
through an eventfd (`loop.add_reader`): 2.2-9.9x the pool's IOPS on the host
(backends/block/README.md, bench/blk_io.py). liburing's Python binding needs a pinned source
build (hostio/NOTES.md), so this speaks the kernel interface itself: io_uring_setup, the
three mmaps, 64-byte SQEs written with struct, io_uring_enter, IORING_REGISTER_EVENTFD.

Only READV and WRITEV go here, each with its iovec array kept alive until its completion;
fdatasync, discard, LV extent splitting and any short transfer stay in the pool
(`Backing.do`), which also remains the whole path where io_uring is unavailable (old kernel,
kernel.io_uring_disabled, a seccomp profile): `Uring.open()` returns None then.

Nothing here touches hypervisor state; the buffers are addresses inside machine memory of
granted frames that blkback keeps mapped until the completion is seen (it drains every
submitted request before unmapping, as for the pool).
"""
from __future__ import annotations

import array
import asyncio
import ctypes
import logging
import mmap
import os
import struct
from typing import Callable

log = logging.getLogger("aiovmm.backends.block")

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

SYS_io_uring_setup, SYS_io_uring_enter, SYS_io_uring_register = 425, 426, 427
IORING_OFF_SQ_RING, IORING_OFF_CQ_RING, IORING_OFF_SQES = 0, 0x8000000, 0x10000000
IORING_FEAT_SINGLE_MMAP = 1
IORING_REGISTER_EVENTFD = 4
IORING_OP_READV, IORING_OP_WRITEV = 1, 2
IOSQE_ASYNC = 1 << 4          # go straight to an io-wq worker, never inline in io_uring_enter

_SQE = struct.Struct("<BBHiQQIIQHHiQQ")     # opcode flags ioprio fd off addr len rw_flags user_data ...
_CQE = struct.Struct("<QiI")                # user_data res flags
_U32 = struct.Struct("<I")


class _Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("sq_thread_cpu", ctypes.c_uint32),
                ("sq_thread_idle", ctypes.c_uint32), ("features", ctypes.c_uint32),
                ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                # io_sqring_offsets
                ("sq_head", ctypes.c_uint32), ("sq_tail", ctypes.c_uint32),
                ("sq_ring_mask", ctypes.c_uint32), ("sq_ring_entries", ctypes.c_uint32),
                ("sq_flags", ctypes.c_uint32), ("sq_dropped", ctypes.c_uint32),
                ("sq_array", ctypes.c_uint32), ("sq_resv1", ctypes.c_uint32),
                ("sq_user_addr", ctypes.c_uint64),
                # io_cqring_offsets
                ("cq_head", ctypes.c_uint32), ("cq_tail", ctypes.c_uint32),
                ("cq_ring_mask", ctypes.c_uint32), ("cq_ring_entries", ctypes.c_uint32),
                ("cq_overflow", ctypes.c_uint32), ("cq_cqes", ctypes.c_uint32),
                ("cq_flags", ctypes.c_uint32), ("cq_resv1", ctypes.c_uint32),
                ("cq_user_addr", ctypes.c_uint64)]


def _check(rc: int, what: str) -> int:
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return rc


class Uring:
    """One io_uring on the running loop: `submit` queues a READV/WRITEV and returns a future
    of the byte count (or OSError); `flush` makes everything queued visible to the kernel
    (one io_uring_enter per drain of blkback's ring)."""

    def __init__(self, entries: int) -> None:
        p = _Params()
        self.fd = _check(_syscall(SYS_io_uring_setup, ctypes.c_uint(entries), ctypes.byref(p)),
                         "io_uring_setup")
        try:
            sq_size = p.sq_array + p.sq_entries * 4
            cq_size = p.cq_cqes + p.cq_entries * _CQE.size
            if p.features & IORING_FEAT_SINGLE_MMAP:
                sq_size = cq_size = max(sq_size, cq_size)
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            self.sq = mmap.mmap(self.fd, sq_size, mmap.MAP_SHARED | mmap.MAP_POPULATE, prot,
                                offset=IORING_OFF_SQ_RING)
            self.cq = self.sq if p.features & IORING_FEAT_SINGLE_MMAP else mmap.mmap(
                self.fd, cq_size, mmap.MAP_SHARED | mmap.MAP_POPULATE, prot, offset=IORING_OFF_CQ_RING)
            self.sqes = mmap.mmap(self.fd, p.sq_entries * _SQE.size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                  prot, offset=IORING_OFF_SQES)
            self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fdbuf = ctypes.c_int(self.efd)
            _check(_syscall(SYS_io_uring_register, self.fd, IORING_REGISTER_EVENTFD,
                            ctypes.byref(fdbuf), 1), "io_uring_register")
        except BaseException:
            os.close(self.fd)
            raise
        self.p = p
        self.entries = p.sq_entries
        self.sq_mask = _U32.unpack_from(self.sq, p.sq_ring_mask)[0]
        self.cq_mask = _U32.unpack_from(self.cq, p.cq_ring_mask)[0]
        self.sq_tail = _U32.unpack_from(self.sq, p.sq_tail)[0]
        self.to_submit = 0
        self._queued: list[int] = []            # user_data not yet seen by the kernel, in order
        # user_data -> (future, iovec array kept alive, completion callback or None)
        self.inflight: dict[int, tuple[asyncio.Future, object, Callable | None]] = {}
        # Called once after a reap that completed something (blkback answers the batch there).
        self.after_reap: Callable[[], None] | None = None
        self._reaping = False
        self._next = 1
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.efd, self._reap)
        self.closed = False

    @classmethod
    def open(cls, entries: int) -> "Uring | None":
        """A ring, or None where io_uring is unavailable (the caller keeps the pool)."""
        if os.environ.get("AIOVMM_BLK_URING", "1") == "0":
            return None
        try:
            return cls(entries)
        except OSError as e:
            log.info("io_uring unavailable (%s): block I/O through the thread pool", e)
            return None

    def free(self) -> int:
        return self.entries - self.to_submit - len(self.inflight)

    def submit(self, write: bool, fd: int, offset: int, iov: "array.array | list[tuple[int, int]]",
               on_done: Callable[[asyncio.Future], None] | None = None,
               offload: bool = False) -> asyncio.Future:
        """Queue one READV/WRITEV of the pieces at `offset` of `fd`: `iov` is a flat
        array('Q') of address, length, address, length ... (the iovec array itself, no
        ctypes object per piece: building 256 ctypes iovecs took ~10 us each) or a list of
        (address, length). The caller checks `free()` first and keeps the memory mapped until
        the future is done. `on_done(fut)` runs synchronously from the reap that completes it
        (a done callback would cost a loop turn per completion: call_soon), then `after_reap`
        once per reap. `offload`: IOSQE_ASYNC, the copy runs on a kernel worker thread instead
        of inside io_uring_enter on the loop thread (a cached 1 MiB read otherwise copies
        there, while the guest's vCPU waits for the same thread)."""
        arr = iov if isinstance(iov, array.array) else array.array("Q", [x for pc in iov for x in pc])
        if arr.typecode != "Q" or len(arr) % 2:
            raise ValueError("iovec array: want array('Q') of address/length pairs")
        iov_addr, n = arr.buffer_info()
        ud = self._next
        self._next = (self._next + 1) & 0xFFFFFFFFFFFFFFFF or 1
        fut = self.loop.create_future()
        self.inflight[ud] = (fut, arr, on_done)
        idx = self.sq_tail & self.sq_mask
        _SQE.pack_into(self.sqes, idx * _SQE.size, IORING_OP_WRITEV if write else IORING_OP_READV,
                       IOSQE_ASYNC if offload else 0, 0, fd, offset, iov_addr, n // 2, 0, ud, 0, 0, 0, 0, 0)
        _U32.pack_into(self.sq, self.p.sq_array + 4 * idx, idx)
        self.sq_tail = (self.sq_tail + 1) & 0xFFFFFFFF
        # x86 keeps stores in order: the SQE and array slot are visible before the tail.
        _U32.pack_into(self.sq, self.p.sq_tail, self.sq_tail)
        self.to_submit += 1
        self._queued.append(ud)
        return fut

    def flush(self) -> None:
        """io_uring_enter for everything queued (on the loop thread: buffered reads of cached
        data complete inside it, other I/O goes to the kernel's workers). If the kernel
        refuses (anything but EINTR/EAGAIN/EBUSY), the SQEs it has not taken are withdrawn
        (the tail moves back) and their futures fail with that error: every future ends."""
        while self.to_submit:
            n = _syscall(SYS_io_uring_enter, self.fd, self.to_submit, 0, 0, None, 0)
            if n < 0:
                e = ctypes.get_errno()
                if e in (4, 11, 16):              # EINTR, EAGAIN, EBUSY: completions first
                    self._reap()
                    continue
                err = OSError(e, f"io_uring_enter: {os.strerror(e)}")
                log.warning("io_uring_enter failed (%s): %d requests fail", err, len(self._queued))
                self.sq_tail = (self.sq_tail - len(self._queued)) & 0xFFFFFFFF
                _U32.pack_into(self.sq, self.p.sq_tail, self.sq_tail)
                failed = [self.inflight.pop(ud) for ud in self._queued]
                self._queued.clear()
                self.to_submit = 0
                for fut, _arr, on_done in failed:
                    if not fut.done():
                        fut.set_exception(err)
                    if on_done is not None:
                        on_done(fut)
                if failed and self.after_reap is not None:
                    self.after_reap()
                break
            self.to_submit -= n
            del self._queued[:n]
        self._reap()

    def _reap(self) -> None:
        """Take every completion in the CQ (from the eventfd reader, or right after
        io_uring_enter: buffered reads of cached data complete inside it). Not re-entered:
        a completion callback that submits more lets the outer loop find its CQEs."""
        if self._reaping or self.closed:
            return
        self._reaping = True
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        cq, p = self.cq, self.p
        got = 0
        try:
            head = _U32.unpack_from(cq, p.cq_head)[0]
            tail = _U32.unpack_from(cq, p.cq_tail)[0]
            while head != tail:
                ud, res, _flags = _CQE.unpack_from(cq, p.cq_cqes + (head & self.cq_mask) * _CQE.size)
                head = (head + 1) & 0xFFFFFFFF
                _U32.pack_into(cq, p.cq_head, head)
                ent = self.inflight.pop(ud, None)
                if ent is not None:
                    fut, _arr, on_done = ent
                    if not fut.done():
                        if res < 0:
                            fut.set_exception(OSError(-res, os.strerror(-res)))
                        else:
                            fut.set_result(res)
                    if on_done is not None:
                        on_done(fut)
                    got += 1
                if head == tail:
                    tail = _U32.unpack_from(cq, p.cq_tail)[0]
        finally:
            self._reaping = False
        if got and self.after_reap is not None:
            self.after_reap()

    def close(self) -> None:
        """Only with nothing in flight (blkback drains first)."""
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.efd)
        os.close(self.efd)
        for m in {id(self.sq): self.sq, id(self.cq): self.cq, id(self.sqes): self.sqes}.values():
            m.close()
        os.close(self.fd)
