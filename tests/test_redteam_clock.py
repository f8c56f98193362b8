"""Red-team: the pvclock's version counters are in memory the guest writes.

vcpu_time_info.version (in shared_info's vcpu_info or a registered one) and
shared_info.wc_version follow Xen's odd/even protocol: version_update_begin sets
`(version + 1) | 1`, version_update_end adds 1, both on a uint32_t, starting from whatever
the guest left there. A guest that leaves 0xffffffff gets the counter wrapped (1 while
writing, 2 after), never a hypervisor error that crashes it, on either engine; the same
for wc_version, which a restore writes again from the saved shared_info."""
from __future__ import annotations

import struct

import pytest

from aiovmm import lab, timers
from aiovmm.abi import SharedInfo, VcpuInfo
from conftest import boot_async, kernel, results
from test_balloon_security import run

ALL_ENGINES = True
GUEST = "guests/build/hostile/pvclock_version.elf"


@pytest.mark.asyncio
async def test_register_vcpu_info_with_version_at_u32_max(engine):
    b = await boot_async(GUEST, engine=engine)
    res = results(b.lines)
    assert not b.crash_reason, b.end
    assert res.get("pvclock_register") == "0", b.lines
    assert res.get("pvclock_version") == "2", b.lines      # wrapped: even, update done
    assert res.get("pvclock_mul") not in (None, "0"), b.lines
    assert res.get("alive") == "1", b.lines


def test_wallclock_and_pvclock_versions_wrap():
    """What a restore does with the saved shared_info (restore._finish: write_pvclock of
    vCPU 0, write_wallclock), on a domain whose counters are at 0xffffffff."""
    def body(hv) -> None:
        a = lab.park(hv, kernel(), 8, "wrap")
        m, si = hv.mem.map, a.dom.shared_info_maddr
        struct.pack_into("<I", m, si + SharedInfo.wc_version, 0xFFFFFFFF)
        struct.pack_into("<I", m, a.v.info_maddr + VcpuInfo.time, 0xFFFFFFFF)
        timers.write_wallclock(a.dom)
        timers.write_pvclock(a.v)
        assert struct.unpack_from("<I", m, si + SharedInfo.wc_version)[0] == 2
        assert struct.unpack_from("<I", m, a.v.info_maddr + VcpuInfo.time)[0] == 2
        lab.destroy(a)
    run(body)
