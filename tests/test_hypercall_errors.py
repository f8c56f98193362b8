"""tests/hcall_errors.elf: every error path returns Xen's errno (guests/README.md)."""
from __future__ import annotations

import pytest

from aiovmm import ShutdownReason
from aiovmm.abi import Errno
from conftest import ENGINES, boot, guest, results

pytestmark = ENGINES

ENOSYS, EFAULT, EINVAL, ENOENT = -38, -14, -22, -2
# Xen's values, written out rather than taken from aiovmm.abi: this checks the hypervisor.
assert (Errno.ENOSYS, Errno.EFAULT, Errno.EINVAL, Errno.ENOENT) == (38, 14, 22, 2)

EXPECTED = {
    "enosys_11": ENOSYS,
    "enosys_57": ENOSYS,
    "enosys_127": ENOSYS,
    "enosys_1000": ENOSYS,
    "efault_console_io": EFAULT,
    "efault_console_io_noncanon": EFAULT,
    "efault_set_trap_table": EFAULT,
    "efault_xen_version": EFAULT,
    "efault_vcpu_op": EFAULT,
    "efault_multicall": EFAULT,
    "efault_sched_op": EFAULT,
    "enosys_sched_op_99": ENOSYS,
    "enosys_vcpu_op_99": ENOSYS,
    "enosys_event_channel_op_99": ENOSYS,
    "enosys_xen_version_99": ENOSYS,
    "einval_bind_virq": EINVAL,
    "einval_periodic_timer": EINVAL,
    "enoent_vcpu_op_vcpu": ENOENT,
}


@pytest.fixture(scope="module")
def run(engine):
    return boot(guest("hcall_errors"), memory_mib=8, engine=engine)


def test_powers_off(run):
    assert run.reason == ShutdownReason.poweroff, run.end
    assert run.lines[-1] == "poweroff"
    assert not any(l.startswith("panic:") for l in run.lines)


def test_no_unexpected_keys(run):
    assert set(results(run.lines)) == set(EXPECTED)


@pytest.mark.parametrize("key", list(EXPECTED))
def test_result(run, key):
    res = results(run.lines)
    assert key in res, f"guest printed no 'result {key}' line: {run.lines}"
    assert int(res[key]) == EXPECTED[key], f"{key}: got {res[key]}, Xen returns {EXPECTED[key]}"
