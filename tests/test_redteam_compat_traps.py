"""Red team (guest-only): `int3` and `icebp` of a 32-bit user process (compatibility mode)
on the KVM engine. kvm-pvm reports both as #UD at the instruction; a CPU and Xen trap with
#BP / #DB after it (the guest's trap 3 / 1: gdb's breakpoints in 32-bit processes got
SIGILL). Both modes must give what 64-bit mode gives (kvm_engine._one_byte_trap). With legacy
prefixes (which the CPU ignores on them) kvm-pvm reports those and `int $n` as #UD in
compatibility mode too, and `into` (ce) with OF set: Xen traps past the whole instruction
(its IDT gates 1, 3, 4 are DPL 3): #BP, #DB, #OF; `into` with OF clear does nothing."""
from __future__ import annotations

import pytest

from hand_vcpu import hand_driven_vcpu
from test_redteam_iret_cs import KVM_ONLY, REGS, USER_CODE_VA, _back, _iret, _run_kvm_exit


@KVM_ONLY
@pytest.mark.parametrize("insn,vector", [
    (b"\xcc", 3), (b"\xf1", 1), (b"\x66\xcc", 3), (b"\xf3\x2e\xcc", 3), (b"\x66\xf1", 1),
    (b"\x66\xcd\x03", 3), (b"\x67\xcd\x04", 4), (b"\x66\xcd\x80", 0x80)],
    ids=["int3", "icebp", "66-int3", "f3-2e-int3", "66-icebp", "66-int-3", "67-int-4", "66-int-80"])
async def test_one_byte_traps_in_compatibility_mode_are_the_guests_trap(insn, vector):
    async with hand_driven_vcpu(REGS, "kvm") as (hv, dom, v):
        ma = hv.pagetables.translate(v.user_root << 12, USER_CODE_VA, False)
        saved = bytes(hv.mem.map[ma:ma + 8])
        hv.mem.map[ma:ma + 8] = (insn + b"\xeb\xfe" + b"\x90" * 8)[:8]
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
            assert seen == [(vector, 0, USER_CODE_VA + len(insn))] * 2, seen
            assert landed[0] == landed[1]                # the same trap handler
        finally:
            hv.mem.map[ma:ma + 8] = saved
            if not v.kernel_mode:
                v.switch_to_kernel()
            v.engine.write({"cs": 0xE033})


@KVM_ONLY
@pytest.mark.parametrize("insn", [b"\xce", b"\x66\xce"], ids=["into", "66-into"])
async def test_into_in_compatibility_mode_is_of_with_overflow_else_nothing(insn):
    async with hand_driven_vcpu(REGS, "kvm") as (hv, dom, v):
        ma = hv.pagetables.translate(v.user_root << 12, USER_CODE_VA, False)
        saved = bytes(hv.mem.map[ma:ma + 8])
        hv.mem.map[ma:ma + 8] = (insn + b"\xeb\xfe" + b"\x90" * 8)[:8]
        seen, on_exception, on_ud = [], v.engine.on_exception, v.engine.on_invalid_opcode

        def noted(vec, err, cr2):
            seen.append((vec, err, v.engine.get("rip")))
            return on_exception(vec, err, cr2)
        v.engine.on_exception = noted
        v.engine.on_invalid_opcode = lambda: seen.append(("ud", v.engine.get("rip")))
        try:
            for of in (1, 0):
                _iret(v, 0xE023)
                v.engine.write({"rflags": 0x202 | of << 11})
                _run_kvm_exit(v, False)
                if of:
                    assert seen == [(4, 0, USER_CODE_VA + len(insn))], seen
                    assert dom.shutdown_reason is None and v.kernel_mode
                else:
                    # A no-op: on to the `jmp .` behind it, in user mode, nothing reported.
                    assert seen == [] and not v.kernel_mode, seen
                    assert v.engine.get("rip") == USER_CODE_VA + len(insn)
                    v.switch_to_kernel()
                _back(v)
                seen.clear()
        finally:
            hv.mem.map[ma:ma + 8] = saved
            if not v.kernel_mode:
                v.switch_to_kernel()
            v.engine.write({"cs": 0xE033})
            v.engine.on_exception, v.engine.on_invalid_opcode = on_exception, on_ud


@KVM_ONLY
@pytest.mark.parametrize("insn", [b"\x66\xcd\x41", b"\xf3\x2e\xcd\x41"], ids=["66-int-41", "f3-2e-int-41"])
async def test_prefixed_int_n_refused_by_its_gate_faults_at_the_instruction(insn, monkeypatch):
    """`int $0x41` (no gate in the guest's trap table) after legacy prefixes, in
    compatibility mode (kvm-pvm: #UD at the instruction, _int_n): Xen's #GP((0x41 << 3) | 2)
    frame points at the instruction's first byte, prefixes and all (it was short by them:
    RIP past the instruction minus 2)."""
    from aiovmm import traps
    async with hand_driven_vcpu(REGS, "kvm") as (hv, dom, v):
        assert not v.trap_table[0x41][2]
        ma = hv.pagetables.translate(v.user_root << 12, USER_CODE_VA, False)
        saved = bytes(hv.mem.map[ma:ma + 8])
        hv.mem.map[ma:ma + 8] = (insn + b"\xeb\xfe" + b"\x90" * 8)[:8]
        bounced, bounce = [], traps.bounce

        def noted(vv, handler, error=None, **kw):
            bounced.append((error, vv.engine.get("rip")))
            return bounce(vv, handler, error, **kw)
        try:
            _iret(v, 0xE023)
            monkeypatch.setattr(traps, "bounce", noted)
            _run_kvm_exit(v, False)
            monkeypatch.undo()
            assert dom.shutdown_reason is None and v.kernel_mode
            assert bounced == [((0x41 << 3) | 2, USER_CODE_VA)], bounced
            _back(v)
        finally:
            hv.mem.map[ma:ma + 8] = saved
            if not v.kernel_mode:
                v.switch_to_kernel()
            v.engine.write({"cs": 0xE033})
