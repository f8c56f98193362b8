"""The block I/O path: a backing store (file, block device, LVM extents on a PV) and the
thread pool that does every blocking call (open, fstat, preadv, pwritev, fdatasync).

Why a thread pool (measured: backends/block/README.md and ../research/hostio/NOTES.md):
os.preadv/os.pwritev release the GIL, go straight from the granted guest pages (memoryviews
of machine memory: zero copies) to the file, and need nothing outside the standard library.
The cost is the thread hand-off (~90-140 us per round trip on this kind of machine), so the
backend hands a whole *batch* of requests to the pool in a few jobs (`Backing.run_batch`),
not one job per request. Plain reads and writes now go through io_uring where the kernel
has it (uring.py, raw system calls); this pool keeps fdatasync, discard, LV extents, short
transfers, and everything where io_uring is unavailable.

Nothing in here touches hypervisor state: jobs receive plain memoryviews and offsets and
return (status, bytes) results that the loop thread turns into ring responses.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import dataclasses
import fcntl
import os
import stat
import struct
import threading
import time
from typing import Callable, Sequence

SECTOR = 512
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKDISCARD = 0x1277
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE): the range reads as zeros, its blocks are freed
    (os.posix_fallocate cannot punch). Raises OSError."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def blk_discard(fd: int, offset: int, length: int) -> None:
    """BLKDISCARD on a block device (opened for writing). Raises OSError."""
    fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", offset, length))


def _sysfs_queue(rdev: int, name: str) -> int | None:
    base = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    for d in (f"{base}/queue", f"{base}/../queue"):       # a partition: its disk's queue
        try:
            with open(f"{d}/{name}") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    return None

# One pool for every device of the process: bounded (no thread explosion with many disks),
# and big enough that a slow device does not starve the others.
POOL_WORKERS = min(16, 4 * (os.cpu_count() or 2))
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(POOL_WORKERS, thread_name_prefix="blkio")
        return _pool


async def run(fn: Callable, *args):
    """Run a blocking call in the block I/O pool."""
    return await asyncio.get_running_loop().run_in_executor(pool(), fn, *args)


class BackingError(Exception):
    """The backing store cannot be opened or used (the device fails to connect)."""


@dataclasses.dataclass(frozen=True)
class Extent:
    """`length` bytes of the virtual disk at `vstart` live at `pstart` of the opened fd."""
    vstart: int
    pstart: int
    length: int


@dataclasses.dataclass
class IORequest:
    """One guest request after validation: what a worker thread needs, nothing more."""
    op: str                          # "read" | "write" | "flush" | "discard"
    offset: int = 0                  # byte offset on the virtual disk
    bufs: Sequence[memoryview] = ()  # guest memory (granted segments), in disk order
    length: int = 0
    sync: bool = False               # fdatasync after the write (WRITE_BARRIER)
    addrs: Sequence[int] = ()        # flat address, length, ... of each piece, for io_uring
    # Or, instead of bufs: (mapping with a .view of its page, offset, length) per segment, cut
    # into views only when the pool runs the request (io_uring needs only `addrs`).
    segments: Sequence[tuple[object, int, int]] = ()
    # Filled in by the worker:
    error: int = 0                   # errno (0 = success)
    ns: int = 0

    def buffers(self) -> list[memoryview]:
        """`bufs`, or views cut from `segments` (read-only for a write). The mappings stay
        held by the loop until the request's completion has been seen."""
        if self.bufs or not self.segments:
            return list(self.bufs)
        write = self.op == "write"
        return [(m.view.toreadonly() if write else m.view)[off:off + n] for m, off, n in self.segments]


