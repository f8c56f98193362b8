"""Credit scheduler figures (aiovmm/scheduler.py) on real guests.

  - weight_err_pct: two CPU hogs (guests/build/tests/hog.elf) with weights 256 and 512; the
    ratio of their CPU time (hypervisor accounting) over --window seconds, as % error from 2.
  - cap_err_pct: one hog capped at 25 %, alone: its CPU time over the window's wall time, as
    percentage points from 25.
  - io_latency_ms: median ping RTT to net.elf (in namespaces this script makes and removes)
    while four hogs run; the same ping without hogs is printed as the reference
    (io_quiet_ms), and the max.

Last line: weight_err_pct=<x> cap_err_pct=<y> io_latency_ms=<z>
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import time

import uvloop

from aiovmm import Hypervisor
from aiovmm.testing import VirtualLan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOG = os.path.join(ROOT, "guests/build/tests/hog.elf")
NET = os.path.join(ROOT, "guests/build/tests/net.elf")
RTT = re.compile(r"time=([\d.]+) ms")


async def hog(hv: Hypervisor, name: str):
    d = await hv.create(HOG, memory_mib=4, name=name)
    await d.wait_for_line(r"^hog: ready$", timeout=60)
    return d


async def window(hv: Hypervisor, doms: list, seconds: float) -> tuple[list[int], int]:
    s = hv.scheduler
    b = [s.domain_cpu_ns(d.vcpus) for d in doms]
    t = time.perf_counter_ns()
    await asyncio.sleep(seconds)
    return [s.domain_cpu_ns(d.vcpus) - x for d, x in zip(doms, b)], time.perf_counter_ns() - t


async def pings(lan: VirtualLan, n: int) -> list[float]:
    rc, out = await lan.run("ping", "-c", str(n), "-i", "0.02", "-W", "2", "198.18.0.2", timeout=60)
    if rc:
        raise SystemExit(f"FAIL: ping: {out}")
    return [float(x) for x in RTT.findall(out)]


async def run(a: argparse.Namespace) -> None:
    async with Hypervisor(memory_mib=64, engine=a.engine) as hv:
        x, y = await hog(hv, "w256"), await hog(hv, "w512")
        x.set_sched(weight=256)
        y.set_sched(weight=512)
        await asyncio.sleep(0.5)
        (cx, cy), wall = await window(hv, [x, y], a.window)
        ratio = cy / cx
        print(f"weights 256:512 -> CPU {100 * cx / wall:.1f} % : {100 * cy / wall:.1f} %, ratio {ratio:.3f}")
        weight_err = abs(ratio / 2 - 1) * 100
        y.shutdown()
        x.set_sched(cap=25)
        await asyncio.sleep(0.5)
        (c,), wall = await window(hv, [x], a.window)
        cap_pct = 100 * c / wall
        acct = hv.scheduler.accounting(x.vcpus[0])
        print(f"cap 25 -> {cap_pct:.2f} % (run-queue wait {acct['wait_ns'] / 1e9:.2f} s, "
              f"host steal {acct['host_steal_ns'] / 1e9:.2f} s)")
        x.shutdown()
    async with VirtualLan("198.18.0.1/24") as lan, Hypervisor(memory_mib=128, engine=a.engine) as hv:
        g = await hv.create(NET, memory_mib=16, name="io", cmdline="ip=198.18.0.2/24 name=io",
                            vifs=[lan.vif("00:16:3e:00:00:02")])
        await g.wait_for_line(r"^net: up ", timeout=60)
        await pings(lan, 5)
        quiet = await pings(lan, a.pings)
        hogs = [await hog(hv, f"hog{i}") for i in range(4)]
        await asyncio.sleep(0.5)
        loaded = await pings(lan, a.pings)
        cpu, wall = await window(hv, hogs, 0.5)
        print(f"ping quiet median {statistics.median(quiet):.3f} ms; with 4 hogs median "
              f"{statistics.median(loaded):.3f} ms, p90 {sorted(loaded)[int(0.9 * len(loaded))]:.3f} ms, "
              f"max {max(loaded):.3f} ms; hogs' CPU {100 * sum(cpu) / wall:.0f} %")
        print(f"io_quiet_ms={statistics.median(quiet):.3f}")
    print(f"weight_err_pct={weight_err:.2f} cap_err_pct={abs(cap_pct - 25):.2f} "
          f"io_latency_ms={statistics.median(loaded):.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=float, default=3.0)
    p.add_argument("--pings", type=int, default=50)
    p.add_argument("--engine", default="unicorn", choices=("unicorn", "kvm", "auto"))
    uvloop.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
