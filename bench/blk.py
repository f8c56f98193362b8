"""Block I/O: a guest (blkfront -> blkback) against the host doing the same I/O with the same
machinery, for three backing stores in one run: a file, a loop device and an LVM logical
volume (served from its PV's extents, no device-mapper).

Patterns (each on a pre-filled 64 MiB store, warm in the page cache):
- seqread / seqwrite: sequential 1 MiB I/O. A blkif request carries at most 11 pages
  (44 KiB, no indirect descriptors), so the guest issues each MiB as a chain of 44 KiB
  requests (bs=88 sectors) with up to 32 (the whole ring) in flight; MB/s.
- randread / randwrite: 4 KiB at random 4 KiB-aligned offsets, 32 in flight; IOPS.

Reference: host Python os.preadv/os.pwritev on the same file/device, through the same thread
pool and the same `Backing.run_batch` jobs as blkback (backends/block/io.py), submitted with
the same batching rule (a batch of n -> ceil(n / REQS_PER_JOB) jobs, at most JOBS_PER_BATCH),
keeping the same depth in flight: 1 MiB requests for the sequential patterns (depth 4), 4 KiB
for the random ones (depth 32). Writes are timed without the final flush in both.
`ratio` = guest / reference (1.0 = the guest costs nothing). Targets: seq >= 0.5, rand >= 0.3.

Needs root for the loop device and the LV (skipped with a note otherwise).
Last line: key=value ...
"""
from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import re
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

from aiovmm import Hypervisor                       # noqa: E402
from aiovmm.abi import ShutdownReason               # noqa: E402
from aiovmm.backends.block import device as blkdev  # noqa: E402
from aiovmm.backends.block import io as bio         # noqa: E402

GUEST = os.path.join(ROOT, "guests/build/tests/blk.elf")
M64 = (1 << 64) - 1
SIZE_MIB = 64
SEQ_BS = 88 * 512                 # the largest blkif request (11 pages)
LVM_CONFIG = "global { activation = 0 }"


def _sh(*cmd: str, check: bool = True) -> str:
    env = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")
    r = subprocess.run(list(cmd), capture_output=True, text=True, env=env)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout.strip()


def offsets(kind: str, ops: int, bs: int, span: int, seed: int) -> list[int]:
    """Byte offsets of blk.c's bench pattern (same LCG)."""
    blocks = span // bs
    if kind.startswith("seq"):
        return [(i % blocks) * bs for i in range(ops)]
    out, st = [], seed
    for _ in range(ops):
        st = (st * 6364136223846793005 + 1442695040888963407) & M64
        out.append(((st >> 33) % blocks) * bs)
    return out


