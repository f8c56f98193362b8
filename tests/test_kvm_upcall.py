"""The event upcall after a hypercall completed in C on the KVM engine (csrc/kvm.c fast_upcall):
Xen's test_all_events bounces it before the guest runs on. Linux makes a hypercall with an
event pending all the time (the iret that unmasks events at the end of a system call or an
interrupt; xen_version from xen_force_evtchn_callback when it re-enables events), so C bounces
it too instead of returning to Python for it (rc 4). For each case the C path and Python's
(hypercall.dispatch, its tail traps.deliver_event) must leave the same vCPU: registers, mode,
the bounce frame's bytes, the upcall mask, last_frame_rsp. Every case C may not judge must
reach Python untouched (rc 4, nothing written): no event callback, a kernel root C may not
load, a virtual IOPL to put in the frame, a stack in Xen's range, a frame that wraps, crosses
a page or lies in a read-only page."""
from __future__ import annotations

import pytest

from conftest import _kvm_skip_reason
from hand_vcpu import read_only_boot_page
from test_kvm import _hand_driven_vcpu
from test_kvm_iret_gdt import USER_CODE_VA, USER_STACK_TOP, _desc
from test_redteam_kvm_fast import _Driver

pytestmark = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=str(_kvm_skip_reason()))

RF_IF = 0x200
UPCALL = 4                                      # aiovmm_kvm_run_ex: Python runs the tail
LOOK = ("rip", "rsp", "rax", "rcx", "r11", "rflags", "cs", "cr3", "gs_base")


class _Upcall:
    def __init__(self, hv, dom, v) -> None:
        from aiovmm import timers
        from aiovmm.abi import CallbackType
        self.hv, self.dom, self.v = hv, dom, v
        self.d = d = _Driver(hv, v)
        self.eng, self.mem = d.eng, hv.mem
        self.cb_va = d.code_va + 0x100
        v.copy_to_guest(self.cb_va, b"\xeb\xfe")           # the event callback: jmp .
        self.saved_cb = v.callbacks.get(CallbackType.event)
        v.set_callback(CallbackType.event, (self.cb_va, 0))
        self.period = v.periodic_ns
        timers.stop_periodic(v)
        timers.stop_singleshot(v)
        self.saved_info = bytes(self.mem.map[d.pending:d.pending + 2])
        self.saved_sp = (v.kernel_ss, v.kernel_sp)
        self.code_ma = hv.pagetables.translate(v.user_root << 12, USER_CODE_VA, False)
        self.saved_code = bytes(self.mem.map[self.code_ma:self.code_ma + 2])
        self.mem.map[self.code_ma:self.code_ma + 2] = b"\xeb\xfe"

    def restore(self) -> None:
        from aiovmm import timers
        from aiovmm.abi import CallbackType
        v = self.v
        self.back()
        v.set_callback(CallbackType.event, self.saved_cb)
        self.mem.map[self.d.pending:self.d.pending + 2] = self.saved_info
        v.kernel_ss, v.kernel_sp = self.saved_sp
        self.mem.map[self.code_ma:self.code_ma + 2] = self.saved_code
        if self.period:
            timers.set_periodic(v, self.period)

    def back(self) -> None:
        self.v.switch_to_kernel()
        self.eng.write({"cs": 0xE033})

    def event(self, pending: int = 1, mask: int = 0) -> None:
        self.mem.map[self.d.pending] = pending
        self.mem.map[self.d.mask] = mask

    def state(self, rc: int) -> tuple:
        eng, v = self.eng, self.v
        rsp = eng.get("rsp")
        frame = bytes(v.copy_from_guest(rsp, 56)) if eng.get("rip") == self.cb_va else b""
        return rc, eng.read(LOOK), v.kernel_mode, self.mem.map[self.d.mask], v.last_frame_rsp, frame

    def call(self, fast: bool, nr: int, **regs: int) -> int:
        """The hypercall with an event pending; on Python's path its dispatcher runs it and
        the guest then runs on (to the callback's jmp . when it bounced)."""
        self.event()
        rc = self.d.hypercall(nr, fast, **regs)
        if fast:
            return rc
        assert rc == 3
        self.eng.on_hypercall()
        return self.d.run()

    def compare(self, nr: int, *, user: bool = False, **regs: int) -> tuple:
        done = self.eng._ctx.fast_upcalls
        by_c = self.state(self.call(True, nr, **regs))
        assert self.eng._ctx.fast_upcalls == done + 1, (nr, regs, by_c)
        assert by_c[1][0] == self.cb_va and by_c[3] == 1 and by_c[2], by_c
        self.back()
        by_py = self.state(self.call(False, nr, **regs))
        self.back()
        assert by_c == by_py, (nr, regs, by_c, by_py)
        return by_c

    def declined(self, nr: int, **regs: int) -> None:
        """C leaves the upcall to Python: rc 4, RIP/RSP as the hypercall left them, the
        event still pending and unmasked, the counter unchanged."""
        done = self.eng._ctx.fast_upcalls
        rc = self.call(True, nr, **regs)
        assert rc == UPCALL, (nr, regs, rc)
        assert self.eng._ctx.fast_upcalls == done
        assert self.eng.get("rip") == self.d.code_va and self.eng.get("rsp") == regs.get("rsp", self.eng.get("rsp"))
        assert (self.mem.map[self.d.pending], self.mem.map[self.d.mask]) == (1, 0)
        self.eng._report_fast_calls(False)
        self.back()


