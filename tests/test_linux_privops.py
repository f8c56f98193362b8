"""Debian's unmodified kernel through the privileged-operation and hypercall interfaces.

One boot of guests/build/linux/vmlinuz with the test initramfs (built by `make setup`), whose
/init runs `dmesg`, `cat /proc/cpuinfo` and `cat /sys/hypervisor/...` and powers off
(aiovmm.run / aiovmm.exit=1). What it shows about this branch's interfaces:
- the kernel boots to /init and powers off cleanly (exit reason poweroff): its early
  wrmsr/rdmsr, CR and cpuid use, set_gdt/update_descriptor, vcpu_op, physdev set_iopl and
  XENFEAT checks all got Xen's answers;
- dmesg holds no BUG, WARNING, Oops or "unchecked MSR access" (an MSR Linux expects Xen to
  serve, answered #GP);
- /proc/cpuinfo shows Xen's PV policy: `hypervisor` set; pse, pge, mtrr, vmx, x2apic,
  monitor absent;
- Linux identifies Xen through its CPUID leaves and /sys/hypervisor.
"""
from __future__ import annotations

import asyncio
import re

import pytest

from aiovmm import Hypervisor, ShutdownReason
from conftest import BUILD, HV_MEMORY_MIB

LINUX = BUILD / "linux"
BOOT_TIMEOUT = 300.0          # s; ~20 s on an idle machine, several times that under load
CMDLINE = ("console=hvc0 aiovmm.exit=1 aiovmm.run=dmesg aiovmm.run=cat,/proc/cpuinfo "
           "aiovmm.run=cat,/sys/hypervisor/type,/sys/hypervisor/version/major,"
           "/sys/hypervisor/version/minor")


@pytest.fixture(scope="module")
def linux():
    kernel, initrd = LINUX / "vmlinuz", LINUX / "initramfs.cpio.gz"
    if not kernel.exists() or not initrd.exists():
        pytest.skip(f"{LINUX}: Debian kernel and initramfs not built (make setup)")

    async def run():
        async with Hypervisor(memory_mib=HV_MEMORY_MIB + 256) as hv:
            dom = await hv.create(str(kernel), memory_mib=256, ramdisk=str(initrd), cmdline=CMDLINE)
            async with asyncio.timeout(BOOT_TIMEOUT):
                reason = await dom.wait()
            return reason, dom.describe_end(), list(dom.console_lines)
    return asyncio.run(run())


def test_boots_and_powers_off(linux):
    reason, end, lines = linux
    assert reason == ShutdownReason.poweroff, (end, lines[-30:])
    assert any(l.startswith("aiovmm-init: start") for l in lines), lines[-30:]


def test_dmesg_clean(linux):
    _reason, _end, lines = linux
    bad = [l for l in lines if re.search(r"\bBUG\b|WARNING|Oops|unchecked MSR access|Call Trace", l)]
    assert not bad, bad


def test_cpuinfo_is_xen_pv_policy(linux):
    _reason, _end, lines = linux
    flags = next((l for l in lines if l.startswith("flags")), "")
    assert flags, "no /proc/cpuinfo flags line"
    have = set(flags.split(":", 1)[1].split())
    assert "hypervisor" in have
    assert {"pse", "pge", "mtrr", "pse36", "vmx", "x2apic", "monitor", "tsc_deadline_timer"}.isdisjoint(have), have
    assert {"fpu", "tsc", "msr", "pae", "cx8", "sep", "cmov", "pat", "clflush", "mmx", "fxsr",
            "sse", "sse2", "syscall", "nx", "lm", "rdtscp"} <= have, have


def test_hypervisor_identified(linux):
    _reason, _end, lines = linux
    i = lines.index("xen") if "xen" in lines else -1
    assert i >= 0, "no /sys/hypervisor/type = xen"
    assert lines[i + 1:i + 3] == ["4", "17"], lines[i:i + 3]