class Backing:
    """An opened backing store. `extents` is None for a plain file/device (identity map)."""

    def __init__(self, path: str, fd: int, size: int, sector_size: int, physical_sector_size: int,
                 readonly: bool, kind: str, extents: list[Extent] | None = None,
                 description: str = "") -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.sector_size = sector_size
        self.physical_sector_size = physical_sector_size
        self.readonly = readonly
        self.kind = kind                  # "file" | "phy" | "lvm"
        self.extents = extents
        self.description = description or path
        # DISCARD support (probed by open_blocking on a writable store): granularity and
        # alignment in bytes, as the vbd's discard-granularity / discard-alignment keys.
        self.discard = False
        self.discard_granularity = SECTOR
        self.discard_alignment = 0
        self._discard_blk = False         # BLKDISCARD (device) rather than punching holes (file)

    @property
    def sectors(self) -> int:
        return self.size // SECTOR

    # -- opening (blocking: call through `run`) ------------------------------------------
    @classmethod
    def open_blocking(cls, path: str, readonly: bool, extents: list[Extent] | None = None,
                      lv_size: int | None = None, description: str = "") -> "Backing":
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as e:
            raise BackingError(f"cannot open {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
                lss = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
                try:
                    pss = struct.unpack("I", fcntl.ioctl(fd, BLKPBSZGET, b"\0" * 4))[0]
                except OSError:
                    pss = lss
                kind = "phy"
            elif stat.S_ISREG(st.st_mode):
                size, lss, pss, kind = st.st_size, SECTOR, SECTOR, "file"
            else:
                raise BackingError(f"{path} is neither a regular file nor a block device")
            if lss != SECTOR:
                # Requests are in 512-byte units and we do buffered I/O, so any logical block
                # size works; advertise 512 like Xen's file backends do.
                lss = SECTOR
            if extents is not None:
                end = max((e.pstart + e.length for e in extents), default=0)
                if end > size:
                    raise BackingError(f"LV extents end at {end} beyond the PV {path} ({size} bytes)")
                size = lv_size if lv_size is not None else sum(e.length for e in extents)
                kind = "lvm"
            size -= size % SECTOR
            b = cls(path, fd, size, lss, max(pss, lss), readonly, kind, extents, description)
            if not readonly:
                b._probe_discard(st)
            return b
        except BaseException:
            os.close(fd)
            raise

    def _probe_discard(self, st: os.stat_result) -> None:
        if stat.S_ISBLK(st.st_mode):
            mx = _sysfs_queue(st.st_rdev, "discard_max_bytes")
            if mx:
                self.discard, self._discard_blk = True, True
                self.discard_granularity = max(SECTOR, _sysfs_queue(st.st_rdev, "discard_granularity") or SECTOR)
        else:
            # Punching a hole past the end (KEEP_SIZE) changes nothing and tells whether the
            # file system can punch at all.
            try:
                punch_hole(self.fd, st.st_size + (1 << 20), 4096)
            except OSError:
                return
            self.discard = True
            self.discard_granularity = max(SECTOR, st.st_blksize or SECTOR)
        if self.extents:
            self.discard_alignment = self.extents[0].pstart % self.discard_granularity

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- mapping virtual offsets to the fd ----------------------------------------------
    def pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        """[(fd_offset, nbytes)] covering [offset, offset+length) of the virtual disk."""
        if self.extents is None:
            return [(offset, length)]
        out = []
        end = offset + length
        for e in self.extents:
            lo, hi = max(offset, e.vstart), min(end, e.vstart + e.length)
            if lo < hi:
                out.append((e.pstart + lo - e.vstart, hi - lo))
        if sum(n for _, n in out) != length:
            raise OSError(5, "range not covered by LV extents")
        return out

    # -- worker side (runs in the pool) ------------------------------------------------
    def _rw(self, req: IORequest) -> None:
        write = req.op == "write"
        bufs = req.buffers()
        pos = 0
        for fd_off, nbytes in self.pieces(req.offset, req.length):
            want = _slice(bufs, pos, nbytes)
            done = 0
            while done < nbytes:
                iov = _slice(want, done, nbytes - done)
                n = os.pwritev(self.fd, iov, fd_off + done) if write else os.preadv(self.fd, iov, fd_off + done)
                if n <= 0:
                    if not write and n == 0:
                        # The file shrank under us: what is not there reads as zeros.
                        for b in iov:
                            b[:] = bytes(len(b))
                        break
                    raise OSError(5, "short write")
                done += n
            pos += nbytes
        if req.sync:
            os.fdatasync(self.fd)

    def do(self, req: IORequest) -> None:
        """Execute one request (worker thread); errors land in req.error."""
        t0 = time.perf_counter_ns()
        try:
            if req.op == "flush":
                if not self.readonly:
                    os.fdatasync(self.fd)
            elif req.op == "discard":
                if req.length:
                    for fd_off, nbytes in self.pieces(req.offset, req.length):
                        if self._discard_blk:
                            blk_discard(self.fd, fd_off, nbytes)
                        else:
                            punch_hole(self.fd, fd_off, nbytes)
            else:
                self._rw(req)
        except OSError as e:
            req.error = e.errno or 5
        except (ValueError, BufferError, TypeError):   # a mapping released under us
            req.error = 5
        req.ns = time.perf_counter_ns() - t0

    def run_batch(self, reqs: list[IORequest]) -> list[IORequest]:
        for r in reqs:
            self.do(r)
        return reqs


def _slice(bufs: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """The byte range [start, start+length) of the concatenation of `bufs`, as views."""
    out = []
    pos = 0
    end = start + length
    for b in bufs:
        n = len(b)
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            out.append(b[lo - pos:hi - pos])
        pos += n
        if pos >= end:
            break
    return out

