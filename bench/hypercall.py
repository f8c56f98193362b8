"""Hypercall round trip: guests/build/bench/hypercall.elf vs. a host Linux syscall.

The guest loops HYPERVISOR_xen_version(XENVER_version) n times per round and prints
`hypercall: round=i n=N ns=T` (pvclock); hypercall_us = median over rounds of T/N/1000. The
loop itself costs a few guest instructions per call (negligible next to the hypercall).

References, measured in the same run, before and after the guest (medians of both):
  - host_syscall_us: a C program (compiled here into a temp dir, gcc -O2) looping
    syscall(SYS_getppid) 1e6 times: the bare cost of a trivial Linux syscall.
  - ctypes_syscall_us: the same syscall from Python through ctypes, 100,000 times: a trivial
    syscall plus the Python->C call overhead (the closest host analogue of our C->Python
    hypercall hook).

With --engine both (default where /dev/kvm works) the same guest also runs on the KVM engine
(n/20 calls per round: each is a VM exit), and the bare exit floor of this machine is measured
in the same run: a CPL-3 `out` loop in a minimal VM around KVM_RUN (fcntl.ioctl, no handler).
The KVM engine's C loop answers xen_version(XENVER_version) itself (csrc/kvm.c fast_query), so
there the Python round trip is measured with xen_version(XENVER_pagesize, NULL) (`op=pagesize`:
as trivial, and always the dispatcher's): kvm_hypercall_us; the C-answered XENVER_version is
kvm_c_hypercall_us. The two guests alternate, `--kvm-runs` times each.

Last line: hypercall_us=<x> host_syscall_us=<y> ratio=<x/y> ctypes_syscall_us=<z>
           [kvm_hypercall_us=<k> kvm_exit_floor_us=<f> kvm_floor_ratio=<k/f>
            kvm_c_hypercall_us=<c> kvm_c_floor_ratio=<c/f>]
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
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
GUEST = os.path.join(ROOT, "guests/build/bench/hypercall.elf")
LINE = re.compile(r"^hypercall: round=(\d+) n=(\d+) ns=(\d+)$")
SYS_getppid = 110                                   # x86_64

C_SRC = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(void)
{
    const long n = 1000000;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        syscall(SYS_getppid);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("%.2f\n", ns / n);
    return 0;
}
"""


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def build_c(tmp: str) -> str:
    src, exe = os.path.join(tmp, "getppid.c"), os.path.join(tmp, "getppid")
    with open(src, "w") as f:
        f.write(C_SRC)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, src], check=True)
    return exe


def c_syscall_ns(exe: str) -> float:
    return float(subprocess.run([exe], capture_output=True, text=True, check=True).stdout)


def ctypes_syscall_ns(n: int = 100_000) -> float:
    libc = ctypes.CDLL(None)
    f = libc.syscall
    f.restype = ctypes.c_long
    f.argtypes = [ctypes.c_long]
    ppid = os.getppid()
    t0 = time.perf_counter_ns()
    for _ in range(n):
        f(SYS_getppid)
    t1 = time.perf_counter_ns()
    if f(SYS_getppid) != ppid:
        fail("ctypes syscall(SYS_getppid) returned the wrong value")
    return (t1 - t0) / n


def per_call_us(f, n: int = 50_000) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        f()
    return (time.perf_counter_ns() - t0) / n / 1000


