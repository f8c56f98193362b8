"""Block backend host I/O paths: blkback's thread pool (preadv/pwritev in batched jobs) against
io_uring (liburing) against a plain synchronous loop, on a running uvloop event loop.

Stores: a 256 MiB temporary file, and (as root, if losetup works) a loop device over another
256 MiB file, detached at the end. Warm page cache, buffered I/O (as blkback opens them).
Patterns, each at depth 1, 8 and 32 (a closed loop: a completed request is replaced at once):
- randread / randwrite: 4 KiB at random 4 KiB-aligned offsets;
- seqread: 64 KiB sequential reads (16 page-sized iovecs, like a vectored guest request).
Every request carries a list of page-sized memoryviews of one page-aligned mmap (the shape of
granted guest pages) and is a `backends.block.io.IORequest`.

Methods:
- pool:  blkback as it is: `Backing.run_batch` jobs in `io.pool()`, a batch of n requests cut
         into ceil(n / REQS_PER_JOB) jobs (at most JOBS_PER_BATCH), exactly as device.py's
         `Blkback._submit`; completions handled in the executor future's done callback.
- uring: io_uring through liburing (PyPI liburing==2024.5.3): one readv/writev SQE per
         request, one io_uring_submit per batch; an eventfd registered with the ring and
         loop.add_reader; completions drained with io_uring_peek_cqe + io_uring_cqe_seen
         (io_uring_peek_batch_cqe of that release overruns its buffer).
- thread (only without liburing, or with --to-thread): `asyncio.to_thread(Backing.do, req)`
         per request.
- sync:  the ceiling: os.preadv / os.pwritev on the same page list in a plain loop on the
         loop thread (no event loop round trips, no threads; os.pread would also allocate).

Per line: IOPS, MB/s and the median per-request latency (submission to the completion being
seen on the loop), medians of --reps interleaved runs of --secs seconds each.
liburing is not a project dependency; put it on the path for the uring column, e.g.

    python -m venv /tmp/uring && /tmp/uring/bin/pip install liburing==2024.5.3
    PYTHONPATH=/tmp/uring/lib/python3.11/site-packages .venv/bin/python bench/blk_io.py

~1 minute. Last line: key=value ...
"""
from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import uvloop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from aiovmm.backends.block import device as blkdev  # noqa: E402
from aiovmm.backends.block import io as bio         # noqa: E402

try:
    import liburing as L
    from importlib.metadata import version as _version
    try:
        LIBURING = _version("liburing")
    except Exception:
        LIBURING = "unknown"
except ImportError as e:                      # pragma: no cover - depends on the machine
    L = None
    LIBURING = f"missing ({e})"

SIZE_MIB = 256
PAGE = mmap.PAGESIZE
PATTERNS = [("randread", 4096), ("randwrite", 4096), ("seqread", 65536)]
DEPTHS = (1, 8, 32)
now_ns = time.perf_counter_ns


def _sh(*cmd: str, check: bool = True) -> str:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout.strip()


def prefill(path: str, mib: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())                  # no writeback of the fill during the runs


def warm(fd: int) -> None:
    """Read the whole store once through the fd the runs use: a loop device has a page cache
    of its own, and the kernel drops it when the device's last opener closes it."""
    buf = bytearray(1 << 20)
    off = 0
    while (n := os.preadv(fd, [buf], off)) > 0:
        off += n


class Pages:
    """depth slots of `bs` bytes in one page-aligned anonymous mmap, each a list of pages."""

    def __init__(self, depth: int, bs: int) -> None:
        self.map = mmap.mmap(-1, depth * bs)
        self.mv = mv = memoryview(self.map)
        self.slots = [[mv[s * bs + p:s * bs + p + PAGE] for p in range(0, bs, PAGE)]
                      for s in range(depth)]

    def close(self) -> None:
        for slot in self.slots:
            for v in slot:
                v.release()
        self.slots = []
        self.mv.release()
        self.map.close()


