#!/usr/bin/env python3
"""Build a disk image PV-GRUB2 boots: an MBR with one Linux partition holding an ext2 file
system with /boot/grub/grub.cfg, a kernel and an initramfs. No root needed: no loop device,
no mount (mkfs.ext2 -d writes the files straight into the image at the partition's offset).

    python3 guests/pvgrub/mkdisk.py OUT.img [--kernel K] [--initrd I] [--cmdline S] [--size MIB]

Defaults: Debian's kernel and the test initramfs from `make setup` (guests/build/linux/),
command line "console=hvc0". Then (docs/guests.md):

    aiovmm run guests/build/pvgrub/usr/lib/grub-xen/grub-x86_64-xen.bin --memory 128 \\
        --disk target=OUT.img,vdev=xvda,access=rw

`make_disk(path, files, size_mib)` is the library form (tests/test_pvgrub.py uses it).
"""
from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

SECTOR = 512
PART_START = 2048                   # sectors: partition 1 at 1 MiB, where fdisk puts it
FS_BLOCK = 4096
HERE = Path(__file__).resolve().parent
LINUX = HERE.parent / "build" / "linux"


def make_disk(path: str | os.PathLike, files: dict[str, bytes], size_mib: int) -> int:
    """An MBR disk image of `size_mib` MiB with one bootable Linux partition (type 0x83) at
    PART_START holding an ext2 file system with `files` (path inside it -> content).
    Returns the partition's byte offset."""
    total = (size_mib << 20) // SECTOR
    nblocks = (total - PART_START) * SECTOR // FS_BLOCK
    with tempfile.TemporaryDirectory() as stage:
        for rel, data in files.items():
            p = Path(stage) / rel.lstrip("/")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        with open(path, "wb") as f:
            f.truncate(total * SECTOR)
        r = subprocess.run(["mkfs.ext2", "-q", "-F", "-b", str(FS_BLOCK), "-L", "pvgrub", "-d", stage,
                            "-E", f"offset={PART_START * SECTOR}", str(path), str(nblocks)],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"mkfs.ext2 failed: {r.stderr.strip()}")
    # One partition entry: active, CHS fields "beyond 1024 cylinders" (LBA only), type 0x83.
    entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff",
                        PART_START, nblocks * FS_BLOCK // SECTOR)
    mbr = bytearray(SECTOR)
    mbr[440:444] = os.urandom(4)                 # disk signature
    mbr[446:462] = entry
    mbr[510:512] = b"\x55\xaa"
    with open(path, "r+b") as f:
        f.write(mbr)
    return PART_START * SECTOR


def linux_grub_cfg(cmdline: str, title: str = "Debian GNU/Linux (aiovmm)") -> bytes:
    """A grub.cfg with one entry: /boot/vmlinuz with `cmdline` and /boot/initrd.img."""
    return ("set timeout=0\n"
            f"menuentry '{title}' {{\n"
            "    echo 'Loading Linux ...'\n"
            f"    linux /boot/vmlinuz {cmdline}\n"
            "    echo 'Loading initial ramdisk ...'\n"
            "    initrd /boot/initrd.img\n"
            "}\n").encode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--kernel", default=str(LINUX / "vmlinuz"))
    ap.add_argument("--initrd", default=str(LINUX / "initramfs.cpio.gz"))
    ap.add_argument("--cmdline", default="console=hvc0")
    ap.add_argument("--size", type=int, default=0, metavar="MIB",
                    help="image size (default: the files plus 8 MiB, at least 16)")
    args = ap.parse_args()
    kernel, initrd = Path(args.kernel).read_bytes(), Path(args.initrd).read_bytes()
    size = args.size or max(16, (len(kernel) + len(initrd)) // (1 << 20) + 9)
    make_disk(args.out, {"boot/grub/grub.cfg": linux_grub_cfg(args.cmdline),
                         "boot/vmlinuz": kernel, "boot/initrd.img": initrd}, size)
    print(f"{args.out}: {size} MiB, partition 1 (ext2) with /boot/grub/grub.cfg, /boot/vmlinuz, /boot/initrd.img")
    return 0


if __name__ == "__main__":
    sys.exit(main())
