"""The para-virtualized MMU: page types, validation of every page-table entry, Xen's area.

Direct mode, as in Xen: guest page tables hold machine frame numbers and the emulated CPU
walks them as they are, so every entry must be validated before it can take effect:
- a guest maps only frames it owns;
- a page-table frame is never mapped writable, and a writably mapped frame never becomes a
  page table (frame types with type counts, Xen's PGT_* rules);
- entries of each level point at frames validated as the next level down;
- reserved bits, superpages, cache-attribute bits are refused;
- L4 slots 256-271 are Xen's: filled by the hypervisor, never written by the guest.

Xen's edits are applied as entries become live: kernel-only L1 entries get US and bit 52,
L2/L3 entries get US, L4 entries get US and A (the guest kernel really runs at CPL 3).

Errors are Xen's: -EINVAL for bad entries, -EBUSY for type conflicts (via MMUError).
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .abi import (
    DOMID_XEN, Errno, HYPERVISOR_VIRT_END, HYPERVISOR_VIRT_START, PAGE_SHIFT, PAGE_SIZE, PTE_FRAME_MASK, XEN_L4_FIRST, XEN_L4_LAST, _PAGE_ACCESSED,
    _PAGE_DIRTY, _PAGE_GLOBAL, _PAGE_GUEST_KERNEL, _PAGE_NX, _PAGE_PRESENT,
    _PAGE_PSE, _PAGE_RW, _PAGE_USER, FIRST_RESERVED_GDT_BYTE, FLAT_RING0_CS64,
    FLAT_RING0_DS, FLAT_RING3_CS32, FLAT_RING3_CS64, FLAT_RING3_SS,
)
from .cpuid import PADDR_BITS
from .memory import MachineMemory, NotWritable, PageType, TypeConflict

log = logging.getLogger("aiovmm.mmu")
_U64_FROM = struct.Struct("<Q").unpack_from

# Bits 12-51 frame; flags allowed per level (Xen's L?_DISALLOW_MASK complement).
_AVL = 0xE00
_HIGH_AVL = 0x7FF0000000000000           # bits 52-62
L1_ALLOWED = (_PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY | _AVL |
              _PAGE_GLOBAL | _HIGH_AVL | _PAGE_NX | PTE_FRAME_MASK)
LN_ALLOWED = (_PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY | _AVL | _HIGH_AVL |
              _PAGE_NX | PTE_FRAME_MASK)
_AD = _PAGE_ACCESSED | _PAGE_DIRTY
_LEVEL_TYPE = {1: PageType.l1, 2: PageType.l2, 3: PageType.l3, 4: PageType.l4}
_PT_TYPES = (PageType.l1, PageType.l2, PageType.l3, PageType.l4)
# Plain ints of the frame types the hot paths compare against (an enum member lookup per
# test costs more than the test).
_TYPE_NONE, _TYPE_WRITABLE = int(PageType.none), int(PageType.writable)
_TYPE_L1, _TYPE_L4 = int(PageType.l1), int(PageType.l4)


class MMUError(Exception):
    """A refused MMU operation; `errno` is Xen's."""

    def __init__(self, errno: Errno, msg: str = "") -> None:
        super().__init__(msg or errno.name)
        self.errno = errno


class GuestFault(Exception):
    """A guest virtual address could not be accessed (becomes -EFAULT)."""

    def __init__(self, va: int, write: bool) -> None:
        super().__init__(f"guest {'write' if write else 'read'} fault at {va:#x}")
        self.va, self.write = va, write


def l4_slot(va: int) -> int:
    return (va >> 39) & 0x1FF


