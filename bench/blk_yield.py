"""Guest notifications and exits per block request with and without blkback's drain at the
domain's slice ends (Domain.yield_drains; issue 14), alternated in one process.

The project's blkfront (guests/tests/blk.elf, mode=bench; it pushes with
RING_PUSH_REQUESTS_AND_CHECK_NOTIFY as Linux does) on one engine (KVM by default), a
pre-filled image file. Each round runs every pattern once with the drain on and once off
(the order alternating between rounds), a new domain each time, and reports per request:
the engine's exits, event_channel_op hypercalls, the frontend's notifications, blkback's
passes at slice ends, and requests per second of the run. Medians over --rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blk as blkbench                                    # noqa: E402  (bench/blk.py)

from aiovmm import Hypervisor, ShutdownReason              # noqa: E402
from aiovmm.backends.block import device as blkdev          # noqa: E402

PATTERNS = [("randread", 8, 1), ("randread", 8, 8), ("randwrite", 8, 8), ("seqread", 88, 8),
            ("seqwrite", 88, 8)]      # (bench, bs sectors, depth)


async def one(args, image: str, kind: str, bs: int, depth: int, drain: bool) -> dict[str, float]:
    blkdev.DRAIN_ON_YIELD = drain
    ops = args.ops if bs == 8 else args.ops // 4
    async with Hypervisor(memory_mib=64) as hv:
        dom = await hv.create(blkbench.GUEST, memory_mib=16, engine=args.engine,
                              cmdline=f"mode=bench bench={kind} ops={ops} depth={depth} bs={bs} "
                                      f"span={(args.mib << 11) - 88}",
                              disks=[f"target={image},vdev=xvda,access=rw"])
        bb = next(b for b in dom.backends if isinstance(b, blkdev.Blkback))
        await bb.connected.wait()
        eng = dom.vcpus[0].engine
        e0, h0, t0 = getattr(eng, "exits", 0), dom.hypercall_counts.get(32, 0), time.perf_counter()
        reason = await dom.wait()
        t = time.perf_counter() - t0
        res = dict(ln.split()[1:3] for ln in dom.console_lines if ln.startswith("result ") and len(ln.split()) == 3)
        if reason != ShutdownReason.poweroff or res.get("errors") != "0" or int(res.get("bench_ops", 0)) != ops:
            raise RuntimeError(f"{kind}: {dom.describe_end()} {dom.console_lines[-5:]}")
        s = bb.stats
        n = max(1, s.rd_reqs + s.wr_reqs)
        return {"req_s": n / t, "exits": (getattr(eng, "exits", 0) - e0) / n,
                "evtchn_op": (dom.hypercall_counts.get(32, 0) - h0) / n, "notifies": s.notifies / n,
                "yield_passes": s.yield_passes / n, "events": s.events_sent / n}


async def main(args) -> None:
    rows: dict[tuple, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="aiovmm-bench-blky-") as td:
        image = os.path.join(td, "disk.img")
        blkbench.prefill(image, args.mib)
        for rnd in range(args.rounds):
            for kind, bs, depth in PATTERNS:
                order = (True, False) if rnd % 2 == 0 else (False, True)
                for drain in order:
                    r = await one(args, image, kind, bs, depth, drain)
                    rows.setdefault((kind, bs, depth, drain), []).append(r)
                    print(f"[{rnd}] {kind} {bs * 512 // 1024} KiB depth {depth} drain={'on ' if drain else 'off'} "
                          + " ".join(f"{k}={v:.2f}" for k, v in r.items())
                          + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    print(f"medians over {args.rounds} rounds ({args.engine}):")
    for key, rs in rows.items():
        kind, bs, depth, drain = key
        print(f"  {kind:9s} {bs * 512 // 1024:2d} KiB d{depth} drain={'on ' if drain else 'off'} "
              + " ".join(f"{k}={statistics.median(r[k] for r in rs):.2f}" for k in rs[0]), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="kvm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ops", type=int, default=2000, help="4 KiB requests per run (44 KiB: a quarter)")
    ap.add_argument("--mib", type=int, default=64)
    uvloop.run(main(ap.parse_args()))
