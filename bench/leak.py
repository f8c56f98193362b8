"""Host memory kept per domain create/destroy cycle (issue 9 #12).

One hypervisor creates a guest, waits for its poweroff and for its teardown, again and again:
first hello.elf (8 MiB, no devices), then net.elf with a vif on a bridge in a namespace of
its own (aiovmm.testing.VirtualLan; needs root) that connects netfront, sends one datagram and
powers off. After a warm-up (caches: parsed kernel, pyroute2's request classes, CPython's
method cache), Python-level growth is measured with tracemalloc (bytes still allocated after
N cycles and a gc, divided by N) and the process's RSS growth is printed for comparison
(RSS also moves with the allocator's arenas, so it is the noisier figure).

    .venv/bin/python bench/leak.py [--cycles 400] [--vif-cycles 150] [--top 5]

Last line: `leak_bytes_per_cycle=<..> leak_vif_bytes_per_cycle=<..>`.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiovmm import Hypervisor, ShutdownReason  # noqa: E402

HELLO = str(ROOT / "guests/build/tests/hello.elf")
NET = str(ROOT / "guests/build/tests/net.elf")
BLAST = "ip=198.18.0.2/24 blast=198.18.0.1:9 bytes=8 size=8"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def one_cycle(hv: Hypervisor, lan=None) -> None:
    if lan is None:
        dom = await hv.create(HELLO, memory_mib=8)
    else:
        dom = await hv.create(NET, memory_mib=16, cmdline=BLAST, vifs=[lan.vif("00:16:3e:00:00:02")])
    reason = await asyncio.wait_for(dom.wait(), 60)
    if reason != ShutdownReason.poweroff:
        raise SystemExit(f"d{dom.domid}: {dom.describe_end()}")
    while hv.domains:                       # teardown ends just after dom.wait() returns
        await asyncio.sleep(0.001)


async def measure(cycles: int, warmup: int, lan=None, top: int = 0) -> float:
    """Bytes per cycle still allocated (tracemalloc) after `cycles` cycles past `warmup`."""
    async with Hypervisor(memory_mib=256) as hv:
        for _ in range(warmup):
            await one_cycle(hv, lan)
        gc.collect()
        tracemalloc.start(8 if top else 1)
        snap0 = tracemalloc.take_snapshot() if top else None
        m0, r0, t0 = tracemalloc.get_traced_memory()[0], rss_bytes(), time.perf_counter()
        for _ in range(cycles):
            await one_cycle(hv, lan)
        gc.collect()
        m1, r1 = tracemalloc.get_traced_memory()[0], rss_bytes()
        if top:
            snap1 = tracemalloc.take_snapshot()
            for st in snap1.compare_to(snap0, "traceback")[:top]:
                print(f"  {st.size_diff / cycles:8.1f} B/cycle {st.count_diff / cycles:6.2f} blocks/cycle")
                for line in st.traceback.format()[-6:]:
                    print("      " + line)
        tracemalloc.stop()
    per = (m1 - m0) / cycles
    print(f"{'vif' if lan else 'plain'}: {cycles} cycles after {warmup} warm-up in "
          f"{time.perf_counter() - t0:.1f} s: tracemalloc {per:.1f} B/cycle, "
          f"RSS {(r1 - r0) / cycles:.0f} B/cycle")
    return per


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--vif-cycles", type=int, default=150)
    ap.add_argument("--vif-warmup", type=int, default=50)
    ap.add_argument("--top", type=int, default=0, help="print the N largest growing allocation sites")
    a = ap.parse_args()
    plain = await measure(a.cycles, a.warmup, top=a.top)
    vif = float("nan")
    if a.vif_cycles and os.geteuid() == 0 and os.path.exists("/dev/net/tun"):
        from aiovmm.testing import VirtualLan
        async with VirtualLan("198.18.0.1/24") as lan:
            vif = await measure(a.vif_cycles, a.vif_warmup, lan, top=a.top)
    print(f"leak_bytes_per_cycle={plain:.1f} leak_vif_bytes_per_cycle={vif:.1f}")


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