# ------------------------------------------------------------------------------------------------
# The page walk: the one rule by which a guest VA becomes a machine address. Every walk of a
# guest's tables in Python calls `walk` (PageTables.translate for guest buffers, the KVM
# engine's _walk_va for the instruction and descriptor bytes it reads); csrc/kvm.c
# guest_maddr, which must walk in C for the engine's fast paths, is tested against it
# exhaustively (tests/test_ptwalk_property.py).
#
# Xen's guest_walk_tables (xen/arch/x86/mm/guest_walk.c) for a 4-level PV vCPU, which runs with
# EFER.NX and CR0.WP set and without SMEP/SMAP/PKU (guest_pt.h):
# - at each level the entry must be present and have no reserved bit: the address bits from
#   the advertised PADDR_BITS to bit 51 (guest_rsvd_bits), and PSE above the L1. PSE is
#   reserved in an L4 (GUEST_L4_PAGETABLE_RSVD) and, PV paging not being HAP, in an L3
#   (guest_can_use_l3_superpages); an L2 superpage is never in a PV guest's tables
#   (validation refuses them, _get_entry: Xen's L2_DISALLOW_MASK), so one is refused rather
#   than walked (the KVM engine's own supervisor direct map uses 2 MiB pages: never walked).
#   The bit is the PAT bit in an L1, not reserved there.
# - a table or page outside machine memory ends the walk (map_domain_gfn fails);
# - access rights accumulate over the levels: USER and RW must be set at every level for a
#   user access (PFEC_USER) and for a write (PFEC_WRITE; CR0.WP: supervisor writes too);
#   NX at any level refuses an instruction fetch (PFEC_FETCH).
# - a non-canonical VA is no walk at all (#GP).
# Accessed/dirty bits are not set here (the engines' CPU sets them on its own accesses).
PFEC_WRITE, PFEC_USER, PFEC_FETCH = 0x2, 0x4, 0x10        # Xen's PFEC_* walk kinds
WALK_RSVD = ((1 << 52) - 1) & ~((1 << PADDR_BITS) - 1)      # bits PADDR_BITS..51
WALK_RSVD_UPPER = WALK_RSVD | _PAGE_PSE                      # L4, L3, L2 entries
NO_MADDR = -1


def _walk_masks(pfec: int) -> tuple[int, int, int]:
    """(need, upper, leaf) for an access of kind `pfec`: an entry `e` passes at the L4-L2 if
    e & upper == need and at the L1 if e & leaf == need (the bits `need` set, every other
    bit of the mask clear: reserved bits, PSE above the L1, NX for a fetch)."""
    need = _PAGE_PRESENT | (_PAGE_USER if pfec & PFEC_USER else 0) | (_PAGE_RW if pfec & PFEC_WRITE else 0)
    nx = _PAGE_NX if pfec & PFEC_FETCH else 0
    return need, need | WALK_RSVD_UPPER | nx, need | WALK_RSVD | nx


_WALK_MASKS = [_walk_masks(pfec) for pfec in range(32)]


def walk(mem: MachineMemory, cr3: int, va: int, pfec: int) -> int:
    """Machine address of guest VA `va` through the 4-level tables at `cr3` for an access of
    kind `pfec` (PFEC_USER | PFEC_WRITE | PFEC_FETCH), by the rule above; NO_MADDR if the
    walk finds no translation or the access is not permitted. Each entry is read once."""
    top = va >> 47
    if top and top != 0x1FFFF:
        return NO_MADDR
    # Hot (every guest buffer a hypercall reads): locals, unrolled, no helper calls. A table
    # outside machine memory fails the read (struct.error); the page is checked at the end.
    m, unpack, frame = mem.map, _U64_FROM, PTE_FRAME_MASK
    need, upper, leaf = _WALK_MASKS[pfec & 0x1F]
    try:
        e = unpack(m, (cr3 & frame) | (va >> 36 & 0xFF8))[0]               # L4
        if e & upper != need:
            return NO_MADDR
        e = unpack(m, (e & frame) | (va >> 27 & 0xFF8))[0]                 # L3
        if e & upper != need:
            return NO_MADDR
        e = unpack(m, (e & frame) | (va >> 18 & 0xFF8))[0]                 # L2
        if e & upper != need:
            return NO_MADDR
        e = unpack(m, (e & frame) | (va >> 9 & 0xFF8))[0]                  # L1
    except struct.error:
        return NO_MADDR
    base = e & frame
    if e & leaf != need or base >= mem.size:
        return NO_MADDR
    return base | (va & 0xFFF)


# ------------------------------------------------------------------------------------------------
# Xen's reserved GDT entries (its gdt_table), in the page at FIRST_RESERVED_GDT_BYTE of
# every vCPU's GDT: selector -> descriptor.
XEN_GDT = {FLAT_RING0_CS64: 0x00AF9B000000FFFF, FLAT_RING0_DS: 0x00CF93000000FFFF,
           FLAT_RING3_CS32: 0x00CFFB000000FFFF, FLAT_RING3_SS: 0x00CFF3000000FFFF,
           FLAT_RING3_CS64: 0x00AFFB000000FFFF}


