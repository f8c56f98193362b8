"""Red-team: the vector state a save/restore carries where the PV CPUID offers XSAVE and AVX
(kvm-pvm: the guest's CPL-3 code runs with the host's XCR0, aiovmm/cpuid.py Xstate). Xen
saves each vCPU's XSAVE area (X86_PV_VCPU_XSAVE: xcr0, xcr0_accum, the area) and restores it,
so a guest's ymm registers come back whole (guests/hostile/ymm_save.c)."""
from __future__ import annotations

import pytest

from aiovmm import Hypervisor
from conftest import HV_MEMORY_MIB, results

ALL_ENGINES = True
GUEST = "guests/build/hostile/ymm_save.elf"


async def test_ymm_registers_survive_save_restore(engine, tmp_path, request):
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        dom = await hv.create(GUEST, memory_mib=8)
        await dom.wait_for_line(r"^ymm: ready$", 30)
        offered = results(dom.console_lines)["offered"]
        path = str(tmp_path / "ymm.save")
        await dom.save(path)
        new = await hv.restore(path)
        await new.wait()
        res = results(new.console_lines)
        assert res.get("ymm_low_ok") == "1", new.console_lines[-5:]
        if offered == "1":                   # X86_PV_VCPU_XSAVE records carry the upper halves
            assert res.get("ymm_high_ok") == "1", new.console_lines[-5:]