async def test_upcall_after_a_c_hypercall_in_kernel_mode_same_as_python():
    """stack_switch (completed in C, no other effect) with an event pending: the upcall's frame
    on the current kernel stack, CS 0xe030, RFLAGS with IF as the vCPU had it; also a frame in
    the first and the last 56 bytes of a page."""
    regs = LOOK + ("rdi", "rsi")
    async with _hand_driven_vcpu(regs) as (hv, dom, v):
        u = _Upcall(hv, dom, v)
        data = u.d.data_va
        try:
            for rsp in (data + 0x808, data + 0x800, data + 0x40, data + 0x4F, data + 0x1000, data + 0x100F):
                u.compare(3, rdi=0xE02B, rsi=data + 0xF00, rsp=rsp)
            # RFLAGS the handler gets: AC and RF cleared, DF kept (an event is no syscall).
            by_c = u.compare(3, rdi=0xE02B, rsi=data + 0xF00, rsp=data + 0x800, r11=0x246 | 0x40000 | 0x10000 | 0x400)
            assert by_c[1][5] & 0x50400 == 0x400, hex(by_c[1][5])
        finally:
            u.restore()


async def test_upcall_after_a_c_query_same_as_python():
    """Linux's xen_force_evtchn_callback: xen_version(0, NULL) with an event pending, answered
    in C (fast_query), then the upcall bounced in C too, so neither reaches Python; the frame
    saves RAX = the version, as Python's dispatch then deliver_event leaves it. A vcpu_op for
    a vCPU id no domain has (also fast_query's) the same."""
    from aiovmm import vcpu_op
    regs = LOOK + ("rdi", "rsi")
    async with _hand_driven_vcpu(regs) as (hv, dom, v):
        u = _Upcall(hv, dom, v)
        data = u.d.data_va
        try:
            queries = u.eng._ctx.fast_queries
            done = (queries[0], queries[1])
            by_c = u.compare(17, rdi=0, rsi=0, rsp=data + 0x800)
            assert by_c[1][2] == v.pv.xenver_version, by_c                 # RAX
            u.compare(24, rdi=2, rsi=vcpu_op.MAX_VCPUS, rsp=data + 0x800)
            assert (queries[0], queries[1]) == (done[0] + 1, done[1] + 1)
        finally:
            u.restore()


