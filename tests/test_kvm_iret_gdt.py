"""HYPERVISOR_iret to a code segment of the guest's own GDT, completed in C on the KVM engine
(csrc/kvm.c iret_gdt_code64): Linux returns to user mode with its __USER_CS (0x33, in the
GDT it gave with set_gdt), not Xen's FLAT_RING3_CS64, so these irets are the commonest
hypercall of a Linux guest doing I/O (bench/blk_exits.py: ~2.6 per 4 KiB read, all in
Python before). C takes a selector only when Python's rule (descriptors.iret_code_segment)
gives 64-bit code for it; every other descriptor, selector or missing GDT must reach Python
(rc 3, nothing changed), which faults or changes mode as Xen's IRETQ would. For each case
both paths must leave the same vCPU."""
from __future__ import annotations

import contextlib
import types

import pytest

from aiovmm.abi import VGCF_in_syscall
from aiovmm.mmu import XEN_GDT
from conftest import _kvm_skip_reason
from test_kvm import _hand_driven_vcpu
from test_redteam_kvm_fast import _Driver

pytestmark = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=str(_kvm_skip_reason()))

USER_CODE_VA, USER_STACK_TOP = 0x400000, 0x403000          # guests/kernel/user.h
RF_IF = 0x200
TO_PYTHON = 3
LOOK = ("rip", "rsp", "rax", "rcx", "r11", "rflags", "cs", "cr3", "gs_base")


def _desc(type_: int = 0xB, s: int = 1, dpl: int = 3, p: int = 1, l: int = 1, d: int = 0) -> int:
    """A segment descriptor (flat: base 0, limit 0xfffff, G): type, S, DPL, P, L, D/B."""
    hi = (type_ << 8) | (s << 12) | (dpl << 13) | (p << 15) | (0xF << 16) | (l << 21) | (d << 22) | (1 << 23)
    return (hi << 32) | 0xFFFF


# (name, descriptor, selector of the frame): Linux's __USER_CS first.
CASES = [
    ("linux user cs", _desc(), 0x33),
    ("rpl 0 in the frame: loaded | 3", _desc(), 0x30),
    ("last descriptor of page 0", _desc(), 0xFF8 | 3),
    ("conforming, dpl 0", _desc(type_=0xF, dpl=0), 0x33),
    ("conforming, dpl 2", _desc(type_=0xE, dpl=2), 0x33),
    ("execute-only code", _desc(type_=0x8), 0x33),
    ("dpl 0", _desc(dpl=0), 0x33),
    ("dpl 1", _desc(dpl=1), 0x33),
    ("dpl 2", _desc(dpl=2), 0x33),
    ("not present", _desc(p=0), 0x33),
    ("L and D", _desc(d=1), 0x33),
    ("compatibility mode", _desc(l=0, d=1), 0x33),
    ("16-bit code", _desc(l=0, d=0), 0x33),
    ("data segment", _desc(type_=0x3), 0x33),
    ("system segment", _desc(s=0, type_=0xB), 0x33),
    ("null selector", _desc(), 0x3),
    ("ldt selector", _desc(), 0x37),
    ("gdt page 1", _desc(), 0x1003),
]


@contextlib.asynccontextmanager
async def _iret_rig(look: tuple[str, ...]):
    """A hand-driven KVM vCPU in kernel mode with a GDT frame of its own (empty), `jmp .` at
    the user code address, no timer events (one pending would end an unmasking C iret in
    the upcall, rc 4, where the Python one, run by hand here, has no tail) and `back()`,
    which returns it to kernel mode with Xen's flat CS and SS. All undone on the way out."""
    from aiovmm import timers, traps
    async with _hand_driven_vcpu(look) as (hv, dom, v):
        d = _Driver(hv, v)
        eng, mem = d.eng, hv.mem
        assert v.user_root and v.kernel_mode and not v.gdt_frames
        gdt = mem.alloc(dom.domid)[0]
        code_ma = hv.pagetables.translate(v.user_root << 12, USER_CODE_VA, False)
        saved_code = bytes(mem.map[code_ma:code_ma + 2])
        mem.map[code_ma:code_ma + 2] = b"\xeb\xfe"          # jmp . in user mode
        saved_info = bytes(mem.map[d.pending:d.pending + 2])
        period = v.periodic_ns
        timers.stop_periodic(v)
        timers.stop_singleshot(v)
        mem.map[d.pending] = 0

        def back() -> None:
            v.switch_to_kernel()
            traps.load_segments(v, 0xE033, XEN_GDT[0xE033], 0xE02B, XEN_GDT[0xE02B])
        try:
            yield types.SimpleNamespace(hv=hv, dom=dom, v=v, d=d, eng=eng, mem=mem, gdt=gdt,
                                        at=d.data_va + 0x800, back=back)
        finally:
            v.gdt_frames = ()
            back()
            mem.map[d.pending:d.pending + 2] = saved_info
            mem.map[code_ma:code_ma + 2] = saved_code
            mem.free([gdt])
            if period:
                timers.set_periodic(v, period)


