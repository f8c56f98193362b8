"""Red-team: SYSENTER from a hostile PV guest's user mode (guests/hostile/sysenter.c), in
64-bit and in compatibility mode, on both engines, run natively.

The guest's CPUID is a GenuineIntel model offering SEP (cpuid.py), where SYSENTER works in
long mode, both submodes. Xen (x86_64/entry.S sysenter_entry): the CALLBACKTYPE_sysenter
callback (events masked per its own flag) with the frame [rcx r11 rip=0 cs=3 rflags rsp=0
ss=FLAT_USER_SS]; without one, the guest's #GP(0) through its trap table with that frame.
(On AMD, Xen runs in long mode where SYSENTER is #UD and offers a PV guest no SEP.)

Found: kvm-pvm (an AMD CPU here) gave the guest #UD at a 64-bit SYSENTER and #GP(0) at a
compatibility-mode one; Unicorn stepped over it as a no-op (its SYSENTER only runs hooks),
the program running on into its next bytes."""
from __future__ import annotations

from test_redteam_portio import (attack_fixture, res,  # noqa: F401
                                 test_host_and_bystander_unaffected)  # fixture, shared test

ALL_ENGINES = True

attack = attack_fixture("sysenter")


def test_sysenter_goes_to_the_sysenter_callback_from_both_modes(res):
    assert (res["found"], res["cb"], res["status_64"], res["status_32"]) == ("1", "0", "42", "43"), res


def test_sysenter_without_callback_is_gp0_with_xens_frame(res):
    assert (res["cb_off"], res["status_gp"], res["gp_vec"], res["gp_err"], res["gp_rip"],
            res["gp_cs"], res["gp_rsp"], res["alive"]) == ("0", "7", "13", "0", "0", "3", "0", "1"), res


def test_prefixed_sysenter_is_sysenter_and_lock_is_ud(res):
    """Legacy prefixes before SYSENTER change nothing on the CPU Xen assumes (66, f3: the
    callback, as plain); LOCK makes it #UD at the instruction (its first prefix, +31). Found:
    kvm-pvm's #GP(0) / #UD at a prefixed one became the guest's #GP / #UD
    (emulate._sysenter matched only 0f 34 at RIP)."""
    got = {k: res.get(k) for k in ("pfx_66_64", "pfx_66_32", "pfx_f3_64", "pfx_f3_32",
                                   "lock_64", "lock_32", "ud_rip_64", "ud_rip_32")}
    assert got == {"pfx_66_64": "42", "pfx_66_32": "43", "pfx_f3_64": "42", "pfx_f3_32": "43",
                   "lock_64": "9", "lock_32": "9", "ud_rip_64": "31", "ud_rip_32": "31"}, res
