"""Red-team: Unicorn slices against guest code built to dodge the end of its slice, in both
slice modes ("timer": Unicorn's exit request checked at block starts only; "hook": the C
block hook). A guest must be stopped at its deadline however its loop is made: long string
instructions (one TCG block per iteration), code that rewrites the block it runs in
(translation invalidated on every store), and loops of instructions the engine answers
from hooks (RDTSC in C, CPUID in Python), which resume emulation from a callback."""
from __future__ import annotations

import ctypes
import mmap
import threading
import time

import pytest

from aiovmm.vcpu_engine import ExitReason, VCPUEngine

CODE, DATA, STACK = 0x1000, 0x8000, 0x20000
PROGRAMS = {
    # L: mov ecx, 0x10000; mov edi, DATA; rep stosb; jmp L
    "rep_stosb": bytes.fromhex("b900000100" "bf00800000" "f3aa" "ebf2"),
    # L: mov ecx, 0x2000; mov esi, DATA; mov edi, 0x10000; rep movsq; jmp L
    "rep_movsq": bytes.fromhex("b900200000" "be00800000" "bf00000100" "f348a5" "ebed"),
    # L: inc byte [rip+1]; mov al, imm8; jmp L -- the store rewrites the immediate of the
    # next instruction, in the block being run
    "self_modifying": bytes.fromhex("fe0501000000" "b000" "ebf6"),
    # L: rdtsc; jmp L
    "rdtsc": bytes.fromhex("0f31" "ebfc"),
    # L: cpuid; jmp L
    "cpuid": bytes.fromhex("0fa2" "ebfc"),
}


@pytest.fixture(params=["hook", "timer"])
def mode(request) -> str:
    return request.param


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_a_dodging_loop_ends_at_its_deadline(mode, name):
    program = PROGRAMS[name]
    size = 1 << 20
    buf = mmap.mmap(-1, size)
    buf[CODE:CODE + len(program)] = program
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    eng = VCPUEngine(addr, size, until=CODE + 0x800, name="redteam-slices", slices=mode)
    try:
        assert eng.slices == mode
        eng.write({"rip": CODE, "rsp": STACK, "rflags": 2})
        worst = 0.0
        for _ in range(5):
            # A slice that is never stopped ends by this preempt (a failure, not a hang).
            rescue = threading.Timer(5.0, eng.preempt)
            rescue.start()
            t = time.monotonic()
            try:
                reason = eng.run(1 << 40, 2_000_000)      # 2 ms slices
            finally:
                rescue.cancel()
            worst = max(worst, time.monotonic() - t)
            assert reason == ExitReason.BUDGET, (reason, eng.last_error)
            assert CODE <= eng.get("rip") < CODE + len(program)
        assert worst < 1.0, f"{name}: a 2 ms slice ran {worst * 1e3:.0f} ms"
        if name == "self_modifying":
            assert buf[CODE + 7] != 0                      # the code did rewrite itself
    finally:
        eng.close()
