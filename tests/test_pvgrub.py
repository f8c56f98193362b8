"""PV-GRUB2, a guest written by others: Debian's prebuilt grub-x86_64-xen.bin (package
grub-xen-host, fetched by `make setup` into guests/build/pvgrub, never installed) boots from
a disk image the test builds, as a Xen user boots a domU's own kernel (docs/guests.md).

GRUB is a second PV guest and a second judge of the hypervisor: its own hypercall stubs
(SYSCALL, no hypercall page), its own page tables over all of memory (mmu_update,
mmuext_op pin/new_baseptr, update_va_mapping), its own grant table and xenstore ring
client, its own blkfront (grub-core/disk/xen/xendisk.c: one request, one segment at a time,
polling with SCHEDOP_yield, state 3 without ever writing 4, then Closed and Initialising
again for the kernel it boots), and its Xen loader (grub-core/loader/i386/xen.c), which
builds the new kernel's start of day in place and jumps to it. Debian's Linux then takes
the same vbd over with its own blkfront: blkback must come back after GRUB closed it.

The disk (guests/pvgrub/mkdisk.py, what a user runs too): an MBR with one Linux partition at
1 MiB holding an ext2 file system made by mkfs.ext2 -d straight into the image file
(-E offset), no loop device or mount. The
image's embedded configuration (a memdisk grub.cfg) searches every disk for
/boot/grub/grub.cfg and runs it.
"""
from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest

from aiovmm import ShutdownReason
from aiovmm.backends.block import DiskConfig
from conftest import BUILD, ROOT
from test_linux import INITRD, KERNEL, Shell, wait_ready

sys.path.insert(0, str(ROOT / "guests" / "pvgrub"))
from mkdisk import PART_START, SECTOR, linux_grub_cfg, make_disk  # noqa: E402

ALL_ENGINES = True

PVGRUB = BUILD / "pvgrub" / "usr" / "lib" / "grub-xen" / "grub-x86_64-xen.bin"
GRUB_TIMEOUT = 120.0                # s: GRUB alone (its config, a few small files)
LINUX_MEMORY_MIB = 128              # GRUB unpacks Debian's kernel in its heap: 64 MiB is "out of memory"
TOKEN = uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def pvgrub() -> str:
    if not PVGRUB.exists():
        pytest.skip(f"{PVGRUB} not fetched (make setup)")
    if shutil.which("mkfs.ext2") is None:
        pytest.skip("mkfs.ext2 (e2fsprogs) is not installed")
    return str(PVGRUB)


# GRUB's terminal output: ANSI control sequences (colours, cursor moves; the console keeps
# control bytes as "?", ESC too) and the progress indicator it draws while reading a file
# ("[ vmlinuz  2.84MiB  36%  1.26MiB/s ]").
_CSI = re.compile(r"\?\[[0-9;?]*[A-Za-z]")
_PROGRESS = re.compile(r"\[ \S+ +[0-9.]+[KMGT]?i?B +[0-9]+% +[0-9.]+[KMGT]?i?B/s \]")


def grub_lines(dom) -> list[str]:
    """The console lines without GRUB's control sequences and progress indicators."""
    out = []
    for line in dom.console_lines:
        for part in _CSI.split(_PROGRESS.sub("", line)):
            if part.strip(" ?"):
                out.append(part.strip(" ?"))
    return out


async def run_grub(hv, kernel: str, disk: Path, access: str, memory_mib: int = 64):
    dom = await hv.create(kernel, memory_mib=memory_mib,
                          disks=[DiskConfig.parse(f"target={disk},vdev=xvda,access={access}")])
    async with asyncio.timeout(GRUB_TIMEOUT):
        reason = await dom.wait()
    return dom, reason


async def test_grub_reads_its_config_through_its_blkfront(hv, pvgrub, tmp_path):
    """GRUB finds (xen/xvda,msdos1) through xenstore and its blkfront, runs our grub.cfg
    (ext2 on the partition), reads a file, and powers off with `halt`."""
    cfg = (f"echo pvgrub-config-{TOKEN}\n"
           "ls\n"
           "cat /boot/hello.txt\n"
           "halt\n").encode()
    disk = tmp_path / "cfg.img"
    make_disk(disk, {"boot/grub/grub.cfg": cfg, "boot/hello.txt": f"hello-{TOKEN} from ext2\n".encode()}, 16)
    dom, reason = await run_grub(hv, pvgrub, disk, "r")
    lines = grub_lines(dom)
    assert reason == ShutdownReason.poweroff, (dom.describe_end(), lines)
    assert "Reading (xen/xvda,msdos1)/boot/grub/grub.cfg" in lines, lines
    assert f"pvgrub-config-{TOKEN}" in lines, lines
    assert any("(xen/xvda)" in l and "(xen/xvda,msdos1)" in l for l in lines), lines
    assert f"hello-{TOKEN} from ext2" in lines, lines


