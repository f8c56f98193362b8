"""The patched Unicorn (csrc/unicorn/README.md) is the one the engine loads, and its store fast
path still sees every write into translated code.

The patch lets guest stores skip the slow path on RAM pages that hold no translated code, and
puts every TLB entry of a page back on the slow path when the page gets its first translated
block, found by host address so that a second virtual mapping of the page (filled while the
page had no code) is caught too. The guest below writes through such an alias before and after
its code is translated, and through the code's own address, and must run the new code each
time: a TLB entry left on the fast path would run the stale translation.
"""
from __future__ import annotations

import struct
import threading
import time

import pytest

from aiovmm import vcpu_engine          # first: it chooses the library `unicorn` loads
from aiovmm.vcpu_engine import ExitReason
from test_vcpu_slices import CODE, make  # noqa: F401  (the fixture, with its engine teardown)
from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn import x86_const as X

PML4, PDPT, PD, PT0, PT1 = 0x10000, 0x11000, 0x12000, 0x13000, 0x14000
F = 0x100000          # the function the guest rewrites: mov eax, imm32; ret
ALIAS = 0x400000      # a second mapping of F's page (PD[2] -> PT1[0] -> F)
MAIN = 0x101000
STACK = 0x1FF000
P, RW = 1, 2


def _guest() -> tuple[Uc, int]:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 4 << 20, UC_PROT_ALL)
    uc.mem_write(PML4, struct.pack("<Q", PDPT | P | RW))
    uc.mem_write(PDPT, struct.pack("<Q", PD | P | RW))
    uc.mem_write(PD, struct.pack("<Q", PT0 | P | RW) + struct.pack("<Q", 0) + struct.pack("<Q", PT1 | P | RW))
    uc.mem_write(PT0, b"".join(struct.pack("<Q", (i << 12) | P | RW) for i in range(512)))
    uc.mem_write(PT1, struct.pack("<Q", F | P | RW))
    uc.mem_write(F, bytes([0xB8]) + struct.pack("<I", 1) + bytes([0xC3]))

    def call_f(at: int) -> bytes:
        return bytes([0xE8]) + struct.pack("<i", F - (at + 5))

    code = bytearray()
    # a store through the alias while F's page has no translated code: its TLB entry is filled
    # on the fast path
    code += bytes([0xC6, 0x04, 0x25]) + struct.pack("<I", ALIAS + 0x800) + bytes([0x90])
    code += call_f(MAIN + len(code))                                        # eax = 1
    code += bytes([0x89, 0xC3])                                             # mov ebx, eax
    code += bytes([0xC7, 0x04, 0x25]) + struct.pack("<I", ALIAS + 1) + struct.pack("<I", 2)
    code += call_f(MAIN + len(code))                                        # eax = 2
    code += bytes([0x89, 0xC1])                                             # mov ecx, eax
    code += bytes([0xC7, 0x04, 0x25]) + struct.pack("<I", F + 1) + struct.pack("<I", 3)
    code += call_f(MAIN + len(code))                                        # eax = 3
    code += bytes([0x89, 0xC2])                                             # mov edx, eax
    uc.mem_write(MAIN, bytes(code))

    uc.reg_write(X.UC_X86_REG_CR4, vcpu_engine.CR4_PAE | vcpu_engine.CR4_OSFXSR)
    uc.msr_write(vcpu_engine.MSR_EFER, vcpu_engine.EFER_LME | vcpu_engine.EFER_LMA | vcpu_engine.EFER_NXE)
    uc.reg_write(X.UC_X86_REG_CR3, PML4)
    uc.reg_write(X.UC_X86_REG_CR0, vcpu_engine.CR0_PE | vcpu_engine.CR0_ET | vcpu_engine.CR0_WP
                 | vcpu_engine.CR0_PG)
    uc.reg_write(X.UC_X86_REG_RSP, STACK)
    return uc, MAIN + len(code)


def test_engine_loads_the_patched_library():
    assert vcpu_engine.UNICORN_PATCHED, (
        f"the engine runs {vcpu_engine.uclib._name}, not aiovmm/_native/unicorn (make setup builds it)")


