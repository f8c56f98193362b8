"""Every walker of a guest's page tables follows one rule (aiovmm/mmu.py `walk`, Xen's
guest_walk_tables for a PV vCPU): the rule itself, PageTables.translate (guest buffers: the
rule behind access_ok), the KVM engine's _walk_va (the instruction and descriptor bytes it
reads) and csrc/kvm.c guest_maddr (the engine's C fast paths) give the same machine address,
or all refuse, for random 4-level tables written into a real domain's frames and random
addresses and access kinds. The expected result comes from a model written here after
guest_walk_tables' own structure (translation first: present and no reserved bit at each
level; then the rights accumulated over the levels), not from the code under test."""
from __future__ import annotations

import ctypes
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from aiovmm import kvm_engine
from aiovmm.abi import (DOMID_INVALID, DOMID_XEN, HYPERVISOR_VIRT_END, HYPERVISOR_VIRT_START, PTE_FRAME_MASK,
                        _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_GLOBAL, _PAGE_NX, _PAGE_PRESENT, _PAGE_PSE, _PAGE_RW,
                        _PAGE_USER)
from aiovmm.cpuid import PADDR_BITS
from aiovmm.mmu import NO_MADDR, PFEC_FETCH, PFEC_USER, PFEC_WRITE, GuestFault, walk
from conftest import _kvm_skip_reason
from hand_vcpu import hand_driven_vcpu

pytestmark = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=_kvm_skip_reason() or "")

SLOTS = (0, 1, 255, 256, 511)          # table indices the probes use (256: Xen's L4 slot)
N_TABLES = 6
KINDS = [u | w | f for u in (0, PFEC_USER) for w in (0, PFEC_WRITE) for f in (0, PFEC_FETCH)
         if not (w and f)]
GOOD = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED
# What may be wrong with one entry: each toggles one thing the rule looks at, or one it
# must ignore (A/D, G, the software bits 9-11 and 52-62).
TOGGLES = {"not present": -_PAGE_PRESENT, "read-only": -_PAGE_RW, "supervisor": -_PAGE_USER,
           "pse": _PAGE_PSE, "nx": _PAGE_NX, "rsvd": 1 << PADDR_BITS, "rsvd51": 1 << 51,
           "dirty": _PAGE_DIRTY, "global": _PAGE_GLOBAL, "avl": 0xE00, "high avl": 0x7FF0000000000000,
           "not accessed": -_PAGE_ACCESSED}


def xen_walk(mem, cr3: int, va: int, pfec: int) -> int | None:
    """guest_walk_tables for a 4-level PV vCPU (EFER.NX, CR0.WP, no SMEP/SMAP/PKU) over
    machine memory; an L2 superpage never is in PV tables (validation refuses it): refused."""
    if va >> 47 not in (0, 0x1FFFF):
        return None
    rsvd = sum(1 << b for b in range(PADDR_BITS, 52))
    ar_and, ar_or = ~0, 0
    table = cr3 & PTE_FRAME_MASK
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        if table >= mem.size:                                       # map_domain_gfn fails
            return None
        (e,) = struct.unpack_from("<Q", mem.map, table + 8 * ((va >> shift) & 0x1FF))
        if not e & _PAGE_PRESENT:
            return None
        if e & rsvd or (level > 1 and e & _PAGE_PSE):               # guest_l?e_rsvd_bits
            return None
        ar_and &= e
        ar_or |= e
        table = e & PTE_FRAME_MASK
    if table >= mem.size:
        return None
    ar = (ar_and & (_PAGE_USER | _PAGE_RW)) | (ar_or & _PAGE_NX)
    if pfec & PFEC_FETCH and ar & _PAGE_NX:
        return None
    if pfec & PFEC_USER and not ar & _PAGE_USER:
        return None
    if pfec & PFEC_WRITE and not ar & _PAGE_RW:                    # user, or CR0.WP
        return None
    return table | (va & 0xFFF)


def _va(i4: int, i3: int, i2: int, i1: int, off: int) -> int:
    va = i4 << 39 | i3 << 30 | i2 << 21 | i1 << 12 | off
    return va | 0xFFFF000000000000 if i4 >= 256 else va


