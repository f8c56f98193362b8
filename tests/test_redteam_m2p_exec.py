"""Red-team (KVM): a guest jumps into Xen's read-only M2P (an NMI or trap handler, or any
jump, at MACH2PHYS_VIRT_START + x: canonical, so set_trap_table and CALLBACKTYPE_nmi take
it). Xen maps the M2P to PV guests read-only and not executable: the fetch is the guest's
#PF (instruction fetch) at that RIP. kvm-pvm reserves the slot for itself and reports every
access there as a #PF; kvm_engine._emulate_m2p_read performs the guest's *loads* from it. The
M2P's bytes are the guest's to choose (MMU_MACHPHYS_UPDATE of its own frames): found, the
fetch fault was taken for a load and the M2P's bytes run as a `mov` (the register loaded,
RIP moved on), code in Xen's area."""
from __future__ import annotations

from aiovmm.abi import MACH2PHYS_VIRT_START
from hand_vcpu import hand_driven_vcpu
from test_redteam_iret_cs import KVM_ONLY, REGS, _run_kvm_exit


@KVM_ONLY
async def test_code_in_the_m2p_is_an_instruction_fetch_fault():
    async with hand_driven_vcpu(REGS, "kvm") as (hv, dom, v):
        eng = v.engine
        off = eng.r0.m2p_bytes - 64                 # an entry no frame of this host has
        ma = eng.r0.m2p_maddr + off
        saved = bytes(hv.mem.map[ma:ma + 16])
        hv.mem.map[ma:ma + 16] = b"\x48\x8b\x04\x25\x00\x00\x00\x00" + b"\xeb\xfe" * 4
        seen, on_exception = [], eng.on_exception
        eng.on_exception = lambda vec, err, cr2: (seen.append((vec, err, cr2)), eng.stop())
        rip = MACH2PHYS_VIRT_START + off
        try:
            eng.write({"rip": rip, "rax": 0x5A})
            for _ in range(4):
                _run_kvm_exit(v, False)
                if seen or eng.get("rip") != rip:
                    break
            assert (eng.get("rip"), eng.get("rax")) == (rip, 0x5A), "the M2P's bytes ran"
            assert seen and seen[0][0] == 14 and seen[0][2] == rip, seen
            assert seen[0][1] & 0x1B == 0x11, f"not a present-page fetch #PF: {seen[0][1]:#x}"
        finally:
            hv.mem.map[ma:ma + 16] = saved
            eng.on_exception = on_exception