async def reference(backing: bio.Backing, kind: str, bs: int, ops: int, depth: int, span: int,
                    seed: int) -> float:
    """Seconds for the host to do the pattern through blkback's pool and run_batch."""
    loop = asyncio.get_running_loop()
    buf = mmap.mmap(-1, bs * depth)
    views = [memoryview(buf)[i * bs:(i + 1) * bs] for i in range(depth)]
    free = list(range(depth))
    offs = offsets(kind, ops, bs, span, seed)
    op = "write" if kind.endswith("write") else "read"
    pending: set[asyncio.Future] = set()
    issued = 0
    t0 = time.perf_counter()
    while issued < ops or pending:
        batch = []
        while issued < ops and free:
            slot = free.pop()
            batch.append((slot, bio.IORequest(op, offs[issued], [views[slot]], bs)))
            issued += 1
        if batch:
            k = max(1, min(blkdev.JOBS_PER_BATCH, -(-len(batch) // blkdev.REQS_PER_JOB)))
            size = -(-len(batch) // k)
            for i in range(0, len(batch), size):
                chunk = batch[i:i + size]
                fut = loop.run_in_executor(bio.pool(), backing.run_batch, [r for _, r in chunk])
                fut.slots = [s for s, _ in chunk]
                pending.add(fut)
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for f in done:
            for r in f.result():
                if r.error:
                    raise SystemExit(f"reference I/O error {r.error}")
            free.extend(f.slots)
    sec = time.perf_counter() - t0
    for v in views:
        v.release()
    buf.close()
    return sec


async def guest_run(target: str, kind: str, bs: int, ops: int, depth: int, span: int, seed: int):
    async with Hypervisor(memory_mib=256) as hv:
        dom = await hv.create(GUEST, memory_mib=16, disks=[f"target={target},vdev=xvda,access=rw"],
                              cmdline=f"mode=bench bench={kind} ops={ops} depth={depth} "
                                      f"span={span // 512} bs={bs // 512} pattern={seed}")
        reason = await asyncio.wait_for(dom.wait(), 300)
        res = {}
        for line in dom.console_lines:
            m = re.fullmatch(r"result (\S+) (\S+)", line)
            if m:
                res[m.group(1)] = m.group(2)
        if reason != ShutdownReason.poweroff or res.get("errors") != "0" or int(res.get("bench_ops", 0)) != ops:
            raise SystemExit(f"guest failed on {target}: {reason} {dom.console_lines[-5:]}")
        return int(res["io_ns"]) / 1e9, dom.backends[0].stats


def prefill(path: str, size_mib: int) -> None:
    with open(path, "r+b" if path.startswith("/dev/") else "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size_mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


class Stores:
    """file, loop device, LV (on a second loop device); removed on exit, even on failure."""

    def __init__(self, td: str) -> None:
        self.td = td
        self.loops: list[str] = []
        self.vg: str | None = None
        self.pv: str | None = None
        self.targets: dict[str, str] = {}
        self.notes: list[str] = []

    def __enter__(self) -> "Stores":
        f = os.path.join(self.td, "disk.img")
        prefill(f, SIZE_MIB)
        self.targets["file"] = f
        if os.geteuid() != 0 or shutil.which("losetup") is None:
            self.notes.append("loop/lv skipped (needs root and losetup)")
            return self
        lb = os.path.join(self.td, "loop.img")
        prefill(lb, SIZE_MIB)
        dev = _sh("losetup", "--find", "--show", lb)
        self.loops.append(dev)
        self.targets["loop"] = dev
        if shutil.which("lvm") is None:
            self.notes.append("lv skipped (no lvm2)")
            return self
        pb = os.path.join(self.td, "pv.img")
        with open(pb, "wb") as fh:
            fh.truncate((SIZE_MIB + 16) << 20)
        pv = _sh("losetup", "--find", "--show", pb)
        self.loops.append(pv)
        cfg = ["--config", LVM_CONFIG]
        vg = f"aiovmmbench{uuid.uuid4().hex[:8]}"
        _sh("pvcreate", "-q", *cfg, pv)
        self.pv = pv
        _sh("vgcreate", "-q", *cfg, "-s", "4M", vg, pv)
        self.vg = vg
        _sh("lvcreate", "-q", *cfg, "-an", "-Zn", "-L", f"{SIZE_MIB}M", "-n", "lv0", vg)
        pe_start = int(_sh("pvs", *cfg, "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", pv))
        with open(pv, "r+b") as fh:                   # lv0 = the first extents of the PV
            fh.seek(pe_start)
            chunk = os.urandom(1 << 20)
            for _ in range(SIZE_MIB):
                fh.write(chunk)
            os.fsync(fh.fileno())
        self.targets["lv"] = f"lvm:{vg}/lv0"
        return self

    def __exit__(self, *exc) -> None:
        cfg = ["--config", LVM_CONFIG]
        if self.vg:
            _sh("vgremove", "-q", "-f", *cfg, self.vg, check=False)
        if self.pv:
            _sh("pvremove", "-q", "-ff", "-y", *cfg, self.pv, check=False)
        for d in self.loops:
            _sh("losetup", "-d", d, check=False)


async def open_backing(target: str) -> bio.Backing:
    cfg = blkdev.DiskConfig.parse(f"{target},xvda,w")
    bb = blkdev.Blkback.__new__(blkdev.Blkback)       # only for its open_backing()
    bb.cfg, bb.readonly = cfg, False
    return await bb.open_backing()


PATTERNS = [("seqread", SEQ_BS, 32, 1 << 20, 4), ("seqwrite", SEQ_BS, 32, 1 << 20, 4),
            ("randread", 4096, 32, 4096, 32), ("randwrite", 4096, 32, 4096, 32)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-mib", type=int, default=128, help="MiB moved per sequential run")
    ap.add_argument("--rand-ops", type=int, default=4000, help="4 KiB requests per random run")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    span = SIZE_MIB << 20
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="aiovmm-bench-blk-") as td, Stores(td) as stores:
        for note in stores.notes:
            print("note:", note)
        for store, target in stores.targets.items():
            for kind, gbs, gdepth, rbs, rdepth in PATTERNS:
                seq = kind.startswith("seq")
                total = args.seq_mib << 20 if seq else args.rand_ops * 4096
                gops, rops = total // gbs, total // rbs
                g, r = [], []
                for rep in range(args.reps):
                    sec, stats = asyncio.run(guest_run(target, kind, gbs, gops, gdepth, span, 12345 + rep))
                    g.append(sec)

                    async def ref():
                        b = await open_backing(target)
                        try:
                            return await reference(b, kind, rbs, rops, rdepth, span, 12345 + rep)
                        finally:
                            b.close()
                    r.append(asyncio.run(ref()))
                gs, rs = statistics.median(g), statistics.median(r)
                if seq:
                    gv, rv, unit = total / gs / 1e6, total / rs / 1e6, "MB/s"
                else:
                    gv, rv, unit = gops / gs, rops / rs, "IOPS"
                ratio = gv / rv
                print(f"{store:4s} {kind:9s} guest {gv:9.0f} {unit:4s}  reference {rv:9.0f} {unit:4s}  "
                      f"ratio {ratio:5.2f}  (guest runs {[round(total / x / 1e6 if seq else gops / x) for x in g]};"
                      f" last: batches={stats.batches} jobs={stats.jobs} events={stats.events_sent}"
                      f" max_inflight={stats.max_inflight})", flush=True)
                key = f"{store}_{kind}"
                out[f"{key}_{'mbs' if seq else 'iops'}"] = round(gv)
                out[f"{key}_ref"] = round(rv)
                out[f"{key}_ratio"] = round(ratio, 2)
    seq_r = [v for k, v in out.items() if k.endswith("_ratio") and "_seq" in k]
    rnd_r = [v for k, v in out.items() if k.endswith("_ratio") and "_rand" in k]
    out["min_seq_ratio"] = min(seq_r)
    out["min_rand_ratio"] = min(rnd_r)
    out["seq_target_met"] = int(min(seq_r) >= 0.5)
    out["rand_target_met"] = int(min(rnd_r) >= 0.3)
    print(" ".join(f"{k}={v}" for k, v in out.items()))


if __name__ == "__main__":
    uvloop.install()
    main()
