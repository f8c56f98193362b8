"""The Unicorn engine's guest TSC: RDTSC and RDTSCP are answered by C hooks (csrc/preempt.c)
from the clock's origin, and must read what Hypervisor.system_time_ns reads (Xen system
time: the guest's pvclock and its timers are built on that clock), with RDTSCP's ECX the
vCPU's TSC_AUX. A real Unicorn vCPU runs the real instructions; nothing is mocked."""
from __future__ import annotations

import mmap
import ctypes
import time

import pytest

from aiovmm.clock import SystemClock
from aiovmm.vcpu_engine import MSR_TSC_AUX, VCPUEngine

CODE = 0x1000
# rdtsc; shl rdx,32; or rax,rdx; mov rbx,rax; rdtscp; shl rdx,32; or rax,rdx; (until)
PROGRAM = bytes.fromhex("0f31" "48c1e220" "4809d0" "4889c3" "0f01f9" "48c1e220" "4809d0")


@pytest.fixture
def engine():
    size = 1 << 20
    buf = mmap.mmap(-1, size)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    buf[CODE:CODE + len(PROGRAM)] = PROGRAM
    eng = VCPUEngine(addr, size, until=CODE + len(PROGRAM), name="clock-test")
    yield eng
    eng.close()


def _run(eng: VCPUEngine) -> tuple[int, int, int]:
    eng.set("rip", CODE)
    eng.run(1_000_000)                  # ends at `until`, the end of the program
    assert eng.get("rip") == CODE + len(PROGRAM), eng.last_error
    rbx, rax, rcx = eng.read(("rbx", "rax", "rcx"))
    return rbx, rax, rcx


def test_rdtsc_and_rdtscp_read_the_hypervisors_system_time(engine):
    # An origin 5 s in the past, as a hypervisor that started 5 s ago.
    clock = SystemClock(time.monotonic_ns() - 5_000_000_000)
    engine.rdtsc = clock
    engine.set_msr(MSR_TSC_AUX, 0x1_0000_0007)      # ECX gets the low 32 bits
    before = clock()
    tsc1, tsc2, aux = _run(engine)
    after = clock()
    assert before <= tsc1 <= tsc2 <= after, (before, tsc1, tsc2, after)
    assert 5_000_000_000 <= tsc1 < 5_000_000_000 + 60_000_000_000
    assert aux == 7


def test_a_clock_without_an_origin_is_refused(engine):
    with pytest.raises(TypeError):
        engine.rdtsc = time.monotonic_ns
