"""The singleshot timer's vcpu_ops completed in C on the KVM engine (csrc/kvm.c fast_vcpu_op):
Linux re-arms its tick with VCPUOP_set_singleshot_timer (and stops it with
VCPUOP_stop_singleshot_timer) from every timer interrupt, so these calls are the tick's
commonest hypercalls. C records the change in the vCPU's PV state; the event-loop timer
stays the one that fires (timers.apply_engine_singleshot). For every input, the C path
(fast_hc on) and the Python handler (vcpu_op.do_vcpu_op, fast_hc off) must give the same
return value, the same armed deadline, the same "fired at once", and a timer that fires when
it is due; every input C may not judge (another vCPU, no vCPU, an unreadable or page-crossing
argument, a deadline already passed or >= 2^63, another command) must reach Python, which
answers as Xen's common_vcpu_op does."""
from __future__ import annotations

import asyncio
import struct

import pytest

from conftest import _kvm_skip_reason
from test_kvm import _hand_driven_vcpu, entry_page_hypercall, kvm_run_once

pytestmark = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=str(_kvm_skip_reason()))

M64 = (1 << 64) - 1
SET, STOP = 8, 9                                 # VCPUOP_set/stop_singleshot_timer
EINTR = -4                                       # kvm_run_once: the guest ran on (C completed it)
TO_PYTHON = 3                                    # the SYSCALL entry page's exit left to Python


class _Timer:
    """One hand-driven vCPU issuing vcpu_op through the SYSCALL entry page (as Linux), with
    the C path on or off; records every timer expiry (timers._fire) with its system time."""

    def __init__(self, hv, v, monkeypatch) -> None:
        from aiovmm import timers
        from aiovmm.kvm_engine import ring0
        self.hv, self.v, self.eng = hv, v, v.engine
        self.entry = ring0(hv.xen).syscall_va
        self.code_va = 0xFFFFFFFF80400000 - 4096          # unused padding pages of the boot map
        self.data_va = self.code_va - 4096
        v.copy_to_guest(self.code_va, b"\xeb\xfe")          # jmp .
        # Events masked while driven: a timer event (the kernel's own tick, or one fired
        # here) must not turn a completed call into an upcall (exit 4) or move RIP.
        from aiovmm.abi import VcpuInfo
        self.mask_at = v.info_maddr + VcpuInfo.evtchn_upcall_mask
        self.saved_mask = hv.mem.map[self.mask_at]
        hv.mem.map[self.mask_at] = 1
        # The kernel's periodic tick (the same _fire) is stopped meanwhile.
        self.period = v.periodic_ns
        timers.stop_periodic(v)
        self.fired: list[int] = []
        fire = timers._fire

        def watch(vcpu) -> None:
            if vcpu is v:
                self.fired.append(hv.system_time_ns())
            fire(vcpu)
        monkeypatch.setattr(timers, "_fire", watch)

    def restore(self) -> None:
        from aiovmm import timers
        timers.stop_singleshot(self.v)
        self.hv.mem.map[self.mask_at] = self.saved_mask
        if self.period:
            timers.set_periodic(self.v, self.period)

    def now(self) -> int:
        return self.hv.system_time_ns()

    def call(self, fast: bool, cmd: int, vcpuid: int, arg: int) -> tuple[int, int]:
        """(exit code, RAX the guest sees): a C-completed call is reported as a slice end
        reports it; one left to Python runs through the dispatcher."""
        return entry_page_hypercall(self.eng, self.entry, self.code_va, fast, 24, cmd, vcpuid, arg)

    def armed(self) -> float | None:
        """When the event-loop timer fires (system time, ns), or None."""
        h = self.v.singleshot_handle
        if h is None:
            return None
        loop = asyncio.get_running_loop()
        return self.now() + (h.when() - loop.time()) * 1e9

    def put(self, timeout: int, flags: int = 0, at: int | None = None) -> int:
        va = self.data_va + 0x100 if at is None else at
        self.v.copy_to_guest(va, struct.pack("<QI4x", timeout & M64, flags))
        return va


