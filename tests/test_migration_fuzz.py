"""The receiver under a mutated-stream fuzzer (aiovmm/migration/fuzz.py), bounded here;
bench/migrate.py runs it longer. A neighbour guest must keep ticking throughout."""
from __future__ import annotations

import asyncio
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings

from aiovmm import Hypervisor
from aiovmm.migration import fuzz
from conftest import HV_MEMORY_MIB, guest

CASES = int(os.environ.get("AIOVMM_FUZZ_CASES", "60"))


@pytest.mark.parametrize("vcpus", [1, 2])
def test_mutated_streams_never_crash_the_receiver(tmp_path, vcpus):
    """`vcpus=2`: the base stream has vCPU 1's records too (suspend.c smp=1), so mutations
    reach the secondary vCPUs' restore (restore._secondary_vcpus)."""
    async def make() -> bytes:
        async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
            dom = await hv.create(guest("suspend"), memory_mib=4, vcpus=vcpus,
                                  cmdline="pages=8 every=10" + (" smp=1" if vcpus > 1 else ""))
            await dom.wait_for_line(r"uptime: ticks=10 ", 20)
            await dom.save(str(tmp_path / "base.save"))
        return (tmp_path / "base.save").read_bytes()

    data = asyncio.run(make())
    hot = fuzz.hot_offsets(data)
    loop = asyncio.new_event_loop()
    outcomes: dict[str, int] = {}

    async def setup():
        hv = Hypervisor(memory_mib=HV_MEMORY_MIB)
        await hv.__aenter__()
        nb = await hv.create(guest("suspend"), memory_mib=4, cmdline="pages=8 every=10")
        await nb.wait_for_line(r"uptime: ticks=10 ", 20)
        return hv, nb

    hv, nb = loop.run_until_complete(setup())
    try:
        @settings(max_examples=CASES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(fuzz.mutations(data, hot))
        def case(mutated: bytes) -> None:
            r = loop.run_until_complete(fuzz.run_case(hv, mutated))
            outcomes[r] = outcomes.get(r, 0) + 1
            assert not nb.dying, nb.describe_end()

        case()
        n = max(int(m.group(1)) for line in nb.console_lines
                if (m := re.match(r"uptime: ticks=(\d+)", line)))
        loop.run_until_complete(nb.wait_for_line(rf"uptime: ticks={n + 10} ", 10))
        assert outcomes.get("refused", 0) > 0
        # the unmutated stream is accepted by the same receiver
        assert loop.run_until_complete(fuzz.run_case(hv, data)) == "accepted"
    finally:
        loop.run_until_complete(hv.__aexit__(None, None, None))
        loop.close()
