"""Red-team: SYSCALL in compatibility mode from a hostile PV guest's user mode
(guests/hostile/syscall32.c), on both engines, run natively: the user program
far-returns to FLAT_USER_CS32 itself (no hypercall involved) and issues `syscall`.

Xen (x86_64/entry.S cstar_enter -> switch_to_kernel): the CALLBACKTYPE_syscall32 callback,
never a hypercall nor the 64-bit syscall callback; without one (address 0) the guest's #UD at
the SYSCALL with the frame's CS FLAT_USER_CS32. The bystander's frames hash the same.

Found: the Unicorn engine sent it to the 64-bit syscall callback (the #UD never came); on
kvm-pvm it entered ring 0 of the VM at MSR_CSTAR truncated to 32 bits, a guest address
(kvm_engine._PVM_VENDOR; tests/test_redteam_iret_cs.py runs guest code placed there)."""
from __future__ import annotations

from test_redteam_portio import (attack_fixture, res,  # noqa: F401
                                 test_host_and_bystander_unaffected)  # fixture, shared test

ALL_ENGINES = True

attack = attack_fixture("syscall32")


def test_compat_syscall_goes_to_syscall32_callback(res):
    assert (res["found"], res["cb32"], res["status_cb"]) == ("1", "0", "32"), res


def test_compat_syscall_without_callback_is_ud(res):
    assert (res["cb32_off"], res["ud_vec"], res["ud_rip_ok"], res["ud_cs"], res["status_ud"],
            res["alive"]) == ("0", "6", "1", str(0xE023), "6", "1"), res
