"""Block I/O: guest 4 KiB sequential/random read/write through blkfront -> blkback -> a file,
versus the host doing the same pattern with os.pread/os.pwrite on the same file.

Guest: guests/build/tests/blk.elf `mode=bench bench=<seqread|randread|seqwrite|randwrite>
ops=N depth=D span=S`: D requests of one 4 KiB segment in flight, timed by the guest's pvclock
(`result io_ns`). Writes end with one FLUSH (inside the timing of the backend, outside the
guest's io_ns). The file is pre-filled (not sparse) and warm in the page cache, like the host
reference, which runs in this process right after each guest run (same offsets: sequential
wraps over the span; random uses the same LCG).

Also sweeps REQS_PER_JOB (a drained batch becomes ceil(n / REQS_PER_JOB) thread-pool jobs, at
most JOBS_PER_BATCH) for random reads, since the thread hand-off is the backend's main cost.

Last line: key=value ... (iops and MB/s per pattern, guest and host, and the ratio).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time

import uvloop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from aiovmm import Hypervisor                       # noqa: E402
from aiovmm.abi import ShutdownReason               # noqa: E402
from aiovmm.backends.block import device as blkdev  # noqa: E402

GUEST = os.path.join(ROOT, "guests/build/tests/blk.elf")
M64 = (1 << 64) - 1


def offsets(kind: str, ops: int, span_sectors: int, seed: int) -> list[int]:
    blocks = span_sectors // 8
    if kind.startswith("seq"):
        return [((i * 8) % span_sectors) * 512 for i in range(ops)]
    out, st = [], seed
    for _ in range(ops):
        st = (st * 6364136223846793005 + 1442695040888963407) & M64
        out.append(((st >> 33) % blocks) * 8 * 512)
    return out


def host_run(path: str, kind: str, ops: int, span: int, seed: int) -> float:
    """Seconds for the host doing the same 4 KiB pattern with os.pread / os.pwrite."""
    offs = offsets(kind, ops, span, seed)
    buf = os.urandom(4096)
    fd = os.open(path, os.O_RDWR)
    try:
        t0 = time.perf_counter()
        if kind.endswith("read"):
            for o in offs:
                os.pread(fd, 4096, o)
        else:
            for o in offs:
                os.pwrite(fd, buf, o)
            os.fdatasync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


async def guest_run(path: str, kind: str, ops: int, depth: int, span: int, seed: int):
    async with Hypervisor(memory_mib=256) as hv:
        dom = await hv.create(GUEST, memory_mib=16,
                              cmdline=f"mode=bench bench={kind} ops={ops} depth={depth} span={span} pattern={seed}",
                              disks=[f"target={path},vdev=xvda,access=rw"])
        reason = await asyncio.wait_for(dom.wait(), 300)
        res = {}
        for line in dom.console_lines:
            m = re.fullmatch(r"result (\S+) (\S+)", line)
            if m:
                res[m.group(1)] = m.group(2)
        if reason != ShutdownReason.poweroff or res.get("errors") != "0" or int(res.get("bench_ops", 0)) != ops:
            raise SystemExit(f"guest failed: {reason} {dom.console_lines[-5:]}")
        return int(res["io_ns"]) / 1e9, dom.backends[0].stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=4000)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    span = args.size_mib * 2048
    with tempfile.TemporaryDirectory(prefix="aiovmm-bench-blk-") as td:
        path = os.path.join(td, "disk.img")
        with open(path, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(args.size_mib):
                f.write(chunk)
        out = {}
        for kind in ("seqread", "randread", "seqwrite", "randwrite"):
            g, h = [], []
            for rep in range(args.reps):
                sec, stats = asyncio.run(guest_run(path, kind, args.ops, args.depth, span, 12345 + rep))
                g.append(sec)
                h.append(host_run(path, kind, args.ops, span, 12345 + rep))
            gi, hi = args.ops / statistics.median(g), args.ops / statistics.median(h)
            print(f"{kind:9s} guest {gi:9.0f} IOPS {gi * 4096 / 1e6:7.1f} MB/s  host {hi:9.0f} IOPS "
                  f"{hi * 4096 / 1e6:7.1f} MB/s  ratio {hi / gi:6.1f}  (guest runs {[round(args.ops / x) for x in g]}; "
                  f"last: batches={stats.batches} jobs={stats.jobs} events={stats.events_sent} "
                  f"max_inflight={stats.max_inflight})")
            out[f"{kind}_iops"] = round(gi)
            out[f"{kind}_mbs"] = round(gi * 4096 / 1e6, 1)
            out[f"host_{kind}_iops"] = round(hi)
            out[f"{kind}_ratio"] = round(hi / gi, 1)
        sweep = {}
        default = blkdev.REQS_PER_JOB
        for jobs in (1, 4, 32):
            blkdev.REQS_PER_JOB = jobs
            secs = [asyncio.run(guest_run(path, "randread", args.ops, args.depth, span, 777))[0]
                    for _ in range(args.reps)]
            sweep[jobs] = args.ops / statistics.median(secs)
            print(f"randread reqs_per_job={jobs:2d}: {sweep[jobs]:9.0f} IOPS")
        blkdev.REQS_PER_JOB = default
        d1 = [asyncio.run(guest_run(path, "randread", args.ops // 4, 1, span, 99))[0] for _ in range(args.reps)]
        lat_us = statistics.median(d1) / (args.ops // 4) * 1e6
        print(f"randread depth=1: {lat_us:.1f} us per request (guest round trip)")
        out["randread_qd1_us"] = round(lat_us, 1)
        for j, v in sweep.items():
            out[f"randread_rpj{j}_iops"] = round(v)
        print(" ".join(f"{k}={v}" for k, v in out.items()))


if __name__ == "__main__":
    uvloop.install()
    main()
