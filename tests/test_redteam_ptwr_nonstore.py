"""Red-team: the instruction ptwr steps is not a store (both engines).

ptwr.candidate decodes whatever is at RIP when the #PF on an L1 is taken and ptwr.complete
steps it with the faulting VA mapped writable onto the hypervisor's scratch frame. The bytes
at RIP need not be the store that faulted: on Unicorn each vCPU runs its own translated
code, which another vCPU's rewrite does not invalidate (traps._stale_int3), so a stale store
faults while memory already holds e.g. `syscall`. A hypercall (or any other exit the vCPU
serves: port I/O, an emulated #UD) then ran inside the step, with the scratch mapping in the
guest's L1 entry -- an mmu_update of that entry sees the hypervisor's scratch frame as the
old mapping. Xen's ptwr emulation (x86_emulate with ptwr's ops) has no hook for them: the
emulation fails and the #PF goes to the guest. Here the step fails the same way.

Hand-driven as test_redteam_ptwr_rep: the #PF injected (as the fault hook would on the stale
store), then completed (traps.finish_ptwr)."""
from __future__ import annotations

import pytest

from aiovmm import traps
from hand_vcpu import CODE_VA, hand_driven_vcpu
from test_redteam_ptwr_rep import ENGINES
from test_redteam_ptwr_step_loop import l1_snapshot

REGS = ("rip", "rcx", "rsi", "rdi", "rsp", "rflags", "rax", "r11")
XEN_VERSION = 17


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_hypercall_never_runs_inside_the_ptwr_step(engine):
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        eng, mem = v.engine, hv.mem
        l1, ma, before = l1_snapshot(hv, v)
        v.copy_to_guest(CODE_VA, b"\x0f\x05\xeb\xfe")            # syscall; jmp .
        eng.write({"rip": CODE_VA, "rax": XEN_VERSION, "rdi": 0, "rsi": 0})
        calls = dict(dom.hypercall_counts)
        updates = v.ptwr_updates
        traps.inject_exception(v, 14, 3, l1)
        assert v.pending_ptwr is not None
        traps.finish_ptwr(v)
        assert dict(dom.hypercall_counts) == calls, "a hypercall ran inside the ptwr step"
        assert v.ptwr_updates == updates
        assert eng.get("rip") != CODE_VA + 2
        assert mem.read(ma, 4096) == before
        assert dom.shutdown_reason is None
