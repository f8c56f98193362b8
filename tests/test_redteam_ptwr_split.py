"""Red-team: an 8-byte store that ends in an L1 but starts on the page before it (both
engines).

`mov [rdi], rax` with RDI 4 bytes below an L1 page faults on the L1 with CR2 at its first
byte, 8-aligned. ptwr.try_fast took CR2 as the store's target and applied all of RAX to
entry 0: the guest's store puts only RAX's upper half into entry 0's lower half (and its
lower half on the page before). With RAX = entry 0 (its upper half has the present bit clear), the guest unmaps entry 0;
the fast path left it mapped and reported the store done. Xen decodes the address and takes
only a store within the CR2 page (ptwr_emulated_update). The fast path now applies only a
store whose decoded address is CR2; this one, begun on the page before, is refused as Xen
refuses it (ptwr.xen_refuses: the original #PF, nothing written;
test_redteam_ptwr_xen_rules.py).

Hand-driven as test_redteam_ptwr_rep."""
from __future__ import annotations

import pytest

from aiovmm import traps
from hand_vcpu import CODE_VA, hand_driven_vcpu
from test_redteam_ptwr_rep import ENGINES
from test_redteam_ptwr_step_loop import _l1_va

REGS = ("rip", "rcx", "rsi", "rdi", "rsp", "rflags", "rax")


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_store_ending_in_an_l1_is_not_applied_at_cr2(engine):
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        eng, mem, pt = v.engine, hv.mem, hv.pagetables
        l1 = _l1_va(hv, v)
        ma = pt.translate(v.kernel_root << 12, l1, False)
        e0 = mem.read_u64(ma)
        assert e0 & 1 and not (e0 >> 32) & 1     # RAX's upper half: a not-present low half
        v.copy_to_guest(CODE_VA, b"\x48\x89\x07\xeb\xfe")       # mov [rdi], rax; jmp .
        eng.write({"rip": CODE_VA, "rdi": l1 - 4, "rax": e0})
        try:
            traps.inject_exception(v, 14, 3, l1)                 # CR2: the L1 page's first byte
            if v.pending_ptwr is not None:
                traps.finish_ptwr(v)
            done = eng.get("rip") == CODE_VA + 3
            assert not (done and mem.read_u64(ma) == e0), \
                "reported done with RAX applied at CR2: entry 0 still mapped"
            if done:                                             # stepped as the CPU does
                assert mem.read_u64(ma) == (e0 & ~0xFFFFFFFF) | (e0 >> 32)
        finally:
            if mem.read_u64(ma) != e0:
                pt.update_entry(dom.domid, ma, e0)
        assert dom.shutdown_reason is None
