"""Red-team: the idle release of a Unicorn vCPU's translator memory (aiovmm/tcg_memory.py,
vcpu.py _sleep) against cross-vCPU self-modifying code.

A store that hits translated code is seen only by the Unicorn instance that translated it
(QEMU's per-instance code-page tracking); vcpu.py tells the domain's other vCPUs to drop
their translations when the writer's instance counted one. A writer whose translations
were released while it slept has none left to hit: its store into code the other vCPU is
still running went unnoticed, and that vCPU ran its stale translation (as if the code had
never changed). guests/tests/smp.c idle_patch=1: both vCPUs run the code, vCPU 0 sleeps
2.5 s (past IDLE_RELEASE_S) while vCPU 1 keeps running, then vCPU 0 rewrites it: vCPU 1
must run the new code. On both engines (KVM has no translations to go stale).
"""
from __future__ import annotations

import asyncio

from aiovmm import Hypervisor, ShutdownReason
from conftest import ENGINES, HV_MEMORY_MIB, guest, results

pytestmark = ENGINES


async def test_writer_released_while_asleep_still_invalidates(engine):
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        dom = await hv.create(guest("smp"), memory_mib=8, cmdline="vcpus=2 idle_patch=1", vcpus=2)
        async with asyncio.timeout(180):
            reason = await dom.wait()
    got = results(dom.console_lines)
    assert reason == ShutdownReason.poweroff, dom.console_lines[-5:]
    assert (got.get("smc_self"), got.get("smc_other_before"), got.get("smc_other_after")) == ("1", "1", "2")
