"""Guest descriptor tables: set_gdt, update_descriptor, MMUEXT_SET_LDT (Xen's
pv/descriptor-tables.c and the LDT fault path of x86/traps.c).

Each vCPU that installs its own GDT gets a window in Xen's area (L4 slot 261, supervisor-only:
the CPU reads descriptors with implicit supervisor accesses, the guest cannot touch it):

  window + 0 .. 14 pages   the guest's GDT frames (unused pages: a shared zero frame)
  window + 14 pages        Xen's reserved descriptors (FLAT_RING3_CS64 ... at 0xe000+)
  window + 16 .. 32 pages  the shadow LDT: guest frames mapped on first use (#PF in the
                           window), as Xen's pv_map_ldt_shadow_page does

and the engine's GDTR/LDTR point into it. Frames of a GDT or LDT hold a `seg_desc` type
reference (mmu.PageTables.get_type) for as long as they are installed, so they cannot be
mapped writable, become page tables, or be freed meanwhile; the first such reference
validates all 512 descriptors (check_descriptor) and fixes their privilege in place.
Descriptor rules (check_descriptor, 64-bit PV): code/data segments get DPL 3 (the kernel runs
in ring 3); a call gate must target a guest selector, the LDT or FLAT_KERNEL_CS, and gets
DPL 0 so that using it faults (Xen then emulates the gate: not done here, the #GP is the
guest's); every other system descriptor (LDT, TSS, interrupt/trap gates) is refused.
"""
from __future__ import annotations

import logging
import struct
import weakref
from typing import TYPE_CHECKING

from .abi import (
    DOMID_XEN, FIRST_RESERVED_GDT_ENTRY, FLAT_KERNEL_CS, HYPERVISOR_VIRT_END, PAGE_SHIFT,
    PAGE_SIZE, PTE_FRAME_MASK, _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_NX, _PAGE_PRESENT, _PAGE_RW,
    Errno,
)
from .errors import HypercallError
from .memory import PageType
from .mmu import GuestFault, MMUError, XenArea

if TYPE_CHECKING:
    from .vcpu import VCPU

log = logging.getLogger("aiovmm.descriptors")

SEG_TYPE, SEG_S, SEG_DPL, SEG_P = 0xF << 8, 1 << 12, 3 << 13, 1 << 15
CALL_GATE = 0xC << 8
GUEST_KERNEL_RPL = 3
FIRST_RESERVED_GDT_PAGE = FIRST_RESERVED_GDT_ENTRY // 512       # 14
MAX_LDT_ENTS = 8192
LDT_PAGES = 16
WINDOW_PAGES = 32
WINDOWS_PER_L1 = 512 // WINDOW_PAGES
_WIN_PTE = _PAGE_PRESENT | _PAGE_RW | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_NX
_Q = struct.Struct("<Q")


# ---------------------------------------------------------------------------- descriptors
def gate_selector_ok(sel: int) -> bool:
    """guest_gate_selector_okay: a guest GDT entry, the LDT, or Xen's flat kernel CS."""
    return (sel >> 3) < FIRST_RESERVED_GDT_ENTRY or sel == FLAT_KERNEL_CS or bool(sel & 4)


def check_descriptor(raw: int) -> int | None:
    """Xen's check_descriptor for a 64-bit PV domain: the descriptor as it may be stored
    (privilege fixed up), or None if it must be refused."""
    a, b = raw & 0xFFFFFFFF, raw >> 32
    if not b & SEG_P:
        return raw                           # not present: always faults, safe
    dpl = (b >> 13) & 3
    if dpl < GUEST_KERNEL_RPL:
        dpl = GUEST_KERNEL_RPL
    b = (b & ~SEG_DPL) | (dpl << 13)
    if b & SEG_S:
        return a | b << 32                   # code/data: no base/limit checks in long mode
    if b & SEG_TYPE == 0:
        return raw                           # type 0: the upper half of a 64-bit gate
    if b & SEG_TYPE != CALL_GATE:
        return None
    cs = a >> 16
    if not gate_selector_ok(cs):
        return None
    b &= ~SEG_DPL                            # DPL 0: every use faults (to be emulated)
    cs = (cs & ~3) | dpl                     # the original DPL kept in the selector's RPL
    a = (a & 0xFFFF) | (cs << 16)
    if b & 0xFF:
        return None
    return a | b << 32


