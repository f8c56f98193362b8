"""Red-team: the KVM engine's SYSCALL MSRs. SYSCALL from compatibility mode (a guest far-jumps
to FLAT_RING3_CS32, which Xen's GDT gives every PV guest) enters at MSR_CSTAR, not LSTAR. On
hardware KVM (AMD: SYSCALL is valid in compatibility mode) it enters ring 0 of the VM with
CS = STAR[47:32] and RIP = CSTAR; with CSTAR left at 0 that is the guest's own code at VA 0,
in ring 0 of a VM whose memory slot is all machine memory: it could load any CR3 and write
every domain's frames. Xen's cstar entry sends a 64-bit PV guest's compat SYSCALL to the same
place as a 64-bit one (switch_to_kernel) but to its syscall32 callback: CSTAR is the engine's
own compat entry (in its supervisor-only stubs page). kvm-pvm (this machine) refuses compat
SYSCALL (kvm_engine._PVM_VENDOR; test_redteam_iret_cs.py runs it), so the test checks what the
engine programs.
"""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor
from aiovmm.kvm_engine import MSR_CSTAR, MSR_LSTAR, ring0
from conftest import HV_MEMORY_MIB, _kvm_skip_reason, kernel

pytestmark = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=_kvm_skip_reason() or "")


def test_compat_syscall_entry_is_the_engines():
    async def main():
        async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine="kvm") as hv:
            dom = await hv.create(kernel(), memory_mib=8, cmdline="ticks=1 spin=0")
            await dom.wait_for_line(r"^spin 1$", timeout=30)
            eng = dom.vcpus[0].engine
            r0 = ring0(hv.xen)
            assert eng.get_msr(MSR_LSTAR) == r0.syscall_va
            assert eng.get_msr(MSR_CSTAR) == r0.syscall32_va
            dom.destroy_requested = True
    asyncio.run(main())