async def test_iret_to_a_gdt_code_segment_c_and_python_agree():
    from aiovmm import descriptors, traps
    from aiovmm.abi import IRET_CONTEXT
    from aiovmm.descriptors import SEG_L
    from aiovmm.kvm_engine import _SEG
    async with _iret_rig(LOOK + ("rdi", "rsi")) as rig:
        dom, v, d, eng, mem, gdt, at, back = rig.dom, rig.v, rig.d, rig.eng, rig.mem, rig.gdt, rig.at, rig.back

        def state(rc: int, at_desc: int) -> tuple:
            # The CS's whole hidden part and the descriptor (the load marks it accessed).
            cs_image = bytes(eng._sregs[_SEG["cs"]:_SEG["cs"] + 24])
            return rc, eng.read(LOOK), v.kernel_mode, mem.map[d.mask], cs_image, mem.read_u64(at_desc)

        def iret(fast: bool, sel: int, flags: int = 0) -> int:
            mem.map[d.pending] = 0
            # To user mode its `jmp .`; an RPL-0 frame stays in kernel mode: the kernel's.
            rip, rsp = (USER_CODE_VA, USER_STACK_TOP - 64) if sel & 3 == 3 else (d.code_va, d.data_va + 0x100)
            v.copy_to_guest(at, IRET_CONTEXT.pack(7, 8, 9, flags, rip, sel, RF_IF | 0x2, rsp, 0xE02B))
            return d.hypercall(23, fast, rsp=at)

        try:
            # The user root becomes one C may load once the engine has run on it (Python's
            # first iret to user mode: _ready_roots).
            v.gdt_frames = (gdt,)
            mem.write_u64((gdt << 12) + 0x30, _desc())
            assert iret(False, 0x33) == TO_PYTHON
            traps.do_iret(v)
            d.run()
            back()
            for name, desc, sel in CASES:
                at_desc = (gdt << 12) + (sel & 0xFF8)
                mem.write_u64(at_desc, desc)
                loaded = descriptors.iret_code_segment(v, sel)
                python_64bit = not isinstance(loaded, tuple) and bool(loaded & SEG_L << 32)
                done = eng._ctx.fast_calls[2]
                rc = iret(True, sel)
                by_c = eng._ctx.fast_calls[2] - done
                c_state = state(rc, at_desc) if by_c else None
                if not by_c:
                    assert rc == TO_PYTHON, name
                    assert eng.read(("rax", "rsp")) == [23, at], name     # nothing changed
                    assert mem.read_u64(at_desc) == desc, name
                back()
                mem.write_u64(at_desc, desc)
                assert iret(False, sel) == TO_PYTHON
                traps.do_iret(v)
                assert dom.shutdown_reason is None, name
                assert v.kernel_mode == (sel & 3 != 3) or not python_64bit, name
                py_state = state(d.run(), at_desc) if python_64bit else None
                back()
                assert by_c == python_64bit, (name, by_c, python_64bit)
                if by_c:
                    assert c_state == py_state, (name, c_state, py_state)
                    assert c_state[1][6] == sel | 3, name                 # CS: the selector
            # VGCF_in_syscall: Xen leaves through SYSRET, CS FLAT_RING3_CS64 from MSR_STAR
            # whatever the frame's CS names (traps.do_iret), on both paths.
            at_desc = (gdt << 12) + 0x30
            for sel in (0x33, 0x1233):
                mem.write_u64(at_desc, _desc())
                done = eng._ctx.fast_calls[2]
                c_state = state(iret(True, sel, VGCF_in_syscall), at_desc)
                assert eng._ctx.fast_calls[2] - done == 1, sel
                back()
                assert iret(False, sel, VGCF_in_syscall) == TO_PYTHON
                traps.do_iret(v)
                py_state = state(d.run(), at_desc)
                back()
                assert c_state == py_state and c_state[1][6] == 0xE033, (sel, c_state, py_state)
            # Without a GDT the same selector is Python's (its page reads as zeros), whatever
            # machine frame 0 (PVState.gdt_frame0's "none") holds there.
            v.gdt_frames = ()
            saved0 = mem.read_u64(0x30)
            mem.write_u64(0x30, _desc())
            try:
                done = eng._ctx.fast_calls[2]
                assert iret(True, 0x33) == TO_PYTHON
                assert eng._ctx.fast_calls[2] == done
            finally:
                mem.write_u64(0x30, saved0)
        finally:
            v.gdt_frames = ()


