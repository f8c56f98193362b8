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

from aiovmm import vcpu_engine          # first: it chooses the library `unicorn` loads
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
