"""Debian's Linux to its shell prompt on the KVM engine: the loop thread's CPU, A/B across trees.

  .venv/bin/python bench/kvm_linux_cpu.py [--runs 3] [TREE ...]

Each run boots once per TREE (default: this one), one process per boot, interleaved (the
host's load drifts; a tree is a checkout of aiovmm with its C helpers built, e.g. `git archive
main` unpacked with aiovmm/_native/*.so copied in and guests/build linked). Per boot, from
create() to the prompt "aiovmm:/# " on hvc0: the loop thread's CPU (time.thread_time), the
shadow guard's check before entries (KVMEngine._sync_shadow, thread CPU, its stub runs
apart), exits, the INs C answered (fast_in: Linux's quick_pit_calibrate reads port 0x42
100,000 times) and the exits by kind. The wrappers timing the guard cost the same in every
tree. Needs guests/build/linux (make setup).

Last line: per TREE, kvm_loop_cpu_s=<median> guard_s=<median> load=<1 min load at the end>
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX = os.path.join(ROOT, "guests/build/linux/")

CHILD = r"""
import asyncio, json, os, re, sys, time
sys.path.insert(0, sys.argv[1])
import uvloop
from aiovmm import Hypervisor, ShutdownReason
from aiovmm import kvm_engine as ke
assert ke.__file__.startswith(sys.argv[1]), ke.__file__
linux = sys.argv[2]
T = {"_sync_shadow": 0, "_invalidate": 0}
tt = time.thread_time_ns
def wrap(name):
    f = getattr(ke.KVMEngine, name)
    def w(self, *a):
        t = tt()
        try:
            return f(self, *a)
        finally:
            T[name] += tt() - t
    setattr(ke.KVMEngine, name, w)
for n in T:
    wrap(n)
PROMPT = re.compile(rb"aiovmm:[^\r\n]*# ")
async def main():
    async with Hypervisor(memory_mib=512, engine="kvm") as hv:
        buf, done = bytearray(), asyncio.Event()
        def feed(b):
            buf.extend(b)
            if PROMPT.search(buf):
                done.set()
        c0, w0 = tt(), time.perf_counter()
        dom = await hv.create(linux + "vmlinuz", memory_mib=256, cmdline="console=hvc0 quiet",
                              ramdisk=linux + "initramfs.cpio.gz", on_console=feed)
        await asyncio.wait_for(done.wait(), 1200)
        cpu, wall = (tt() - c0) / 1e9, time.perf_counter() - w0
        e = dom.vcpus[0].engine
        print(json.dumps({"cpu": cpu, "wall": wall, "guard": T["_sync_shadow"] / 1e9,
                          "stub": T["_invalidate"] / 1e9, "exits": e.exits,
                          "fast_in": e._ctx.fast_hits, "invalidations": e.invalidations,
                          "kinds": dict(e.exit_kinds.most_common(6)),
                          "load": os.getloadavg()[0]}))
        dom.shutdown(ShutdownReason.poweroff)
        await dom.wait()
uvloop.run(main())
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs="*", default=[ROOT])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    trees = [os.path.abspath(t) for t in args.trees]
    res: dict[str, list[dict]] = {t: [] for t in trees}
    for i in range(args.runs):
        for t in trees:
            out = subprocess.run([sys.executable, "-c", CHILD, t, LINUX], capture_output=True,
                                 text=True, timeout=1500)
            lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
            if out.returncode or not lines:
                sys.exit(f"{t}: boot failed (rc {out.returncode}): {out.stderr[-2000:]}")
            r = json.loads(lines[-1])
            res[t].append(r)
            print(f"run {i + 1} {t}: loop CPU {r['cpu']:.2f} s, wall {r['wall']:.1f} s, guard "
                  f"{r['guard']:.2f} s (stub {r['stub']:.2f}), exits {r['exits']}, fast_in "
                  f"{r['fast_in']}, invalidations {r['invalidations']}, load {r['load']:.1f}; "
                  f"{r['kinds']}", flush=True)
    for t in trees:
        rs = res[t]
        print(f"{t}: kvm_loop_cpu_s={statistics.median(r['cpu'] for r in rs):.2f} "
              f"guard_s={statistics.median(r['guard'] for r in rs):.2f} "
              f"load={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
