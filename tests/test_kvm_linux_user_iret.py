"""Debian's Linux on the KVM engine returns to its user processes through the C run loop
(csrc/kvm.c fast_iret): its iret frames to user mode name its own GDT's __USER_CS (0x33)
and __USER_DS (0x2b), and C completes them when Python's rules load both (iret_cs64,
iret_ss_gdt; tests/test_kvm_iret_gdt.py compares the two paths case by case). Until SS was
taken too, every such iret went to Python: ~2.2-2.9 per 4 KiB O_DIRECT read of fio
(bench/blk_exits.py, issue 14 block), each a Python hypercall dispatch on top of the exit.

One guest, one vbd on a host file with random data: a user process (busybox dd) reads it
with O_DIRECT in 4 KiB requests; what it read must be the file, and the guest's irets to user
mode in that window must be C's."""
from __future__ import annotations

import gzip
import hashlib
import os
import sys

import pytest

from conftest import ROOT, _kvm_skip_reason

pytestmark = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=str(_kvm_skip_reason()))

LINUX = ROOT / "guests/build/linux"
KERNEL, INITRD = LINUX / "vmlinuz", LINUX / "initramfs.cpio.gz"
DD_MIB = 8

SCRIPT = f"""#!/bin/sh
i=0
while [ ! -b /dev/xvda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
echo "DD-BEGIN"
sum=$(dd if=/dev/xvda bs=4k count={DD_MIB * 256} iflag=direct 2>/dev/null | md5sum)
echo "DD-END $sum"
"""


def _initrd(tmp) -> str:
    sys.path.insert(0, str(ROOT / "guests/linux"))
    import build as linux_build                    # its Cpio writer
    c = linux_build.Cpio()
    c.file("dd.sh", SCRIPT.encode(), 0o755)
    path = tmp / "initramfs-dd.cpio.gz"
    with open(INITRD, "rb") as f, open(path, "wb") as out:
        out.write(f.read())
        out.write(gzip.compress(c.finish(), mtime=0))
    return str(path)


async def test_linux_user_returns_completed_in_c(tmp_path):
    if not KERNEL.exists() or not INITRD.exists():
        pytest.skip("Debian kernel and initramfs not built (make setup)")
    from aiovmm import Hypervisor
    image = tmp_path / "disk.img"
    data = os.urandom(DD_MIB << 20)
    image.write_bytes(data + bytes(1 << 20))
    cmdline = "console=hvc0 quiet aiovmm.run=/bin/sh,/dd.sh aiovmm.exit=1"
    async with Hypervisor(memory_mib=512) as hv:
        dom = await hv.create(str(KERNEL), memory_mib=256, ramdisk=_initrd(tmp_path), cmdline=cmdline,
                              disks=[f"target={image},vdev=xvda,access=r"], engine="kvm")
        await dom.wait_for_line(r"^DD-BEGIN$", timeout=600)
        eng = dom.vcpus[0].engine
        in_c0, irets0 = eng.exits_in_c["iret to user"], dom.hypercall_counts.get(23, 0)
        line = await dom.wait_for_line(r"^DD-END ", timeout=600)
        in_c, irets = eng.exits_in_c["iret to user"] - in_c0, dom.hypercall_counts.get(23, 0) - irets0
        await dom.wait()
    assert line.split()[1] == hashlib.md5(data).hexdigest(), line
    # 2,048 reads: each at least an iret back to dd after its system call. Irets to kernel
    # mode and the few C leaves to Python (an event pending at the return) are the rest.
    assert irets >= DD_MIB * 256, irets
    assert in_c >= 0.6 * irets, (in_c, irets)