class XenArea:
    """The hypervisor's part of every address space (L4 slots 256-271).

    Slot 256: the read-only M2P (guest readable, as on Xen).
    Slot 261: the GDT (15 pages: 14 guest pages backed by one zero frame, then the page
    holding Xen's reserved descriptors at 0xE000+), the ring-0 iretq stub that takes a new
    vCPU into CPL 3, and the stub's stack. Supervisor-only: the guest cannot touch it.
    Shared by all domains; its frames belong to DOMID_XEN.
    """

    BASE = 0xFFFF828000000000          # start of L4 slot 261
    GDT_VA = BASE
    GDT_PAGES = 15
    GDT_LIMIT = FIRST_RESERVED_GDT_BYTE + 8 * 8 - 1
    STUB_VA = BASE + 0x10000
    UNTIL_VA = BASE + 0x10F00      # emu_start's `until`: mapped, never executed (vcpu_engine.py)
    STUB_STACK_TOP = BASE + 0x12000 - 64
    # The iretq frame comes from registers the guest never sees (its CR2 and debug
    # registers are virtual), so every GPR reaches the guest as given (vcpu_engine.py
    # start_in_stub): push $0xe02b; mov %cr2,%rax; push %rax (RSP); pushfq (RFLAGS, set
    # before the stub); push $0xe033; mov %dr3,%rax; push %rax (RIP); mov %dr0,%rax;
    # mov %dr1,%rcx; mov %dr2,%rdx; iretq
    STUB_CODE = bytes.fromhex("682be00000" "0f20d0" "50" "9c" "6833e00000" "0f21d8" "50"
                              "0f21c0" "0f21c9" "0f21d2" "48cf")

    def __init__(self, mem: MachineMemory) -> None:
        self.mem = mem
        alloc = lambda: mem.alloc(DOMID_XEN)[0]
        zero_gdt, gdt, stub, stack = alloc(), alloc(), alloc(), alloc()
        for sel, d in XEN_GDT.items():
            mem.write_u64((gdt << PAGE_SHIFT) + (sel & ~7) - FIRST_RESERVED_GDT_BYTE, d)
        mem.write(stub << PAGE_SHIFT, self.STUB_CODE)
        l3, l2, l1 = alloc(), alloc(), alloc()
        sup = _PAGE_PRESENT | _PAGE_ACCESSED
        for i in range(14):
            mem.write_u64((l1 << PAGE_SHIFT) + 8 * i, (zero_gdt << PAGE_SHIFT) | sup | _PAGE_NX)
        mem.write_u64((l1 << PAGE_SHIFT) + 8 * 14, (gdt << PAGE_SHIFT) | sup | _PAGE_NX)
        mem.write_u64((l1 << PAGE_SHIFT) + 8 * 16, (stub << PAGE_SHIFT) | sup)
        mem.write_u64((l1 << PAGE_SHIFT) + 8 * 17, (stack << PAGE_SHIFT) | sup | _PAGE_RW | _PAGE_DIRTY | _PAGE_NX)
        mem.write_u64(l2 << PAGE_SHIFT, (l1 << PAGE_SHIFT) | sup | _PAGE_RW)
        mem.write_u64(l3 << PAGE_SHIFT, (l2 << PAGE_SHIFT) | sup | _PAGE_RW)
        self.slots: dict[int, int] = {261: (l3 << PAGE_SHIFT) | sup | _PAGE_RW}
        self.slots[256] = self._map_m2p()

    def _map_m2p(self) -> int:
        """Tables mapping the M2P frames read-only (US, NX) at MACH2PHYS_VIRT_START."""
        mem = self.mem
        user_ro = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED
        tables = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED | _PAGE_RW
        frames = list(range(mem.m2p_first, mem.m2p_first + mem.m2p_frames))
        l1s = []
        for i in range(0, len(frames), 512):
            l1 = mem.alloc(DOMID_XEN)[0]
            for j, f in enumerate(frames[i:i + 512]):
                mem.write_u64((l1 << PAGE_SHIFT) + 8 * j, (f << PAGE_SHIFT) | user_ro | _PAGE_NX)
            l1s.append(l1)
        l2s = []
        for i in range(0, len(l1s), 512):
            l2 = mem.alloc(DOMID_XEN)[0]
            for j, f in enumerate(l1s[i:i + 512]):
                mem.write_u64((l2 << PAGE_SHIFT) + 8 * j, (f << PAGE_SHIFT) | tables)
            l2s.append(l2)
        # At most 512 L2s (one L4 slot of M2P, 512 GiB): that is 256 TiB of machine memory,
        # twice the 128 TiB a process can map on x86_64 (47-bit user space) for MachineMemory.
        l3 = mem.alloc(DOMID_XEN)[0]
        for j, f in enumerate(l2s):
            mem.write_u64((l3 << PAGE_SHIFT) + 8 * j, (f << PAGE_SHIFT) | tables)
        return (l3 << PAGE_SHIFT) | tables

    def install(self, l4_mfn: int) -> None:
        """Write Xen's slots into a guest L4 (done whenever an L4 is validated)."""
        base = l4_mfn << PAGE_SHIFT
        for slot in range(XEN_L4_FIRST, XEN_L4_LAST + 1):
            self.mem.write_u64(base + 8 * slot, self.slots.get(slot, 0))


