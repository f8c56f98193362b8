"""Red-team: a guest's string IN (INS) on a port the KVM engine opens in its I/O bitmap (the
PIT), allowed by the guest's virtual IOPL, is answered by the host in the exit's data area and
completed by KVM at the next KVM_RUN: KVM's emulator then stores the data at ES:RDI and moves
RIP past the instruction, with the privilege of whatever CS is loaded at that moment.

If that next KVM_RUN is the engine's own ring-0 shadow-invalidation stub (kvm_engine
_invalidate: it runs whenever the hypervisor changed page tables since the guest's last exit,
e.g. another vCPU's mmu_update, a TLB flush of deferred entries), the guest's store is made at
CPL 0, through supervisor mappings such as the engine's direct map of all machine memory, and
RIP lands on the guest's next instruction with the stub's ring-0 CS: the guest's own code runs
in ring 0 of a VM whose memory is every domain's. Xen (emul-priv-op.c) completes the guest's
INS in the guest's context or delivers its fault; nothing of it ever runs with Xen's privilege.

The trigger here is the real one: an INS exit handled by the engine, then a page-table change
the guard must invalidate at once (an entry reduced without a flush, then a TLB flush as
another vCPU's MMUEXT_TLB_FLUSH_ALL makes it), then the guest's next entry."""
from __future__ import annotations

import pytest

from conftest import _kvm_skip_reason
from hand_vcpu import CODE_VA, DATA_VA, unmap_data_va
from test_kvm import _hand_driven_vcpu, kvm_run_once

pytestmark = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=str(_kvm_skip_reason()))

FLAG_OFF = 0x800                      # in the code page: the CS the code after the INS ran with
BUF_OFF = 0x900                       # in the code page: the INS's destination in the guest
# insb ; mov %cs,%eax ; mov %eax,FLAG(%rip) ; hlt ; jmp .
_CODE = b"\x6c" + b"\x8c\xc8" + b"\x89\x05" + (FLAG_OFF - 9).to_bytes(4, "little") + b"\xf4\xeb\xfe"
REGS = ("rip", "rax", "rcx", "rdx", "rdi", "rflags", "rsp")


def _ins_exit_then_invalidation(hv, dom, v, rdi: int) -> tuple[int, int, int] | None:
    """Run the guest's `insb` from port 0x42 into `rdi` up to its I/O exit and let the engine
    answer it (all ones: the port policy with IOPL 3); then change a page table the way
    another vCPU does (an entry of DATA_VA reduced, then a TLB flush) and enter the guest
    again. Returns the exception that entry ended with as the engine reports it (vector,
    RIP, CR2), or None if it ended otherwise."""
    eng = v.engine
    eng.write({"rip": CODE_VA, "rdi": rdi, "rdx": 0x42, "rcx": 0, "rflags": 0x202})
    assert kvm_run_once(eng, False) == 0
    assert eng.get("rip") == CODE_VA                     # the INS's exit, RIP on it
    assert eng._handle_exit()
    ptr, old = unmap_data_va(hv, dom, v, None)           # DATA_VA read-only: deferred ...
    eng.flush_tlb()                                      # ... until this flush
    seen = []
    on_exc, eng.on_exception = eng.on_exception, lambda vec, err, cr2: seen.append((vec, eng.get("rip"), cr2))
    try:
        if kvm_run_once(eng, False) == 0:
            eng._handle_exit()
        return seen[0] if seen else None
    finally:
        eng.on_exception = on_exc
        hv.pagetables.update_entry(dom.domid, ptr, old)
        from aiovmm import mmu_ops
        mmu_ops.written_all(v)
        eng.flush_tlb()


