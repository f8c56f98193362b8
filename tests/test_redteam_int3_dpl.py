"""Red-team: `int3`, `int $3` and `int $4` with the guest's trap-table gates 3 and 4 at DPL 0
(guests/hostile/int3_dpl.c), from the kernel and from user mode, on both engines.

Xen's IDT gates 3 and 4 are DPL 3 (x86/traps.c): the CPU takes them straight into do_int3 /
do_trap, which inject #BP / #OF through trap_ctxt[3] / [4] (pv_inject_hw_exception) whatever
DPL the guest gave its gate; only the other software vectors, whose Xen gates are DPL 0, go
through do_general_protection's permit_softint. Found: traps.inject_exception applied the
guest's gate DPL to 3 and 4 too: #GP((n << 3) | 2) at the instruction instead."""
from __future__ import annotations

from test_redteam_portio import (attack_fixture, res,  # noqa: F401
                                 test_host_and_bystander_unaffected)  # fixture, shared test

ALL_ENGINES = True

attack = attack_fixture("int3_dpl")


def test_int3_and_int_3_4_ignore_the_guests_gate_dpl(res):
    got = {k: res.get(k) for k in ("k_int3", "k_int_3", "k_int_4", "k_gp",
                                   "u_status", "u_bp", "u_of", "u_gp")}
    assert got == {"k_int3": "3", "k_int_3": "3", "k_int_4": "4", "k_gp": "0",
                   "u_status": "42", "u_bp": "2", "u_of": "1", "u_gp": "0"}, res
