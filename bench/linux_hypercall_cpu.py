"""Python CPU per hypercall in a Linux boot, this tree against another revision (A/B).

Each run boots Debian's kernel (guests/build/linux, as bench/linux.py: 256 MiB, "console=hvc0
quiet", the test initramfs) to its shell prompt twice AT THE SAME TIME, one process per tree,
so that both boots see the same host load: this tree, and --base (default main) exported with
`git archive` into a temporary directory (this tree's built aiovmm/_native/*.so copied in, so
only Python differs). Per boot, on the loop thread's CPU clock (time.thread_time):
  loop_cpu_s   create() returned -> prompt;
  dispatch_s   inside hypercall.dispatch (every hypercall the engine hands to Python), and
               per hypercall number: calls and microseconds each.
--engine picks kvm, unicorn or both (interleaved per run). Medians over --runs, and the
ratio this tree / base per figure (< 1: this tree is cheaper).

  .venv/bin/python bench/linux_hypercall_cpu.py --runs 3 --engine both --base main

Last line: <engine>_dispatch_ratio=<x> <engine>_loop_cpu_ratio=<y> ... per engine.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX = os.path.join(ROOT, "guests/build/linux")


def boot(tree: str, engine: str) -> None:
    """Child: one boot with `tree`'s aiovmm; prints one JSON line."""
    sys.path.insert(0, tree)
    from aiovmm import Hypervisor, ShutdownReason, hypercall
    spent: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    orig, tt = hypercall.dispatch, time.thread_time

    def timed(v) -> None:
        nr = v.engine.hypercall_args()[0]
        t = tt()
        try:
            orig(v)
        finally:
            spent[nr] += tt() - t
            calls[nr] += 1
    hypercall.dispatch = timed

    async def main() -> dict:
        seen = bytearray()
        prompt = asyncio.get_running_loop().create_future()

        def feed(d: bytes) -> None:
            seen.extend(d)
            if not prompt.done() and re.search(rb"aiovmm:[^\r\n]*# ", seen):
                prompt.set_result(None)
        async with Hypervisor(memory_mib=512, engine=engine) as hv:
            dom = await hv.create(os.path.join(LINUX, "vmlinuz"), memory_mib=256,
                                  cmdline="console=hvc0 quiet",
                                  ramdisk=os.path.join(LINUX, "initramfs.cpio.gz"), on_console=feed)
            t0, c0 = time.monotonic(), tt()
            spent.clear()
            calls.clear()
            await asyncio.wait([prompt, asyncio.ensure_future(dom.done)], timeout=900,
                               return_when=asyncio.FIRST_COMPLETED)
            out = dict(ok=prompt.done(), prompt_s=time.monotonic() - t0, loop_cpu_s=tt() - c0,
                       dispatch_s=sum(spent.values()), n=sum(calls.values()),
                       per_nr={k: [calls[k], spent[k] / calls[k] * 1e6] for k in calls},
                       load=os.getloadavg()[0])
            dom.shutdown(ShutdownReason.poweroff)
            await dom.wait()
        return out
    print(json.dumps(asyncio.run(main())))


def base_tree(rev: str, where: str) -> str:
    dst = os.path.join(where, "base")
    os.makedirs(dst)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dst], input=archive, check=True)
    os.makedirs(os.path.join(dst, "aiovmm/_native"), exist_ok=True)
    for so in glob.glob(os.path.join(ROOT, "aiovmm/_native/*.so")):
        shutil.copy(so, os.path.join(dst, "aiovmm/_native"))
    return dst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--engine", choices=("both", "kvm", "unicorn"), default="both")
    ap.add_argument("--base", default="main", help="revision to compare against (default main)")
    ap.add_argument("--child", nargs=2, metavar=("TREE", "ENGINE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        boot(*a.child)
        return 0
    engines = ("kvm", "unicorn") if a.engine == "both" else (a.engine,)
    res: dict = collections.defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="hcab-") as tmp:
        trees = {"base": base_tree(a.base, tmp), "this": ROOT}
        for run in range(a.runs):
            for eng in engines:
                procs = {name: subprocess.Popen([sys.executable, __file__, "--child", t, eng],
                                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                         for name, t in trees.items()}
                for name, p in procs.items():
                    out, _ = p.communicate()
                    try:
                        r = json.loads(out.strip().splitlines()[-1])
                    except (ValueError, IndexError):
                        r = dict(ok=False)
                    res[eng, name].append(r)
                    if r.get("ok"):
                        top = sorted(r["per_nr"].items(), key=lambda kv: -kv[1][0] * kv[1][1])[:5]
                        print(f"run {run + 1} {eng:7s} {name:4s} prompt {r['prompt_s']:6.1f} s  loop CPU "
                              f"{r['loop_cpu_s']:6.2f} s  dispatch {r['dispatch_s']:5.2f} s / {r['n']} "
                              f"({1e6 * r['dispatch_s'] / r['n']:.1f} us)  load {r['load']:.1f}  "
                              + " ".join(f"#{k}:{n}x{us:.1f}us" for k, (n, us) in top), flush=True)
                    else:
                        print(f"run {run + 1} {eng:7s} {name:4s} did not reach the prompt", flush=True)
    last = []
    for eng in engines:
        med = {}
        for name in ("base", "this"):
            ok = [r for r in res[eng, name] if r.get("ok")]
            if not ok:
                break
            med[name] = {k: statistics.median(r[k] for r in ok)
                         for k in ("loop_cpu_s", "dispatch_s", "prompt_s")}
        if len(med) < 2:
            last.append(f"{eng}_dispatch_ratio=-")
            continue
        for k in ("dispatch_s", "loop_cpu_s", "prompt_s"):
            print(f"{eng} median {k}: base {med['base'][k]:.2f} this {med['this'][k]:.2f} "
                  f"ratio {med['this'][k] / med['base'][k]:.3f}")
        last += [f"{eng}_dispatch_ratio={med['this']['dispatch_s'] / med['base']['dispatch_s']:.3f}",
                 f"{eng}_loop_cpu_ratio={med['this']['loop_cpu_s'] / med['base']['loop_cpu_s']:.3f}"]
    print(" ".join(last))
    return 0


if __name__ == "__main__":
    sys.exit(main())
