"""Red-team: a grant mapping used after its unmap through a cached translation (Unicorn's
TLB, the KVM engine's shadow tables whose invalidation is otherwise deferred to the guest's
flush) while the granter makes the frame a page table (guests/hostile/grant_stale.c, both
engines, next to a bystander).

Xen (common/grant_table.c unmap_common, gnttab_flush_tlb): the unmap flushes the grantee's
TLB before the hypercall returns, so the next access through the VA is #PF and the frame,
pinned as an L1 by its owner at once, never changes."""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor
from conftest import HV_MEMORY_MIB, results
from test_hostile import bystander_after, start_bystander, start_grant_pair

ALL_ENGINES = True


async def _attack(engine: str) -> dict:
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        by, before = await start_bystander(hv)
        g, m = await start_grant_pair(hv, "grant_stale", "hold_ms=1500", "ms=1000")
        async with asyncio.timeout(120):
            await g.wait()
            await m.wait()
        same, alive, hello = await bystander_after(hv, by, before)
        return {"g": results(g.console_lines), "m": results(m.console_lines),
                "crash": (g.crash_reason, m.crash_reason), "bystander": (same, alive),
                "hello": hello, "lines": list(m.console_lines)}


@pytest.fixture(scope="module")
def attack(engine):
    return asyncio.run(_attack(engine))


def test_mapped_and_unmapped(attack):
    m = attack["m"]
    assert (m.get("map"), m.get("mapped_reads_pattern"), m.get("unmap")) == ("0", "1", "0"), attack


def test_access_after_unmap_faults(attack):
    m = attack["m"]
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
