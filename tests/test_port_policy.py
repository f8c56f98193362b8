"""The INs an engine answers by itself (KVM: csrc/kvm.c fast_in, filled by
kvm_engine._remember_in; Unicorn: csrc/preempt.c aiovmm_in_hook) are forgotten by every vCPU
of the domain as soon as one input of the port policy changes (emulate.port_policy_changed):
the domain's VM assists (architectural_iopl, changed by any of its vCPUs), a vCPU's IOPL or
I/O bitmap. Before, only the vCPU whose exit made the change emptied its table (and every
vCPU at its next slice): a table kept across a change made elsewhere would answer all ones
where Xen gives #GP(0). Both engines, a hand-driven vCPU of the project's kernel."""
from __future__ import annotations

import pytest

from aiovmm import hypercall
from aiovmm.emulate import VMASST_TYPE_architectural_iopl
from hand_vcpu import CODE_VA, hand_driven_vcpu

ALL_ENGINES = True
REGS = ("rip", "rax", "rflags")


def _answered(eng) -> int:
    return eng._ctx.fast_n if hasattr(eng, "_ctx") else eng._pio.fast_n


def _step_in(v) -> tuple[int, object]:
    """Step `in $0x42, %al` at CODE_VA: (AL afterwards, the exception queued at the IN)."""
    eng = v.engine
    eng.write({"rip": CODE_VA, "rax": 0})
    eng.step_to(CODE_VA + 2)
    trap, v.pending_trap = v.pending_trap, None
    return eng.get("rax") & 0xFF, trap and trap[:2]


@pytest.mark.parametrize("change", ["vm_assist", "iopl", "iobmp"])
async def test_a_port_policy_change_empties_every_answered_in_table(engine, change):
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        v.copy_to_guest(CODE_VA, b"\xe4\x42\xeb\xfe")           # in $0x42,%al ; jmp .
        saved = (dom.vm_assist, v.iopl, v.iobmp)
        try:
            # The kernel counts as ring 0 with architectural_iopl: IOPL 0 grants every port.
            dom.vm_assist |= 1 << VMASST_TYPE_architectural_iopl
            v.iopl = 0
            assert v.kernel_mode and _step_in(v) == (0xFF, None)
            if engine == "kvm":
                # The step's #DB exit has emptied it again (KVM leaves a table only to INs
                # in a row): put back what the IN's exit recorded.
                v.engine._remember_in(CODE_VA, 0x42)
            assert _answered(v.engine) == 1                  # the next one is C's
            if change == "vm_assist":                        # as another vCPU's hypercall does
                assert hypercall.do_vm_assist(v, 1, VMASST_TYPE_architectural_iopl) == 0
                assert _answered(v.engine) == 0
                assert _step_in(v) == (0, (13, 0))           # ring 1 > IOPL 0: #GP(0)
            elif change == "iopl":
                v.iopl = 1                                    # still granted: ring 0 <= 1
                assert _answered(v.engine) == 0
            else:
                v.iobmp = (0xFFFFFFFF80000000, 0)
                assert _answered(v.engine) == 0
        finally:
            dom.vm_assist, v.iopl, v.iobmp = saved
