"""Density: how many idle guests of the project's kernel (guests/build/kernel.elf) one
hypervisor process runs, what each costs the host, and what idle guests cost the loop.

Each guest boots kernel.elf with `echo=1 echo_timeout=0`: after its boot sequence it blocks
in SCHEDOP_poll on its console port with no timeout, the idle state of a guest with nothing
to do (no timer, no runnable vCPU). Guests are created in batches, each batch waited for
until every guest printed `echo: ready`, until --max guests, a creation failure, or the time
or host-memory budget runs out.

Figures:
  - overhead_mib: host RSS per guest beyond guest memory: growth of RssAnon + RssFile of
    this process (guest memory is a memfd mapping, counted in RssShmem, reported apart as
    touched_mib) divided by the number of guests.
  - creation rate: guests per second from the first create() to the last `echo: ready`.
  - idle_cpu_pct: this process's CPU time over --idle-s seconds with every guest idle.
  - --tracemalloc: Python allocations per guest (top lines by size), to see what state a
    domain keeps.

Last line: guests=<n> overhead_mib=<x> idle_cpu_pct=<y>
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
import tracemalloc

import uvloop

from aiovmm import Hypervisor
from aiovmm.vcpu import IDLE_RELEASE_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = os.path.join(ROOT, "guests/build/kernel.elf")


def rss_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile", "RssShmem", "VmRSS"):
                out[k] = int(v.split()[0])
    return out


async def run(a: argparse.Namespace) -> None:
    hv_mib = a.max * a.memory + 64
    async with Hypervisor(memory_mib=hv_mib, engine=a.engine) as hv:
        # One guest first, so the process's one-time costs (code, caches) are not counted.
        first = await hv.create(KERNEL, memory_mib=a.memory, name="warm", cmdline="echo=1 echo_timeout=0")
        await first.wait_for_line(r"^echo: ready$", timeout=60)
        await asyncio.sleep(IDLE_RELEASE_S + a.settle_s)      # and its vCPU released, too
        gc.collect()
        r0 = rss_kib()
        if a.tracemalloc:
            tracemalloc.start()
            snap0 = tracemalloc.take_snapshot()
        doms = []
        t0 = time.perf_counter()
        stop = ""
        while len(doms) < a.max and not stop:
            batch = []
            for _ in range(min(a.batch, a.max - len(doms))):
                try:
                    d = await hv.create(KERNEL, memory_mib=a.memory, cmdline="echo=1 echo_timeout=0")
                except Exception as e:          # noqa: BLE001 - any refusal ends the ramp
                    stop = f"create failed: {e}"
                    break
                batch.append(d)
            for d in batch:
                await d.wait_for_line(r"^echo: ready$", timeout=120)
            doms += batch
            el = time.perf_counter() - t0
            r = rss_kib()
            if a.verbose:
                print(f"  {len(doms)} guests, {el:.1f} s, RssAnon+File "
                      f"{(r['RssAnon'] + r['RssFile']) / 1024:.0f} MiB, Shmem {r['RssShmem'] / 1024:.0f} MiB",
                      file=sys.stderr)
            if el > a.time_budget:
                stop = f"time budget {a.time_budget} s"
            avail = int(open("/proc/meminfo").read().split("MemAvailable:")[1].split()[0])
            if avail < a.reserve_mib * 1024:
                stop = f"host memory below {a.reserve_mib} MiB available"
        ramp_s = time.perf_counter() - t0
        n = len(doms)
        gc.collect()
        r_ramp = rss_kib()
        # Idle vCPUs release their translator memory after vcpu.IDLE_RELEASE_S (+ the trim).
        await asyncio.sleep(IDLE_RELEASE_S + a.settle_s)
        gc.collect()
        r1 = rss_kib()
        over_ramp = ((r_ramp["RssAnon"] + r_ramp["RssFile"]) - (r0["RssAnon"] + r0["RssFile"])) / 1024 / max(1, n)
        over = ((r1["RssAnon"] + r1["RssFile"]) - (r0["RssAnon"] + r0["RssFile"])) / 1024 / max(1, n)
        touched = (r1["RssShmem"] - r0["RssShmem"]) / 1024 / max(1, n)
        if a.tracemalloc:
            snap1 = tracemalloc.take_snapshot()
            tracemalloc.stop()
            stats = snap1.compare_to(snap0, "lineno")
            total = sum(s.size_diff for s in stats)
            print(f"python allocations: {total / max(1, n) / 1024:.1f} KiB per guest; top:")
            for s in stats[:a.tracemalloc]:
                print(f"  {s.size_diff / max(1, n) / 1024:8.1f} KiB/guest  {s.traceback}")
        await asyncio.sleep(0.5)
        c0, w0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(a.idle_s)
        idle = 100 * (time.process_time() - c0) / (time.perf_counter() - w0)
        ticking = sum(1 for d in doms if any(not v.blocked for v in d.vcpus))
        print(f"guests started: {n} of {a.max} ({stop or 'all'}); ramp {ramp_s:.1f} s = "
              f"{n / ramp_s:.1f} guests/s; touched guest memory {touched:.2f} MiB/guest; "
              f"runnable after the ramp {ticking}")
        print(f"host overhead right after the ramp {over_ramp:.2f} MiB/guest, "
              f"after {IDLE_RELEASE_S + a.settle_s:.0f} s idle {over:.2f} MiB/guest")
        print(f"host RSS now {r1['VmRSS'] / 1024:.0f} MiB; free machine frames {hv.mem.free_frames}")
        print(f"guests={n} overhead_mib={over:.2f} idle_cpu_pct={idle:.2f}")
        for d in doms + [first]:
            d.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max", type=int, default=1000)
    p.add_argument("--memory", type=int, default=4, help="MiB per guest")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--time-budget", type=float, default=240.0)
    p.add_argument("--reserve-mib", type=int, default=2048, help="stop when the host has less available")
    p.add_argument("--idle-s", type=float, default=3.0)
    p.add_argument("--settle-s", type=float, default=1.0, help="wait past IDLE_RELEASE_S before measuring")
    p.add_argument("--tracemalloc", type=int, default=0, metavar="N", help="show the top N allocation sites")
    p.add_argument("--engine", default="unicorn", choices=("unicorn", "kvm", "auto"))
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args()
    uvloop.run(run(a))


if __name__ == "__main__":
    main()
