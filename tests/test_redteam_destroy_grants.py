"""Red-team: the preemptible domain teardown (Domain.destroy_preemptible,
PageTables.teardown_domain_steps) against a grantee that keeps mapping, writable, a grant
of the dying domain's page table (guests/hostile/grant_dying_l1.c, both engines, next to a
bystander).

The teardown lets the loop run between its steps. Xen (arch/x86/domain.c
domain_relinquish_resources, relinquish_memory; common/grant_table.c map_grant_ref): a
table's type count stays until the references to it are dropped (roots, pins, then the
tables above it), so a writable grant mapping of it is refused meanwhile; a mapping that
succeeds holds a writable type that nothing else drops. So: the frame table stays
consistent (audit, at every turn of the loop) while the mapper holds whatever it got, the
frame is never handed to another domain while mapped, and the bystander and the host are
unaffected."""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor
from aiovmm.audit import audit
from conftest import HV_MEMORY_MIB, results
from test_hostile import bystander_after, hostile, start_bystander, start_grant_pair

ALL_ENGINES = True


async def _attack(engine: str) -> dict:
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        by, before = await start_bystander(hv)
        g, m = await start_grant_pair(hv, "grant_dying_l1", "l1s=300 delay_ms=1500", "secs=8")
        problems: list[str] = []
        async with asyncio.timeout(120):
            await m.wait_for_line(r"^result trying 1$", timeout=60)
            # Audited at every turn of the loop, through the granter's teardown, until the
            # mapper has held what it got and unmapped it.
            while not m.dying:
                problems += [p for p in audit(hv) if p not in problems]
                await asyncio.sleep(0)
            await m.wait()
        problems += [p for p in audit(hv) if p not in problems]
        same, alive, hello = await bystander_after(hv, by, before)
        return {"granter": list(g.console_lines), "lines": list(m.console_lines),
                "crash": m.crash_reason, "audit": problems[:10],
                "bystander_same": same, "bystander_alive": alive, "hello": hello}


async def test_grant_of_a_dying_table_keeps_the_frame_table_consistent(engine):
    r = await _attack(engine)
    res = results(r["lines"])
    gres = results(r["granter"])
    assert gres.get("hook_g") == "0" and int(gres.get("pinned_l1s", 0)) >= 256, r["granter"]
    assert res.get("map_while_table") == "-1", r["lines"]      # GNTST_general_error
    # Before the fix the mapping was taken in a pause of the teardown and the parent L2's
    # devalidation dropped its writable type: the unmap then met a writable-reference
    # underflow (a hypervisor error that crashed the mapper).
    assert res.get("alive") == "1" and not r["crash"], (r["crash"], r["lines"])
    if res.get("mapped") == "1":
        assert res.get("unmap") == "0", r["lines"]
    assert r["audit"] == [], (r["audit"], res)
    assert r["bystander_same"] and r["bystander_alive"]
    assert any("hello" in l.lower() for l in r["hello"]), r["hello"]


async def test_audit_holds_at_every_step_of_a_teardown(engine):
    """The frame table audited at every turn of the loop while a domain with 300 pinned L1
    tables (and one hooked into its kernel L2) is torn down in slices. Before the fix the
    teardown dropped each table's type at once (count 0), lowest level first, while the
    table above it still referenced it: the audit found type counts that were not the
    number of references (an L1 of type none an L2 points at)."""
    if engine == "kvm":
        pytest.skip("the teardown is the engine's neither way: one engine is enough")
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        g = await hv.create(hostile("grant_dying_l1"), memory_mib=8, name="granter",
                            cmdline="role=granter peer=0 l1s=300 delay_ms=0")
        await g.wait_for_line(r"^result offer ref=\d+$", timeout=60)
        problems: list[str] = []
        turns = 0
        async with asyncio.timeout(120):
            while g.domid in hv.domains:
                if g.destroyed:
                    turns += 1
                    problems += [p for p in audit(hv) if p not in problems]
                await asyncio.sleep(0)
        assert turns > 1, turns                # the teardown did pause
        assert audit(hv) == []
        assert problems == [], problems[:5]
