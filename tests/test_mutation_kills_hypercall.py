"""hypercall.py checks that bench/mutants.py exercised (issue 9, mutation testing): argument
bounds of console_io / xen_version / vm_assist, the hypercall table's ENOSYS, and the
multicall's nesting, preemption and continuation rules. Driven as a hostile guest would: a
parked domain (lab.park) whose arguments are written into its own memory, through
hypercall.call (the dispatcher's one entry point)."""
from __future__ import annotations

import asyncio
import time

from aiovmm import Hypervisor, hypercall, lab, mmu_ops
from aiovmm.abi import (CONSOLEIO_write, DOMID_SELF, FLAT_RING3_CS64, FLAT_RING3_SS, IRET_CONTEXT,
                        MMU_MACHPHYS_UPDATE, MMU_UPDATE, MULTICALL_ENTRY, PAGE_SHIFT, PAGE_SIZE,
                        _PAGE_RW, Errno, Hypercall, MmuExt, XenVer)
from conftest import kernel

E = Errno


def run(coro):
    return asyncio.run(coro)


def _rw_region(a, pages: int) -> int:
    for pfn in range(0, a.lay.pt_pfn):
        if all(a.hv.mem.read_u64(a.l1_of(a.lay.va(p))) & _PAGE_RW for p in range(pfn, pfn + pages)):
            return a.lay.va(pfn)
    raise LookupError("no RW region")


