"""The INs the KVM engine's C loop answers by itself (csrc/kvm.c fast_in, recorded by
kvm_engine._remember_in) survive a slice's end only while what each answer was checked
against is unchanged (kvm_engine._keep_port_answers): the instruction's translation (no
page-table write since, the same CR3) and emulate.port_in_fixed (the guest's mode may change
between slices without an exit of this vCPU: an event bounced at the slice's end). Linux's
quick_pit_calibrate spans hundreds of slices; emptying the table at every slice's start sent
the first read of each slice to Python. A hand-driven vCPU of the project's kernel."""
from __future__ import annotations

import time

import pytest

from conftest import _kvm_skip_reason
from hand_vcpu import CODE_VA, hand_driven_vcpu, unmap_data_va
from test_port_policy import _step_in

pytestmark = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=_kvm_skip_reason() or "")

REGS = ("rip", "rax", "rflags")


def _slice_start(eng) -> None:
    """What a slice's start does with the table (the timer armed and disarmed again)."""
    eng._begin(time.monotonic_ns() + 2_000_000)
    eng._end()


@pytest.mark.parametrize("change", ["nothing", "user mode", "page table"])
async def test_answered_ins_outlive_a_slice_end_only_while_their_inputs_hold(change):
    async with hand_driven_vcpu(REGS, "kvm") as (hv, dom, v):
        eng = v.engine
        v.copy_to_guest(CODE_VA, b"\xe4\x42\xeb\xfe")           # in $0x42,%al ; jmp .
        saved_iopl, undo = v.iopl, None
        try:
            v.iopl = 1                       # the kernel (ring 1) may use every port, user mode not
            assert v.kernel_mode and _step_in(v) == (0xFF, None)
            eng._remember_in(CODE_VA, 0x42)  # as the IN's exit records it (the step emptied it)
            assert eng._ctx.fast_n == 1
            _slice_start(eng)
            assert eng._ctx.fast_n == 1      # nothing changed: the next slice's reads are C's
            if change == "user mode":
                v.kernel_mode = False        # as an iret to user mode would, without an exit
            elif change == "page table":
                undo = unmap_data_va(hv, dom, v, None)      # an mmu_update, no flush
            _slice_start(eng)
            assert eng._ctx.fast_n == (1 if change == "nothing" else 0)
            if change == "user mode":
                # Xen's answer now: ring 3 > IOPL 1, #GP(0); nothing in C may answer all ones.
                eng._ctx.fast_n = 0
                assert _step_in(v) == (0, (13, 0))
        finally:
            v.kernel_mode = True
            if undo is not None:
                ptr, old = undo
                assert hv.pagetables.update_entry(dom.domid, ptr, old)
            v.iopl = saved_iopl
