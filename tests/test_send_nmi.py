"""VCPUOP_send_nmi as Xen answers a PV guest (arch/x86/domain.c do_vcpu_op): -ENOENT for no such
vCPU, -EINVAL for a non-NULL argument, else 0 with the target's NMI pending, which Xen drops at
the target's next return to the guest when it has no NMI handler (trap_ctxt[2] null:
x86_64/entry.S process_nmi). aiovmm delivers no NMIs: it gives Xen's 0 exactly where Xen drops
the NMI (an online target without a handler), and -ENOSYS where Xen would deliver one (a
handler registered by CALLBACKOP_register or set_trap_table) or might (a down vCPU, which may
come up with a handler in its initial context). Driven through the dispatcher's one
error-mapping place (hypercall.call) on a parked domain (aiovmm.lab)."""
from __future__ import annotations

import asyncio

from aiovmm import Hypervisor, hypercall, lab, traps, vcpu_op
from aiovmm.abi import CALLBACK_REGISTER, CallbackOp, CallbackType, Errno, Hypercall, VcpuOp
from conftest import kernel

M64 = (1 << 64) - 1
HANDLER = 0xFFFFFFFF80001000


def test_send_nmi_answers_as_xen():
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            p = lab.park(hv, kernel(), 8, "nmi")
            v = p.v

            def send(vcpuid: int, arg: int = 0) -> int:
                return hypercall.call(v, Hypercall.vcpu_op, VcpuOp.send_nmi, vcpuid, arg)

            # No handler: Xen's NMI is dropped at the next return to the guest; 0.
            assert send(0) == 0
            assert send(0 | 0x7 << 32) == 0                       # unsigned int vcpuid
            # A non-NULL argument, and no such vCPU, as Xen refuses them.
            assert send(0, 0x1000) == -Errno.EINVAL
            assert send(0, 1) == -Errno.EINVAL
            assert send(1) == -Errno.ENOENT
            assert send(vcpu_op.MAX_VCPUS) == -Errno.ENOENT
            # An NMI callback: Xen would deliver the NMI; aiovmm cannot (-ENOSYS), but still
            # refuses the argument first.
            va = p._args(CALLBACK_REGISTER.pack(CallbackType.nmi, 0, HANDLER), 64)
            assert lab._call(traps.do_callback_op, v, CallbackOp.register, va) == 0
            assert send(0) == -Errno.ENOSYS
            assert send(0, 0x1000) == -Errno.EINVAL
            va = p._args(int(CallbackType.nmi).to_bytes(2, "little"), 64)
            assert lab._call(traps.do_callback_op, v, CallbackOp.unregister, va) == 0
            assert send(0) == 0
            # Vector 2 of the trap table is the same handler in Xen (trap_ctxt[2]).
            table = list(v.trap_table)
            table[2] = (0, 0xE033, HANDLER)
            v.trap_table = table
            assert send(0) == -Errno.ENOSYS
            table[2] = (0, 0, 0)
            v.trap_table = table
            assert send(0) == 0
            # A down vCPU without a handler: it may come up with one (-ENOSYS); the argument
            # is refused first.
            vcpu_op.create_secondary(p.dom, 1)
            assert send(1) == -Errno.ENOSYS
            assert send(1, 8) == -Errno.EINVAL
            # Nothing was delivered or left behind: the vCPU's registers are untouched.
            assert v.pending_trap is None
    asyncio.run(main())
