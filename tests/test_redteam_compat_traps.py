"""Red team (guest-only): `int3` and `icebp` of a 32-bit user process (compatibility mode)
on the KVM engine. kvm-pvm reports both as #UD at the instruction; a CPU and Xen trap with
#BP / #DB after it (the guest's trap 3 / 1: gdb's breakpoints in 32-bit processes got
SIGILL). Both modes must give what 64-bit mode gives (kvm_engine._one_byte_trap)."""
from __future__ import annotations

import pytest

from hand_vcpu import hand_driven_vcpu
from test_redteam_iret_cs import KVM_ONLY, REGS, USER_CODE_VA, _back, _iret, _run_kvm_exit


@KVM_ONLY
@pytest.mark.parametrize("insn,vector", [(b"\xcc", 3), (b"\xf1", 1)], ids=["int3", "icebp"])
async def test_one_byte_traps_in_compatibility_mode_are_the_guests_trap(insn, vector):
    async with hand_driven_vcpu(REGS, "kvm") as (hv, dom, v):
        ma = hv.pagetables.translate(v.user_root << 12, USER_CODE_VA, False)
        saved = bytes(hv.mem.map[ma:ma + 4])
        hv.mem.map[ma:ma + 4] = insn + b"\xeb\xfe\x90"
        seen, on_exception = [], v.engine.on_exception

        def noted(vec, err, cr2):
            seen.append((vec, err, v.engine.get("rip")))
            return on_exception(vec, err, cr2)
        v.engine.on_exception = noted
        try:
            landed = []
            for cs in (0xE033, 0xE023):
                _iret(v, cs)
                assert not v.kernel_mode and v.engine.get("cs") == cs
                _run_kvm_exit(v, False)
                assert dom.shutdown_reason is None and v.kernel_mode
                landed.append(v.engine.get("rip"))
                _back(v)
            assert seen == [(vector, 0, USER_CODE_VA + 1)] * 2, seen
            assert landed[0] == landed[1]                # the same trap handler
        finally:
            hv.mem.map[ma:ma + 4] = saved
            if not v.kernel_mode:
                v.switch_to_kernel()
            v.engine.write({"cs": 0xE033})