class Run:
    """A closed loop keeping `depth` IORequests in flight for `secs` seconds."""

    def __init__(self, backing: bio.Backing, kind: str, bs: int, depth: int, secs: float,
                 seed: int, pages: Pages) -> None:
        self.op = "write" if kind.endswith("write") else "read"
        self.seq = kind.startswith("seq")
        self.bs, self.depth, self.secs = bs, depth, secs
        self.blocks = backing.size // bs
        self.rng = random.Random(seed)
        self.next_block = self.rng.randrange(self.blocks)
        self.pages = pages
        self.free = list(range(depth))
        self.lat: list[int] = []
        self.done = self.errors = self.inflight = 0
        self.submit = None
        self.fut: asyncio.Future | None = None
        self.deadline = 0

    def new(self, n: int) -> list[bio.IORequest]:
        out = []
        t = now_ns()
        for _ in range(n):
            slot = self.free.pop()
            if self.seq:
                off = (self.next_block % self.blocks) * self.bs
                self.next_block += 1
            else:
                off = self.rng.randrange(self.blocks) * self.bs
            r = bio.IORequest(self.op, off, self.pages.slots[slot], self.bs)
            r.slot, r.t0 = slot, t
            out.append(r)
        self.inflight += n
        return out

    def completed(self, reqs: list[bio.IORequest]) -> None:
        t = now_ns()
        lat, free = self.lat, self.free
        for r in reqs:
            lat.append(t - r.t0)
            free.append(r.slot)
            if r.error:
                self.errors += 1
        n = len(reqs)
        self.done += n
        self.inflight -= n
        if t < self.deadline:
            self.submit(self.new(n))
        elif self.inflight == 0 and not self.fut.done():
            self.fut.set_result(t)

    async def go(self, submit) -> float:
        self.submit = submit
        self.fut = asyncio.get_running_loop().create_future()
        t0 = now_ns()
        self.deadline = t0 + int(self.secs * 1e9)
        submit(self.new(self.depth))
        t1 = await self.fut
        return (t1 - t0) / 1e9


