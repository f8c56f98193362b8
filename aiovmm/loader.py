"""Kernel images as Xen's loaders take them: a bzImage or an ELF with Xen notes.

What Xen's libxenguest accepts for a PV guest, aiovmm accepts (tools/libs/guest/
xg_dom_bzimageloader.c, xg_dom_elfloader.c, xen/common/libelf/libelf-dominfo.c):

- a bzImage: the setup header (boot protocol >= 2.08) names the compressed payload
  ((setup_sects + 1) * 512 + payload_offset, payload_length); the payload is the kernel's
  ELF, compressed with gzip, bzip2, xz, lzma, lzo (lzop container), lz4 (legacy frames) or
  zstd, as the kernel's build may choose (Debian's 6.1 amd64 kernel: xz);
- an ELF64 x86_64 image whose Xen notes sit in PT_NOTE segments, or, when no segment holds
  any, in SHT_NOTE sections (libelf's fallback).

Every Xen note is either honoured (ParsedKernel carries it to the builder) or refused with a
one-line BuildError; nothing is silently dropped that changes how the guest must be built:
  ENTRY, VIRT_BASE, PADDR_OFFSET   placement and entry (libelf's bounds checks)
  HYPERCALL_PAGE                   the builder writes Xen's stubs there
  XEN_VERSION, LOADER, GUEST_OS    must say xen-3.0 and generic/linux (elf_xen_note_check)
  FEATURES, SUPPORTED_FEATURES     `!` features must be known, supported by the kernel's own
                                   list and available to a PV domU (PV_PROVIDED_FEATURES)
  INIT_P2M                         the P2M list mapped at that address (below VIRT_BASE)
  MOD_START_PFN                    the ramdisk unmapped, announced by pfn (SIF_MOD_START_PFN)
  BSD_SYMTAB = yes                 refused (aiovmm does not load symbol tables)
  SUSPEND_CANCEL, L1_MFN_VALID     recorded (they matter to save/restore, not to the build)
  HV_START_LOW, PAE_MODE           recorded; Xen uses them for 32-bit guests only
  GUEST_VERSION, PHYS32_ENTRY, others  recorded; PHYS32_* are PVH-only and unknown types are
                                   ignored, as libelf does
Malformed notes (sizes past their area, numeric values not 1/2/4/8 bytes, unterminated
strings) are refused.
This module is pure parsing (no domain state): it runs in a worker thread.
"""
from __future__ import annotations

import bz2
import dataclasses
import enum
import hashlib
import logging
import lzma
import os
import struct
import tempfile
import zlib

from .abi import HYPERVISOR_VIRT_END, HYPERVISOR_VIRT_START, PAGE_SIZE, ElfNote
from .errors import BuildError

# A decompressed kernel larger than this is refused (Xen: xc_dom_kernel_check_size, whose
# default limit is 1 GiB for decompressed kernels).
MAX_KERNEL_BYTES = 1 << 30
_LZOP_MAX_BLOCK = 64 << 20
_MAX_NOTES = 1024                  # libelf: ELF_MAX_TOTAL_NOTE_COUNT
log = logging.getLogger("aiovmm.loader")

# Decompressed payloads of big kernels are kept on disk, keyed by the SHA-256 of the
# compressed bytes: Debian's xz payload takes ~2-5 s to decompress (most of a cold load),
# reading the cached 66 MB ELF ~50 ms. Content-keyed, so a changed kernel never hits a stale
# entry; the result is parsed and checked like a fresh one. AIOVMM_KERNEL_CACHE names the
# directory ("off" disables); small payloads (test kernels) are never cached.
CACHE_MIN_PAYLOAD = 2 << 20
CACHE_ENTRIES = 4


class XenFeature(enum.IntEnum):
    """XENFEAT_* bits (public/features.h) that FEATURES notes may name (libelf's table)."""
    writable_page_tables = 0
    writable_descriptor_tables = 1
    auto_translated_physmap = 2
    supervisor_mode_kernel = 3
    pae_pgdir_above_4gb = 4
    hvm_callback_vector = 8
    dom0 = 11


# Features a kernel may *require* of an aiovmm PV domain: those that a 64-bit PV domU on Xen
# really gets. The others (translated physmap, supervisor-mode kernel, HVM callback vector,
# writable descriptor tables) are HVM/PVH or long-removed PV modes; dom0 is refused by
# libxenguest for any domU.
PV_PROVIDED_FEATURES = frozenset({XenFeature.writable_page_tables, XenFeature.pae_pgdir_above_4gb})