def test_writes_into_translated_code_through_any_mapping_are_seen():
    uc, end = _guest()
    uc.emu_start(MAIN, end)
    got = [uc.reg_read(r) for r in (X.UC_X86_REG_EBX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDX)]
    assert got == [1, 2, 3], "a store into translated code did not drop the stale translation"


def test_rewritten_code_is_seen_again_after_the_page_went_fast():
    """The page loses its code (dropped from the cache), a store makes its TLB entries fast
    again, and its next translation must put them back on the slow path."""
    uc, end = _guest()
    uc.emu_start(MAIN, end)
    uc.ctl_remove_cache(F, F + 6)
    uc.reg_write(X.UC_X86_REG_RSP, STACK)
    uc.mem_write(F + 1, struct.pack("<I", 1))
    uc.emu_start(MAIN, end)
    got = [uc.reg_read(r) for r in (X.UC_X86_REG_EBX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDX)]
    assert got == [1, 2, 3]


# The slice ends of csrc/preempt.c's timer slices with the inline block-start exit check: a
# stop is raised by a timer signal or another thread (cpu_exit) and made by the emulation
# thread between two blocks (stop_interrupt). Loops that never leave translated code are the
# case the check alone must catch: every pass re-enters a chained block through its start.
# L: inc rax; jmp L (one block chained to itself)
COUNT_LOOP = bytes.fromhex("48ffc0" "ebfb")
# L: mov rsi, 0x40000; mov rdi, 0x40008; mov rcx, 32767; rep movsq; inc rax; jmp L
# (256 KiB copied onto itself 8 bytes on, forever: every rep iteration is a chained block)
MOVSQ_LOOP = bytes.fromhex("48c7c600000400" "48c7c708000400" "48c7c1ff7f0000" "f348a5" "48ffc0" "ebe3")
TIMER = pytest.mark.parametrize("make", ["timer"], indirect=True)     # test_vcpu_slices' engines


@TIMER
def test_a_deadline_already_past_when_the_slice_starts_ends_it_at_its_first_block(make):
    """The host descheduled the thread between computing a slice's deadline and arming its
    timer: the signal comes while the timer is armed, before Unicorn starts, and Unicorn's
    start clears the CPU's exit_request (resume_all_vcpus) but not the block-start flag. The
    stop must still be made before the guest's first block (cpu_exec's first
    cpu_handle_exception, where preempt.c's stop_interrupt turns it into uc_emu_stop).
    Counted, not timed: not one iteration runs. A preempt after 2 s rescues a slice that
    missed its end, so a regression fails instead of hanging."""
    eng = make(COUNT_LOOP)
    eng.write({"rip": CODE, "rax": 0})
    rescue = threading.Timer(2.0, eng.preempt)
    rescue.start()
    try:
        reason = eng.run(1 << 40, 1)             # 1 ns: long past when the timer is armed
    finally:
        rescue.cancel()
    assert (eng.get("rax"), reason, eng.get("rip")) == (0, ExitReason.BUDGET, CODE)


@TIMER
def test_a_preempt_ends_a_rep_movsq_loop(make):
    """Another thread's preempt (cpu_exit) ends a slice spent in `rep movsq` whose stores
    take the patch's fast path: every iteration is a chained block whose inline start check
    sees the request. The slice's own deadline is 60 s: only the preempt can end it early
    (the bound below is a tenth of that, whatever the host's load)."""
    eng = make(MOVSQ_LOOP)
    eng.write({"rip": CODE, "rax": 0})
    kick = threading.Timer(0.05, eng.preempt)
    kick.start()
    t = time.monotonic()
    try:
        reason = eng.run(1 << 40, 60_000_000_000)
    finally:
        kick.cancel()
    assert reason == ExitReason.PREEMPT, reason
    assert time.monotonic() - t < 6.0
    assert CODE <= eng.get("rip") < CODE + len(MOVSQ_LOOP)
