"""netback's grant copies per 64 KiB frame, host CPU only (issue 14, network): the batched
API (grants.host_copy_to_many / host_copy_from_many: one packet's slots in one call) against
the same pieces copied one host_copy_to / host_copy_from call each (in this tree those are
the batch of one piece: the before is the per-slot half run against an older tree),
interleaved in one run (medians of --reps rounds of --frames frames; the load average with
them).

A parked guest (aiovmm.lab) grants 17 of its frames to domid 0; a "frame" is 16 pages and a
1,500-byte tail (65,536 + 1,500 bytes, netback's rx layout of a 64 KiB GSO frame) written
into 17 grants, or read out of them (tx). No vCPU runs: what is timed is the Python path of
the copy alone (thread CPU time), the part of netback's per-packet cost the loop thread pays.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from aiovmm import Hypervisor, grants, lab                # noqa: E402
from aiovmm.abi import PAGE_SIZE                            # noqa: E402
from aiovmm.grants import GTF_permit_access                 # noqa: E402
from conftest import kernel                                 # noqa: E402

NREFS = 17
FIRST_REF = 10


def per_slot_to(dom, pieces) -> None:
    for ref, off, data in pieces:
        grants.host_copy_to(dom, ref, off, data)


def batch_to(dom, pieces) -> None:
    errs = grants.host_copy_to_many(dom, pieces)
    assert not any(errs)


def per_slot_from(dom, segs) -> None:
    buf = bytearray(12)
    for ref, off, n in segs:
        buf += grants.host_copy_from(dom, ref, off, n)


def batch_from(dom, segs) -> None:
    buf = bytearray(12)
    grants.host_copy_from_many(dom, segs, buf)


def timed(fn, dom, arg, frames: int) -> float:
    t0 = time.thread_time_ns()
    for _ in range(frames):
        fn(dom, arg)
    return (time.thread_time_ns() - t0) / frames / 1e3


async def main(args) -> None:
    async with Hypervisor(memory_mib=64) as hv:
        p = lab.park(hv, kernel(), 8, "frontend")
        for k in range(NREFS):
            p.write_grant(FIRST_REF + k, GTF_permit_access, 0, p.spare[k])
        data = memoryview(os.urandom(16 * PAGE_SIZE + 1500))
        pieces = [(FIRST_REF + k, 0, data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]) for k in range(16)]
        pieces.append((FIRST_REF + 16, 0, data[16 * PAGE_SIZE:]))
        segs = [(ref, off, len(d)) for ref, off, d in pieces]
        kinds = {"to/per-slot": (per_slot_to, pieces), "to/batch": (batch_to, pieces),
                 "from/per-slot": (per_slot_from, segs), "from/batch": (batch_from, segs)}
        res: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.reps):
            for k, (fn, arg) in kinds.items():
                res[k].append(timed(fn, p.dom, arg, args.frames))
        print(f"load {os.getloadavg()[0]:.2f}; us of thread CPU per 64 KiB frame (17 grants), "
              f"median of {args.reps} x {args.frames}:")
        for k, v in res.items():
            print(f"  {k:14s} {statistics.median(v):7.1f}")
        for d in ("to", "from"):
            print(f"  {d}: batch/per-slot = "
                  f"{statistics.median(res[d + '/batch']) / statistics.median(res[d + '/per-slot']):.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--frames", type=int, default=300)
    asyncio.run(main(ap.parse_args()))
