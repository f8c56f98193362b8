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
Both engines make the transfer real: compatibility mode runs."""
from __future__ import annotations

import pytest

from aiovmm import descriptors, traps
from aiovmm.abi import IRET_CONTEXT, CallbackType, VcpuInfo
from aiovmm.mmu import XEN_GDT
from conftest import _kvm_skip_reason
from hand_vcpu import DATA_VA, hand_driven_vcpu

USER_CODE_VA, USER_STACK_TOP = 0x400000, 0x403000          # guests/kernel/user.h
REGS = ("rip", "rsp", "rax", "rcx", "r11", "rflags", "gs_base", "cr3")
ENGINES = ["unicorn", pytest.param("kvm", marks=pytest.mark.skipif(
    _kvm_skip_reason() is not None, reason=str(_kvm_skip_reason())))]


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
    traps.load_segments(v, 0xE033, XEN_GDT[0xE033], 0xE02B, XEN_GDT[0xE02B])


@pytest.mark.parametrize("engine", ENGINES)
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
    callback, the frame's CS FLAT_USER_CS32, RCX/R11 the return address and flags; without
    one it is the guest's #UD at the SYSCALL (never the 64-bit syscall callback: TB_eip == 0).
    Linux registers CALLBACKTYPE_syscall32 for its 32-bit processes. Here: the user
    program's page runs `syscall` after an iret to 0xe023."""
    from aiovmm.abi import CallbackType
    async with hand_driven_vcpu(REGS, "kvm") as (hv, dom, v):
        code = 0xFFFFFFFF80400000 - 4096                   # unused padding page of the boot map
        v.copy_to_guest(code, b"\xeb\xfe\xeb\xfe")          # two `jmp .`
        saved = {t: v.callbacks.get(t) for t in (CallbackType.syscall, CallbackType.syscall32)}
        ma = hv.pagetables.translate(v.user_root << 12, USER_CODE_VA, False)
        saved_code = bytes(hv.mem.map[ma:ma + 2])
        try:
            hv.mem.map[ma:ma + 2] = b"\x0f\x05"               # syscall
            ud_handler = v.trap_table[6][2]
            for cb32 in (code + 2, None):
                # CALLBACKF_mask_events: no event upcall on top of the bounce
                v.set_callback(CallbackType.syscall, (code, 1))
                v.set_callback(CallbackType.syscall32, (cb32, 1) if cb32 else None)
                _iret(v, 0xE023)
                assert not v.kernel_mode and v.engine.get("cs") == 0xE023
                v.engine.write({"rcx": 0})
                _run_kvm_exit(v, fast)
                assert dom.shutdown_reason is None and v.kernel_mode
                rip, rsp, cs = v.engine.read(("rip", "rsp", "cs"))
                frame = v.copy_from_guest(rsp, 8 * 7)
                rcx, _r11, frip, fcs = (int.from_bytes(frame[8 * i:8 * i + 8], "little") for i in range(4))
                want = ((cb32, 0xE033, USER_CODE_VA + 2, USER_CODE_VA + 2, 0xE023) if cb32 else
                        (ud_handler, 0xE033, rcx, USER_CODE_VA, 0xE023))    # #UD at the SYSCALL
                assert (rip, cs, rcx, frip, fcs & 0xFFFF) == want, \
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
    kvm-pvm's emulation of it writes RIP back truncated to 32 bits (the stubs page's here), a
    guest user address. Measured before the fix: guest code mapped there ran at ring 0 and
    stored through the engine's supervisor direct map into a frame of Xen's (any frame of
    the machine), and with nothing mapped there the #PF's frame was pushed at a stack
    address the guest chose, also through the direct map. Now: the guest's SYSCALL reaches
    its syscall32 callback (traps.syscall32), neither frame is touched, the domain runs.
    Compatibility mode entered by HYPERVISOR_iret to 0xe023, or by the guest's own far
    return to it (the engine's GDT holds Xen's flat selectors: no hypercall needed)."""
    import struct
    from aiovmm import mmu_ops
    from aiovmm.abi import DOMID_XEN, CallbackType
    from aiovmm.kvm_engine import ring0
    async with hand_driven_vcpu(REGS, "kvm") as (hv, dom, v):
        r0 = ring0(hv.xen)
        low = r0.syscall32_va & 0xFFFFFFFF                   # where ring 0 would land
        mem, rd = hv.mem, hv.mem.read_u64
        l3 = rd((v.user_root << 12) + 8 * ((USER_CODE_VA >> 39) & 511)) & F
        l2 = rd(l3 + 8 * ((USER_CODE_VA >> 30) & 511)) & F
        l1 = rd(l2 + 8 * ((USER_CODE_VA >> 21) & 511)) & F
        i3, i2, i1 = (low >> 30) & 511, (low >> 21) & 511, (low >> 12) & 511
        u3, u2 = (USER_CODE_VA >> 30) & 511, (USER_CODE_VA >> 21) & 511
        assert (low >> 39) == 0
        # `low` mapped through the user program's own L2/L1 tables (aliased where its path
        # leaves the program's): the entries made here, all empty before.
        made = ([(l3 + 8 * i3, l2)] if i3 != u3 else []) \
            + ([(l2 + 8 * i2, l1)] if (i3, i2) != (u3, u2) else [])
        page_pte = rd(l1 + 8 * ((USER_STACK_TOP - 1 >> 12) & 511))   # the user stack's frame
        page = page_pte & F
        victims = [mem.alloc(DOMID_XEN)[0] << 12 for _ in range(2)]
        for vma in victims:
            mem.map[vma:vma + 4096] = bytes(4096)
        code = 0xFFFFFFFF80400000 - 4096
        v.copy_to_guest(code, b"\xeb\xfe")
        saved_cb = v.callbacks.get(CallbackType.syscall32)
        saved_cb64 = v.callbacks.get(CallbackType.syscall)

        def update(ptr: int, val: int) -> None:                  # the guest's own mmu_update
            v.copy_to_guest(DATA_VA + 0x100, struct.pack("<QQ", ptr, val))
            assert mmu_ops.do_mmu_update(v, DATA_VA + 0x100, 1, 0, 0x7FF0) == 0
        ma = hv.pagetables.translate(v.user_root << 12, USER_CODE_VA, False)
        at, done = page + (low & 0xFFF), []
        saved_code, saved_page = bytes(mem.map[ma:ma + 0x20]), bytes(mem.map[at:at + 64])
        # At `low`: movabs $victim0 (direct map), %rax; movl $0x41414141, (%rax); jmp .
        payload = (b"\x48\xb8" + (r0.dmap_va + victims[0]).to_bytes(8, "little")
                   + b"\xc7\x00\x41\x41\x41\x41\xeb\xfe")
        try:
            made.append((l1 + 8 * i1, page))
            for ptr, table in made:
                assert not rd(ptr) & 1, f"entry {ptr:#x} in use"
                update(ptr, table | 0x67)
                done.append(ptr)
            assert hv.pagetables.translate(v.user_root << 12, low, False) == at
            mem.map[at:at + len(payload)] = payload
            if entry == "iret":
                mem.map[ma:ma + 2] = b"\x0f\x05"                     # syscall
                cs, ret = 0xE023, USER_CODE_VA + 2
            else:       # push $0xe023; push $USER_CODE_VA + 0x18; lretq; there: syscall
                mem.map[ma:ma + 0x1A] = (b"\x68\x23\xe0\x00\x00\x68" + struct.pack("<I", USER_CODE_VA + 0x18)
                                         + b"\x48\xcb" + bytes(0x18 - 12) + b"\x0f\x05")
                cs, ret = 0xE033, USER_CODE_VA + 0x1A
            v.set_callback(CallbackType.syscall32, (code, 0))
            # Events masked: Xen takes it from the syscall callback's flag for both entries
            # (VGCF_syscall_disables_events).
            v.set_callback(CallbackType.syscall, (saved_cb64[0] if saved_cb64 else code, 1))
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
            mem.map[at:at + 64] = saved_page
            v.set_callback(CallbackType.syscall32, saved_cb)
            v.set_callback(CallbackType.syscall, saved_cb64)
            if not v.kernel_mode:
                v.switch_to_kernel()
            v.engine.write({"cs": 0xE033, "rsp": DATA_VA})
            for ptr in reversed(done):
                update(ptr, 0)


# ------------------------------------------------------------------ compatibility mode, SS
# The guest's own GDT (one frame, 16 entries), as a 64-bit PV kernel with 32-bit processes
# has it (Linux: __USER32_CS 0x23, __USER_DS 0x2b, __USER_CS 0x33).
GDT = {4: 0x00CFFA000000FFFF,        # 0x23: 32-bit code, DPL 3, not yet accessed
       5: 0x00CFF2000000FFFF,        # 0x2b: writable data, DPL 3, not yet accessed
       6: 0x00AFFA000000FFFF,        # 0x33: 64-bit code
       7: 0x00CF72000000FFFF,        # 0x3b: writable data, not present
       8: 0x00CFF0000000FFFF,        # 0x43: read-only data
       9: 0x0040FA000000FFFF}        # 0x4b: 32-bit code, limit 0xffff bytes
CODE_VA = 0xFFFFFFFF80400000 - 4096  # hand_vcpu: a kernel page of the boot map's padding


def _guest_gdt(hv, dom, v) -> int:
    """Install GDT above through set_gdt (a fresh frame of the domain's): its frame."""
    mfn = hv.mem.alloc(dom.domid)[0]
    for i, d in GDT.items():
        hv.mem.write_u64((mfn << 12) + 8 * i, d)
    descriptors.set_gdt(v, [mfn], 16)
    return mfn


def _iret_frame(v, cs: int, ss: int = 0xE02B, rip: int = USER_CODE_VA, flags: int = 0) -> None:
    """HYPERVISOR_iret from kernel mode to (cs, ss, rip) with the user stack."""
    assert v.user_root and v.kernel_mode
    v.copy_to_guest(DATA_VA, IRET_CONTEXT.pack(0, 0, 0, flags, rip, cs, 0x202,
                                               USER_STACK_TOP - 64, ss))
    v.engine.write({"rsp": DATA_VA})
    traps.do_iret(v)


def _user_code(hv, v, code: bytes) -> bytes:
    """Put `code` at USER_CODE_VA (read-only to the user: written at its machine address);
    returns what was there."""
    ma = hv.pagetables.translate(v.user_root << 12, USER_CODE_VA, False)
    saved = bytes(hv.mem.map[ma:ma + len(code)])
    hv.mem.map[ma:ma + len(code)] = code
    return saved


def _park_handlers(v) -> list:
    """Point the #BP/#UD handlers at `jmp .` (CODE_VA) so that a step ending in a bounce
    runs none of the kernel's handler code; returns the trap table to put back."""
    v.copy_to_guest(CODE_VA, b"\xeb\xfe")
    saved = list(v.trap_table)
    for vec in (3, 6):
        flags, cs, _ = v.trap_table[vec]
        v.trap_table[vec] = (flags, cs, CODE_VA)
    return saved


def _assert_compat(hv, v) -> None:
    """`48 ff c0` twice, stepped one instruction at a time: in compatibility mode `dec %eax;
    inc %eax` each (4 instructions), in 64-bit mode `inc %rax` (2). Each step leaves the
    guest (KVM: through the #DB stub), so the mode must survive the returns to it too."""
    saved = _user_code(hv, v, b"\x48\xff\xc0" * 2)
    try:
        v.engine.write({"rax": 5})
        got = []
        for end in (USER_CODE_VA + 1, USER_CODE_VA + 3, USER_CODE_VA + 4):
            got.append((v.engine.step_to(end), v.engine.get("rax")))
        assert got == [(True, 4), (True, 5), (True, 4)], "not compatibility mode"
    finally:
        _user_code(hv, v, saved)


def _step_to_bounce(v, end: int) -> None:
    """Step the instruction at RIP, which ends in a bounce (a trap, a SYSCALL): the slice
    stops right after the hypervisor handled it, before any handler code runs."""
    eng = v.engine
    saved = {n: getattr(eng, n) for n in ("on_exception", "on_syscall32", "on_invalid_opcode")}

    def stopping(f):
        return lambda *a: (f(*a), eng.stop())
    for n, f in saved.items():
        setattr(eng, n, stopping(f))
    # No event upcall right after the bounce (the paused kernel has some pending).
    pending = v.pv.info_maddr + VcpuInfo.evtchn_upcall_pending
    was = v.domain.mem.map[pending]
    v.domain.mem.map[pending] = 0
    try:
        eng.step_to(end)
    finally:
        v.domain.mem.map[pending] = was
        for n, f in saved.items():
            setattr(eng, n, f)


def _frame(v, n: int) -> list[int]:
    rsp = v.engine.get("rsp")
    raw = v.copy_from_guest(rsp, 8 * n)
    return [int.from_bytes(raw[8 * i:8 * i + 8], "little") for i in range(n)]


def _back_all(v, trap_table: list | None = None) -> None:
    _back(v)
    descriptors.set_gdt(v, [], 0)
    if trap_table is not None:
        v.trap_table[:] = trap_table


@pytest.mark.parametrize("engine", ENGINES)
async def test_flat_cs32_stays_compat_across_exits(engine):
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        _iret_frame(v, 0xE023)
        try:
            _assert_compat(hv, v)
        finally:
            _back(v)


@pytest.mark.parametrize("engine", ENGINES)
async def test_iret_to_guest_gdt_cs32_is_compat_mode(engine):
    """Xen's IRETQ loads the guest's own 32-bit code segment (and data SS) from its GDT:
    compatibility mode, the selectors in CS/SS, the descriptors marked accessed."""
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        mfn = _guest_gdt(hv, dom, v)
        try:
            _iret_frame(v, 0x23, 0x2B)
            assert not v.kernel_mode
            assert v.engine.read(("cs", "ss")) == [0x23, 0x2B]
            _assert_compat(hv, v)
            for i in (4, 5):
                assert hv.mem.read_u64((mfn << 12) + 8 * i) == GDT[i] | 1 << 40, "accessed bit"
        finally:
            _back_all(v)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("code", [b"\xcc", b"\xcd\x80"], ids=["int3", "int80"])
async def test_compat_fault_frame_and_64bit_kernel(engine, code):
    """An int3 / int $0x80 (a 32-bit process's system call) in compatibility mode (guest CS
    0x23, SS 0x2b) reaches the guest's trap table: Xen's bounce frame records regs->cs/ss as
    they were, RIP past the INT, and the kernel handler runs at FLAT_KERNEL_CS in 64-bit
    mode."""
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        _guest_gdt(hv, dom, v)
        saved, table = None, _park_handlers(v)
        v.trap_table[0x80] = (3, 0xE033, CODE_VA)           # DPL 3, as Linux's
        try:
            _iret_frame(v, 0x23, 0x2B)
            saved = _user_code(hv, v, code + b"\x90")
            _step_to_bounce(v, USER_CODE_VA + len(code))
            assert v.kernel_mode and v.engine.get("rip") == CODE_VA
            rcx, r11, rip, cs, rflags, rsp, ss = _frame(v, 7)
            assert (rip, cs & 0xFFFF, ss) == (USER_CODE_VA + len(code), 0x23, 0x2B)
            assert v.engine.read(("cs", "ss")) == [0xE033, 0xE02B]
            # 64-bit again: `48 ff c0` is one `inc %rax`.
            v.copy_to_guest(CODE_VA, b"\x48\xff\xc0\xeb\xfe")
            v.engine.write({"rip": CODE_VA, "rax": 5})
            assert (v.engine.step_to(CODE_VA + 3), v.engine.get("rax")) == (True, 6)
        finally:
            if saved is not None:
                _user_code(hv, v, saved)
            _back_all(v, table)


BAD_SS = [(0x0000, 13, 0),            # null with RPL 3: #GP(0)
          (0x1233, 13, 0x1230),       # beyond the GDT limit
          (0xE033, 13, 0xE030),       # a code segment
          (0x0043, 13, 0x0040),       # read-only data
          (0x003B, 12, 0x0038)]       # not present: #SS


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("ss,vector,error", BAD_SS)
async def test_iret_bad_ss_is_the_guests_fault(engine, ss, vector, error):
    """Xen: regs->ss = frame.ss | 3; the IRETQ refuses it and entry.S replays the fault as
    the guest's, the bounce frame holding the iret's RIP, CS and the refused SS."""
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        _guest_gdt(hv, dom, v)
        try:
            _iret_frame(v, 0xE033, ss)
            assert v.kernel_mode
            assert v.engine.get("rip") == v.trap_table[vector][2]
            rcx, r11, err, rip, cs, rflags, rsp, fss = _frame(v, 8)
            assert (err, rip, cs & 0xFFFF, fss) == (error, USER_CODE_VA, 0xE033, ss | 3)
            assert v.engine.read(("cs", "ss")) == [0xE033, 0xE02B]
        finally:
            _back_all(v)


@pytest.mark.parametrize("engine", ENGINES)
async def test_iret_guest_ss_in_later_frames(engine):
    """A usable SS from the frame is loaded (Linux's __USER_DS 0x2b): a later fault's frame
    records it (create_bounce_frame stores regs->ss)."""
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        _guest_gdt(hv, dom, v)
        saved, table = None, _park_handlers(v)
        try:
            _iret_frame(v, 0x33, 0x2B)
            assert v.engine.read(("cs", "ss")) == [0x33, 0x2B]
            saved = _user_code(hv, v, b"\xcc\x90")
            _step_to_bounce(v, USER_CODE_VA + 1)
            assert v.kernel_mode and v.engine.get("rip") == CODE_VA
            rcx, r11, rip, cs, rflags, rsp, ss = _frame(v, 7)
            assert (rip, cs & 0xFFFF, ss) == (USER_CODE_VA + 1, 0x33, 0x2B)
        finally:
            if saved is not None:
                _user_code(hv, v, saved)
            _back_all(v, table)


@pytest.mark.parametrize("engine", ENGINES)
async def test_compat_rip_beyond_cs_limit(engine):
    """IRETQ to compatibility mode checks RIP against the CS limit: #GP(0)."""
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        _guest_gdt(hv, dom, v)
        try:
            _iret_frame(v, 0x4B, 0x2B)
            assert v.kernel_mode and v.engine.get("rip") == v.trap_table[13][2]
            rcx, r11, err, rip, cs, rflags, rsp, ss = _frame(v, 8)
            assert (err, rip, cs & 0xFFFF, ss) == (0, USER_CODE_VA, 0x4B, 0x2B)
        finally:
            _back_all(v)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cs,loaded", [(0x1233, 0xE033), (0xE023, 0xE023), (0x23, 0xE033)])
async def test_iret_in_syscall_takes_selectors_from_star(engine, cs, loaded):
    """VGCF_in_syscall with a canonical RIP: Xen leaves through SYSRET, whose CS/SS come
    from MSR_STAR (sysretl only for regs->cs == FLAT_USER_CS32): the frame's selectors are
    not checked, a bad SS or CS is no fault."""
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        _guest_gdt(hv, dom, v)
        try:
            _iret_frame(v, cs, 0x1233, flags=0x100)
            assert not v.kernel_mode
            assert v.engine.read(("rip", "cs", "ss")) == [USER_CODE_VA, loaded, 0xE02B]
        finally:
            _back_all(v)


@pytest.mark.parametrize("engine", ENGINES)
async def test_iret_in_syscall_to_cs32_truncates_rip(engine):
    """VGCF_in_syscall to FLAT_RING3_CS32 with a canonical RIP above 4 GiB: Xen leaves
    through SYSRETL, which loads EIP = ECX (zero-extended), not an IRETQ that would check
    the limit. So the guest resumes in compatibility mode at the low 32 bits; RCX keeps
    the whole RIP (restore_all_guest loaded it). No engine is entered in compatibility
    mode with a RIP above 32 bits (the IRETQ path's rule: test_iret_bad_cs_is_the_guests_gp)."""
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        for high in ((1 << 32) + USER_CODE_VA, 0xFFFF_FFFF_0000_0000 + USER_CODE_VA):
            _iret_frame(v, 0xE023, flags=0x100, rip=high)
            try:
                assert not v.kernel_mode
                assert v.engine.read(("rip", "cs", "ss", "rcx")) == [
                    USER_CODE_VA, 0xE023, 0xE02B, high]
            finally:
                _back_all(v)


@pytest.mark.parametrize("engine", ENGINES)
async def test_compat_syscall_goes_to_syscall32(engine):
    """SYSCALL in compatibility mode (Xen's cstar_enter -> switch_to_kernel): the
    CALLBACKTYPE_syscall32 callback, frame [rcx r11 rip cs rflags rsp ss] with
    FLAT_USER_CS32/SS32, RCX the return address; the kernel in 64-bit mode."""
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        _guest_gdt(hv, dom, v)
        before = dict(v.callbacks)
        saved = None
        try:
            v.copy_to_guest(CODE_VA, b"\xeb\xfe")
            v.set_callback(CallbackType.syscall32, (CODE_VA, 0))
            _iret_frame(v, 0x23, 0x2B)
            saved = _user_code(hv, v, b"\x0f\x05\x90")
            _step_to_bounce(v, USER_CODE_VA + 2)
            assert v.kernel_mode and v.engine.get("rip") == CODE_VA
            rcx, r11, rip, cs, rflags, rsp, ss = _frame(v, 7)
            assert (rcx, rip, cs & 0xFFFF, ss) == (USER_CODE_VA + 2,) * 2 + (0xE023, 0xE02B)
            assert v.engine.read(("cs", "ss")) == [0xE033, 0xE02B]
        finally:
            if saved is not None:
                _user_code(hv, v, saved)
            v.set_callback(CallbackType.syscall32, before.get(CallbackType.syscall32))
            _back_all(v)


@pytest.mark.parametrize("engine", ENGINES)
async def test_compat_syscall_without_callback_is_ud(engine):
    """No syscall32 callback: Xen's switch_to_kernel bounces the guest's #UD at the SYSCALL
    (RIP - 2), the frame's CS FLAT_USER_CS32 (never the 64-bit syscall callback)."""
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        _guest_gdt(hv, dom, v)
        before = dict(v.callbacks)
        saved, table = None, _park_handlers(v)
        try:
            v.set_callback(CallbackType.syscall32, None)
            _iret_frame(v, 0x23, 0x2B)
            saved = _user_code(hv, v, b"\x0f\x05\x90")
            _step_to_bounce(v, USER_CODE_VA + 2)
            assert v.kernel_mode and v.engine.get("rip") == CODE_VA
            rcx, r11, rip, cs, rflags, rsp, ss = _frame(v, 7)
            assert (rip, cs & 0xFFFF, ss) == (USER_CODE_VA, 0xE023, 0xE02B)
        finally:
            if saved is not None:
                _user_code(hv, v, saved)
            v.set_callback(CallbackType.syscall32, before.get(CallbackType.syscall32))
            _back_all(v, table)


@KVM_ONLY
async def test_compat_syscall_never_runs_guest_code_in_ring0():
    """A compat-mode SYSCALL must reach the syscall32 callback (or the guest's #UD) and
    nothing else. Measured on kvm-pvm with the host's (AMD) CPUID vendor: the CPU continued
    in ring 0 at CSTAR & 0xffffffff, and a guest can map code there (any VA below 4 GiB is
    its own). Here the user program's code page stands for it (CSTAR's low half pointed at
    it), holding `mov %cr3,%rax; out %al,$0x77`: it must never run (kvm_engine._PVM_VENDOR)."""
    from aiovmm import kvm_engine
    async with hand_driven_vcpu(REGS, "kvm") as (hv, dom, v):
        eng = v.engine
        ran_ring0 = []
        saved = None
        on_io = eng.on_port_io
        eng.on_port_io = lambda port, size, write, value: (
            ran_ring0.append(eng.read(("cs", "rax"))) if port == 0x77 else None, on_io(port, size, write, value))[1]
        eng._msrs([(kvm_engine.MSR_CSTAR, (eng.r0.syscall32_va & ~0xFFFFFFFF) | (USER_CODE_VA + 16))])
        before = dict(v.callbacks)
        try:
            v.copy_to_guest(CODE_VA, b"\xeb\xfe")
            v.set_callback(CallbackType.syscall32, (CODE_VA, 0))
            _iret_frame(v, 0xE023, 0xE02B)
            saved = _user_code(hv, v, b"\x0f\x05" + b"\x90" * 14 + b"\x0f\x20\xd8\xe6\x77\xf4")
            pending = v.domain.mem.map[v.pv.info_maddr]
            v.domain.mem.map[v.pv.info_maddr] = 0
            v.upcall_mask = 1
            eng.run(1, 20_000_000)
            v.domain.mem.map[v.pv.info_maddr] = pending
            assert not ran_ring0, f"guest code ran in ring 0: CS, RAX(CR3) = {ran_ring0}"
            assert v.kernel_mode and eng.get("rip") == CODE_VA, "not the syscall32 callback"
        finally:
            v.set_callback(CallbackType.syscall32, before.get(CallbackType.syscall32))
            eng.on_port_io = on_io
            eng._msrs([(kvm_engine.MSR_CSTAR, eng.r0.syscall32_va)])
            if saved is not None:
                _user_code(hv, v, saved)
            v.upcall_mask = 0
            _back(v)


@pytest.mark.parametrize("engine", ENGINES)
async def test_native_far_return_to_guest_cs32_survives_exits(engine):
    """The guest's user code switches to its own 32-bit code segment itself (lretq to 0x23,
    no hypercall): every later exit to the hypervisor and back (here each single step)
    must return it to that segment as the CPU left it, compatibility mode included."""
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        _guest_gdt(hv, dom, v)
        saved = None
        try:
            _iret_frame(v, 0xE033, 0xE02B)
            target = USER_CODE_VA + 12
            saved = _user_code(hv, v, b"\x68\x23\x00\x00\x00\x68" + target.to_bytes(4, "little")
                               + b"\x48\xcb" + b"\x48\xff\xc0" * 2)
            assert v.engine.step_to(USER_CODE_VA + 5) and v.engine.step_to(USER_CODE_VA + 10)
            assert v.engine.step_to(target), "lretq"
            v.engine.write({"rax": 5})
            got = [(v.engine.step_to(end), v.engine.get("rax"))
                   for end in (target + 1, target + 3, target + 4)]
            assert got == [(True, 4), (True, 5), (True, 4)], "not compatibility mode"
            assert v.engine.read(("cs", "ss")) == [0x23, 0xE02B]
        finally:
            if saved is not None:
                _user_code(hv, v, saved)
            _back_all(v)


@pytest.mark.skipif(_kvm_skip_reason() is not None, reason=str(_kvm_skip_reason()))
@pytest.mark.parametrize("new", [0x0000_0000_0000_FFFF,   # not present, DPL 0, system type 0
                                 0x0000_0E00_0000_FFFF,   # not present, DPL 0, type 0xe
                                 0x00CF_F200_0000_FFFF])  # present data segment, DPL 3
async def test_kvm_cpl3_return_never_takes_a_descriptor_changed_since_the_load(new):
    """A vCPU whose CS is one of its own GDT selectors that the engine did not load itself
    (the C fast iret, the guest's own far transfer: KVMEngine keeps no hidden part for it)
    gets CS back after each exit through a ring-0 stub from the descriptor read again
    (`_back_to_cpl3`). The guest may have rewritten that entry since (update_descriptor: a
    not-present descriptor is stored as given, DPL 0 and a system type included): the CPU
    keeps the hidden part it loaded and never loads one its checks refuse. The re-read
    descriptor is taken only if the IRETQ's checks accept it (descriptors.iret_code_segment);
    never a CS with DPL below 3, not present, or not code."""
    from aiovmm.kvm_engine import _SEG
    async with hand_driven_vcpu(REGS, "kvm") as (hv, dom, v):
        mfn = _guest_gdt(hv, dom, v)
        try:
            eng = v.engine
            eng.set("cs", 0x33)              # the selector only, as a load the engine did not make
            descriptors.do_update_descriptor(v, (mfn << 12) + 8 * 6, new)
            assert hv.mem.read_u64((mfn << 12) + 8 * 6) == new     # stored as given
            eng._back_to_cpl3(0x33, 0xE02B)
            img = bytes(eng._sregs[_SEG["cs"]:_SEG["cs"] + 24])
            typ, present, dpl, s = img[14], img[15], img[16], img[18]
            assert (present, dpl, s) == (1, 3, 1) and typ & 8, (
                f"CS hidden part: type {typ:#x} present {present} dpl {dpl} s {s}")
        finally:
            _back_all(v)


class _Process:
    """A user process at 0x33 of the guest's own GDT (one frame) on a hand-driven KVM vCPU,
    its code `in $0x80,%al; jmp .`, entered by HYPERVISOR_iret on the C or Python path
    (tests/test_redteam_kvm_fast.py _Driver); `close` puts everything back."""

    def __init__(self, hv, dom, v) -> None:
        from test_redteam_kvm_fast import _Driver
        self.d = d = _Driver(hv, v)
        self.v, self.eng, self.mem = v, d.eng, hv.mem
        self.gdt = self.mem.alloc(dom.domid)[0]
        self.code_ma = hv.pagetables.translate(v.user_root << 12, USER_CODE_VA, False)
        self.saved_code = bytes(self.mem.map[self.code_ma:self.code_ma + 4])
        self.saved_info = bytes(self.mem.map[d.pending:d.pending + 2])
        self.mem.map[self.code_ma:self.code_ma + 4] = b"\xe4\x80\xeb\xfe"
        descriptors.set_gdt(v, [self.gdt], 16)

    def entry(self, desc: int) -> None:
        descriptors.do_update_descriptor(self.v, (self.gdt << 12) + 0x30, desc)

    def iret(self, fast: bool, ss: int = 0xE02B) -> int:
        from aiovmm.abi import IRET_CONTEXT
        at = self.d.data_va + 0x800
        self.mem.map[self.d.pending] = 0
        self.v.copy_to_guest(at, IRET_CONTEXT.pack(7, 8, 9, 0, USER_CODE_VA, 0x33, 0x202,
                                                    USER_STACK_TOP - 64, ss))
        return self.d.hypercall(23, fast, rsp=at)

    def c_iret_then_in(self, between=None) -> bytes:
        """C's iret to the process, `between()`, then its `in` (virtual IOPL 3) emulated,
        which returns to it through `_back_to_cpl3`: the CS image it runs on with."""
        from aiovmm.kvm_engine import _SEG
        eng = self.eng
        self.v.iopl = 3
        done = eng._ctx.fast_calls[2]
        self.iret(True)                           # C's iret, then the `in`'s #GP exit
        assert eng._ctx.fast_calls[2] == done + 1
        if between is not None:
            between()
        assert eng._handle_exit()                 # the `in` emulated: back to the process
        assert not self.v.kernel_mode and eng.get("rip") == USER_CODE_VA + 2
        return bytes(eng._sregs[_SEG["cs"]:_SEG["cs"] + 24])

    def close(self) -> None:
        self.v.iopl = 0
        _back(self.v)
        descriptors.set_gdt(self.v, [], 0)
        self.mem.free([self.gdt])
        self.mem.map[self.code_ma:self.code_ma + 4] = self.saved_code
        self.mem.map[self.d.pending:self.d.pending + 2] = self.saved_info


@pytest.mark.skipif(_kvm_skip_reason() is not None, reason=str(_kvm_skip_reason()))
@pytest.mark.parametrize("new", [0x0000_0000_0000_FFFF,   # not present, DPL 0, system type 0
                                 0x00CF_F200_0000_FFFF])  # present data segment, DPL 3
async def test_kvm_c_iret_then_a_rewritten_entry_never_becomes_the_running_cs(new):
    """The same through the guest's own path: the C fast iret (csrc/kvm.c fast_iret) puts a
    user process at 0x33 of the guest's GDT; the entry is rewritten (update_descriptor, as
    another vCPU sharing the frame may do while the process runs); the process's `in`
    (virtual IOPL 3) is emulated and returns to it through `_back_to_cpl3`. Measured
    without the fix: the process ran on with CS type 0/P 0/DPL 0 (the next entry ended in a
    ring-0 stub) or with a data segment as CS. With it: Xen's flat 64-bit CS image."""
    from aiovmm.kvm_engine import _CS64
    from test_kvm import _hand_driven_vcpu
    from test_kvm_iret_gdt import LOOK, _desc
    async with _hand_driven_vcpu(LOOK + ("rdi", "rsi")) as (hv, dom, v):
        p = _Process(hv, dom, v)
        try:
            p.entry(_desc())
            assert p.iret(False) == 3                 # the first to user mode: Python's
            traps.do_iret(v)
            p.d.run()
            _back(v)
            img = p.c_iret_then_in(lambda: p.entry(new))
            assert img[14:] == _CS64[14:]
        finally:
            p.close()


@pytest.mark.skipif(_kvm_skip_reason() is not None, reason=str(_kvm_skip_reason()))
async def test_kvm_c_iret_load_is_the_hidden_part_kept_across_exits():
    """A selector the engine loaded before (Python's iret to 0x33 as a 32-bit code
    segment) and the guest's later C fast iret to the same selector after it made 0x33 a
    64-bit code segment: the process runs 64-bit, and after an exit that returns to it
    (its `in`, emulated with virtual IOPL 3) it still does. Without C's image handed to the
    engine (kvm.c cpl3_cs), `_back_to_cpl3` gave back the older load's hidden part: the
    process was switched to compatibility mode by an exit."""
    from test_kvm import _hand_driven_vcpu
    from test_kvm_iret_gdt import LOOK, _desc
    async with _hand_driven_vcpu(LOOK + ("rdi", "rsi")) as (hv, dom, v):
        p = _Process(hv, dom, v)
        try:
            p.entry(_desc(l=0, d=1))                  # 32-bit code
            assert p.iret(False) == 3
            traps.do_iret(v)                          # Python's load: compatibility mode
            p.d.run()
            # Back in the kernel without a segment load of Python's (as C's bounce of a
            # user syscall does: the engine's CS cache still names 0x33).
            v.switch_to_kernel()
            p.entry(_desc())                          # 64-bit code
            img = p.c_iret_then_in()
            assert (img[12:14], img[17], img[19]) == (b"\x33\x00", 0, 1), "not 64-bit mode"
        finally:
            p.close()


@pytest.mark.skipif(_kvm_skip_reason() is not None, reason=str(_kvm_skip_reason()))
async def test_kvm_c_iret_to_the_guests_user_ds_loads_it_as_python_does():
    """Linux returns to its processes with HYPERVISOR_iret frames naming its own GDT's
    __USER_CS (0x33) and __USER_DS (0x2b). C's fast iret (csrc/kvm.c iret_ss) completes
    it and loads SS as Python's traps.do_iret does (descriptors.iret_stack_segment, the
    accessed bit set): the process runs on, through an exit back to it (its `in`,
    emulated), with the same CS and SS images as after Python's iret. Measured without it: every such iret went to
    Python (bench/net_exits.py --census: 2.2 per UDP round trip, ~23 per MiB of TCP)."""
    from aiovmm.kvm_engine import _SEG
    from test_kvm import _hand_driven_vcpu
    from test_kvm_iret_gdt import LOOK, _desc
    user_ds = 0x00CF_F200_0000_FFFF                   # present writable data, DPL 3, not accessed
    async with _hand_driven_vcpu(LOOK + ("rdi", "rsi")) as (hv, dom, v):
        p = _Process(hv, dom, v)
        eng = p.eng
        ds_ma = (p.gdt << 12) + 0x28
        try:
            p.entry(_desc())
            descriptors.do_update_descriptor(v, ds_ma, user_ds)
            assert p.iret(False, ss=0x2B) == 3            # Python's
            traps.do_iret(v)
            py = bytes(eng._sregs[:24]), bytes(eng._sregs[_SEG["ss"]:_SEG["ss"] + 24])
            assert eng.read(("cs", "ss")) == [0x33, 0x2B]
            p.d.run()
            _back(v)
            descriptors.do_update_descriptor(v, ds_ma, user_ds)     # accessed bit clear again
            v.iopl = 3
            done = eng._ctx.fast_calls[2]
            p.iret(True, ss=0x2B)                         # C's, then the `in`'s #GP exit
            assert eng._ctx.fast_calls[2] == done + 1, "C left the iret to Python"
            assert hv.mem.read_u64(ds_ma) == user_ds | 1 << 40        # accessed
            assert eng._handle_exit()                     # the `in` emulated: back to the process
            assert not v.kernel_mode and eng.get("rip") == USER_CODE_VA + 2
            c = bytes(eng._sregs[:24]), bytes(eng._sregs[_SEG["ss"]:_SEG["ss"] + 24])
            assert c == py
        finally:
            p.close()
