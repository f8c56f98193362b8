"""EVTCHNOP_send completed in C on the KVM engine (csrc/kvm.c fast_send): a send on a port
the domain bound interdomain to the host (a backend of this process) only wakes the
backend's waiter, so C answers 0 and records the port (PVState.sent); Python applies it with
its own handler when it takes the completed calls (events.apply_engine_sends), and before
the port changes (sync_engine_sends). Per case the C path and Python's (fast_hc off) give the
same RAX and the same wake-up of the host endpoint; every input C may not judge (another
command, a port not in the mirror: unbound, IPI, closed, out of range; an argument across a
page or unmapped) reaches Python."""
from __future__ import annotations

import pytest

from conftest import _kvm_skip_reason
from test_kvm import _hand_driven_vcpu, kvm_run_once
from test_kvm_queries import EINTR, REGS, TO_PYTHON, _Caller

pytestmark = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=str(_kvm_skip_reason()))

EVTCHN_OP, SEND = 32, 4
EINVAL = -22


async def test_send_to_a_host_backend_in_c_matches_python():
    from aiovmm.events import ENGINE_SEND_PORTS
    async with _hand_driven_vcpu(REGS) as (hv, dom, v):
        c = _Caller(hv, v)
        ctx, ch = v.engine._ctx, dom.evtchn
        arg = c.code_va - 4096 + 0x100                  # the padding page below the code
        ep = hv.host.endpoint_alloc_unbound(dom.domid)
        gp = ch.bind_interdomain(0, ep.port)
        unbound, ipi = ch.alloc_unbound(0), ch.bind_ipi(0)
        try:
            assert gp in list(v.pv.send_ports)
            assert unbound not in list(v.pv.send_ports) and ipi not in list(v.pv.send_ports)
            v.copy_to_guest(arg, gp.to_bytes(4, "little"))
            for fast in (True, False):
                ep._event.clear()
                n0, s0 = ep.notifications, ctx.fast_sends[0]
                hc0 = dom.hypercall_counts.get(EVTCHN_OP, 0)
                rc, rax = c.call(fast, EVTCHN_OP, SEND, arg)
                assert (rc, rax) == ((EINTR, 0) if fast else (TO_PYTHON, 0)), (fast, rc, rax)
                assert ctx.fast_sends[0] - s0 == (1 if fast else 0)
                assert ep.notifications == n0 + 1 and ep.pending()       # applied at the report
                assert dom.hypercall_counts[EVTCHN_OP] == hc0 + 1 and v.pv.sent == 0
            # Recorded in C, then the guest closes its port before the slice ends: the send is
            # applied first, on the port as it was (Xen's order), never lost.
            n0 = ep.notifications
            v.engine.write({"rip": c.entry, "rax": EVTCHN_OP, "rdi": SEND, "rsi": arg,
                            "rcx": c.code_va, "r11": 0x246})

            assert kvm_run_once(v.engine, True) == EINTR and v.pv.sent
            ch.close(gp)
            assert ep.notifications == n0 + 1 and v.pv.sent == 0
            assert gp not in list(v.pv.send_ports)
            v.engine._report_fast_calls(False)
            gp = ch.bind_interdomain(0, ep.port)
            # What C must leave to Python: each gives Python's RAX, nothing recorded.
            s0 = ctx.fast_sends[0]
            for port, cmd, where in ((unbound, SEND, arg), (ipi, SEND, arg), (4095, SEND, arg),
                                     (4096, SEND, arg), (0, SEND, arg), (gp, SEND | 1 << 32, arg),
                                     (gp, 5, arg), (gp, SEND, c.code_va - 3), (gp, SEND, 0)):
                v.copy_to_guest(arg, port.to_bytes(4, "little"))
                if where == c.code_va - 3:
                    # Three bytes of the port in the page; the machine byte after them made
                    # the fourth (0), so a read across the page that took machine memory
                    # instead of the guest's next page would find the bound port.
                    v.copy_to_guest(where, gp.to_bytes(3, "little"))
                    after = hv.pagetables.translate(v.kernel_root << 12, where, False) + 3
                    saved, hv.mem.map[after] = hv.mem.map[after], 0
                rc, rax_c, rax_py = c.both(EVTCHN_OP, cmd, where)
                if where == c.code_va - 3:
                    hv.mem.map[after] = saved
                assert rc == TO_PYTHON and rax_c == rax_py, (port, cmd, hex(where), rc, rax_c, rax_py)
                assert v.pv.sent == 0
            assert ctx.fast_sends[0] == s0
            # More host ports than slots: only the lowest ENGINE_SEND_PORTS are C's.
            extra = [ch.bind_interdomain(0, hv.host.endpoint_alloc_unbound(dom.domid).port)
                     for _ in range(ENGINE_SEND_PORTS)]
            from aiovmm.abi import EvtchnStat
            host = sorted(p for p, pt in ch.ports.items()
                          if pt.state == EvtchnStat.interdomain and pt.remote_dom == 0)
            assert len(host) > ENGINE_SEND_PORTS and host[-1] in extra   # (console, xenstore too)
            assert list(v.pv.send_ports) == host[:ENGINE_SEND_PORTS]
            for p in extra:
                ch.close(p)
        finally:
            c.restore()