class Compression(enum.Enum):
    none = "none"
    gzip = "gzip"
    bzip2 = "bzip2"
    xz = "xz"
    lzma = "lzma"
    lzo = "lzo"
    lz4 = "lz4"
    zstd = "zstd"


# (magic, method), probed in this order (Xen's bzimage loader checks the same prefixes).
_MAGICS = (
    (b"\x1f\x8b", Compression.gzip),
    (b"BZh", Compression.bzip2),
    (b"\xfd7zXZ\x00", Compression.xz),
    (b"\x28\xb5\x2f\xfd", Compression.zstd),
    (b"\x5d\x00", Compression.lzma),
    (b"\x89LZO\x00\r\n\x1a\n", Compression.lzo),
    (b"\x02\x21\x4c\x18", Compression.lz4),
)


@dataclasses.dataclass
class ParsedKernel:
    """The ELF image and the Xen parameters from its notes, after every check."""
    elf: bytes
    compression: Compression
    entry: int
    virt_base: int
    paddr_offset: int
    kstart: int
    kend: int
    hypercall_page: int | None
    p2m_base: int | None                     # INIT_P2M
    unmapped_initrd: bool                    # MOD_START_PFN
    hv_start_low: int | None
    suspend_cancel: bool
    l1_mfn_valid: list[tuple[int, int]]      # (mask, value) pairs, for save/restore
    features_supported: frozenset[int]
    features_required: frozenset[int]
    segments: list[tuple[int, memoryview, int]]   # (placement VA, file bytes, memsz)
    notes: dict[int, int | str]
    notes_from: str                          # "segments" or "sections"


# -- bzImage --------------------------------------------------------------------------------
def is_bzimage(raw: bytes) -> bool:
    return len(raw) >= 0x250 and raw[0x202:0x206] == b"HdrS"


def bzimage_payload(path: str, raw: bytes) -> memoryview:
    """The compressed payload named by the x86 boot protocol's setup header."""
    version = struct.unpack_from("<H", raw, 0x206)[0]
    if version < 0x0208:
        raise BuildError(f"{path}: bzImage boot protocol {version >> 8}.{version & 0xff:02d} is too "
                         f"old (2.08 or later names the payload)")
    setup_sects = raw[0x1F1]
    payload_offset, payload_length = struct.unpack_from("<II", raw, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    if start >= len(raw):
        raise BuildError(f"{path}: bzImage payload offset {start:#x} is past the end of the file "
                         f"({len(raw):#x} bytes)")
    if start + payload_length > len(raw):
        raise BuildError(f"{path}: bzImage payload ({payload_length} bytes at {start:#x}) runs past "
                         f"the end of the file ({len(raw)} bytes): truncated?")
    return memoryview(raw)[start:start + payload_length]


def detect_compression(data: bytes | memoryview) -> Compression | None:
    head = bytes(data[:16])
    if head[:4] == b"\x7fELF":
        return Compression.none
    for magic, method in _MAGICS:
        if head.startswith(magic):
            return method
    return None


def decompress(path: str, method: Compression, data: memoryview) -> bytes:
    """Decompress a kernel payload; a corrupt one is a BuildError naming the method."""
    try:
        out = _DECOMPRESSORS[method](data)
    except BuildError:
        raise
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error, RuntimeError, _zstd_error()) as e:
        raise BuildError(f"{path}: cannot {method.value}-decompress the kernel payload: {e}") from None
    if len(out) > MAX_KERNEL_BYTES:
        raise BuildError(f"{path}: decompressed kernel is larger than {MAX_KERNEL_BYTES >> 20} MiB")
    return out


def _cache_dir() -> str | None:
    d = os.environ.get("AIOVMM_KERNEL_CACHE")
    if d == "off":
        return None
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "aiovmm", "kernels")
    return d


