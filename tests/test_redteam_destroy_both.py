"""Red-team: two teardowns interleaved in their pauses (Domain.destroy_preemptible): the
granter of guests/hostile/grant_dying_l1.c (300 pinned L1 tables, one hooked into its kernel
L2 and granted read-write) is torn down in steps while its mapper, still trying to map the
grant writable, is shut down in the middle of that teardown and torn down too; a third
domain is created while both are half torn down. Both engines, next to a bystander.

Xen (arch/x86/domain.c domain_relinquish_resources, common/grant_table.c gnttab_release_mappings):
each dying domain drops its own references only (the mapper its maptrack, the granter its
tables), in any interleaving, so the frame table stays consistent at every turn of the loop
(audit), the new domain gets no frame either dying domain still holds, and once both are
gone every frame is free again exactly once."""
from __future__ import annotations

import asyncio

from aiovmm import Hypervisor
from aiovmm.audit import audit
from aiovmm.domain import ShutdownReason
from conftest import HV_MEMORY_MIB
from test_hostile import bystander_after, guest, start_bystander, start_grant_pair

ALL_ENGINES = True


async def test_granter_and_mapper_torn_down_interleaved(engine):
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        by, before = await start_bystander(hv)
        free0 = hv.mem.free_frames
        g, m = await start_grant_pair(hv, "grant_dying_l1", "l1s=300 delay_ms=60000", "secs=30")
        problems: list[str] = []
        overlap = 0
        c = None
        async with asyncio.timeout(120):
            await m.wait_for_line(r"^result trying 1$", timeout=60)
            # Both die in the same turn: their teardowns (each in its own task, in slices)
            # interleave, the mapper's maptrack released while the granter's tables go.
            g.shutdown(ShutdownReason.poweroff)
            m.shutdown(ShutdownReason.poweroff)
            while g.domid in hv.domains or m.domid in hv.domains:
                if (g.destroyed and g.frames) or (m.destroyed and m.frames):
                    overlap += g.destroyed and m.destroyed and bool(g.frames) and bool(m.frames)
                    if c is None:
                        c = await hv.create(guest("hello"), memory_mib=8, name="c")
                        held = set(g.frames) | set(m.frames)
                        assert not set(c.frames) & held
                        assert all(hv.mem.owner[f] == c.domid for f in c.frames)
                problems += [p for p in audit(hv) if p not in problems]
                await asyncio.sleep(0)
            if c is not None:
                assert await asyncio.wait_for(c.wait(), 30) == ShutdownReason.poweroff
                while c.domid in hv.domains:
                    await asyncio.sleep(0.001)
        problems += [p for p in audit(hv) if p not in problems]
        assert c is not None                    # a teardown did pause
        assert problems == [], (problems[:5], overlap)
        assert not hv.pagetables.teardowns and not hv.orphan_frames
        assert hv.mem.free_frames == free0
        same, alive, hello = await bystander_after(hv, by, before)
        assert same and alive
        assert any("hello" in l.lower() for l in hello), hello
