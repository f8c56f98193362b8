"""The domain builder: a Xen PV kernel (bzImage or ELF) -> a domain's initial memory and vCPU state.

Lays out the initial address space in the order Xen's x86_64 PV builder uses
(tools/libs/guest/xg_dom_core.c xc_dom_build_image, xg_dom_x86.c; xen-pv-abi.md §2.4), in
guest pfns from virt_base:
  kernel image; the ramdisk, when the kernel maps it (no MOD_START_PFN note); the P2M list,
  unless the kernel names its own address for it (INIT_P2M); start_info, xenstore page,
  console page; the bootstrap page tables (L4, L3s, L2s, L1s); one boot-stack page; padding
  to a 4 MiB boundary at least 512 KiB past the stack (all of this mapped 1:1 from
  virt_base); then, unmapped, the ramdisk of a MOD_START_PFN kernel (start_info.mod_start
  is its pfn) and the INIT_P2M list with the page tables that map it at the address the note
  names (start_info.first_p2m_pfn/nr_p2m_frames). Page-table frames are mapped read-only; the
  L4 is validated and pinned as Xen's builder asks Xen to.

Parsing (bzImage payloads, Xen notes, features) is loader.py's. Bad input raises BuildError
with a one-line reason that names the problem. Copying the image is one slice per run of
machine-contiguous frames, so load time is linear in the kernel's size.
"""
from __future__ import annotations

import array
import dataclasses
import enum
import logging
import os
import struct
from typing import TYPE_CHECKING

from . import loader
from .abi import (
    MAX_GUEST_CMDLINE, PAGE_SHIFT, PAGE_SIZE, START_INFO_MAGIC, StartInfo, ElfNote,
    _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_PRESENT, _PAGE_RW, _PAGE_USER,
)
from .errors import BuildError
from .memory import PageType

if TYPE_CHECKING:
    from .domain import Domain

log = logging.getLogger("aiovmm.builder")

MB4 = 4 << 20
_VA_MASK = (1 << 48) - 1
_BOOT_PADDING = 512 << 10          # xg_dom_x86.c alloc_pgtables_pv: 512 KiB past the stack


class StartInfoFlags(enum.IntFlag):
    """start_info.flags (public/xen.h SIF_*)."""
    PRIVILEGED = 1 << 0
    INITDOMAIN = 1 << 1
    MULTIBOOT_MOD = 1 << 2
    MOD_START_PFN = 1 << 3


@dataclasses.dataclass
class KernelImage:
    """What the builder needs from a guest kernel (see loader.ParsedKernel)."""
    path: str
    entry: int
    virt_base: int
    hypercall_page: int | None
    segments: list[tuple[int, memoryview, int]]       # (placement VA, file bytes, memsz)
    kstart: int
    kend: int
    notes: dict[int, int | str]
    p2m_base: int | None = None
    unmapped_initrd: bool = False
    compression: str = "none"
    parsed: loader.ParsedKernel | None = None

    @property
    def guest_os(self) -> str:
        return str(self.notes.get(ElfNote.GUEST_OS, ""))


_cache: dict[tuple, KernelImage] = {}


def parse_kernel(path: str) -> KernelImage:
    """Parse and check a guest kernel (cached by path, size and mtime: booting the same
    kernel many times reads and decompresses it once)."""
    try:
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        if key in _cache:
            return _cache[key]
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise BuildError(f"{path}: cannot read kernel: {e.strerror}") from None
    img = _parse(path, raw)
    if len(_cache) > 8:
        _cache.clear()
    _cache[key] = img
    return img


def clear_cache() -> None:
    """Forget parsed kernels (benchmarks measuring a cold load call this)."""
    _cache.clear()


def _parse(path: str, raw: bytes) -> KernelImage:
    p = loader.load(path, raw)
    return KernelImage(path, p.entry, p.virt_base, p.hypercall_page, p.segments, p.kstart, p.kend,
                       p.notes, p.p2m_base, p.unmapped_initrd, p.compression.value, p)


