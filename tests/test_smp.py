"""SMP guests (issue 15): guests/tests/smp.c brings up vCPU 1 with VCPUOP_initialise + up,
both vCPUs run at once and exchange IPIs; bad contexts, up of an uninitialised vCPU and ids
out of range get Xen's error codes (common/domain.c common_vcpu_op, x86/domain.c
arch_set_info_guest, x86/mm.c vcpumask_to_pcpumask). On both engines."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from aiovmm import Hypervisor, ShutdownReason
from aiovmm.errors import BuildError
from aiovmm.config import ConfigError, parse
from aiovmm.migration.context import SIZE, VcpuContext
from conftest import HV_MEMORY_MIB, guest, results, run_cli

ALL_ENGINES = True          # every test that boots a guest runs on both engines

EXPECTED: dict[str, str] = {
    # Xen's domain_vcpu(): an id past the domain's vCPUs is -ENOENT (also 2^32-1).
    "is_up_0": "1", "is_up_1": "0", "is_up_nr": "-2", "is_up_huge": "-2",
    "up_uninit": "-22",                 # VCPUOP_up of a vCPU never initialised
    "init_nr": "-2", "init_0": "-17", "init_efault": "-14",
    "bind_ipi_nr": "-2",
    "singleshot_other": "-22",          # only the calling vCPU's own singleshot timer
    # arch_set_info_guest: one bad field each, all -EINVAL.
    **{k: "-22" for k in (
        "ctx_rip", "ctx_rsp", "ctx_kernel_sp", "ctx_fs_base", "ctx_gs_base_user", "ctx_event_cb",
        "ctx_failsafe_cb", "ctx_trap", "ctx_ldt_align", "ctx_ldt_ents", "ctx_ldt_xen",
        "ctx_gdt_ents", "ctx_dr7", "ctx_dr0", "ctx_user_no_cr1", "ctx_cr3_range", "ctx_cr3_l1",
        "ctx_cr3_shinfo", "ctx_cr3_zero", "ctx_gdt_writable", "ctx_gdt_then_cr3")},
    # The refused context's GDT reference was dropped: the frame maps writable again.
    "gdt_readonly": "0", "gdt_writable_again": "0", "is_up_1_after_bad": "0",
    "bind_ipi_0_ok": "1", "bind_ipi_1_ok": "1", "bind_virq_timer_1_ok": "1", "unmask_ipi_1": "0",
    "init_1": "0", "init_1_again": "-17", "is_up_1_initialised": "0", "up_1": "0",
    "is_up_1_up": "1",
    # vCPU 1 started with the context's rdi, r15 and fs_base.
    "ap_cookie": "1", "ap_fs_word": "1", "ap_r15": "1",
    # ... and with its rax, rcx, rdx and (VGCF_i387_valid) fpu_ctxt: FCW, MXCSR, XMM1.
    "ap_rax_rcx_rdx": "1", "ap_fcw": str(0x27F), "ap_mxcsr": str(0x7F80), "ap_xmm1": "1",
    "both_ran": "1",                    # vCPU 1 made progress while vCPU 0 spun
    "flush_multi": "0", "invlpg_multi": "0", "flush_all": "0", "invlpg_all": "0",
    "flush_multi_badmask": "-22",       # an unreadable vcpumask
    "uvm_mask": "0", "uvm_badmask": "-14", "uvm_all": "0",     # update_va_mapping: -EFAULT
    "ipi_rc": "0", "ap_pongs": "50", "ap_poll_rc": "0",
    "ap_sel_has_ipi_word": "1",         # the IPI marked vCPU 1's vcpu_info, not vCPU 0's
    "ap_timer_rc": "0", "ap_timer_ok": "1",
    # Code vCPU 0 rewrote after both ran it: vCPU 1 runs the new code, not its stale
    # translation (each Unicorn instance has its own; KVM has none to go stale).
    "smc_self": "1", "smc_other_before": "1", "smc_other_after": "2",
    "smc_ipi_rc": "0", "smc_ipi_before": "1", "smc_ipi_after": "3",
    "is_up_1_down": "0",                # vCPU 1 took itself down
}


@dataclass
class Run:
    lines: list[str]
    reason: object
    end: str
    cpu_ns: list[int]
    online: list[bool]


async def _boot(engine: str, vcpus: int) -> Run:
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        dom = await hv.create(guest("smp"), memory_mib=8, cmdline=f"vcpus={vcpus}", vcpus=vcpus)
        vcpus_ = list(dom.vcpus)
        async with asyncio.timeout(180):
            reason = await dom.wait()
        return Run(list(dom.console_lines), reason, dom.describe_end(),
                   [hv.scheduler.state(v).cpu_ns for v in vcpus_], [v.online for v in vcpus_])


@pytest.fixture(scope="module")
def run(engine) -> Run:
    return asyncio.run(_boot(engine, 2))


def test_smp_guest_results(run):
    assert run.reason == ShutdownReason.poweroff, (run.end, run.lines[-5:])
    assert "smp: done" in run.lines
    got = results(run.lines)
    assert {k: got.get(k) for k in EXPECTED} == EXPECTED


def test_both_vcpus_used_cpu(run):
    """Each vCPU is its own schedulable unit: both accumulated CPU time in slices."""
    assert len(run.cpu_ns) == 2 and all(ns > 0 for ns in run.cpu_ns), run.cpu_ns
    assert run.online == [True, False]          # vCPU 1 went down at the end


def test_uninitialised_vcpu_stays_down(engine):
    """vcpus=3: vCPU 2 is never initialised; it stays down, costs no CPU time, and the
    domain still powers off."""
    r = asyncio.run(_boot(engine, 3))
    assert r.reason == ShutdownReason.poweroff, (r.end, r.lines[-5:])
    got = results(r.lines)
    assert got["is_up_nr"] == "-2" and got["ap_pongs"] == "50"
    assert r.cpu_ns[2] == 0 and r.online[2] is False


def test_vcpus_out_of_range_refused(engine):
    async def main() -> None:
        async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
            for n in (0, 33, -1):
                with pytest.raises(BuildError, match="vcpus must be 1..32"):
                    await hv.create(guest("smp"), memory_mib=8, vcpus=n)
            assert not hv.domains
    asyncio.run(main())


def test_config_vcpus():
    cfg = parse('kernel = "/k"\nvcpus = 4\ncap = 300\n')
    assert cfg.vcpus == 4 and cfg.cap == 300
    assert parse('kernel = "/k"\n').vcpus == 1
    for bad in ("0", "33", '"2"'):
        with pytest.raises(ConfigError, match="vcpus must be 1..32"):
            parse(f'kernel = "/k"\nvcpus = {bad}\n')
    with pytest.raises(ConfigError, match="cap must be 0..100"):
        parse('kernel = "/k"\ncap = 150\n')          # one vCPU: at most 100 %


def test_cli_vcpus(engine):
    r = run_cli("run", guest("smp"), "--vcpus", "2", "--cmdline", "vcpus=2", "--engine", engine,
                timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "smp: done" in r.stdout
    bad = run_cli("run", guest("smp"), "--vcpus", "64")
    assert bad.returncode == 64 and "--vcpus must be between 1 and 32" in bad.stderr


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_context_layout_matches_xen_header(tmp_path):
    """The vcpu_guest_context parser against Xen's own header (libxen-dev): every field
    aiovmm reads sits where the C compiler puts it."""
    fields = ["flags", "user_regs.rip", "user_regs.rsp", "user_regs.rflags", "user_regs.rdi",
              "user_regs.r15", "user_regs.cs", "trap_ctxt[14].address", "trap_ctxt[14].cs",
              "trap_ctxt[14].flags", "ldt_base", "ldt_ents", "gdt_frames[1]", "gdt_ents",
              "kernel_ss", "kernel_sp", "ctrlreg[1]", "ctrlreg[3]", "ctrlreg[4]", "debugreg[7]",
              "event_callback_eip", "failsafe_callback_eip", "syscall_callback_eip",
              "vm_assist", "fs_base", "gs_base_kernel", "gs_base_user"]
    src = tmp_path / "off.c"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n#include <xen/xen.h>\nint main(void){\n"
                   + "".join(f'printf("%zu %zu\\n", offsetof(vcpu_guest_context_t, {f}), '
                             f'sizeof(((vcpu_guest_context_t *)0)->{f}));\n' for f in fields)
                   + 'printf("%zu\\n", sizeof(vcpu_guest_context_t));return 0;}\n')
    exe = tmp_path / "off"
    subprocess.run(["gcc", "-D__XEN_INTERFACE_VERSION__=0x00040e00", "-o", str(exe), str(src)],
                   check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    assert int(out[len(fields)]) == SIZE
    raw = bytearray(SIZE)
    values = {}
    for i, f in enumerate(fields):
        off, size = map(int, out[i].split())
        val = (0x1111111111111111 * (i % 15 + 1)) & ((1 << (8 * size)) - 1)
        raw[off:off + size] = val.to_bytes(size, "little")
        values[f] = val
    c = VcpuContext.unpack(bytes(raw))
    r = c.regs
    assert (c.flags, r["rip"], r["rsp"], r["rflags"], r["rdi"], r["r15"], r["cs"]) == tuple(
        values[k] for k in ("flags", "user_regs.rip", "user_regs.rsp", "user_regs.rflags",
                            "user_regs.rdi", "user_regs.r15", "user_regs.cs"))
    assert c.traps[14] == (values["trap_ctxt[14].flags"], values["trap_ctxt[14].cs"],
                           values["trap_ctxt[14].address"])
    assert (c.ldt_base, c.ldt_ents, c.gdt_ents, c.kernel_ss, c.kernel_sp) == tuple(
        values[k] for k in ("ldt_base", "ldt_ents", "gdt_ents", "kernel_ss", "kernel_sp"))
    assert (c.ctrlreg[1], c.ctrlreg[3], c.ctrlreg[4], c.debugreg[7]) == tuple(
        values[k] for k in ("ctrlreg[1]", "ctrlreg[3]", "ctrlreg[4]", "debugreg[7]"))
    assert (c.event_callback, c.failsafe_callback, c.syscall_callback, c.vm_assist, c.fs_base,
            c.gs_base_kernel, c.gs_base_user) == tuple(values[k] for k in (
                "event_callback_eip", "failsafe_callback_eip", "syscall_callback_eip",
                "vm_assist", "fs_base", "gs_base_kernel", "gs_base_user"))
    # gdt_frames[1] is read when gdt_ents asks for two frames or more
    raw2 = bytearray(raw)
    off = int(out[fields.index("gdt_ents")].split()[0])
    raw2[off:off + 8] = (1024).to_bytes(8, "little")
    assert VcpuContext.unpack(bytes(raw2)).gdt_frames[1] == values["gdt_frames[1]"]
