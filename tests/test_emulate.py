"""Privileged operations of a PV kernel (guests/tests/privops.c): Xen's emulation and refusals.

The guest kernel runs at CPL 3; each probe is one real instruction (or hypercall). Expected
values are upstream Xen's for a 64-bit PV domU, read from xen/arch/x86/pv/emul-priv-op.c
(validate, read_cr/write_cr, read_msr/write_msr, read_io/write_io), msr.c, cpuid.c,
pv/misc-hypercalls.c (set_debugreg) and physdev.c; `13` = #GP bounced to the guest,
`6` = #UD, `none` = emulated (no trap).
"""
from __future__ import annotations

import pytest

from aiovmm import ShutdownReason
from conftest import boot, guest, results

NONE, GP, UD = "none", "13", "6"
EPERM, EINVAL, ENODEV, EACCES, ENOSYS, EOPNOTSUPP = "-1", "-22", "-19", "-13", "-38", "-95"

EXPECTED: dict[str, str] = {
    # read_msr's `done:` path: no #GP handler registered and the CPU has the MSR -> 0;
    # once a handler exists the same read is #GP.
    "rdmsr_faked_without_handler": "0x0", "rdmsr_sysenter_cs_with_handler_trap": GP,
    # MSRs: FS/GS/shadow-GS bases are real; non-canonical bases #GP.
    "wrmsr_fs_base_trap": NONE, "rdmsr_fs_base": "0x123456789000", "fs_base_effective": "1",
    "wrmsr_fs_noncanon_trap": GP,
    "wrmsr_shadow_gs_trap": NONE, "rdmsr_shadow_gs": "0x7000", "gs_base_unchanged": "1",
    # EFER reads SCE|LME|LMA|NXE; writing the same value back is allowed (Linux does), any
    # other value #GP.
    "rdmsr_efer": "0xd01", "wrmsr_efer_same_trap": NONE, "wrmsr_efer_other_trap": GP,
    # APIC_BASE: enabled, default base, BSP on vCPU 0. PAT: Xen's own PAT.
    "rdmsr_apic_base": "0xfee00900", "rdmsr_pat": "0x50100070406",
    # MISC_ENABLE as guest_misc_enable edits it (BTS/PEBS unavailable, xTPR disabled).
    "rdmsr_misc_enable": "0x801801",
    # Unknown MSRs, Xen's range, LSTAR, x2APIC MSRs (HVM only): #GP (the guest has a #GP
    # handler, so no "faking RDMSR").
    "rdmsr_unknown_trap": GP, "rdmsr_xen_range_trap": GP, "wrmsr_unknown_trap": GP,
    # Xen's MSR 0x40000000 (guest_rdmsr_xen/guest_wrmsr_xen): reads 0; a write fills an own
    # writable-typeable frame with the hypercall page (which then works); an index in the
    # low bits, a page table or a foreign frame: #GP.
    "rdmsr_hypercall_page_trap": NONE, "rdmsr_hypercall_page": "0x0",
    "wrmsr_hypercall_page_trap": NONE, "hypercall_page_xen_version": "0x40011",
    "wrmsr_hypercall_page_index_trap": GP, "wrmsr_hypercall_page_l4_trap": GP,
    "wrmsr_hypercall_page_foreign_trap": GP,
    "wrmsr_lstar_trap": GP, "rdmsr_x2apic_trap": GP,
    # TSC_AUX exists with RDTSCP in the policy.
    "wrmsr_tsc_aux_trap": NONE, "rdmsr_tsc_aux": "0x7",
    # CR0: Xen's CR0 with the virtual TS (fpu_taskswitch / clts / mov cr0 of TS only).
    "cr0": "0x80050033", "cr0_after_fpu_taskswitch": "0x8005003b", "clts_trap": NONE,
    "cr0_after_clts": "0x80050033", "cr0_set_ts_trap": NONE, "cr0_after_write": "0x8005003b",
    "cr0_clear_pg_trap": GP,
    "cr2": "0x4242000",
    # CR4: PAE|MCE|OSFXSR|OSXMMEXCPT visible; PGE is not guest-controllable (dropped).
    "cr4": "0x660", "cr4_write_trap": NONE, "cr4_after_write": "0x660",
    # CR3: the L4's MFN; a write goes through new_guest_cr3 (MMUEXT_NEW_BASEPTR's rules):
    # foreign frames and data frames that are not L4 tables are refused -> #GP(0).
    "cr3_is_l4": "1", "cr3_same_trap": NONE, "cr3_foreign_trap": GP,
    "cr3_foreign_trap_err": "0x0", "cr3_data_frame_trap": GP, "cr3_still_l4": "1",
    # Debug registers (set_debugreg): DR7.GD and breakpoints in Xen's range -EPERM,
    # registers beyond 7 -ENODEV.
    "set_debugreg7": "0", "get_debugreg7": "0x401", "mov_dr7": "0x401",
    "set_debugreg0_xen": EPERM, "set_debugreg0_user": "0", "set_debugreg7_gd": EPERM,
    "get_debugreg8": ENODEV,
    # Without I/O privilege: cli/sti/in/out #GP. set_iopl > 3: -EINVAL.
    "cli_noiopl_trap": GP, "sti_noiopl_trap": GP, "in_noiopl_trap": GP, "out_noiopl_trap": GP,
    "set_iopl_4": EINVAL, "set_iopl_1": "0",
    # With IOPL 1 (the kernel counts as ring 1): cli/sti are no-ops (the event mask is not
    # touched), ports the domain has no access to read all ones, writes are dropped.
    "cli_iopl_trap": NONE, "mask_after_cli": "0", "sti_iopl_trap": NONE,
    "in_iopl_trap": NONE, "in_pit_value": "0xff", "inl_iopl_trap": NONE,
    "inl_value": "0xffffffff", "out_iopl_trap": NONE,
    # physdev: IRQ status answered (needs_eoi), EOI of an unbound PIRQ -EINVAL, hardware ops
    # -EPERM (XSM), unknown -ENOSYS. platform_op: bad version -EACCES, else -EPERM.
    # xenpmu_op: vPMU off -> -EOPNOTSUPP.
    "irq_status_query": "0", "irq_status_flags": "1", "physdev_eoi": EINVAL,
    "physdev_map_pirq": EPERM, "physdev_99": ENOSYS,
    "platform_op": EPERM, "platform_op_badver": EACCES, "xenpmu_op": EOPNOTSUPP,
    # wbinvd ignored without cache-flush privilege; invd and hlt are not emulated -> #GP;
    # xsetbv with CR4.OSXSAVE clear (XSAVE not in the policy) -> #UD.
    "wbinvd_trap": NONE, "invd_trap": GP, "hlt_trap": GP, "xsetbv_trap": UD,
    # CPUID: Xen's leaves through the forced-emulation prefix and plain CPUID alike.
    "forced_cpuid_xen_sig": "1", "forced_cpuid_40000000_eax": "0x40000005",
    "cpuid_xen_sig": "1", "cpuid_40000001_eax": "0x40011", "cpuid_40000002_eax": "0x1",
    "cpuid_40000002_ebx": "0x40000000",
    "cpuid_1_ecx_hypervisor": "0x1", "cpuid_1_ecx_vmx": "0x0", "cpuid_1_ecx_monitor": "0x0",
    "cpuid_1_ecx_x2apic": "0x0", "cpuid_1_edx_pse": "0x0", "cpuid_1_edx_pge": "0x0",
    "cpuid_1_edx_mtrr": "0x0", "cpuid_1_edx_pse36": "0x0", "cpuid_1_edx_tsc": "0x1",
    "cpuid_1_ebx_apicid": "0x0", "cpuid_native_equals_forced": "1",
    "cpuid_80000001_edx_lm": "0x1", "cpuid_80000001_edx_rdtscp": "0x1",
    # RDTSC, RDTSCP and the pvclock are one clock; RDTSCP's ECX is TSC_AUX.
    "rdtscp_aux": "7", "rdtscp_monotonic": "1", "pvclock_between": "1",
    "privops_done": "1",
}


@pytest.fixture(scope="module")
def run():
    return boot(guest("privops"), memory_mib=8)


def test_powers_off(run):
    assert run.reason == ShutdownReason.poweroff, run.end
    assert not any(l.startswith("panic:") for l in run.lines), run.lines


def test_no_unexpected_keys(run):
    assert set(results(run.lines)) == set(EXPECTED)


@pytest.mark.parametrize("key", list(EXPECTED))
def test_result(run, key):
    res = results(run.lines)
    assert key in res, f"guest printed no 'result {key}' line: {run.lines[-5:]}"
    assert res[key] == EXPECTED[key], f"{key}: got {res[key]}, Xen gives {EXPECTED[key]}"
