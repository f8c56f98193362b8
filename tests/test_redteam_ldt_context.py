"""Red-team: a vCPU context whose CS/SS are selectors of its LDT (VCPUOP_initialise, and the
restore of a secondary vCPU, which goes through the same vcpu_context.set_context).

Xen's arch_set_info_guest takes the context's LDT (base, entries) and its selectors; the LDT
page is mapped on first use through the vCPU's own kernel page tables (pv_map_ldt_shadow_page:
guest_get_eff_kern_l1e), and restore_all_guest's IRETQ loads CS/SS from it. aiovmm checks the
pair as that IRETQ would before the vCPU exists (vcpu_context.start_segments ->
traps._iret_segments -> descriptors._descriptor_address -> ldt_fault), so that LDT page
must be found through the context's CR3. Before the fix it was looked up through the
vCPU's kernel_root before the context's root was assigned (0 for a new vCPU: machine frame 0,
Xen's zero GDT frame, walked as an L4): every LDT CS/SS was refused with -EINVAL (Linux 32-bit
processes of Wine/dosemu run on LDT code segments; such a guest's secondary vCPU could not
be brought up or restored)."""
from __future__ import annotations

import asyncio
import struct

import pytest

from aiovmm import Hypervisor, mmu_ops, vcpu_context
from aiovmm.migration.context import VGCF, VcpuContext
from conftest import HV_MEMORY_MIB, _kvm_skip_reason, kernel

ENGINES = ["unicorn", pytest.param("kvm", marks=pytest.mark.skipif(
    _kvm_skip_reason() is not None, reason=str(_kvm_skip_reason())))]
LDT_VA = 0xFFFFFFFF80400000 - 4096           # a padding page of the boot map (hand_vcpu CODE_VA)
USER_CODE_VA, USER_STACK_TOP = 0x400000, 0x403000
CODE32 = 0x00CFFA000000FFFF                  # 32-bit code, DPL 3, not yet accessed
DATA = 0x00CFF2000000FFFF                    # writable data, DPL 3, not yet accessed
_PAGE_PRESENT, _PAGE_USER, _PAGE_ACCESSED, _PAGE_NX = 1, 4, 0x20, 1 << 63


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("ldt_ss", [False, True], ids=["cs", "cs+ss"])
async def test_context_with_ldt_selectors_enters_through_its_own_ldt(engine, ldt_ss):
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        dom = await hv.create(kernel(), memory_mib=8, vcpus=2, cmdline="ticks=1 spin=0")
        await dom.wait_for_line(r"^spin 1$", timeout=30)
        dom.paused = True
        await asyncio.sleep(0.05)
        v0, v1 = dom.vcpus
        assert not v1.initialised and v1.kernel_root == 0
        mem = hv.mem
        # The guest's LDT page: a frame of its own, mapped read-only in its kernel tables
        # (the guest's own update_va_mapping), holding a 32-bit code and a data segment.
        ldt = mem.alloc(dom.domid)[0]
        dom.frames.add(ldt)
        mem.write_u64((ldt << 12) + 0, CODE32)
        mem.write_u64((ldt << 12) + 8, DATA)
        pte = (ldt << 12) | _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED | _PAGE_NX
        assert mmu_ops.do_update_va_mapping(v0, LDT_VA, pte, 2) == 0       # UVMF_INVLPG
        c = VcpuContext()
        c.flags = 0                                   # user mode (a 32-bit process)
        c.regs = {"rip": USER_CODE_VA, "rsp": USER_STACK_TOP - 64, "rflags": 0x202,
                  "cs": 0x7, "ss": 0xF if ldt_ss else 0xE02B}
        c.ldt_base, c.ldt_ents = LDT_VA, 2
        c.ctrlreg[3] = v0.kernel_root << 12
        c.ctrlreg[1] = v0.user_root << 12
        vcpu_context.set_context(v1, c)            # before the fix: HypercallError(-EINVAL)
        assert v1.initialised and v1.kernel_root == v0.kernel_root
        assert v1.engine.read(("cs", "ss")) == [0x7, 0xF if ldt_ss else 0xE02B]
        # Loaded as the IRETQ loads them: the descriptors marked accessed in the guest's LDT.
        assert mem.read_u64(ldt << 12) == CODE32 | 1 << 40
        if ldt_ss:
            assert mem.read_u64((ldt << 12) + 8) == DATA | 1 << 40
        # The LDT page is the guest's own: it holds a descriptor type reference now.
        assert v1.ldt_shadow == {0: ldt}
