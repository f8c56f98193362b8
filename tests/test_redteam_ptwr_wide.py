"""Red-team: a store wider than the entries ptwr compares (both engines).

ptwr.complete steps a kernel store to its own L1 over a scratch copy and validates and
applies the entries around CR2 that changed (CR2's entry, one before, two after: enough for
any store up to 16 bytes, cmpxchg16b). A wider store (fxsave: 512 bytes, fnsave: 108, an AVX
store: 32 or 64) changed entries beyond those in the scratch copy: they were silently
dropped while the instruction completed (RIP past it) and the entries in the window were
applied -- the guest's own page table half-written, as it did not ask. Xen's ptwr emulation
takes stores of at most 8 bytes (ptwr_emulated_update/_cmpxchg: larger is unhandleable, the
#PF goes to the guest): a store that changed anything outside the window is refused whole.

Hand-driven as test_redteam_ptwr_rep."""
from __future__ import annotations

import pytest

from aiovmm import traps
from hand_vcpu import CODE_VA, hand_driven_vcpu
from test_redteam_ptwr_rep import ENGINES
from test_redteam_ptwr_step_loop import l1_snapshot

REGS = ("rip", "rcx", "rsi", "rdi", "rsp", "rflags", "rax")

# fninit; fldcw [rip+8] (FCW 0x037e: entry 0 of the image is not present, so the window's
# entries are all valid -- FCW, FIP, FDP, MXCSR); fxsave [rdi]; jmp .; the FCW word.
CODE = b"\xdb\xe3" + b"\xd9\x2d" + (8).to_bytes(4, "little") + b"\x0f\xae\x07" + b"\xeb\xfe" \
    + b"\x90" * 3 + b"\x7e\x03"
FXSAVE = CODE_VA + 8


@pytest.mark.parametrize("engine", ENGINES)
async def test_fxsave_over_an_l1_is_refused_whole(engine):
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        eng, mem = v.engine, hv.mem
        l1, ma, before = l1_snapshot(hv, v)
        v.copy_to_guest(CODE_VA, CODE)
        eng.write({"rip": CODE_VA})
        assert eng.step_to(CODE_VA + 2) and eng.step_to(FXSAVE)
        eng.write({"rip": FXSAVE, "rdi": l1})
        updates = v.ptwr_updates
        traps.inject_exception(v, 14, 3, l1)
        if v.pending_ptwr is not None:      # (refused at the fault: 512 bytes, xen_refuses)
            assert v.pending_ptwr.length == 3
            traps.finish_ptwr(v)
        after = mem.read(ma, 4096)
        assert eng.get("rip") != FXSAVE + 3, "the 512-byte store completed"
        assert v.ptwr_updates == updates
        assert after == before, [i for i in range(512) if after[8 * i:8 * i + 8] != before[8 * i:8 * i + 8]]
        assert dom.shutdown_reason is None
        eng.write({"rip": CODE_VA})                       # fninit: the FPU as the guest had it
        assert eng.step_to(CODE_VA + 2)
