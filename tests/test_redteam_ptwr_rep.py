"""Red-team: a REP string store to a page table runs one iteration per fault (both engines).

A kernel store to one of its own L1 tables that is not a plain mov/xchg is stepped once over
a scratch copy of the L1 (ptwr.complete). A `rep movsq`/`rep stosq` was stepped whole: with
a large RCX the step ran on past the L1 (up to the step's 1 s bound on the loop thread, then
the #PF was bounced), and of what it stored only the entries around CR2 were compared,
validated and applied. Xen's ptwr emulation runs one iteration per fault (x86_emulate's
put_rep_prefix: RCX drops by one, RIP stays on the instruction while it is not zero): the
guest re-executes it and every entry it stores faults and is validated on its own.

Hand-driven: the guest's re-execution is the #PF at RDI injected again (traps.inject_
exception, as the fault hook does), then completed (traps.finish_ptwr, as the vCPU loop
does before its next slice)."""
from __future__ import annotations

import pytest

from aiovmm import traps
from conftest import _kvm_skip_reason
from hand_vcpu import CODE_VA, hand_driven_vcpu
from test_redteam_ptwr_step_loop import _l1_va

ENGINES = ["unicorn", pytest.param("kvm", marks=pytest.mark.skipif(
    _kvm_skip_reason() is not None, reason=_kvm_skip_reason() or ""))]
REGS = ("rip", "rcx", "rsi", "rdi", "rsp", "rflags")


@pytest.mark.parametrize("engine", ENGINES)
async def test_rep_store_to_an_l1_is_one_iteration_per_fault(engine):
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        eng, mem = v.engine, hv.mem
        assert v.kernel_mode
        l1 = _l1_va(hv, v)
        ma = hv.pagetables.translate(v.kernel_root << 12, l1, False)
        before = mem.read(ma, 4096)
        # Each entry copied onto itself: every store is a valid entry, the guest unchanged.
        v.copy_to_guest(CODE_VA, b"\xf3\x48\xa5\xeb\xfe")        # rep movsq; jmp .
        big = 1 << 40
        eng.write({"rip": CODE_VA, "rsi": l1, "rdi": l1, "rcx": big})
        updates = v.ptwr_updates
        for k in range(64):
            traps.inject_exception(v, 14, 3, l1 + 8 * k)         # the store's #PF at RDI
            assert v.pending_ptwr is not None and v.pending_ptwr.length == 3
            traps.finish_ptwr(v)
            rip, rcx, rsi, rdi = eng.read(("rip", "rcx", "rsi", "rdi"))
            assert (rip, rcx, rsi, rdi) == (CODE_VA, big - k - 1, l1 + 8 * (k + 1), l1 + 8 * (k + 1)), \
                f"iteration {k}: one element per fault, RIP on the instruction"
        assert v.ptwr_updates - updates == 64                  # each one validated and applied
        assert mem.read(ma, 4096) == before
        assert dom.shutdown_reason is None


@pytest.mark.parametrize("engine", ENGINES)
async def test_the_last_iteration_goes_past_the_instruction(engine):
    """RCX 2: two faults, then RIP past `rep stosq` with RCX 0; the stored entry is in the
    L1, through validation."""
    async with hand_driven_vcpu(REGS + ("rax",), engine) as (hv, dom, v):
        eng, mem = v.engine, hv.mem
        l1 = _l1_va(hv, v)
        ma = hv.pagetables.translate(v.kernel_root << 12, l1, False)
        before = mem.read(ma, 4096)
        entry = int.from_bytes(before[8 * 510:8 * 511], "little")
        for code, rcx in ((b"\xf3\x48\xab\xeb\xfe", 2), (b"\xf2\x48\xab\xeb\xfe", 2)):
            v.copy_to_guest(CODE_VA, code)
            eng.write({"rip": CODE_VA, "rdi": l1 + 8 * 510, "rcx": rcx, "rax": entry})
            n = len(code) - 2
            traps.inject_exception(v, 14, 3, l1 + 8 * 510)
            traps.finish_ptwr(v)
            assert eng.read(("rip", "rcx")) == [CODE_VA, 1]
            traps.inject_exception(v, 14, 3, l1 + 8 * 511)
            traps.finish_ptwr(v)
            assert eng.read(("rip", "rcx", "rdi")) == [CODE_VA + n, 0, l1 + 8 * 512]
            assert int.from_bytes(mem.read(ma + 8 * 511, 8), "little") == entry   # validated, applied
            # Entry 511 put back through validation, as the guest would (RCX 1: one fault).
            eng.write({"rip": CODE_VA, "rdi": l1 + 8 * 511, "rcx": 1,
                       "rax": int.from_bytes(before[8 * 511:8 * 512], "little")})
            traps.inject_exception(v, 14, 3, l1 + 8 * 511)
            traps.finish_ptwr(v)
            assert mem.read(ma, 4096) == before
        assert dom.shutdown_reason is None


@pytest.mark.parametrize("engine", ENGINES)
async def test_rep_store_over_a_whole_l1_runs_through_the_loop_one_fault_per_entry(engine):
    """The guest itself re-executes: `rep movsq` of its own L1 onto itself (every entry
    rewritten as it is), 512 elements, run by the vCPU loop. Each element is a fault of its
    own, validated and applied (stepped whole before: one update), and the loop keeps
    serving other tasks meanwhile (measured generously: no gap of a second)."""
    import asyncio
    import time
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        eng, mem = v.engine, hv.mem
        l1 = _l1_va(hv, v)
        ma = hv.pagetables.translate(v.kernel_root << 12, l1, False)
        before = mem.read(ma, 4096)
        v.copy_to_guest(CODE_VA, b"\xf3\x48\xa5\xeb\xfe")        # rep movsq; jmp .
        eng.write({"rip": CODE_VA, "rsi": l1, "rdi": l1, "rcx": 512})
        updates = v.ptwr_updates
        gaps, last = [], time.monotonic()
        dom.paused = False
        v.wake()
        deadline = last + 60
        while v.ptwr_updates - updates < 512 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
        dom.paused = True
        await asyncio.sleep(0.05)
        assert v.ptwr_updates - updates == 512, v.ptwr_updates - updates
        assert eng.read(("rip", "rcx", "rdi")) == [CODE_VA + 3, 0, l1 + 4096]
        assert mem.read(ma, 4096) == before
        assert max(gaps) < 1.0, max(gaps)
        assert dom.shutdown_reason is None
