"""A page-table frame never gets a writable mapping through a whole-table validation.

The per-entry path (mmu_update of one L1 entry, update_va_mapping, ptwr stores) is exercised
by the hostile guests in test_hostile.py. This file covers the other way an L1 entry is
validated: the whole table at once, when a frame becomes an L1 (MMUEXT_PIN_L1_TABLE, or an
L2 entry hooking it). A hostile guest writes, in one of its own unmapped pages, an entry
naming one of its page tables with _PAGE_RW, then asks for that page to become an L1.

Xen (xen/arch/x86/mm.c): promote_l1_table -> get_page_from_l1e -> get_page_type(page,
PGT_writable_page) fails for a page-table frame -> -EBUSY; the pin (or the L2 update) fails
with it and nothing stays referenced. A read-only entry to the same table, or a writable
entry to a data page, is accepted.

The guest is created paused and never runs: the test writes only what the guest itself can
write (its own pages) and makes the hypercalls the guest would make, through the real
dispatcher (hypercall.call) with guest virtual addresses for every argument.
"""
from __future__ import annotations

import asyncio
import struct

import pytest

from aiovmm import builder, hypercall
from aiovmm.abi import (DOMID_SELF, MMU_NORMAL_PT_UPDATE, PAGE_SHIFT, PTE_FRAME_MASK,
                        Hypercall, MmuExt, _PAGE_PRESENT, _PAGE_RW)
from conftest import guest

EBUSY = -16
_PAGE_USER = 0x004
MMUEXT_OP = struct.Struct("<I4xQQ")           # cmd, arg1 (mfn), arg2
MMU_UPDATE = struct.Struct("<QQ")             # ptr, val


@pytest.fixture
async def paused(hv):
    """A hello.elf domain that never runs, its vCPU, and a scratch VA it can write."""
    dom = await hv.create(guest("hello"), memory_mib=8, name="pt-hostile")
    dom.paused = True                         # before the next await: it never runs
    img = builder.parse_kernel(guest("hello"))
    v = dom.vcpus[0]
    try:
        yield dom, v, img.virt_base           # pfn 0 (mapped read-write) as scratch
    finally:
        dom.crash("test done")
        await asyncio.wait_for(dom.wait(), 10)


def _pin(dom, v, scratch_va: int, cmd: MmuExt, mfn: int) -> int:
    dom.mem.write(_maddr(dom, v, scratch_va), MMUEXT_OP.pack(cmd, mfn, 0))
    return hypercall.call(v, Hypercall.mmuext_op, scratch_va, 1, 0, DOMID_SELF)


def _maddr(dom, v, va: int) -> int:
    return dom.hypervisor.pagetables.translate(v.current_root << PAGE_SHIFT, va, True)


def _unmapped_frame(dom) -> int:
    """The domain's last frame: beyond the bootstrap mapping, so no PTE names it yet."""
    mfn = dom.p2m[-1]
    assert dom.mem.type_count[mfn] == 0 and dom.mem.refs[mfn] == 0
    return mfn


def _tables(dom, v, va: int) -> tuple[int, int]:
    """(L2 frame, L1 frame) of the bootstrap tables that map `va`."""
    mem, l4 = dom.mem, v.current_root
    l3 = (mem.read_u64((l4 << PAGE_SHIFT) + ((va >> 39) & 511) * 8) & PTE_FRAME_MASK) >> PAGE_SHIFT
    l2 = (mem.read_u64((l3 << PAGE_SHIFT) + ((va >> 30) & 511) * 8) & PTE_FRAME_MASK) >> PAGE_SHIFT
    l1 = (mem.read_u64((l2 << PAGE_SHIFT) + ((va >> 21) & 511) * 8) & PTE_FRAME_MASK) >> PAGE_SHIFT
    return l2, l1


def _counts(dom, *mfns: int) -> list[tuple[int, int, int]]:
    return [(dom.mem.type[m], dom.mem.type_count[m], dom.mem.refs[m]) for m in mfns]


@pytest.mark.parametrize("which", ["l4", "l1"])
async def test_pin_l1_with_writable_entry_to_a_page_table_is_ebusy(paused, which):
    dom, v, scratch = paused
    l2, l1 = _tables(dom, v, scratch)
    target = v.current_root if which == "l4" else l1
    cand = _unmapped_frame(dom)
    before = _counts(dom, target, cand)
    dom.mem.write_u64(cand << PAGE_SHIFT, (target << PAGE_SHIFT) | _PAGE_PRESENT | _PAGE_RW)
    assert _pin(dom, v, scratch, MmuExt.PIN_L1_TABLE, cand) == EBUSY
    assert _counts(dom, target, cand) == before          # nothing taken, nothing left
    # Read-only, the same entry is fine (a guest may read its own tables).
    dom.mem.write_u64(cand << PAGE_SHIFT, (target << PAGE_SHIFT) | _PAGE_PRESENT)
    assert _pin(dom, v, scratch, MmuExt.PIN_L1_TABLE, cand) == 0
    assert _pin(dom, v, scratch, MmuExt.UNPIN_TABLE, cand) == 0
    assert _counts(dom, target, cand) == before


async def test_writable_entry_to_a_data_page_pins(paused):
    """The control: a writable entry to an ordinary page of its own is accepted."""
    dom, v, scratch = paused
    data = dom.p2m[-2]
    cand = _unmapped_frame(dom)
    dom.mem.write_u64(cand << PAGE_SHIFT, (data << PAGE_SHIFT) | _PAGE_PRESENT | _PAGE_RW)
    assert _pin(dom, v, scratch, MmuExt.PIN_L1_TABLE, cand) == 0
    assert dom.mem.type_count[cand] == 1 and dom.mem.type_count[data] == 1
    assert _pin(dom, v, scratch, MmuExt.UNPIN_TABLE, cand) == 0
    assert dom.mem.type_count[cand] == 0 and dom.mem.type_count[data] == 0


async def test_l2_entry_hooking_such_an_l1_is_ebusy(paused):
    """The same frame hooked into an empty L2 slot by mmu_update: validated as an L1 on the
    way, refused with -EBUSY; the slot stays empty, the done count 0."""
    dom, v, scratch = paused
    l2, _ = _tables(dom, v, scratch)
    slot = (l2 << PAGE_SHIFT) + 511 * 8
    assert dom.mem.read_u64(slot) == 0
    cand = _unmapped_frame(dom)
    l4 = v.current_root
    before = _counts(dom, l4, cand)
    dom.mem.write_u64(cand << PAGE_SHIFT, (l4 << PAGE_SHIFT) | _PAGE_PRESENT | _PAGE_RW)
    req, done = scratch, scratch + 64
    dom.mem.write(_maddr(dom, v, req), MMU_UPDATE.pack(
        slot | MMU_NORMAL_PT_UPDATE, (cand << PAGE_SHIFT) | _PAGE_PRESENT | _PAGE_RW | _PAGE_USER))
    dom.mem.write(_maddr(dom, v, done), b"\xff" * 4)
    assert hypercall.call(v, Hypercall.mmu_update, req, 1, done, DOMID_SELF) == EBUSY
    assert dom.mem.read_u64(slot) == 0
    assert dom.mem.read(_maddr(dom, v, done), 4) == b"\0\0\0\0"
    assert _counts(dom, l4, cand) == before