async def test_singleshot_set_and_stop_in_c_match_python(monkeypatch):
    """Deadlines in the future (with and without VCPU_SSHOTTMR_future, which Xen ignores;
    far ahead), stop, and a vcpuid whose upper register bits are set (Xen: unsigned int):
    C completes them, and its result equals the Python handler's: RAX 0, the same loop
    deadline (to the loop clock's resolution), nothing fired."""
    regs = ("rip", "rax", "rdi", "rsi", "rdx", "rcx", "r11", "rflags", "rsp")
    async with _hand_driven_vcpu(regs) as (hv, dom, v):
        t = _Timer(hv, v, monkeypatch)
        from aiovmm import timers
        try:
            fast0 = v.engine._ctx.fast_calls[3]
            # Deadlines seconds ahead: a loaded host may stall this process for tens of ms
            # between writing one and C reading the clock (then it is Python's, rightly).
            for delta, flags, vcpuid in ((5 * 10**9, 0, 0), (8 * 10**9, 1, 0),
                                         (1 << 62, 0, 0), (6 * 10**9, 0, 0xABCD << 32)):
                results = []
                for fast in (True, False):
                    timers.stop_singleshot(v)
                    deadline = t.now() + delta if delta < 1 << 60 else delta
                    arg = t.put(deadline, flags)
                    rc, rax = t.call(fast, SET, vcpuid, arg)
                    assert rc == (EINTR if fast else TO_PYTHON), (delta, fast, rc)
                    results.append((rax, t.armed() - deadline))
                (rax_c, off_c), (rax_py, off_py) = results
                assert rax_c == rax_py == 0
                # The loop timer is at the deadline on both paths (uvloop's clock is the
                # loop iteration's: both may be off by the time since it last ticked).
                assert abs(off_c) < 30e6 and abs(off_py) < 30e6, (delta, results)
                assert t.fired == []
            # Stop: the same on both paths (C recorded it, the report applied it).
            for fast in (True, False):
                t.call(fast, SET, 0, t.put(t.now() + 4 * 10**9))
                assert v.singleshot_handle is not None
                rc, rax = t.call(fast, STOP, 0, 0)
                assert (rc, rax, v.singleshot_handle) == ((EINTR if fast else TO_PYTHON), 0, None)
            # cmd is an int in Xen's do_vcpu_op: upper register bits are ignored.
            for fast in (True, False):
                timers.stop_singleshot(v)
                deadline = t.now() + 4 * 10**9
                rc, rax = t.call(fast, SET | 0x5A << 32, 0, t.put(deadline))
                assert (rc, rax) == ((EINTR if fast else TO_PYTHON), 0)
                assert abs(t.armed() - deadline) < 30e6
            assert v.engine._ctx.fast_calls[3] - fast0 == 4 + 2 + 1    # sets, set+stop, cmd
            assert v.pv.sshot_op == 0
            assert t.fired == []
        finally:
            t.restore()


async def test_singleshot_set_in_c_fires_when_due(monkeypatch):
    """A timer armed in C fires on the event loop at its deadline (not before, and not a
    loop timer's worth of slices late), as the one armed by Python does; and a timer moved
    or stopped in C never fires from its old deadline."""
    from aiovmm import timers
    regs = ("rip", "rax", "rdi", "rsi", "rdx", "rcx", "r11", "rflags", "rsp")
    async with _hand_driven_vcpu(regs) as (hv, dom, v):
        t = _Timer(hv, v, monkeypatch)
        try:
            late = {}
            for fast in (True, False):
                t.fired.clear()
                deadline = t.now() + 60_000_000
                t.call(fast, SET, 0, t.put(deadline))
                while t.now() < deadline + 2 * 10**9 and not t.fired:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)
                assert len(t.fired) == 1, (fast, t.fired)
                late[fast] = t.fired[0] - deadline
                assert late[fast] >= -1_000_000, (fast, late)          # loop clock: ms
            assert late[True] < 500e6 and late[False] < 500e6, late
            # Moved later in C: the Python-armed old deadline does not fire.
            t.fired.clear()
            t.call(False, SET, 0, t.put(t.now() + 40_000_000))
            later = t.now() + 1_000_000_000
            t.call(True, SET, 0, t.put(later))
            await asyncio.sleep(0.2)
            assert t.fired == []
            while t.now() < later + 600_000_000 and not t.fired:
                await asyncio.sleep(0.05)
            assert len(t.fired) == 1 and t.fired[0] >= later - 1_000_000
            # Set in C, then in Python before the slice ends (C's change not yet taken):
            # the later one, Python's, is the timer; C's is never applied.
            t.fired.clear()
            eng = v.engine
            eng.write({"rip": t.entry, "rax": 24, "rdi": SET, "rsi": 0,
                       "rdx": t.put(t.now() + 10**9), "rcx": t.code_va, "r11": 0x246})
            assert kvm_run_once(eng, True) == EINTR and v.pv.sshot_op == 1
            python_deadline = t.now() + 3 * 10**9
            t.call(False, SET, 0, t.put(python_deadline, at=t.data_va + 0x200))
            eng._report_fast_calls(False)
            assert abs(t.armed() - python_deadline) < 30e6
            await asyncio.sleep(0.2)
            assert t.fired == []
            timers.stop_singleshot(v)
            # Stopped in C: nothing fires.
            t.fired.clear()
            t.call(False, SET, 0, t.put(t.now() + 40_000_000))
            t.call(True, STOP, 0, 0)
            await asyncio.sleep(0.15)
            assert t.fired == []
        finally:
            t.restore()


