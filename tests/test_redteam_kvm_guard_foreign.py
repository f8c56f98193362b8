"""Red-team: the KVM shadow guard's owner split on its own (kvm_engine._ShadowGuard). The
guard defers a removed L1 entry until the guest's flush only if it named a frame of the
table's own domain; one that named another domain's frame (a grant mapping) is forgotten
before the next KVM_RUN. Every path that removes such an entry flushes as well today (the
grant unmap, as Xen's gnttab_flush_tlb; ptwr's scratch), so that split only shows when a
flush is missing: here the grant unmap's is taken out and guests/hostile/grant_stale.c
(test_redteam_grant_stale.py's attack, next to the bystander) runs on the KVM engine. The
mapper's load and store after its unmap must still fault and the granter's frame, pinned
as an L1 at once, never change. (The Unicorn engine's soft TLB has no such split: it
relies on the flush, test_redteam_grant_stale.py.)"""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import grants
from conftest import _kvm_skip_reason
from test_redteam_grant_stale import _attack

pytestmark = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=_kvm_skip_reason() or "")


@pytest.fixture(scope="module")
def attack():
    with pytest.MonkeyPatch.context() as m:
        m.setattr(grants, "_flush", lambda dom: None)      # the unmap's flush missing
        return asyncio.run(_attack("kvm"))


def test_access_after_an_unflushed_unmap_faults(attack):
    m = attack["m"]
    assert (m.get("map"), m.get("mapped_reads_pattern"), m.get("unmap")) == ("0", "1", "0"), attack
    assert (m.get("load_after_unmap"), m.get("store_after_unmap"), m.get("stores_landed")) == ("14", "14", "0"), attack


def test_frame_pinned_after_the_unmap_never_changes(attack):
    g = attack["g"]
    assert (g.get("peer_mapped"), g.get("peer_unmapped"), g.get("pin_after_unmap")) == ("1", "1", "0"), attack
    assert (g.get("f_changed"), g.get("unpin"), g.get("end_access")) == ("0", "0", "1"), attack


def test_host_and_bystander_unaffected(attack):
    assert attack["crash"] == (None, None) or attack["crash"] == ("", ""), attack["crash"]
    assert attack["bystander"] == (True, True)
    assert attack["g"].get("alive") == "1" and attack["m"].get("alive") == "1", attack
    assert any("hello" in l.lower() for l in attack["hello"]), attack["hello"]
