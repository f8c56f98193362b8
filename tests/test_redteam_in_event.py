"""Red-team: events bounced at slice starts while the guest polls a port with INs its
hypervisor answers (guests/hostile/in_event.c: `insb` and `in %dx,%al` on the PIT, allowed by
the guest's I/O bitmap so that the KVM engine's host answers each, with a 1 ms periodic timer
and events unmasked), on both engines, next to a bystander.

Xen completes the IN before it makes an event's frame: every tick reaches the handler. The
KVM engine left each answered IN for KVM to complete at the next entry, after the next
slice's event bounce, and KVM put RIP back after the IN: the handler never ran, the upcall
mask stayed set and the ticks stopped (kvm_engine._finish_in)."""
from __future__ import annotations

import pytest

from test_redteam_portio import (attack_fixture, res,  # noqa: F401 (fixture, shared test)
                                 test_host_and_bystander_unaffected)

ALL_ENGINES = True


attack = attack_fixture("in_event", "ms=300")


@pytest.mark.parametrize("insn", ["insb", "in"])
def test_every_event_reaches_its_handler_while_polling(res, insn):
    assert res["set_iobitmap"] == "0", res
    # 1 ms period, 300 ms: the ticks are delivered at slice starts (the loop makes no
    # hypercall), dozens of them; lost ones leave the mask set and the count near 0.
    assert int(res[f"{insn}_ticks"]) >= 10, res
    assert (res[f"{insn}_mask_after"], res[f"{insn}_ff"]) == ("0", "1"), res


def test_guest_ends(res):
    assert res["alive"] == "1", res
