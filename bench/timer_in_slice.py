"""A vCPU's own timer inside its slice (vcpu.py VCPU._slice_goes_on) A/B, per engine.

A: every timer event of the running vCPU ends its slice (before: release, a loop turn,
acquire, then the timers run and the event is bounced); B: the slice goes on, the due timers
and the event bounce run between two engine runs of one slice (Xen's timer interrupt on the
running vCPU, no deschedule). A is this script replacing _slice_goes_on with `False` for its
boots (a bench-only switch). Interleaved A/B per round, medians, load printed.

- fault_storm (guests/tests/fault_storm.c, ms=1000): faults per second while its handler
  re-arms a 50 us singleshot timer (what progress a guest makes under its own timer storm);
- timer_storm 20 us ahead beside a hog vs a hog beside a hog (as bench/timer_storm_share.py):
  the bystander hog's charged CPU as a share of the loop thread's CPU, and the storm's.

    .venv/bin/python bench/timer_in_slice.py [--runs N] [--engines unicorn,kvm]
Last line: <engine>_faults_a=<> <engine>_faults_b=<> <engine>_by_share_a=<> ... load=<>
"""
from __future__ import annotations

import asyncio
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aiovmm.hypervisor import Hypervisor  # noqa: E402
from aiovmm.vcpu import VCPU  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tslice import cli, per_engine  # noqa: E402

BUILD = Path(__file__).resolve().parents[1] / "guests" / "build"
HOG = str(BUILD / "tests" / "hog.elf")
STORM = str(BUILD / "hostile" / "timer_storm.elf")
FAULTS = str(BUILD / "tests" / "fault_storm.elf")
WINDOW_S = 1.5
_goes_on = VCPU._slice_goes_on


def variant(b: bool) -> None:
    VCPU._slice_goes_on = _goes_on if b else (lambda self, sched: False)


def used_ns(hv, dom) -> int:
    return sum(a["cpu_ns"] - a["host_steal_ns"] for a in map(hv.scheduler.accounting, dom.vcpus))


async def faults(engine: str) -> float:
    async with Hypervisor(memory_mib=64, engine=engine) as hv:
        dom = await hv.create(FAULTS, memory_mib=8, cmdline="ms=1000")
        await asyncio.wait_for(dom.wait(), 120)
        m = next((re.match(r"result faults (\d+)", l) for l in dom.console_lines
                  if l.startswith("result faults")), None)
        return float(m.group(1)) if m else -1.0


async def share(engine: str, storm: bool) -> tuple[float, float]:
    """(bystander's, neighbour's) charged CPU over the loop thread's CPU in the window."""
    async with Hypervisor(memory_mib=64, engine=engine) as hv:
        if storm:
            n = await hv.create(STORM, memory_mib=4, cmdline="via=0 kind=0 delta=20000", name="n")
            await n.wait_for_line(r"^timer_storm: ready", 30)
        else:
            n = await hv.create(HOG, memory_mib=4, name="n")
            await n.wait_for_line(r"^hog: ready", 30)
        by = await hv.create(HOG, memory_mib=4, name="by")
        await by.wait_for_line(r"^hog: ready", 30)
        await asyncio.sleep(0.3)
        b0, n0, c0 = used_ns(hv, by), used_ns(hv, n), time.thread_time_ns()
        await asyncio.sleep(WINDOW_S)
        cpu = time.thread_time_ns() - c0
        return (used_ns(hv, by) - b0) / cpu, (used_ns(hv, n) - n0) / cpu


async def engine_ab(e: str, rounds: int) -> dict[str, float]:
    got: dict[str, list[float]] = {}
    for r in range(rounds):
        for b in (False, True) if r % 2 == 0 else (True, False):
            variant(b)
            k = "b" if b else "a"
            got.setdefault(f"faults_{k}", []).append(await faults(e))
            by, st = await share(e, True)
            got.setdefault(f"by_share_{k}", []).append(by)
            got.setdefault(f"storm_share_{k}", []).append(st)
            by2, n2 = await share(e, False)
            got.setdefault(f"by_share_hog_{k}", []).append(by2)
            print(f"{e} round {r} {k.upper()}: faults/s {got[f'faults_{k}'][-1]:.0f}, beside the "
                  f"storm: bystander {by:.3f} storm {st:.3f} of the loop; beside a hog: "
                  f"{by2:.3f} and {n2:.3f}", flush=True)
    variant(True)
    print(f"{e} medians: " + " ".join(f"{k}={statistics.median(v):.3f}" for k, v in got.items()))
    return {f"{e}_{k}": statistics.median(v) for k, v in got.items()}


async def main(rounds: int, engines: list[str]) -> None:
    await per_engine(engines, lambda e: engine_ab(e, rounds))


if __name__ == "__main__":
    cli(__doc__, 4, "unicorn,kvm", main)
