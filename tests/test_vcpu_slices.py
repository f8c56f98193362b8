"""How Unicorn vCPU slices end (vcpu_engine.py, csrc/preempt.c), on a real Unicorn vCPU.

"timer" slices have no block hook: a per-thread timer signal raises Unicorn's block-start
exit check, with the translator's mid-instruction exit checks turned off, and the stop is
made by the emulation thread between two blocks. They must stay exact: a stop may only land
between two translated blocks (never after the store of a read-modify-write instruction,
which Unicorn would then run again), must never make Unicorn skip an instruction hook in
the block it lands in (RDTSC, CPUID), must bound a guest loop, and a preempt from another
thread must end the slice. Both modes run the same checks."""
from __future__ import annotations

import ctypes
import mmap
import threading
import time

import pytest

from aiovmm.clock import SystemClock
from aiovmm.vcpu_engine import ExitReason, VCPUEngine

CODE, DATA, STACK = 0x1000, 0x8000, 0x20000
# L: add qword [rbx], 1; push rax; pop rax; dec rcx; jnz L        (then `until`)
RMW_LOOP = bytes.fromhex("48830301" "50" "58" "48ffc9" "75f5")
SPIN = bytes.fromhex("ebfe")                                  # jmp $
# L: 200 x mov [rbx], rcx (a long block: stores take Unicorn's slow path); rdtsc;
#    rdx = edx:eax - r13; if below 0 or above r14: mov qword [rbx+8], 1 and end;
#    r13 = edx:eax; dec rcx; jnz L                                  (then `until`)
TSC_LOOP = bytes.fromhex("48890b") * 200 + bytes.fromhex(
    "0f31" "48c1e220" "4809d0" "4889c2" "4c29ea" "7213" "4c39f2" "770e" "4989c5" "48ffc9"
    "0f8586fdffff" "eb08" "48c7430801000000")
# L: 200 x mov [rsi], r15; xor eax, eax; cpuid; if ebx != r14d: mov qword [rsi+8], 1 and
#    end; dec r15; jnz L                                            (then `until`)
CPUID_LOOP = bytes.fromhex("4c893e") * 200 + bytes.fromhex(
    "31c0" "0fa2" "4439f3" "750b" "49ffcf" "0f8596fdffff" "eb08" "48c7460801000000")


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


def _run_to_end(eng: VCPUEngine, program: bytes) -> int:
    """Slices until the program reaches `until` (the engine's ERROR of reaching it)."""
    slices = 0
    while eng.get("rip") != CODE + len(program):
        reason = eng.run(1 << 40, 100_000)        # 100 us slices: most end inside the stores
        slices += 1
        assert reason == ExitReason.BUDGET or eng.last_error.startswith("guest jumped"), eng.last_error
        assert slices < 1_000_000
    return slices


def test_a_stop_never_skips_the_rdtsc_hook(make):
    """Each RDTSC is answered by the engine's clock, also in a block the slice's stop
    arrived in. Unicorn's instruction-hook loop leaves at the first hook after which its
    stop_request is set, before the RDTSC hook: a timer that set it from outside made that
    block's RDTSC return Unicorn's own TSC (measured: at the 2nd-4th slice)."""
    eng = make(TSC_LOOP)
    eng.rdtsc = SystemClock(time.monotonic_ns() - 10 ** 9)
    n = 50_000
    eng.write({"rip": CODE, "rcx": n, "rbx": DATA, "rsp": STACK, "r14": 60 * 10 ** 9})
    eng.set("r13", eng.rdtsc())
    slices = _run_to_end(eng, TSC_LOOP)
    bad = int.from_bytes(eng.uc.mem_read(DATA + 8, 8), "little")
    assert (bad, eng.get("rcx")) == (0, 0), f"clock left the engine's after {slices} slices"
    assert slices >= 10


def test_a_stop_never_skips_the_cpuid_hook(make):
    """CPUID is answered by the policy (the engine's hook) in every block, as RDTSC."""
    eng = make(CPUID_LOOP)
    magic = 0x61766f69
    eng.cpuid = lambda leaf, sub: (0, magic, 0, 0)
    n = 20_000
    eng.write({"rip": CODE, "r15": n, "rsi": DATA, "rsp": STACK, "r14": magic})
    slices = _run_to_end(eng, CPUID_LOOP)
    bad = int.from_bytes(eng.uc.mem_read(DATA + 8, 8), "little")
    assert (bad, eng.get("r15")) == (0, 0), f"Unicorn's own CPUID after {slices} slices"
    assert slices >= 10


def test_a_refused_port_access_stops_exactly_at_the_instruction(make):
    """The vCPU refuses a port (no IOPL/bitmap) and stop()s: the slice must end at the IN,
    with nothing after it run, so the #GP the vCPU delivers there is exact. Timer slices
    leave the block from the C IN/OUT hook; block-hook slices still run on to the next
    load or store (their mid-block exit check)."""
    # in al,0x80; inc rbx; mov [DATA], rbx; inc rbx; out 0x80,al; inc rbx
    program = bytes.fromhex("e480" "48ffc3" "48891c25" + DATA.to_bytes(4, "little").hex()
                            + "48ffc3" "e680" "48ffc3")
    eng = make(program)
    if eng.slices == "hook":
        pytest.skip("block-hook slices stop a refused IN/OUT at the next load or store")
    seen = []

    def refuse(port: int, size: int, write: bool, value: int) -> None:
        seen.append((port, write))
        eng.stop()
        return None
    eng.on_port_io = refuse
    eng.write({"rip": CODE, "rbx": 0})
    assert eng.run(1 << 30, 1_000_000_000) == ExitReason.STOPPED
    assert (eng.get("rip"), eng.get("rbx"), seen) == (CODE, 0, [(0x80, False)])
    assert int.from_bytes(eng.uc.mem_read(DATA, 8), "little") == 0
    # Past the IN (as the vCPU's #GP handling would resume): the OUT is refused exactly too.
    eng.write({"rip": CODE + 2})
    assert eng.run(1 << 30, 1_000_000_000) == ExitReason.STOPPED
    out_at = CODE + 2 + 3 + 8 + 3
    assert (eng.get("rip"), eng.get("rbx"), seen[-1]) == (out_at, 2, (0x80, True))