def _validate_page(v: "VCPU", mfn: int) -> bool:
    """validate_segdesc_page: check every descriptor, store the fixed-up ones; all or none."""
    mem = v.domain.mem
    base = mfn << PAGE_SHIFT
    descs = list(struct.unpack_from("<512Q", mem.map, base))
    for i, d in enumerate(descs):
        fixed = check_descriptor(d)
        if fixed is None:
            log.info("d%d: frame %#x descriptor %d (%#018x) refused", v.domain.domid, mfn, i, d)
            return False
        descs[i] = fixed
    struct.pack_into("<512Q", mem.map, base, *descs)
    return True


def get_seg_desc(v: "VCPU", mfn: int) -> None:
    """Take a seg_desc type reference on an own frame (Xen's get_page_and_type(PGT_seg_desc_
    page)); the first one validates the page. MMUError on a foreign frame, a type conflict
    (page table, writable mapping) or a bad descriptor."""
    mem = v.domain.mem
    pt = v.domain.hypervisor.pagetables
    fresh = mem.valid_mfn(mfn) and mem.type_count[mfn] == 0
    pt.get_type(mfn, PageType.seg_desc, v.domain.domid)
    if fresh and not _validate_page(v, mfn):
        pt.put_type(mfn)
        raise MMUError(Errno.EINVAL, f"frame {mfn:#x} holds a refused descriptor")


