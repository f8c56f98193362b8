"""The unicorn #1883 work-around on the live CPU state (vcpu_engine._ExcFix).

read_error_and_reset() reads env->error_code and resets env->old_exception in place, at the
address probed from CPUState.env_ptr. These tests set both fields through Unicorn's own
context API (the path the work-around used before) and check that the in-place access sees
and changes the CPU's real state: a probe that found the wrong address would read another
value and leave old_exception set, and the guest's next fault would become #DF.
"""
from __future__ import annotations

import ctypes

from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
from unicorn.unicorn_py3.unicorn import uclib

from aiovmm.vcpu_engine import _ExcFix


def _fields(f: _ExcFix) -> tuple[int, int]:
    """(error_code, old_exception) as a fresh context copy of the CPU holds them."""
    uclib.uc_context_save(f.h, f.ctx)
    a = f.ctx.value
    return (ctypes.c_int32.from_address(a + f.err_off).value,
            ctypes.c_int32.from_address(a + f.old_off).value)


def _set_fields(f: _ExcFix, err: int, old: int) -> None:
    uclib.uc_context_save(f.h, f.ctx)
    a = f.ctx.value
    ctypes.c_int32.from_address(a + f.err_off).value = err
    ctypes.c_int32.from_address(a + f.old_off).value = old
    uclib.uc_context_restore(f.h, f.ctx)


def test_live_state_is_found_and_is_the_cpus():
    ucs = [Uc(UC_ARCH_X86, UC_MODE_64) for _ in range(3)]    # alive as long as their fixes
    fixes = [_ExcFix(uc) for uc in ucs]
    for i, f in enumerate(fixes):
        assert f._old is not None, "the live CPU state was not located on this Unicorn"
        _set_fields(f, 0x1230 + i, 13)
    # Each instance reads its own CPU's error code and resets its own old_exception.
    for i, f in enumerate(fixes):
        assert f.read_error_and_reset() == 0x1230 + i
        assert _fields(f) == (0x1230 + i, -1)
    for f in fixes:
        f.free()


def test_context_fallback_gives_the_same_answer():
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    f = _ExcFix(uc)
    f._old = f._err = None                   # as on a Unicorn whose layout was not found
    _set_fields(f, 0x55, 14)
    assert f.read_error_and_reset() == 0x55
    assert _fields(f) == (0x55, -1)
    f.free()
