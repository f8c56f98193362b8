"""What a guest re-arming its singleshot timer from its handler takes from a bystander
(guests/hostile/timer_storm.c), against a plain CPU hog (guests/tests/hog.c).

For each neighbour the bystander (a hog) and the neighbour run together for a window; the
figures are each one's charged CPU (what the scheduler debited) and the loop thread's CPU
over the window, the neighbour's timer events, and the loop's latency (how late a 5 ms
asyncio sleep wakes, median). Interleaved rounds; medians; the load average is printed.

    .venv/bin/python bench/timer_storm_share.py [rounds] [engine]
"""
from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aiovmm.hypervisor import Hypervisor  # noqa: E402

BUILD = Path(__file__).resolve().parents[1] / "guests" / "build"
HOG = str(BUILD / "tests" / "hog.elf")
STORM = str(BUILD / "hostile" / "timer_storm.elf")
WINDOW_S = 2.0
NEIGHBOURS = {
    "hog": (HOG, "", r"^hog: ready"),
    "ahead1us": (STORM, "via=0 kind=0 delta=1000", r"^timer_storm: ready"),
    "ahead5us": (STORM, "via=0 kind=0 delta=5000", r"^timer_storm: ready"),
    "ahead20us": (STORM, "via=0 kind=0 delta=20000", r"^timer_storm: ready"),
    "ahead100us": (STORM, "via=1 kind=0 delta=100000", r"^timer_storm: ready"),
    "past": (STORM, "via=0 kind=1 delta=1000", r"^timer_storm: ready"),
    "timerop_1ns": (STORM, "via=2 kind=0 delta=1", r"^timer_storm: ready"),
    "u64max": (STORM, "via=1 kind=2 abs=18446744073709551615", r"^timer_storm: ready"),
}


def used_ns(hv, dom) -> int:
    return sum(a["cpu_ns"] - a["host_steal_ns"] for a in map(hv.scheduler.accounting, dom.vcpus))


async def lateness(stop: asyncio.Event, out: list) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.005)
        out.append(time.perf_counter() - t - 0.005)


async def one(kind: str, engine: str | None) -> dict:
    path, cmdline, ready = NEIGHBOURS[kind]
    kw = {"engine": engine} if engine else {}
    async with Hypervisor(memory_mib=64, **kw) as hv:
        n = await hv.create(path, memory_mib=4, cmdline=cmdline, name="n")
        await n.wait_for_line(ready, 30)
        by = await hv.create(HOG, memory_mib=4, name="by")
        await by.wait_for_line(r"^hog: ready", 30)
        await asyncio.sleep(0.3)
        b0, n0, c0, t0 = used_ns(hv, by), used_ns(hv, n), time.thread_time_ns(), time.perf_counter_ns()
        ev0 = n.vcpus[0].hypercalls
        lat: list = []
        stop = asyncio.Event()
        task = asyncio.create_task(lateness(stop, lat))
        await asyncio.sleep(WINDOW_S)
        stop.set()
        await task
        cpu = time.thread_time_ns() - c0
        wall = time.perf_counter_ns() - t0
        return {"by": (used_ns(hv, by) - b0) / cpu, "n": (used_ns(hv, n) - n0) / cpu,
                "loop": cpu / wall, "hc": n.vcpus[0].hypercalls - ev0,
                "lat_ms": statistics.median(lat) * 1e3 if lat else -1}


async def main(rounds: int, engine: str | None) -> None:
    got: dict[str, list[dict]] = {k: [] for k in NEIGHBOURS}
    for r in range(rounds):
        for k in (sys.argv[3].split(',') if len(sys.argv) > 3 else NEIGHBOURS):
            d = await one(k, engine)
            got[k].append(d)
            print(f"round {r} {k}: " + " ".join(f"{a}={b:.3f}" if isinstance(b, float) else f"{a}={b}"
                                                  for a, b in d.items()), flush=True)
    for k, v in got.items():
        if not v:
            continue
        print(f"median {k}: " + " ".join(f"{a}={statistics.median(x[a] for x in v):.3f}" for a in v[0]))
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1, sys.argv[2] if len(sys.argv) > 2 else None))
