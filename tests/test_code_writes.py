"""Bytes the hypervisor writes into a page of code a guest has run are what runs next
(guests/hostile/code_write.c). On Xen the CPU runs the bytes in memory; an emulated vCPU runs
its translations of the bytes it saw, which QEMU drops only on the vCPU's own stores, so every
host write into guest frames (grants.frame_written) drops them: a grant copy into a code page,
a backend's copy (grants.host_copy_to, as blkback reading a program into a page the guest ran
code from before). The guest's own store is the control."""
from __future__ import annotations

import asyncio
import re

import pytest

from aiovmm import Hypervisor, ShutdownReason
from aiovmm.grants import host_copy_to
from conftest import BUILD, ENGINES, HV_MEMORY_MIB, results

pytestmark = ENGINES
ELF = str(BUILD / "hostile" / "code_write.elf")


async def test_grant_copy_into_code_runs_the_new_bytes(engine):
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        d = await hv.create(ELF, memory_mib=8, cmdline="how=copy")
        async with asyncio.timeout(30):
            reason = await d.wait()
        res = results(list(d.console_lines))
    assert reason == ShutdownReason.poweroff, d.console_lines
    assert res["first"] == "1" and res["copy_status"] == "0", res
    assert res["after_copy"] == "2", res          # the copied `mov eax, 2` ran
    assert res["after_store"] == "4", res


async def test_backend_copy_into_code_runs_the_new_bytes(engine):
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        d = await hv.create(ELF, memory_mib=8, cmdline="how=host")
        line = await d.wait_for_line(r"code_write: ref code=\d+ flag=\d+", 30)
        m = re.search(r"code=(\d+) flag=(\d+)", line)
        code_ref, flag_ref = int(m.group(1)), int(m.group(2))
        host_copy_to(d, code_ref, 0, bytes([0xB8, 0x39, 0x05, 0, 0, 0xC3]))   # mov eax, 1337; ret
        res = await host_wrote(d, flag_ref)
    assert res["after_host"] == "1337", res


async def host_wrote(d, flag_ref: int) -> dict[str, str]:
    """how=host: tell the guest (its flag grant) that the host has written its code page, and
    return its results once it has powered off (it ran, and its own store is the control)."""
    host_copy_to(d, flag_ref, 0, (1).to_bytes(8, "little"))
    async with asyncio.timeout(30):
        reason = await d.wait()
    res = results(list(d.console_lines))
    assert reason == ShutdownReason.poweroff, d.console_lines
    assert res["first"] == "1" and res["host_flag"] == "1", res
    assert res["after_store"] == "4", res
    return res
