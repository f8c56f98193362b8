"""Red team: the KVM engine's settle of a slice-end kick (kvm_engine._run_slice,
_past_software_trap, _SETTLE_TRIES) against a guest built to trigger it, and kicks that land
on faulting instructions.

1. _past_software_trap says "maybe a held #BP" from the bytes before RIP (0xCC, 0xF1, or
   0xCD two back); it cannot decode backwards, so any instruction ending in such a byte
   looks the same. A loop made only of `mov eax, 0xCCCCCCCC` and a `jmp rel8 -52` (EB CC)
   has an 0xCC right before every instruction boundary: every kick settled, each settle
   re-armed the deadline `settle` ms later, 16 times, i.e. each 2 ms slice ran ~138 ms
   (1 + 2 + ... + 16 ms) while every other guest and the loop waited: beyond Xen's 30 ms
   credit time slice, from any guest process at CPL 3.
2. kvm-pvm held a #BP invisibly when the kick came between the trap and the vector stub
   (tests/test_redteam_kvm_int3.py). The same check for faults that report RIP at the
   instruction (#PF from an unmapped page, #GP from a non-canonical address): thousands of
   30 us slices over a faulting instruction, and every fault reported at that RIP with its
   error code (and CR2), never a slice ending past it.
"""
from __future__ import annotations

import pytest

from hand_vcpu import CODE_VA, hand_driven_vcpu, kick_loop
from test_redteam_ptwr_rep import ENGINES

KVM = [p for p in ENGINES if getattr(p, "values", (p,))[0] == "kvm"]
REGS = ("rip", "rsp", "rflags", "rax", "rbx")
CC_LOOP = b"\xb8\xcc\xcc\xcc\xcc" * 10 + b"\xeb\xcc"     # every instruction ends in 0xCC


@pytest.mark.parametrize("engine", KVM)
async def test_code_ending_in_0xcc_does_not_stretch_slices(engine):
    """Each slice over CC_LOOP (no trap ever taken) settles at most once: a held #BP is
    delivered at the first re-entry, before any instruction runs, so a re-entry in which
    the guest ran (its thread got the CPU) leaves none to wait for. Counted: the engine's
    settles per slice, and no slice ends in an error."""
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        eng = v.engine
        v.copy_to_guest(CODE_VA, CC_LOOP)
        eng.write({"rip": CODE_VA})
        per_slice = []
        for _ in range(6):
            s0 = eng.settles
            reason = eng.run(1, 2_000_000)
            per_slice.append((reason.name, eng.settles - s0))
            assert CODE_VA <= eng.get("rip") < CODE_VA + len(CC_LOOP), hex(eng.get("rip"))
        assert all(r == "BUDGET" and n <= 1 for r, n in per_slice), per_slice


async def _kick_over_fault(engine, code: bytes, regs: dict, want: tuple) -> None:
    """Slices of 30 us over `code` at CODE_VA (faults at its first instruction; the handler
    puts RIP back there): every fault reported as `want` (vector, error code, CR2 or None)
    at RIP CODE_VA, and no slice ends with RIP anywhere else."""
    async with hand_driven_vcpu(REGS, engine, vcpus=2) as (hv, dom, v):
        eng = v.engine
        v.copy_to_guest(CODE_VA, code)
        seen, wrong = 0, []
        on_exc = eng.on_exception

        def reported(vec, err, cr2):
            nonlocal seen
            seen += 1
            got = (vec, err, cr2 if want[2] is not None else None, eng.get("rip"))
            if got != (*want, CODE_VA):
                wrong.append(got)
            eng.write({"rip": CODE_VA, **regs})
        eng.on_exception = reported
        try:
            ends, past = kick_loop(eng, {"rip": CODE_VA, **regs}, 4, 20000)
        finally:
            eng.on_exception = on_exc
        assert seen >= 1000, (seen, ends)
        assert not wrong, (len(wrong), [tuple(map(hex, w[1:])) for w in wrong[:3]])
        assert not past, f"{len(past)} of {ends} slices ended past an unreported fault: {past[:3]}"


@pytest.mark.parametrize("engine", KVM)
async def test_a_kick_after_a_page_fault_never_loses_it(engine):
    """`mov rax, [rbx]` with RBX in an unmapped user page: #PF, error code 4 (user read,
    not present), CR2 = RBX."""
    bad = 0x0000_1000_0000_0000
    await _kick_over_fault(engine, b"\x48\x8b\x03\xeb\xfb", {"rbx": bad}, (14, 4, bad))


@pytest.mark.parametrize("engine", KVM)
async def test_a_kick_after_a_general_protection_fault_never_loses_it(engine):
    """`mov rax, [rbx]` with a non-canonical RBX: #GP(0)."""
    await _kick_over_fault(engine, b"\x48\x8b\x03\xeb\xfb", {"rbx": 0x8000_0000_0000_0000}, (13, 0, None))
