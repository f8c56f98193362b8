"""CPU benchmark: guests/bench/workload.c natively vs. as a guest (guests/build/bench/cpu.elf).

Both run in this one process run, interleaved (native, guest, native, guest, ...) so machine
noise hits both alike. Guest time is the guest's own pvclock measurement around work(), native
time is cpu-native's clock_gettime measurement around the same work(): neither includes boot
or process start-up. Both are cold runs (fresh process / fresh vCPU: the guest's figure
includes translating the workload's code).

MIPS: one extra calibration boot with a per-instruction counting hook (it runs ~2x slower, so
it is never timed) gives the instruction count; mips = count / median uninstrumented guest
seconds. The count covers the whole boot (start-up code, printk, poweroff), not only work();
a hello.elf boot is counted the same way and printed so the overhead is visible (it is small).

On the KVM engine (where /dev/kvm works) cpu.elf also runs `reps` times, interleaved with
native runs the same way (no instruction count: KVM runs guest code natively).

Last line: mips=<x> native_ratio=<guest_time/native_time> guest_ms=<median> native_ms=<median>
           [kvm_native_ratio=<kvm guest/native> kvm_guest_ms=<median>]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import uvloop

from aiovmm import Hypervisor
from aiovmm.abi import ShutdownReason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "guests/build/bench/cpu.elf")
HELLO = os.path.join(ROOT, "guests/build/tests/hello.elf")
NATIVE = os.path.join(ROOT, "guests/build/bench/cpu-native")
SRC = os.path.join(ROOT, "guests/bench")
EXPECTED = 0xd5bb055a2bea1356          # guests/README.md: cpu.elf result == cpu-native result
LINE = re.compile(r"^cpu: result=0x([0-9a-f]+) ns=(\d+)$")


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def native_binary(tmp: str) -> str:
    """The prebuilt cpu-native, or the same build (gcc -O2 workload.c workload_native.c)."""
    if os.access(NATIVE, os.X_OK):
        return NATIVE
    out = os.path.join(tmp, "cpu-native")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", out, os.path.join(SRC, "workload.c"),
                    os.path.join(SRC, "workload_native.c")], check=True)
    return out


def run_native(exe: str) -> tuple[int, int]:
    p = subprocess.run([exe], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        fail(f"{exe} exited {p.returncode}: {p.stderr.strip()}")
    m = LINE.match(p.stdout.strip())
    if not m:
        fail(f"unexpected cpu-native output {p.stdout!r}")
    return int(m.group(1), 16), int(m.group(2))


async def boot(hv: Hypervisor, path: str, count: bool = False) -> tuple[list[str], int, float]:
    """One boot to poweroff: (console lines, instructions if counted, wall seconds)."""
    t0 = time.perf_counter()
    dom = await hv.create(path, memory_mib=16)
    eng = dom.vcpus[0].engine           # keep it: destroy() empties dom.vcpus
    if count:
        eng.enable_instruction_count()  # before the vCPU task has run its first slice
    reason = await dom.wait()
    wall = time.perf_counter() - t0
    await torn_down(hv, dom)
    if reason != ShutdownReason.poweroff or "poweroff" not in dom.console_lines:
        fail(f"{os.path.basename(path)}: {dom.describe_end()}; console {dom.console_lines}")
    return dom.console_lines, eng.instructions_executed, wall


async def torn_down(hv: Hypervisor, dom) -> None:
    """Wait until the domain is destroyed (its vCPU engine closed). That runs on the loop
    after dom.wait() returns and takes ~20 ms; without this wait it would stall the next
    guest in the middle of its timed work()."""
    async with asyncio.timeout(10):
        while dom.domid in hv.domains:
            await asyncio.sleep(0.001)


def parse_guest(lines: list[str]) -> tuple[int, int]:
    for line in lines:
        m = LINE.match(line)
        if m:
            return int(m.group(1), 16), int(m.group(2))
    fail(f"no 'cpu: result=' line in {lines}")


async def main(reps: int) -> None:
    from aiovmm.kvm_engine import unavailable_reason
    kvm_ns: list[int] = []
    kvm_native: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        exe = native_binary(tmp)
        if not unavailable_reason():
            async with Hypervisor(memory_mib=1024, engine="kvm") as hv:
                await boot(hv, GUEST)
                for i in range(reps):
                    r_n, ns_n = run_native(exe)
                    lines, _, wall = await boot(hv, GUEST)
                    r_g, ns_g = parse_guest(lines)
                    if r_n != r_g or r_g != EXPECTED:
                        fail(f"KVM result mismatch: native {r_n:#x} guest {r_g:#x}")
                    kvm_native.append(ns_n)
                    kvm_ns.append(ns_g)
                    print(f"kvm rep {i}: native {ns_n / 1e6:8.2f} ms   guest {ns_g / 1e6:8.2f} ms "
                          f"(boot to poweroff {wall * 1e3:7.2f} ms)   ratio {ns_g / ns_n:6.2f}")
        else:
            print(f"KVM engine skipped: {unavailable_reason()}")
        native_ns: list[int] = []
        guest_ns: list[int] = []
        guest_wall: list[float] = []
        async with Hypervisor(memory_mib=1024) as hv:
            # Warm-up (imports, page cache, first Unicorn instance), not counted.
            run_native(exe)
            await boot(hv, GUEST)
            for i in range(reps):
                r_n, ns_n = run_native(exe)
                lines, _, wall = await boot(hv, GUEST)
                r_g, ns_g = parse_guest(lines)
                if r_n != r_g or r_g != EXPECTED:
                    fail(f"result mismatch: native {r_n:#x} guest {r_g:#x} expected {EXPECTED:#x}")
                native_ns.append(ns_n)
                guest_ns.append(ns_g)
                guest_wall.append(wall)
                print(f"rep {i}: native {ns_n / 1e6:8.2f} ms   guest {ns_g / 1e6:8.2f} ms "
                      f"(boot to poweroff {wall * 1e3:7.2f} ms)   ratio {ns_g / ns_n:6.1f}")
            # Calibration boots (instrumented: never timed).
            _, insns, _ = await boot(hv, GUEST, count=True)
            _, boot_insns, _ = await boot(hv, HELLO, count=True)
    if insns <= 0:
        fail("instruction count is zero: enable_instruction_count() did not take effect")

    g = statistics.median(guest_ns)
    n = statistics.median(native_ns)
    ratios = [a / b for a, b in zip(guest_ns, native_ns)]
    mips = insns / (g / 1e9) / 1e6
    print(f"result 0x{EXPECTED:x} on both sides, {reps} runs each")
    print(f"native (reference): median {n / 1e6:.2f} ms  min {min(native_ns) / 1e6:.2f}  "
          f"max {max(native_ns) / 1e6:.2f}")
    print(f"guest:              median {g / 1e6:.2f} ms  min {min(guest_ns) / 1e6:.2f}  "
          f"max {max(guest_ns) / 1e6:.2f}  (boot to poweroff median "
          f"{statistics.median(guest_wall) * 1e3:.2f} ms)")
    print(f"ratio guest/native: median of medians {g / n:.1f}, median of per-pair ratios "
          f"{statistics.median(ratios):.1f}")
    print(f"instructions (whole cpu.elf boot) {insns:,}; a hello.elf boot is {boot_insns:,} "
          f"({100 * boot_insns / insns:.2f}%), so work() is ~{insns - boot_insns:,}")
    print(f"guest speed {mips:.0f} MIPS (workload-only count: "
          f"{(insns - boot_insns) / (g / 1e9) / 1e6:.0f} MIPS); "
          f"native runs the same at ~{insns / (n / 1e9) / 1e6:.0f} MIPS")
    tail = ""
    if kvm_ns:
        kg, kn = statistics.median(kvm_ns), statistics.median(kvm_native)
        print(f"KVM engine: guest median {kg / 1e6:.2f} ms vs native {kn / 1e6:.2f} ms "
              f"(ratio {kg / kn:.2f})")
        tail = f" kvm_native_ratio={kg / kn:.2f} kvm_guest_ms={kg / 1e6:.2f}"
    print(f"mips={mips:.1f} native_ratio={g / n:.2f} guest_ms={g / 1e6:.2f} native_ms={n / 1e6:.2f}{tail}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=11)
    a = ap.parse_args()
    uvloop.run(main(a.reps))
