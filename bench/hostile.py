"""The hostile-guest campaign (tests/test_hostile.py) as a timing figure.

The test suite asserts what every attacker gets back; how long the campaign takes is a
property of the machine, so it is measured here and not asserted in the tests. The campaign
is the test's own (`_campaign`: every attacker alone, all at once, fuzz next to the
bystander, fuzz in fresh hypervisors), so the figure is for exactly what the suite runs.

Reference in the same run: boot_ms, the median of --reps boots of hello.elf to poweroff in a
fresh hypervisor; campaign_boots = campaign seconds / boot seconds is what to compare across
machines.

Last line: campaign_s=<s> slowest_guest=<name> slowest_s=<s> boot_ms=<ms> campaign_boots=<n>
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

from aiovmm import Hypervisor, ShutdownReason  # noqa: E402
from conftest import HV_MEMORY_MIB, guest  # noqa: E402
import test_hostile  # noqa: E402


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


async def boot_ms(reps: int) -> float:
    times = []
    for _ in range(reps):
        async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
            t0 = time.perf_counter()
            dom = await hv.create(guest("hello"), memory_mib=8)
            if await dom.wait() != ShutdownReason.poweroff:
                fail(f"hello.elf: {dom.describe_end()}")
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9, help="reference boots")
    args = ap.parse_args()
    ref = asyncio.run(boot_ms(args.reps))
    c = asyncio.run(test_hostile._campaign())
    bad = [r.name for r in c.runs.values() if r.hung or r.crash_reason.startswith("hypervisor error")]
    if bad:
        fail(f"attackers hung or hit a hypervisor error: {bad}")
    for r in sorted(c.runs.values(), key=lambda r: -r.seconds)[:5]:
        print(f"{r.name:<26} {r.seconds:6.2f} s  ({r.end})")
    slow = max(c.runs.values(), key=lambda r: r.seconds)
    print(f"campaign_s={c.seconds:.1f} slowest_guest={slow.name} slowest_s={slow.seconds:.2f} "
          f"boot_ms={ref:.1f} campaign_boots={c.seconds * 1e3 / ref:.0f}")


if __name__ == "__main__":
    main()