# (name, descriptor at the frame's SS, SS selector of the frame); CS is Linux's __USER_CS.
SS_CASES = [
    ("linux user ds", _desc(type_=0x3, l=0, d=1), 0x2B),
    ("not accessed yet", _desc(type_=0x2, l=0, d=1), 0x2B),
    ("rpl 0 in the frame: loaded | 3", _desc(type_=0x3, l=0, d=1), 0x28),
    ("expand-down writable", _desc(type_=0x6, l=0, d=1), 0x2B),
    ("last descriptor of page 0", _desc(type_=0x3, l=0, d=1), 0xFF8 | 3),
    ("read-only data", _desc(type_=0x1, l=0, d=1), 0x2B),
    ("code segment", _desc(type_=0xB), 0x2B),
    ("dpl 0", _desc(type_=0x3, dpl=0, l=0, d=1), 0x2B),
    ("dpl 2", _desc(type_=0x3, dpl=2, l=0, d=1), 0x2B),
    ("not present", _desc(type_=0x3, p=0, l=0, d=1), 0x2B),
    ("system segment", _desc(type_=0x3, s=0, l=0, d=1), 0x2B),
    ("null selector", _desc(type_=0x3, l=0, d=1), 0x3),
    ("ldt selector", _desc(type_=0x3, l=0, d=1), 0x2F),
    ("gdt page 1", _desc(type_=0x3, l=0, d=1), 0x102B),
]


async def test_iret_to_a_gdt_stack_segment_c_and_python_agree():
    """Linux's iret frames to user mode name its __USER_DS (0x2b) as SS, not Xen's
    FLAT_RING3_SS: C (csrc/kvm.c iret_ss_gdt) takes a selector only when Python's rule
    (descriptors.iret_stack_segment) loads it, and then leaves the same vCPU: registers, mode,
    the SS hidden part, the descriptor's accessed bit; every other one reaches Python with
    nothing changed. Before, C left every such iret to Python (bench/blk_exits.py: ~2.2-2.9
    per 4 KiB read of fio in a Linux guest)."""
    from aiovmm import descriptors, traps
    from aiovmm.abi import IRET_CONTEXT
    from aiovmm.kvm_engine import _SEG
    async with _iret_rig(LOOK + ("rdi", "rsi", "ss")) as rig:
        dom, v, d, eng, mem, gdt, at, back = rig.dom, rig.v, rig.d, rig.eng, rig.mem, rig.gdt, rig.at, rig.back

        def state(rc: int, at_desc: int) -> tuple:
            ss_image = bytes(eng._sregs[_SEG["ss"]:_SEG["ss"] + 24])
            return (rc, eng.read(LOOK + ("ss",)), v.kernel_mode, mem.map[d.mask], ss_image,
                    mem.read_u64(at_desc))

        def iret(fast: bool, ss: int) -> int:
            mem.map[d.pending] = 0
            v.copy_to_guest(at, IRET_CONTEXT.pack(7, 8, 9, 0, USER_CODE_VA, 0x33, RF_IF | 0x2,
                                                  USER_STACK_TOP - 64, ss))
            return d.hypercall(23, fast, rsp=at)

        v.gdt_frames = (gdt,)
        mem.write_u64((gdt << 12) + 0x30, _desc())
        mem.write_u64((gdt << 12) + 0x28, _desc(type_=0x3, l=0, d=1))
        assert iret(False, 0x2B) == TO_PYTHON            # the user root becomes ready
        traps.do_iret(v)
        d.run()
        back()
        for name, desc, sel in SS_CASES:
            at_desc = (gdt << 12) + (sel & 0xFF8)
            saved_desc = mem.read_u64(at_desc) if sel & ~7 < 0x1000 else None
            if saved_desc is not None:
                mem.write_u64(at_desc, desc)
            else:
                at_desc = (gdt << 12) + 0x28             # page 1 is not the guest's: no write
            loaded = descriptors.iret_stack_segment(v, sel)
            python_loads = not isinstance(loaded, tuple)
            done = eng._ctx.fast_calls[2]
            rc = iret(True, sel)
            by_c = eng._ctx.fast_calls[2] - done
            c_state = state(rc, at_desc) if by_c else None
            if by_c:
                # What _back_to_cpl3 gives back after a later exit through ring 0.
                assert eng._ctx.cpl3_ss_set == 1 and bytes(eng._ctx.cpl3_ss) == c_state[4], name
            else:
                assert rc == TO_PYTHON, name
                assert eng.read(("rax", "rsp")) == [23, at], name     # nothing changed
                if saved_desc is not None:
                    assert mem.read_u64(at_desc) == desc, name
            back()
            if saved_desc is not None:
                mem.write_u64(at_desc, desc)
            assert iret(False, sel) == TO_PYTHON
            traps.do_iret(v)
            assert dom.shutdown_reason is None, name
            py_state = state(d.run(), at_desc) if python_loads else None
            back()
            if saved_desc is not None:
                mem.write_u64(at_desc, saved_desc if sel & 0xFF8 != 0x30 else _desc())
            assert bool(by_c) == python_loads, (name, by_c, python_loads)
            if by_c:
                assert c_state == py_state, (name, c_state, py_state)
                assert c_state[1][-1] == sel | 3, name              # SS: the selector
                assert c_state[5] & (1 << 40), name                 # marked accessed