def decompress_cached(path: str, method: Compression, data: memoryview) -> bytes:
    """decompress(), through the on-disk cache for big payloads (see CACHE_MIN_PAYLOAD)."""
    d = _cache_dir() if len(data) >= CACHE_MIN_PAYLOAD else None
    if d is None:
        return decompress(path, method, data)
    entry = os.path.join(d, f"{hashlib.sha256(data).hexdigest()}.{method.value}.elf")
    try:
        with open(entry, "rb") as f:
            out = f.read()
        if 0 < len(out) <= MAX_KERNEL_BYTES:
            os.utime(entry)                     # most recently used
            return out
    except OSError:
        pass
    out = decompress(path, method, data)
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(out)
            os.replace(tmp, entry)              # atomic: concurrent loaders see all or nothing
        except OSError:
            os.unlink(tmp)
            raise
        olds = sorted((e for e in os.scandir(d) if e.name.endswith(".elf")),
                      key=lambda e: e.stat().st_mtime_ns, reverse=True)[CACHE_ENTRIES:]
        for e in olds:
            os.unlink(e.path)
    except OSError as e:
        log.debug("kernel cache %s not written: %s", d, e)
    return out


def _zstd_error() -> type[Exception]:
    import zstandard
    return zstandard.ZstdError


def _gunzip(data: memoryview) -> bytes:
    d = zlib.decompressobj(wbits=31)
    out = d.decompress(data, MAX_KERNEL_BYTES + 1)
    if not d.eof and len(out) <= MAX_KERNEL_BYTES:
        raise EOFError("compressed data ended early")
    return out


def _bunzip2(data: memoryview) -> bytes:
    d = bz2.BZ2Decompressor()
    out = d.decompress(data, MAX_KERNEL_BYTES + 1)
    if not d.eof and len(out) <= MAX_KERNEL_BYTES:
        raise EOFError("compressed data ended early")
    return out


def _lzma_like(fmt: int):
    def run(data: memoryview) -> bytes:
        d = lzma.LZMADecompressor(format=fmt)
        out = d.decompress(data, MAX_KERNEL_BYTES + 1)
        if not d.eof and len(out) <= MAX_KERNEL_BYTES:
            raise EOFError("compressed data ended early")
        return out
    return run


def _unzstd(data: memoryview) -> bytes:
    import zstandard
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise ValueError(f"zstd: {e}") from None
    if size > MAX_KERNEL_BYTES:          # the kernel's zstd frames say their size (-1: unknown)
        raise ValueError(f"zstd frame says {size} bytes, more than {MAX_KERNEL_BYTES >> 20} MiB")
    d = zstandard.ZstdDecompressor().decompressobj()
    out = d.decompress(data)
    if not d.eof and len(out) <= MAX_KERNEL_BYTES:
        raise EOFError("compressed data ended early")
    return out


def _unlz4(data: memoryview) -> bytes:
    """LZ4 legacy frames (`lz4 -l`, what the kernel's build writes): magic, then blocks of
    (le32 compressed size, data), each decompressing to at most 8 MiB; the kernel build
    appends the le32 uncompressed size, which is not a block."""
    import lz4.block
    off, out, n = 4, bytearray(), len(data)
    while off + 4 <= n:
        size = struct.unpack_from("<I", data, off)[0]
        if size == 0x184C2102:                       # a further legacy stream: new magic
            off += 4
            continue
        if off + 4 + size > n:
            if off + 4 == n:                         # the trailing size word
                break
            raise EOFError(f"lz4 block of {size} bytes runs past the payload")
        try:
            out += lz4.block.decompress(data[off + 4:off + 4 + size], uncompressed_size=8 << 20)
        except lz4.block.LZ4BlockError as e:
            raise ValueError(f"lz4: {e}") from None
        off += 4 + size
        if len(out) > MAX_KERNEL_BYTES:
            break
    if not out:
        raise EOFError("no lz4 blocks")
    return bytes(out)


_F_ADLER32_D, _F_ADLER32_C, _F_H_FILTER, _F_CRC32_D, _F_CRC32_C = 0x1, 0x2, 0x800, 0x100, 0x200


