"""Debian's Linux booted again and again on one engine, several boots at once: a crash hunt.

Each of --parallel child processes boots the guest of bench/linux.py (same kernel, initramfs,
256 MiB, "console=hvc0 quiet"; its aiovmm_run) --runs times in a row, so that the boots load
the host as the test suite's parallel workers do. A boot that stops before the shell prompt
prints the stage it reached, the domain's end reason (a bounce that could not be written
names the vCPU's mode, stack, kernel_sp and handler: traps.bounce_context), the instruction
at its RIP and the last console lines.

  .venv/bin/python bench/linux_repeat.py --engine kvm --runs 12 --parallel 2

Last line: boots=<n> ok=<n> failed=<n> prompt_s=<median> load=<1-min load average at the end>
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linux  # noqa: E402  (bench/linux.py: the guest and its boot)


def child(engine: str, runs: int, timeout: float, tag: int) -> None:
    from aiovmm import Hypervisor

    async def main() -> None:
        for i in range(runs):
            async with Hypervisor(memory_mib=linux.MEMORY_MIB + 256, engine=engine) as hv:
                r = await linux.aiovmm_run(hv, timeout)
            r.update(worker=tag, run=i, load=os.getloadavg()[0])
            print(json.dumps(r), flush=True)
    asyncio.run(main())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("kvm", "unicorn"), default="kvm")
    ap.add_argument("--runs", type=int, default=10, help="boots per child, one after another")
    ap.add_argument("--parallel", type=int, default=2, help="child processes booting at once")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="give up on a boot after this long without console output (s)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.engine, args.runs, args.timeout, args.child)
        return 0
    if not (os.path.exists(linux.VMLINUZ) and os.path.exists(linux.INITRAMFS)):
        subprocess.run([sys.executable, os.path.join(linux.ROOT, "guests/linux/build.py")], check=True)
    procs = [subprocess.Popen([sys.executable, __file__, "--engine", args.engine, "--runs",
                               str(args.runs), "--timeout", str(args.timeout), "--child", str(k)],
                              stdout=subprocess.PIPE, text=True) for k in range(args.parallel)]
    results = []
    for p in procs:
        for line in p.stdout:
            r = json.loads(line)
            results.append(r)
            head = f"worker {r['worker']} run {r['run']} load {r['load']:.1f}: "
            if "prompt_s" in r:
                print(head + f"prompt in {r['prompt_s']:.1f} s", flush=True)
            else:
                print(head + f"FAILED at {r['stage']}: {r['why']}", flush=True)
                for ln in r.get("tail", []):
                    print(f"    | {ln}", flush=True)
        p.wait()
    ok = [r["prompt_s"] for r in results if "prompt_s" in r]
    print(f"boots={len(results)} ok={len(ok)} failed={len(results) - len(ok)} "
          f"prompt_s={statistics.median(ok) if ok else '-'} load={os.getloadavg()[0]:.1f}")
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
