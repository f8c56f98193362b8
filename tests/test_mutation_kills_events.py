"""Event-channel checks that bench/mutants.py exercised (issue 9, mutation testing), on
parked domains (lab.park: built as Hypervisor.create builds them, never run)."""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor, lab
from aiovmm.abi import EVTCHN_2L_NR_CHANNELS, Errno, EvtchnStat, SharedInfo, VcpuInfo
from aiovmm.events import EventError
from conftest import kernel


def run(coro):
    return asyncio.run(coro)


def _errno(fn, *args) -> int:
    with pytest.raises(EventError) as e:
        fn(*args)
    return e.value.errno


def test_bind_interdomain_to_a_bad_remote_port_is_einval():
    """EVTCHNOP_bind_interdomain naming a remote port that is out of range (negative, at or
    past the 2-level limit), port 0 (reserved, reads closed), or a port the remote did not
    offer to the caller: -EINVAL, nothing bound on either side; the offered port binds."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            b = lab.park(hv, kernel(), 8, "b")
            offered = b.dom.evtchn.alloc_unbound(a.domid)
            other = b.dom.evtchn.alloc_unbound(b.domid)          # offered to b itself
            before_a = dict(a.dom.evtchn.ports)
            for rp in (0, -1, EVTCHN_2L_NR_CHANNELS, EVTCHN_2L_NR_CHANNELS + offered,
                       2 * EVTCHN_2L_NR_CHANNELS - 1, 1 << 40, other):
                assert _errno(a.dom.evtchn.bind_interdomain, b.domid, rp) == Errno.EINVAL, rp
                assert a.dom.evtchn.ports == before_a
                assert b.dom.evtchn.ports[offered].state == EvtchnStat.unbound
            port = a.dom.evtchn.bind_interdomain(b.domid, offered)
            assert a.dom.evtchn.ports[port].remote_port == offered
            assert b.dom.evtchn.ports[offered].state == EvtchnStat.interdomain
    run(main())


def test_close_of_port_zero_is_einval():
    """EVTCHNOP_close of port 0 (reserved, never allocated): -EINVAL, as for any closed
    port; the domain's ports are untouched."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            p = a.dom.evtchn.bind_ipi(0)
            before = dict(a.dom.evtchn.ports)
            assert _errno(a.dom.evtchn.close, 0) == Errno.EINVAL
            assert a.dom.evtchn.ports == before
            a.dom.evtchn.close(p)
            assert _errno(a.dom.evtchn.close, p) == Errno.EINVAL
    run(main())


def test_unmask_of_port_zero_is_as_on_xen():
    """Port 0 is a valid port for EVTCHNOP_unmask (Xen's evtchn_unmask: port_is_valid, then
    the 2-level unmask): its mask bit is cleared, and a pending bit 0 the guest set itself
    raises the selector and the upcall, exactly as for any other port."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            si = a.dom.shared_info_maddr
            m = hv.mem.map
            m[si + SharedInfo.evtchn_mask] |= 1
            m[si + SharedInfo.evtchn_pending] |= 1
            a.dom.evtchn.unmask(0)
            assert not m[si + SharedInfo.evtchn_mask] & 1
            assert hv.mem.read_u64(si + VcpuInfo.evtchn_pending_sel) & 1
            assert m[si + VcpuInfo.evtchn_upcall_pending] == 1
    run(main())
