"""Red-team: another domain's vector registers (guests/hostile/ymm_spy.c), on both engines.

Where AVX is offered (kvm-pvm) a guest's CPL-3 code runs with all ymm state live; two
domains share the loop thread that runs every vCPU. A writer fills ymm0-15 with a pattern, a
reader clears them, both yield to each other for 3 s and compare after each yield. Xen
switches each vCPU's whole XSAVE state: the reader never sees the pattern and neither sees
its registers change."""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor
from conftest import HV_MEMORY_MIB, results

ALL_ENGINES = True
GUEST = "guests/build/hostile/ymm_spy.elf"


async def _pair(engine: str) -> tuple[dict, dict]:
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        w = await hv.create(GUEST, memory_mib=8, name="writer", cmdline="role=writer secs=3")
        await w.wait_for_line(r"^ymm_spy: writer ready$", 30)
        r = await hv.create(GUEST, memory_mib=8, name="reader", cmdline="role=reader secs=3")
        async with asyncio.timeout(60):
            await asyncio.gather(w.wait(), r.wait())
        return results(w.console_lines), results(r.console_lines)


@pytest.fixture(scope="module")
def pair(engine):
    return asyncio.run(_pair(engine))


def test_no_vector_state_crosses_domains(pair):
    w, r = pair
    assert int(w["rounds"]) >= 50 and int(r["rounds"]) >= 50, (w, r)
    assert (w["changed"], r["changed"], r["foreign"]) == ("0", "0", "0"), (w, r)
