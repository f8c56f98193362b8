"""Per-entry cost of mmu_update in the hypervisor, without the guest: the Python path a
SYSCALL hook takes (hypercall.dispatch -> mmu_ops -> mmu.PageTables.update_entry), driven
by hand on a paused vCPU of the project's kernel (Unicorn engine).

Linux issues one mmu_update per PTE most of the time (~60,000 in a boot, each one entry,
about half replacing a present entry), so both shapes are timed:
  single:  n hypercalls of 1 entry each, alternately unmapping and remapping one page
           (every update validated: the old entry's references dropped, the new one's taken)
  batched: n/512 hypercalls of 512 entries each, the same alternation over 512 entries
Printed per shape: microseconds of process CPU time per entry (median of --reps; CPU
time, not wall time, so that a busy host changes the figure less). With --profile, the top
functions by tottime of one single-entry run.

Last line: single_us=<x> batched_us=<y>
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import statistics
import struct
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from aiovmm import hypercall  # noqa: E402
from aiovmm.abi import DOMID_SELF, Hypercall  # noqa: E402
from hand_vcpu import DATA_VA, hand_driven_vcpu  # noqa: E402

REQ_VA = 0xFFFFFFFF80400000 - 4096                 # the request list (one page: 256 entries)
_REQ = struct.Struct("<QQ")


def _call(v, nr: int, args: tuple[int, ...]) -> int:
    eng = v.engine
    eng._hc.args[:6] = [nr, *args, 0][:6]         # what the C SYSCALL hook reads
    eng._hc.set_ret = 0
    eng.in_syscall_hook = True                    # as inside the hook: RAX goes back through it
    try:
        hypercall.dispatch(v)
    finally:
        eng.in_syscall_hook = False
    ret = eng._hc.ret
    return ret - (1 << 64) if ret >> 63 else ret


async def main(a: argparse.Namespace) -> None:
    regs = ("rip", "rax", "rdi", "rsi", "rdx", "r10", "r8")
    async with hand_driven_vcpu(regs, engine="auto", timeout=60) as (hv, _dom, v):
        pt = hv.pagetables
        ptr = pt.l1_entry_address(v.kernel_root, DATA_VA)
        old = hv.mem.read_u64(ptr)
        # A page of requests: 256 (ptr, val) pairs; entry i toggles the same PTE.
        unmap = _REQ.pack(ptr, 0)
        remap = _REQ.pack(ptr, old)
        v.copy_to_guest(REQ_VA, (unmap + remap) * 128)
        # Events masked while driven by hand: dispatch delivers a deliverable event after
        # each hypercall (the guest's timer ticks on), which would push a bounce frame and
        # move RSP under the registers put back at the end (the guest then panicked).
        mask = v.upcall_mask
        v.upcall_mask = 1

        def single(n: int) -> float:
            t = time.process_time()
            for i in range(n):
                r = _call(v, Hypercall.mmu_update, (REQ_VA + 16 * (i & 1), 1, 0, DOMID_SELF))
                assert r == 0, r
            return (time.process_time() - t) / n * 1e6

        def batched(n: int) -> float:
            t = time.process_time()
            for _ in range(max(1, n // 256)):
                r = _call(v, Hypercall.mmu_update, (REQ_VA, 256, 0, DOMID_SELF))
                assert r == 0, r
            return (time.process_time() - t) / (max(1, n // 256) * 256) * 1e6

        s = [single(a.n) for _ in range(a.reps)]
        b = [batched(a.n) for _ in range(a.reps)]
        print(f"single: {statistics.median(s):.2f} us/entry  batched: {statistics.median(b):.2f} us/entry")
        if a.profile:
            prof = cProfile.Profile(time.process_time)
            prof.enable()
            single(a.n)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(14)
        assert hv.mem.read_u64(ptr) == old
        v.engine.flush_tlb()
        v.upcall_mask = mask
    print(f"single_us={statistics.median(s):.2f} batched_us={statistics.median(b):.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="entries per measurement")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    asyncio.run(main(ap.parse_args()))
