"""What a guest flooding xenstore takes from a bystander, against a plain CPU hog.

The bystander (guests/tests/hog.elf secs=S) reports how many iterations it ran in S
seconds of its own clock. It runs alone (A), beside a CPU hog (C: the scheduler shares
the CPU) and beside a guest writing xenstore in a loop (X: guests/tests/xenbus.elf
bench=N; each request is served by the daemon on the same event loop, outside the
scheduler's accounting). Interleaved rounds; medians; the load average is printed.

    .venv/bin/python bench/xenstore_share.py [rounds]
"""
from __future__ import annotations

import asyncio
import os
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aiovmm.hypervisor import Hypervisor  # noqa: E402

BUILD = Path(__file__).resolve().parents[1] / "guests" / "build" / "tests"
SECS = 3


async def one(kind: str) -> int:
    async with Hypervisor(memory_mib=256) as hv:
        other = None
        if kind == "hog":
            other = await hv.create(str(BUILD / "hog.elf"), memory_mib=16, cmdline=f"secs={SECS + 3}")
            await other.wait_for_line(r"^hog: ready", 20)
        elif kind == "xenstore":
            other = await hv.create(str(BUILD / "xenbus.elf"), memory_mib=16, cmdline="bench=10000000")
            await asyncio.sleep(0.5)
        by = await hv.create(str(BUILD / "hog.elf"), memory_mib=16, cmdline=f"secs={SECS}")
        line = await by.wait_for_line(r"^hog: done iters=\d+", 60)
        if other is not None:
            other.shutdown(__import__("aiovmm.abi", fromlist=["ShutdownReason"]).ShutdownReason.poweroff)
        return int(re.search(r"iters=(\d+)", line).group(1))


async def main(rounds: int) -> None:
    got: dict[str, list[int]] = {"alone": [], "hog": [], "xenstore": []}
    for r in range(rounds):
        for kind in got:
            got[kind].append(await one(kind))
        print(f"round {r}: " + " ".join(f"{k}={v[-1]}" for k, v in got.items()), flush=True)
    med = {k: statistics.median(v) for k, v in got.items()}
    print("medians: " + " ".join(f"{k}={v:.0f}" for k, v in med.items()))
    print(f"bystander beside a CPU hog: {med['hog'] / med['alone']:.2f} of alone; "
          f"beside a xenstore flood: {med['xenstore'] / med['alone']:.2f}; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