def _unlzo(data: memoryview) -> bytes:
    """The lzop container (`lzop -9`): header, then blocks of (dst_len, src_len, checksums,
    data); a block whose src_len equals dst_len is stored. A dst_len of 0 ends the stream."""
    import lzo
    b = bytes(data)
    if len(b) < 16 + 9:
        raise EOFError("lzop header truncated")
    off = 9
    version = struct.unpack_from(">H", b, off)[0]
    off += 2 + 2                                     # version, library version
    if version >= 0x0940:
        off += 2                                     # version needed to extract
    method = b[off]
    off += 1
    if method not in (1, 2, 3):                      # LZO1X-1, LZO1X-1(15), LZO1X-999
        raise ValueError(f"lzop method {method} is not LZO1X")
    if version >= 0x0940:
        off += 1                                     # level
    flags = struct.unpack_from(">I", b, off)[0]
    off += 4
    if flags & _F_H_FILTER:
        off += 4
    off += 4 + 4                                     # mode, mtime_low
    if version >= 0x0940:
        off += 4                                     # mtime_high
    off += 1 + b[off] + 4                            # file name, header checksum
    out = bytearray()
    while True:
        if off + 4 > len(b):
            raise EOFError("lzop stream ends without its end marker")
        dst_len = struct.unpack_from(">I", b, off)[0]
        off += 4
        if dst_len == 0:
            return bytes(out)
        if dst_len > _LZOP_MAX_BLOCK:
            raise ValueError(f"lzop block of {dst_len} bytes is too large")
        src_len = struct.unpack_from(">I", b, off)[0]
        off += 4
        off += 4 * (bool(flags & _F_ADLER32_D) + bool(flags & _F_CRC32_D))
        if src_len < dst_len:
            off += 4 * (bool(flags & _F_ADLER32_C) + bool(flags & _F_CRC32_C))
        if off + src_len > len(b) or src_len > dst_len:
            raise EOFError("lzop block runs past the payload")
        block = b[off:off + src_len]
        off += src_len
        if src_len == dst_len:
            out += block
        else:
            try:
                got = lzo.decompress(block, False, dst_len)
            except lzo.error as e:
                raise ValueError(f"lzo: {e}") from None
            if len(got) != dst_len:
                raise ValueError("lzo block decompressed to the wrong size")
            out += got
        if len(out) > MAX_KERNEL_BYTES:
            return bytes(out)


_DECOMPRESSORS = {
    Compression.gzip: _gunzip,
    Compression.bzip2: _bunzip2,
    Compression.xz: _lzma_like(lzma.FORMAT_XZ),
    Compression.lzma: _lzma_like(lzma.FORMAT_ALONE),
    Compression.zstd: _unzstd,
    Compression.lz4: _unlz4,
    Compression.lzo: _unlzo,
}


# -- ELF --------------------------------------------------------------------------------------
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
PT_LOAD, PT_NOTE, SHT_NOTE = 1, 4, 7
EM_X86_64 = 62

_NUMERIC_NOTES = frozenset({ElfNote.ENTRY, ElfNote.HYPERCALL_PAGE, ElfNote.VIRT_BASE,
                            ElfNote.PADDR_OFFSET, ElfNote.HV_START_LOW, ElfNote.INIT_P2M,
                            ElfNote.MOD_START_PFN, ElfNote.SUSPEND_CANCEL, ElfNote.PHYS32_ENTRY})
_STRING_NOTES = frozenset({ElfNote.XEN_VERSION, ElfNote.GUEST_OS, ElfNote.GUEST_VERSION,
                           ElfNote.LOADER, ElfNote.PAE_MODE, ElfNote.FEATURES, ElfNote.BSD_SYMTAB})


def _note_name(ntype: int) -> str:
    try:
        return ElfNote(ntype).name
    except ValueError:
        return str(ntype)


