"""Red-team: REP string stores to an L1 spelled with extra REX bytes (both engines).

ptwr.complete runs a REP string store to an L1 one iteration per fault; whether the store is
one was decided by _rep_count_mask, which allowed exactly one REX byte between the legacy
prefixes and the opcode, and only after them. In 64-bit mode a REX may come before a legacy
prefix (`48 f3 ab`: the CPU ignores it) or repeat (`f3 48 48 ab`, `f3 41 48 ab`: the last one
counts); capstone decodes all of them as `rep stos`. Those were stepped whole: every element
stored into the scratch copy, only the entries around CR2 validated and applied (the rest
silently dropped), RIP past the instruction with RCX 0, and a large RCX ran the step on the
loop thread until it left the page (or up to the step's 1 s bound).

Hand-driven as test_redteam_ptwr_rep: the #PF at RDI injected (traps.inject_exception),
then completed (traps.finish_ptwr)."""
from __future__ import annotations

import pytest

from aiovmm import traps
from hand_vcpu import CODE_VA, hand_driven_vcpu
from test_redteam_ptwr_rep import ENGINES
from test_redteam_ptwr_step_loop import l1_snapshot

REGS = ("rip", "rcx", "rsi", "rdi", "rsp", "rflags", "rax")

FORMS = [
    b"\xf3\x48\x48\xab",        # rep rex.w rex.w stosq
    b"\xf3\x41\x48\xab",        # rep rex.b rex.w stosq
    b"\x48\xf3\x48\xab",        # rex.w (ignored) rep rex.w stosq
    b"\x48\xf3\x48\xa5",        # the same, movsq
    b"\x48\xf3\x48\x48\xa5",    # both
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("code", FORMS, ids=lambda c: c.hex())
async def test_rep_store_with_extra_rex_is_one_iteration_per_fault(engine, code):
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        eng, mem = v.engine, hv.mem
        l1, ma, before = l1_snapshot(hv, v)
        v.copy_to_guest(CODE_VA, code + b"\xeb\xfe")
        # movs: each entry copied onto itself; stos: entry 0 stored onto itself (one
        # iteration only, the next would duplicate it).
        n = 8 if code[-1] == 0xA5 else 1
        eng.write({"rip": CODE_VA, "rsi": l1, "rdi": l1, "rcx": 512,
                   "rax": int.from_bytes(before[:8], "little")})
        updates = v.ptwr_updates
        for k in range(n):
            traps.inject_exception(v, 14, 3, l1 + 8 * k)
            assert v.pending_ptwr is not None and v.pending_ptwr.length == len(code)
            traps.finish_ptwr(v)
            rip, rcx, rdi = eng.read(("rip", "rcx", "rdi"))
            assert (rip, rcx, rdi) == (CODE_VA, 512 - k - 1, l1 + 8 * (k + 1)), \
                f"iteration {k}: one element per fault, RIP on the instruction"
        assert v.ptwr_updates - updates == n
        assert mem.read(ma, 4096) == before
        assert dom.shutdown_reason is None
