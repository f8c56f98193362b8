"""The domain builder: a Xen PV kernel ELF -> a domain's initial memory and vCPU state.

Lays out the initial address space as Xen's x86_64 PV builder does (xen-pv-abi.md §2.4):
kernel image at virt_base, then the P2M list, start_info, xenstore page, console page, the
bootstrap page tables (L4, L3s, L2s, L1s), one boot-stack page, all mapped 1:1 from
virt_base up to a 4 MiB boundary at least 512 KiB past the stack. Page-table frames are
mapped read-only; the L4 is validated and pinned like Xen's builder does.

Bad input (not an ELF, wrong machine, no Xen notes, a kernel larger than memory, an entry
outside the image) raises BuildError with a one-line reason that names the problem.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import struct
from typing import TYPE_CHECKING

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .abi import (
    MAX_GUEST_CMDLINE, PAGE_SHIFT, PAGE_SIZE, START_INFO_MAGIC, StartInfo, ElfNote,
    _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_PRESENT, _PAGE_RW, _PAGE_USER,
)
from .errors import BuildError
from .memory import PageType

if TYPE_CHECKING:
    from .domain import Domain

log = logging.getLogger("aiovmm.builder")

_NUMERIC_NOTES = {ElfNote.ENTRY, ElfNote.HYPERCALL_PAGE, ElfNote.VIRT_BASE, ElfNote.PADDR_OFFSET,
                  ElfNote.HV_START_LOW, ElfNote.INIT_P2M, ElfNote.MOD_START_PFN,
                  ElfNote.SUPPORTED_FEATURES, ElfNote.PHYS32_ENTRY, ElfNote.SUSPEND_CANCEL}
_STRING_NOTES = {ElfNote.INFO, ElfNote.XEN_VERSION, ElfNote.GUEST_OS, ElfNote.GUEST_VERSION,
                 ElfNote.LOADER, ElfNote.PAE_MODE, ElfNote.FEATURES, ElfNote.BSD_SYMTAB}
MB4 = 4 << 20


@dataclasses.dataclass
class KernelImage:
    """What the builder needs from a guest ELF."""
    path: str
    entry: int
    virt_base: int
    hypercall_page: int | None
    segments: list[tuple[int, bytes, int]]       # (placement VA, file bytes, memsz)
    kstart: int
    kend: int
    notes: dict[int, int | str]

    @property
    def guest_os(self) -> str:
        return str(self.notes.get(ElfNote.GUEST_OS, ""))


def _parse_notes(data: bytes) -> dict[int, int | str]:
    notes: dict[int, int | str] = {}
    off = 0
    while off + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, off)
        off += 12
        name = data[off:off + namesz].rstrip(b"\0")
        off += (namesz + 3) & ~3
        desc = data[off:off + descsz]
        off += (descsz + 3) & ~3
        if name != b"Xen":
            continue
        if ntype in _NUMERIC_NOTES:
            if descsz not in (1, 2, 4, 8):
                raise BuildError(f"Xen ELF note {ElfNote(ntype).name} has a {descsz}-byte value")
            notes[ntype] = int.from_bytes(desc, "little")
        elif ntype in _STRING_NOTES:
            notes[ntype] = desc.split(b"\0", 1)[0].decode("ascii", "replace")
        else:
            notes[ntype] = desc.hex()
    return notes


_cache: dict[tuple, KernelImage] = {}


def parse_kernel(path: str) -> KernelImage:
    """Parse and check a guest kernel (cached by path, size and mtime: booting the same
    kernel many times parses it once)."""
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
    if len(_cache) > 64:
        _cache.clear()
    _cache[key] = img
    return img


def _parse(path: str, raw: bytes) -> KernelImage:
    try:
        elf = ELFFile(io.BytesIO(raw))
        if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
            raise BuildError(f"{path}: not an x86_64 ELF64 kernel (class {elf.elfclass}, {elf['e_machine']})")
        notes: dict[int, int | str] = {}
        loads = []
        for seg in elf.iter_segments():
            if seg["p_offset"] + seg["p_filesz"] > len(raw) and seg["p_type"] in ("PT_NOTE", "PT_LOAD"):
                raise BuildError(f"{path}: truncated: a {seg['p_type']} segment ends at byte "
                                 f"{seg['p_offset'] + seg['p_filesz']}, the file has {len(raw)}")
            if seg["p_type"] == "PT_NOTE":
                notes.update(_parse_notes(seg.data()))
            elif seg["p_type"] == "PT_LOAD" and seg["p_memsz"]:
                if seg["p_filesz"] > seg["p_memsz"]:
                    raise BuildError(f"{path}: PT_LOAD with filesz > memsz")
                if seg["p_offset"] + seg["p_filesz"] > len(raw):
                    raise BuildError(f"{path}: truncated: a PT_LOAD segment ends at byte "
                                     f"{seg['p_offset'] + seg['p_filesz']}, the file has {len(raw)}")
                loads.append((seg["p_paddr"], seg.data(), seg["p_memsz"]))
        e_entry = elf["e_entry"]
    except ELFError as e:
        raise BuildError(f"{path}: malformed ELF: {e}") from None
    except (struct.error, ValueError) as e:
        raise BuildError(f"{path}: malformed ELF: {e}") from None
    if not notes:
        raise BuildError(f"{path}: no Xen ELF notes (is this a Xen PV kernel?)")
    if not loads:
        raise BuildError(f"{path}: no loadable segments")
    loader, guest_os = str(notes.get(ElfNote.LOADER, "")), str(notes.get(ElfNote.GUEST_OS, ""))
    if not (loader.startswith("generic") or guest_os.startswith("linux")):
        raise BuildError(f"{path}: Xen note LOADER must be 'generic' (got {loader!r})")
    xv = str(notes.get(ElfNote.XEN_VERSION, ""))
    if not xv.startswith("xen-3.0"):
        raise BuildError(f"{path}: Xen note XEN_VERSION must start with 'xen-3.0' (got {xv!r})")
    if ElfNote.PADDR_OFFSET in notes and ElfNote.VIRT_BASE not in notes:
        raise BuildError(f"{path}: Xen note PADDR_OFFSET without VIRT_BASE")
    virt_base = int(notes.get(ElfNote.VIRT_BASE, 0))
    paddr_offset = int(notes.get(ElfNote.PADDR_OFFSET, 0))
    if virt_base & (PAGE_SIZE - 1):
        raise BuildError(f"{path}: VIRT_BASE {virt_base:#x} is not page aligned")
    segments = [(pa - paddr_offset + virt_base, data, memsz) for pa, data, memsz in loads]
    kstart = min(s[0] for s in segments)
    kend = max(s[0] + s[2] for s in segments)
    entry = int(notes.get(ElfNote.ENTRY, e_entry))
    if not virt_base <= kstart <= entry < kend:
        raise BuildError(f"{path}: entry {entry:#x} outside the image [{kstart:#x}, {kend:#x}) "
                         f"or image below VIRT_BASE {virt_base:#x}")
    hp = notes.get(ElfNote.HYPERCALL_PAGE)
    if hp is not None:
        hp = int(hp)
        if hp & (PAGE_SIZE - 1) or not kstart <= hp < kend:
            raise BuildError(f"{path}: HYPERCALL_PAGE {hp:#x} is not a page inside the image")
    return KernelImage(path, entry, virt_base, hp, segments, kstart, kend, notes)


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

    def va(self, pfn: int) -> int:
        return self.virt_base + (pfn << PAGE_SHIFT)


def plan_layout(img: KernelImage, nr_pages: int) -> Layout:
    vb = img.virt_base
    cursor = ((img.kend - vb) + PAGE_SIZE - 1) >> PAGE_SHIFT
    p2m_pages = (nr_pages * 8 + PAGE_SIZE - 1) >> PAGE_SHIFT
    p2m_pfn = cursor
    cursor += p2m_pages
    si, store, cons = cursor, cursor + 1, cursor + 2
    pt_pfn = cursor + 3
    nr_pt = 1
    while True:
        stack_pfn = pt_pfn + nr_pt
        v_end = vb + ((stack_pfn + 1) << PAGE_SHIFT) + (512 << 10)
        v_end = (v_end + MB4 - 1) & ~(MB4 - 1)
        l3, l2, l1 = _tables_needed(vb, v_end)
        need = 1 + l3 + l2 + l1
        if need <= nr_pt:
            break
        nr_pt = need
    total = (v_end - vb) >> PAGE_SHIFT
    if total > nr_pages:
        raise BuildError(f"{img.path}: kernel and boot structures need {total * 4 >> 10} MiB "
                         f"mapped, the domain has only {nr_pages * 4 >> 10} MiB")
    return Layout(vb, p2m_pfn, p2m_pages, si, store, cons, pt_pfn, nr_pt, stack_pfn, v_end)


def build(dom: "Domain", img: KernelImage, cmdline: str, hcall_page: bytes | None = None) -> Layout:
    """Fill the domain's frames; returns the layout (the vCPU is set up by the domain).
    `hcall_page`: the vCPU engine's own hypercall page (default: the syscall stubs)."""
    mem = dom.mem
    if len(cmdline.encode()) >= MAX_GUEST_CMDLINE:
        raise BuildError(f"command line longer than {MAX_GUEST_CMDLINE - 1} bytes")
    lay = plan_layout(img, dom.nr_pages)
    p2m = dom.p2m
    vb = img.virt_base

    def maddr(va: int) -> int:
        pfn = (va - vb) >> PAGE_SHIFT
        return (p2m[pfn] << PAGE_SHIFT) | (va & (PAGE_SIZE - 1))

    def write_va(va: int, data: bytes) -> None:
        while data:
            n = min(len(data), PAGE_SIZE - (va & (PAGE_SIZE - 1)))
            mem.write(maddr(va), data[:n])
            va += n
            data = data[n:]

    for va, data, _memsz in img.segments:      # frames are zeroed: .bss is 0
        write_va(va, data)
    if img.hypercall_page is not None:
        write_va(img.hypercall_page, hcall_page if hcall_page is not None else hypercall_page())
    # P2M list
    p2m_bytes = struct.pack(f"<{dom.nr_pages}Q", *p2m)
    write_va(lay.va(lay.p2m_pfn), p2m_bytes)

    # Bootstrap page tables: L4, then L3s, L2s, L1s.
    l3n, l2n, l1n = _tables_needed(vb, lay.v_end)
    pfn = lay.pt_pfn
    l4 = p2m[pfn]
    l3s = [p2m[pfn + 1 + i] for i in range(l3n)]
    l2s = [p2m[pfn + 1 + l3n + i] for i in range(l2n)]
    l1s = [p2m[pfn + 1 + l3n + l2n + i] for i in range(l1n)]
    pt_mfns = set([l4] + l3s + l2s + l1s)
    upper = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY
    for level_tables, child_tables, shift in (([l4], l3s, 39), (l3s, l2s, 30), (l2s, l1s, 21)):
        for i, child in enumerate(child_tables):
            va = (vb >> shift << shift) + (i << shift)
            parent = level_tables[((va >> (shift + 9)) - (vb >> (shift + 9)))]
            mem.write_u64((parent << PAGE_SHIFT) + 8 * ((va >> shift) & 0x1FF), (child << PAGE_SHIFT) | upper)
    for i in range((lay.v_end - vb) >> PAGE_SHIFT):
        va = vb + (i << PAGE_SHIFT)
        mfn = p2m[i]
        flags = _PAGE_PRESENT | _PAGE_ACCESSED | (0 if mfn in pt_mfns else _PAGE_RW)
        l1 = l1s[(va >> 21) - (vb >> 21)]
        mem.write_u64((l1 << PAGE_SHIFT) + 8 * ((va >> 12) & 0x1FF), (mfn << PAGE_SHIFT) | flags)
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

    # start_info
    si = bytearray(PAGE_SIZE)
    si[0:len(START_INFO_MAGIC)] = START_INFO_MAGIC
    struct.pack_into("<Q", si, StartInfo.nr_pages, dom.nr_pages)
    struct.pack_into("<Q", si, StartInfo.shared_info, dom.shared_info_maddr)
    struct.pack_into("<I", si, StartInfo.flags, 0)
    struct.pack_into("<Q", si, StartInfo.store_mfn, p2m[lay.store_pfn])
    struct.pack_into("<I", si, StartInfo.store_evtchn, dom.store_port)
    struct.pack_into("<Q", si, StartInfo.console_mfn, p2m[lay.console_pfn])
    struct.pack_into("<I", si, StartInfo.console_evtchn, dom.console_port)
    struct.pack_into("<Q", si, StartInfo.pt_base, lay.va(lay.pt_pfn))
    struct.pack_into("<Q", si, StartInfo.nr_pt_frames, lay.nr_pt)
    struct.pack_into("<Q", si, StartInfo.mfn_list, lay.va(lay.p2m_pfn))
    c = cmdline.encode()
    si[StartInfo.cmd_line:StartInfo.cmd_line + len(c)] = c
    mem.write(p2m[lay.start_info_pfn] << PAGE_SHIFT, bytes(si))
    log.info("d%d: built %s: entry %#x, %d pages, mapped %#x-%#x, %d page tables",
             dom.domid, img.path, img.entry, dom.nr_pages, vb, lay.v_end, lay.nr_pt)
    return lay
