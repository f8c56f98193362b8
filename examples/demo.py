"""`make demo`: boot aiovmm's own Xen PV kernel, and a second guest beside it, on emulated
x86_64 vCPUs scheduled by one asyncio loop. Each console line is shown with its domain."""
from __future__ import annotations

import asyncio
import os
import sys
import time

import uvloop
from rich.console import Console

from aiovmm import Hypervisor, ShutdownReason

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL = os.path.join(HERE, "..", "guests", "build", "kernel.elf")
con = Console(highlight=False)
COLORS = ["cyan", "magenta", "green", "yellow"]


def printer(name: str, color: str):
    buf = b""

    def on_console(data: bytes) -> None:
        nonlocal buf
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            con.print(f"[{color}]{name:>8}[/] | {line.decode(errors='replace')}")
    return on_console


async def main() -> int:
    t0 = time.perf_counter()
    con.rule("aiovmm: Xen PV guests on asyncio")
    async with Hypervisor(memory_mib=512) as hv:
        doms = []
        for i, (name, cmdline) in enumerate([("alpha", "ticks=5 period_ms=20"),
                                             ("beta", "ticks=3 period_ms=10 spin=5")]):
            doms.append(await hv.create(KERNEL, memory_mib=16, cmdline=cmdline, name=name,
                                        on_console=printer(name, COLORS[i])))
        reasons = await asyncio.gather(*(d.wait() for d in doms))
    con.rule()
    ok = True
    for d, r in zip(doms, reasons):
        con.print(f"{d.name}: {d.describe_end()}")
        ok &= r == ShutdownReason.poweroff
    con.print(f"done in {time.perf_counter() - t0:.2f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