def parse_notes(path: str, data: bytes | memoryview, notes: dict[int, int | str],
                count: list[int]) -> int:
    """Parse one note area into `notes`; returns how many Xen notes it held. Malformed notes
    (sizes past the area, bad numeric sizes, unterminated strings) are refused."""
    off, n, found = 0, len(data), 0
    while off < n:
        if off + 12 > n:
            raise BuildError(f"{path}: malformed ELF note: header at offset {off} runs past its area")
        count[0] += 1
        if count[0] > _MAX_NOTES:
            raise BuildError(f"{path}: malformed ELF notes: more than {_MAX_NOTES} notes")
        namesz, descsz, ntype = struct.unpack_from("<III", data, off)
        name_off = off + 12
        desc_off = name_off + ((namesz + 3) & ~3)
        end = desc_off + ((descsz + 3) & ~3)
        if desc_off + descsz > n or name_off + namesz > n:
            raise BuildError(f"{path}: malformed ELF note: name/desc sizes ({namesz}, {descsz}) run "
                             f"past the note area")
        name = bytes(data[name_off:name_off + namesz])
        desc = bytes(data[desc_off:desc_off + descsz])
        off = end
        if name.rstrip(b"\0") != b"Xen" or (namesz and name[-1:] != b"\0"):
            continue
        found += 1
        if ntype in _NUMERIC_NOTES:
            if descsz not in (1, 2, 4, 8):
                raise BuildError(f"{path}: malformed Xen ELF note {_note_name(ntype)}: a {descsz}-byte "
                                 f"value (1, 2, 4 or 8 bytes expected)")
            notes[ntype] = int.from_bytes(desc, "little")
        elif ntype in _STRING_NOTES:
            # The NUL may sit in the alignment padding (Linux's FEATURES note is `.ascii`
            # with a descsz that excludes it); libelf reads up to the first NUL.
            desc = bytes(data[desc_off:min(end, n)])
            if b"\0" not in desc:
                raise BuildError(f"{path}: malformed Xen ELF note {_note_name(ntype)}: string is not "
                                 f"NUL-terminated")
            try:
                notes[ntype] = desc.split(b"\0", 1)[0].decode("ascii")
            except UnicodeDecodeError:
                raise BuildError(f"{path}: malformed Xen ELF note {_note_name(ntype)}: not ASCII") from None
        elif ntype == ElfNote.SUPPORTED_FEATURES:
            if descsz % 4 or not descsz:
                raise BuildError(f"{path}: malformed Xen ELF note SUPPORTED_FEATURES: {descsz} bytes "
                                 f"(a multiple of 4 expected)")
            notes[ntype] = int.from_bytes(desc, "little")
        elif ntype == ElfNote.L1_MFN_VALID:
            if descsz % 16 and descsz % 8:
                raise BuildError(f"{path}: malformed Xen ELF note L1_MFN_VALID: {descsz} bytes")
            notes[ntype] = desc.hex()
        else:                                   # unknown to libelf too: logged and ignored there
            notes[ntype] = desc.hex()
    return found


def parse_features(path: str, text: str) -> tuple[set[int], set[int]]:
    """FEATURES: `name|!name|...` (libelf's syntax); `!` marks a feature the kernel requires.
    An unknown required feature is refused, an unknown optional one ignored (as libelf)."""
    supported: set[int] = set()
    required: set[int] = set()
    for item in text.split("|"):
        if not item:
            continue
        req = item.startswith("!")
        name = item[1:] if req else item
        try:
            feat = XenFeature[name]
        except KeyError:
            if req:
                raise BuildError(f"{path}: Xen note FEATURES requires unknown feature {name!r}") from None
            continue
        supported.add(feat)
        if req:
            required.add(feat)
    return supported, required


def _l1_mfn_valid(hexdesc: str) -> list[tuple[int, int]]:
    raw = bytes.fromhex(hexdesc)
    w = 8 if len(raw) % 16 == 0 else 4
    vals = [int.from_bytes(raw[i:i + w], "little") for i in range(0, len(raw), w)]
    return list(zip(vals[0::2], vals[1::2]))


