"""HYPERVISOR_iret to user mode with the guest's own segments (Linux: CS 0x33, SS 0x2b from its
GDT: checked as the IRETQ would and loaded) against Xen's flat ones (0xe033/0xe02b: checked,
not reloaded), interleaved in one run on one hand-driven vCPU; the cost of the IRETQ checks
alone (traps._iret_segments) as well. Prints medians (us) of 15 rounds of 200 irets each.

    .venv/bin/python bench/iret_segments.py [unicorn|kvm]
"""
from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from aiovmm import descriptors, traps                      # noqa: E402
from aiovmm.abi import IRET_CONTEXT                        # noqa: E402
from aiovmm.mmu import XEN_GDT                             # noqa: E402
from hand_vcpu import DATA_VA, hand_driven_vcpu            # noqa: E402

REGS = ("rip", "rsp", "rax", "rcx", "r11", "rflags", "gs_base", "cr3")
N, ROUNDS = 200, 15


async def main(engine: str) -> None:
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        mfn = hv.mem.alloc(dom.domid)[0]
        hv.mem.write_u64((mfn << 12) + 8 * 5, 0x00CFF2000000FFFF)
        hv.mem.write_u64((mfn << 12) + 8 * 6, 0x00AFFA000000FFFF)
        descriptors.set_gdt(v, [mfn], 16)

        def irets(cs: int, ss: int) -> float:
            t0 = time.perf_counter()
            for _ in range(N):
                v.copy_to_guest(DATA_VA, IRET_CONTEXT.pack(0, 0, 0, 0, 0x400000, cs, 0x202,
                                                           0x402F00, ss))
                v.engine.write({"rsp": DATA_VA})
                traps.do_iret(v)
                v.switch_to_kernel()
            return (time.perf_counter() - t0) / N * 1e6

        def checks() -> float:
            t0 = time.perf_counter()
            for _ in range(N):
                traps._iret_segments(v, 0x33, 0x2B, 0x400000)
            return (time.perf_counter() - t0) / N * 1e6

        flat, own, chk = [], [], []
        try:
            for _ in range(ROUNDS):
                flat.append(irets(0xE033, 0xE02B))
                own.append(irets(0x33, 0x2B))
                chk.append(checks())
        finally:
            traps.load_segments(v, 0xE033, XEN_GDT[0xE033], 0xE02B, XEN_GDT[0xE02B])
            descriptors.set_gdt(v, [], 0)
        mf, mo, mc = (statistics.median(x) for x in (flat, own, chk))
        print(f"{engine}: iret flat 0xe033/0xe02b {mf:.1f} us, own 0x33/0x2b {mo:.1f} us "
              f"(ratio {mo / mf:.2f}), IRETQ checks alone {mc:.1f} us; load {os.getloadavg()[0]:.2f}")


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "unicorn"))
