"""Red team: self-modifying code through an alias mapping of the code's frame
(guests/hostile/code_alias.c). Xen runs the bytes in memory, so the next call after a store
through any mapping runs the new bytes. The patched Unicorn (csrc/unicorn/README.md) puts a
TLB entry on the store slow path (the self-modifying-code check) only while its page holds
translated code, and puts every entry of this vCPU mapping a page back on it by host address
when the page gets its first block: a store through an alias filled before, between and after
translation, data stores beside the code, a rewrite alternating between two aliases and the
page itself, and an instruction straddling two frames rewritten through the second frame's
alias alone. Both engines (KVM runs the bytes in memory: the reference)."""
from __future__ import annotations

import asyncio

from aiovmm import Hypervisor, ShutdownReason
from conftest import BUILD, ENGINES, HV_MEMORY_MIB, results

pytestmark = ENGINES
ELF = str(BUILD / "hostile" / "code_alias.elf")


async def test_code_rewritten_through_an_alias_runs_the_new_bytes(engine):
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        d = await hv.create(ELF, memory_mib=8)
        async with asyncio.timeout(60):
            reason = await d.wait()
        res = results(list(d.console_lines))
    assert reason == ShutdownReason.poweroff, d.console_lines[-5:]
    assert res["alias_first"] == "1", res
    assert res["alias_after"] == "2", res
    assert res["data_then_code"] == "3" and res["data_bad"] == "0", res
    assert res["loop_bad"] == "0", res
    assert res["straddle_first"] == str(0x11223344), res
    assert res["straddle"] == str(0x55667788), res
