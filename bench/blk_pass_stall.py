"""How long blkback holds the event loop at a hostile frontend's worst, next to the ordinary
case measured in the same run (red team s19). Wall and thread time per call, medians over
--reps rounds, interleaved (the machine is shared: compare within one run).

  ref      one _drain + _answer of 768 segments (three 256-segment indirect READs), every
           grant a persistent one already held (a Linux blkfront's steady state: the
           whole-page fast path)
  churn    the same, every segment on a grant beyond the persistent bound (mapped for the
           request, validated each time), plus the _answer that unmaps them
  purge    _purge_persistent with the pool over its bound and a full 16-page ring of
           256-segment requests in flight (every live segment is scanned for the active set)

    .venv/bin/python bench/blk_pass_stall.py [--reps 5]

--served: blkback's own _serve on a 16-page ring a frontend keeps full, and a bystander's
1 ms timer on the same loop (how late it fires: what another guest's events wait), for
no frontend, one on held persistent grants, one beyond the bound, one without
feature-persistent; --reps interleaved rounds of --seconds each. --ab-cost: the last two
again with TRANSIENT_SEGMENT_COST 1 (every segment counted alike, as before it), in the
same rounds.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import struct
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)


def timed(fn) -> tuple[float, float]:
    w, t = time.perf_counter_ns(), time.thread_time_ns()
    fn()
    return (time.perf_counter_ns() - w) / 1e6, (time.thread_time_ns() - t) / 1e6


@contextlib.asynccontextmanager
async def attacker(disk_bytes: int):
    """A hypervisor, a parked 32 MiB domain (the frontend) and a sparse disk image."""
    from aiovmm import Hypervisor, lab
    from conftest import kernel
    with tempfile.TemporaryDirectory(prefix="aiovmm-blkstall-") as td:
        img = os.path.join(td, "d.img")
        with open(img, "wb") as f:
            f.truncate(disk_bytes)
        async with Hypervisor(memory_mib=128) as hv:
            yield hv, lab.park(hv, kernel(), 32, "attacker"), img


async def measure(reps: int) -> dict[str, list[tuple[float, float]]]:
    from aiovmm import lab
    from aiovmm.backends.block import device as dev
    from aiovmm.grants import GTF_permit_access, GTF_readonly
    from test_redteam_blk import attach, indirect
    out: dict[str, list[tuple[float, float]]] = {"ref": [], "churn": [], "purge": []}
    async with attacker(64 << 20) as (hv, a, img):
        bb = await attach(hv, a, img, persistent=True)
        ring = hv.mem.frame(a.spare[-1])
        data = a.spare[0:64]
        nind = 8
        ind = a.spare[64:64 + nind]
        held = list(range(100, 100 + dev.MAX_PERSISTENT_GRANTS))
        beyond = list(range(1200, 1200 + 768))         # the table's 2,048 entries allow 768 more
        for k, g in enumerate(held + beyond):
            a.write_grant(g, GTF_permit_access, 0, data[k % len(data)])
        for i, f in enumerate(ind):
            a.write_grant(20 + i, GTF_permit_access | GTF_readonly, 0, f)

        def descs(i: int, grefs: list[int]) -> None:
            hv.mem.frame(ind[i])[:8 * len(grefs)] = b"".join(struct.pack("<IBB2x", g, 0, 7) for g in grefs)

        # Fill the pool to its bound (first use maps and keeps).
        for k in range(0, len(held), 256):
            descs(0, held[k:k + 256])
            p = bb._prepare(indirect(dev.BLKIF_OP_READ, k, 0, len(held[k:k + 256]), [20]))
            bb._release(p)
        assert len(bb._pgnts) == dev.MAX_PERSISTENT_GRANTS
        per = 3                              # 768 segments per pass, both cases

        def publish(grefs: list[int]) -> None:
            prod = bb.ring.req_cons
            for r in range(per):
                descs(r, grefs[256 * r:256 * (r + 1)])
                slot = 64 + ((prod + r) % bb.ring.nr_ents) * dev.SLOT
                ring[slot:slot + dev.SLOT] = indirect(dev.BLKIF_OP_READ, r, 0, 256, [20 + r])[:dev.SLOT]
            struct.pack_into("<I", ring, 0, (prod + per) & 0xFFFFFFFF)

        def drain_then_answer(grefs: list[int]) -> None:
            publish(grefs)
            bb._submit = lambda batch: bb._done.extend(batch)     # no I/O: the loop's part only
            bb._drain()
            bb._answer()

        for _ in range(reps):
            bb._next_lru = float("inf")                           # purges measured apart
            out["ref"].append(timed(lambda: drain_then_answer(held[:768])))
            out["churn"].append(timed(lambda: drain_then_answer(beyond)))
            # A full ring in flight on held grants, the pool over its bound.
            live = []
            for r in range(512):
                descs(0, held[(r * 256) % 768:(r * 256) % 768 + 256])
                p = bb._prepare(indirect(dev.BLKIF_OP_READ, r, 0, 256, [20]))
                bb._live[id(p)] = p
                live.append(p)
            bb._poverflow = True
            bb._now = 1.0
            out["purge"].append(timed(bb._purge_persistent))
            for p in live:
                bb._release(p)
            # Refill what the purge dropped, for the next round.
            for k in range(0, len(held), 256):
                descs(0, held[k:k + 256])
                p = bb._prepare(indirect(dev.BLKIF_OP_READ, k, 0, len(held[k:k + 256]), [20]))
                bb._release(p)
        await bb._disconnect()
        bb.backing.close()
        lab.destroy(a)
    return out


# ------------------------------------------------------------------ the loop, served for real
async def lag_probe(stop: asyncio.Event, lags: list[float]) -> None:
    """A bystander's view of the loop: how late a 1 ms timer fires (what a guest's event,
    timer or packet waits on top of its own work)."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(0.001)
        lags.append((loop.time() - t - 0.001) * 1e3)


