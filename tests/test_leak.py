"""Host memory per domain create/destroy cycle (issue 9 #12): the hypervisor keeps nothing of
a domain once it is gone. bench/leak.py measures the same with and without a vif, longer."""
from __future__ import annotations

import asyncio
import gc
import tracemalloc

from aiovmm import Hypervisor, ShutdownReason

from conftest import HV_MEMORY_MIB, guest

# Before the fix: 3,632 B/cycle (the live xenstore tree remembered every path ever written,
# and a zero node count per dead domain). After: ~50 B/cycle of loop internals.
BOUND_BYTES_PER_CYCLE = 400


async def _cycle(hv: Hypervisor) -> None:
    dom = await hv.create(guest("hello"), memory_mib=8)
    assert await asyncio.wait_for(dom.wait(), 30) == ShutdownReason.poweroff
    async with asyncio.timeout(10):
        while hv.domains:                 # teardown finishes just after dom.wait() returns
            await asyncio.sleep(0.001)


async def test_create_destroy_cycles_keep_no_python_memory():
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
        for _ in range(30):               # warm-up: kernel parse cache, first-use allocations
            await _cycle(hv)
        gc.collect()
        tracemalloc.start(1)
        try:
            before = tracemalloc.get_traced_memory()[0]
            n = 200
            for _ in range(n):
                await _cycle(hv)
            gc.collect()
            per_cycle = (tracemalloc.get_traced_memory()[0] - before) / n
        finally:
            tracemalloc.stop()
        store = hv.xenstore.store
        assert not any(p.startswith("/local/domain/") and p != "/local/domain/0" and p.count("/") == 3
                       for p in store.tree.nodes), "a dead domain's home is still in xenstore"
        assert set(store.tree.counts) <= {0}, store.tree.counts
    assert per_cycle < BOUND_BYTES_PER_CYCLE, f"{per_cycle:.0f} bytes kept per create/destroy cycle"
