"""Lengthened slices (scheduler.Scheduler._lengthen) A/B on bench/cpu.py's guest, per engine.

cpu.elf computes ~5 ms natively (guests/bench/workload.c) and never blocks; it keeps Xen's
default 10 ms periodic timer. A: every slice ends after SLICE_NS (2 ms), as before; B: a slice
nothing else waits for runs up to TSLICE_NS (30 ms, Xen's credit time slice), cut at the
vCPU's own timer, and ended when the loop has I/O ready (Scheduler.goes_on, _IoWatch: no
kick unless I/O comes); C: B as before s19, without that. A, B and C alternate boot by boot (order
reversed every rep) beside a native
run of the same work() (cpu-native), in one process, so host noise hits all three alike.

Per variant: the guest's own pvclock time around work() (median and lower quartile, and
either over the native figure of the same run), slices per boot and how many were
lengthened, slice ends by the timer (the engine's kicks: KVM only), timer events sent to the
vCPU, and the loop thread's CPU time per boot (create to destroyed: on a loaded host the wall
figures carry the host's preemptions, CPU time much less).

Last line: <engine>_a_ratio=<> <engine>_b_ratio=<> ... load=<1 min>
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

import uvloop

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu as C  # noqa: E402
from aiovmm import Hypervisor, timers  # noqa: E402
from aiovmm.scheduler import SLICE_NS, TSLICE_NS  # noqa: E402

_fires: list[int] = [0]
_orig_fire = timers._fire


def _count_fire(v) -> None:
    _fires[0] += 1
    _orig_fire(v)


timers._fire = _count_fire       # counts only: the VIRQ_TIMER sends themselves are unchanged


async def one(hv: Hypervisor) -> dict:
    c0 = time.thread_time_ns()
    f0 = _fires[0]
    dom = await hv.create(C.GUEST, memory_mib=16)
    v = dom.vcpus[0]
    eng, st = v.engine, hv.scheduler.state(v)
    await dom.wait()
    kicks = getattr(eng, "kicks", 0)
    await C.torn_down(hv, dom)
    r, ns = C.parse_guest(dom.console_lines)
    if r != C.EXPECTED:
        C.fail(f"result {r:#x}")
    return {"ns": ns, "slices": st.slices, "long": st.long_slices, "kicks": kicks,
            "fires": _fires[0] - f0, "cpu": time.thread_time_ns() - c0}


def q1(xs: list) -> float:
    return sorted(xs)[len(xs) // 4]


async def engine_ab(engine: str, reps: int, exe: str) -> dict[str, float]:
    res: dict[str, list[dict]] = {"a": [], "b": [], "c": []}
    native: list[int] = []
    async with Hypervisor(memory_mib=1024, engine=engine) as hv:
        await C.boot(hv, C.GUEST)                          # warm-up, not counted
        for i in range(reps):
            native.append(C.run_native(exe)[1])
            for k in ("a", "b", "c") if i % 2 == 0 else ("c", "b", "a"):
                sched = hv.scheduler
                sched.tslice_ns = SLICE_NS if k == "a" else TSLICE_NS
                watch = sched._io_watch
                if k == "c":                # before s19: the loop's I/O not looked at
                    sched.loop_waits, sched._io_watch = (lambda: False), None
                try:
                    res[k].append(await one(hv))
                finally:
                    sched.__dict__.pop("loop_waits", None)
                    sched._io_watch = watch
    n, nq = statistics.median(native), q1(native)
    print(f"{engine}: native work() median {n / 1e6:.3f} ms, lower quartile {nq / 1e6:.3f} ms")
    out = {}
    for k, label in (("a", f"A: {SLICE_NS / 1e6:g} ms slices"),
                     ("b", f"B: lengthened to {TSLICE_NS / 1e6:g} ms when alone"),
                     ("c", "C: B without looking at the loop's I/O")):
        rs = res[k]
        med = lambda key: statistics.median(r[key] for r in rs)   # noqa: E731
        g, gq = med("ns"), q1([r["ns"] for r in rs])
        print(f"  {label:34s} guest median {g / 1e6:.3f} ms (ratio {g / n:.3f}), lower quartile "
              f"{gq / 1e6:.3f} ms (ratio {gq / nq:.3f}); per boot: slices {med('slices'):g} "
              f"(lengthened {med('long'):g}), kicks {med('kicks'):g}, timer events "
              f"{med('fires'):g}, loop-thread CPU {med('cpu') / 1e6:.3f} ms")
        out[f"{engine}_{k}_ratio"] = g / n
        out[f"{engine}_{k}_q1_ratio"] = gq / nq
        out[f"{engine}_{k}_cpu_ms"] = med("cpu") / 1e6
    pairs = [b["ns"] / a["ns"] for a, b in zip(res["a"], res["b"])]
    print(f"  B/A per pair (guest ns): median {statistics.median(pairs):.3f}")
    out[f"{engine}_b_over_a"] = statistics.median(pairs)
    pairs = [b["ns"] / c["ns"] for c, b in zip(res["c"], res["b"])]
    print(f"  B/C per pair (guest ns): median {statistics.median(pairs):.3f}")
    out[f"{engine}_b_over_c"] = statistics.median(pairs)
    return out


async def per_engine(engines: list[str], ab) -> None:
    """Run `ab(engine)` (an A/B of one engine: a dict of figures) for each engine usable
    here, then the last line: every figure and the load (also bench/timer_in_slice.py)."""
    from aiovmm.kvm_engine import unavailable_reason
    out: dict[str, float] = {}
    for e in engines:
        if e == "kvm" and unavailable_reason():
            print(f"KVM engine skipped: {unavailable_reason()}")
            continue
        out.update(await ab(e))
    print(" ".join(f"{k}={v:.3f}" for k, v in out.items()) + f" load={os.getloadavg()[0]:.2f}")


def cli(doc: str, default_runs: int, default_engines: str, main) -> None:
    """The A/B benches' command line: --runs, --engines; uvloop.run(main(runs, engines))."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--runs", type=int, default=default_runs)
    ap.add_argument("--engines", default=default_engines)
    a = ap.parse_args()
    uvloop.run(main(a.runs, a.engines.split(",")))


async def main(reps: int, engines: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        exe = C.native_binary(tmp)
        await per_engine(engines, lambda e: engine_ab(e, reps, exe))


if __name__ == "__main__":
    cli(__doc__, 31, "kvm,unicorn", main)
