"""The kernel loader: what Xen's libxenguest takes, aiovmm takes.

Debian's own bzImage (fetched by `make setup` into guests/build/linux/) is parsed and its
notes are checked against pyelftools' independent reading of the same ELF; every compression
the kernel build may use is produced with the real tool (gzip, bzip2, lzma, xz, lzop, lz4,
zstd) around one of our kernels, which then boots; notes only in SHT_NOTE sections are found;
bad features and malformed notes are refused with one line; the ramdisk and the INIT_P2M list
land where start_info says. Load time is checked against kernel size (linear, not a constant).
"""
from __future__ import annotations

import asyncio
import io
import re
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from aiovmm import BuildError, Hypervisor, ShutdownReason, builder, loader
from aiovmm.abi import PAGE_SHIFT, PAGE_SIZE, ElfNote, StartInfo
from aiovmm.config import parse as parse_config
from aiovmm.domain import Domain
from conftest import BUILD, kernel, run_cli

LINUX = BUILD / "linux"
VMLINUZ = LINUX / "vmlinuz"
INITRAMFS = LINUX / "initramfs.cpio.gz"


def _linux_assets() -> None:
    if not VMLINUZ.exists() or not INITRAMFS.exists():
        pytest.fail("Debian kernel/initramfs missing: run `make setup` (guests/linux/build.py)")


@pytest.fixture(scope="module")
def debian_elf() -> bytes:
    _linux_assets()
    return loader.load(str(VMLINUZ), VMLINUZ.read_bytes()).elf


