"""How Unicorn vCPU slices end (vcpu_engine.py, csrc/preempt.c), on a real Unicorn vCPU.

"timer" slices have no block hook: Unicorn's exit request, from a timer thread, with the
translator's mid-instruction exit checks turned off. They must stay exact: a stop may only
land between two translated blocks (never after the store of a read-modify-write
instruction, which Unicorn would then run again), must bound a guest loop, and a preempt
from another thread must end the slice. Both modes run the same checks."""
from __future__ import annotations

import ctypes
import mmap
import threading
import time

import pytest

from aiovmm.vcpu_engine import ExitReason, VCPUEngine

CODE, DATA, STACK = 0x1000, 0x8000, 0x20000
# L: add qword [rbx], 1; push rax; pop rax; dec rcx; jnz L        (then `until`)
RMW_LOOP = bytes.fromhex("48830301" "50" "58" "48ffc9" "75f5")
SPIN = bytes.fromhex("ebfe")                                  # jmp $


@pytest.fixture(params=["hook", "timer"])
def make(request):
    made = []

    def make(program: bytes) -> VCPUEngine:
        size = 1 << 20
        buf = mmap.mmap(-1, size)
        buf[CODE:CODE + len(program)] = program
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        eng = VCPUEngine(addr, size, until=CODE + len(program), name="slices-test",
                         slices=request.param)
        assert eng.slices == request.param           # this Unicorn is the probed 2.1.4
        made.append((eng, buf))
        return eng
    yield make
    for eng, _buf in made:
        eng.close()


def test_stops_never_split_an_instruction(make):
    eng = make(RMW_LOOP)
    n = 2_000_000
    eng.write({"rip": CODE, "rcx": n, "rbx": DATA, "rsp": STACK})
    slices = 0
    while eng.get("rip") != CODE + len(RMW_LOOP):
        reason = eng.run(1 << 40, 100_000)        # 100 us slices: thousands of stops
        slices += 1
        assert reason in (ExitReason.BUDGET, ExitReason.ERROR), reason
        assert slices < 1_000_000
    count = int.from_bytes(eng.uc.mem_read(DATA, 8), "little")
    assert (count, eng.get("rsp")) == (n, STACK), f"{slices} slices"
    assert slices >= 10


def test_a_spinning_guest_is_stopped_at_the_deadline(make):
    eng = make(SPIN)
    eng.set("rip", CODE)
    t = time.monotonic()
    assert eng.run(1 << 40, 2_000_000) == ExitReason.BUDGET
    assert time.monotonic() - t < 2.0              # 2 ms asked; generous for a loaded host
    assert eng.get("rip") == CODE


def test_preempt_from_another_thread_ends_the_slice(make):
    eng = make(SPIN)
    eng.set("rip", CODE)
    kick = threading.Timer(0.05, eng.preempt)
    kick.start()
    t = time.monotonic()
    try:
        reason = eng.run(1 << 40, 30_000_000_000)       # 30 s: only the preempt ends it early
    finally:
        kick.cancel()
    assert reason == ExitReason.PREEMPT
    assert time.monotonic() - t < 10.0
