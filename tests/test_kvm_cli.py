"""`cli` / `sti` in guest kernel mode completed in C on the KVM engine (csrc/kvm.c fast_cli_sti):
on kvm-pvm the guest kernel runs at CPL 3, so each faults #GP(0) into the engine's vector stub;
Xen's emulate_privileged_op makes them no-ops when the virtual IOPL allows (emulate.iopl_ok:
the kernel counts as ring 1, ring 0 with VMASST architectural_iopl). Linux (virtual IOPL 1)
runs ~5,200 per boot. For each case the C path (fast_hc on) and Python's (_from_vector ->
traps.exception -> emulate.gp_fault, fast_hc off) must leave the same registers, and every
case C may not judge (a refused IOPL: the #GP is bounced; a prefixed cli; another privileged
instruction; guest user mode) must reach Python."""
from __future__ import annotations

import pytest

from conftest import _kvm_skip_reason
from test_kvm import _hand_driven_vcpu, kvm_run_once

pytestmark = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=str(_kvm_skip_reason()))

EINTR = -4                       # kvm_run_once: the guest ran on (C completed the exit)
REGS = ("rip", "rsp", "rflags", "rax")
VMASST_ARCHITECTURAL_IOPL = 4


def _run(v, code_va: int, fast: bool, ran_on: bool) -> tuple[int, list[int]]:
    """Run from code_va until the first exit C does not complete (handled as _run_slice
    does; with `ran_on` the guest is entered once more, so that it ran on after both paths:
    RFLAGS.RF of the fault frame lasts until the next instruction) or the slice ends: (first
    exit code, registers after)."""
    eng = v.engine
    eng.write({"rip": code_va, "rflags": 0x202})
    rc = kvm_run_once(eng, fast)
    if rc == 0:
        assert eng._handle_exit()
        if ran_on:
            assert kvm_run_once(eng, fast) == EINTR
    return rc, eng.read(REGS)


async def test_cli_sti_in_c_match_python():
    async with _hand_driven_vcpu(REGS) as (hv, dom, v):
        from aiovmm.abi import VcpuInfo
        mask_at = v.info_maddr + VcpuInfo.evtchn_upcall_mask
        saved_mask, saved_iopl, saved_assist = hv.mem.map[mask_at], v.iopl, dom.vm_assist
        hv.mem.map[mask_at] = 1                 # no upcall in the middle
        code_va = 0xFFFFFFFF80400000 - 4096     # unused padding page of the boot map
        ctx = v.engine._ctx
        try:
            # Completed in C: IOPL 1 (Linux's), and IOPL 0 with architectural_iopl (ring 0).
            for iopl, assist, code in ((1, 0, b"\xfa"), (1, 0, b"\xfb"), (3, 0, b"\xfa"),
                                       (0, 1 << VMASST_ARCHITECTURAL_IOPL, b"\xfb")):
                v.iopl, dom.vm_assist = iopl, saved_assist | assist
                v.copy_to_guest(code_va, code + b"\xeb\xfe")     # cli/sti; jmp .
                n0, e0 = ctx.fast_cli_sti, v.emulated
                rc_c, regs_c = _run(v, code_va, True, True)
                e1 = v.emulated
                rc_py, regs_py = _run(v, code_va, False, True)
                assert (rc_c, ctx.fast_cli_sti - n0) == (EINTR, 1), (iopl, assist, code)
                # Both count as emulated instructions (VCPU.emulated), C's as Python's.
                assert (e1 - e0, v.emulated - e1) == (1, 1), (iopl, assist, code)
                assert rc_py == 0
                assert regs_c[0] == regs_py[0] == code_va + 1
                assert regs_c == regs_py, (iopl, assist, code)
            # Python's: IOPL 0 without the VMASST (the #GP is bounced to the guest), a prefixed
            # cli (Python decodes it), clts (another privileged instruction).
            for iopl, code in ((0, b"\xfa"), (0, b"\xfb"), (1, b"\x66\xfa"), (1, b"\x0f\x06")):
                v.iopl, dom.vm_assist = iopl, saved_assist
                v.copy_to_guest(code_va, code + b"\xeb\xfe")
                n0 = ctx.fast_cli_sti
                results = []
                for fast in (True, False):
                    v.engine.write({"rsp": v.kernel_sp})      # a bounce pushes a frame
                    results.append(_run(v, code_va, fast, False))
                assert ctx.fast_cli_sti == n0, code
                assert results[0] == results[1], (iopl, code, results)
                assert results[0][0] == 0
            assert results[0][1][0] == code_va + 2            # clts emulated, in Python
            # Guest user mode (CPL 3 > IOPL 1): Python's, which bounces the #GP (not done
            # here: the exit is only taken back to CPL-3 state, the exception dropped).
            v.iopl, dom.vm_assist = 1, saved_assist
            v.copy_to_guest(code_va, b"\xfa\xeb\xfe")
            n0 = ctx.fast_cli_sti
            eng = v.engine
            on_exc, eng.on_exception = eng.on_exception, lambda vec, err, cr2: None
            v.pv.kernel_mode = 0
            try:
                eng.write({"rip": code_va, "rflags": 0x202})
                rc = kvm_run_once(eng, True)
                assert eng._handle_exit()
            finally:
                v.pv.kernel_mode = 1
                eng.on_exception = on_exc
            assert (rc, ctx.fast_cli_sti, eng.get("rip")) == (0, n0, code_va)
        finally:
            v.iopl, dom.vm_assist = saved_iopl, saved_assist
            hv.mem.map[mask_at] = saved_mask
