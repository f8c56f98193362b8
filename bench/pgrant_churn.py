"""Red team (s19): the loop-thread cost of blkback's persistent-grant pool under a guest
that churns grants (every request names grants not in the pool, so the pool stays full and
each LRU_INTERVAL purge runs: Linux's purge_persistent_gnt), for the old bound (1,056) and
the new (4,112), interleaved in one run on a parked domain's real grants (real host_map /
close). Prints per bound the median wall time of one purge and of one churned grant (a map
that finds the pool full is a per-request map; the purge's victims are unmapped), and the
host heap the full pool holds (tracemalloc).

    .venv/bin/python bench/pgrant_churn.py [--rounds 7]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from aiovmm import Hypervisor, grants, lab  # noqa: E402
from aiovmm.grants import GTF_permit_access  # noqa: E402
from backends.block.device import LRU_INTERVAL, Blkback, DiskConfig  # noqa: E402
from conftest import kernel  # noqa: E402

NREFS = 6000


def _vbd(b, bound):
    v = Blkback(b.dom, 0, DiskConfig(target="/dev/null"))
    v.persistent = True
    v.max_persistent = bound
    return v


def _fill(v, refs):
    for r in refs:
        m, transient = v._map(r, False)
        if transient:
            m.close()


def churn(v, refs, passes):
    """`passes` LRU intervals, each naming 257 grants (a 1 MiB indirect request) not in the
    pool; returns (purge times, seconds per churned grant)."""
    purges, t_all, k = [], 0.0, 0
    for _ in range(passes):
        v._now += LRU_INTERVAL
        t0 = time.perf_counter()
        v._purge_persistent()
        t1 = time.perf_counter()
        purges.append(t1 - t0)
        for _ in range(257):
            r = refs[k % len(refs)]
            k += 1
            m, transient = v._map(r, False)
            if transient:
                m.close()
        t_all += time.perf_counter() - t0
    return purges, t_all / (257 * passes)


async def main(rounds):
    async with Hypervisor(memory_mib=96) as hv:
        b = lab.park(hv, kernel(), 48, "churn")
        b.dom.grants.grow((NREFS + 511) // 512 + 1)
        refs = list(range(16, 16 + NREFS))
        frames = b.spare
        for k, r in enumerate(refs):
            b.write_grant(r, GTF_permit_access, 0, frames[k % len(frames)])
        res = {1056: ([], []), 4112: ([], [])}
        heap = {}
        for rnd in range(rounds):
            for bound in ((1056, 4112) if rnd % 2 == 0 else (4112, 1056)):
                tracemalloc.start()
                v = _vbd(b, bound)
                _fill(v, refs[:bound])
                heap[bound] = tracemalloc.get_traced_memory()[0]
                tracemalloc.stop()
                purges, per = churn(v, refs, 40)
                res[bound][0].append(statistics.median(purges))
                res[bound][1].append(per)
                v._release_all_maps(list(v._pgnts.values()))
                v._pgnts.clear()
        load = os.getloadavg()[0]
        for bound, (p, g) in res.items():
            print(f"bound {bound}: purge median {statistics.median(p) * 1e6:.0f} us, "
                  f"per churned grant {statistics.median(g) * 1e6:.1f} us, "
                  f"pool heap {heap[bound] / 1024:.0f} KiB")
        r = statistics.median(res[4112][0]) / statistics.median(res[1056][0])
        print(f"purge 4112/1056 = {r:.2f}x; load {load:.1f}; {rounds} interleaved rounds")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    asyncio.run(main(ap.parse_args().rounds))
