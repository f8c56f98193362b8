"""Slices over code whose every instruction ends in 0xCC (tests/test_redteam_kvm_settle.py),
KVM engine, 2 ms slices: A = a maybe-held #BP settled up to _SETTLE_TRIES times whatever the
re-entries ran (before), B = not again once a re-entry ran the guest (_SETTLE_RAN_NS).
Interleaved slice by slice; the reference is the same 2 ms slice over `jmp .` (no 0xCC).
Prints per variant the median and max wall time of a slice and settles per slice.

Last line: ref_ms=<> a_ms=<> b_ms=<> a_settles=<> b_settles=<> load=<1 min>
"""
from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aiovmm import kvm_engine  # noqa: E402
from hand_vcpu import CODE_VA, hand_driven_vcpu  # noqa: E402

CC_LOOP = b"\xb8\xcc\xcc\xcc\xcc" * 10 + b"\xeb\xcc"


async def main(n: int) -> None:
    ran_ns = kvm_engine._SETTLE_RAN_NS
    res = {k: [] for k in ("ref", "a", "b")}
    async with hand_driven_vcpu(("rip",), "kvm") as (hv, dom, v):
        eng = v.engine
        v.copy_to_guest(CODE_VA, CC_LOOP + b"\x90\xeb\xfe")   # ref: jmp . after a NOP
        for i in range(n):
            for k in ("ref", "a", "b") if i % 2 else ("b", "a", "ref"):
                kvm_engine._SETTLE_RAN_NS = 1 << 62 if k == "a" else ran_ns
                eng.write({"rip": CODE_VA + len(CC_LOOP) + 1 if k == "ref" else CODE_VA})
                s0, t = eng.settles, time.perf_counter_ns()
                eng.run(1, 2_000_000)
                res[k].append((time.perf_counter_ns() - t, eng.settles - s0))
        kvm_engine._SETTLE_RAN_NS = ran_ns
    out = {}
    for k, rs in res.items():
        med = statistics.median(w for w, _ in rs) / 1e6
        st = statistics.median(s for _, s in rs)
        print(f"{k:4s} slice wall median {med:.3f} ms max {max(w for w, _ in rs) / 1e6:.3f} ms, "
              f"settles per slice median {st:g}")
        out[f"{k}_ms"], out[f"{k}_settles"] = med, st
    print(" ".join(f"{k}={v:.3f}" for k, v in out.items()) + f" load={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20))