# -- (a) blkback's pool, batched as device.py's Blkback._submit ------------------------------
class PoolPath:
    name = "pool"

    def __init__(self, backing: bio.Backing, run: Run) -> None:
        self.loop = asyncio.get_running_loop()
        self.backing, self.run = backing, run

    def _done(self, fut: asyncio.Future) -> None:
        self.run.completed(fut.result())

    def submit(self, batch: list[bio.IORequest]) -> None:
        n = len(batch)
        k = max(1, min(blkdev.JOBS_PER_BATCH, -(-n // blkdev.REQS_PER_JOB)))
        size = -(-n // k)
        for i in range(0, n, size):
            fut = self.loop.run_in_executor(bio.pool(), self.backing.run_batch, batch[i:i + size])
            fut.add_done_callback(self._done)

    def close(self) -> None:
        pass


# -- (b) io_uring through liburing -----------------------------------------------------------
class UringPath:
    name = "uring"

    def __init__(self, backing: bio.Backing, run: Run, entries: int = 64) -> None:
        self.loop = asyncio.get_running_loop()
        self.fd, self.run = backing.fd, run
        self.ring = L.io_uring()
        L.io_uring_queue_init(entries, self.ring, 0)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        L.io_uring_register_eventfd(self.ring, self.efd)
        self.cqe = L.io_uring_cqe()
        self.pending: dict[int, tuple[bio.IORequest, object]] = {}
        self.next_id = 1
        self.loop.add_reader(self.efd, self._on_event)

    def submit(self, batch: list[bio.IORequest]) -> None:
        ring, fd = self.ring, self.fd
        for r in batch:
            sqe = L.io_uring_get_sqe(ring)
            iov = L.iovec(list(r.bufs))          # kept alive in `pending` until completion
            if r.op == "write":
                L.io_uring_prep_writev(sqe, fd, iov, len(r.bufs), r.offset)
            else:
                L.io_uring_prep_readv(sqe, fd, iov, r.offset)
            uid = self.next_id
            self.next_id += 1
            L.io_uring_sqe_set_data64(sqe, uid)
            self.pending[uid] = (r, iov)
        L.io_uring_submit(ring)

    def _on_event(self) -> None:
        try:
            os.eventfd_read(self.efd)           # reset first: later CQEs signal again
        except BlockingIOError:
            pass
        ring, cqe, pending = self.ring, self.cqe, self.pending
        done = []
        while L.io_uring_peek_cqe(ring, cqe) == 0:
            uid, res = cqe.user_data, cqe.res
            L.io_uring_cqe_seen(ring, cqe)
            r, _iov = pending.pop(uid)
            if res < 0:
                r.error = -res
            elif res != r.length:                # a real backend would resubmit the rest
                r.error = 5
            done.append(r)
        if done:
            self.run.completed(done)

    def close(self) -> None:
        self.loop.remove_reader(self.efd)
        L.io_uring_unregister_eventfd(self.ring)
        L.io_uring_queue_exit(self.ring)
        os.close(self.efd)


# -- (d) asyncio.to_thread per request -------------------------------------------------------
class ThreadPath:
    name = "thread"

    def __init__(self, backing: bio.Backing, run: Run) -> None:
        self.loop = asyncio.get_running_loop()
        self.backing, self.run = backing, run
        self.tasks: set[asyncio.Task] = set()

    def submit(self, batch: list[bio.IORequest]) -> None:
        for r in batch:
            t = self.loop.create_task(asyncio.to_thread(self.backing.do, r))
            self.tasks.add(t)
            t.add_done_callback(lambda t, r=r: (self.tasks.discard(t), self.run.completed([r])))

    def close(self) -> None:
        pass


# -- (c) the ceiling --------------------------------------------------------------------------
def sync_run(backing: bio.Backing, kind: str, bs: int, secs: float, seed: int,
             pages: Pages) -> tuple[float, int, list[int]]:
    fd, bufs = backing.fd, pages.slots[0]
    write = kind.endswith("write")
    seq = kind.startswith("seq")
    blocks = backing.size // bs
    rng = random.Random(seed)
    blk = rng.randrange(blocks)
    lat: list[int] = []
    n = 0
    t0 = now_ns()
    end = t0 + int(secs * 1e9)
    t = t0
    while t < end:
        for _ in range(64):
            if seq:
                off = (blk % blocks) * bs
                blk += 1
            else:
                off = rng.randrange(blocks) * bs
            a = now_ns()
            got = os.pwritev(fd, bufs, off) if write else os.preadv(fd, bufs, off)
            b = now_ns()
            if got != bs:
                raise OSError(5, f"short {'write' if write else 'read'}: {got}")
            lat.append(b - a)
        n += 64
        t = now_ns()
    return (t - t0) / 1e9, n, lat


async def measure(path_cls, backing: bio.Backing, kind: str, bs: int, depth: int, secs: float,
                  seed: int) -> tuple[float, int, list[int], int]:
    pages = Pages(depth, bs)
    run = Run(backing, kind, bs, depth, secs, seed, pages)
    p = path_cls(backing, run)
    try:
        el = await run.go(p.submit)
    finally:
        p.close()
        pages.close()
    return el, run.done, run.lat, run.errors


async def sanity(backing: bio.Backing, paths: list) -> None:
    """Every path reads the same bytes as os.pread at a few offsets (catches buffer bugs)."""
    for off in (0, backing.size // 2 + 4096, backing.size - 65536):
        want = os.pread(backing.fd, 65536, off)
        for cls in paths:
            pages = Pages(1, 65536)
            run = Run(backing, "read", 65536, 1, 0.0, 0, pages)
            p = cls(backing, run)
            fut = asyncio.get_running_loop().create_future()
            run.submit = p.submit
            run.completed = lambda reqs, f=fut: f.set_result(reqs)
            r = bio.IORequest("read", off, pages.slots[0], 65536)
            r.slot, r.t0 = 0, now_ns()
            p.submit([r])
            (r,) = await fut
            got = bytes(pages.map[:65536])
            p.close()
            pages.close()
            if r.error or got != want:
                raise SystemExit(f"{cls.name}: wrong data at {off} (error {r.error})")


class Stores:
    def __init__(self, td: str, want_loop: bool) -> None:
        self.td, self.want_loop = td, want_loop
        self.loop_dev: str | None = None
        self.targets: dict[str, str] = {}
        self.notes: list[str] = []

    def __enter__(self) -> "Stores":
        tag = uuid.uuid4().hex[:12]
        f = os.path.join(self.td, f"aiovmm-blkio-{tag}.img")
        prefill(f, SIZE_MIB)
        self.targets["file"] = f
        if not self.want_loop:
            return self
        if os.geteuid() != 0 or shutil.which("losetup") is None:
            self.notes.append("loop device skipped (needs root and losetup)")
            return self
        lb = os.path.join(self.td, f"aiovmm-blkio-loop-{tag}.img")
        prefill(lb, SIZE_MIB)
        try:
            self.loop_dev = _sh("losetup", "--find", "--show", lb)
        except RuntimeError as e:
            self.notes.append(f"loop device skipped ({e})")
            return self
        self.targets["loop"] = self.loop_dev
        return self

    def __exit__(self, *exc) -> None:
        if self.loop_dev:
            _sh("losetup", "-d", self.loop_dev, check=False)


def fmt_line(store, kind, depth, name, iops, mbs, p50_us, runs) -> str:
    d = "-" if depth is None else f"d{depth}"
    return (f"{store:4s} {kind:9s} {d:>3s} {name:6s} {iops:9.0f} IOPS {mbs:8.1f} MB/s "
            f"p50 {p50_us:8.1f} us   (runs {', '.join(f'{x / 1000:.1f}k' for x in runs)})")


async def amain(args) -> dict[str, object]:
    out: dict[str, object] = {"liburing": LIBURING.split(" ")[0]}
    paths: list = [PoolPath]
    if L is not None:
        paths.append(UringPath)
    else:
        print(f"note: liburing {LIBURING}: measuring pool, thread and sync only")
    if L is None or args.to_thread:
        paths.append(ThreadPath)
    print(f"uvloop {uvloop.__version__}, liburing {LIBURING}, pool {bio.POOL_WORKERS} workers, "
          f"jobs of {blkdev.REQS_PER_JOB} (at most {blkdev.JOBS_PER_BATCH} per batch), "
          f"{args.reps} x {args.secs} s per cell", flush=True)
    # Start the pool's threads before timing anything.
    await asyncio.gather(*(bio.run(time.sleep, 0.001) for _ in range(bio.POOL_WORKERS)))
    ratios = []
    with tempfile.TemporaryDirectory(prefix="aiovmm-bench-blkio-") as td, \
            Stores(td, not args.no_loop) as stores:
        for note in stores.notes:
            print("note:", note)
        for store, target in stores.targets.items():
            backing = await bio.run(bio.Backing.open_blocking, target, False)
            try:
                warm(backing.fd)
                await sanity(backing, paths)
                for kind, bs in PATTERNS:
                    # (c) the ceiling
                    res = [sync_run(backing, kind, bs, args.secs, 7 + rep, Pages(1, bs))
                           for rep in range(args.reps)]
                    iops_runs = [n / el for el, n, _ in res]
                    iops = statistics.median(iops_runs)
                    p50 = statistics.median(statistics.median(lat) for _, _, lat in res) / 1000
                    print(fmt_line(store, kind, None, "sync", iops, iops * bs / 1e6, p50, iops_runs),
                          flush=True)
                    out[f"{store}_{kind}_sync_iops"] = round(iops)
                    for depth in DEPTHS:
                        cell: dict[str, list] = {p.name: [] for p in paths}
                        for rep in range(args.reps):
                            for cls in paths:       # interleaved: drift hits all methods alike
                                el, n, lat, errs = await measure(cls, backing, kind, bs, depth,
                                                                 args.secs, 1000 * rep + depth)
                                if errs:
                                    raise SystemExit(f"{cls.name} {store} {kind} d{depth}: {errs} errors")
                                cell[cls.name].append((n / el, statistics.median(lat)))
                        got = {}
                        for name, rs in cell.items():
                            iops = statistics.median(x for x, _ in rs)
                            p50 = statistics.median(y for _, y in rs) / 1000
                            got[name] = iops
                            print(fmt_line(store, kind, depth, name, iops, iops * bs / 1e6, p50,
                                           [x for x, _ in rs]), flush=True)
                            key = f"{store}_{kind}_d{depth}_{name}"
                            out[f"{key}_iops"] = round(iops)
                            out[f"{key}_p50us"] = round(p50, 1)
                        if "uring" in got:
                            r = got["uring"] / got["pool"]
                            ratios.append(r)
                            out[f"{store}_{kind}_d{depth}_uring_over_pool"] = round(r, 2)
            finally:
                backing.close()
    if ratios:
        out["uring_over_pool_min"] = round(min(ratios), 2)
        out["uring_over_pool_max"] = round(max(ratios), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--secs", type=float, default=0.4, help="seconds per run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--to-thread", action="store_true", help="also measure asyncio.to_thread")
    ap.add_argument("--no-loop", action="store_true", help="file only")
    args = ap.parse_args()
    out = uvloop.run(amain(args))
    print(" ".join(f"{k}={v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