def xen_slot(level: int, index: int) -> bool:
    """Is entry `index` of a table of `level` one of Xen's L4 slots (256..271, inclusive)?
    Never the guest's: replaced at validation, skipped at devalidation, refused to
    mmu_update. One rule, one place."""
    if level == 4 and XEN_L4_FIRST <= index <= XEN_L4_LAST:
        return True
    return False


@dataclass
class Teardown:
    """A domain's page tables while teardown_domain_steps takes them apart: the state, on top
    of the frame table, that the loop (and the audit, audit.py) may see between two steps.
    Xen's two in-between states of a page table (xen/arch/x86/domain.c relinquish_memory,
    mm.c _put_page_type), so that every type count stays the number of its references."""
    # Tables whose last type reference has gone: still validated (their entries hold their
    # references) and typed, count 1, that reference the teardown's until it devalidates
    # them, one a step (Xen's PGT_partial holds a type reference the same way). A stack.
    pending: list[int] = field(default_factory=list)
    # Tables devalidated by force while still referenced (linear entries of tables of the
    # same level: the cycles Xen breaks by clearing PGT_validated and keeping the count):
    # typed, their entries hold nothing; the type goes with their last reference.
    unvalidated: set[int] = field(default_factory=set)


# ------------------------------------------------------------------------------------------------
class PageTables:
    """Page-type bookkeeping and validation for all domains (one instance per machine).

    Contract: every present entry of a validated table holds references: an L1 entry one
    writable type reference on its frame if RW; an L2/L3/L4 entry one type reference on the
    lower table. A table's own type reference count covers its pin, each higher-level
    entry pointing at it, and each vCPU using it as a root. When that count drops to zero the
    table is devalidated and releases everything it held.

    Exception: an L1 entry written by GNTTABOP_map_grant_ref (recorded in `grant_ptes`, by
    machine address, never recognised from the entry's guest-visible bits) holds nothing:
    the grant's references belong to the grant table and only unmap_grant_ref drops them.
    A teardown that meets one is Xen's "implicit unmap of a granted PTE": refused, the entry
    cleared, and the domain owning the L1 crashed (`crash_domain`).
    """

    def __init__(self, mem: MachineMemory, xen: XenArea,
                 crash_domain: Callable[[int, str], None] | None = None) -> None:
        self.mem = mem
        self.xen = xen
        self._q = struct.Struct("<512Q")
        # Machine address of an L1 entry -> (grantee domid, maptrack handle), kept by grants.py.
        self.grant_ptes: dict[int, tuple[int, int]] = {}
        self.crash_domain = crash_domain
        # Domains being torn down (teardown_domain_steps), by domid: several at once, each in
        # steps. Read by the audit.
        self._dying: dict[int, Teardown] = {}

    @property
    def teardowns(self) -> "dict[int, Teardown]":
        """The teardowns in progress, by domid (read-only: for the audit)."""
        return self._dying

    # -- frame types ----------------------------------------------------------------------------
    def get_type(self, mfn: int, ptype: PageType, dom: int, conflict: Errno = Errno.EINVAL) -> None:
        """Take a type reference on `mfn` as `ptype`, validating it if it becomes a table.
        A type conflict fails with `conflict` (Xen: -EINVAL for tables, pins and base
        pointers; -EBUSY when an L1 entry wants a page table writable)."""
        mem = self.mem
        if not 0 <= mfn < mem.nr_frames or mem.owner[mfn] != dom:
            raise MMUError(Errno.EINVAL, f"frame {mfn:#x} is not owned by d{dom}")
        # The frame takes its type BEFORE its entries are validated (Xen: the type is set,
        # not yet PGT_validated): an entry of the table mapping the table itself writable
        # must meet a page table, not an untyped frame, or an L1 could map itself RW.
        try:
            first = mem.take_type(mfn, ptype)
        except TypeConflict as e:
            raise MMUError(conflict, str(e)) from None
        if first and _TYPE_L1 <= ptype <= _TYPE_L4:
            try:
                self._validate_table(mfn, int(ptype), dom)
            except MMUError:
                mem.type[mfn] = PageType.none
                mem.type_count[mfn] = 0
                raise

    def put_type(self, mfn: int) -> None:
        """Drop a type reference; the last one of a page table devalidates it (its entries
        release what they hold). In a dying domain that devalidation is deferred to the
        teardown's next step (Teardown.pending), so one put never walks a whole tree."""
        mem = self.mem
        n = mem.type_count[mfn]
        if n == 0:
            log.error("type count underflow on frame %#x", mfn)
            return
        t = mem.type[mfn]
        if n == 1 and self._dying and _TYPE_L1 <= t <= _TYPE_L4:
            td = self._dying.get(mem.owner[mfn])
            if td is not None:
                if mfn in td.unvalidated:     # devalidated already: only the type goes
                    td.unvalidated.discard(mfn)
                    self._untype(mfn)
                else:                         # the teardown keeps this reference for now
                    td.pending.append(mfn)
                return
        mem.type_count[mfn] = n - 1          # any type, writable included (put_writable's rule)
        if n == 1:
            if _TYPE_L1 <= t <= _TYPE_L4:
                self._devalidate_table(mfn, t)
            self._untype(mfn)

    def _untype(self, mfn: int) -> None:
        """The frame's last type reference is gone (its entries, if a table, released)."""
        mem = self.mem
        mem.type_count[mfn] = 0
        mem.type[mfn] = PageType.none
        mem.unreferenced(mfn)

    def _validate_table(self, mfn: int, level: int, dom: int) -> None:
        """Check all 512 entries, take their references, apply Xen's bit edits. All or nothing."""
        base = mfn << PAGE_SHIFT
        entries = list(self._q.unpack_from(self.mem.map, base))
        if level == 1:
            self._validate_l1(entries, dom)
            self._q.pack_into(self.mem.map, base, *entries)
            return
        taken: list[int] = []
        try:
            for i in [i for i, e in enumerate(entries) if e & _PAGE_PRESENT]:
                if not xen_slot(level, i):
                    entries[i] = self._get_entry(entries[i], level, dom, self_mfn=mfn)
                    taken.append(i)
        except MMUError:
            for i in taken:
                self._put_entry(entries[i], level, mfn, base + 8 * i)
            raise
        if level == 4:
            for slot in range(XEN_L4_FIRST, XEN_L4_LAST + 1):
                entries[slot] = self.xen.slots.get(slot, 0)
        self._q.pack_into(self.mem.map, base, *entries)

    def _validate_l1(self, entries: list[int], dom: int) -> None:
        """_get_entry(level 1) for a whole table: L1 validation dominates domain creation
        (every page of the bootstrap mapping) and fork-like workloads. The flag, RAM and
        owner rules are screened for the whole table at once; a table that fails any of
        them goes through _validate_l1_exact, which raises the first entry's error as
        _get_entry would. Then the writable references (all or nothing, EBUSY for the first
        entry refused) and the general ones. Same rules, same errors; all or nothing."""
        present = [i for i, e in enumerate(entries) if e & _PAGE_PRESENT]
        if not present:
            return
        mem = self.mem
        vals = [entries[i] for i in present]
        targets = [(e & PTE_FRAME_MASK) >> PAGE_SHIFT for e in vals]
        owner = mem.owner
        flags = 0
        for e in vals:
            flags |= e
        if flags & ~L1_ALLOWED or max(targets) >= mem.nr_frames \
                or [owner[t] for t in targets].count(dom) != len(targets):
            self._validate_l1_exact(entries, dom)
            return
        try:
            mem.get_writable_many([t for e, t in zip(vals, targets) if e & _PAGE_RW])
        except NotWritable as err:
            raise MMUError(Errno.EBUSY, str(err)) from None
        refs = mem.refs
        for t in targets:
            refs[t] += 1
        for i, e in zip(present, vals):
            if not e & _PAGE_USER:
                entries[i] = e | _PAGE_USER | _PAGE_GUEST_KERNEL

    def _validate_l1_exact(self, entries: list[int], dom: int) -> None:
        """_validate_l1 one entry at a time, in order (for a table that breaks a rule: the
        first entry's error, as _get_entry raises it)."""
        mem = self.mem
        owner, refs = mem.owner, mem.refs
        get_writable = mem.get_writable
        nr = mem.nr_frames
        taken: list[int] = []
        try:
            for i, e in enumerate(entries):
                if not e & _PAGE_PRESENT:
                    continue
                if e & ~L1_ALLOWED:
                    raise MMUError(Errno.EINVAL, f"bad L1 flags {e & ~L1_ALLOWED:#x}")
                t = (e & PTE_FRAME_MASK) >> PAGE_SHIFT
                if t >= nr:
                    raise MMUError(Errno.EPERM, f"frame {t:#x} is not RAM")
                if owner[t] != dom:
                    raise MMUError(Errno.EBUSY, f"d{dom} may not map frame {t:#x}")
                if e & _PAGE_RW:
                    try:
                        get_writable(t)
                    except NotWritable as err:
                        raise MMUError(Errno.EBUSY, str(err)) from None
                refs[t] += 1
                if not e & _PAGE_USER:
                    entries[i] = e | _PAGE_USER | _PAGE_GUEST_KERNEL
                taken.append(i)
        except MMUError:
            for i in taken:
                self._put_entry(entries[i], 1)
            raise

    def _devalidate_table(self, mfn: int, level: int) -> None:
        self.mem.pt_dropped(mfn)
        base = mfn << PAGE_SHIFT
        entries = self._q.unpack_from(self.mem.map, base)
        for i, e in enumerate(entries):
            if xen_slot(level, i):
                continue
            if e & _PAGE_PRESENT:
                self._put_entry(e, level, mfn, base + 8 * i)

    def _get_entry(self, e: int, level: int, dom: int, self_mfn: int = -1) -> int:
        """Validate one present entry of a table of `level`, take its reference, return the
        entry as it will be stored (with Xen's edits)."""
        mem = self.mem
        target = (e & PTE_FRAME_MASK) >> PAGE_SHIFT       # >= 0: masked
        if level == 1:
            if e & ~L1_ALLOWED:
                raise MMUError(Errno.EINVAL, f"bad L1 flags {e & ~L1_ALLOWED:#x}")
            if target >= mem.nr_frames:
                raise MMUError(Errno.EPERM, f"frame {target:#x} is not RAM")
            if mem.owner[target] != dom:
                raise MMUError(Errno.EBUSY, f"d{dom} may not map frame {target:#x}")
            if e & _PAGE_RW:
                try:                      # get_type(writable) minus its repeated owner test
                    mem.get_writable(target)
                except NotWritable as err:
                    raise MMUError(Errno.EBUSY, str(err)) from None
            mem.refs[target] += 1
            if not e & _PAGE_USER:
                e |= _PAGE_USER | _PAGE_GUEST_KERNEL
            return e
        if e & ~LN_ALLOWED:
            raise MMUError(Errno.EINVAL, f"bad L{level} flags {e & ~LN_ALLOWED:#x}"
                           + (" (superpage)" if e & _PAGE_PSE else ""))
        if not mem.valid_mfn(target) or mem.owner[target] != dom:
            raise MMUError(Errno.EINVAL, f"d{dom} L{level} entry to foreign frame {target:#x}")
        if target == self_mfn:
            # A read-only self reference (the classic "linear page table" slot) is allowed,
            # as in Xen; it takes no reference (it would keep its own table alive forever).
            if e & _PAGE_RW:
                raise MMUError(Errno.EINVAL, f"linear L{level} self-entry must be read-only")
            return e | _PAGE_USER | (_PAGE_ACCESSED if level == 4 else 0)
        same = _LEVEL_TYPE[level]
        if mem.type[target] == same and mem.type_count[target]:
            # A "linear" entry to another validated table of the same level (Xen's rule 7):
            # read-only only; it holds a same-level type reference so the target stays a table.
            if e & _PAGE_RW:
                raise MMUError(Errno.EINVAL, f"linear L{level} entry must be read-only")
            mem.type_count[target] += 1
        else:
            self.get_type(target, _LEVEL_TYPE[level - 1], dom)
        e |= _PAGE_USER
        if level == 4:
            e |= _PAGE_ACCESSED
        return e

    def _put_entry(self, e: int, level: int, self_mfn: int = -1, ptr: int = -1) -> None:
        """Drop the references entry `e` (stored at machine address `ptr`) took."""
        target = (e & PTE_FRAME_MASK) >> PAGE_SHIFT
        if target == self_mfn and level > 1:
            return                        # a read-only self reference holds nothing
        if level == 1:
            if ptr in self.grant_ptes:
                self._implicit_grant_unmap(ptr)
                return
            if e & _PAGE_RW:
                self.mem.put_writable(target)
            self.mem.put_ref(target)
        else:
            self.put_type(target)         # next-level or same-level (linear) reference

    def _implicit_grant_unmap(self, ptr: int) -> None:
        """A page-table teardown met a grant mapping's L1 entry (Xen's put_page_from_l1e on a
        _PAGE_GNTTAB entry). Its references are the grant table's: nothing is dropped here.
        The entry is cleared (the grant mapping is detached from it; unmap_grant_ref still
        releases the grant) and the L1's owner, a live domain, is crashed as Xen does."""
        grantee, handle = self.grant_ptes.pop(ptr)
        self.mem.write_pte(ptr, 0)
        log.warning("d%d: attempt to implicitly unmap a granted PTE at %#x (handle %d)",
                    grantee, ptr, handle)
        if self.crash_domain is not None and grantee not in self._dying:
            self.crash_domain(grantee, f"attempt to implicitly unmap a granted PTE at {ptr:#x}")

    def teardown_domain(self, dom: int, frames: "set[int] | list[int]",
                        roots: "list[int] | tuple[int, ...]" = ()) -> None:
        """A dying domain releases every reference its page tables hold (Xen's
        relinquish_memory), see teardown_domain_steps."""
        for _ in self.teardown_domain_steps(dom, frames, roots):
            pass

    def teardown_domain_steps(self, dom: int, frames: "set[int] | list[int]",
                              roots: "list[int] | tuple[int, ...]" = (),
                              chunk: int = 256) -> Iterator[None]:
        """teardown_domain in bounded steps (Xen's preemptible domain_relinquish_resources):
        yields after each table devalidated and every `chunk` frames looked at, so that the
        caller may let the loop run in between.

        Xen's order and counting: the vCPU roots' references (`roots`, one each) go first,
        then every pin, then the tables still validated are devalidated by force, highest
        level first (only cycles of linear entries are left by then). A table is devalidated
        when its last type reference goes, as at any time, but in its own step
        (Teardown.pending); one devalidated by force keeps its count and type until its
        referrers have let go (Teardown.unvalidated). So between two steps every type count
        is still the number of references to the frame, the frame table is consistent (the
        audit holds), and a referenced table stays a table: no writable type can be taken
        on it meanwhile. The domain's frames stay its own and out of every free list; its
        vCPUs are gone, and other domains reach them only through grants (their own
        references, untouched here). Afterwards no frame of the domain has a type left
        that its tables or pins held."""
        mem = self.mem
        td = self._dying[dom] = Teardown()
        try:
            for root in roots:
                self.put_type(root)
            yield from self._devalidate_pending(td)
            pinned: list[int] = []
            tables: list[list[int]] = [[] for _ in range(5)]
            for n, mfn in enumerate(sorted(frames), 1):
                if mem.owner[mfn] == dom:
                    if mem.pinned[mfn]:
                        pinned.append(mfn)
                    t = mem.type[mfn]
                    if t in _PT_TYPES:
                        tables[t].append(mfn)
                if n % (chunk * 8) == 0:
                    yield
            for n, mfn in enumerate(pinned, 1):
                if mem.pinned[mfn] and mem.owner[mfn] == dom:
                    mem.pinned[mfn] = 0
                    self.put_type(mfn)
                    yield from self._devalidate_pending(td)
                if n % chunk == 0:
                    yield
            for level in (4, 3, 2, 1):
                for mfn in tables[level]:
                    # Rechecked: an earlier step may have devalidated it.
                    if (mem.owner[mfn] != dom or mem.type[mfn] != level or not mem.type_count[mfn]
                            or mfn in td.unvalidated):
                        continue
                    td.unvalidated.add(mfn)
                    self._devalidate_table(mfn, level)
                    # Up to 512 entries put (1-2 ms of Python): a step of its own (the caller
                    # yields on time), or a 64 MiB guest's 35 L1 tables are one 35-75 ms
                    # step every guest on the loop waits for (measured).
                    yield
                    yield from self._devalidate_pending(td)
            if td.unvalidated:
                log.error("d%d: tables %s still referenced after teardown", dom,
                          sorted(td.unvalidated)[:8])
        finally:
            del self._dying[dom]

    def _devalidate_pending(self, td: Teardown) -> Iterator[None]:
        """Devalidate the dying domain's tables whose last reference has gone, one a step,
        then drop the reference the teardown kept on each (Teardown.pending)."""
        mem = self.mem
        while td.pending:
            mfn = td.pending.pop()
            self._devalidate_table(mfn, int(mem.type[mfn]))
            self._untype(mfn)
            yield

    # -- entry updates ---------------------------------------------------------------------------
    def update_entry(self, dom: int, ptr: int, val: int, preserve_ad: bool = False) -> bool:
        """A checked write of `val` to the 8-byte entry at machine address `ptr`.

        Returns True if the engines must be told (mmu_ops.written_all): the entry replaced
        a present one, which a cached translation may have come from. As on Xen this is no
        TLB flush (the guest flushes when it needs to); the unsafe stale translations, of a
        frame freed or taking a page-table type, are dropped where that happens
        (MachineMemory._stale_translations_unsafe). Filling fresh page tables (most of a
        boot's updates) reports nothing.
        """
        # Hot (Linux: ~60,000 single-entry mmu_updates per boot): plain ints and locals,
        # no helper calls for the range and type tests (bench/mmu_entry.py).
        mem = self.mem
        mfn = ptr >> PAGE_SHIFT
        if not 0 <= mfn < mem.nr_frames or mem.owner[mfn] != dom:
            raise MMUError(Errno.EINVAL, f"page-table frame {mfn:#x} not owned by d{dom}")
        level = mem.type[mfn]
        # A type is set and reset together with its count (get_type, put_type, free), so the
        # type alone says whether the frame is a page table (a dying domain's tables keep
        # their type while referenced, but no domain updates those).
        if level == _TYPE_NONE or level == _TYPE_WRITABLE:
            mem.write_u64(ptr, val)        # not a page table: a plain checked store
            return False
        if not _TYPE_L1 <= level <= _TYPE_L4:
            raise MMUError(Errno.EINVAL, f"frame {mfn:#x} is a {PageType(level).name} page")
        if level == _TYPE_L4:
            idx = (ptr & (PAGE_SIZE - 1)) >> 3
            if xen_slot(level, idx):
                raise MMUError(Errno.EINVAL, f"L4 slot {idx} belongs to Xen")
        old = _U64_FROM(mem.map, ptr)[0]
        if ptr in self.grant_ptes:
            # A grant mapping: only GNTTABOP_unmap_grant_ref may remove it (Xen refuses an
            # implicit unmap of a granted PTE). Recognised by address, not by the entry.
            raise MMUError(Errno.EINVAL, "entry holds a grant mapping")
        if preserve_ad:
            val |= old & _AD
        new = val
        if val & _PAGE_PRESENT:
            new = self._get_entry(val, level, dom, mfn)
        mem.write_pte(ptr, new)
        if old & _PAGE_PRESENT:
            self._put_entry(old, level, mfn, ptr)
            return True
        return False

    # -- walks --------------------------------------------------------------------------------------
    def l1_entry_address(self, l4_mfn: int, va: int) -> int:
        """Machine address of the L1 entry for `va` under root `l4_mfn` (for update_va_mapping)."""
        mem = self.mem
        table = l4_mfn
        for shift in (39, 30, 21):
            e = mem.read_u64((table << PAGE_SHIFT) + 8 * ((va >> shift) & 0x1FF))
            if not e & _PAGE_PRESENT:
                raise MMUError(Errno.EINVAL, f"no page table maps {va:#x}")
            table = (e & PTE_FRAME_MASK) >> PAGE_SHIFT
        if mem.type[table] != PageType.l1:      # typed implies a count (see update_entry)
            raise MMUError(Errno.EINVAL, f"{va:#x} is not mapped through an L1 table")
        return (table << PAGE_SHIFT) + 8 * ((va >> 12) & 0x1FF)

    def translate(self, cr3: int, va: int, write: bool) -> int:
        """Guest VA -> machine address for a CPL-3 read (or `write`) of a guest buffer, as
        Xen's copy_from_guest/copy_to_guest reach it: access_ok (`guest_access_ok`: never
        Xen's range), then `walk`. GuestFault (-EFAULT) otherwise."""
        if HYPERVISOR_VIRT_START <= va < HYPERVISOR_VIRT_END:
            raise GuestFault(va, write)
        ma = walk(self.mem, cr3, va, PFEC_USER | PFEC_WRITE if write else PFEC_USER)
        if ma < 0:
            raise GuestFault(va, write)
        return ma
