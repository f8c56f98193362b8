"""Host CPU (thread time) blkback spends on one request, measured alone: a parked domain as
blkfront (tests/test_mutation_kills_block.Front), NSEG whole-page segments in one indirect
READ (256: 1 MiB), persistent grants warm, io_uring; _prepare, _submit
(io_uring_enter; with a cached read the copy, unless offloaded) and _answer, averaged over
--reps requests; and the Python heap one persistent grant holds (tracemalloc over the first
request, which maps them all).

    .venv/bin/python bench/blk_request_cpu.py [--nseg 256] [--backends DIR]

--backends DIR: another tree's `backends/` parent (e.g. `git archive <rev> backends | tar -x
-C DIR`) to compare an older blkback in the same minutes. Thread time, not wall time: on a
loaded shared machine wall time mostly measures preemption.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import struct
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)


async def measure(nseg: int, reps: int) -> dict[str, float]:
    from aiovmm import Hypervisor
    from aiovmm.grants import GTF_permit_access
    from backends.block import device as dev
    from test_mutation_kills_block import Front
    with tempfile.TemporaryDirectory(prefix="aiovmm-blkcpu-") as td:
        img = os.path.join(td, "d.img")
        with open(img, "wb") as f:
            f.write(os.urandom(8 << 20))
        async with Hypervisor(memory_mib=64) as hv:
            f = Front(hv, img)
            bb, d = f.bb, f.d
            bb.persistent = True
            bb.uring = dev.Uring.open(32)
            if bb.uring is None:
                raise SystemExit("io_uring unavailable")
            if hasattr(bb.uring, "after_reap"):
                bb.uring.after_reap = bb._after_reap
            ind = d.spare[1]
            for i in range(nseg):
                d.write_grant(100 + i, GTF_permit_access, 0, d.spare[2 + i])
            d.write_grant(99, GTF_permit_access, 0, ind)
            page = hv.mem.frame(ind)
            for i in range(nseg):
                struct.pack_into("<IBB2x", page, 8 * i, 100 + i, 0, 7)
            raw = bytearray(112)
            struct.pack_into("<BBH4xQQH2x8I", raw, 0, dev.BLKIF_OP_INDIRECT, dev.BLKIF_OP_READ, nseg,
                             1, 0, 0, 99, 0, 0, 0, 0, 0, 0, 0)
            raw = bytes(raw)
            t = {"prepare": 0, "submit": 0, "answer": 0}
            import gc
            import tracemalloc
            gc.collect()
            tracemalloc.start()
            m0 = tracemalloc.get_traced_memory()[0]
            for it in range(reps + 5):
                if it == 1:             # the first request mapped every grant persistently
                    gc.collect()
                    mem = (tracemalloc.get_traced_memory()[0] - m0) / len(bb._pgnts)
                    tracemalloc.stop()
                t0 = time.thread_time_ns()
                p = bb._prepare(raw)
                t1 = time.thread_time_ns()
                bb._submit([p])
                t2 = time.thread_time_ns()
                while bb._futures:
                    await asyncio.wait(set(bb._futures))
                await asyncio.sleep(0)
                t3 = time.thread_time_ns()
                if bb._done:
                    bb._answer()
                t4 = time.thread_time_ns()
                if it >= 5:
                    t["prepare"] += t1 - t0
                    t["submit"] += t2 - t1
                    t["answer"] += t4 - t3
                if bb.stats.errors:
                    raise SystemExit(f"request failed: {bb.stats}")
            bb.uring.close()
            return {k: v / reps / 1e3 for k, v in t.items()} | {"host bytes per persistent grant": mem}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nseg", type=int, default=256, help="whole-page segments per request (1..256)")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--backends", default=None, help="directory holding another tree's backends/")
    args = ap.parse_args()
    if args.backends:
        import backends
        backends.__path__.insert(0, os.path.join(args.backends, "backends"))
    r = asyncio.run(measure(args.nseg, args.reps))
    mem = r.pop("host bytes per persistent grant")
    print(f"{args.nseg} segments: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items())
          + f" us thread time per request (load {os.getloadavg()[0]:.1f}); Python heap per "
          f"persistent grant {mem:.0f} bytes (tracemalloc, the first request's mappings)")


if __name__ == "__main__":
    main()
