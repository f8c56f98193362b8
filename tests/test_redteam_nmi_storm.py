"""Red-team: an NMI storm (guests/hostile/nmi_storm.c, vcpus=2): vCPU 1 sends
VCPUOP_send_nmi to vCPU 0 back to back for 2 s while vCPU 0 works and its handler returns
with HYPERVISOR_iret. Xen: each send sets nmi_pending once and kicks; the NMI is taken at the
next return to the guest, masked until the handler's iret. Expected: every send 0, vCPU 0
keeps running and takes NMIs, never nested; the host and a bystander unaffected. (A guard:
nothing was found.)"""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor
from conftest import HV_MEMORY_MIB, results
from test_redteam_portio import HOSTILE, bystander_after, start_bystander

ALL_ENGINES = True


@pytest.fixture(scope="module")
def storm(engine):
    async def main():
        async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
            by, before = await start_bystander(hv)
            dom = await hv.create(HOSTILE.format("nmi_storm"), memory_mib=8,
                                  cmdline="vcpus=2 secs=2", vcpus=2)
            async with asyncio.timeout(120):
                await dom.wait()
            same, alive, _hello = await bystander_after(hv, by, before)
            return list(dom.console_lines), dom.crash_reason, same, alive
    return asyncio.run(main())


def test_nmi_storm_is_coalesced_and_harmless(storm):
    lines, crash, same, alive = storm
    assert not crash and same and alive, lines[-5:]
    r = results(lines)
    assert r.get("alive") == "1" and r.get("send_errors") == "0" and r.get("nested") == "0", r
    assert int(r["sends"]) > 0 and int(r["nmis"]) >= 1 and int(r["work"]) > 0, r
