"""Red-team: `int $n` with prefixes, in 64-bit mode, to a gate the guest refuses.

Xen's IDT gates for `int $n` are DPL 0: the CPU raises #GP((n << 3) | 2) at the INT's first
byte, its prefixes included, and do_general_protection passes that #GP on when the guest's
own gate refuses (permit_softint; with FRED, regs->rip -= insnlen, the hardware's length).
Unicorn reports the vector past the instruction (traps.inject_exception moves RIP back by
engine.int_length), which was always 2 (`cd n`): a prefixed INT's #GP pointed into its
middle. The patched Unicorn tells the length (csrc/unicorn/aiovmm-int-length.patch).
kvm-pvm reports a prefixed `int $n` as #UD at the instruction (measured here), which
kvm_engine._one_byte_trap decodes forward: legacy prefixes only, so one with a REX byte
among them (`f3 2e 48 cd n`, as the CPU takes it in 64-bit mode) became the guest's #UD.
`int $n` to an exception vector (not 1, 3, 4) is that #GP too: Unicorn reported `int $14`
as a page fault (error 0, RIP past it), `int $13` as #GP(0)."""
from __future__ import annotations

import pytest

from conftest import _kvm_skip_reason
from hand_vcpu import CODE_VA, hand_driven_vcpu

REGS = ("rip", "rsp", "rax", "rcx", "r11", "rflags")
ENGINES = ["unicorn", pytest.param("kvm", marks=pytest.mark.skipif(
    _kvm_skip_reason() is not None, reason=str(_kvm_skip_reason())))]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("form", ["cd", "66cd", "f32e48cd"])
@pytest.mark.parametrize("vector", ["free", 0x0E, 0x0D])
async def test_refused_int_n_faults_at_its_first_byte(engine, form, vector):
    """A vector without a gate of the guest's, or an exception vector (Xen's gate DPL 0
    whatever the guest's says: `int $14` is no page fault; Unicorn reported it as one)."""
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        eng = v.engine
        assert v.kernel_mode
        gp_handler = v.trap_table[13][2]
        n = vector if vector != "free" else \
            next(i for i in range(0x40, 0x100) if not v.trap_table[i][2])   # no gate: refused
        insn = bytes.fromhex(form) + bytes([n])
        v.copy_to_guest(CODE_VA, insn + b"\xeb\xfe")
        seen, on_exception = [], eng.on_exception

        def noted(vec, err, cr2):                 # the bounce, before anything else runs
            on_exception(vec, err, cr2)
            seen.append(tuple(eng.read(("rip", "rsp"))))
            eng.stop()
        eng.on_exception = noted
        eng.write({"rip": CODE_VA})
        try:
            eng.step_to(CODE_VA + len(insn))
        finally:
            eng.on_exception = on_exception
        assert len(seen) == 1, seen
        rip, rsp = seen[0]
        assert v.kernel_mode and rip == gp_handler, hex(rip)
        frame = v.copy_from_guest(rsp, 8 * 4)
        err, frip = (int.from_bytes(frame[8 * i:8 * i + 8], "little") for i in (2, 3))
        assert (err, frip) == ((n << 3) | 2, CODE_VA), (hex(err), hex(frip))
        assert dom.shutdown_reason is None