def read_ramdisk(path: str) -> bytes:
    """The ramdisk file's bytes (blocking: call from a worker thread)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BuildError(f"{path}: cannot read ramdisk: {e.strerror}") from None
    if not data:
        raise BuildError(f"{path}: ramdisk is empty")
    return data


def hypercall_page() -> bytes:
    """Xen's 64-bit PV hypercall page: 128 stubs of 32 bytes over a page of int3."""
    page = bytearray(b"\xcc" * PAGE_SIZE)
    for i in range(128):
        if i == 23:        # iret: push rcx; push r11; push rax; mov $23,%eax; syscall
            stub = b"\x51\x41\x53\x50\xb8" + (23).to_bytes(4, "little") + b"\x0f\x05"
        else:              # push rcx; push r11; mov $i,%eax; syscall; pop r11; pop rcx; ret
            stub = b"\x51\x41\x53\xb8" + i.to_bytes(4, "little") + b"\x0f\x05\x41\x5b\x59\xc3"
        page[32 * i:32 * i + len(stub)] = stub
    return bytes(page)


def _tables_needed(start: int, end: int) -> tuple[int, int, int]:
    """Number of L3, L2, L1 tables to map [start, end)."""
    def count(shift: int) -> int:
        return ((end - 1) >> shift) - (start >> shift) + 1
    return count(39), count(30), count(21)


# Page-table levels: (level, shift of the span one table of that level maps).
_LEVEL_SPAN = ((3, 39), (2, 30), (1, 21))


@dataclasses.dataclass
class Mapping:
    """One range of the initial address space: VAs [va, va + pages*4K) -> pfns from `pfn`."""
    va: int
    pages: int
    pfn: int


@dataclasses.dataclass
class Layout:
    virt_base: int
    p2m_pfn: int
    p2m_pages: int
    start_info_pfn: int
    store_pfn: int
    console_pfn: int
    pt_pfn: int
    nr_pt: int
    stack_pfn: int
    v_end: int
    ramdisk_pfn: int | None = None
    ramdisk_len: int = 0
    ramdisk_mapped: bool = True
    p2m_va: int = 0                      # start_info.mfn_list
    p2m_tables_pfn: int = 0              # INIT_P2M: tables mapping the list
    p2m_nr_pt: int = 0
    end_pfn: int = 0                     # first pfn not used by the boot layout
    mappings: list[Mapping] = dataclasses.field(default_factory=list)
    # (level, VA >> span shift) -> pfn of that page table; level 4 has key (4, 0).
    tables: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)

    def va(self, pfn: int) -> int:
        return self.virt_base + (pfn << PAGE_SHIFT)

    @property
    def mod_start(self) -> int:
        """start_info.mod_start: a pfn for an unmapped ramdisk, else its virtual address."""
        if self.ramdisk_pfn is None:
            return 0
        return self.ramdisk_pfn if not self.ramdisk_mapped else self.va(self.ramdisk_pfn)

    @property
    def mod_len(self) -> int:
        """start_info.mod_len: Xen gives an unmapped ramdisk's length in whole pages."""
        if self.ramdisk_pfn is None:
            return 0
        if self.ramdisk_mapped:
            return self.ramdisk_len
        return _pages(self.ramdisk_len) << PAGE_SHIFT


