"""MMU benchmark: guests/build/bench/mmu.elf (page-table updates) vs. raw host stores.

The guest (guests/README.md, cmdline `n=<count> forks=<k>`) works on a pinned scratch L1 that
is read-only in its kernel map and prints, each timed with its pvclock:
  mmu: single n=<n> ns=<t>    n mmu_update hypercalls of one PTE each
  mmu: batched n=<n> ns=<t>   the same n updates in batches of 512
  mmu: ptwr n=<n/10> ns=<t>   plain stores to the read-only L1 (trapped and emulated)
  mmu: fork n=<k> ns=<t>      k x fork_once(1000): build, pin, run and tear down a user
                              address space (fork-like workload)
Every update changes the entry (map on even passes over the table, clear on odd ones), so
each one is validated: old entry's reference dropped, new one's taken.

Reference, measured in the same run, interleaved with the guest runs: the host Python cost
of the same number of 8-byte struct.pack_into writes (entry i % 512 of a 4 KiB bytearray)
-- the raw store without any validation. host_store_ups = n / that time.

Each figure is the median over --reps runs (one fresh domain per run). Target: batched >=
200,000 PTE updates/s. Unless --no-profile, one more run (console=hypercall, so console
lines arrive exactly when printed) is profiled with cProfile during the batched phase only
(between the `mmu: single` and `mmu: batched` lines) and the top 8 functions by tottime are
printed; --profile-phase picks another phase.

Where /dev/kvm works, the same guest also runs --reps times on the KVM engine with n/20
updates (each hypervisor page-table change costs a shadow-page zap there: docs/design.md).

Last line: single_ups=<x> batched_ups=<y> ptwr_ups=<z> fork_ops=<w> host_store_ups=<r>
           [kvm_single_ups kvm_batched_ups kvm_ptwr_ups kvm_fork_ops]
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import re
import statistics
import struct
import sys
import time

import uvloop

from aiovmm import Hypervisor
from aiovmm.abi import ShutdownReason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "guests/build/bench/mmu.elf")
LINE = re.compile(r"^mmu: (single|batched|ptwr|fork) n=(\d+) ns=(\d+)$")
PHASES = ("single", "batched", "ptwr", "fork")
GUEST_MIB = 32
TARGET_BATCHED_UPS = 200_000


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def host_store_seconds(n: int) -> float:
    """n 8-byte little-endian stores into a page-sized bytearray, entry i % 512, alternating
    value/zero per pass like the guest: the cost of the store itself from Python."""
    buf = bytearray(4096)
    pack_into = struct.Struct("<Q").pack_into
    pte = 0x0000000012345067
    t0 = time.perf_counter()
    for i in range(n):
        pack_into(buf, (i % 512) * 8, 0 if (i // 512) & 1 else pte)
    return time.perf_counter() - t0


async def torn_down(hv: Hypervisor, dom) -> None:
    """Wait until the domain is destroyed, so its teardown stays out of the next run."""
    async with asyncio.timeout(10):
        while dom.domid in hv.domains:
            await asyncio.sleep(0.001)


def parse(lines: list[str]) -> dict[str, tuple[int, int]]:
    out = {}
    for line in lines:
        m = LINE.match(line)
        if m:
            out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    missing = [p for p in PHASES if p not in out]
    if missing:
        fail(f"mmu.elf printed no {missing} line: {lines}")
    return out


async def run_guest(hv: Hypervisor, n: int, forks: int, console: str = "",
                    on_console=None) -> dict[str, tuple[int, int]]:
    cmdline = f"n={n} forks={forks}" + (f" console={console}" if console else "")
    dom = await hv.create(GUEST, memory_mib=GUEST_MIB, cmdline=cmdline, on_console=on_console)
    async with asyncio.timeout(300):
        reason = await dom.wait()
    await torn_down(hv, dom)
    if reason != ShutdownReason.poweroff or "poweroff" not in dom.console_lines:
        fail(f"mmu.elf: {dom.describe_end()}; console {dom.console_lines}")
    return parse(dom.console_lines)


def rates(res: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Operations per second of each phase (guest pvclock)."""
    return {p: cnt / (ns / 1e9) for p, (cnt, ns) in res.items()}


