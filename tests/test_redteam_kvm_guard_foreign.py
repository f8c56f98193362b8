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
# The same checks as there (collected here, on this module's `attack`).
from test_redteam_grant_stale import (_attack, test_access_after_unmap_faults,  # noqa: F401
                                      test_frame_pinned_after_the_unmap_never_changes,
                                      test_host_and_bystander_unaffected, test_mapped_and_unmapped)

pytestmark = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=_kvm_skip_reason() or "")


@pytest.fixture(scope="module")
def attack():
    with pytest.MonkeyPatch.context() as m:
        m.setattr(grants, "_flush", lambda dom: None)      # the unmap's flush missing
        return asyncio.run(_attack("kvm"))