def parse_elf(path: str, elf: bytes, compression: Compression = Compression.none) -> ParsedKernel:
    """libelf's elf_xen_parse + libxenguest's checks, for a 64-bit PV domU."""
    if len(elf) < _EHDR.size or elf[:4] != b"\x7fELF":
        raise BuildError(f"{path}: malformed ELF: Magic number does not match (not an ELF or bzImage)"
                         if len(elf) >= 4 else f"{path}: malformed ELF: file is empty or truncated")
    if elf[4] != 2:
        raise BuildError(f"{path}: not an x86_64 ELF64 kernel (class {32 if elf[4] == 1 else elf[4]})")
    (_ident, _type, machine, _ver, e_entry, phoff, shoff, _flags, _ehsize, phentsize, phnum,
     shentsize, shnum, _shstrndx) = _EHDR.unpack_from(elf, 0)
    if elf[5] != 1 or machine != EM_X86_64:
        raise BuildError(f"{path}: not an x86_64 ELF64 kernel (machine {machine})")
    n = len(elf)
    if phnum and (phentsize < _PHDR.size or phoff + phnum * phentsize > n):
        raise BuildError(f"{path}: malformed ELF: truncated program headers")
    view = memoryview(elf)
    notes: dict[int, int | str] = {}
    count = [0]
    loads: list[tuple[int, int, int, int]] = []
    xen_in_segments = 0
    for i in range(phnum):
        p_type, _fl, p_offset, _va, p_paddr, p_filesz, p_memsz, _al = _PHDR.unpack_from(elf, phoff + i * phentsize)
        if p_type not in (PT_LOAD, PT_NOTE):
            continue
        if p_offset + p_filesz > n:
            raise BuildError(f"{path}: truncated: a {'PT_NOTE' if p_type == PT_NOTE else 'PT_LOAD'} "
                             f"segment ends at byte {p_offset + p_filesz}, the file has {n}")
        if p_type == PT_NOTE:
            if p_offset == 0:                  # libelf: some binutils leave p_offset 0
                continue
            xen_in_segments += parse_notes(path, view[p_offset:p_offset + p_filesz], notes, count)
        elif p_memsz:
            if p_filesz > p_memsz:
                raise BuildError(f"{path}: PT_LOAD with filesz > memsz")
            loads.append((p_paddr, p_offset, p_filesz, p_memsz))
    notes_from = "segments"
    if not xen_in_segments:
        notes.clear()
        notes_from = "sections"
        if shnum and shoff and (shentsize < _SHDR.size or shoff + shnum * shentsize > n):
            raise BuildError(f"{path}: malformed ELF: truncated section headers")
        for i in range(1, shnum if shoff else 0):
            (_nm, sh_type, _f, _a, sh_offset, sh_size, *_rest) = _SHDR.unpack_from(elf, shoff + i * shentsize)
            if sh_type != SHT_NOTE:
                continue
            if sh_offset + sh_size > n:
                raise BuildError(f"{path}: truncated: a SHT_NOTE section ends at byte "
                                 f"{sh_offset + sh_size}, the file has {n}")
            parse_notes(path, view[sh_offset:sh_offset + sh_size], notes, count)
    if not notes:
        raise BuildError(f"{path}: no Xen ELF notes (is this a Xen PV kernel?)")
    if not loads:
        raise BuildError(f"{path}: no loadable segments")
    return _check(path, elf, view, compression, notes, notes_from, loads, e_entry)


