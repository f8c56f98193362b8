"""What Linux's PIT polling costs a Debian Linux 6.1 PV boot (issues 10 and 11).

The reads: Linux's quick_pit_calibrate (arch/x86/kernel/tsc.c, inlined into
native_calibrate_cpu_early.part.0 in Debian's 6.1 kernel), reached because Xen's CPUID policy
stops the basic leaves at 0xd (no leaf 0x16 for cpu_khz_from_cpuid) and the CPU is no Atom
(cpu_khz_from_msr). It programs PIT channel 2 and waits, in pit_expect_msb(), for the counter's
MSB to leave 0xff: up to 50,000 times two `in $0x42,%al`. A PV domU has no PIT (libxl creates
it with emulation_flags 0, so Xen's pv_pit_handler answers ~0), so every read is 0xff, the loop
runs to its cap (100,000 reads), the next MSB (0xfe) fails at once and Linux prints "Fast TSC
calibration failed": exactly what it does on Xen, and what aiovmm answers (emulate.port_in).

Per run and engine, two boots interleaved (bench/linux.py's aiovmm_run, create -> prompt):
  - xen:  the ports answered as Xen answers a domU (all ones): what aiovmm does;
  - zero: a counterfactual, NOT a behaviour to adopt: PIT ports 0x40-0x42 read 0x00, so
          pit_expect_msb(0xff) fails at its first read and the calibration gives up at once.
          The difference is what the 100,000 reads cost the boot.
Printed per boot: prompt_s, PIT counter reads (the policy's answers + the engine's C repeats),
and the calibration's span (its first port read, `in $0x61`, to the next hypercall Python
handles).
Last line: medians per engine and mode, their ratio, the median of the runs' paired
differences (xen - zero) and of the calibration's span, with the load average.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import linux as bench_linux  # noqa: E402  (bench/linux.py: the same boot and markers)

from aiovmm import Hypervisor, emulate, hypercall  # noqa: E402
from aiovmm.kvm_engine import unavailable_reason  # noqa: E402

PIT_COUNTERS = (0x40, 0x41, 0x42)
_real_port_in = emulate.port_in
_real_port_in_fixed = emulate.port_in_fixed
_real_dispatch = hypercall.dispatch


class Probe:
    """Wraps the shared port policy for one boot: counts the PIT counter reads it answers
    and times the calibration: from its first port read (`in $0x61`, once) to the next
    hypercall Python handles (none happens inside it: interrupts are masked). In the `zero`
    mode it answers the PIT counters 0x00 (and lets no engine repeat an answer in C, whose
    KVM path always repeats 0xff)."""

    def __init__(self, zero: bool) -> None:
        self.zero = zero
        self.reads = 0
        self.start: float | None = None
        self.end: float | None = None

    def port_in(self, v, port: int, size: int):
        val = _real_port_in(v, port, size)
        if val is not None and port == 0x61 and self.start is None:
            self.start = time.perf_counter()
        if val is not None and port in PIT_COUNTERS:
            self.reads += 1
            if self.zero:
                val = 0
        return val

    def dispatch(self, v) -> None:
        if self.start is not None and self.end is None:
            self.end = time.perf_counter()
        _real_dispatch(v)

    def __enter__(self) -> "Probe":
        emulate.port_in = self.port_in
        hypercall.dispatch = self.dispatch
        if self.zero:
            emulate.port_in_fixed = lambda v: False
        return self

    def __exit__(self, *exc) -> None:
        emulate.port_in = _real_port_in
        emulate.port_in_fixed = _real_port_in_fixed
        hypercall.dispatch = _real_dispatch


async def one(hv: Hypervisor, mode: str, timeout: float) -> dict:
    doms = []
    real_create = hv.create

    async def create(*a, **kw):
        dom = await real_create(*a, **kw)
        doms.append(dom)
        return dom

    hv.create = create
    try:
        with Probe(mode == "zero") as probe:
            r = await bench_linux.aiovmm_run(hv, timeout)
    finally:
        del hv.create
    if not doms:
        raise SystemExit(f"no domain: {r}")
    eng = doms[0].vcpus[0].engine
    repeats = eng.exits_in_c["port in"] if getattr(eng, "kind", "") == "kvm" else eng.fast_port_reads
    r["pit_reads"] = probe.reads + repeats
    r["loop_s"] = (probe.end - probe.start) if probe.end else float("nan")
    return r


def med(vals: list[float]) -> float:
    return statistics.median(vals) if vals else float("nan")


async def main(args: argparse.Namespace) -> int:
    engines = ["unicorn", "kvm"] if args.engine == "both" else [args.engine]
    if "kvm" in engines and unavailable_reason():
        print(f"KVM engine skipped: {unavailable_reason()}")
        engines.remove("kvm")
    res: dict[tuple[str, str], list[dict]] = {(e, m): [] for e in engines for m in ("xen", "zero")}
    print(f"load before: {os.getloadavg()[0]:.1f}", flush=True)
    for i in range(args.runs):
        for e in engines:
            for m in (("xen", "zero") if i % 2 == 0 else ("zero", "xen")):
                async with Hypervisor(memory_mib=bench_linux.MEMORY_MIB + 256, engine=e) as hv:
                    r = await one(hv, m, args.timeout)
                res[(e, m)].append(r)
                print(f"{e:7} {m:4} run {i + 1}: prompt {r.get('prompt_s', float('nan')):.2f} s, "
                      f"port reads {r['pit_reads']}, "
                      f"calibration span {r['loop_s']:.3f} s, "
                      f"{r.get('engine_stats', '')}", flush=True)
    out = [f"load={os.getloadavg()[0]:.1f}"]
    for e in engines:
        x = med([r["prompt_s"] for r in res[(e, "xen")] if "prompt_s" in r])
        z = med([r["prompt_s"] for r in res[(e, "zero")] if "prompt_s" in r])
        lx = med([r["loop_s"] for r in res[(e, "xen")]])
        # Per run (the two boots next to each other): the load moves between runs more than
        # the calibration costs on Unicorn, so the pairs' differences, not the medians' ratio.
        d = med([a["prompt_s"] - b["prompt_s"] for a, b in zip(res[(e, "xen")], res[(e, "zero")])
                 if "prompt_s" in a and "prompt_s" in b])
        out.append(f"{e}_prompt_s={x:.2f} {e}_zero_prompt_s={z:.2f} {e}_ratio={x / z:.3f} "
                   f"{e}_paired_diff_s={d:.2f} {e}_calibration_s={lx:.3f}")
    print(" ".join(out))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--engine", choices=("both", "unicorn", "kvm"), default="both")
    ap.add_argument("--timeout", type=float, default=180.0)
    sys.exit(asyncio.run(main(ap.parse_args())))
