"""Where a 1 MiB block request's wall time goes on the KVM engine (issue 14, block half), and
same-boot A/Bs of blkback's knobs that can change at run time.

One Debian Linux guest (bench/blk.py's kernel, fio initramfs and blkfront with 256 indirect
segments) on the KVM engine, fio's sequential jobs (1 MiB, iodepth 8, O_DIRECT libaio) --reps
times in one boot. Each round runs one variant (--variants, alternated: set on the running
blkback when the job starts, its window opening 1 s after the first request):
  default        as configured
  pg<N>          max persistent grants N per ring (AIOVMM_BLK_MAX_PGRANTS's value)
  off<N>         IOSQE_ASYNC from N bytes (URING_OFFLOAD_BYTES; off0 = every request on io-wq,
                 off<huge> = never: the copy inside io_uring_enter on the loop thread)
Per request, from timestamps taken on the loop thread (perf_counter) and by a watcher thread
blocked in epoll (edge-triggered) on io_uring's eventfd, which stamps each new CQ tail:
  drain -> enter     blkback took it off the ring .. io_uring_enter returned
  enter -> cqe       io_uring (io-wq) did the copy: the CQE's arrival (watcher)
  cqe -> reap        the completion waited for the loop (the vCPU's KVM_RUN holds it)
  reap -> answer     the response pushed
  answer -> next     the guest's turn: from a response to the next request's drain
and the loop thread's window split into: in the vCPU's KVM_RUN (engine.run), in blkback
(_pass, reap), and neither (the loop idle or other work), with the slices' count and ends.
Also transient grant maps per request (segments beyond the persistent-grant bound).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import select
import statistics
import struct
import sys
import tempfile
import threading
import time

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blk as blkbench                                    # noqa: E402
import blk_exits                                          # noqa: E402

from aiovmm import Hypervisor, grants                     # noqa: E402
from aiovmm.backends.block import device as blkdev        # noqa: E402

pc = time.perf_counter


class Trace:
    def __init__(self) -> None:
        self.on = False
        self.req: dict[int, dict] = {}          # id(pending) -> stamps
        self.done: list[dict] = []
        self.drains: list[tuple[float, int]] = []
        self.answers: list[float] = []
        self.runs: list[tuple[float, float, bool]] = []   # KVM_RUN: start, end, vCPU blocked after
        self.blk: list[tuple[float, float]] = []
        self.cqe_t: list[tuple[int, float]] = []          # (CQ tail seen, time)
        self.transient = 0
        self.depth = 0
        self.enters: list[tuple[float, float]] = []       # io_uring_enter (+ inline reap): wall, CPU
        self.blk_cpu = 0.0
        self.lock = threading.Lock()

    def reset(self) -> None:
        with self.lock:
            self.req.clear()
            self.done.clear()
            self.drains.clear()
            self.answers.clear()
            self.runs.clear()
            self.blk.clear()
            self.cqe_t.clear()
            self.transient = 0
            self.blk_cpu = 0.0
            self.enters.clear()


T = Trace()


def install(bb: blkdev.Blkback, vcpu) -> None:
    u = bb.uring
    eng = vcpu.engine
    run = eng.run

    def run_w(budget, max_ns=0):
        t0 = pc()
        try:
            return run(budget, max_ns)
        finally:
            if T.on:
                T.runs.append((t0, pc(), vcpu.blocked))
    eng.run = run_w

    for name in ("_pass", "_after_reap"):
        orig = getattr(bb, name)

        def timed(orig=orig):
            if T.depth:                           # nested (a reap inside _pass's submit)
                return orig()
            T.depth += 1
            t0, c0 = pc(), time.thread_time()
            try:
                return orig()
            finally:
                T.depth -= 1
                if T.on:
                    T.blk.append((t0, pc()))
                    T.blk_cpu += time.thread_time() - c0
        setattr(bb, name, timed)
    u.after_reap = bb._after_reap
    prep = bb._prepare

    def prepare(raw):
        p = prep(raw)
        if p is not None and T.on:
            T.req[id(p)] = {"drain": pc()}
            T.transient += len(p.maps)
        return p
    bb._prepare = prepare
    fl = u.flush

    def flush():
        fl_before, c0 = pc(), time.thread_time()
        r = fl()
        t = pc()
        if T.on:
            T.enters.append((t - fl_before, time.thread_time() - c0))
            for d in T.req.values():
                if "enter" not in d:
                    d["enter"] = t
                    d["enter0"] = fl_before
        return r
    u.flush = flush
    ud_done = bb._uring_done
    p_off = u.p.cq_head

    def uring_done(fut, p):
        if T.on:
            d = T.req.get(id(p))
            if d is not None:
                d["reap"] = pc()
                d["cq_index"] = struct.unpack_from("<I", u.cq, p_off)[0] - 1
        return ud_done(fut, p)
    bb._uring_done = uring_done
    ans = bb._answer

    def answer():
        ps = list(bb._done)
        r = ans()
        if T.on:
            t = pc()
            T.answers.append(t)
            for p in ps:
                d = T.req.pop(id(p), None)
                if d is not None and p not in bb._done:
                    d["answer"] = t
                    T.done.append(d)
        return r
    bb._answer = answer
    drain = bb._drain

    def drain_w():
        before = bb.stats.batches
        n0 = len(T.req)
        r = drain()
        if T.on and bb.stats.batches != before:
            T.drains.append((pc(), len(T.req) - n0))
        return r
    bb._drain = drain_w

    # The watcher: each write of the eventfd wakes an edge-triggered epoll; stamp the CQ tail.
    tail_off = u.p.cq_tail
    ep = select.epoll()
    ep.register(u.efd, select.EPOLLIN | select.EPOLLET)

    def watch():
        while not u.closed:
            try:
                ev = ep.poll(0.5)
            except OSError:
                return
            if ev and T.on:
                t = pc()
                try:
                    tail = struct.unpack_from("<I", u.cq, tail_off)[0]
                except ValueError:
                    return
                T.cqe_t.append((tail, t))
    threading.Thread(target=watch, daemon=True, name="cqe-watch").start()


def summarize(t0: float, t1: float, nreq: int) -> dict[str, float]:
    wall = t1 - t0
    out: dict[str, float] = {"req_s": nreq / wall}
    cqe = sorted(T.cqe_t)
    lags = collections.defaultdict(list)
    for d in T.done:
        if "enter" not in d or "reap" not in d or "answer" not in d:
            continue
        lags["drain->enter"].append(d["enter"] - d["drain"])
        lags["drain->enter0"].append(d["enter0"] - d["drain"])
        # The first watcher stamp whose tail passed this CQE's index (stamps are in time order).
        ci = d.get("cq_index")
        tc = next((t for tail, t in cqe if (tail - ci - 1) & 0x80000000 == 0 and t >= d["enter0"]), None)
        if tc is not None and tc <= d["reap"]:
            lags["enter->cqe"].append(max(0.0, tc - d["enter"]))
            lags["cqe->reap"].append(d["reap"] - tc)
        lags["reap->answer"].append(d["answer"] - d["reap"])
        lags["drain->answer"].append(d["answer"] - d["drain"])
    # The guest's turn: from each response push to the next drain that found requests.
    drains = [t for t, n in T.drains if n > 0]
    gaps = []
    j = 0
    for a in T.answers:
        while j < len(drains) and drains[j] <= a:
            j += 1
        if j < len(drains):
            gaps.append(drains[j] - a)
    lags["answer->next drain"] = gaps
    for k, v in lags.items():
        if v:
            out[k + " med us"] = statistics.median(v) * 1e6
            out[k + " mean us"] = statistics.fmean(v) * 1e6
    if T.enters:
        out["enter wall med us"] = statistics.median(w for w, _c in T.enters) * 1e6
        out["enter CPU med us"] = statistics.median(c for _w, c in T.enters) * 1e6
    run_t = sum(b - a for a, b, _ in T.runs)
    blk_t = sum(b - a for a, b in T.blk)
    out["loop in KVM_RUN %"] = 100 * run_t / wall
    out["loop in blkback %"] = 100 * blk_t / wall
    out["blkback thread CPU us per req"] = T.blk_cpu / max(1, nreq) * 1e6
    out["blkback wall us per req"] = blk_t / max(1, nreq) * 1e6
    out["loop else %"] = 100 * (wall - run_t - blk_t) / wall
    out["runs per req"] = len(T.runs) / max(1, nreq)
    out["runs ending blocked %"] = 100 * sum(1 for *_x, b in T.runs if b) / max(1, len(T.runs))
    out["run mean us"] = run_t / max(1, len(T.runs)) * 1e6
    out["reqs per drain"] = statistics.fmean([n for _t, n in T.drains]) if T.drains else 0
    # Requests at blkback (drained, not answered) over time: mean.
    inflight = sum(d["answer"] - d["drain"] for d in T.done if "answer" in d) / wall
    out["at blkback mean"] = inflight
    out["transient maps per req"] = T.transient / max(1, nreq)
    return out


def apply(bb: blkdev.Blkback, variant: str, base: dict) -> None:
    bb.max_persistent = base["pg"]
    blkdev.URING_OFFLOAD_BYTES = base["off"]
    if variant.startswith("pg"):
        bb.max_persistent = int(variant[2:])
    elif variant.startswith("off"):
        blkdev.URING_OFFLOAD_BYTES = int(variant[3:])


async def main(args) -> None:
    variants = [v for v in args.variants.split(",") if v]
    rows: dict[str, list[dict]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="aiovmm-bench-blkt-") as td:
        if not os.path.exists(blkbench.TOOLS_INITRD):
            blkbench.linux_assets()
        image = os.path.join(td, "linux.img")
        blkbench.prefill(image, args.image_mib)
        reps = args.reps * len(variants)
        rd = blk_exits.initrd(td, reps, args.runtime, args.image_mib)
        cmdline = (f"console=hvc0 quiet {blkbench.BLKFRONT_ARGS} {args.extra} "
                   f"aiovmm.run=/bin/sh,/bench.sh aiovmm.exit=1").replace("  ", " ")
        async with Hypervisor(memory_mib=blkbench.GUEST_MIB + 128) as hv:
            t0 = time.perf_counter()
            dom = await hv.create(blkbench.VMLINUZ, memory_mib=blkbench.GUEST_MIB, ramdisk=rd, cmdline=cmdline,
                                  disks=[f"target={image},vdev=xvda,access=rw"], engine="kvm")
            bb = next(b for b in dom.backends if isinstance(b, blkdev.Blkback))
            await dom.wait_for_line(r"^FIO-DEV ", timeout=args.boot_timeout)
            install(bb, dom.vcpus[0])
            base = {"pg": bb.max_persistent, "off": blkdev.URING_OFFLOAD_BYTES}
            print(f"kvm: fio device after {time.perf_counter() - t0:.0f} s; persistent "
                  f"{bb.persistent}, bound {bb.max_persistent}", flush=True)
            for rep in range(reps):
                variant = variants[rep % len(variants)]
                for job, *_ in blkbench.FIO_JOBS:
                    tag = f"{job}.{rep}"
                    await dom.wait_for_line(rf"^FIO-BEGIN {tag}$", timeout=3600)
                    apply(bb, variant, base)
                    end = asyncio.ensure_future(dom.wait_for_line(rf"^FIO-END {tag}$", timeout=3600))
                    first = bb.stats.rd_reqs + bb.stats.wr_reqs
                    while bb.stats.rd_reqs + bb.stats.wr_reqs == first and not end.done():
                        await asyncio.sleep(0.02)
                    await asyncio.wait([end], timeout=1.5)
                    if end.done():
                        print(f"  [{rep}] {job}/{variant}: ended before its window", flush=True)
                        continue
                    T.reset()
                    T.on = True
                    a = blk_exits.snapshot(dom, bb)
                    ta = pc()
                    perf = None
                    if args.perf and rep < len(variants):
                        import subprocess
                        perf = await asyncio.create_subprocess_exec(
                            "perf", "record", "-g", "-o", f"{args.perf}.{job}.{variant}", "-p", str(os.getpid()),
                            "--", "sleep", str(args.window), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    prof = None
                    if args.profile and rep < len(variants):
                        import cProfile
                        prof = cProfile.Profile(time.thread_time)
                        prof.enable()
                    await asyncio.wait([end], timeout=args.window)
                    if prof is not None:
                        prof.disable()
                    if perf is not None:
                        await perf.wait()
                    tb = pc()
                    b = blk_exits.snapshot(dom, bb)
                    T.on = False
                    await end
                    dd = {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b)}
                    n = max(1, dd["requests"])
                    res = blkbench.parse_fio(list(dom.console_lines)).get(tag)
                    s = summarize(ta, tb, n)
                    s.update(fio=res or 0.0, exits=dd["exits"] / n, cpu_ms=dd["cpu_ms"] / n,
                             guest_ms=dd["guest_cpu_ms"] / n, steal_ms=dd["host_steal_ms"] / n,
                             load=os.getloadavg()[0])
                    rows[f"{job}/{variant}"].append(s)
                    if prof is not None:
                        blk_exits.profile_report(prof, n, tb - ta)
                    print(f"  [{rep}] {job}/{variant}: {res} {'MB/s' if job.startswith('seq') else 'IOPS'}, load {s['load']:.1f}: "
                          + ", ".join(f"{k} {v:.1f}" for k, v in s.items() if k not in ("fio", "load")),
                          flush=True)
            await dom.wait()
            print(f"blkback: {bb.stats}")
    print("medians per job/variant:")
    for key in sorted(rows):
        rs = rows[key]
        print(f"  {key} (n={len(rs)}): " + ", ".join(
            f"{k} {statistics.median(r.get(k, 0) for r in rs):.1f}" for k in rs[0]), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2, help="rounds per variant")
    ap.add_argument("--variants", default="default,pg8224")
    ap.add_argument("--runtime", type=int, default=6, help="seconds per fio job")
    ap.add_argument("--window", type=float, default=3.0, help="seconds traced per job")
    ap.add_argument("--image-mib", type=int, default=256)
    ap.add_argument("--extra", default="")
    ap.add_argument("--profile", action="store_true", help="cProfile (thread CPU) each variant's first window")
    ap.add_argument("--perf", default="", help="perf record -g the process in each variant's first "
                    "window into PREFIX.<job>.<variant>")
    ap.add_argument("--boot-timeout", type=float, default=900)
    ap.add_argument("--jobs", default="seqread,seqwrite", help="bench/blk.py's fio jobs to run (by name)")
    a = ap.parse_args()
    blkbench.FIO_JOBS = [j for j in blkbench.FIO_JOBS if j[0] in a.jobs.split(",")]
    uvloop.run(main(a))