async def served(case: str, seconds: float, cost: int | None = None) -> list[float]:
    """Blkback's own _serve on a 16-page ring (512 entries) that a frontend keeps full of
    256-segment indirect READs: 'held' on grants kept persistent, 'beyond' on 2x more
    distinct grants than the bound (each pass maps and unmaps, the purge runs every 100 ms
    over a full ring in flight); 'transient': an honest frontend without feature-persistent
    (every segment mapped per request, as 'beyond'); 'idle': no frontend. Returns the
    bystander's lags (ms). `cost`: TRANSIENT_SEGMENT_COST for this run (the A/B)."""
    from aiovmm import lab
    from aiovmm.backends.block import Blkback, DiskConfig
    from aiovmm.backends.block import device as dev
    from aiovmm.grants import GTF_permit_access, GTF_readonly
    from test_redteam_blk import indirect
    async with attacker(1 << 30) as (hv, a, img):
        lags: list[float] = []
        stop = asyncio.Event()
        if case == "idle":
            probe = asyncio.create_task(lag_probe(stop, lags))
            await asyncio.sleep(seconds)
            stop.set()
            await probe
            lab.destroy(a)
            return lags
        if cost is not None:
            dev.TRANSIENT_SEGMENT_COST = cost
        bb = Blkback(a.dom, 0, DiskConfig.parse(f"target={img},vdev=xvda"))
        bb.backing = await bb.open_backing()
        pages = a.spare[-16:]
        st = hv.xenstore.store
        for i, f in enumerate(pages):
            a.write_grant(1 + i, GTF_permit_access, 0, f)
            hv.mem.frame(f)[:] = bytes(4096)
        port = a.dom.evtchn.alloc_unbound(0)
        keys = {"ring-page-order": "4", "event-channel": str(port), "protocol": "x86_64-abi",
                "feature-persistent": "0" if case == "transient" else "1", **{f"ring-ref{i}": str(1 + i) for i in range(16)}}
        for k, v in keys.items():
            st.write(f"{bb.front}/{k}", v)
        bb._connect()
        data = a.spare[0:64]
        grefs = list(range(100, 100 + (dev.MAX_PERSISTENT_GRANTS - 8 if case == "held" else 1900)))   # 8: the indirect pages
        for k, g in enumerate(grefs):
            a.write_grant(g, GTF_permit_access, 0, data[k % len(data)])
        ind = a.spare[64:64 + 8]
        for i, f in enumerate(ind):
            a.write_grant(20 + i, GTF_permit_access | GTF_readonly, 0, f)
            chunk = [grefs[(256 * i + j) % len(grefs)] for j in range(256)]
            hv.mem.frame(f)[:2048] = b"".join(struct.pack("<IBB2x", g, 0, 7) for g in chunk)
        ring = bb.ring
        raws = [indirect(dev.BLKIF_OP_READ, s, (s % 64) * 2048, 256, [20 + s % 8])[:dev.SLOT]
                for s in range(ring.nr_ents)]

        def publish(idx: int) -> None:
            off = ring.slot_off(idx)
            pg, o = divmod(off, 4096)
            raw = raws[idx % ring.nr_ents]
            first = min(dev.SLOT, 4096 - o)
            ring.pages[pg][o:o + first] = raw[:first]
            if first < dev.SLOT:
                ring.pages[pg + 1][:dev.SLOT - first] = raw[first:]

        async def frontend() -> None:
            """Keep the ring full: every answered slot is published again (a new request
            written over the response, as a frontend does), checked every 1 ms."""
            prod = 0
            while not stop.is_set():
                want = (ring.get(8) + ring.nr_ents) & 0xFFFFFFFF
                while prod != want:
                    publish(prod)
                    prod = (prod + 1) & 0xFFFFFFFF
                ring.put(0, prod)
                bb._kick.set()
                await asyncio.sleep(0.001)

        serve = asyncio.create_task(bb._serve())
        front = asyncio.create_task(frontend())
        await asyncio.sleep(0.5)                      # warm: the pool filled, the ring full
        probe = asyncio.create_task(lag_probe(stop, lags))
        reqs0 = bb.stats.rd_reqs
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(probe, front)
        bb.stats.rd_reqs -= reqs0
        if serve.done():
            print(f"  {case} cost {bb.transient_cost}: _serve ended: {serve.exception()!r}")
        serve.cancel()
        try:
            await serve
        except asyncio.CancelledError:
            pass
        print(f"  {case} cost {bb.transient_cost}: {bb.stats.rd_reqs / seconds:.0f} READs/s, {bb.stats.bad_requests} refused, {bb.stats.persistent_purged} purged, "
              f"{bb.stats.persistent_grants} kept")
        await bb._disconnect()
        bb.backing.close()
        a.dom.evtchn.close(port)
        lab.destroy(a)
        return lags


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main_served(rounds: int, seconds: float, ab: bool) -> None:
    from aiovmm.backends.block import device as dev
    cases = [("idle", None), ("held", None), ("beyond", None), ("transient", None)]
    if ab:                       # the same cases with every segment counted as a held one
        cases += [("beyond", 1), ("transient", 1)]
    res: dict[tuple, list[float]] = {c: [] for c in cases}
    default = dev.TRANSIENT_SEGMENT_COST
    for _ in range(rounds):                               # interleaved
        for case, cost in cases:
            res[(case, cost)] += asyncio.run(served(case, seconds, cost if cost is not None else default))
    dev.TRANSIENT_SEGMENT_COST = default
    print(f"load average {os.getloadavg()[0]:.1f}")
    for (case, cost), lags in res.items():
        label = case if cost is None else f"{case}@{cost}"
        print(f"{label:12s} bystander timer lateness: median {statistics.median(lags):6.2f} ms  "
              f"p99 {pct(lags, 0.99):6.2f} ms  max {max(lags):6.2f} ms  ({len(lags)} samples)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--served", action="store_true", help="the bystander's timer lateness under _serve")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--ab-cost", action="store_true", help="--served: also with TRANSIENT_SEGMENT_COST 1")
    args = ap.parse_args()
    if args.served:
        return main_served(args.reps, args.seconds, args.ab_cost)
    out = asyncio.run(measure(args.reps))
    print(f"load average {os.getloadavg()[0]:.1f}")
    ref = statistics.median(w for w, _ in out["ref"])
    for k, v in out.items():
        w = statistics.median(x for x, _ in v)
        t = statistics.median(y for _, y in v)
        print(f"{k:6s} wall {w:8.2f} ms  thread {t:8.2f} ms  ({w / ref:5.1f}x ref)")


if __name__ == "__main__":
    main()
