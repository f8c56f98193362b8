"""Red-team: a user process of a PV guest runs SYSCALL in compatibility mode
(guests/hostile/compat_syscall.c: a far return to FLAT_RING3_CS32, then exit(42) through
SYSCALL), on both engines, next to a bystander.

Xen (x86_64/entry.S cstar_enter -> switch_to_kernel): never a hypercall; the kernel's
syscall32 callback, and without one (this kernel registers only the 64-bit syscall one) the
guest's #UD at the SYSCALL (TB_eip == 0), never the 64-bit callback: the kernel reports the
unhandled user #UD at the SYSCALL (guests/hostile/syscall32.c covers the callback). Found:
on the KVM engine kvm-pvm emulated that SYSCALL into the engine's ring 0 at MSR_CSTAR
truncated to 32 bits (an address the guest maps as it likes) on the user's stack: its #PF
frame went to the user's stack from ring 0 and the domain crashed ("exception 14 with
ring-0 RSP ... outside the engine stack"); with the process's own code mapped there it ran
at ring 0, where the engine's direct map reaches every machine frame
(tests/test_redteam_iret_cs.py shows the stores). Fixed twice over (kvm_engine): the VM's
CPUID vendor makes it a #UD at CPL 3 (_PVM_VENDOR), and CR4.SMEP with IST keeps ring 0 from
running guest code or pushing on guest stacks; both lead to traps.syscall32."""
from __future__ import annotations

import pytest

from test_redteam_portio import attack_fixture, res  # noqa: F401 (fixtures)

ALL_ENGINES = True

attack = attack_fixture("compat_syscall")


def test_host_and_bystander_unaffected(attack):
    assert attack["bystander_same"] and attack["bystander_alive"]
    assert any("Hello" in l or "hello" in l for l in attack["hello"]), attack["hello"]


def test_compat_syscall_without_syscall32_is_the_users_ud(attack, res):
    assert not attack["crash"], attack["crash"]
    assert res["found"] == "1", res
    ud = [l for l in attack["lines"] if "trap 6 (#UD)" in l]
    assert len(ud) == 1 and "rip=0x400018" in ud[0] and "(user)" in ud[0], attack["lines"]
