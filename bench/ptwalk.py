"""Cost of PageTables.translate (every guest buffer a hypercall reads or writes goes through
it) now that it is access_ok + mmu.walk, the one page-walk rule (reserved bits, PSE, bounds
checked at each level), against the reference figure measured in the same run: the inline
walk translate was before (present/user/write only), copied here as `_translate_before`.

Driven by hand on a paused vCPU of the project's kernel; rounds alternate A and B (--rounds,
each --n calls on the kernel's data page), CPU time per call, medians and the ratio.

Last line: walk_ns=<x> before_ns=<y> ratio=<x/y> load=<1-min load average>
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import struct
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from aiovmm.abi import (HYPERVISOR_VIRT_END, HYPERVISOR_VIRT_START, PAGE_SHIFT, PAGE_SIZE,  # noqa: E402
                        PTE_FRAME_MASK, _PAGE_PRESENT, _PAGE_RW, _PAGE_USER)
from aiovmm.mmu import GuestFault  # noqa: E402
from hand_vcpu import DATA_VA, hand_driven_vcpu  # noqa: E402

_U64_FROM = struct.Struct("<Q").unpack_from


def _translate_before(mem, cr3: int, va: int, write: bool) -> int:
    """mmu.PageTables.translate as it was (main before the one-rule walk)."""
    top = va >> 47
    if not (top == 0 or top == 0x1FFFF) or HYPERVISOR_VIRT_START <= va < HYPERVISOR_VIRT_END:
        raise GuestFault(va, write)
    m, unpack, frame = mem.map, _U64_FROM, PTE_FRAME_MASK
    base = cr3 >> PAGE_SHIFT << PAGE_SHIFT
    need = _PAGE_PRESENT | _PAGE_USER | (_PAGE_RW if write else 0)
    for shift in (39, 30, 21, 12):
        e = unpack(m, base | ((va >> shift) & 0x1FF) << 3)[0]
        if e & need != need:
            raise GuestFault(va, write)
        base = e & frame
    return base | (va & (PAGE_SIZE - 1))


async def main(a: argparse.Namespace) -> None:
    async with hand_driven_vcpu((), engine="auto", timeout=60) as (hv, _dom, v):
        pt, mem = hv.pagetables, hv.mem
        cr3 = v.kernel_root << PAGE_SHIFT
        assert pt.translate(cr3, DATA_VA + 8, True) == _translate_before(mem, cr3, DATA_VA + 8, True)
        translate = pt.translate

        def new(n: int) -> float:
            t = time.process_time()
            for _ in range(n):
                translate(cr3, DATA_VA, False)
            return (time.process_time() - t) / n * 1e9

        def before(n: int) -> float:
            t = time.process_time()
            for _ in range(n):
                _translate_before(mem, cr3, DATA_VA, False)
            return (time.process_time() - t) / n * 1e9

        a_ns, b_ns = [], []
        for _ in range(a.rounds):
            a_ns.append(new(a.n))
            b_ns.append(before(a.n))
        ma, mb = statistics.median(a_ns), statistics.median(b_ns)
        print(f"rounds={a.rounds} n={a.n}: walk {[round(x) for x in a_ns]}")
        print(f"{'':>{len(str(a.rounds)) + len(str(a.n)) + 11}}before {[round(x) for x in b_ns]}")
        print(f"walk_ns={ma:.0f} before_ns={mb:.0f} ratio={ma / mb:.2f} load={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--n", type=int, default=20000)
    asyncio.run(main(p.parse_args()))