def test_console_write_bound():
    """CONSOLEIO_write of up to 64 KiB is accepted (it reaches the console); one byte more
    is -EINVAL and nothing is written."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            va = _rw_region(a, 17)
            a.v.copy_to_guest(va, b"y" * (1 << 16) + b"z")
            assert a.dom.first_output_ns is None
            assert hypercall.call(a.v, Hypercall.console_io, CONSOLEIO_write, (1 << 16) + 1, va) == -E.EINVAL
            assert a.dom.first_output_ns is None                 # nothing reached the console
            assert hypercall.call(a.v, Hypercall.console_io, CONSOLEIO_write, 1 << 16, va) == 0
            assert a.dom.first_output_ns is not None
    run(main())


def test_xen_version_argument_checks():
    """XENVER_get_features: only submap 0 exists (-EINVAL else); XENVER_pagesize takes no
    argument (-EINVAL with one); the varbuf ops (extraversion2 ...) give the length for a
    NULL handle, fill a buffer that is exactly large enough, -ENOBUFS for one byte less;
    build_id and commandline2 are privileged (-EPERM)."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            arg = a._args(bytes(64), 0)
            a.v.copy_to_guest(arg, (1).to_bytes(4, "little"))
            assert hypercall.call(a.v, Hypercall.xen_version, XenVer.get_features, arg) == -E.EINVAL
            a.v.copy_to_guest(arg, (0).to_bytes(4, "little"))
            assert hypercall.call(a.v, Hypercall.xen_version, XenVer.get_features, arg) == 0
            assert hypercall.call(a.v, Hypercall.xen_version, XenVer.pagesize, 0) == 4096
            assert hypercall.call(a.v, Hypercall.xen_version, XenVer.pagesize, arg) == -E.EINVAL
            n = hypercall.call(a.v, Hypercall.xen_version, hypercall.XENVER_extraversion2, 0)
            assert n == len(b"-aiovmm")
            for room in (n - 1, n // 2, 0):
                a.v.copy_to_guest(arg, room.to_bytes(4, "little") + b"\xAA" * 16)
                rc = hypercall.call(a.v, Hypercall.xen_version, hypercall.XENVER_extraversion2, arg)
                assert rc == -E.ENOBUFS, room
                assert a.v.copy_from_guest(arg + 4, 16) == b"\xAA" * 16
            a.v.copy_to_guest(arg, n.to_bytes(4, "little"))
            assert hypercall.call(a.v, Hypercall.xen_version, hypercall.XENVER_extraversion2, arg) == n
            assert a.v.copy_from_guest(arg + 4, n) == b"-aiovmm"
            for cmd in (hypercall.XENVER_build_id, hypercall.XENVER_commandline2):
                assert hypercall.call(a.v, Hypercall.xen_version, cmd, arg) == -E.EPERM
            assert hypercall.call(a.v, Hypercall.xen_version, 99, arg) == -E.ENOSYS
    run(main())


def test_vm_assist_checks():
    """VMASST_CMD_enable/disable only (-ENOSYS else); only the known assist types (-EINVAL
    else, the domain's assists unchanged)."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            before = a.dom.vm_assist
            assert hypercall.call(a.v, Hypercall.vm_assist, 2, 1) == -E.ENOSYS
            for t in (6, 7, 31, 33, 64):
                assert hypercall.call(a.v, Hypercall.vm_assist, 0, t) == -E.EINVAL, t
            assert a.dom.vm_assist == before
            assert hypercall.call(a.v, Hypercall.vm_assist, 0, 32) == 0
            assert a.dom.vm_assist & (1 << 32)
    run(main())


def test_unknown_hypercall_is_enosys():
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            for nr in (99, 63, 1 << 20):
                assert hypercall.call(a.v, nr) == -E.ENOSYS
    run(main())


def _entries(a, va: int, *entries: tuple) -> None:
    a.v.copy_to_guest(va, b"".join(MULTICALL_ENTRY.pack(op, 0xDEAD, *(list(args) + [0] * 6)[:6])
                                   for op, *args in entries))


def _result(a, va: int, i: int) -> int:
    return MULTICALL_ENTRY.unpack(a.v.copy_from_guest(va + 64 * i, 64))[1]


def test_nested_multicall_is_einval():
    """A multicall entry that is itself a multicall: -EINVAL in its result (Xen refuses
    nesting); the other entries run."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            va = a._args(bytes(256), 0)
            _entries(a, va, (Hypercall.multicall, va, 1), (Hypercall.xen_version, XenVer.version))
            assert hypercall.call(a.v, Hypercall.multicall, va, 2) == 0
            assert _result(a, va, 0) == (-E.EINVAL) & ((1 << 64) - 1)
            assert _result(a, va, 1) == hypercall.call(a.v, Hypercall.xen_version, XenVer.version)
    run(main())


def test_multicall_preempts_between_entries():
    """With the slice deadline already passed (or the vCPU asked to stop), a multicall runs
    one entry and continues itself: RIP rewound to the SYSCALL, RDI at the next entry, RSI
    the entries left; the entries after the first are untouched."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            eng = a.v.engine
            va = a._args(bytes(320), 0)
            rip = eng.get("rip")
            for how in ("deadline", "stop"):
                _entries(a, va, *[(Hypercall.xen_version, XenVer.version)] * 4)
                eng.write({"rip": rip})
                if how == "deadline":
                    eng.slice.deadline_ns = time.monotonic_ns() - 1
                else:
                    eng.slice.deadline_ns = time.monotonic_ns() + 60 * 10**9
                    eng.stop_requested = True
                assert hypercall.call(a.v, Hypercall.multicall, va, 4) is None
                assert eng.get("rip") == rip - 2, how
                assert (eng.get("rdi"), eng.get("rsi")) == (va + 64, 3), how
                assert _result(a, va, 0) != 0xDEAD and _result(a, va, 1) == 0xDEAD, how
                eng.stop_requested = False
                eng.slice.deadline_ns = 0
    run(main())


def _long_mmu_update(a) -> tuple[int, int]:
    """A slice that will not end on its own and, in the guest, an mmu_update request list one
    longer than a chunk plus one (M2P updates of a spare frame): the sub-call preempts itself.
    Returns (guest address of the list, its count)."""
    a.v.engine.slice.deadline_ns = time.monotonic_ns() + 60 * 10**9
    f = a.spare[0]
    count = mmu_ops.CHUNK + 2
    reqs = _rw_region(a, -(-count * 16 // PAGE_SIZE) + 2)
    a.v.copy_to_guest(reqs, b"".join(MMU_UPDATE.pack((f << PAGE_SHIFT) | MMU_MACHPHYS_UPDATE, i)
                                     for i in range(count)))
    return reqs, count


def test_multicall_carries_a_sub_call_continuation():
    """An mmu_update longer than one chunk inside a multicall: it preempts itself; its
    advanced arguments are written back into its entry and the multicall continues at that
    entry (RIP rewound, RDI = the entry, RSI = entries left); re-running completes it."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            eng = a.v.engine
            reqs, count = _long_mmu_update(a)
            f = a.spare[0]                       # the frame the list updates
            mc = a._args(bytes(192), 0)
            _entries(a, mc, (Hypercall.xen_version, XenVer.version),
                     (Hypercall.mmu_update, reqs, count, 0, DOMID_SELF),
                     (Hypercall.xen_version, XenVer.version))
            rip = eng.get("rip")
            assert hypercall.call(a.v, Hypercall.multicall, mc, 3) is None
            assert eng.get("rip") == rip - 2
            assert (eng.get("rdi"), eng.get("rsi")) == (mc + 64, 2)
            op, _r, *args = MULTICALL_ENTRY.unpack(a.v.copy_from_guest(mc + 64, 64))
            assert op == Hypercall.mmu_update
            assert args[0] == reqs + mmu_ops.CHUNK * 16 and args[1] == 2 | mmu_ops.PREEMPTED
            assert hv.mem.m2p[f] == mmu_ops.CHUNK - 1 and _result(a, mc, 2) == 0xDEAD
            eng.write({"rip": rip})
            eng.stop_requested = False                # the vCPU resumed
            assert hypercall.call(a.v, Hypercall.multicall, mc + 64, 2) == 0
            assert hv.mem.m2p[f] == count - 1
            assert _result(a, mc, 1) == 0 and _result(a, mc, 2) != 0xDEAD
            eng.slice.deadline_ns = 0
    run(main())


def test_multicall_stops_after_a_sub_call_that_crashed_the_domain():
    """An iret entry whose context is unreadable crashes the domain (Xen: domain_crash);
    the multicall stops there: no result is written back and the next entry never runs."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            eng = a.v.engine
            eng.slice.deadline_ns = time.monotonic_ns() + 60 * 10**9
            va = a._args(bytes(128), 0)
            _entries(a, va, (Hypercall.iret,), (Hypercall.xen_version, XenVer.version))
            eng.write({"rsp": a.free_l2_va()})                  # unmapped: no iret context
            assert hypercall.call(a.v, Hypercall.multicall, va, 2) is None
            assert a.dom.dying
            assert _result(a, va, 0) == 0xDEAD and _result(a, va, 1) == 0xDEAD
            eng.slice.deadline_ns = 0
    run(main())


def test_multicall_stops_after_a_successful_iret():
    """A well-formed iret entry (to user mode, a user L4 set by NEW_USER_BASEPTR) loads the
    guest's new context: the multicall ends there, as Xen's does (the registers are the
    guest's now). Its result is not written back, the entry after it never runs, and RIP,
    RSP and RAX are the iret frame's."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            eng = a.v.engine
            eng.slice.deadline_ns = time.monotonic_ns() + 60 * 10**9
            assert a.mmuext(MmuExt.NEW_USER_BASEPTR, a.v.kernel_root) == 0
            va = a._args(bytes(128), 0)
            frame = _rw_region(a, 1) + PAGE_SIZE - IRET_CONTEXT.size
            # rax r11 rcx flags rip cs rflags rsp ss
            a.v.copy_to_guest(frame, IRET_CONTEXT.pack(0x1234, 0, 0, 0, 0x400000, FLAT_RING3_CS64,
                                                       0x202, 0x7FF000, FLAT_RING3_SS))
            before = a.dom.vm_assist
            _entries(a, va, (Hypercall.iret,), (Hypercall.vm_assist, 0, 32))
            eng.write({"rsp": frame})
            assert hypercall.call(a.v, Hypercall.multicall, va, 2) is None
            assert not a.dom.dying
            assert (eng.get("rip"), eng.get("rsp"), eng.get("rax")) == (0x400000, 0x7FF000, 0x1234)
            assert _result(a, va, 0) == 0xDEAD and _result(a, va, 1) == 0xDEAD
            assert a.dom.vm_assist == before                     # the vm_assist entry never ran
            eng.slice.deadline_ns = 0
    run(main())


def test_multicall_of_a_dying_domain_does_not_continue():
    """A domain crashed (by another vCPU, or the toolstack) while one of its vCPUs makes a
    multicall: a sub-call that preempts itself (an mmu_update longer than a chunk) does not
    make the multicall write its advanced arguments back into the guest's entry nor continue
    itself: nothing more is written into a dying domain's memory."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            eng = a.v.engine
            reqs, count = _long_mmu_update(a)
            mc = a._args(bytes(128), 0)
            _entries(a, mc, (Hypercall.mmu_update, reqs, count, 0, DOMID_SELF),
                     (Hypercall.xen_version, XenVer.version))
            entry = a.v.copy_from_guest(mc, 128)
            a.dom.crash("crashed by another vCPU (test)")
            eng.stop_requested = False
            assert hypercall.call(a.v, Hypercall.multicall, mc, 2) is None
            assert a.v.copy_from_guest(mc, 128) == entry            # entry untouched
            eng.slice.deadline_ns = 0
    run(main())
