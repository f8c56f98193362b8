"""The vCPU's callback table (HYPERVISOR_set_callbacks, CALLBACKOP_register/unregister,
VCPUOP_initialise, restore) changes in one place, VCPU.set_callback, which keeps the syscall
callback mirrored into the PVState the KVM engine's C loop bounces a user process's syscall
to. Driven through the real handlers (aiovmm.lab); the table itself is read-only, so no path
can change it behind the mirror's back."""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor, lab, traps
from aiovmm.abi import CALLBACK_REGISTER, CALLBACKF_mask_events, CallbackOp, CallbackType, Errno
from conftest import kernel


def test_syscall_callback_mirror_follows_every_change():
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            p = lab.park(hv, kernel(), 8, "cb")
            v = p.v
            mirror = lambda: (v.pv.syscall_cb, v.pv.syscall_cb_flags)

            def register(ctype: int, address: int, flags: int = 0) -> int:
                va = p._args(CALLBACK_REGISTER.pack(ctype, flags, address), 64)
                return lab._call(traps.do_callback_op, v, CallbackOp.register, va)

            ev, fs, sc = 0xFFFFFFFF80001000, 0xFFFFFFFF80002000, 0xFFFFFFFF80003000
            assert lab._call(traps.do_set_callbacks, v, ev, fs, sc) == 0
            assert v.callbacks[CallbackType.syscall] == (sc, 0) and mirror() == (sc, 0)
            assert v.callbacks[CallbackType.event] == (ev, CALLBACKF_mask_events)
            assert register(CallbackType.syscall, sc + 16, 1) == 0
            assert mirror() == (sc + 16, 1)
            assert register(CallbackType.syscall, 1 << 47) == -int(Errno.EINVAL)
            assert mirror() == (sc + 16, 1)
            assert register(CallbackType.nmi, ev + 32) == 0
            va = p._args(int(CallbackType.nmi).to_bytes(2, "little"), 64)
            assert lab._call(traps.do_callback_op, v, CallbackOp.unregister, va) == 0
            assert CallbackType.nmi not in v.callbacks and mirror() == (sc + 16, 1)
            with pytest.raises(TypeError):
                v.callbacks[CallbackType.syscall] = (0x1234, 0)     # only set_callback
            assert mirror() == (sc + 16, 1)
            v.callbacks = {CallbackType.event: (ev, 0)}              # replaced whole
            assert dict(v.callbacks) == {CallbackType.event: (ev, 0)} and mirror() == (0, 0)
            v.set_callback(CallbackType.syscall, (sc, 1))
            assert mirror() == (sc, 1)
            v.set_callback(CallbackType.syscall, None)
            assert CallbackType.syscall not in v.callbacks and mirror() == (0, 0)
    asyncio.run(main())