async def test_ins_completed_by_kvm_never_in_the_invalidation_stub():
    """INS into the guest's own writable page: completed in the guest's context (the page
    gets 0xFF, the next instruction runs with the guest's CS at CPL 3), never in the ring-0
    stub's. INS into a supervisor-only address (the engine's direct map, at the guest's own
    L4, which it may not write): the page table is unchanged and the guest gets the #PF at
    its INS, as a CPL-3 store there gives."""
    async with _hand_driven_vcpu(REGS) as (hv, dom, v):
        eng = v.engine
        saved_code = v.copy_from_guest(CODE_VA, 4096)
        saved_data = v.copy_from_guest(DATA_VA, 4096)
        saved_iopl = v.iopl
        l4 = v.kernel_root << 12
        saved_l4 = bytes(hv.mem.map[l4:l4 + 4096])
        v.copy_to_guest(CODE_VA, _CODE)
        v.iopl = 3
        try:
            # Into the guest's own page (the code page: DATA_VA is the page-table change's).
            v.copy_to_guest(CODE_VA + FLAG_OFF, b"\0" * 4)
            v.copy_to_guest(CODE_VA + BUF_OFF, b"\x3c")
            before = eng.invalidations + eng.zaps
            exc = _ins_exit_then_invalidation(hv, dom, v, CODE_VA + BUF_OFF)
            assert eng.invalidations + eng.zaps > before          # the page-table change was seen
            cs = int.from_bytes(v.copy_from_guest(CODE_VA + FLAG_OFF, 4), "little")
            assert cs & 3 == 3, f"the guest's code ran with CS {cs:#x}"
            assert v.copy_from_guest(CODE_VA + BUF_OFF, 1) == b"\xff"
            assert exc == (13, CODE_VA + 9, 0)                  # its `hlt` at CPL 3: #GP
            # Into the engine's supervisor-only direct map, at an entry of the guest's L4.
            target = l4 + 8 * 300
            v.copy_to_guest(CODE_VA + FLAG_OFF, b"\0" * 4)
            exc = _ins_exit_then_invalidation(hv, dom, v, eng.r0.dmap_va + target)
            assert bytes(hv.mem.map[l4:l4 + 4096]) == saved_l4, "INS stored into a page table"
            cs = int.from_bytes(v.copy_from_guest(CODE_VA + FLAG_OFF, 4), "little")
            assert cs == 0, f"the code after the INS ran with CS {cs:#x}"
            assert exc == (14, CODE_VA, eng.r0.dmap_va + target)  # the #PF of its store
        finally:
            hv.mem.map[l4:l4 + 4096] = saved_l4
            v.iopl = saved_iopl
            v.copy_to_guest(CODE_VA, saved_code)
            v.copy_to_guest(DATA_VA, saved_data)
        assert dom.shutdown_reason is None


async def test_event_bounced_at_a_slice_end_after_an_in_runs_its_handler():
    """The guest polls the PIT with `in` or `insb` (allowed by its I/O bitmap, so every one is
    answered by the host, not by C), each exit completed by KVM at the next entry. A slice
    ends at such an exit; the next one begins by bouncing a pending event (vcpu.run:
    traps.deliver_event). Xen completes the IN before it makes the event's frame: the guest
    must run its event handler. Left to KVM, the completion put RIP back after the IN: the
    frame pushed, events masked, the handler never run. (From guest user mode the bounce
    also loads CR3 and GS, and kvm-pvm then drops the completion, measured; hardware KVM is
    not known to.)"""
    from aiovmm import traps
    from aiovmm.abi import CallbackType, VcpuInfo
    from aiovmm.vcpu_engine import ExitReason
    async with _hand_driven_vcpu(REGS) as (hv, dom, v):
        eng = v.engine
        saved_code = v.copy_from_guest(CODE_VA, 4096)
        saved_data = v.copy_from_guest(DATA_VA, 4096)
        info = v.info_maddr + VcpuInfo.evtchn_upcall_pending
        saved_info = bytes(hv.mem.map[info:info + 2])
        saved_cb, saved_bmp = v.callbacks[CallbackType.event], v.iobmp
        handler = CODE_VA + 0x800
        v.copy_to_guest(handler, b"\xf4\xeb\xfe")               # hlt (#GP at CPL 3) ; jmp .
        v.set_callback(CallbackType.event, (handler, saved_cb[1]))
        v.copy_to_guest(DATA_VA + 0x400, bytes(16))             # I/O bitmap: every port allowed
        v.iobmp = (DATA_VA + 0x400, 0x80)
        seen: list = []

        def on_exc(vec, err, cr2):
            seen.append((vec, eng.get("rip")))
            eng.stop()
        on_exc_saved, eng.on_exception = eng.on_exception, on_exc
        try:
            for code in (b"\xec\xeb\xfd", b"\x6c\x48\xff\xcf\xeb\xfa"):   # in ; insb, dec %rdi
                for _ in range(3):
                    v.copy_to_guest(CODE_VA, code)
                    hv.mem.map[info:info + 2] = b"\0\0"
                    eng.write({"rip": CODE_VA, "rdx": 0x42, "rdi": CODE_VA + 0x900, "rflags": 0x202,
                               "rsp": DATA_VA + 0x800})
                    assert eng.run(0, 2_000_000) is ExitReason.BUDGET and not seen
                    hv.mem.map[info:info + 2] = b"\1\0"             # an event, then the next slice
                    traps.deliver_event(v)
                    assert eng.get("rip") == handler
                    eng.run(0, 20_000_000)
                    assert seen == [(13, handler)], (code.hex(), [(n, hex(r)) for n, r in seen])
                    seen.clear()
        finally:
            eng.on_exception = on_exc_saved
            v.set_callback(CallbackType.event, saved_cb)
            v.iobmp = saved_bmp
            hv.mem.map[info:info + 2] = saved_info
            v.copy_to_guest(CODE_VA, saved_code)
            v.copy_to_guest(DATA_VA, saved_data)
        assert dom.shutdown_reason is None

