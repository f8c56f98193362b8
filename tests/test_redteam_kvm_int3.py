"""Red-team: an int3 that trapped on KVM is delivered, whatever memory holds by then.

traps._stale_int3 exists for the Unicorn engine, whose vCPUs run their own translated code
that another vCPU's rewrite does not invalidate: there an int3 "executed" from stale
translations is not one the hardware would have taken, so it is dropped and the
instruction re-run from memory. On KVM the int3 is the CPU's own trap: as Xen's do_int3
(xen/arch/x86/traps.c), a hardware #BP goes to the guest's trap 3 with RIP past the int3,
and memory is never read again. Applying the Unicorn rule there left Debian's 2-vCPU Linux
with an "invalid opcode" at the second byte of a jump-label NOP that text_poke_bp was
patching (the int3 at its first byte neither delivered nor re-run).

Deterministic here without a second running vCPU: the code page at CODE_VA holds `int3`
and the vCPU's translation of it is kept while its L1 entry is switched (mmu_update, no
flush: Xen's TLB keeps the old translation too) to a frame holding a NOP there, so memory
as the hypervisor reads it no longer has the int3 the CPU ran. The domain has two vCPUs
(the second never brought up), the condition of the Unicorn rule."""
from __future__ import annotations

import pytest

from aiovmm import mmu_ops
from hand_vcpu import CODE_VA, DATA_VA, hand_driven_vcpu, kick_loop
from test_redteam_ptwr_rep import ENGINES

KVM = [p for p in ENGINES if getattr(p, "values", (p,))[0] == "kvm"]
REGS = ("rip", "rsp", "rflags", "rax")


@pytest.mark.parametrize("engine", KVM)
async def test_hardware_int3_is_delivered_though_memory_changed(engine):
    async with hand_driven_vcpu(REGS, engine, vcpus=2) as (hv, dom, v):
        eng, pt, mem = v.engine, hv.pagetables, hv.mem
        _flags, _cs, handler = v.trap_table[3]
        assert handler, "the test kernel registers no trap 3 handler"
        # CODE_VA: int3, then `jmp .`; DATA_VA's frame: the same with a NOP for the int3.
        v.copy_to_guest(CODE_VA, b"\xcc\xeb\xfe")
        v.copy_to_guest(DATA_VA, b"\x90\xeb\xfe")
        delivered = []
        on_exc = eng.on_exception

        def spy(vec, err, cr2):
            on_exc(vec, err, cr2)
            delivered.append((vec, eng.get("rip")))
            eng.stop()
        eng.on_exception = spy
        try:
            eng.write({"rip": CODE_VA})
            eng.run(1, 50_000_000)                   # the int3 runs: its translation cached
            assert delivered and delivered[0] == (3, handler), [(a, hex(b)) for a, b in delivered]
            delivered.clear()
            ptr = pt.l1_entry_address(v.kernel_root, CODE_VA)
            old = mem.read_u64(ptr)
            data = mem.read_u64(pt.l1_entry_address(v.kernel_root, DATA_VA))
            assert pt.update_entry(dom.domid, ptr, (old & 0xFFF) | (data & ~0xFFF & ((1 << 52) - 1)))
            mmu_ops.written_all(v)                   # no flush: the old translation stays
            assert v.copy_from_guest(CODE_VA, 1) == b"\x90"
            eng.write({"rip": CODE_VA})
            eng.run(1, 50_000_000)
            rip = eng.get("rip")
            assert delivered[:1] == [(3, handler)], ([(a, hex(b)) for a, b in delivered], hex(rip))
            pt.update_entry(dom.domid, ptr, old)
            eng.flush_tlb()
        finally:
            eng.on_exception = on_exc


@pytest.mark.parametrize("engine", KVM)
async def test_a_kick_after_the_int3_never_loses_it(engine):
    """Slices of 30 us over `int3` at CODE_VA (each one reported puts RIP back there): a
    slice must never end with the vCPU past the int3 and the trap unreported. kvm-pvm can
    hold the #BP invisibly when the slice's kick comes after the trap (KVM_GET_VCPU_EVENTS
    shows nothing); a register write before the next entry, as an event bounced at the
    slice's start, then loses it or delivers it at the bounced RIP (measured: ~3% of the
    slice ends without the settle of kvm_engine._past_software_trap)."""
    async with hand_driven_vcpu(REGS, engine, vcpus=2) as (hv, dom, v):
        eng = v.engine
        v.copy_to_guest(CODE_VA, b"\xcc\xeb\xfd")              # int3; jmp CODE_VA
        hits = []
        on_exc = eng.on_exception

        def reported(vec, err, cr2):
            hits.append((vec, eng.get("rip")))
            eng.write({"rip": CODE_VA})
        eng.on_exception = reported
        try:
            ends, past = kick_loop(eng, {"rip": CODE_VA}, 3, 40000)
        finally:
            eng.on_exception = on_exc
        assert hits and all(h == (3, CODE_VA + 1) for h in hits), hits[:5]
        assert not past, f"{len(past)} of {ends} slices ended past an unreported int3: {past[:3]}"
