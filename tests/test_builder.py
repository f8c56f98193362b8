"""The domain builder: bad kernels are refused with a BuildError that names the problem, both
through the library and through the CLI (exit 64, one line on stderr, no traceback); the
hypercall page and the initial layout follow Xen's x86_64 PV builder."""
from __future__ import annotations

import asyncio
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from aiovmm import BuildError, Hypervisor
from aiovmm import builder
from aiovmm.abi import PAGE_SHIFT, PAGE_SIZE
from conftest import guest, kernel, run_cli

MB4 = 4 << 20


# -- bad kernels ------------------------------------------------------------------------------
def _elf_phdrs(raw: bytes):
    phoff = struct.unpack_from("<Q", raw, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", raw, 0x36)
    for i in range(phnum):
        o = phoff + i * phentsize
        yield o, struct.unpack_from("<IIQQQQQQ", raw, o)


def _gcc(tmp: Path, *args: str) -> None:
    if not shutil.which("gcc") or not shutil.which("ld"):
        pytest.skip("gcc/ld not available")
    subprocess.run(list(args), check=True, cwd=tmp, capture_output=True)


def make_nonexistent(tmp: Path) -> str:
    return str(tmp / "does-not-exist.elf")


def make_empty(tmp: Path) -> str:
    p = tmp / "empty.elf"
    p.write_bytes(b"")
    return str(p)


def make_random(tmp: Path) -> str:
    p = tmp / "random.elf"
    p.write_bytes(bytes((i * 7919 + 13) % 251 for i in range(8192)))
    return str(p)


def make_truncated_header(tmp: Path) -> str:
    p = tmp / "trunc-header.elf"
    p.write_bytes(Path(kernel()).read_bytes()[:64])
    return str(p)


def make_truncated_phdrs(tmp: Path) -> str:
    p = tmp / "trunc-phdrs.elf"
    p.write_bytes(Path(kernel()).read_bytes()[:100])
    return str(p)


def make_no_xen_notes(tmp: Path) -> str:
    (tmp / "t.c").write_text("void _start(void) { for (;;) ; }\n")
    _gcc(tmp, "gcc", "-c", "-O2", "-ffreestanding", "-fno-pic", "-fno-pie", "t.c", "-o", "t.o")
    _gcc(tmp, "ld", "-static", "-nostdlib", "-o", "nonotes.elf", "t.o")
    return str(tmp / "nonotes.elf")


def make_elf32(tmp: Path) -> str:
    (tmp / "t32.c").write_text("void _start(void) { for (;;) ; }\n")
    try:
        _gcc(tmp, "gcc", "-m32", "-c", "-ffreestanding", "-fno-pic", "-fno-pie", "t32.c", "-o", "t32.o")
        _gcc(tmp, "ld", "-m", "elf_i386", "-static", "-nostdlib", "-o", "t32.elf", "t32.o")
    except subprocess.CalledProcessError:
        pytest.skip("no 32-bit toolchain")
    return str(tmp / "t32.elf")


def make_wrong_machine(tmp: Path) -> str:
    raw = bytearray(Path(kernel()).read_bytes())
    struct.pack_into("<H", raw, 18, 183)          # e_machine = EM_AARCH64
    p = tmp / "aarch64.elf"
    p.write_bytes(bytes(raw))
    return str(p)


# (maker, regex the message must match: it names the problem)
BAD_KERNELS = {
    "nonexistent": (make_nonexistent, r"does-not-exist\.elf.*(cannot read|No such file)"),
    "empty": (make_empty, r"empty\.elf.*(malformed|not an ELF|Magic|empty)"),
    "random": (make_random, r"random\.elf.*(malformed|not an ELF|Magic)"),
    "truncated_header": (make_truncated_header, r"(malformed|truncat)"),
    "truncated_phdrs": (make_truncated_phdrs, r"(malformed|truncat)"),
    "no_xen_notes": (make_no_xen_notes, r"no Xen ELF notes"),
    "elf32": (make_elf32, r"not an x86_64 ELF64|ELF32|32-bit|class 32"),
    "wrong_machine": (make_wrong_machine, r"not an x86_64|machine|AARCH64"),
}


@pytest.mark.parametrize("case", list(BAD_KERNELS))
async def test_bad_kernel_library(hv, tmp_path, case):
    maker, pat = BAD_KERNELS[case]
    path = maker(tmp_path)
    free = hv.mem.free_frames
    with pytest.raises(BuildError) as ei:
        await hv.create(path, memory_mib=8)
    msg = str(ei.value)
    assert "\n" not in msg and msg
    assert re.search(pat, msg), msg
    assert hv.mem.free_frames == free, "a failed build leaked machine frames"
    assert hv.domains == {}


@pytest.mark.parametrize("case", list(BAD_KERNELS))
def test_bad_kernel_cli(tmp_path, case):
    maker, pat = BAD_KERNELS[case]
    path = maker(tmp_path)
    r = run_cli("run", path, "--memory", "8")
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("aiovmm: ")
    assert re.search(pat, lines[0]), lines[0]
    assert r.returncode == 64, (r.returncode, r.stderr)


async def test_builderror_leaves_hypervisor_context_unwrapped(tmp_path):
    """`async with Hypervisor() as hv: await hv.create(bad)` raises BuildError, as documented,
    not an ExceptionGroup (what the CLI's `except BuildError` relies on)."""
    with pytest.raises(BuildError):
        async with Hypervisor(memory_mib=64) as h:
            await h.create(make_empty(tmp_path))


async def test_kernel_larger_than_memory(hv):
    free = hv.mem.free_frames
    with pytest.raises(BuildError, match=r"MiB"):
        await hv.create(kernel(), memory_mib=1)
    assert hv.mem.free_frames == free


def test_kernel_larger_than_memory_cli():
    r = run_cli("run", kernel(), "--memory", "1")
    assert "Traceback" not in r.stderr
    assert r.returncode == 64, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("aiovmm: ") and "MiB" in lines[0], r.stderr


async def test_more_memory_than_the_machine(hv):
    with pytest.raises(BuildError, match=r"machine memory"):
        await hv.create(kernel(), memory_mib=hv.memory_mib * 2)
    assert hv.domains == {}


async def test_bad_kernel_and_too_much_memory_names_the_kernel(hv, tmp_path):
    """create() builds the domain before it waits for the image load: a kernel the load
    refuses is still the error reported, as when the load came first."""
    with pytest.raises(BuildError) as ei:
        await hv.create(make_empty(tmp_path), memory_mib=hv.memory_mib * 2)
    assert "machine memory" not in str(ei.value), str(ei.value)
    assert hv.domains == {}


async def test_create_cancelled_while_the_image_loads_leaves_nothing(hv):
    free = hv.mem.free_frames
    task = asyncio.ensure_future(hv.create(kernel(), memory_mib=8))
    await asyncio.sleep(0)              # its domain is built; it waits for the image
    assert len(hv.domains) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert hv.domains == {} and hv.mem.free_frames == free


async def test_zero_memory(hv):
    with pytest.raises(BuildError, match=r"memory"):
        await hv.create(kernel(), memory_mib=0)


async def test_cmdline_too_long(hv):
    free = hv.mem.free_frames
    with pytest.raises(BuildError, match=r"command line"):
        await hv.create(kernel(), memory_mib=8, cmdline="a" * 1024)
    assert hv.mem.free_frames == free


async def test_cmdline_max_length_accepted(hv):
    """1023 bytes + NUL fill start_info.cmd_line exactly (the guest's printk truncates at
    512 bytes, so the check reads start_info itself)."""
    from aiovmm.abi import StartInfo
    cmd = "ticks=1 " + "a" * (1023 - len("ticks=1 "))
    dom = await hv.create(kernel(), memory_mib=8, cmdline=cmd)
    lay = builder.plan_layout(builder.parse_kernel(kernel()), dom.nr_pages)
    si = hv.mem.read(dom.p2m[lay.start_info_pfn] << PAGE_SHIFT, PAGE_SIZE)
    assert si[StartInfo.cmd_line:StartInfo.cmd_line + 1024] == cmd.encode() + b"\0"
    # The guest's 512-byte printk buffer cuts the echo (and its newline); only its start counts.
    line = await dom.wait_for_line(r"^cmdline: ", timeout=30)
    assert line.startswith("cmdline: ticks=1 aaaa")


TRUNC_WORDS = r"(?i)truncat|end of (the )?file|beyond|past the end|short"


# -- truncated kernels -------------------------------------------------------------------------
def _truncated_plain(tmp: Path) -> str:
    """kernel.elf cut in the middle of its text segment (and before its notes)."""
    p = tmp / "trunc-text.elf"
    p.write_bytes(Path(kernel()).read_bytes()[:0x3000])
    return str(p)


def _truncated_notes_intact(tmp: Path) -> str:
    """kernel.elf with its PT_NOTE copied to the first page (so the notes survive) and the file
    cut in the middle of the text PT_LOAD: the image is incomplete."""
    raw = bytearray(Path(kernel()).read_bytes())
    for o, (p_type, _f, off, _va, _pa, filesz, _m, _a) in _elf_phdrs(raw):
        if p_type == 4:                                   # PT_NOTE
            assert 0x100 + filesz <= 0x1000
            raw[0x100:0x100 + filesz] = raw[off:off + filesz]
            struct.pack_into("<Q", raw, o + 8, 0x100)
    loads = [(off, filesz) for _o, (t, _f, off, _v, _p, filesz, _m, _a) in _elf_phdrs(raw)
             if t == 1 and filesz]
    off, filesz = loads[0]
    p = tmp / "trunc-load.elf"
    p.write_bytes(bytes(raw[:off + filesz // 2]))
    return str(p)


async def test_truncated_kernel_refused(hv, tmp_path):
    with pytest.raises(BuildError):
        await hv.create(_truncated_plain(tmp_path), memory_mib=8)


async def test_truncated_kernel_message_names_truncation(hv, tmp_path):
    path = _truncated_plain(tmp_path)
    with pytest.raises(BuildError) as ei:
        await hv.create(path, memory_mib=8)
    assert re.search(TRUNC_WORDS, str(ei.value).replace(path, "")), str(ei.value)


async def test_truncated_load_segment_refused(hv, tmp_path):
    """Xen's libelf refuses a segment beyond the end of the image (a builder that loads the
    short data zero-filled boots a guest that crashes at runtime instead)."""
    path = _truncated_notes_intact(tmp_path)
    with pytest.raises(BuildError) as ei:
        dom = await hv.create(path, memory_mib=8, cmdline="ticks=1")
        await dom.wait()
    assert re.search(TRUNC_WORDS, str(ei.value).replace(path, "")), str(ei.value)


async def test_notes_moved_still_boots(hv, tmp_path):
    """Control for the test above: the same surgery without the cut boots normally."""
    raw = bytearray(Path(kernel()).read_bytes())
    for o, (p_type, _f, off, _va, _pa, filesz, _m, _a) in _elf_phdrs(raw):
        if p_type == 4:
            raw[0x100:0x100 + filesz] = raw[off:off + filesz]
            struct.pack_into("<Q", raw, o + 8, 0x100)
    p = tmp_path / "moved.elf"
    p.write_bytes(bytes(raw))
    dom = await hv.create(str(p), memory_mib=8, cmdline="ticks=1")
    from aiovmm import ShutdownReason
    assert await dom.wait() == ShutdownReason.poweroff, dom.describe_end()


# -- hypercall page ----------------------------------------------------------------------------
def test_hypercall_page_size():
    assert len(builder.hypercall_page()) == PAGE_SIZE


@pytest.mark.parametrize("nr", [i for i in range(128) if i != 23])
def test_hypercall_page_stub(nr):
    page = builder.hypercall_page()
    stub = bytes.fromhex("514153b8") + nr.to_bytes(4, "little") + bytes.fromhex("0f05415b59c3")
    assert page[32 * nr:32 * nr + len(stub)] == stub
    assert page[32 * nr + len(stub):32 * (nr + 1)] == b"\xcc" * (32 - len(stub))


def test_hypercall_page_iret_stub():
    page = builder.hypercall_page()
    # push %rcx; push %r11; push %rax; mov $23,%eax; syscall  (Xen's iret stub; never returns)
    stub = bytes.fromhex("51415350b8") + (23).to_bytes(4, "little") + bytes.fromhex("0f05")
    assert page[32 * 23:32 * 23 + len(stub)] == stub
    assert page[32 * 23 + len(stub):32 * 24] == b"\xcc" * (32 - len(stub))


def test_hypercall_page_decodes():
    """Disassemble each stub with Capstone-free checks: the immediate is the slot number."""
    page = builder.hypercall_page()
    for i in range(128):
        off = 32 * i + (5 if i == 23 else 4)
        assert struct.unpack_from("<I", page, off)[0] == i


async def test_hypercall_page_in_loaded_guest(hv):
    """The builder writes the page at the kernel's HYPERCALL_PAGE note: read back from the
    frame behind that address in a running guest (which made its console hypercalls through
    it), it is exactly builder.hypercall_page(), and the rest of the image is as in the ELF."""
    img = builder.parse_kernel(kernel())
    assert img.hypercall_page is not None
    assert img.hypercall_page % PAGE_SIZE == 0 and img.kstart <= img.hypercall_page < img.kend
    dom = await hv.create(kernel(), memory_mib=8, cmdline="ticks=1000 period_ms=10")
    try:
        await dom.wait_for_line(r"timer: tick 1 at \d+", timeout=30)

        def read_va(va: int) -> bytes:
            mfn = dom.p2m[(va - img.virt_base) >> PAGE_SHIFT]
            return bytes(hv.mem.view[mfn << PAGE_SHIFT:(mfn + 1) << PAGE_SHIFT])

        assert read_va(img.hypercall_page) == builder.hypercall_page()
        # The page the builder filled is the note's, not a neighbour: the pages around it
        # hold the ELF's own bytes, which are not the stub page.
        for va in (img.hypercall_page - PAGE_SIZE, img.hypercall_page + PAGE_SIZE):
            if img.kstart <= va < img.kend:
                assert read_va(va) != builder.hypercall_page()
    finally:
        dom.crash("test done")
        await dom.wait()


# -- layout ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["kernel", "hello", "traps"])
@pytest.mark.parametrize("memory_mib", [4, 8, 16, 32, 128, 1024])
def test_plan_layout_invariants(path, memory_mib):
    img = builder.parse_kernel(kernel() if path == "kernel" else guest(path))
    nr_pages = memory_mib << 20 >> PAGE_SHIFT
    lay = builder.plan_layout(img, nr_pages)
    vb = img.virt_base
    assert lay.virt_base == vb
    # v_end: 4 MiB aligned, at least 512 KiB past the end of the boot stack page.
    assert lay.v_end % MB4 == 0
    stack_end = lay.va(lay.stack_pfn + 1)
    assert lay.v_end - stack_end >= 512 << 10
    assert lay.v_end - MB4 < stack_end + (512 << 10), "v_end is not the smallest such boundary"
    # The order Xen's builder uses: kernel, P2M, start_info, xenstore, console, tables, stack.
    kernel_pages = (img.kend - vb + PAGE_SIZE - 1) >> PAGE_SHIFT
    assert lay.p2m_pfn == kernel_pages
    assert lay.p2m_pages == (nr_pages * 8 + PAGE_SIZE - 1) // PAGE_SIZE
    assert lay.start_info_pfn == lay.p2m_pfn + lay.p2m_pages
    assert (lay.store_pfn, lay.console_pfn) == (lay.start_info_pfn + 1, lay.start_info_pfn + 2)
    assert lay.pt_pfn == lay.console_pfn + 1
    assert lay.stack_pfn == lay.pt_pfn + lay.nr_pt
    # Page-table count: one L4 plus the L3s, L2s and L1s needed to map [virt_base, v_end).
    def count(shift):
        return ((lay.v_end - 1) >> shift) - (vb >> shift) + 1
    assert lay.nr_pt == 1 + count(39) + count(30) + count(21)
    assert count(21) == (lay.v_end - (vb & ~((2 << 20) - 1)) + (2 << 20) - 1) >> 21
    assert (lay.v_end - vb) >> PAGE_SHIFT <= nr_pages


def test_plan_layout_too_small():
    img = builder.parse_kernel(kernel())
    with pytest.raises(BuildError, match="MiB"):
        builder.plan_layout(img, 256)            # 1 MiB


def test_parse_kernel_notes():
    img = builder.parse_kernel(kernel())
    assert img.virt_base == 0xFFFFFFFF80000000
    assert img.entry == 0xFFFFFFFF80000000
    assert img.kstart == img.virt_base
    assert all(va >= img.virt_base for va, _d, _m in img.segments)
