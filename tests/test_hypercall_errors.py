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


# -- argument checks of xen_version and vm_assist, through the real dispatcher -----------------
@pytest.fixture
async def paused_vcpu(hv):
    """A hello.elf vCPU that never runs, and a scratch VA in its own read-write memory."""
    from aiovmm import builder
    dom = await hv.create(guest("hello"), memory_mib=8, name="hc-args")
    dom.paused = True                                       # before the next await
    try:
        yield dom, dom.vcpus[0], builder.parse_kernel(guest("hello")).virt_base + 0x800
    finally:
        dom.crash("test done")
        await dom.wait()


async def test_xen_version_and_vm_assist_argument_checks(paused_vcpu):
    """Xen (common/kernel.c): XENVER_get_features with a submap index past
    XENFEAT_NR_SUBMAPS (1) is -EINVAL; XENVER_pagesize with a non-NULL argument -EINVAL;
    vm_assist with a command other than enable/disable -ENOSYS and the assist unchanged."""
    from aiovmm import hypercall
    from aiovmm.abi import PAGE_SHIFT, Hypercall, XenVer
    dom, v, va = paused_vcpu
    ma = dom.hypervisor.pagetables.translate(v.current_root << PAGE_SHIFT, va, True)
    for idx, rc in ((0, 0), (1, EINVAL), (0xFFFFFFFF, EINVAL)):
        dom.mem.write(ma, idx.to_bytes(4, "little") + b"\xee" * 4)
        assert hypercall.call(v, Hypercall.xen_version, XenVer.get_features, va) == rc, idx
        if rc:
            assert dom.mem.read(ma + 4, 4) == b"\xee" * 4      # nothing written on refusal
    assert hypercall.call(v, Hypercall.xen_version, XenVer.pagesize, 0) == 4096
    assert hypercall.call(v, Hypercall.xen_version, XenVer.pagesize, va) == EINVAL
    before = dom.vm_assist
    assert hypercall.call(v, Hypercall.vm_assist, 2, 0) == ENOSYS
    assert hypercall.call(v, Hypercall.vm_assist, 0xFFFFFFFF, 1) == ENOSYS
    assert dom.vm_assist == before
