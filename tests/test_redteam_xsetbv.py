"""Red-team: XSETBV from a hostile PV kernel (guests/hostile/xsetbv_bad.c), on both engines.

Xen (x86_emulate xsetbv, xstate.c handle_xsetbv): #UD without CR4.OSXSAVE; an XCR index
other than 0 (ECX only: RCX's upper half is ignored) or an XCR0 outside the PV policy or
not valid_xcr0 (no x87, AVX without SSE, AVX-512 state without the rest) is #GP(0) and XCR0
stays; x87 alone and x87|SSE(|AVX) are accepted. Where the PV CPUID offers no XSAVE (the
Unicorn engine) CR4.OSXSAVE cannot be set and every XSETBV is #UD. The bystander's frames
hash the same and the host boots another guest afterwards.

Found: on kvm-pvm (XSAVE offered) an XCR0 with PKRU (bit 9), bit 32 or bit 63 was accepted:
cpuid.valid_xcr0 tested `val & ~allowed` with `allowed` an IntFlag, whose `~` inverts only
the flag's own bits on Python 3.11."""
from __future__ import annotations

import asyncio

import pytest

from conftest import results
from test_redteam_portio import (attack_fixture, attack_next_to_bystander, res,  # noqa: F401
                                 test_host_and_bystander_unaffected)  # fixture, shared test

ALL_ENGINES = True
REFUSED = ("index_1", "index_neg", "no_x87", "zero", "avx_no_sse", "opmask_alone", "pkru",
           "bit63", "bit32")
ACCEPTED = ("fp_sse", "x87_only", "rcx_upper_ignored")


attack = attack_fixture("xsetbv_bad")


def test_xsetbv_before_osxsave_is_ud(res):
    assert res["before_osxsave"] == "6"


@pytest.mark.parametrize("key", REFUSED)
def test_invalid_xsetbv_is_refused(res, key):
    want = "13" if res["offered"] == "1" else "6"
    assert res[key] == want, res
    assert res["size_unchanged"] == "1", res


@pytest.mark.parametrize("key", ACCEPTED)
def test_valid_xsetbv_is_accepted(res, key):
    assert res[key] == ("none" if res["offered"] == "1" else "6"), res


def test_osxsave_follows_the_offer(res, engine):
    assert res["cr4_write"] == "none"
    assert res["cr4_osxsave"] == res["offered"], res
    if res["offered"] == "1" and "fp_sse_avx" in res:
        assert (res["fp_sse_avx"], res["size_avx_grows"], res["back_to_fp_sse"]) == ("none", "1", "none")


@pytest.fixture(scope="module")
def user(engine):
    return asyncio.run(attack_next_to_bystander(engine, "xsetbv_user"))


def test_xsetbv_from_user_mode_is_refused(user):
    """guests/hostile/xsetbv_user.c: with CR4.OSXSAVE set by the kernel (where offered),
    XSETBV from the guest's user mode is #GP(0) at the instruction (Xen: not ring 0 of the
    PV guest); without the offer #UD; XCR0 (leaf 0xd's size) unchanged."""
    res = results(user["lines"])
    assert user["bystander_same"] and user["bystander_alive"] and not user["crash"]
    want = "13" if res["offered"] == "1" else "6"
    assert (res["found"], res["user_trap"], res["user_trap_rip_ok"], res["user_status"],
            res["xcr0_size_unchanged"], res["alive"]) == ("1", want, "1", "7", "1", "1"), res