class Walkers:
    """The walkers under test over one real KVM vCPU and its machine memory."""

    def __init__(self, hv, dom, v) -> None:
        self.hv, self.mem, self.eng = hv, hv.mem, v.engine
        self.lib = kvm_engine._native()
        mem = self.mem
        self.tables = mem.alloc(dom.domid, N_TABLES)                  # the domain's own frames
        xen = next(f for f in range(mem.nr_frames) if mem.owner[f] == DOMID_XEN)
        free = next(f for f in range(mem.nr_frames - 1, 0, -1) if mem.owner[f] == DOMID_INVALID)
        other = next(f for f in dom.p2m if f not in self.tables)     # a page of the guest's
        self.elsewhere = [xen, free, other, 0, mem.nr_frames, mem.nr_frames + 4321,
                          (1 << (PADDR_BITS - 12)) - 1]
        self.cr3_off = kvm_engine._SREG_OFF["cr3"]
        self.saved_cr3 = bytes(self.eng._sregs[self.cr3_off:self.cr3_off + 8])

    def close(self) -> None:
        self.eng._sregs[self.cr3_off:self.cr3_off + 8] = self.saved_cr3
        for f in self.tables:
            self.mem.write(f << 12, bytes(4096))
        self.mem.free(self.tables)

    def load(self, entries: dict[tuple[int, int], int]) -> None:
        mem = self.mem
        for t in self.tables:
            mem.write(t << 12, bytes(4096))
        for (t, slot), e in entries.items():
            struct.pack_into("<Q", mem.map, (self.tables[t] << 12) + 8 * slot, e)

    def check(self, cr3: int, va: int) -> None:
        """Every walker against the model for every access kind at `va`."""
        mem, eng = self.mem, self.eng
        self.eng._sregs[self.cr3_off:self.cr3_off + 8] = struct.pack("<Q", cr3)
        xen_range = HYPERVISOR_VIRT_START <= va < HYPERVISOR_VIRT_END
        for pfec in KINDS:
            want = xen_walk(mem, cr3, va, pfec)
            what = f"cr3={cr3:#x} va={va:#x} pfec={pfec:#x}"
            assert walk(mem, cr3, va, pfec) == (NO_MADDR if want is None else want), what
            if pfec & PFEC_FETCH:
                continue
            write = bool(pfec & PFEC_WRITE)
            if pfec & PFEC_USER:                   # guest buffers: access_ok, then the walk
                buf = None if xen_range else want
                try:
                    got = self.hv.pagetables.translate(cr3, va, write)
                except GuestFault:
                    got = None
                assert got == buf, "translate " + what
                c = self.lib.aiovmm_kvm_guest_maddr(ctypes.byref(eng._ctx), cr3, va, int(write))
                assert c == (NO_MADDR & 0xFFFFFFFFFFFFFFFF if buf is None else buf), "guest_maddr " + what
            if not write:                          # the engine's instruction/descriptor reads
                try:
                    got = eng._walk_va(va, user=bool(pfec & PFEC_USER))
                except LookupError:
                    got = None
                assert got == (None if want is None else want & ~0xFFF), "_walk_va " + what


@pytest.fixture
async def walkers():
    async with hand_driven_vcpu((), "kvm") as (hv, dom, v):
        w = Walkers(hv, dom, v)
        try:
            yield w
        finally:
            w.close()


def _entry(w: Walkers, target: int, toggles) -> int:
    e = GOOD
    for t in toggles:
        d = TOGGLES[t]
        e = e & ~-d if d < 0 else e | d
    return e | target << 12


@st.composite
def _tables(draw, w: Walkers):
    # Mostly good entries naming the tables, so that enough walks get through to the end.
    target = st.integers(0, 4 * N_TABLES + len(w.elsewhere) - 1).map(
        lambda i: w.tables[i % N_TABLES] if i < 4 * N_TABLES else w.elsewhere[i - 4 * N_TABLES])
    toggles = st.frozensets(st.sampled_from(sorted(TOGGLES)), min_size=1, max_size=3)
    return {(t, s): _entry(w, draw(target), draw(toggles) if draw(st.integers(0, 3)) == 3 else ())
            for t in range(N_TABLES) for s in SLOTS if draw(st.integers(0, 15))}


_probe = st.tuples(st.sampled_from(SLOTS), st.sampled_from(SLOTS), st.sampled_from(SLOTS),
                   st.sampled_from(SLOTS), st.sampled_from((0, 8, 0xFF8, 0x7A3)), st.booleans())


async def test_every_walker_agrees_on_random_tables(walkers):
    """Random tables (non-present entries at every level, read-only, supervisor, PSE, NX,
    reserved bits, frames of Xen, free ones, other pages of the guest, frames past machine
    memory), random addresses (either half, Xen's range, non-canonical) and every access
    kind: every walker gives the model's machine address or refuses with it."""
    w = walkers

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(tables=_tables(w), root=st.one_of(st.integers(0, N_TABLES - 1).map(lambda i: w.tables[i] << 12),
                                             st.sampled_from(w.elsewhere).map(lambda f: f << 12)),
           probes=st.lists(_probe, min_size=1, max_size=30))
    def check(tables, root, probes):
        w.load(tables)
        for i4, i3, i2, i1, off, noncanonical in probes:
            va = _va(i4, i3, i2, i1, off)
            w.check(root, va ^ (1 << 50) if noncanonical else va)

    check()


async def test_every_walker_agrees_on_each_entry_exhaustively(walkers):
    """One entry at a time wrong in an otherwise good walk, at each of the four levels, in
    every combination of up to three toggles (and every target kind), then each of its 64
    bits flipped alone: all walkers agree."""
    w = walkers
    t = w.tables
    chain = {(0, 1): t[1], (1, 1): t[2], (2, 1): t[3], (3, 1): t[4]}     # L4 -> L3 -> L2 -> L1 -> page
    names = sorted(TOGGLES)
    va = _va(1, 1, 1, 1, 0x7A8)
    for level in range(4):
        for bits in range(1 << len(names)):
            toggles = [n for i, n in enumerate(names) if bits >> i & 1]
            if len(toggles) > 3:
                continue
            for target in (chain[(level, 1)], *w.elsewhere):
                entries = {k: _entry(w, f, ()) for k, f in chain.items()}
                entries[(level, 1)] = _entry(w, target, toggles)
                w.load(entries)
                w.check(t[0] << 12, va)
    # Every single bit of a good entry set or cleared, at each level: the reserved-bit masks
    # of the C and Python walks agree bit by bit (not only at the bits the toggles name).
    for level in range(4):
        for bit in range(64):
            entries = {k: _entry(w, f, ()) for k, f in chain.items()}
            entries[(level, 1)] ^= 1 << bit
            w.load(entries)
            w.check(t[0] << 12, va)
