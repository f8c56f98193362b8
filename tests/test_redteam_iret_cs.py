"""Red-team: HYPERVISOR_iret and the frame's CS. Xen's do_iret (pv/iret.c) returns with
regs->cs = frame.cs | 3 and leaves through restore_all_guest's IRETQ (x86_64/entry.S):
FLAT_RING3_CS32 (0xe023) returns to compatibility mode, and a selector the CPU refuses makes
the IRETQ fault; entry.S exception_with_ints_disabled (iret_to_guest) turns that fault into
one of the guest's own (#GP with the selector as error code, do_general_protection ->
pv_inject_hw_exception), bounced through its trap table with the iret's frame (RIP the
target, CS the bad selector). Not the failsafe callback: in today's Xen that one is only for
data segment loads in load_segments (domain.c).

aiovmm: traps.do_iret checks the CS as the IRETQ would (descriptors.iret_code_segment) and
bounces the refused one's fault; csrc/kvm.c fast_iret leaves every CS but the flat 64-bit
one and a 64-bit code segment of the guest's own GDT (tests/test_kvm_iret_gdt.py) to it.
Compatibility mode runs on KVM; on Unicorn it does not yet (xfail, below)."""
from __future__ import annotations

import pytest

from aiovmm import traps
from aiovmm.abi import IRET_CONTEXT
from conftest import _kvm_skip_reason
from hand_vcpu import DATA_VA, hand_driven_vcpu

USER_CODE_VA, USER_STACK_TOP = 0x400000, 0x403000          # guests/kernel/user.h
REGS = ("rip", "rsp", "rax", "rcx", "r11", "rflags", "gs_base", "cr3")
ENGINES = ["unicorn", pytest.param("kvm", marks=pytest.mark.skipif(
    _kvm_skip_reason() is not None, reason=str(_kvm_skip_reason())))]
# Measured: on Unicorn a CS written by the engine changes only the selector (research/
# unicorn/NOTES.md), the vCPU stays in 64-bit mode (the step below runs `inc %rax`).
UNICORN_NO_COMPAT = ("Unicorn: writing CS changes only the selector; switching to compatibility "
                     "mode needs a real far transfer the engine does not make yet")
COMPAT_ENGINES = [pytest.param("unicorn", marks=pytest.mark.xfail(strict=True,
                                                                   reason=UNICORN_NO_COMPAT)),
                  *ENGINES[1:]]


def _iret(v, cs: int) -> None:
    """HYPERVISOR_iret from kernel mode with frame [rax r11 rcx flags rip cs rflags rsp ss]
    at DATA_VA, to user mode at USER_CODE_VA (the kernel's user program is loaded)."""
    assert v.user_root and v.kernel_mode
    v.copy_to_guest(DATA_VA, IRET_CONTEXT.pack(0, 0, 0, 0, USER_CODE_VA, cs, 0x202,
                                               USER_STACK_TOP - 64, 0xE02B))
    v.engine.write({"rsp": DATA_VA})
    traps.do_iret(v)


def _back(v) -> None:
    v.switch_to_kernel()
    v.engine.write({"cs": 0xE033})


@pytest.mark.parametrize("engine", COMPAT_ENGINES)
async def test_iret_to_flat_user_cs32_is_compat_mode(engine):
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        saved = None
        _iret(v, 0xE023)
        try:
            assert not v.kernel_mode
            assert v.engine.get("cs") == 0xE023, "Xen: regs->cs = 0xe023, IRETQ to compat mode"
            # 48 ff c0: one instruction, `inc %rax`, in 64-bit mode; in compatibility mode
            # two, `dec %eax` (48) and `inc %eax`: one step ends after the `dec`.
            # (The user program's code page is read-only to it: written at its machine address.)
            ma = hv.pagetables.translate(v.user_root << 12, USER_CODE_VA, False)
            saved = bytes(hv.mem.map[ma:ma + 3])
            hv.mem.map[ma:ma + 3] = b"\x48\xff\xc0"
            v.engine.write({"rax": 5})
            stepped = v.engine.step_to(USER_CODE_VA + 1)
            assert (stepped, v.engine.get("rax")) == (True, 4), "not compatibility mode"
        finally:
            if saved is not None:
                hv.mem.map[ma:ma + 3] = saved
            _back(v)


@pytest.mark.parametrize("engine", ENGINES)
async def test_iret_bad_cs_is_the_guests_gp(engine):
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        gp_handler = v.trap_table[13][2]
        assert gp_handler
        _iret(v, 0x1233)            # index 0x246: beyond any GDT a guest without set_gdt has
        try:
            # Xen: the IRETQ's #GP(0x1230) becomes the guest's: back in kernel mode at its
            # #GP handler, frame [rcx r11 err rip cs ...] with the iret's RIP and bad CS.
            assert v.kernel_mode
            rip, rsp = v.engine.read(("rip", "rsp"))
            assert rip == gp_handler
            frame = v.copy_from_guest(rsp, 8 * 5)
            err, frip, fcs = (int.from_bytes(frame[8 * i:8 * i + 8], "little") for i in (2, 3, 4))
            assert (err, frip, fcs & 0xFFFF) == (0x1230, USER_CODE_VA, 0x1233)
        finally:
            _back(v)
