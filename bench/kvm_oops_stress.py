"""Reproduction of issue 11 (Linux on the KVM engine: "BUG: unable to handle page fault for
address: <user text> / Oops: 0010", a network that stopped answering). Not a benchmark.

Boots Debian's kernel (guests/build/linux) on the KVM engine RUNS times with VCPUS vCPUs, runs
the test workload (optionally with two busy loops in the guest), pings it 100 times from a
VirtualLan and greps dmesg for BUG/Oops/WARNING/Call Trace/segfault. It also asks KVM after
every slice whether it still holds an exception the engine has not reported
(KVM_GET_VCPU_EVENTS; the root cause). Root (namespaces, taps); ~3-6 min per run when the
machine is loaded.

    .venv/bin/python bench/kvm_oops_stress.py [RUNS=4] [VCPUS=2] [LOAD=1]

Last line: runs=.. failed=.. oops=.. slices=.. held=.. (held must be 0 since the fix).
"""
from __future__ import annotations

import asyncio
import fcntl
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from aiovmm import Hypervisor                     # noqa: E402
from aiovmm.testing import VirtualLan             # noqa: E402
from conftest import BUILD, HV_MEMORY_MIB         # noqa: E402
from test_linux import Shell                      # noqa: E402

LINUX = BUILD / "linux"
KVM_GET_VCPU_EVENTS = 0x8040AE9F
BAD = re.compile(r"\bBUG\b|WARNING|Oops|Call Trace|unchecked MSR|segfault")


def observe(eng, counts: dict[str, int]) -> None:
    """Count slices, and those after which KVM still holds an exception (or the vCPU is in
    the engine's ring-0 stub)."""
    run = eng.run

    def observed(budget: int, max_ns: int = 0):
        reason = run(budget, max_ns)
        ev = bytearray(64)
        fcntl.ioctl(eng.vcpu_fd, KVM_GET_VCPU_EVENTS, ev)
        counts["slices"] += 1
        if ev[0] or ev[3] or eng.get("cs") & 3 == 0:
            counts["held"] += 1
        return reason
    eng.run = observed


async def one(i: int, vcpus: int, load: bool, counts: dict[str, int]) -> tuple[bool, int]:
    async with Hypervisor(memory_mib=HV_MEMORY_MIB + 192 + 16, engine="kvm") as hv:
        async with VirtualLan("198.18.7.1/24") as lan:
            t0 = time.monotonic()
            dom = await hv.create(str(LINUX / "vmlinuz"), memory_mib=192,
                                  ramdisk=str(LINUX / "initramfs.cpio.gz"), name=f"stress{i}",
                                  cmdline="console=hvc0 aiovmm.ip=198.18.7.2/24",
                                  vifs=[lan.vif("00:16:3e:11:22:35")], vcpus=vcpus)
            for v in dom.vcpus:
                observe(v.engine, counts)
            await dom.wait_for_line(r"^aiovmm-init: ready", timeout=900)
            boot = time.monotonic() - t0
            sh = Shell(dom)
            if load:
                await sh.run("for i in 1 2; do (while :; do :; done) & done; true")
            await sh.run("echo $((6*7)) $(uname -r); ls /bin | wc -l; "
                         "dd if=/dev/zero of=/tmp/x bs=64k count=64; md5sum /tmp/x", 300)
            await lan.run("ping", "-c", "1", "-w", "60", "198.18.7.2", timeout=90)
            rc, out = await lan.run("ping", "-c", "100", "-i", "0.02", "-W", "5", "-q",
                                    "198.18.7.2", timeout=180)
            loss = re.search(r"(\d+)% packet loss", out)
            _, dmesg = await sh.run("dmesg", 300)
            bad = [l for l in dmesg if BAD.search(l)]
            oops = sum("Oops" in l for l in bad)
            print(f"run {i}: vcpus={vcpus} load={int(load)} boot {boot:.0f} s, ping rc={rc} "
                  f"loss={loss.group(1) if loss else '?'}%, dmesg: {bad[:6]}", flush=True)
            return bool(bad) or rc != 0, oops


async def main() -> None:
    args = [int(a) for a in sys.argv[1:4]]
    runs, vcpus, load = args + [4, 2, 1][len(args):]
    counts = {"slices": 0, "held": 0}
    failed = oops = 0
    for i in range(runs):
        f, o = await one(i, vcpus, bool(load), counts)
        failed += f
        oops += o
    print(f"runs={runs} vcpus={vcpus} load={load} failed={failed} oops={oops} "
          f"slices={counts['slices']} held={counts['held']}")


if __name__ == "__main__":
    asyncio.run(main())
