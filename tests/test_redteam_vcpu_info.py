"""Red-team: a relocated vcpu_info (VCPUOP_register_vcpu_info) in a frame the guest gave back.

The frame stays the domain's while the registration holds its writable reference
(Xen's guest_remove_page: freed on the last reference). The reference goes when the vCPU
stops (vcpu_op.release, from the run loop of a dying domain); the frame is then freed.
Events still reach the dying domain until its teardown closes its ports (a peer guest's
send, its own backends' notifications): Xen first points the vCPU back at its
shared_info slot (unmap_guest_area -> vcpu_info_reset) and only then drops the page,
so no event bit is ever written into a frame that has gone to someone else. Driven
through the real handlers on parked domains (aiovmm.lab); the next owner's frame must
stay as it was given, and the auditor clean.
"""
from __future__ import annotations

from aiovmm import lab, reservation, vcpu_op
from aiovmm.abi import DOMID_INVALID, SharedInfo, VcpuInfo, VcpuOp
from test_balloon_security import clean, reserve, run
from conftest import kernel


def test_event_after_release_lands_in_shared_info_not_the_next_owner():
    def body(hv) -> None:
        a = lab.park(hv, kernel(), 8, "dying")
        mem = hv.mem
        x = a.spare[0]
        arg = a._args(vcpu_op.REGISTER_VCPU_INFO.pack(x, 64, 0), 64)
        assert lab._call(vcpu_op.do_vcpu_op, a.v, VcpuOp.register_vcpu_info, 0, arg) == 0
        port = a.dom.evtchn.bind_ipi(0)
        si = a.dom.shared_info_maddr
        mem.map[si + SharedInfo.evtchn_mask + port // 8] &= ~(1 << (port % 8)) & 0xFF   # the guest unmasks it
        assert reserve(a, reservation.XENMEM_decrease_reservation, [x])[0] == 1
        assert mem.owner[x] == a.domid                # held by the registration
        vcpu_op.release(a.v)                          # the vCPU stops: the frame is freed
        assert mem.owner[x] == DOMID_INVALID
        c = lab.park(hv, kernel(), 8, "next-owner")
        assert x in c.dom.frames
        before = bytes(mem.frame(x))
        a.dom.evtchn.set_pending(port)                # an event before the teardown
        assert bytes(mem.frame(x)) == before, "an event bit landed in another domain's frame"
        assert mem.map[si + VcpuInfo.evtchn_upcall_pending] == 1    # in shared_info's vcpu_info[0]
        clean(hv)
        lab.destroy(a)
        lab.destroy(c)
        clean(hv)
    run(body)