async def profile_phase(hv: Hypervisor, n: int, forks: int, phase: str) -> None:
    """One run with cProfile enabled only during `phase` (toggled from a handler on the
    hypervisor's guest log: with console=hypercall each line reaches it synchronously from
    the printk)."""
    prof = cProfile.Profile()
    start_after = {"single": None, "batched": "single", "ptwr": "batched", "fork": "ptwr"}[phase]
    buf = bytearray()
    state = {"on": False}

    def on_console(data: bytes) -> None:
        buf.extend(data)
        while b"\n" in buf:
            i = buf.index(b"\n")
            line = buf[:i].decode("ascii", "replace")
            del buf[:i + 1]
            m = LINE.match(line)
            if not m:
                continue
            if m.group(1) == start_after and not state["on"]:
                state["on"] = True
                prof.enable()
            elif m.group(1) == phase and state["on"]:
                prof.disable()
                state["on"] = False

    class GuestLog(logging.Handler):
        """console_io lines go to the hypervisor's log (aiovmm.guest, "(dN) line"), not
        to on_console: they reach this handler synchronously from the printk."""
        def emit(self, record: logging.LogRecord) -> None:
            on_console(record.getMessage().split(" ", 1)[-1].encode() + b"\n")

    handler = GuestLog()
    guest_log = logging.getLogger("aiovmm.guest")
    guest_log.addHandler(handler)
    if start_after is None:
        state["on"] = True
        prof.enable()
    try:
        res = await run_guest(hv, n, forks, console="hypercall")
    finally:
        guest_log.removeHandler(handler)
    if state["on"]:
        prof.disable()
    cnt, ns = res[phase]
    print(f"profile of the {phase} phase ({cnt} ops, {cnt / (ns / 1e9):,.0f}/s under cProfile), "
          f"top 8 by tottime:")
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:8]
    total = st.total_tt or 1.0
    print(f"  {'tottime s':>9} {'%':>5} {'cumtime s':>9} {'ncalls':>9}  function")
    for (fname, line, func), (_cc, nc, tt, ct, _callers) in rows:
        where = f"{os.path.relpath(fname, ROOT) if fname.startswith(ROOT) else fname}:{line}"
        print(f"  {tt:9.3f} {100 * tt / total:5.1f} {ct:9.3f} {nc:9d}  {func} ({where})")
    print(f"  (profiled total {total:.3f} s; per op {1e6 * total / cnt:.2f} µs)")


async def kvm_rates(n: int, forks: int, reps: int) -> dict[str, float] | None:
    from aiovmm.kvm_engine import unavailable_reason
    if unavailable_reason():
        print(f"KVM engine skipped: {unavailable_reason()}")
        return None
    per: dict[str, list[float]] = {p: [] for p in PHASES}
    async with Hypervisor(memory_mib=512, engine="kvm") as hv:
        for i in range(reps):
            r = rates(await run_guest(hv, n, forks))
            for p in PHASES:
                per[p].append(r[p])
            print(f"kvm rep {i} (n={n}): single {r['single']:>10,.0f}/s  batched {r['batched']:>10,.0f}/s  "
                  f"ptwr {r['ptwr']:>9,.0f}/s  fork {r['fork']:>7.1f}/s")
    return {p: statistics.median(v) for p, v in per.items()}


async def main(n: int, forks: int, reps: int, profile: str | None) -> None:
    if not os.path.exists(GUEST):
        fail(f"{GUEST} missing: make -C guests")
    per: dict[str, list[float]] = {p: [] for p in PHASES}
    host: list[float] = []
    async with Hypervisor(memory_mib=512) as hv:
        # Warm-up (imports, first engine, page cache), not counted.
        host_store_seconds(n)
        await run_guest(hv, min(n, 5000), 1)
        for i in range(reps):
            hs = host_store_seconds(n)
            host.append(n / hs)
            res = await run_guest(hv, n, forks)
            r = rates(res)
            for p in PHASES:
                per[p].append(r[p])
            print(f"rep {i}: single {r['single']:>10,.0f}/s  batched {r['batched']:>10,.0f}/s  "
                  f"ptwr {r['ptwr']:>9,.0f}/s  fork {r['fork']:>7.1f}/s  "
                  f"| host store {n / hs:>12,.0f}/s")
        if profile:
            await profile_phase(hv, n, forks, profile)

    med = {p: statistics.median(v) for p, v in per.items()}
    h = statistics.median(host)
    print(f"n={n} updates per phase (ptwr: {n // 10} stores), forks={forks}, {reps} runs, medians:")
    for p, unit in (("single", "PTE updates/s (one mmu_update each)"),
                    ("batched", "PTE updates/s (mmu_update batches of 512)"),
                    ("ptwr", "PTE updates/s (emulated stores to a read-only L1)"),
                    ("fork", "fork_once(1000)/s")):
        v = per[p]
        print(f"  {p:8s} {med[p]:>12,.1f} {unit}  [min {min(v):,.1f} max {max(v):,.1f}]; "
              f"{1e6 / med[p]:,.2f} µs per op")
    print(f"  host store (reference) {h:>12,.0f} 8-byte struct.pack_into/s "
          f"({1e6 / h:.3f} µs each)")
    print(f"  batched / host store = 1/{h / med['batched']:.1f};  "
          f"single / host store = 1/{h / med['single']:.1f};  "
          f"ptwr / host store = 1/{h / med['ptwr']:.1f}")
    ok = med["batched"] >= TARGET_BATCHED_UPS
    print(f"  target batched >= {TARGET_BATCHED_UPS:,}/s: {'met' if ok else 'NOT met'}")
    km = await kvm_rates(max(n // 20, 100), forks, reps)
    tail = ""
    if km:
        tail = (f" kvm_single_ups={km['single']:.0f} kvm_batched_ups={km['batched']:.0f}"
                f" kvm_ptwr_ups={km['ptwr']:.0f} kvm_fork_ops={km['fork']:.2f}")
    print(f"single_ups={med['single']:.0f} batched_ups={med['batched']:.0f} "
          f"ptwr_ups={med['ptwr']:.0f} fork_ops={med['fork']:.2f} host_store_ups={h:.0f}{tail}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="updates per phase (ptwr: n/10)")
    ap.add_argument("--forks", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--profile-phase", choices=PHASES, default="batched")
    a = ap.parse_args()
    if a.reps < 1:
        ap.error("--reps must be >= 1")
    uvloop.run(main(a.n, a.forks, a.reps, None if a.no_profile else a.profile_phase))
