"""Boot latency: guests/build/tests/hello.elf (16 MiB), 20 boots in one Hypervisor.

Per boot, all on the host's perf_counter:
  - create_ms:   duration of `await hv.create()` (parse the ELF, allocate and build the domain,
                 create the vCPU engine); the guest has not run yet when it returns.
  - boot_ms:     from the create() call to the first console byte (on_console callback).
  - poweroff_ms: from the create() call to `dom.wait()` returning (SHUTDOWN_poweroff).
  - teardown_ms: from dom.wait() returning until the domain is destroyed (runs on the loop
                 afterwards; waited for, so it stays out of the other figures).
Reference in the same run, interleaved with the boots: spawning and reaping `/bin/true`
through asyncio's subprocess API (process_spawn_ms). Medians over all runs.

Where /dev/kvm works the same boots also run on the KVM engine (kvm_* keys).

Last line: boot_ms=<x> create_ms=<y> poweroff_ms=<z> process_spawn_ms=<w> teardown_ms=<t>
           [kvm_boot_ms kvm_create_ms kvm_poweroff_ms kvm_teardown_ms]
--profile prints where create() and teardown spend their time (cProfile, extra boots).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import uvloop

from aiovmm import Hypervisor
from aiovmm.abi import ShutdownReason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "guests/build/tests/hello.elf")


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


async def boot_once(hv: Hypervisor) -> tuple[float, float, float, float]:
    first: list[float] = []

    def on_console(data: bytes) -> None:
        if not first and data:
            first.append(time.perf_counter())

    t0 = time.perf_counter()
    dom = await hv.create(GUEST, memory_mib=16, on_console=on_console)
    t1 = time.perf_counter()
    reason = await dom.wait()
    t2 = time.perf_counter()
    if reason != ShutdownReason.poweroff or dom.console_lines != ["hello", "poweroff"] or not first:
        fail(f"hello.elf: {dom.describe_end()}; console {dom.console_lines}")
    # Teardown (Domain.destroy: engine close, frames freed) runs on the loop after wait()
    # returns. Wait for it so it does not land in the next measurement; report it apart.
    async with asyncio.timeout(10):
        while dom.domid in hv.domains:
            await asyncio.sleep(0)
    t3 = time.perf_counter()
    return (t1 - t0) * 1e3, (first[0] - t0) * 1e3, (t2 - t0) * 1e3, (t3 - t2) * 1e3


async def spawn_once() -> float:
    t0 = time.perf_counter()
    p = await asyncio.create_subprocess_exec("/bin/true")
    rc = await p.wait()
    t1 = time.perf_counter()
    if rc != 0:
        fail(f"/bin/true exited {rc}")
    return (t1 - t0) * 1e3


def stats(name: str, xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=10) if len(xs) >= 2 else xs
    return (f"{name:<18} median {statistics.median(xs):7.2f} ms  min {min(xs):7.2f}  "
            f"p90 {q[-1]:7.2f}  max {max(xs):7.2f}")


async def profile(hv: Hypervisor, n: int = 10) -> None:
    import cProfile
    import pstats
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        await boot_once(hv)
    pr.disable()
    print(f"--- cProfile of {n} more boots (cumulative, top 30) ---")
    pstats.Stats(pr).sort_stats("cumulative").print_stats(30)


async def main(n: int, prof: bool) -> None:
    create, first, off, down, spawn = [], [], [], [], []
    async with Hypervisor(memory_mib=1024) as hv:
        await boot_once(hv)                 # warm-up: first Unicorn instance, page cache
        await spawn_once()
        for _ in range(n):
            c, f, o, d = await boot_once(hv)
            create.append(c)
            first.append(f)
            off.append(o)
            down.append(d)
            spawn.append(await spawn_once())
        if prof:
            await profile(hv)
        if hv.domains:
            fail(f"domains left after poweroff: {list(hv.domains)}")
    print(f"{n} boots of hello.elf (16 MiB) in one Hypervisor, interleaved with {n} spawns")
    print(stats("create()", create))
    print(stats("first console byte", first))
    print(stats("poweroff", off))
    print(stats("teardown (apart)", down))
    print(stats("spawn /bin/true", spawn))
    b, s = statistics.median(first), statistics.median(spawn)
    print(f"first byte / process spawn = {b / s:.1f}x")
    tail = ""
    from aiovmm.kvm_engine import unavailable_reason
    if not unavailable_reason():
        k_create, k_first, k_off, k_down = [], [], [], []
        async with Hypervisor(memory_mib=1024, engine="kvm") as hv:
            await boot_once(hv)             # warm-up: first VM, ring-0 pages
            for _ in range(n):
                c, f, o, d = await boot_once(hv)
                k_create.append(c)
                k_first.append(f)
                k_off.append(o)
                k_down.append(d)
        print("KVM engine, same boots:")
        print(stats("create()", k_create))
        print(stats("first console byte", k_first))
        print(stats("poweroff", k_off))
        print(stats("teardown (apart)", k_down))
        tail = (f" kvm_boot_ms={statistics.median(k_first):.2f} kvm_create_ms={statistics.median(k_create):.2f}"
                f" kvm_poweroff_ms={statistics.median(k_off):.2f} kvm_teardown_ms={statistics.median(k_down):.2f}")
    else:
        print(f"KVM engine skipped: {unavailable_reason()}")
    print(f"boot_ms={b:.2f} create_ms={statistics.median(create):.2f} "
          f"poweroff_ms={statistics.median(off):.2f} process_spawn_ms={s:.2f} "
          f"teardown_ms={statistics.median(down):.2f}{tail}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--boots", type=int, default=20)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    uvloop.run(main(a.boots, a.profile))
