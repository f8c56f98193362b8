"""guests/tests/pv_hcalls.c: hypercalls a Linux PV kernel relies on, with Xen's answers to a
domU (common/domain.c common_vcpu_op, x86/domain.c arch_do_vcpu_op, common/kernel.c
do_xen_version + the dummy XSM policy, x86/mm.c XENMEM_memory_map with xl's memmap limit,
common/grant_table.c with grant v2 disabled, pv/iret.c inside a multicall)."""
from __future__ import annotations

import pytest

from aiovmm import ShutdownReason
from conftest import boot, guest, results

EXPECTED: dict[str, str] = {
    "is_up": "1", "is_up_vcpu1": "-2",             # vCPU 1 does not exist: -ENOENT
    "get_physid": "-22",                            # only hardware-domain pinned vCPUs
    "initialise": "-17",                            # an initialised vCPU: -EEXIST
    "runstate_register": "0", "runstate_state": "0",
    "runstate_register_xen": "-14",                 # area in Xen's range: -EFAULT
    "runstate_accounts_all_time": "1", "runstate_blocked_grew": "1", "runstate_running_after": "0",
    "get_runstate_info": "0", "runstate_info_consistent": "1",
    "time_area_register": "0", "time_area_mul": str(1 << 31), "time_area_shift": "1",
    "time_area_version_even": "1",
    # The singleshot timer (common_vcpu_op): a passed deadline with VCPU_SSHOTTMR_future
    # (ignored since Xen 4.18) or one >= 2^63 fires before the call returns; only the
    # calling vCPU's (vCPU 1 does not exist: -ENOENT); a bad pointer -EFAULT; a far
    # deadline is not clamped to 100 ms; a stopped timer stays quiet; set_timer_op's
    # timeout 2^50 ns or more ahead fires after ~100 ms (Xen's Linux workaround).
    "sshot_past_future_flag": "0", "sshot_past_fired_at_once": "1",
    "sshot_huge": "0", "sshot_huge_fired_at_once": "1",
    "sshot_other_vcpu": "-2", "sshot_bad_pointer": "-14", "sshot_stop_other_vcpu": "-2",
    "sshot_far": "0", "sshot_far_quiet_300ms": "1", "sshot_stop": "0", "sshot_stopped_quiet": "1",
    "timer_op_huge": "0", "timer_op_huge_fired_after_100ms": "1",
    # build_id and commandline2 are XSM_PRIV: -EPERM for a domU; extraversion2 is open
    # (NULL handle: the length; a too-small buffer: -ENOBUFS).
    "build_id": "-1", "extraversion2_len": "7", "extraversion2_small": "-105",
    "commandline2": "-1",
    # PV domU: mmu_pt_update_preserve_ad | highmem_assist | gnttab_map_avail_bits |
    # direct_mapped (no writable_page_tables: Xen gives that bit to translated guests only).
    "get_features": "0", "features": "0x200e0",
    # xl's memmap limit: one RAM entry [0, maxmem).
    "memory_map": "0", "memory_map_entries": "1", "memory_map_ram": "1",
    # Grant v2 disabled: v2 -ENOSYS (version written back: 1), v3 -EINVAL, v1 fine; a v1
    # table has no status frames (GNTST_general_error), a missing domain GNTST_bad_domain,
    # count != 1 -EINVAL.
    "gnttab_set_v2": "-38", "gnttab_set_v2_version": "1", "gnttab_set_v3": "-22",
    "gnttab_set_v1": "0", "status_frames": "0", "status_frames_status": "-1",
    "status_frames_zero_status": "0", "status_frames_bad_dom": "-2",
    "status_frames_count2": "-22",
    # The iret restored RAX; the multicall did not overwrite it.
    "multicall_iret_rax": "0x1234abcd",
    # register_vcpu_info: crossing a page or misaligned -ENXIO, offset >= page -EINVAL,
    # foreign -EINVAL, a page table (no writable type) -EACCES, a second time -EBUSY; the
    # new area starts as a copy with everything pending.
    "vcpu_info_cross_page": "-6", "vcpu_info_misaligned": "-6",
    "vcpu_info_offset_page": "-22", "vcpu_info_foreign": "-22", "vcpu_info_pagetable": "-13",
    "vcpu_info_ok": "0", "vcpu_info_mask_copied": "1", "vcpu_info_pending_set": "1",
    "vcpu_info_time_mul": str(1 << 31), "vcpu_info_again": "-16",
    "about_to_down": "1",
}


@pytest.fixture(scope="module")
def run():
    return boot(guest("pv_hcalls"), memory_mib=8)


def test_last_vcpu_down_powers_off(run):
    """VCPUOP_down of the last online vCPU is domain_shutdown(SHUTDOWN_poweroff)."""
    assert run.reason == ShutdownReason.poweroff, run.end
    assert "down_returned" not in results(run.lines)


def test_no_unexpected_keys(run):
    assert set(results(run.lines)) == set(EXPECTED)


@pytest.mark.parametrize("key", list(EXPECTED))
def test_result(run, key):
    res = results(run.lines)
    assert key in res, f"guest printed no 'result {key}' line: {run.lines[-5:]}"
    assert res[key] == EXPECTED[key], f"{key}: got {res[key]}, Xen gives {EXPECTED[key]}"