async def test_grub_writes_through_its_blkfront(hv, pvgrub, tmp_path):
    """save_env rewrites /boot/grub/grubenv in place (GRUB's blkfront WRITE requests, one
    4 KiB segment each); the host finds the new block in the image file, and GRUB reads it
    back with load_env."""
    env = b"# GRUB Environment Block\n"
    env += b"#" * (1024 - len(env))
    # The value is put together in GRUB, so that the image holds it only once GRUB wrote it.
    cfg = (f"set half1={TOKEN[:6]}\n"
           f"set half2={TOKEN[6:]}\n"
           'set pvgrub_token="${half1}${half2}"\n'
           "save_env -f /boot/grub/grubenv pvgrub_token\n"
           "unset pvgrub_token\n"
           "load_env -f /boot/grub/grubenv\n"
           'echo "loaded=${pvgrub_token}"\n'
           "halt\n").encode()
    disk = tmp_path / "env.img"
    make_disk(disk, {"boot/grub/grub.cfg": cfg, "boot/grub/grubenv": env}, 16)
    before = disk.read_bytes()
    assert f"pvgrub_token={TOKEN}".encode() not in before
    dom, reason = await run_grub(hv, pvgrub, disk, "w")
    lines = grub_lines(dom)
    assert reason == ShutdownReason.poweroff, (dom.describe_end(), lines)
    assert f"loaded={TOKEN}" in lines, lines
    after = disk.read_bytes()
    i = after.find(b"# GRUB Environment Block\n")
    assert i > 0 and after[i:i + 1024].startswith(
        b"# GRUB Environment Block\npvgrub_token=" + TOKEN.encode() + b"\n#"), after[i:i + 80]
    assert len(after[i:i + 1024].rstrip(b"#")) < 1024
    # Nothing else on the disk changed: GRUB wrote the grubenv block and only it.
    diff = [k for k in range(0, len(before), 1024) if before[k:k + 1024] != after[k:k + 1024]]
    assert diff == [i], (diff, i)


async def test_grub_boots_linux_from_the_disk(hv, pvgrub, tmp_path):
    """GRUB loads Debian's kernel and our initramfs from the partition, builds the domain
    in place (grub-core/loader/i386/xen.c) and jumps; Linux's blkfront then reconnects to
    the vbd GRUB closed, sees the partition, and its shell reads the disk; Linux powers
    off without waiting on the vbd's close."""
    if not KERNEL.exists() or not INITRD.exists():
        pytest.skip("Debian kernel and initramfs not built (make setup)")
    cfg = linux_grub_cfg(f"console=hvc0 pvgrub={TOKEN}")
    disk = tmp_path / "linux.img"
    part = make_disk(disk, {"boot/grub/grub.cfg": cfg, "boot/vmlinuz": KERNEL.read_bytes(),
                            "boot/initrd.img": INITRD.read_bytes()}, 24)
    with open(disk, "rb") as f:
        f.seek(part + 1024)
        superblock = hashlib.sha256(f.read(1024)).hexdigest()
    dom = await hv.create(pvgrub, memory_mib=LINUX_MEMORY_MIB,
                          disks=[DiskConfig.parse(f"target={disk},vdev=xvda,access=r")])
    await wait_ready(dom)
    lines = grub_lines(dom)
    assert "Booting `Debian GNU/Linux (aiovmm)'" in lines, lines[:40]
    shell = Shell(dom)
    rc, out = await shell.run("cat /proc/cmdline")
    assert rc == 0 and any(f"pvgrub={TOKEN}" in l for l in out), out
    rc, out = await shell.run("cat /sys/block/xvda/size /sys/block/xvda/xvda1/start")
    assert rc == 0 and out[-2:] == [str(disk.stat().st_size // SECTOR), str(PART_START)], out
    rc, out = await shell.run("dd if=/dev/xvda1 bs=1024 skip=1 count=1 2>/dev/null | sha256sum")
    assert rc == 0 and out[-1].split()[0] == superblock, out
    # Linux's poweroff closes the vbd (xenbus_frontend_dev_shutdown: Closing, then a wait of
    # up to 5 s for the backend's Closing): blkback answers as Linux blkback does, and the
    # frontend's Closed arriving with the domain's end does not hang the vbd's task.
    dom.console_backend.queue_input(b"poweroff\n")
    t0 = time.monotonic()
    async with asyncio.timeout(GRUB_TIMEOUT):
        reason = await dom.wait()
    took = time.monotonic() - t0
    assert reason == ShutdownReason.poweroff, dom.describe_end()
    assert not [l for l in dom.console_lines if "timeout closing device" in l], dom.console_lines[-8:]
    print(f"poweroff took {took:.2f} s")
    assert took < 5, (took, dom.console_lines[-8:])   # 5 s: its wait for each vbd
