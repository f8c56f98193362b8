"""Helpers for tests (and benches) that drive a vCPU by hand: the project's kernel booted and
paused between slices, one instruction stepped at a time, and a read-only page of its boot
map. Shared by the Unicorn and KVM engine tests so that both pause, restore and probe the
vCPU the same way."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from aiovmm import Hypervisor, mmu_ops
from aiovmm.memory import PageType
from aiovmm.mmu import GuestFault
from conftest import HV_MEMORY_MIB, kernel

DATA_VA = 0xFFFFFFFF80400000 - 2 * 4096           # padding pages of the boot map
CODE_VA = 0xFFFFFFFF80400000 - 4096
_RW = 0x2


@contextlib.asynccontextmanager
async def hand_driven_vcpu(regs: tuple[str, ...], engine: str,
                           timeout: float = 30, vcpus: int = 1) -> AsyncIterator[tuple]:
    """The project's kernel on `engine`, paused while its vCPU task is parked between slices
    so that a test can drive the vCPU by hand: yields (hv, dom, vcpu 0). Afterwards (when the
    test passed) the registers `regs` are put back and the guest must run on to its third
    line, so a test that left the vCPU broken fails here. `vcpus`: the domain's count (the
    kernel brings up only vCPU 0; the others exist, as for an SMP domain's rules)."""
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        dom = await hv.create(kernel(), memory_mib=8, cmdline="ticks=1 spin=0",
                                vcpus=vcpus)
        await dom.wait_for_line(r"^spin 1$", timeout=timeout)
        dom.paused = True
        await asyncio.sleep(0.05)
        v = dom.vcpus[0]
        saved = v.engine.read(regs)
        yield hv, dom, v
        v.engine.write(dict(zip(regs, saved)))
        dom.paused = False
        v.wake()
        await dom.wait_for_line(r"^spin 3$", timeout=timeout)


def kick_loop(eng, regs: dict, seconds: float, max_ends: int) -> tuple[int, list[str]]:
    """Slices of 30 us from CODE_VA with `regs` (RIP included) until `seconds` or `max_ends`
    slice ends: (slice ends, the RIPs of those that ended anywhere but CODE_VA, whence the
    next one starts again with `regs`). For code that traps or faults at CODE_VA forever,
    its exception handler putting `regs` back: a slice-end kick must never lose a trap."""
    eng.write(regs)
    t0 = time.monotonic()
    ends, past = 0, []
    while time.monotonic() - t0 < seconds and ends < max_ends:
        eng.run(1, 30_000)
        ends += 1
        if eng.get("rip") != CODE_VA:
            past.append(hex(eng.get("rip")))
            eng.write(regs)
    return ends, past


def step_access(v, store: bool) -> tuple[list, int]:
    """Step one `movabs` load (or store of RAX) at DATA_VA from CODE_VA: (faults, RAX)."""
    eng = v.engine
    op = b"\x48\xa3" if store else b"\x48\xa1"
    v.copy_to_guest(CODE_VA, op + DATA_VA.to_bytes(8, "little") + b"\xeb\xfe")
    faults = []
    on_exc, eng.on_exception = eng.on_exception, lambda vec, err, cr2: (faults.append((vec, cr2)), eng.stop())
    try:
        eng.write({"rip": CODE_VA, "rax": 0x77 if store else 0})
        eng.step_to(CODE_VA + 10)
    finally:
        eng.on_exception = on_exc
    return faults, eng.get("rax")


def read_only_boot_page(hv: Hypervisor, root: int) -> int:
    """The first page of the kernel's boot map (from 0xFFFFFFFF80000000, under page-table
    root `root`, a machine address) that is mapped readable but not writable: one of the
    guest's own page tables."""
    for i in range(4096):
        va = 0xFFFFFFFF80000000 + i * 4096
        try:
            hv.pagetables.translate(root, va, False)
        except GuestFault:
            continue
        try:
            hv.pagetables.translate(root, va, True)
        except GuestFault:
            return va
    raise AssertionError("no read-only page in the boot map")


def unmap_data_va(hv: Hypervisor, dom, v, new: int | None) -> tuple[int, int]:
    """What mmu_update does with one entry for DATA_VA (0 = unmap, None = clear RW, or
    `new`): the checked write, then the engines told (mmu_ops.written_all), no flush.
    Returns (entry address, old entry)."""
    pt, mem = hv.pagetables, hv.mem
    ptr = pt.l1_entry_address(v.kernel_root, DATA_VA)
    old = mem.read_u64(ptr)
    assert pt.update_entry(dom.domid, ptr, old & ~_RW if new is None else new)
    mmu_ops.written_all(v)
    return ptr, old


def check_freed_frame_unreachable(hv: Hypervisor, dom, v, monkeypatch) -> None:
    """The attack of both engines' TLB tests: DATA_VA unmapped with no flush (its stale
    translation still used), then its frame freed (it may go to another domain): the next
    access must fault. MADV_REMOVE is made to fail, so the frame keeps its bytes and a
    stale read would see them."""
    eng, pt, mem = v.engine, hv.pagetables, hv.mem
    monkeypatch.setattr(mem, "_discard", lambda frames: None)
    frame = pt.translate(v.kernel_root << 12, DATA_VA, False) >> 12
    mem.write_u64(frame << 12, 0x5A5A5A5A)
    assert step_access(v, False) == ([], 0x5A5A5A5A)
    ptr, old = unmap_data_va(hv, dom, v, 0)
    assert step_access(v, False) == ([], 0x5A5A5A5A)    # the guest runs on: not flushed
    assert not mem.in_use(frame)
    mem.free([frame])                                  # no guest flush in between
    assert step_access(v, False) == ([(14, DATA_VA)], 0)
    assert mem.alloc(dom.domid) == [frame]             # back, for the guest to go on
    pt.update_entry(dom.domid, ptr, old)
    eng.flush_tlb()


def check_pinned_l1_not_writable(hv: Hypervisor, dom, v, frame: int, ptr: int, old: int) -> None:
    """The end of the write-protect attack of both engines' TLB tests: DATA_VA's `frame`
    (entry at `ptr`, write-protected without a flush) is made an empty L1 and typed as one;
    a store through the stale writable translation must fault and leave it empty. Then the
    entry `old` is put back."""
    eng, pt, mem = v.engine, hv.pagetables, hv.mem
    mem.zero(frame)                                    # an empty L1
    pt.get_type(frame, PageType.l1, dom.domid)         # pinned as a page table
    try:
        faults, _ = step_access(v, True)
        assert faults == [(14, DATA_VA)]
        assert mem.read_u64(frame << 12) == 0
    finally:
        pt.put_type(frame)
    pt.update_entry(dom.domid, ptr, old)
    eng.flush_tlb()


@contextlib.contextmanager
def no_event_callback(v):
    """No event callback registered meanwhile: after a hypercall the KVM engine completed in
    C with an event deliverable, C then leaves the upcall to Python (rc 4: csrc/kvm.c
    fast_upcall), whose tail has none to bounce. For tests of the hypercall's own result
    with an event pending (the registers as it left them, before the guest runs); the
    upcall itself: tests/test_kvm_upcall.py."""
    from aiovmm.abi import CallbackType
    cb = v.callbacks.get(CallbackType.event)
    v.set_callback(CallbackType.event, None)
    try:
        yield
    finally:
        v.set_callback(CallbackType.event, cb)
