"""Queries answered in C on the KVM engine (csrc/kvm.c fast_query): xen_version(XENVER_version)
and any vcpu_op naming a vCPU id no domain can have (>= vcpu_op.MAX_VCPUS: Xen's do_vcpu_op
answers -ENOENT before it looks at the command; Linux asks VCPUOP_is_up of all 8,192 possible
CPU ids while it boots). For every input, the C path (fast_hc on) and the Python handler
(fast_hc off) must give the same RAX; every input C may not judge (another XENVER command, a
vCPU id below MAX_VCPUS, whose vCPU may exist) must reach Python. Xen takes `int cmd` and
`unsigned int vcpuid`: bits above 31 of their registers are ignored on both paths."""
from __future__ import annotations

import pytest

from conftest import _kvm_skip_reason
from test_kvm import _hand_driven_vcpu, entry_page_hypercall

pytestmark = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=str(_kvm_skip_reason()))

M64 = (1 << 64) - 1
XEN_VERSION, VCPU_OP = 17, 24
EINTR = -4                                       # kvm_run_once: the guest ran on (C completed it)
TO_PYTHON = 3                                    # the SYSCALL entry page's exit left to Python
ENOENT = -2
REGS = ("rip", "rax", "rdi", "rsi", "rdx", "rcx", "r11", "rflags", "rsp")


class _Caller:
    """Hypercalls through the SYSCALL entry page (as Linux makes them) of one hand-driven
    vCPU, with events masked so that no upcall turns a completed call into exit 4."""

    def __init__(self, hv, v) -> None:
        from aiovmm.abi import VcpuInfo
        from aiovmm.kvm_engine import ring0
        self.hv, self.v, self.eng = hv, v, v.engine
        self.entry = ring0(hv.xen).syscall_va
        self.code_va = 0xFFFFFFFF80400000 - 4096          # unused padding page of the boot map
        v.copy_to_guest(self.code_va, b"\xeb\xfe")          # jmp .
        self.mask_at = v.info_maddr + VcpuInfo.evtchn_upcall_mask
        self.saved_mask = hv.mem.map[self.mask_at]
        hv.mem.map[self.mask_at] = 1

    def restore(self) -> None:
        self.hv.mem.map[self.mask_at] = self.saved_mask

    def call(self, fast: bool, nr: int, a1: int, a2: int, a3: int = 0) -> tuple[int, int]:
        """(exit code, RAX the guest sees)."""
        return entry_page_hypercall(self.eng, self.entry, self.code_va, fast, nr, a1, a2, a3)

    def both(self, nr: int, a1: int, a2: int, a3: int = 0) -> tuple[int, int, int]:
        """(C-path exit code, its RAX, Python's RAX): Python's with fast_hc off."""
        rc, rax_c = self.call(True, nr, a1, a2, a3)
        rc_py, rax_py = self.call(False, nr, a1, a2, a3)
        assert rc_py == TO_PYTHON
        return rc, rax_c, rax_py


async def test_xen_version_in_c_matches_python():
    """XENVER_version (also with bits above 31 of RDI set, and any argument) is answered in C
    with exactly Python's value; every other XENVER command reaches Python."""
    from aiovmm.abi import XEN_VERSION_MAJOR, XEN_VERSION_MINOR
    version = (XEN_VERSION_MAJOR << 16) | XEN_VERSION_MINOR
    async with _hand_driven_vcpu(REGS) as (hv, dom, v):
        c = _Caller(hv, v)
        try:
            ctx = v.engine._ctx
            q0, hc0 = ctx.fast_queries[0], v.hypercalls
            counts0 = dom.hypercall_counts.get(XEN_VERSION, 0)
            for cmd, arg in ((0, 0), (0x7 << 32, 0), (0xFFFFFFFF << 32, 0xDEAD)):
                assert c.both(XEN_VERSION, cmd, arg) == (EINTR, version, version), hex(cmd)
            assert ctx.fast_queries[0] - q0 == 3
            # Counted as hypercalls, as Python counts them (3 in C, 3 in Python).
            assert v.hypercalls - hc0 == 6
            assert dom.hypercall_counts[XEN_VERSION] - counts0 == 6
            # XENVER_pagesize (7) with a NULL argument: 4096 from Python, never from C; and a
            # command whose low 32 bits are not XENVER_version.
            assert c.call(True, XEN_VERSION, 7, 0) == (TO_PYTHON, 4096)
            rc, _ = c.call(True, XEN_VERSION, 1 << 31, 0)
            assert rc == TO_PYTHON
            assert ctx.fast_queries[0] - q0 == 3
        finally:
            c.restore()


async def test_vcpu_op_of_no_vcpu_in_c_matches_python():
    """vcpu_op with a vCPU id >= MAX_VCPUS (also with bits above 31 of RSI set) is -ENOENT in
    C, exactly as in Python, whatever the command (Xen looks the vCPU up first); ids below
    MAX_VCPUS reach Python, existing or not, and so does an id whose low 32 bits name one."""
    from aiovmm.vcpu_op import MAX_VCPUS
    async with _hand_driven_vcpu(REGS) as (hv, dom, v):
        c = _Caller(hv, v)
        try:
            ctx = v.engine._ctx
            q0 = ctx.fast_queries[1]
            done = 0
            for cmd in (3, 4, 8, 9, 11, 0xFFFF, 3 | 0x5A << 32):      # is_up, runstate, timers, ...
                for vcpuid in (MAX_VCPUS, MAX_VCPUS + 1, 8191, 0xFFFFFFFF, 0xABCD << 32 | 40):
                    rc, rax_c, rax_py = c.both(VCPU_OP, cmd, vcpuid, 0x1000)
                    assert (rc, rax_c, rax_py) == (EINTR, ENOENT & M64, ENOENT & M64), (cmd, vcpuid)
                    done += 1
            assert ctx.fast_queries[1] - q0 == done
            # Below MAX_VCPUS: Python's (a vCPU that does not exist in this 1-vCPU domain,
            # this vCPU itself, and an id whose low 32 bits are 0 or 5).
            for vcpuid, want in ((MAX_VCPUS - 1, ENOENT), (1, ENOENT), (0, 1),
                                 (1 << 32, 1), (1 << 32 | 5, ENOENT)):
                assert c.call(True, VCPU_OP, 3, vcpuid) == (TO_PYTHON, want & M64), vcpuid
            assert ctx.fast_queries[1] - q0 == done
        finally:
            c.restore()


async def test_queries_answered_from_the_python_handlers():
    """The answers C gives are what the Python handlers return (stored once per vCPU by
    hypercall.store_query_answers); with none stored, C answers nothing."""
    from aiovmm import hypercall
    from aiovmm.vcpu_op import MAX_VCPUS
    async with _hand_driven_vcpu(REGS) as (hv, dom, v):
        c = _Caller(hv, v)
        try:
            assert v.pv.xenver_version == hypercall.call(v, XEN_VERSION, 0)
            assert v.pv.no_vcpu == ENOENT & M64 and v.pv.max_vcpus == MAX_VCPUS
            saved = v.pv.xenver_version, v.pv.no_vcpu
            v.pv.xenver_version = v.pv.no_vcpu = 0
            try:
                assert c.call(True, XEN_VERSION, 0, 0)[0] == TO_PYTHON
                assert c.call(True, VCPU_OP, 3, MAX_VCPUS)[0] == TO_PYTHON
            finally:
                v.pv.xenver_version, v.pv.no_vcpu = saved
        finally:
            c.restore()