async def test_upcall_after_a_c_iret_to_user_mode_same_as_python():
    """An iret to user mode that unmasks events with one pending (Linux's return from a
    system call): C completes the iret, then bounces the upcall from user mode, to kernel
    mode on the registered kernel stack, the frame's CS the user selector (Linux's 0x33 in its
    own GDT, or the flat one), the kernel back in 64-bit CS."""
    from aiovmm import traps
    from aiovmm.abi import IRET_CONTEXT
    regs = LOOK + ("rdi", "rsi")
    async with _hand_driven_vcpu(regs) as (hv, dom, v):
        u = _Upcall(hv, dom, v)
        data = u.d.data_va
        gdt = hv.mem.alloc(dom.domid)[0]
        hv.mem.write_u64((gdt << 12) + 0x30, _desc())
        v.gdt_frames = (gdt,)
        at = data + 0x800
        try:
            v.kernel_sp = data + 0xE08
            for cs in (0xE033, 0x33):
                v.copy_to_guest(at, IRET_CONTEXT.pack(7, 8, 9, 0, USER_CODE_VA, cs, RF_IF | 2,
                                                      USER_STACK_TOP - 64, 0xE02B))
                # The user root becomes one C may load once the engine ran on it.
                u.event(0)
                assert u.d.hypercall(23, False, rsp=at) == 3
                traps.do_iret(v)
                u.d.run()
                u.back()
                by_c = u.compare(23, rsp=at)
                assert by_c[5][24:32] == cs.to_bytes(8, "little"), by_c      # the frame's CS
                assert by_c[1][6] == 0xE033
        finally:
            v.gdt_frames = ()
            u.restore()
            hv.mem.free([gdt])


async def test_upcalls_c_leaves_to_python(monkeypatch):
    """Each condition fast_upcall checks, alone: C returns 4 with nothing written."""
    from aiovmm.abi import CallbackType, IRET_CONTEXT
    from aiovmm.emulate import VMASST_TYPE_architectural_iopl
    regs = LOOK + ("rdi", "rsi")
    async with _hand_driven_vcpu(regs) as (hv, dom, v):
        u = _Upcall(hv, dom, v)
        data = u.d.data_va
        ss = dict(rdi=0xE02B, rsi=data + 0xF00)
        try:
            # Stacks: in Xen's range (both ends of Python's window), wrapping below 0, across
            # a page start, read-only (a page table of the boot map).
            ro = read_only_boot_page(hv, v.kernel_root << 12)
            for rsp in (0xFFFF800000000010, 0xFFFF88000000003F, 0x30, data + 55, ro + 0x800):
                u.declined(3, rsp=rsp, **ss)
            u.compare(3, rsp=data + 0x800, **ss)
            # No event callback.
            v.set_callback(CallbackType.event, None)
            u.declined(3, rsp=data + 0x800, **ss)
            v.set_callback(CallbackType.event, (u.cb_va, 0))
            # A virtual IOPL that VMASST architectural_iopl puts in the frame.
            saved_assist = dom.vm_assist
            try:
                dom.vm_assist |= 1 << VMASST_TYPE_architectural_iopl
                v.iopl = 1
                u.declined(3, rsp=data + 0x800, **ss)
                v.iopl = 0
                u.compare(3, rsp=data + 0x800, **ss)           # IOPL 0: nothing to add
            finally:
                dom.vm_assist = saved_assist
                v.iopl = 0
            # From user mode with a kernel root C may not load (the iret to user still in C).
            eng = u.eng
            at = data + 0x800
            v.kernel_sp = data + 0xE08
            v.copy_to_guest(at, IRET_CONTEXT.pack(7, 8, 9, 0, USER_CODE_VA, 0xE033, RF_IF | 2,
                                                  USER_STACK_TOP - 64, 0xE02B))
            u.compare(23, rsp=at)
            real = eng._ready_roots

            def no_kernel_root() -> None:
                real()
                eng._ctx.ready_kroot = 0
            monkeypatch.setattr(eng, "_ready_roots", no_kernel_root)
            eng._check_pending = True
            done = eng._ctx.fast_upcalls
            assert u.call(True, 23, rsp=at) == UPCALL
            assert eng._ctx.fast_upcalls == done and not v.kernel_mode
            assert eng.get("rip") == USER_CODE_VA
            eng._report_fast_calls(False)
        finally:
            u.restore()