async def breakdown(hv: Hypervisor) -> dict[str, float]:
    """Host-side parts of one hypercall, timed outside emulation (no guest instruction runs)
    on a freshly created hello.elf domain whose registers are saved first and restored after,
    so it then boots normally. The SYSCALL hook does hypercall_args() (raw uc_reg_read_batch of
    6 registers), hypercall.call() (table lookup + do_xen_version), set_rax() (raw
    uc_reg_write_batch) and event_deliverable(); `dispatch` is all of them together."""
    from aiovmm import hypercall
    from aiovmm.abi import Hypercall, XenVer
    from aiovmm.vcpu_engine import GPRS
    libc = ctypes.CDLL(None)
    labs = libc.labs
    labs.restype, labs.argtypes = ctypes.c_long, [ctypes.c_long]
    dom = await hv.create(os.path.join(ROOT, "guests/build/tests/hello.elf"), memory_mib=16)
    v = dom.vcpus[0]
    eng = v.engine
    saved = dict(zip(GPRS, eng.read(GPRS)))
    nr, cmd = int(Hypercall.xen_version), int(XenVer.version)
    eng.write({"rax": nr, "rdi": cmd, "rsi": 0})
    parts = {
        "python_loop_iteration": per_call_us(lambda: None),
        "ctypes_call_floor(labs)": per_call_us(lambda: labs(-1)),
        "hypercall_args(6 regs)": per_call_us(eng.hypercall_args),
        "set_rax": per_call_us(lambda: eng.set_rax(nr)),
        "call(xen_version)": per_call_us(lambda: hypercall.call(v, nr, cmd, 0, 0, 0, 0)),
        "event_deliverable": per_call_us(v.event_deliverable),
        "dispatch(all of the above)": per_call_us(lambda: hypercall.dispatch(v)),
    }
    eng.write(saved)
    v.hypercalls = 0
    if await dom.wait() != ShutdownReason.poweroff or dom.console_lines != ["hello", "poweroff"]:
        fail(f"breakdown domain did not boot normally afterwards: {dom.describe_end()} "
             f"{dom.console_lines}")
    return parts


def host_refs(exe: str, c_ns: list[float], py_ns: list[float], reps: int = 3) -> None:
    for _ in range(reps):
        c_ns.append(c_syscall_ns(exe))
        py_ns.append(ctypes_syscall_ns())


