"""What a Linux guest on the KVM engine exits for when it does no I/O (issue 14): the
600-1,070 exits/s that bench/blk_exits.py's fit leaves outside the I/O.

One Debian guest (bench/blk.py's kernel and tools initramfs), one vCPU, no disk. Its script
sleeps (an idle guest) and then spins in a shell loop (a CPU-bound guest), --seconds each.
For each phase the host counts per second: the engine's exits by kind, the domain's
hypercalls by number, the guest's event-channel sends by binding (VIRQ_TIMER, IPIs,
xenstore, console), timer expiries (the singleshot/periodic timer firing), slices and the
slices the timer ended (kicks), the exits the engine completed in C without Python
(`in C: ...`, the KVM engine's exits_in_c) and, per hypercall (or user syscall) that reached
Python, the mean time its handler took there (`py us/call`). The instrumentation wraps
aiovmm.timers._fire, the guest's EventChannels.set_pending and VCPU._on_syscall in this
process only.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import os
import sys
import tempfile
import time

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blk as blkbench                                    # noqa: E402  (bench/blk.py)

from aiovmm import Hypervisor, timers                       # noqa: E402
from aiovmm.events import EventChannels                     # noqa: E402
from aiovmm.vcpu import VCPU                                # noqa: E402

HC_NAMES = {1: "mmu_update", 3: "stack_switch", 13: "multicall", 14: "update_va_mapping",
            15: "set_timer_op", 17: "xen_version", 20: "grant_table_op", 23: "iret", 24: "vcpu_op",
            25: "set_segment_base", 26: "mmuext_op", 29: "sched_op", 32: "event_channel_op"}
VIRQ_NAMES = {0: "VIRQ_TIMER", 1: "VIRQ_DEBUG", 2: "VIRQ_CONSOLE", 3: "VIRQ_DOM_EXC"}

SCRIPT = """#!/bin/sh
echo "PHASE-BEGIN idle"
sleep @S@
echo "PHASE-END idle"
echo "PHASE-BEGIN busy"
sh -c 'while :; do :; done' &
pid=$!
sleep @S@
kill $pid
echo "PHASE-END busy"
"""

counts: collections.Counter[str] = collections.Counter()


def instrument() -> None:
    fire = timers._fire

    def counted_fire(v) -> None:
        counts["timer expiries"] += 1
        fire(v)
    timers._fire = counted_fire
    set_pending = EventChannels.set_pending

    def counted_set_pending(self, port: int) -> None:
        if getattr(self, "domid", 0) != 0:
            p = self.ports.get(port)
            if p is None:
                what = "?"
            elif p.virq >= 0 and p.state.name == "virq":
                what = VIRQ_NAMES.get(p.virq, f"virq {p.virq}")
            else:
                what = p.state.name
            counts[f"event: {what}"] += 1
        set_pending(self, port)
    EventChannels.set_pending = counted_set_pending
    on_syscall = VCPU._on_syscall

    def timed_on_syscall(self) -> None:
        what = HC_NAMES.get(self.engine.hypercall_args()[0], "other") if self.kernel_mode else "user syscall"
        t0 = time.perf_counter_ns()
        on_syscall(self)
        counts[f"py_ns {what}"] += time.perf_counter_ns() - t0
        counts[f"py_n {what}"] += 1
    VCPU._on_syscall = timed_on_syscall


def snapshot(dom) -> dict[str, float]:
    eng = dom.vcpus[0].engine
    s: dict[str, float] = {f"exit: {k}": n for k, n in getattr(eng, "exit_kinds", {}).items()}
    s.update(exits=getattr(eng, "exits", 0), kicks=getattr(eng, "kicks", 0), t=time.perf_counter())
    s.update({f"in C: {k}": n for k, n in getattr(eng, "exits_in_c", {}).items()})
    for nr, n in dom.hypercall_counts.items():
        s[f"hypercall: {HC_NAMES.get(nr, nr)}"] = n
    s["slices"] = dom.hypervisor.scheduler.state(dom.vcpus[0]).slices
    s.update(counts)
    return s


async def main(args) -> None:
    instrument()
    sys.path.insert(0, os.path.join(blkbench.ROOT, "guests/linux"))
    import build as linux_build                    # its Cpio writer
    if not os.path.exists(blkbench.TOOLS_INITRD):
        blkbench.linux_assets()
    with tempfile.TemporaryDirectory(prefix="aiovmm-bench-idlex-") as td:
        c = linux_build.Cpio()
        c.file("idle.sh", SCRIPT.replace("@S@", str(args.seconds)).encode(), 0o755)
        rd = os.path.join(td, "initramfs-idle.cpio.gz")
        with open(blkbench.TOOLS_INITRD, "rb") as f, open(rd, "wb") as out:
            out.write(f.read())
            out.write(gzip.compress(c.finish(), mtime=0))
        async with Hypervisor(memory_mib=blkbench.GUEST_MIB + 128) as hv:
            t0 = time.perf_counter()
            dom = await hv.create(blkbench.VMLINUZ, memory_mib=blkbench.GUEST_MIB, ramdisk=rd,
                                  cmdline="console=hvc0 quiet aiovmm.run=/bin/sh,/idle.sh aiovmm.exit=1",
                                  engine=args.engine)
            for phase in ("idle", "busy"):
                await dom.wait_for_line(rf"^PHASE-BEGIN {phase}$", timeout=args.boot_timeout)
                if phase == "idle":
                    print(f"{args.engine}: script started {time.perf_counter() - t0:.0f} s after create",
                          flush=True)
                await asyncio.sleep(1.0)           # the shell's fork/exec of sleep is not the phase
                a = snapshot(dom)
                end = asyncio.ensure_future(dom.wait_for_line(rf"^PHASE-END {phase}$", timeout=600))
                await asyncio.sleep(args.seconds - 2)
                b = snapshot(dom)
                await end
                dt = b["t"] - a["t"]
                d = {k: (b.get(k, 0) - a.get(k, 0)) / dt for k in set(a) | set(b) if k != "t"}
                print(f"{phase}: per second over {dt:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
                for k in sorted(d, key=lambda k: -d[k]):
                    if d[k] >= 0.5 and not k.startswith("py_"):
                        print(f"    {k:<34}{d[k]:9.1f}", flush=True)
                print("  in Python (per second, mean handler us/call):", flush=True)
                for k in sorted((k for k in d if k.startswith("py_n ")), key=lambda k: -d[k]):
                    what = k[5:]
                    if d[k] >= 0.5:
                        us = d[f"py_ns {what}"] / d[k] / 1000
                        print(f"    {what:<34}{d[k]:9.1f}{us:9.1f}", flush=True)
            await dom.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=10, help="per phase")
    ap.add_argument("--engine", default="kvm")
    ap.add_argument("--boot-timeout", type=float, default=900)
    uvloop.run(main(ap.parse_args()))
