"""Port reads answered in C on the Unicorn engine (csrc/preempt.c aiovmm_in_hook).

guests/tests/privops.c with `pitpoll=1` polls port 0x42 from two INs 1,000 times (as Linux's
quick_pit_calibrate does) under IOPL 1, drops IOPL with PHYSDEVOP_set_iopl and runs the same
two INs 3 more times. The repeats under IOPL must be answered without Python (the C table),
and after set_iopl(0) every IN must #GP again: a table that survived the hypercall would
answer them all ones (pit_poll_noiopl_ones 6, traps 0).
"""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor, ShutdownReason
from conftest import HV_MEMORY_MIB, guest, results


async def _boot_pitpoll() -> tuple[dict[str, str], int, str]:
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine="unicorn") as hv:
        dom = await hv.create(guest("privops"), memory_mib=8, cmdline="pitpoll=1")
        eng = dom.vcpus[0].engine
        assert await asyncio.wait_for(dom.wait(), 120) == ShutdownReason.poweroff, dom.describe_end()
        return results(dom.console_lines), eng.fast_port_reads, eng.slices


def test_pit_poll_answered_in_c_until_iopl_dropped(monkeypatch):
    monkeypatch.setenv("AIOVMM_UNICORN_SLICES", "timer")
    res, fast, slices = asyncio.run(_boot_pitpoll())
    assert slices == "timer"
    assert res.get("privops_done") == "1", res
    assert res.get("pit_poll_ones") == "1000" and res.get("pit_poll_traps") == "0", res
    # One read per slice reaches Python (and one after any other hook): most never do.
    assert fast > 500, fast
    # After set_iopl(0): the same two instructions, each refused at the IN (#GP, the
    # probe's value untouched), none answered from the table.
    assert res.get("pit_poll_noiopl_ones") == "0", res
    assert res.get("pit_poll_noiopl_traps") == "6", res
    # The other port probes keep Xen's answers.
    assert (res.get("in_noiopl_trap"), res.get("in_iopl_trap"), res.get("in_pit_value"),
            res.get("inl_value")) == ("13", "none", "0xff", "0xffffffff"), res


def test_pit_poll_block_hook_slices(monkeypatch):
    """The same table with block-hook slices (AIOVMM_UNICORN_SLICES=hook): the repeats under
    IOPL are answered in C too. (Only up to the IOPL drop: with block-hook slices a refused
    IN inside that loop is reported at the slice's next exit check, not at the IN, and the
    guest's probe never completes: the same before the table existed.)"""
    monkeypatch.setenv("AIOVMM_UNICORN_SLICES", "hook")

    async def main() -> tuple[dict[str, str], int, str]:
        async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine="unicorn") as hv:
            dom = await hv.create(guest("privops"), memory_mib=8, cmdline="pitpoll=1")
            eng = dom.vcpus[0].engine
            try:
                for _ in range(1200):
                    if "pit_poll_traps" in results(dom.console_lines) or dom.done.done():
                        break
                    await asyncio.sleep(0.1)
                return results(dom.console_lines), eng.fast_port_reads, eng.slices
            finally:
                if not dom.done.done():
                    dom.shutdown(ShutdownReason.poweroff)
                await dom.wait()

    res, fast, slices = asyncio.run(main())
    assert slices == "hook"
    assert res.get("pit_poll_ones") == "1000" and res.get("pit_poll_traps") == "0", res
    assert fast > 500, fast
