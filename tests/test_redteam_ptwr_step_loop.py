"""Red-team: the writable-page-table step never holds the event loop (Unicorn engine).

A kernel store to one of its own L1 tables that is not a plain 8-byte mov/xchg is completed
by stepping the instruction once over a scratch copy (ptwr.complete -> VCPUEngine.step_to),
outside emulation, at the start of the vCPU's next slice (traps.finish_ptwr). Between the
fault and that step the domain's other vCPUs run (and backends may write guest memory): a
guest rewrote the faulting `mov %eax,(%rdi)` (89 07) into `jmp .` (eb fe), the same length,
so finish_ptwr's re-check (same L1 entry, same frame, same length) passed and the step ran
`jmp .`. With timer slices the step had no bound (its block budget is counted only by the
block-hook slices): uc_emu_start never returned and the loop thread, which runs every guest
and the control API, hung for good. Xen emulates the store it decoded (ptwr_emulate) and
never runs other bytes.

Now the step is of the bytes decoded at the fault or not at all (changed bytes: the
instruction runs again as it now is, and faults again if it is a store), and a step on the
Unicorn engine is bounded in time (VCPUEngine.step_to: a step that does not end is a
failed step; ptwr bounces the #PF)."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from aiovmm import Hypervisor, traps
from aiovmm.memory import PageType
from aiovmm.mmu import GuestFault
from conftest import HV_MEMORY_MIB, kernel

CODE_VA = 0xFFFFFFFF80400000 - 4096              # hand_vcpu: a padding page of the boot map


def boot_map_l1s(hv, v) -> Iterator[tuple[int, int]]:
    """(VA, machine address) of each page of the kernel's boot map that is one of its own
    L1 tables (read-only)."""
    pt, mem = hv.pagetables, hv.mem
    for i in range(4096):
        va = 0xFFFFFFFF80000000 + i * 4096
        try:
            ma = pt.translate(v.kernel_root << 12, va, False)
        except GuestFault:
            continue
        if mem.type[ma >> 12] == PageType.l1 and mem.type_count[ma >> 12]:
            yield va, ma


def _l1_va(hv, v) -> int:
    """A VA of the kernel's boot map whose page is one of its own L1 tables (read-only)."""
    for va, _ma in boot_map_l1s(hv, v):
        return va
    raise AssertionError("no L1 table mapped in the boot map")


def l1_snapshot(hv, v) -> tuple[int, int, bytes]:
    """(VA, machine address, contents) of the L1 table `_l1_va` finds."""
    l1 = _l1_va(hv, v)
    ma = hv.pagetables.translate(v.kernel_root << 12, l1, False)
    return l1, ma, hv.mem.read(ma, 4096)


def _bounded(eng, call) -> bool:
    """Run `call` on the loop thread; True if it held the thread 10 s (then the emulation
    is stopped from another thread, as nothing in production would)."""
    done = threading.Event()

    def rescue() -> None:
        if not done.wait(10):
            from unicorn.unicorn_py3.unicorn import uclib
            uclib.uc_emu_stop(eng.h)
    t = threading.Thread(target=rescue, daemon=True)
    t.start()
    try:
        call()
    finally:
        hung = not done.is_set() and not t.is_alive()
        done.set()
    return hung


@pytest.mark.parametrize("rewrite", [b"\xeb\xfe", None], ids=["rewritten-to-jmp-self", "same-bytes"])
async def test_ptwr_step_never_runs_bytes_other_than_the_faulting_store(rewrite):
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine="unicorn") as hv:
        dom = await hv.create(kernel(), memory_mib=8, vcpus=2, cmdline="ticks=1 spin=0")
        await dom.wait_for_line(r"^spin 1$", timeout=30)
        dom.paused = True
        await asyncio.sleep(0.05)
        v = dom.vcpus[0]
        eng = v.engine
        assert v.kernel_mode
        saved = eng.read(("rip", "rdi", "rax"))
        l1 = _l1_va(hv, v)
        entry = hv.mem.read_u64(hv.pagetables.translate(v.kernel_root << 12, l1 + 8 * 511, False))
        v.copy_to_guest(CODE_VA, b"\x89\x07\xeb\xfe")            # mov %eax,(%rdi); jmp .
        # The store of the entry's own low half: accepted by validation if it is stepped.
        eng.write({"rip": CODE_VA, "rdi": l1 + 8 * 511, "rax": entry & 0xFFFFFFFF})
        traps.inject_exception(v, 14, 3, l1 + 8 * 511)         # its #PF: present, write
        assert v.pending_ptwr is not None and v.pending_ptwr.length == 2
        if rewrite is not None:
            v.copy_to_guest(CODE_VA, rewrite)                  # "another vCPU" meanwhile
        hung = _bounded(eng, lambda: traps.finish_ptwr(v))
        assert not hung, "the ptwr step held the event loop until rescued"
        if rewrite is not None:
            assert eng.get("rip") == CODE_VA, "the changed instruction runs again as it is"
        else:
            assert eng.get("rip") == CODE_VA + 2, "the store was stepped"
        assert dom.shutdown_reason is None
        eng.write(dict(zip(("rip", "rdi", "rax"), saved)))
        dom.paused = False
        v.wake()
        await dom.wait_for_line(r"^spin 3$", timeout=30)


async def test_a_step_that_never_ends_is_a_failed_step():
    """The bound itself (the bytes may still change during the step: a backend thread's
    write lands between the check and the translation): step_to over `jmp .` returns False
    within its limit instead of never."""
    from hand_vcpu import hand_driven_vcpu
    async with hand_driven_vcpu(("rip",), "unicorn") as (hv, dom, v):
        v.copy_to_guest(CODE_VA, b"\xeb\xfe")
        v.engine.write({"rip": CODE_VA})
        got = []
        assert not _bounded(v.engine, lambda: got.append(v.engine.step_to(CODE_VA + 2))), \
            "step_to held the event loop until rescued"
        assert got == [False] and v.engine.get("rip") == CODE_VA
