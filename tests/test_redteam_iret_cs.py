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


def _iret(v, cs: int, rip: int = USER_CODE_VA) -> None:
    """HYPERVISOR_iret from kernel mode with frame [rax r11 rcx flags rip cs rflags rsp ss]
    at DATA_VA, to user mode at `rip` (the kernel's user program is loaded at USER_CODE_VA)."""
    assert v.user_root and v.kernel_mode
    v.copy_to_guest(DATA_VA, IRET_CONTEXT.pack(0, 0, 0, 0, rip, cs, 0x202,
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


def _assert_at_gp(v, gp_handler: int, err: int, rip: int, cs: int) -> None:
    """The vCPU is in kernel mode at its #GP handler, the frame [rcx r11 err rip cs ...]."""
    assert v.kernel_mode, "the #GP was not bounced to kernel mode"
    got, rsp = v.engine.read(("rip", "rsp"))
    assert got == gp_handler, f"RIP {got:#x}, not the #GP handler"
    frame = v.copy_from_guest(rsp, 8 * 5)
    ferr, frip, fcs = (int.from_bytes(frame[8 * i:8 * i + 8], "little") for i in (2, 3, 4))
    assert (ferr, frip, fcs & 0xFFFF) == (err, rip, cs), [hex(x) for x in (ferr, frip, fcs)]


@pytest.mark.parametrize("engine", ENGINES)
async def test_iret_bad_cs_is_the_guests_gp(engine):
    """A CS the IRETQ refuses: index 0x246, beyond any GDT a guest without set_gdt has
    (#GP(0x1230)); and FLAT_RING3_CS32 with a RIP beyond its limit, 4 GiB - 1 (SDM IRET:
    "IF new mode != 64-bit mode and EIP not within CS limit: #GP(0)"). Xen: the IRETQ's
    fault becomes the guest's (entry.S), back in kernel mode at its #GP handler, frame
    [rcx r11 err rip cs ...] with the iret's RIP and CS. The vCPU is never entered in
    compatibility mode with a RIP above 32 bits (checked before the guest runs)."""
    cases = [(0x1233, USER_CODE_VA, 0x1230)] + [
        (0xE023, rip, 0) for rip in ((1 << 32) + USER_CODE_VA, 0x0000_7FFF_FFFF_F000,
                                     0xFFFF_FFFF_8000_0000)]
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        gp_handler = v.trap_table[13][2]
        assert gp_handler
        for cs, rip, err in cases:
            _iret(v, cs, rip)
            try:
                _assert_at_gp(v, gp_handler, err, rip, cs)
            finally:
                _back(v)


@pytest.mark.parametrize("engine", ENGINES)
async def test_bounce_from_kernel_compat_mode_runs_the_handler_in_64_bit_mode(engine):
    """A kernel-mode iret with CS 0xe020 (RPL 0: no toggle, Xen's do_iret) loads 0xe023:
    the kernel runs in compatibility mode. An exception or event bounced from there
    (Xen's create_bounce_frame in kernel context) pushes the CS it ran in with RPL
    cleared (0xe020) and enters the handler with FLAT_KERNEL_CS, 64-bit mode: the
    handler is 64-bit code. Checked at the bounce, before the handler runs."""
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        ud_handler = v.trap_table[6][2]
        assert ud_handler and v.kernel_mode
        v.copy_to_guest(DATA_VA, IRET_CONTEXT.pack(0, 0, 0, 0, USER_CODE_VA, 0xE020, 0x202,
                                                   DATA_VA + 0x800, 0xE02B))
        v.engine.write({"rsp": DATA_VA})
        traps.do_iret(v)
        try:
            assert v.kernel_mode and v.engine.get("cs") == 0xE023
            traps.inject_exception(v, 6, 0, 0)
            rip, rsp, cs = v.engine.read(("rip", "rsp", "cs"))
            assert (rip, cs) == (ud_handler, 0xE033), (hex(rip), hex(cs))
            frame = v.copy_from_guest(rsp, 8 * 4)
            frip, fcs = (int.from_bytes(frame[8 * i:8 * i + 8], "little") for i in (2, 3))
            assert (frip, fcs & 0xFFFF) == (USER_CODE_VA, 0xE020)
        finally:
            _back(v)


KVM_ONLY = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=str(_kvm_skip_reason()))
F = 0x000FFFFFFFFFF000


def _run_kvm_exit(v, fast: bool) -> int:
    """One KVM_RUN of the hand-driven vCPU, its exit handled as a slice would."""
    from test_kvm import kvm_run_once
    rc = kvm_run_once(v.engine, fast)
    if rc == 0:                                     # an exit Python decodes
        v.engine._handle_exit()
    elif rc == 3:                                   # the SYSCALL entry page's
        v.engine.on_hypercall()
    return rc


@KVM_ONLY
@pytest.mark.parametrize("fast", [True, False], ids=["c", "python"])
async def test_syscall_from_compat_user_mode_goes_to_the_syscall32_callback(fast):
    """Xen (x86_64/entry.S cstar_enter -> switch_to_kernel): for a 64-bit PV guest, a
    SYSCALL from compatibility mode is never a hypercall; it bounces to the syscall32
    callback (the syscall one if none), the frame's CS FLAT_USER_CS32, RCX/R11 the return
    address and flags. Linux registers CALLBACKTYPE_syscall32 for its 32-bit processes.
    Here: the user program's page runs `syscall` after an iret to 0xe023."""
    from aiovmm.abi import CallbackType
    async with hand_driven_vcpu(REGS, "kvm") as (hv, dom, v):
        code = 0xFFFFFFFF80400000 - 4096                   # unused padding page of the boot map
        v.copy_to_guest(code, b"\xeb\xfe\xeb\xfe")          # two `jmp .`
        saved = {t: v.callbacks.get(t) for t in (CallbackType.syscall, CallbackType.syscall32)}
        ma = hv.pagetables.translate(v.user_root << 12, USER_CODE_VA, False)
        saved_code = bytes(hv.mem.map[ma:ma + 2])
        try:
            hv.mem.map[ma:ma + 2] = b"\x0f\x05"               # syscall
            for cb32, handler in ((code + 2, code + 2), (None, code)):
                # CALLBACKF_mask_events: no event upcall on top of the bounce
                v.set_callback(CallbackType.syscall, (code, 1))
                v.set_callback(CallbackType.syscall32, (cb32, 1) if cb32 else None)
                _iret(v, 0xE023)
                assert not v.kernel_mode and v.engine.get("cs") == 0xE023
                _run_kvm_exit(v, fast)
                assert dom.shutdown_reason is None and v.kernel_mode
                rip, rsp, cs = v.engine.read(("rip", "rsp", "cs"))
                frame = v.copy_from_guest(rsp, 8 * 7)
                rcx, _r11, frip, fcs = (int.from_bytes(frame[8 * i:8 * i + 8], "little") for i in range(4))
                assert (rip, cs, rcx, frip, fcs & 0xFFFF) == \
                    (handler, 0xE033, USER_CODE_VA + 2, USER_CODE_VA + 2, 0xE023), \
                    [hex(x) for x in (rip, cs, rcx, frip, fcs)]
                _back(v)
        finally:
            hv.mem.map[ma:ma + 2] = saved_code
            for t, e in saved.items():
                v.set_callback(t, e)
            if not v.kernel_mode:
                v.switch_to_kernel()
            v.engine.write({"cs": 0xE033})


@KVM_ONLY
@pytest.mark.parametrize("entry", ["iret", "lret"])
async def test_compat_syscall_never_runs_guest_code_or_stacks_at_ring_0(entry):
    """A SYSCALL from compatibility mode enters ring 0 at MSR_CSTAR on the caller's stack;
    kvm-pvm's emulation of it writes RIP back truncated to 32 bits (0xfffff000 here), a
    guest user address. Measured before the fix: guest code mapped there ran at ring 0 and
    stored through the engine's supervisor direct map into a frame of Xen's (any frame of
    the machine), and with nothing mapped there the #PF's frame was pushed at a stack
    address the guest chose, also through the direct map. Now: the guest's SYSCALL reaches
    its syscall callback (traps.compat_syscall), neither frame is touched, the domain runs.
    Compatibility mode entered by HYPERVISOR_iret to 0xe023, or by the guest's own far
    return to it (the engine's GDT holds Xen's flat selectors: no hypercall needed)."""
    import struct
    from aiovmm import mmu_ops
    from aiovmm.abi import DOMID_XEN, CallbackType
    from aiovmm.kvm_engine import ring0
    async with hand_driven_vcpu(REGS, "kvm") as (hv, dom, v):
        r0 = ring0(hv.xen)
        low = r0.syscall_va & 0xFFFFFFFF                     # where ring 0 lands
        mem, rd = hv.mem, hv.mem.read_u64
        l3 = rd((v.user_root << 12) + 8 * ((USER_CODE_VA >> 39) & 511)) & F
        l2 = rd(l3 + 8 * ((USER_CODE_VA >> 30) & 511)) & F
        l1 = rd(l2 + 8 * ((USER_CODE_VA >> 21) & 511)) & F
        i3, i2, i1 = (low >> 30) & 511, (low >> 21) & 511, (low >> 12) & 511
        assert (low >> 39) == 0 and i3 != (USER_CODE_VA >> 30) & 511
        page_pte = rd(l1 + 8 * ((USER_STACK_TOP - 1 >> 12) & 511))   # the user stack's frame
        page = page_pte & F
        victims = [mem.alloc(DOMID_XEN)[0] << 12 for _ in range(2)]
        for vma in victims:
            mem.map[vma:vma + 4096] = bytes(4096)
        code = 0xFFFFFFFF80400000 - 4096
        v.copy_to_guest(code, b"\xeb\xfe")
        saved_cb = v.callbacks.get(CallbackType.syscall32)

        def update(ptr: int, val: int) -> None:                  # the guest's own mmu_update
            v.copy_to_guest(DATA_VA + 0x100, struct.pack("<QQ", ptr, val))
            assert mmu_ops.do_mmu_update(v, DATA_VA + 0x100, 1, 0, 0x7FF0) == 0
        ma = hv.pagetables.translate(v.user_root << 12, USER_CODE_VA, False)
        saved_code, saved_page = bytes(mem.map[ma:ma + 0x20]), bytes(mem.map[page:page + 64])
        # At `low`: movabs $victim0 (direct map), %rax; movl $0x41414141, (%rax); jmp .
        payload = (b"\x48\xb8" + (r0.dmap_va + victims[0]).to_bytes(8, "little")
                   + b"\xc7\x00\x41\x41\x41\x41\xeb\xfe")
        try:
            update(l3 + 8 * i3, l2 | 0x67)
            update(l2 + 8 * i2, l1 | 0x67)
            update(l1 + 8 * i1, page | 0x67)
            assert hv.pagetables.translate(v.user_root << 12, low, False) == page
            mem.map[page:page + len(payload)] = payload
            if entry == "iret":
                mem.map[ma:ma + 2] = b"\x0f\x05"                     # syscall
                cs, ret = 0xE023, USER_CODE_VA + 2
            else:       # push $0xe023; push $USER_CODE_VA + 0x18; lretq; there: syscall
                mem.map[ma:ma + 0x1A] = (b"\x68\x23\xe0\x00\x00\x68" + struct.pack("<I", USER_CODE_VA + 0x18)
                                         + b"\x48\xcb" + bytes(0x18 - 12) + b"\x0f\x05")
                cs, ret = 0xE033, USER_CODE_VA + 0x1A
            v.set_callback(CallbackType.syscall32, (code, 1))        # events masked
            # The lret pushes on the stack it runs on: only the iret sets a stack in Xen's area.
            stacks = [USER_STACK_TOP - 64] + ([r0.dmap_va + victims[1] + 0x808] if entry == "iret" else [])
            for rsp in stacks:
                v.copy_to_guest(DATA_VA, IRET_CONTEXT.pack(0, 0, 0, 0, USER_CODE_VA, cs, 0x202,
                                                           rsp, 0xE02B))
                v.engine.write({"rsp": DATA_VA})
                traps.do_iret(v)
                _run_kvm_exit(v, False)
                touched = [vma for vma in victims if any(mem.map[vma:vma + 4096])]
                assert not touched, f"ring 0 wrote Xen's frames {[hex(x) for x in touched]}"
                assert not v.engine.last_error and dom.shutdown_reason is None
                assert v.kernel_mode and v.engine.read(("rip", "cs", "rcx")) == [code, 0xE033, ret]
                _back(v)
        finally:
            mem.map[ma:ma + 0x20] = saved_code
            mem.map[page:page + 64] = saved_page
            v.set_callback(CallbackType.syscall32, saved_cb)
            if not v.kernel_mode:
                v.switch_to_kernel()
            v.engine.write({"cs": 0xE033, "rsp": DATA_VA})
            for ptr in (l1 + 8 * i1, l2 + 8 * i2, l3 + 8 * i3):
                update(ptr, 0)