# ---------------------------------------------------------------------------- windows
class DescriptorArea:
    """Per-vCPU GDT/LDT windows inside Xen's slot 261 (one allocator per machine)."""

    def __init__(self, xen: XenArea) -> None:
        self.xen = xen
        mem = self.mem = xen.mem
        # Xen's slot-261 tables, read back from the area XenArea built: L3 -> L2 -> L1.
        l3 = (xen.slots[261] & PTE_FRAME_MASK) >> PAGE_SHIFT
        self.l2 = (mem.read_u64(l3 << PAGE_SHIFT) & PTE_FRAME_MASK) >> PAGE_SHIFT
        l1 = (mem.read_u64(self.l2 << PAGE_SHIFT) & PTE_FRAME_MASK) >> PAGE_SHIFT
        self.zero_frame = (mem.read_u64(l1 << PAGE_SHIFT) & PTE_FRAME_MASK) >> PAGE_SHIFT
        self.xen_gdt_frame = (mem.read_u64((l1 << PAGE_SHIFT) + 8 * FIRST_RESERVED_GDT_PAGE)
                              & PTE_FRAME_MASK) >> PAGE_SHIFT
        self.free: list[int] = []
        self.next = 0
        self.l1s: dict[int, int] = {}
        self._add_l1(0)           # the first 16 windows, so ordinary use allocates nothing

    def _add_l1(self, idx: int) -> None:
        """Windows are Xen's area: their tables are allocated once and never freed."""
        l1 = self.mem.alloc(DOMID_XEN)[0]
        self.mem.zero(l1)
        self.l1s[idx] = l1
        self.mem.write_u64((self.l2 << PAGE_SHIFT) + 8 * (1 + idx),
                           (l1 << PAGE_SHIFT) | _PAGE_PRESENT | _PAGE_RW | _PAGE_ACCESSED)

    def va(self, k: int) -> int:
        return XenArea.BASE + ((1 + k // WINDOWS_PER_L1) << 21) + (k % WINDOWS_PER_L1) * WINDOW_PAGES * PAGE_SIZE

    def _pte_addr(self, k: int, page: int) -> int:
        l1 = self.l1s[k // WINDOWS_PER_L1]
        return (l1 << PAGE_SHIFT) + 8 * ((k % WINDOWS_PER_L1) * WINDOW_PAGES + page)

    def alloc(self) -> int:
        if self.free:
            k = self.free.pop()
        else:
            k = self.next
            if 1 + k // WINDOWS_PER_L1 >= 512:
                raise HypercallError(Errno.ENOMEM, "no descriptor-table window left")
            self.next += 1
            if k // WINDOWS_PER_L1 not in self.l1s:
                self._add_l1(k // WINDOWS_PER_L1)
        for p in range(FIRST_RESERVED_GDT_PAGE):
            self.set_gdt_page(k, p, self.zero_frame)
        self.mem.write_u64(self._pte_addr(k, FIRST_RESERVED_GDT_PAGE),
                           (self.xen_gdt_frame << PAGE_SHIFT) | _WIN_PTE)
        for p in range(LDT_PAGES):
            self.set_ldt_page(k, p, 0)
        return k

    def release(self, k: int) -> None:
        self.free.append(k)

    def set_gdt_page(self, k: int, page: int, mfn: int) -> None:
        self.mem.write_u64(self._pte_addr(k, page), (mfn << PAGE_SHIFT) | _WIN_PTE)

    def set_ldt_page(self, k: int, page: int, mfn: int) -> None:
        self.mem.write_u64(self._pte_addr(k, 16 + page), (mfn << PAGE_SHIFT) | _WIN_PTE if mfn else 0)


_areas: "weakref.WeakKeyDictionary[XenArea, DescriptorArea]" = weakref.WeakKeyDictionary()


def area_of(xen: XenArea) -> DescriptorArea:
    """The machine's window allocator (made with the first vCPU: VCPU.__init__)."""
    a = _areas.get(xen)
    if a is None:
        a = _areas[xen] = DescriptorArea(xen)
    return a


def _area(v: "VCPU") -> DescriptorArea:
    xen = v.domain.hypervisor.xen
    a = _areas.get(xen)
    if a is None:
        a = _areas[xen] = DescriptorArea(xen)
    return a


def _window(v: "VCPU") -> int:
    if v.desc_window is None:
        v.desc_window = _area(v).alloc()
        _load(v)
    return v.desc_window


def _load(v: "VCPU") -> None:
    """Point the engine's GDTR/LDTR at this vCPU's window."""
    a = _area(v)
    base = a.va(v.desc_window)
    ldt_limit = v.ldt_ents * 8 - 1 if v.ldt_ents else 0
    v.engine.set_descriptor_tables(base, XenArea.GDT_LIMIT, base + 16 * PAGE_SIZE, ldt_limit)
    v.engine.flush_tlb()


def _destroy_gdt(v: "VCPU") -> None:
    pt = v.domain.hypervisor.pagetables
    a = _area(v)
    for p, mfn in enumerate(v.gdt_frames):
        a.set_gdt_page(v.desc_window, p, a.zero_frame)
        pt.put_type(mfn)
    v.gdt_frames = []
    v.gdt_ents = 0


def _destroy_ldt(v: "VCPU") -> bool:
    pt = v.domain.hypervisor.pagetables
    a = _area(v)
    dropped = bool(v.ldt_shadow)
    for p, mfn in v.ldt_shadow.items():
        a.set_ldt_page(v.desc_window, p, 0)
        pt.put_type(mfn)
    v.ldt_shadow = {}
    return dropped


def release(v: "VCPU") -> None:
    """vCPU teardown: drop every type reference and give the window back."""
    if v.desc_window is None:
        return
    _destroy_ldt(v)
    _destroy_gdt(v)
    _area(v).release(v.desc_window)
    v.desc_window = None


# ---------------------------------------------------------------------------- segment loads
SEG_CODE, SEG_CONFORMING, SEG_READABLE, SEG_ACCESSED = 1 << 11, 1 << 10, 1 << 9, 1 << 8


def _descriptor_address(v: "VCPU", sel: int) -> int | None:
    """Machine address of the descriptor `sel` names, as the CPU finds it through this
    vCPU's GDTR/LDTR (the window, or Xen's GDT without one), or None where that read faults
    for good: beyond the table's limit, or an LDT page that cannot be mapped (Xen's
    handle_ldt_mapping_fault maps it for Xen's own accesses too, else the fixup runs). A
    GDT page the guest did not give reads as the zero frame."""
    off = sel & ~7
    if sel & 4:
        if v.desc_window is None or off >= v.ldt_ents * 8:
            return None
        page = off >> PAGE_SHIFT
        if page not in v.ldt_shadow:
            start = _area(v).va(v.desc_window) + 16 * PAGE_SIZE
            if ldt_fault(v, start + off, 0) != (0, 0):
                return None
        mfn = v.ldt_shadow[page]
    else:
        if off + 7 > XenArea.GDT_LIMIT:
            return None
        page = off >> PAGE_SHIFT
        if page >= FIRST_RESERVED_GDT_PAGE:
            mfn = _area(v).xen_gdt_frame
        elif page < len(v.gdt_frames):
            mfn = v.gdt_frames[page]
        else:
            mfn = _area(v).zero_frame
    return (mfn << PAGE_SHIFT) + (off & (PAGE_SIZE - 1))


SEG_L, SEG_DB = 1 << 21, 1 << 22


def current_descriptor(v: "VCPU", name: str, sel: int) -> int | None:
    """The descriptor `sel` names in this vCPU's GDT/LDT now, for CS or SS (`name`), or None
    where it is not one the CPU would load there (the KVM engine's return to a segment the
    guest loaded itself, whose hidden part its exits lose). The entry may have been rewritten
    since that load (update_descriptor stores a not-present one as given: DPL 0, any type),
    so it passes the IRETQ's checks again (iret_code_segment, iret_stack_segment): never a
    CS or SS with DPL below 3, not present, or of the wrong kind."""
    desc = (iret_code_segment if name == "cs" else iret_stack_segment)(v, sel)
    return None if isinstance(desc, tuple) else desc


SEG_WRITABLE = SEG_READABLE          # bit 9: readable (code), writable (data)


def iret_code_segment(v: "VCPU", sel: int) -> tuple[int, int] | int:
    """The checks the CPU's IRETQ (restore_all_guest, CPL 0 to RPL 3) makes on the frame's
    CS, `sel` with RPL 3: the descriptor it loads (as read here, once: the engine loads this
    value, L set for 64-bit mode, clear for compatibility mode), or the (vector, error code)
    it faults with: #GP(sel & ~3) for a null selector, one beyond the GDT/LDT limit, not a
    code segment, DPL other than 3 (non-conforming), or L and D both set; #NP(sel & ~3) for
    one not present. Xen's flat selectors (FLAT_RING3_CS64/CS32) come from its reserved GDT
    page like any other. One rule for every iret (the KVM C path leaves every other CS to
    traps.do_iret)."""
    sel = (sel & 0xFFFF) | 3
    gp = (13, sel & ~3)
    if sel & ~3 == 0:
        return gp
    addr = _descriptor_address(v, sel)
    if addr is None:
        return gp
    desc = v.domain.mem.read_u64(addr)
    hi = desc >> 32
    if not hi & SEG_S or not hi & SEG_CODE:
        return gp
    if not hi & SEG_CONFORMING and hi & SEG_DPL != SEG_DPL:      # DPL must be RPL 3
        return gp
    if not hi & SEG_P:
        return (11, sel & ~3)
    if hi & SEG_L and hi & SEG_DB:
        return gp
    return desc


def iret_stack_segment(v: "VCPU", sel: int) -> tuple[int, int] | int:
    """The IRETQ's checks on the frame's SS (Xen: regs->ss = frame.ss | 3), after those on
    CS (iret_code_segment), for a return to RPL 3: the descriptor it loads, or the fault:
    #GP(0) for a null selector (RPL 3 may not have one, in 64-bit mode either); #GP(sel & ~3)
    beyond the GDT/LDT limit, not a writable data segment, or DPL other than 3; #SS(sel & ~3)
    for one not present."""
    sel = (sel & 0xFFFF) | 3
    if sel & ~3 == 0:
        return (13, 0)
    gp = (13, sel & ~3)
    addr = _descriptor_address(v, sel)
    if addr is None:
        return gp
    desc = v.domain.mem.read_u64(addr)
    hi = desc >> 32
    if not hi & SEG_S or hi & SEG_CODE or not hi & SEG_WRITABLE or hi & SEG_DPL != SEG_DPL:
        return gp
    if not hi & SEG_P:
        return (12, sel & ~3)
    return desc


def set_accessed(v: "VCPU", sel: int) -> None:
    """A successful segment load sets the descriptor's accessed bit, as the CPU does (the
    descriptor was just checked and read: its address is known to be readable)."""
    addr = _descriptor_address(v, sel | 3)
    if addr is not None:
        mem = v.domain.mem
        desc = mem.read_u64(addr)
        if not desc & SEG_ACCESSED << 32:
            mem.write_u64(addr, desc | SEG_ACCESSED << 32)


def load_user_gs(v: "VCPU", sel: int) -> tuple[int, int]:
    """SEGBASE_GS_USER_SEL (Xen's do_set_segment_base): Xen, at CPL 0, loads the low 16 bits
    of `sel` into %gs (RPL forced to 3 unless it is a null selector, 0-3, which loads as
    given with base 0) and takes the user GS base from the descriptor. A load that faults
    (#GP: beyond the limit, not a data or readable code segment, DPL below 3; #NP: not
    present) is not an error: Xen's fixup loads the null selector (base 0) and the
    hypercall still returns 0. Returns (selector now in %gs, user GS base). As the CPU
    does, a successful load sets the descriptor's accessed bit."""
    sel &= 0xFFFF
    if sel <= 3:
        return sel, 0
    sel, desc = data_segment(v, sel | 3) or (0, 0)
    return sel, ((desc >> 16) & 0xFFFFFF) | ((desc >> 56) << 24)


def data_segment(v: "VCPU", sel: int) -> tuple[int, int] | None:
    """Xen's load of a data segment register (DS, ES, FS, GS) with `sel` at CPL 0, then
    its return to the guest's ring 3: (the selector the guest then has, its descriptor as
    loaded, 0 for a null one), or None where the load faults: beyond the GDT/LDT limit, a system segment,
    execute-only code, data or non-conforming code with DPL below RPL, not present. A null
    selector (0-3) loads as given; one with DPL below 3 loads, and the IRET to ring 3
    nulls it. A load sets the descriptor's accessed bit, as the CPU does."""
    sel &= 0xFFFF
    if sel <= 3:
        return sel, 0
    addr = _descriptor_address(v, sel)
    if addr is None:
        return None
    desc = v.domain.mem.read_u64(addr)
    hi = desc >> 32
    if not hi & SEG_S or hi & (SEG_CODE | SEG_READABLE) == SEG_CODE:
        return None
    conforming = hi & SEG_CODE and hi & SEG_CONFORMING
    # Data and non-conforming code: max(CPL 0, RPL) must not exceed the DPL.
    if not conforming and (hi & SEG_DPL) >> 13 < sel & 3:
        return None
    if not hi & SEG_P:
        return None
    set_accessed(v, sel)
    if not conforming and (hi & SEG_DPL) >> 13 < 3:
        return 0, 0
    return sel, desc | SEG_ACCESSED << 32


# ---------------------------------------------------------------------------- hypercalls
def do_set_gdt(v: "VCPU", frame_list: int, entries: int, *_) -> int:
    entries &= 0xFFFFFFFF
    if entries > FIRST_RESERVED_GDT_ENTRY:
        raise HypercallError(Errno.EINVAL, "GDT too large")
    nr = (entries + 511) // 512
    frames = list(struct.unpack(f"<{nr}Q", v.copy_from_guest(frame_list, 8 * nr))) if nr else []
    set_gdt(v, frames, entries)
    return 0


def set_gdt(v: "VCPU", frames: list[int], entries: int) -> None:
    """Xen's pv_set_gdt, shared by set_gdt and VCPUOP_initialise: every frame must be the
    domain's and hold only safe descriptors (a seg_desc type reference each), else EINVAL
    with nothing taken."""
    if entries > FIRST_RESERVED_GDT_ENTRY or len(frames) != (entries + 511) // 512:
        raise HypercallError(Errno.EINVAL, "GDT too large")
    taken: list[int] = []
    try:
        for mfn in frames:
            get_seg_desc(v, mfn)
            taken.append(mfn)
    except MMUError as e:
        pt = v.domain.hypervisor.pagetables
        for mfn in taken:
            pt.put_type(mfn)
        raise HypercallError(Errno.EINVAL, f"set_gdt: {e}") from None
    k = _window(v)
    _destroy_gdt(v)
    a = _area(v)
    for p, mfn in enumerate(frames):
        a.set_gdt_page(k, p, mfn)
    v.gdt_frames = frames
    v.gdt_ents = entries
    v.engine.flush_tlb()


def do_update_descriptor(v: "VCPU", gaddr: int, desc: int, *_) -> int:
    fixed = check_descriptor(desc & (2**64 - 1))
    if gaddr & 7 or fixed is None:
        raise HypercallError(Errno.EINVAL, "misaligned or refused descriptor")
    mfn = gaddr >> PAGE_SHIFT
    mem = v.domain.mem
    dom = v.domain.domid
    if not mem.valid_mfn(mfn) or mem.owner[mfn] != dom:
        raise HypercallError(Errno.EINVAL, f"frame {mfn:#x} not owned")
    pt = v.domain.hypervisor.pagetables
    # A descriptor page stays one; any other frame must be able to take a writable type
    # (a page table cannot).
    want = PageType.seg_desc if mem.type_count[mfn] and mem.type[mfn] == PageType.seg_desc else PageType.writable
    try:
        pt.get_type(mfn, want, dom)
    except MMUError as e:
        raise HypercallError(Errno.EINVAL, f"update_descriptor: {e}") from None
    try:
        mem.write_u64(gaddr, fixed)
    finally:
        pt.put_type(mfn)
    return 0


def set_ldt(v: "VCPU", ptr: int, ents: int) -> None:
    """MMUEXT_SET_LDT: linear address and entry count; mapped lazily on first use."""
    ents &= 0xFFFFFFFF
    if not ents:
        ptr = 0
    if ptr & (PAGE_SIZE - 1) or not (ptr < 1 << 47 or ptr >= HYPERVISOR_VIRT_END) or ents > MAX_LDT_ENTS:
        raise MMUError(Errno.EINVAL, "bad LDT")
    if (v.ldt_base, v.ldt_ents) == (ptr, ents):
        return
    _window(v)
    _destroy_ldt(v)
    v.ldt_base, v.ldt_ents = ptr, ents
    _load(v)


def ldt_fault(v: "VCPU", cr2: int, error: int) -> tuple[int, int] | None:
    """A #PF inside this vCPU's shadow-LDT window: map the guest's LDT page (True: retry the
    instruction), or give the guest the #PF at its own LDT address. Returns None when the
    fault is not in the window, else (0, 0) when fixed, or (error, guest cr2) to inject."""
    if v.desc_window is None:
        return None
    start = _area(v).va(v.desc_window) + 16 * PAGE_SIZE
    if not start <= cr2 < start + LDT_PAGES * PAGE_SIZE:
        return None
    off = cr2 - start
    linear = v.ldt_base + off
    page = off >> PAGE_SHIFT
    mmu = v.domain.hypervisor.pagetables
    try:
        if off >= v.ldt_ents * 8:
            raise GuestFault(linear, False)
        ma = mmu.translate(v.kernel_root << PAGE_SHIFT, linear, False)
        mfn = ma >> PAGE_SHIFT
        get_seg_desc(v, mfn)
    except (GuestFault, MMUError) as e:
        log.debug("d%d: LDT page at %#x not mappable: %s", v.domain.domid, linear, e)
        return (error, linear)
    old = v.ldt_shadow.get(page)
    if old is not None:
        v.domain.hypervisor.pagetables.put_type(old)
    v.ldt_shadow[page] = mfn
    _area(v).set_ldt_page(v.desc_window, page, mfn)
    v.engine.flush_tlb()
    return (0, 0)