async def test_singleshot_inputs_c_leaves_to_python(monkeypatch):
    """What C must not complete reaches the dispatcher, which answers as Xen: a deadline
    already passed or >= 2^63 (Xen's s_time_t expiry is negative) sends the timer event
    before the hypercall returns (RAX 0), with or without VCPU_SSHOTTMR_future; another
    vCPU's timer -EINVAL (common_vcpu_op: only current's), no such vCPU -ENOENT, an
    unreadable argument -EFAULT, a struct across a page end is read, other commands are
    the dispatcher's. Each case gives the same RAX with the C path on and off."""
    from aiovmm import timers
    from aiovmm.abi import Errno
    from aiovmm.vcpu_op import MAX_VCPUS
    regs = ("rip", "rax", "rdi", "rsi", "rdx", "rcx", "r11", "rflags", "rsp")
    async with _hand_driven_vcpu(regs) as (hv, dom, v):
        t = _Timer(hv, v, monkeypatch)
        eng = v.engine
        try:
            fast0 = eng._ctx.fast_calls[3]
            # Fired at once (no timer left armed).
            for timeout, flags in ((lambda: t.now() - 1_000_000, 0), (lambda: t.now() - 1, 1),
                                   (lambda: 1, 0), (lambda: 1 << 63, 0), (lambda: M64, 1)):
                for fast in (True, False):
                    timers.stop_singleshot(v)
                    t.call(False, SET, 0, t.put(t.now() + 5 * 10**9))     # one armed before
                    t.fired.clear()
                    rc, rax = t.call(fast, SET, 0, t.put(timeout(), flags))
                    assert (rc, rax) == (TO_PYTHON, 0), (hex(timeout()), fast)
                    assert len(t.fired) == 1 and v.singleshot_handle is None, (hex(timeout()), fast)
            # Refused as Xen refuses.
            cases = [
                (SET, 1, t.put(t.now() + 10**9), -Errno.ENOENT),         # the domain has one vCPU
                (STOP, 1, 0, -Errno.ENOENT),
                (SET, 0xFFFFFFFF, t.put(t.now() + 10**9), -Errno.ENOENT),
                (SET, 0, 0x1000, -Errno.EFAULT),                         # unmapped
                (SET, 0, 0xFFFF800000001000, -Errno.EFAULT),             # Xen's range
                (SET, 0, 1 << 63, -Errno.EFAULT),                        # non-canonical
                # Other commands, with an argument that reads as a future deadline.
                (99, 0, t.put(t.now() + 10**9), -Errno.ENOSYS),
                (3, 0, t.put(t.now() + 10**9), 1),                       # VCPUOP_is_up
            ]
            for cmd, vcpuid, arg, want in cases:
                for fast in (True, False):
                    timers.stop_singleshot(v)
                    rc, rax = t.call(fast, cmd, vcpuid, arg)
                    # A vCPU id no domain can have is answered by C's fast_query (the same
                    # -ENOENT, tests/test_kvm_queries.py), never by the singleshot path.
                    to = EINTR if fast and vcpuid >= MAX_VCPUS else TO_PYTHON
                    assert (rc, rax) == (to, want & M64), (cmd, vcpuid, hex(arg), fast, rc, rax)
            # Across a page end: Python reads both pages (C leaves it), same deadline.
            for fast in (True, False):
                timers.stop_singleshot(v)
                deadline = t.now() + 5 * 10**9
                # flags (ignored) are the page's `jmp .`, so the code stays as it was
                rc, rax = t.call(fast, SET, 0, t.put(deadline, flags=0xFEEB, at=t.code_va - 8))
                assert (rc, rax) == (TO_PYTHON, 0)
                assert abs(t.armed() - deadline) < 30e6
            assert eng._ctx.fast_calls[3] == fast0, "C completed a call that is Python's"
        finally:
            t.restore()


def test_a_republished_pvclock_is_the_same_clock():
    """vcpu_time_info is published again at VCPUOP_register_vcpu_info and at a vCPU's
    initialise (timers.write_pvclock). On the KVM engine the guest reads the host TSC, and
    its parameters pair a TSC read with a system-time read; a fresh pair each time was off
    the first by up to ~0.8 us (measured -98..+764 ns with the guest running), so each
    publication stepped the guest's clock (backwards too, which Linux does not guard against
    under PVCLOCK_TSC_STABLE_BIT). The fields must describe the clock first published."""
    from aiovmm import Hypervisor, timers
    from aiovmm.kvm_engine import KVMEngine
    from aiovmm.abi import VcpuInfo
    from conftest import guest

    async def main() -> None:
        async with Hypervisor(memory_mib=64, engine="kvm") as hv:
            dom = await hv.create(guest("hog"), memory_mib=8)
            await dom.wait_for_line("hog: ready", 30)
            v = dom.vcpus[0]
            assert isinstance(v.engine, KVMEngine)
            at = v.info_maddr + VcpuInfo.time

            def clock(tsc: int) -> int:
                _ver, stamp, sys_ns, mul, shift = struct.unpack_from("<I4xQQIb", hv.mem.map, at)
                d = tsc - stamp
                d = d << shift if shift >= 0 else d >> -shift
                return sys_ns + ((d * mul) >> 32)
            tscs = [1 << 40, 1 << 44, 1 << 48]
            first = [clock(t) for t in tscs]
            fields = bytes(hv.mem.map[at + 8:at + 30])          # tsc_timestamp .. tsc_shift
            for _ in range(20):
                timers.write_pvclock(v)
                assert bytes(hv.mem.map[at + 8:at + 30]) == fields
                assert [clock(t) for t in tscs] == first
            dom.shutdown()
    asyncio.run(main())