def kvm_exit_floor_us(n: int = 5000) -> float:
    """Median of 3 runs of n `out` exits from CPL 3 in a minimal VM (one identity-mapped
    2 MiB user page; register state set through KVM_SET_SREGS/REGS), each exit handled by a
    bare Python loop around KVM_RUN: the floor any KVM hypercall path pays here (the VM and
    loop of bench/kvm_inkernel_exit.py, which also measures KVM completing the exit itself)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kvm_inkernel_exit import one
    return statistics.median(one(n, False)[0] for _ in range(3))


async def guest_rounds(engine: str, n: int, rounds: int,
                       op: str = "xen_version") -> tuple[list[float], int, float]:
    """Boot hypercall.elf (`op`) on `engine`: (us per call per round, hypercalls, wall s)."""
    async with Hypervisor(memory_mib=1024, engine=engine) as hv:
        t0 = time.perf_counter()
        dom = await hv.create(GUEST, memory_mib=16, cmdline=f"n={n} rounds={rounds} op={op}")
        v = dom.vcpus[0]
        reason = await dom.wait()
        wall = time.perf_counter() - t0
        if reason != ShutdownReason.poweroff or "poweroff" not in dom.console_lines:
            fail(f"hypercall.elf on {engine}: {dom.describe_end()}; console {dom.console_lines}")
    out = []
    for line in dom.console_lines:
        m = LINE.match(line)
        if m:
            _, nn, ns = map(int, m.groups())
            out.append(ns / nn / 1000)
    if len(out) != rounds or any("failed" in line for line in dom.console_lines):
        fail(f"{engine} op={op}: expected {rounds} rounds, got {len(out)}: {dom.console_lines}")
    return out, v.hypercalls, wall


async def main(n: int, rounds: int, engines: str = "both", kvm_runs: int = 3) -> None:
    c_ns: list[float] = []
    py_ns: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_c(tmp)
        host_refs(exe, c_ns, py_ns)
        async with Hypervisor(memory_mib=1024) as hv:
            t0 = time.perf_counter()
            dom = await hv.create(GUEST, memory_mib=16, cmdline=f"n={n} rounds={rounds}")
            v = dom.vcpus[0]
            reason = await dom.wait()
            wall = time.perf_counter() - t0
            if reason != ShutdownReason.poweroff or "poweroff" not in dom.console_lines:
                fail(f"hypercall.elf: {dom.describe_end()}; console {dom.console_lines}")
            hypercalls = v.hypercalls
            async with asyncio.timeout(10):                # let its teardown finish
                while dom.domid in hv.domains:
                    await asyncio.sleep(0.001)
            parts = await breakdown(hv)
        host_refs(exe, c_ns, py_ns)

    per_call_us = []
    for line in dom.console_lines:
        m = LINE.match(line)
        if m:
            _, nn, ns = map(int, m.groups())
            per_call_us.append(ns / nn / 1000)
            print(f"guest round {m.group(1)}: {nn} hypercalls in {ns / 1e6:.1f} ms = "
                  f"{per_call_us[-1]:.3f} us/call")
    if len(per_call_us) != rounds:
        fail(f"expected {rounds} rounds, got {len(per_call_us)}: {dom.console_lines}")
    hc = statistics.median(per_call_us)
    host = statistics.median(c_ns) / 1000
    py = statistics.median(py_ns) / 1000
    print(f"guest: {hypercalls:,} hypercalls in {wall:.2f} s boot to poweroff (all kinds)")
    print(f"hypercall (xen_version) round trip: median {hc:.3f} us "
          f"(min {min(per_call_us):.3f}, max {max(per_call_us):.3f}) over {rounds} rounds")
    print(f"host syscall(SYS_getppid) from C:      median {host * 1000:.1f} ns "
          f"(runs: {', '.join(f'{x:.0f}' for x in c_ns)})")
    print(f"host syscall(SYS_getppid) from ctypes: median {py * 1000:.1f} ns "
          f"(runs: {', '.join(f'{x:.0f}' for x in py_ns)})")
    print(f"hypercall / C syscall = {hc / host:.1f}x; hypercall / ctypes syscall = {hc / py:.1f}x")
    print("host-side parts of one hypercall, timed outside emulation (us/call, incl. a "
          "Python loop iteration):")
    for k, x in parts.items():
        print(f"  {k:<28} {x:6.3f}")
    rest = hc - parts["dispatch(all of the above)"] + parts["python_loop_iteration"]
    print(f"  remainder ~{rest:.3f}: hook entry (C->Python ctypes callback, _hook_syscall, "
          f"_on_syscall), the guest loop and emulation")
    tail = ""
    from aiovmm.kvm_engine import unavailable_reason
    if engines == "both" and not unavailable_reason():
        floors = [kvm_exit_floor_us()]
        py_us: list[float] = []
        c_us: list[float] = []
        for _ in range(kvm_runs):                       # interleaved: the host's load drifts
            us, calls, wall = await guest_rounds("kvm", max(n // 20, 100), rounds, "pagesize")
            py_us += us
            print(f"KVM engine, xen_version(pagesize) through Python: {calls:,} hypercalls in "
                  f"{wall:.2f} s; rounds: {', '.join(f'{x:.1f}' for x in us)} us")
            us, calls, wall = await guest_rounds("kvm", max(n // 20, 100), rounds)
            c_us += us
            print(f"KVM engine, xen_version(version) answered in C: {calls:,} hypercalls in "
                  f"{wall:.2f} s; rounds: {', '.join(f'{x:.1f}' for x in us)} us")
            floors.append(kvm_exit_floor_us())
        floor = statistics.median(floors)
        k, kc = statistics.median(py_us), statistics.median(c_us)
        print(f"KVM exit floor (bare CPL-3 `out` loop, around the runs): "
              f"{', '.join(f'{x:.2f}' for x in floors)} us, median {floor:.2f}")
        print(f"KVM round trip medians: through Python {k:.2f} us = {k / floor:.2f}x floor; "
              f"in C {kc:.2f} us = {kc / floor:.2f}x floor (load {os.getloadavg()[0]:.1f})")
        tail = (f" kvm_hypercall_us={k:.3f} kvm_exit_floor_us={floor:.3f} kvm_floor_ratio={k / floor:.2f}"
                f" kvm_c_hypercall_us={kc:.3f} kvm_c_floor_ratio={kc / floor:.2f}")
    elif engines == "both":
        print(f"KVM engine skipped: {unavailable_reason()}")
    print(f"hypercall_us={hc:.3f} host_syscall_us={host:.4f} ratio={hc / host:.1f} "
          f"ctypes_syscall_us={py:.4f}{tail}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engines", choices=("both", "unicorn"), default="both")
    ap.add_argument("--kvm-runs", type=int, default=3)
    a = ap.parse_args()
    uvloop.run(main(a.n, a.rounds, a.engines, a.kvm_runs))