def _pages(nbytes: int) -> int:
    return (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT


def _new_tables(tables: dict[tuple[int, int], int], va: int, last: int, top: bool) -> list[tuple[int, int]]:
    """The tables (level, index) that mapping [va, last] needs beyond those in `tables`, in
    Xen's order: the L4 (first mapping only), L3s, L2s, L1s (count_pgtables)."""
    want: list[tuple[int, int]] = [(4, 0)] if top else []
    a, b = va & _VA_MASK, last & _VA_MASK
    for level, shift in _LEVEL_SPAN:
        want += [(level, i) for i in range(a >> shift, (b >> shift) + 1) if (level, i) not in tables]
    return want


def plan_layout(img: KernelImage, nr_pages: int, ramdisk_len: int = 0) -> Layout:
    """Where everything goes, in pfns (xc_dom_build_image's order); refuses a domain too
    small for it."""
    vb = img.virt_base

    def need(end_pfn: int, what: str) -> None:
        if end_pfn > nr_pages:
            raise BuildError(f"{img.path}: kernel and boot structures need {end_pfn * 4 >> 10} MiB "
                             f"({what}), the domain has only {nr_pages * 4 >> 10} MiB")

    cursor = _pages(img.kend - vb)
    need(cursor, "kernel")
    ramdisk_pfn, mapped = None, not img.unmapped_initrd
    if ramdisk_len and mapped:
        ramdisk_pfn = cursor
        cursor += _pages(ramdisk_len)
    p2m_pages = _pages(nr_pages * 8)
    p2m_pfn = cursor
    if img.p2m_base is None:
        cursor += p2m_pages
    si, store, cons = cursor, cursor + 1, cursor + 2
    pt_pfn = cursor + 3
    alloc_end = vb + ((cursor + 3) << PAGE_SHIFT)
    # alloc_pgtables_pv: grow the mapped area until it holds its own tables, the stack page
    # and 512 KiB; the area ends on a 4 MiB boundary (round_up(x, 4M-1) + 1).
    extra = 1 + (_BOOT_PADDING >> PAGE_SHIFT)
    pages = extra
    while True:
        v_end = ((alloc_end + (pages << PAGE_SHIFT)) | (MB4 - 1)) + 1
        tables: dict[tuple[int, int], int] = {}
        want = _new_tables(tables, vb, v_end - 1, True)
        pages = len(want) + extra
        if alloc_end + (pages << PAGE_SHIFT) <= v_end:
            break
    nr_pt = len(want)
    for i, key in enumerate(want):
        tables[key] = pt_pfn + i
    stack_pfn = pt_pfn + nr_pt
    mapped_pages = (v_end - vb) >> PAGE_SHIFT
    need(mapped_pages, "the initial mapping")
    mappings = [Mapping(vb, mapped_pages, 0)]
    cursor = mapped_pages
    if ramdisk_len and not mapped:
        ramdisk_pfn = cursor
        cursor += _pages(ramdisk_len)
        need(cursor, "ramdisk")
    p2m_va = vb + (p2m_pfn << PAGE_SHIFT)
    p2m_tables_pfn = p2m_nr_pt = 0
    if img.p2m_base is not None:
        p2m_pfn, p2m_va = cursor, img.p2m_base
        last = p2m_va + (p2m_pages << PAGE_SHIFT) - 1
        if p2m_va < v_end and last >= vb:
            raise BuildError(f"{img.path}: INIT_P2M {p2m_va:#x} overlaps the initial mapping")
        p2m_tables_pfn = p2m_pfn + p2m_pages
        more = _new_tables(tables, p2m_va, last, False)
        for i, key in enumerate(more):
            tables[key] = p2m_tables_pfn + i
        p2m_nr_pt = len(more)
        mappings.append(Mapping(p2m_va, p2m_pages, p2m_pfn))
        cursor = p2m_tables_pfn + p2m_nr_pt
        need(cursor, "the P2M list at INIT_P2M")
    return Layout(vb, p2m_pfn, p2m_pages, si, store, cons, pt_pfn, nr_pt, stack_pfn, v_end,
                  ramdisk_pfn, ramdisk_len, mapped, p2m_va, p2m_tables_pfn, p2m_nr_pt,
                  max(cursor, mapped_pages), mappings, tables)


def _write_pfns(dom: "Domain", pfn: int, data: bytes | memoryview, offset: int = 0) -> None:
    """Copy `data` into the domain's pfns from (pfn, offset): one write per run of
    machine-contiguous frames (the builder's frames usually form one run)."""
    p2m, fd = dom.p2m, dom.mem.fd
    data = memoryview(data)
    n, done = len(data), 0
    while done < n:
        mfn = p2m[pfn]
        want = (offset + n - done + PAGE_SIZE - 1) >> PAGE_SHIFT
        k = 1
        while k < want and p2m[pfn + k] == mfn + k:
            k += 1
        take = min((k << PAGE_SHIFT) - offset, n - done)
        base = (mfn << PAGE_SHIFT) + offset
        # pwrite into the memfd: the kernel copies (about 2x a slice assignment into the
        # mapping, which page-faults per page) and the GIL is released meanwhile.
        chunk, put = data[done:done + take], 0
        while put < take:
            put += os.pwrite(fd, chunk[put:], base + put)
        done += take
        pfn += (offset + take) >> PAGE_SHIFT
        offset = (offset + take) & (PAGE_SIZE - 1)


def _write_tables(dom: "Domain", lay: Layout) -> int:
    """Fill the bootstrap page tables (setup_pgtables_pv); returns the L4's mfn."""
    p2m, mem = dom.p2m, dom.mem
    upper = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY
    contents: dict[int, array.array] = {pfn: array.array("Q", bytes(PAGE_SIZE)) for pfn in lay.tables.values()}
    l4 = lay.tables[(4, 0)]
    for (level, idx), pfn in lay.tables.items():
        if level == 4:
            continue
        parent = lay.tables[(level + 1, idx >> 9)] if level < 3 else l4
        contents[parent][idx & 0x1FF] = (p2m[pfn] << PAGE_SHIFT) | upper
    table_pfns = set(lay.tables.values())
    leaf = _PAGE_PRESENT | _PAGE_ACCESSED
    for m in lay.mappings:
        # One slice per L1 table the range crosses (the mapping is VA-contiguous), the page
        # tables themselves read-only.
        i = 0
        while i < m.pages:
            va = (m.va + (i << PAGE_SHIFT)) & _VA_MASK
            slot = (va >> PAGE_SHIFT) & 0x1FF
            k = min(512 - slot, m.pages - i)
            pfn = m.pfn + i
            contents[lay.tables[(1, va >> 21)]][slot:slot + k] = array.array(
                "Q", [(mfn << PAGE_SHIFT) | leaf | _PAGE_RW for mfn in p2m[pfn:pfn + k]])
            i += k
        for pfn in table_pfns:
            if m.pfn <= pfn < m.pfn + m.pages:
                va = (m.va + ((pfn - m.pfn) << PAGE_SHIFT)) & _VA_MASK
                contents[lay.tables[(1, va >> 21)]][(va >> PAGE_SHIFT) & 0x1FF] &= ~_PAGE_RW
    for pfn, entries in contents.items():
        mem.write(p2m[pfn] << PAGE_SHIFT, entries.tobytes())
    return p2m[l4]


def plan(dom: "Domain", img: KernelImage, cmdline: str, ramdisk: bytes | None = None) -> Layout:
    """Check the request and lay the domain out (no frame written yet)."""
    if len(cmdline.encode()) >= MAX_GUEST_CMDLINE:
        raise BuildError(f"command line longer than {MAX_GUEST_CMDLINE - 1} bytes")
    return plan_layout(img, dom.nr_pages, len(ramdisk) if ramdisk else 0)


def image_bytes(img: KernelImage, ramdisk: bytes | None = None) -> int:
    """What copy_image writes: the kernel's file-backed segment bytes and the ramdisk."""
    return sum(len(data) for _va, data, _memsz in img.segments) + (len(ramdisk) if ramdisk else 0)


def copy_image(dom: "Domain", img: KernelImage, lay: Layout, ramdisk: bytes | None = None) -> None:
    """Copy the kernel's segments and the ramdisk into the domain's frames. Touches only the
    new domain's own frames (pwrite on the memfd, no Python state changed), so the
    hypervisor runs it in a worker thread when it is large (image_bytes): tens of MB are not
    copied on the event loop."""
    vb = img.virt_base
    for va, data, _memsz in img.segments:      # frames are zeroed: .bss is 0
        _write_pfns(dom, (va - vb) >> PAGE_SHIFT, data, va & (PAGE_SIZE - 1))
    if ramdisk:
        _write_pfns(dom, lay.ramdisk_pfn, ramdisk)


def build(dom: "Domain", img: KernelImage, cmdline: str, ramdisk: bytes | None = None,
          hcall_page: bytes | None = None) -> Layout:
    """Fill the domain's frames; returns the layout (the vCPU is set up by the domain).
    `hcall_page`: the vCPU engine's own hypercall page (default: the syscall stubs)."""
    lay = plan(dom, img, cmdline, ramdisk)
    copy_image(dom, img, lay, ramdisk)
    finish(dom, img, lay, cmdline, ramdisk, hcall_page)
    return lay


def finish(dom: "Domain", img: KernelImage, lay: Layout, cmdline: str, ramdisk: bytes | None = None,
           hcall_page: bytes | None = None) -> None:
    """Everything after the image copy: hypercall page, P2M list, page tables (validated and
    pinned), reserved grants, start_info. On the loop: it changes frame-table state."""
    mem = dom.mem
    p2m = dom.p2m
    vb = img.virt_base
    if img.hypercall_page is not None:
        _write_pfns(dom, (img.hypercall_page - vb) >> PAGE_SHIFT,
                    hcall_page if hcall_page is not None else hypercall_page())
    _write_pfns(dom, lay.p2m_pfn, array.array("Q", p2m).tobytes())
    l4 = _write_tables(dom, lay)
    # Validate and pin the L4 the way Xen's builder asks Xen to (MMUEXT_PIN_L4_TABLE).
    pt = dom.hypervisor.pagetables
    pt.get_type(l4, PageType.l4, dom.domid)
    mem.pinned[l4] = 1
    dom.boot_l4 = l4

    # Reserved grant entries (xg_dom_boot.c): console and xenstore pages to the backends (dom0).
    from .grants import GTF_permit_access, GNTTAB_RESERVED_CONSOLE, GNTTAB_RESERVED_XENSTORE, HOST_DOMID
    dom.grants.write_entry(GNTTAB_RESERVED_CONSOLE, GTF_permit_access, HOST_DOMID, p2m[lay.console_pfn])
    dom.grants.write_entry(GNTTAB_RESERVED_XENSTORE, GTF_permit_access, HOST_DOMID, p2m[lay.store_pfn])
    dom.console_mfn, dom.store_mfn = p2m[lay.console_pfn], p2m[lay.store_pfn]

    # start_info (xg_dom_x86.c start_info_x86_64)
    flags = StartInfoFlags(0)
    if ramdisk and not lay.ramdisk_mapped:
        flags |= StartInfoFlags.MOD_START_PFN
    si = bytearray(PAGE_SIZE)
    si[0:len(START_INFO_MAGIC)] = START_INFO_MAGIC
    struct.pack_into("<Q", si, StartInfo.nr_pages, dom.nr_pages)
    struct.pack_into("<Q", si, StartInfo.shared_info, dom.shared_info_maddr)
    struct.pack_into("<I", si, StartInfo.flags, int(flags))
    struct.pack_into("<Q", si, StartInfo.store_mfn, p2m[lay.store_pfn])
    struct.pack_into("<I", si, StartInfo.store_evtchn, dom.store_port)
    struct.pack_into("<Q", si, StartInfo.console_mfn, p2m[lay.console_pfn])
    struct.pack_into("<I", si, StartInfo.console_evtchn, dom.console_port)
    struct.pack_into("<Q", si, StartInfo.pt_base, lay.va(lay.pt_pfn))
    struct.pack_into("<Q", si, StartInfo.nr_pt_frames, lay.nr_pt)
    struct.pack_into("<Q", si, StartInfo.mfn_list, lay.p2m_va)
    struct.pack_into("<Q", si, StartInfo.mod_start, lay.mod_start)
    struct.pack_into("<Q", si, StartInfo.mod_len, lay.mod_len)
    if img.p2m_base is not None:
        struct.pack_into("<Q", si, StartInfo.first_p2m_pfn, lay.p2m_pfn)
        struct.pack_into("<Q", si, StartInfo.nr_p2m_frames, lay.p2m_pages + lay.p2m_nr_pt)
    c = cmdline.encode()
    si[StartInfo.cmd_line:StartInfo.cmd_line + len(c)] = c
    mem.write(p2m[lay.start_info_pfn] << PAGE_SHIFT, bytes(si))
    log.info("d%d: built %s (%s): entry %#x, %d pages, mapped %#x-%#x, %d page tables, "
             "ramdisk %s, p2m at %#x", dom.domid, img.path, img.compression, img.entry, dom.nr_pages,
             vb, lay.v_end, lay.nr_pt,
             f"{lay.ramdisk_len} bytes at {'va' if lay.ramdisk_mapped else 'pfn'} {lay.mod_start:#x}"
             if ramdisk else "none", lay.p2m_va)
