"""Red-team regressions: REP string stores to an L1 backwards (DF=1) and byte by byte
(both engines). Each element is its own fault, validated and applied alone; an entry built
a byte at a time toward one naming a frame the domain does not own is refused at the byte
that would make it so, and no such entry is ever in the L1.

Hand-driven as test_redteam_ptwr_rep."""
from __future__ import annotations

import pytest

from aiovmm import traps
from hand_vcpu import CODE_VA, DATA_VA, hand_driven_vcpu
from test_redteam_ptwr_rep import ENGINES
from test_redteam_ptwr_step_loop import l1_snapshot

REGS = ("rip", "rcx", "rsi", "rdi", "rsp", "rflags")
DF = 0x400


@pytest.mark.parametrize("engine", ENGINES)
async def test_rep_movsq_backwards_is_one_iteration_per_fault(engine):
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        eng, mem = v.engine, hv.mem
        l1, ma, before = l1_snapshot(hv, v)
        v.copy_to_guest(CODE_VA, b"\xf3\x48\xa5\xeb\xfe")        # rep movsq; jmp .
        top = l1 + 8 * 511
        eng.write({"rip": CODE_VA, "rsi": top, "rdi": top, "rcx": 1 << 40,
                   "rflags": eng.get("rflags") | DF})
        updates = v.ptwr_updates
        for k in range(8):
            traps.inject_exception(v, 14, 3, top - 8 * k)
            traps.finish_ptwr(v)
            assert eng.read(("rip", "rcx", "rdi")) == [CODE_VA, (1 << 40) - k - 1, top - 8 * (k + 1)]
        assert v.ptwr_updates - updates == 8
        assert mem.read(ma, 4096) == before
        assert dom.shutdown_reason is None


@pytest.mark.parametrize("engine", ENGINES)
async def test_rep_movsb_builds_no_foreign_entry_byte_by_byte(engine):
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        eng, mem, pt = v.engine, hv.mem, hv.pagetables
        l1, ma, before = l1_snapshot(hv, v)
        k = 511                                   # the entry rewritten (put back at the end)
        foreign = hv.ptwr_scratch                 # a frame the domain does not own
        assert mem.owner[foreign] != dom.domid
        target = (foreign << 12) | 0x27           # present, RW, user, accessed
        v.copy_to_guest(DATA_VA, target.to_bytes(8, "little"))
        v.copy_to_guest(CODE_VA, b"\xf3\xa4\xeb\xfe")            # rep movsb; jmp .
        dst = l1 + 8 * k
        eng.write({"rip": CODE_VA, "rsi": DATA_VA, "rdi": dst, "rcx": 8})
        refused = False
        try:
            for i in range(8):
                traps.inject_exception(v, 14, 3, dst + i)
                traps.finish_ptwr(v)
                e = mem.read_u64(ma + 8 * k)
                assert not e & 1 or mem.owner[(e >> 12) & 0xFFFFFFFFFF] == dom.domid, hex(e)
                if eng.get("rip") != CODE_VA:     # refused: the #PF bounced to the guest
                    refused = True
                    break
                assert eng.read(("rcx", "rdi")) == [8 - i - 1, dst + i + 1]
            assert refused
            assert mem.read_u64(ma + 8 * k) != target
        finally:
            pt.update_entry(dom.domid, ma + 8 * k, int.from_bytes(before[8 * k:8 * k + 8], "little"))
        assert mem.read(ma, 4096) == before
        assert dom.shutdown_reason is None