def _check(path: str, elf: bytes, view: memoryview, compression: Compression,
           notes: dict[int, int | str], notes_from: str,
           loads: list[tuple[int, int, int, int]], e_entry: int) -> ParsedKernel:
    """elf_xen_note_check, elf_xen_addr_calc_check and xc_dom_parse_image's feature check."""
    loader, guest_os = str(notes.get(ElfNote.LOADER, "")), str(notes.get(ElfNote.GUEST_OS, ""))
    if not (loader.startswith("generic") or guest_os.startswith("linux")):
        raise BuildError(f"{path}: Xen note LOADER must be 'generic' (got {loader!r}) or GUEST_OS "
                         f"'linux' (got {guest_os!r})")
    xv = str(notes.get(ElfNote.XEN_VERSION, ""))
    if not xv.startswith("xen-3.0"):
        raise BuildError(f"{path}: Xen note XEN_VERSION must start with 'xen-3.0' (got {xv!r})")
    if ElfNote.PADDR_OFFSET in notes and ElfNote.VIRT_BASE not in notes:
        raise BuildError(f"{path}: Xen note PADDR_OFFSET without VIRT_BASE")
    if str(notes.get(ElfNote.BSD_SYMTAB, "")) == "yes":
        raise BuildError(f"{path}: Xen note BSD_SYMTAB (load the symbol table after the kernel) is "
                         f"not supported by aiovmm")
    virt_base = int(notes.get(ElfNote.VIRT_BASE, 0))
    paddr_offset = int(notes.get(ElfNote.PADDR_OFFSET, 0))
    if virt_base & (PAGE_SIZE - 1):
        raise BuildError(f"{path}: VIRT_BASE {virt_base:#x} is not page aligned")
    off = (virt_base - paddr_offset) & 0xFFFFFFFFFFFFFFFF
    segments = [(((pa + off) & 0xFFFFFFFFFFFFFFFF), view[o:o + fs], ms) for pa, o, fs, ms in loads]
    kstart = min(s[0] for s in segments)
    kend = max(s[0] + s[2] for s in segments)
    if kend > 1 << 64:
        raise BuildError(f"{path}: a segment wraps past the top of the address space")
    entry = int(notes.get(ElfNote.ENTRY, e_entry))
    if not (virt_base <= kstart <= entry <= kend):
        raise BuildError(f"{path}: entry {entry:#x} outside the image [{kstart:#x}, {kend:#x}) "
                         f"or image below VIRT_BASE {virt_base:#x}")
    if kstart & (PAGE_SIZE - 1):
        raise BuildError(f"{path}: the image starts at {kstart:#x}, not on a page boundary")
    if kstart < HYPERVISOR_VIRT_END and kend > HYPERVISOR_VIRT_START:
        raise BuildError(f"{path}: the image [{kstart:#x}, {kend:#x}) overlaps Xen's reserved area "
                         f"[{HYPERVISOR_VIRT_START:#x}, {HYPERVISOR_VIRT_END:#x})")
    hp = notes.get(ElfNote.HYPERCALL_PAGE)
    if hp is not None:
        hp = int(hp)
        if hp & (PAGE_SIZE - 1) or not kstart <= hp < kend:
            raise BuildError(f"{path}: HYPERCALL_PAGE {hp:#x} is not a page inside the image")
    p2m_base = notes.get(ElfNote.INIT_P2M)
    if p2m_base is not None:
        p2m_base = int(p2m_base)
        if kstart <= p2m_base < kend:
            raise BuildError(f"{path}: Xen note INIT_P2M {p2m_base:#x} lies inside the image")
        # xc_dom_build_image: a base at or above virt_base, or not page aligned, is ignored
        # and the list is placed after the kernel as without the note.
        if p2m_base >= virt_base or p2m_base & (PAGE_SIZE - 1):
            p2m_base = None
    supported: set[int] = set()
    required: set[int] = set()
    if ElfNote.FEATURES in notes:
        supported, required = parse_features(path, str(notes[ElfNote.FEATURES]))
    sup_bits = int(notes.get(ElfNote.SUPPORTED_FEATURES, 0))
    supported |= {b for b in range(sup_bits.bit_length()) if sup_bits >> b & 1}
    if XenFeature.dom0 in required:
        raise BuildError(f"{path}: kernel requires feature 'dom0': it does not support unprivileged "
                         f"(domU) operation")
    missing = required - PV_PROVIDED_FEATURES
    if missing:
        names = ", ".join(sorted(XenFeature(f).name for f in missing))
        raise BuildError(f"{path}: kernel requires Xen feature(s) a PV domain does not have: {names}")
    hv_low = notes.get(ElfNote.HV_START_LOW)
    return ParsedKernel(
        elf=elf, compression=compression, entry=entry, virt_base=virt_base, paddr_offset=paddr_offset,
        kstart=kstart, kend=kend, hypercall_page=hp, p2m_base=p2m_base,
        unmapped_initrd=bool(notes.get(ElfNote.MOD_START_PFN, 0)),
        hv_start_low=int(hv_low) if hv_low is not None else None,
        suspend_cancel=bool(notes.get(ElfNote.SUSPEND_CANCEL, 0)),
        l1_mfn_valid=_l1_mfn_valid(str(notes[ElfNote.L1_MFN_VALID])) if ElfNote.L1_MFN_VALID in notes else [],
        features_supported=frozenset(supported), features_required=frozenset(required),
        segments=segments, notes=notes, notes_from=notes_from)


def load(path: str, raw: bytes) -> ParsedKernel:
    """A kernel file's bytes -> ParsedKernel: a bzImage is unpacked first, a compressed ELF
    (as some distributions ship vmlinux.gz) is decompressed, an ELF parsed as is."""
    if not raw:
        raise BuildError(f"{path}: malformed ELF: file is empty (not an ELF or bzImage)")
    if is_bzimage(raw):
        payload = bzimage_payload(path, raw)
        method = detect_compression(payload)
        if method is None:
            raise BuildError(f"{path}: bzImage payload has an unknown compression (magic "
                             f"{bytes(payload[:4]).hex()})")
        elf = bytes(payload) if method is Compression.none else decompress_cached(path, method, payload)
        if elf[:4] != b"\x7fELF":
            raise BuildError(f"{path}: bzImage payload ({method.value}) is not an ELF image")
        return parse_elf(path, elf, method)
    method = detect_compression(raw)
    # A whole file compressed (vmlinux.gz): only magics that cannot be an accident.
    if method not in (None, Compression.none, Compression.lzma):
        elf = decompress_cached(path, method, memoryview(raw))
        return parse_elf(path, elf, method)
    return parse_elf(path, raw)