# -- helpers -----------------------------------------------------------------------------------
def _bzimage(payload: bytes, template: bytes | None = None) -> bytes:
    """A bzImage around `payload`: Debian's setup code and header when given, else a minimal
    boot-protocol 2.15 header (what the loader reads: setup_sects, HdrS, version,
    payload_offset/length)."""
    if template is not None:
        start = (template[0x1F1] + 1) * 512 + struct.unpack_from("<I", template, 0x248)[0]
        out = bytearray(template[:start]) + payload
        struct.pack_into("<I", out, 0x24C, len(payload))
        return bytes(out)
    setup_sects = 3
    hdr = bytearray((setup_sects + 1) * 512)
    hdr[0x1F1] = setup_sects
    struct.pack_into("<H", hdr, 0x1FE, 0xAA55)
    hdr[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", hdr, 0x206, 0x020F)
    struct.pack_into("<II", hdr, 0x248, 0x40, len(payload))
    return bytes(hdr) + bytes(0x40) + payload


# The kernel build's commands (scripts/Makefile.lib), each followed by size_append except gzip.
COMPRESSORS = {
    "gzip": ["gzip", "-n", "-9", "-c"],
    "bzip2": ["bzip2", "-9", "-c"],
    "lzma": ["lzma", "-9", "-c"],
    "xz": ["xz", "--check=crc32", "--x86", "--lzma2=dict=1MiB", "-c"],
    "lzo": ["lzop", "-9", "-c"],
    "lz4": ["lz4", "-l", "-9", "-c"],
    "zstd": ["zstd", "-19", "-c", "-q"],
}


def _compress(method: str, data: bytes) -> bytes:
    cmd = COMPRESSORS[method]
    if not shutil.which(cmd[0]):
        pytest.fail(f"{cmd[0]} missing: `make setup` installs it")
    out = subprocess.run(cmd, input=data, capture_output=True, check=True).stdout
    if method != "gzip":
        out += struct.pack("<I", len(data))
    return out


def _read_si(hv: Hypervisor, dom, lay) -> bytes:
    return hv.mem.read(dom.p2m[lay.start_info_pfn] << PAGE_SHIFT, PAGE_SIZE)


def _walk(hv: Hypervisor, l4_mfn: int, va: int) -> int:
    """The machine frame a VA maps to through the domain's boot page tables."""
    table = l4_mfn
    for shift in (39, 30, 21, 12):
        e = hv.mem.read_u64((table << PAGE_SHIFT) + 8 * ((va >> shift) & 0x1FF))
        assert e & 1, f"{va:#x} not mapped at level shift {shift}"
        table = (e & 0x000FFFFFFFFFF000) >> PAGE_SHIFT
    return table


def _replace_note(elf: bytes, ntype: int, new_desc: bytes) -> bytes:
    """`elf` with the desc of Xen note `ntype` overwritten in place (descsz kept; the rest
    of the old desc becomes NUL: a string note reads up to the first NUL)."""
    raw = bytearray(elf)
    f = ELFFile(io.BytesIO(elf))
    for seg in f.iter_segments():
        if seg["p_type"] != "PT_NOTE":
            continue
        off, end = seg["p_offset"], seg["p_offset"] + seg["p_filesz"]
        while off < end:
            namesz, descsz, t = struct.unpack_from("<III", raw, off)
            d = off + 12 + ((namesz + 3) & ~3)
            if raw[off + 12:off + 12 + namesz].rstrip(b"\0") == b"Xen" and t == ntype:
                room = (descsz + 3) & ~3
                assert len(new_desc) <= room
                raw[d:d + room] = new_desc + bytes(room - len(new_desc))
                return bytes(raw)
            off = d + ((descsz + 3) & ~3)
    raise AssertionError(f"no Xen note {ntype}")


def _pt_note_phdr(raw: bytes) -> int:
    phoff = struct.unpack_from("<Q", raw, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", raw, 0x36)
    for i in range(phnum):
        o = phoff + i * phentsize
        if struct.unpack_from("<I", raw, o)[0] == 4:
            return o
    raise AssertionError("no PT_NOTE")


# -- Debian's bzImage ---------------------------------------------------------------------------
def test_debian_bzimage_payload_and_notes(debian_elf):
    """Payload found from the setup header and decompressed; the notes agree with
    pyelftools' reading of the same ELF."""
    raw = VMLINUZ.read_bytes()
    assert loader.is_bzimage(raw)
    img = loader.load(str(VMLINUZ), raw)
    assert img.compression is loader.Compression.xz          # Debian 6.1 amd64: CONFIG_KERNEL_XZ
    setup_sects = raw[0x1F1]
    po, pl = struct.unpack_from("<II", raw, 0x248)
    assert loader.detect_compression(raw[(setup_sects + 1) * 512 + po:][:pl]) is loader.Compression.xz
    f = ELFFile(io.BytesIO(debian_elf))
    ref: dict[int, bytes] = {}
    for seg in f.iter_segments():
        if seg["p_type"] == "PT_NOTE":
            for n in seg.iter_notes():
                if n["n_name"] == "Xen":        # pyelftools names types after GNU notes: raw int
                    ntype = struct.unpack_from("<I", debian_elf, n["n_offset"] + 8)[0]
                    ref[ntype] = debian_elf[n["n_offset"] + 16:n["n_offset"] + 16 + n["n_descsz"]]
    entry = int.from_bytes(ref[ElfNote.ENTRY], "little")
    assert img.entry == entry and img.kstart <= entry < img.kend
    assert img.virt_base == int.from_bytes(ref[ElfNote.VIRT_BASE], "little")
    if ElfNote.HYPERCALL_PAGE in ref:
        assert img.hypercall_page == int.from_bytes(ref[ElfNote.HYPERCALL_PAGE], "little")
    else:                      # recent stable kernels make hypercalls without Xen's page
        assert img.hypercall_page is None
    assert img.p2m_base == int.from_bytes(ref[ElfNote.INIT_P2M], "little")
    assert img.unmapped_initrd == bool(int.from_bytes(ref[ElfNote.MOD_START_PFN], "little"))
    feats = bytes(ref[ElfNote.FEATURES]).split(b"\0")[0].decode()
    required = {loader.XenFeature[x[1:]] for x in feats.split("|") if x.startswith("!")}
    assert img.features_required == required
    assert loader.XenFeature.writable_page_tables in img.features_required
    assert required <= img.features_supported
    assert img.notes_from == "segments"
    assert str(img.notes[ElfNote.GUEST_OS]) == "linux"
    loads = [s for s in f.iter_segments() if s["p_type"] == "PT_LOAD"]
    assert len(img.segments) == len(loads)


@pytest.mark.parametrize("method", list(COMPRESSORS))
async def test_bzimage_compression_boots(method, tmp_path):
    """Each compression the kernel's build can use, made by the real tool around one of our
    kernels wrapped as a bzImage: parsed to the same image, and it boots to poweroff."""
    elf = Path(kernel()).read_bytes()
    path = tmp_path / f"bz-{method}"
    path.write_bytes(_bzimage(_compress(method, elf)))
    img = builder.parse_kernel(str(path))
    plain = builder.parse_kernel(kernel())
    assert img.compression == method
    assert [(va, bytes(d), m) for va, d, m in img.segments] == [(va, bytes(d), m) for va, d, m in plain.segments]
    async with Hypervisor(memory_mib=64) as hv:
        dom = await hv.create(str(path), memory_mib=8, cmdline="ticks=1")
        async with asyncio.timeout(60):
            assert await dom.wait() == ShutdownReason.poweroff, dom.describe_end()


def test_bzimage_truncated_payload_refused(tmp_path):
    raw = _bzimage(_compress("gzip", Path(kernel()).read_bytes()))
    p = tmp_path / "bz-short"
    p.write_bytes(raw[:-100])
    with pytest.raises(BuildError, match=r"runs past the end of the file|truncat"):
        builder.parse_kernel(str(p))


@pytest.mark.parametrize("method", list(COMPRESSORS))
def test_bzimage_cut_payload_refused(method, tmp_path):
    """A payload cut in half (payload_length says so) is refused with a one-line BuildError
    naming the method, for every decompressor."""
    payload = _compress(method, Path(kernel()).read_bytes())
    p = tmp_path / f"bz-cut-{method}"
    p.write_bytes(_bzimage(payload[:len(payload) // 2]))
    with pytest.raises(BuildError) as ei:
        builder.parse_kernel(str(p))
    assert "\n" not in str(ei.value)
    assert re.search(rf"cannot {method}-decompress|not an ELF|truncat|malformed", str(ei.value)), str(ei.value)


def test_bzimage_corrupt_payload_refused(tmp_path):
    payload = bytearray(_compress("xz", Path(kernel()).read_bytes()))
    payload[len(payload) // 2] ^= 0xFF
    p = tmp_path / "bz-corrupt"
    p.write_bytes(_bzimage(bytes(payload)))
    with pytest.raises(BuildError, match=r"cannot xz-decompress"):
        builder.parse_kernel(str(p))


def test_bzimage_old_protocol_refused(tmp_path):
    raw = bytearray(_bzimage(_compress("gzip", Path(kernel()).read_bytes())))
    struct.pack_into("<H", raw, 0x206, 0x0207)
    p = tmp_path / "bz-old"
    p.write_bytes(bytes(raw))
    with pytest.raises(BuildError, match=r"boot protocol 2\.07 is too old"):
        builder.parse_kernel(str(p))


# -- load time ----------------------------------------------------------------------------------
def _append_segments(elf: bytes, segs: list[tuple[int, bytes, int, int]]) -> bytes:
    """`elf` with more program headers (p_type, data, vaddr, paddr) whose data is appended
    at the end of the file (the existing headers move to the end to make room)."""
    raw = bytearray(elf)
    phoff = struct.unpack_from("<Q", raw, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", raw, 0x36)
    old = bytes(raw[phoff:phoff + phentsize * phnum])
    new_phoff = (len(raw) + 7) & ~7
    raw += bytes(new_phoff - len(raw)) + old + bytes(phentsize * len(segs))
    for i, (p_type, data, va, pa) in enumerate(segs):
        off = (len(raw) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        raw += bytes(off - len(raw)) + data
        struct.pack_into("<IIQQQQQQ", raw, new_phoff + phentsize * (phnum + i), p_type, 6, off, va, pa,
                         len(data), len(data), PAGE_SIZE if p_type == 1 else 4)
    struct.pack_into("<Q", raw, 0x20, new_phoff)
    struct.pack_into("<H", raw, 0x38, phnum + len(segs))
    return bytes(raw)


def _note(ntype: int, desc: bytes, name: bytes = b"Xen\0") -> bytes:
    pad = lambda b: b + bytes(-len(b) % 4)          # noqa: E731
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def _with_notes(tmp: Path, fname: str, *notes: bytes) -> str:
    """kernel.elf with a second PT_NOTE segment holding `notes` (libelf reads every PT_NOTE)."""
    p = tmp / fname
    p.write_bytes(_append_segments(Path(kernel()).read_bytes(), [(4, b"".join(notes), 0, 0)]))
    return str(p)


def _big_elf(tmp: Path, mib: int) -> str:
    """kernel.elf with a further PT_LOAD of `mib` MiB of data after the image (a large kernel
    without the decompression in the way)."""
    img = builder.parse_kernel(kernel())
    va = (img.kend + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    pa = va - img.virt_base + int(img.notes.get(ElfNote.PADDR_OFFSET, 0))
    data = bytes((i * 131) & 0xFF for i in range(PAGE_SIZE)) * ((mib << 20) // PAGE_SIZE)
    p = tmp / f"big{mib}.elf"
    p.write_bytes(_append_segments(Path(kernel()).read_bytes(), [(1, data, va, pa)]))
    return str(p)


async def test_load_time_linear_in_kernel_size(tmp_path):
    """Parsing + building a 64 MiB kernel costs about 16x a 4 MiB one, not 256x (the old
    builder re-sliced the segment per page: quadratic). Best of 3 each, same domain size."""
    small, large = _big_elf(tmp_path, 4), _big_elf(tmp_path, 64)

    async def cost(path: str) -> float:
        best = float("inf")
        async with Hypervisor(memory_mib=512) as hv:
            for _ in range(3):
                builder.clear_cache()
                t = time.perf_counter()
                img = builder.parse_kernel(path)
                d = Domain(hv, 99, "t", 96 << 20 >> PAGE_SHIFT)
                try:
                    builder.build(d, img, "")
                    best = min(best, time.perf_counter() - t)
                finally:
                    d.destroy()
        return best

    c_small, c_large = await cost(small), await cost(large)
    ratio = c_large / c_small
    print(f"load 4 MiB {c_small * 1e3:.1f} ms, 64 MiB {c_large * 1e3:.1f} ms, ratio {ratio:.1f}")
    assert ratio < 40, f"64 MiB kernel took {ratio:.1f}x the 4 MiB one (linear: ~16x or less)"


# -- notes in sections ------------------------------------------------------------------------
async def test_notes_only_in_sections_boot(tmp_path):
    """kernel.elf with its PT_NOTE turned into PT_NULL: the notes are only in the SHT_NOTE
    section, as libelf allows; it is parsed the same and boots."""
    raw = bytearray(Path(kernel()).read_bytes())
    struct.pack_into("<I", raw, _pt_note_phdr(bytes(raw)), 0)          # PT_NULL
    p = tmp_path / "sections.elf"
    p.write_bytes(bytes(raw))
    img = builder.parse_kernel(str(p))
    ref = builder.parse_kernel(kernel())
    assert img.parsed.notes_from == "sections"
    assert (img.entry, img.virt_base, img.hypercall_page) == (ref.entry, ref.virt_base, ref.hypercall_page)
    async with Hypervisor(memory_mib=64) as hv:
        dom = await hv.create(str(p), memory_mib=8, cmdline="ticks=1")
        async with asyncio.timeout(60):
            assert await dom.wait() == ShutdownReason.poweroff, dom.describe_end()


def test_no_notes_anywhere_refused(tmp_path):
    raw = bytearray(Path(kernel()).read_bytes())
    struct.pack_into("<I", raw, _pt_note_phdr(bytes(raw)), 0)
    struct.pack_into("<H", raw, 0x3C, 0)                                # e_shnum = 0
    p = tmp_path / "nonotes.elf"
    p.write_bytes(bytes(raw))
    with pytest.raises(BuildError, match="no Xen ELF notes"):
        builder.parse_kernel(str(p))


# -- refused features and malformed notes ------------------------------------------------------
REFUSED = {
    # FEATURES naming a required feature a PV domU cannot have
    "translated": (ElfNote.FEATURES, b"!auto_translated_physmap\0", r"requires Xen feature.*auto_translated_physmap"),
    "hvm_callback": (ElfNote.FEATURES, b"!hvm_callback_vector\0", r"requires Xen feature.*hvm_callback_vector"),
    "dom0": (ElfNote.FEATURES, b"!dom0\0", r"dom0.*unprivileged"),
    "unknown_required": (ElfNote.FEATURES, b"!frobnicate\0", r"requires unknown feature 'frobnicate'"),
    "bad_numeric_size": (ElfNote.ENTRY, b"\x00\x00\x80", r"malformed Xen ELF note ENTRY: a 3-byte value"),
    "unterminated": (ElfNote.XEN_VERSION, b"xen-3.0X", r"malformed Xen ELF note XEN_VERSION: string is not NUL"),
    "supported_features_size": (ElfNote.SUPPORTED_FEATURES, b"\x01\x00", r"SUPPORTED_FEATURES: 2 bytes"),
    "bsd_symtab": (ElfNote.BSD_SYMTAB, b"yes\0", r"BSD_SYMTAB.*not supported"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_notes_cli(tmp_path, case):
    ntype, desc, pat = REFUSED[case]
    path = _with_notes(tmp_path, f"{case}.elf", _note(ntype, desc))
    r = run_cli("run", path, "--memory", "8")
    lines = r.stderr.splitlines()
    assert r.returncode == 64 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.search(pat, lines[0]), lines[0]


def test_optional_unknown_feature_ignored(tmp_path):
    """libelf ignores an unknown feature that is not required."""
    path = _with_notes(tmp_path, "opt.elf", _note(ElfNote.FEATURES, b"frobnicate|writable_page_tables\0"))
    img = builder.parse_kernel(path)
    assert img.parsed.features_required == frozenset()
    assert loader.XenFeature.writable_page_tables in img.parsed.features_supported


def test_note_sizes_past_area_refused(tmp_path):
    raw = bytearray(Path(kernel()).read_bytes())
    off = struct.unpack_from("<Q", raw, _pt_note_phdr(bytes(raw)) + 8)[0]
    struct.pack_into("<I", raw, off + 4, 0x10000)                       # descsz of the first note
    p = tmp_path / "overrun.elf"
    p.write_bytes(bytes(raw))
    with pytest.raises(BuildError, match=r"malformed ELF note: .*past the note area"):
        builder.parse_kernel(str(p))


def test_debian_bzimage_with_unsupported_required_feature(tmp_path, debian_elf):
    """Debian's kernel with its FEATURES note changed to require auto_translated_physmap,
    repacked into its own bzImage (gzip): refused with one line, library and CLI."""
    elf = _replace_note(debian_elf, ElfNote.FEATURES, b"!auto_translated_physmap\0")
    bz = _bzimage(zlib.compress(elf, 1, wbits=31), VMLINUZ.read_bytes())
    p = tmp_path / "vmlinuz-translated"
    p.write_bytes(bz)
    with pytest.raises(BuildError, match=r"auto_translated_physmap"):
        builder.parse_kernel(str(p))
    r = run_cli("run", str(p), "--memory", "256")
    assert r.returncode == 64 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "auto_translated_physmap" in r.stderr


# -- ramdisk and INIT_P2M ------------------------------------------------------------------------
async def test_ramdisk_mapped_for_kernel_without_mod_start_pfn(tmp_path):
    """Our kernel has no MOD_START_PFN note: the ramdisk follows the kernel in the initial
    mapping, mod_start is its virtual address, mod_len its exact size."""
    data = bytes((i * 37 + 11) & 0xFF for i in range(3 * PAGE_SIZE + 123))
    rd = tmp_path / "rd.bin"
    rd.write_bytes(data)
    img = builder.parse_kernel(kernel())
    async with Hypervisor(memory_mib=64) as hv:
        dom = await hv.create(kernel(), memory_mib=8, cmdline="ticks=1", ramdisk=str(rd))
        lay = builder.plan_layout(img, dom.nr_pages, len(data))
        si = _read_si(hv, dom, lay)
        flags, = struct.unpack_from("<I", si, StartInfo.flags)
        mod_start, mod_len = struct.unpack_from("<QQ", si, StartInfo.mod_start)
        assert flags & builder.StartInfoFlags.MOD_START_PFN == 0
        assert mod_len == len(data)
        assert mod_start == img.virt_base + (((img.kend - img.virt_base) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        got = b"".join(hv.mem.read(_walk(hv, dom.boot_l4, mod_start + o) << PAGE_SHIFT,
                                   min(PAGE_SIZE, len(data) - o)) for o in range(0, len(data), PAGE_SIZE))
        assert got == data
        # the P2M list comes after the ramdisk (Xen's order)
        assert struct.unpack_from("<Q", si, StartInfo.mfn_list)[0] == mod_start + ((len(data) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        async with asyncio.timeout(60):
            assert await dom.wait() == ShutdownReason.poweroff, dom.describe_end()


async def test_debian_ramdisk_unmapped_and_p2m_at_init_p2m():
    """Debian's kernel (MOD_START_PFN, INIT_P2M): the initramfs lands at the pfn start_info
    names (SIF_MOD_START_PFN, length in whole pages) past the initial mapping, byte for byte;
    the P2M list is mapped at the INIT_P2M address and lists the domain's frames."""
    _linux_assets()
    data = INITRAMFS.read_bytes()
    async with Hypervisor(memory_mib=512) as hv:
        dom = await hv.create(str(VMLINUZ), memory_mib=256, cmdline="console=hvc0", ramdisk=str(INITRAMFS))
        # Inspect before the vCPU first runs (no await in between).
        img = builder.parse_kernel(str(VMLINUZ))
        lay = builder.plan_layout(img, dom.nr_pages, len(data))
        si = _read_si(hv, dom, lay)
        assert si.startswith(b"xen-3.0-x86_64\0")
        flags, = struct.unpack_from("<I", si, StartInfo.flags)
        mod_start, mod_len = struct.unpack_from("<QQ", si, StartInfo.mod_start)
        assert flags & builder.StartInfoFlags.MOD_START_PFN
        assert mod_len == (len(data) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        assert mod_start << PAGE_SHIFT >= lay.v_end - img.virt_base, "ramdisk inside the initial mapping"
        got = b"".join(hv.mem.read(dom.p2m[mod_start + i] << PAGE_SHIFT, PAGE_SIZE) for i in range(mod_len >> PAGE_SHIFT))
        assert got[:len(data)] == data and not any(got[len(data):])
        mfn_list, = struct.unpack_from("<Q", si, StartInfo.mfn_list)
        first_p2m, nr_p2m = struct.unpack_from("<QQ", si, StartInfo.first_p2m_pfn)
        assert mfn_list == img.p2m_base == img.notes[ElfNote.INIT_P2M]
        assert first_p2m >= mod_start + (mod_len >> PAGE_SHIFT)
        assert nr_p2m >= (dom.nr_pages * 8) >> PAGE_SHIFT
        for pfn in (0, 1, dom.nr_pages // 2, dom.nr_pages - 1):
            va = mfn_list + pfn * 8
            mfn = _walk(hv, dom.boot_l4, va)
            assert hv.mem.read_u64((mfn << PAGE_SHIFT) + (va & 0xFFF)) == dom.p2m[pfn]
        assert _walk(hv, dom.boot_l4, img.entry & ~0xFFF) == dom.p2m[(img.entry - img.virt_base) >> PAGE_SHIFT]
        # Everything fits in the domain.
        assert first_p2m + nr_p2m <= dom.nr_pages
        dom.shutdown(ShutdownReason.poweroff)
        await dom.wait()


async def test_ramdisk_too_large_refused(tmp_path):
    rd = tmp_path / "big.bin"
    rd.write_bytes(bytes(9 << 20))
    async with Hypervisor(memory_mib=64) as hv:
        free = hv.mem.free_frames
        with pytest.raises(BuildError, match=r"MiB"):
            await hv.create(kernel(), memory_mib=8, ramdisk=str(rd))
        assert hv.mem.free_frames == free and hv.domains == {}


def test_ramdisk_missing_cli(tmp_path):
    r = run_cli("run", kernel(), "--memory", "8", "--ramdisk", str(tmp_path / "nope.img"))
    assert r.returncode == 64 and len(r.stderr.splitlines()) == 1, r.stderr
    assert re.search(r"nope\.img: cannot read ramdisk", r.stderr)


# -- xl.cfg: ramdisk, root, extra, cmdline --------------------------------------------------------
def test_config_ramdisk_root_extra(tmp_path):
    cfg = parse_config('kernel = "k"\nramdisk = "initrd.img"\nroot = "/dev/xvda1"\nextra = "console=hvc0"\n',
                       str(tmp_path / "a.cfg"))
    assert cfg.ramdisk == str(tmp_path / "initrd.img")
    assert cfg.cmdline == "root=/dev/xvda1 console=hvc0"
    assert parse_config('kernel = "k"\nroot = "/dev/xvda"\n').cmdline == "root=/dev/xvda"
    # xl: cmdline wins over root and extra
    assert parse_config('kernel = "k"\nroot = "/dev/xvda"\ncmdline = "quiet"\n').cmdline == "quiet"
    assert parse_config('kernel = "k"\n').ramdisk is None


async def test_config_ramdisk_boots(tmp_path):
    data = b"ramdisk via xl.cfg\n" * 100
    (tmp_path / "rd.img").write_bytes(data)
    (tmp_path / "g.cfg").write_text(f'kernel = "{kernel()}"\nramdisk = "rd.img"\nmemory = 8\nextra = "ticks=1"\n')
    r = run_cli("run", "-c", str(tmp_path / "g.cfg"))
    assert r.returncode == 0, r.stderr


def test_decompressed_payload_cache(tmp_path, monkeypatch):
    """Big payloads are decompressed once and then read from the on-disk cache, keyed by the
    compressed bytes: the same payload hits (even with the decompressor broken), a changed
    payload misses and gets its own entry, AIOVMM_KERNEL_CACHE=off never touches the disk."""
    import lzma
    cache = tmp_path / "cache"
    monkeypatch.setenv("AIOVMM_KERNEL_CACHE", str(cache))
    monkeypatch.setattr(loader, "CACHE_MIN_PAYLOAD", 0)
    elf = Path(kernel()).read_bytes()
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ)
    xz = loader.Compression.xz
    assert loader.decompress_cached("k", xz, memoryview(payload)) == elf
    assert len(list(cache.glob("*.elf"))) == 1 and not list(cache.glob("*.part"))

    def broken(_data):
        raise lzma.LZMAError("decompressor must not run on a cache hit")
    monkeypatch.setitem(loader._DECOMPRESSORS, xz, broken)
    assert loader.decompress_cached("k", xz, memoryview(payload)) == elf
    other = lzma.compress(elf + b"\0", format=lzma.FORMAT_XZ)
    with pytest.raises(BuildError, match="cannot xz-decompress"):
        loader.decompress_cached("k", xz, memoryview(other))
    monkeypatch.undo()
    monkeypatch.setenv("AIOVMM_KERNEL_CACHE", str(cache))
    monkeypatch.setattr(loader, "CACHE_MIN_PAYLOAD", 0)
    assert loader.decompress_cached("k", xz, memoryview(other)) == elf + b"\0"
    assert len(list(cache.glob("*.elf"))) == 2
    monkeypatch.setenv("AIOVMM_KERNEL_CACHE", "off")
    shutil.rmtree(cache)
    assert loader.decompress_cached("k", xz, memoryview(payload)) == elf
    assert not cache.exists()
