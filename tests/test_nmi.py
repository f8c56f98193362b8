"""NMIs of a PV guest as Xen delivers them (issue 10): VCPUOP_send_nmi (arch/x86/domain.c
do_vcpu_op: -EINVAL for an argument, -ENOENT for no such vCPU, else the target's nmi_pending
and a kick), the handler in trap_ctxt[2] (CALLBACKTYPE_nmi, nmi_op, set_trap_table's vector 2,
a VCPUOP_initialise context's; pv/callback.c), delivery at the next return to the guest with
NMIs masked until the handler's HYPERVISOR_iret (x86_64/entry.S process_nmi, pv/iret.c
async_exception_cleanup). guests/tests/nmi.c, on both engines: vCPU 0 sends to itself and to
vCPU 1, which waits in SCHEDOP_poll and holds its handler while vCPU 0 sends two more."""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor, ShutdownReason
from conftest import HV_MEMORY_MIB, guest, results

ALL_ENGINES = True

EXPECTED: dict[str, str] = {
    "arg_self": "-22", "arg_other": "-22", "nr": "-2",
    # No handler: dropped at the return, not kept for a handler registered later.
    "self_none": "0", "cb_register": "0", "none_count": "0",
    # To itself: delivered at the hypercall's return, events masked (a registered callback
    # has TI_SET_IF), restored by the handler's iret.
    "self": "0", "self_count": "1", "self_events_masked": "1", "self_mask_restored": "0",
    # Sent twice inside one multicall: one NMI, at the multicall's return.
    "mc": "0", "mc_results": "1", "mc_count": "2",
    "cb_unregister": "0", "unregistered_count": "2",
    "nmi_op_register": "0", "nmi_op_count": "3", "nmi_op_unregister": "0",
    "nmi_op_unregistered_count": "3", "nmi_op_bad_cmd": "-38", "nmi_op_efault": "-14",
    # Vector 2 of the trap table without TI flag 4: events stay unmasked.
    "trap_table": "0", "tt_count": "4", "tt_events_masked": "0",
    "tt_unregister": "0", "tt_unregistered_count": "4",
    "unregister_event": "-22", "unregister_unknown": "-38", "self_nested": "0",
    # vCPU 1: its context's trap_ctxt[2]; the NMI ends its poll (vcpu_kick), reaches the
    # handler once; two more sent while it runs there wait, as one, for its iret.
    "init_1": "0", "up_1": "0", "ap_blocked": "1", "ap_before": "0", "send_ap": "0",
    "send_ap_masked": "0", "send_ap_masked_again": "0", "ap_ran_masked": "1",
    "ap_masked_count": "1", "ap_count_at_release": "1", "ap_count": "2", "ap_nested": "0",
    "ap_events_masked": "1", "ap_poll_rc": "0", "self_count_after": "4",
    "send_down": "0",
}


@pytest.fixture(scope="module")
def run(engine):
    async def main():
        async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
            dom = await hv.create(guest("nmi"), memory_mib=8, cmdline="vcpus=2", vcpus=2)
            async with asyncio.timeout(180):
                reason = await dom.wait()
            return list(dom.console_lines), reason
    return asyncio.run(main())


def test_nmi_delivery_as_xen(run):
    lines, reason = run
    assert reason == ShutdownReason.poweroff, lines[-20:]
    assert "nmi: done" in lines
    got = results(lines)
    assert {k: got.get(k) for k in EXPECTED} == EXPECTED
