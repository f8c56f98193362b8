"""Red-team: the KVM engine's call-gate check read machine memory the guest named.

kvm-pvm raises #UD for a far call/jmp through a call gate; the engine re-decodes the
instruction to give the guest the #GP(selector) a CPU (and Xen, whose gates are stored with
DPL 0) gives (kvm_engine._far_transfer_gate). It recomputed the far pointer's address from
the 64-bit registers in 64-bit decoding and read the selector through the page tables with
no CPL-3 check. In compatibility mode the CPU takes the address from the low 32 bits (EAX);
the upper half of RAX is kept and is the guest's (HYPERVISOR_iret loads the whole RAX). A
guest with a far pointer at a low address of its own and RAX = the engine's supervisor
direct map + that address had the engine read two bytes of any machine frame (another
guest's, Xen's) as a selector; with every entry of its GDT a call gate, the #GP's error code
was that selector: 14 bits of any machine address per probe.

Now the far pointer is read only where the CPU read it: the effective address in the
instruction's address size, through a walk that requires user access (else the #UD stays
the guest's, as from any instruction the engine cannot place)."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
from types import SimpleNamespace

import pytest

from aiovmm import Hypervisor, descriptors, mmu_ops, traps
from aiovmm.abi import IRET_CONTEXT, VcpuInfo
from aiovmm.memory import PageType
from aiovmm.mmu import XEN_GDT
from conftest import HV_MEMORY_MIB, _kvm_skip_reason, kernel

pytestmark = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=str(_kvm_skip_reason()))

DATA_VA = 0xFFFFFFFF80400000 - 2 * 4096          # hand_vcpu: padding pages of the boot map
USER_CODE_VA, USER_STACK_TOP = 0x400000, 0x403000
F = 0x000FFFFFFFFFF000
GATE = (0x33 << 16) | (0xEC00 << 32)            # 64-bit call gate to 0x33, DPL 3 (stored DPL 0)
OWN_SEL = 0x0AB8                                # the selector in the guest's own far pointer


def _update(v, ptr: int, val: int) -> None:       # the guest's own mmu_update
    v.copy_to_guest(DATA_VA + 0x100, struct.pack("<QQ", ptr, val))
    assert mmu_ops.do_mmu_update(v, DATA_VA + 0x100, 1, 0, 0x7FF0) == 0


TARGET = 0x500100                               # the guest's low address (its own page)


@contextlib.asynccontextmanager
async def _guest_and_bystander():
    """The hostile guest, then a bystander, both paused; the guest's vCPU hand-driven. The
    engine's direct map (2 MiB pages) was walked as if of 4 KiB pages: the first frame of
    each 2 MiB region read as an L1. Machine frame 0x400 (2 MiB aligned) is a data frame of
    the guest's own: its entry 0x100 names a frame of the bystander, so dmap_va + TARGET
    (low 32 bits: TARGET) reads that frame at TARGET's offset. Yields a namespace (hv, dom,
    v, mem, victim: the bystander's frame, rax: dmap_va + TARGET, page: the guest's frame
    mapped at TARGET with `map_target(flags)`); the bystander's frame is checked unchanged."""
    from aiovmm.kvm_engine import ring0
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine="kvm") as hv:
        dom = await hv.create(kernel(), memory_mib=8, cmdline="ticks=1 spin=0", name="evil")
        await dom.wait_for_line(r"^spin 1$", timeout=30)
        by = await hv.create(kernel(), memory_mib=8, cmdline="ticks=1 spin=0", name="by")
        await by.wait_for_line(r"^spin 1$", timeout=30)
        by.paused = dom.paused = True
        await asyncio.sleep(0.05)
        v, mem, rd = dom.vcpus[0], hv.mem, hv.mem.read_u64
        own = 0x400
        assert mem.owner[own] == dom.domid and (mem.type_count[own] == 0
                                                or mem.type[own] == PageType.writable)
        victim = max(m for m in range(mem.nr_frames) if mem.owner[m] == by.domid
                     and mem.type_count[m] == 0)
        saved_own = bytes(mem.map[(own << 12) + 0x800:(own << 12) + 0x808])
        mem.write_u64((own << 12) + 8 * 0x100, (victim << 12) | 1)
        page = mem.alloc(dom.domid)[0]
        dom.frames.add(page)
        l3 = rd((v.user_root << 12) + 8 * ((TARGET >> 39) & 511)) & F
        l2 = rd(l3 + 8 * ((TARGET >> 30) & 511)) & F
        assert (TARGET >> 21) == (USER_CODE_VA >> 21), "not in the program's L1"
        slot = (rd(l2 + 8 * ((TARGET >> 21) & 511)) & F) + 8 * ((TARGET >> 12) & 511)
        assert not rd(slot) & 1
        code_ma = hv.pagetables.translate(v.user_root << 12, USER_CODE_VA, False)
        saved_code = bytes(mem.map[code_ma:code_ma + 16])
        ns = SimpleNamespace(hv=hv, dom=dom, v=v, mem=mem, victim=victim, page=page,
                             rax=ring0(hv.xen).dmap_va + TARGET, code_ma=code_ma)
        ns.map_target = lambda flags: _update(v, slot, (page << 12) | flags)
        assert ns.rax & 0xFFFFFFFF == TARGET
        try:
            yield ns
        finally:
            v.pending_trap = None
            if not v.kernel_mode:
                v.switch_to_kernel()
            traps.load_segments(v, 0xE033, XEN_GDT[0xE033], 0xE02B, XEN_GDT[0xE02B])
            mem.map[code_ma:code_ma + 16] = saved_code
            _update(v, slot, 0)
            mem.map[(own << 12) + 0x800:(own << 12) + 0x808] = saved_own


def _enter_compat(g, code: bytes, **regs: int) -> None:
    """The guest's user code `code`, entered in compatibility mode (HYPERVISOR_iret to
    FLAT_RING3_CS32, RAX = g.rax: its upper half is the guest's) with `regs`."""
    v = g.v
    g.mem.map[g.code_ma:g.code_ma + len(code)] = code
    v.copy_to_guest(DATA_VA, IRET_CONTEXT.pack(g.rax, 0, 0, 0, USER_CODE_VA, 0xE023,
                                               0x202, USER_STACK_TOP - 64, 0xE02B))
    v.engine.write({"rsp": DATA_VA})
    traps.do_iret(v)
    v.engine.write(regs)
    assert v.engine.get("cs") == 0xE023 and v.engine.get("rax") == g.rax


def _victim_hash(g) -> str:
    return hashlib.sha256(bytes(g.mem.map[g.victim << 12:(g.victim + 1) << 12])).hexdigest()


async def test_far_gate_check_never_reads_memory_the_guest_cannot():
    from test_kvm import kvm_run_once
    async with _guest_and_bystander() as g:
        mem, v, eng = g.mem, g.v, g.v.engine
        secret = 0x0123 << 3 | 3                       # GDT index 0x123: a call gate below
        at = (g.victim << 12) + (TARGET & 0xFFF) + 4
        mem.map[at:at + 2] = struct.pack("<H", secret)
        before = _victim_hash(g)
        # The guest's GDT: every entry of its first page a call gate (all accepted, DPL 0).
        gdt = mem.alloc(g.dom.domid)[0]
        g.dom.frames.add(gdt)
        for i in range(1, 512):
            mem.write_u64((gdt << 12) + 8 * i, GATE)
        descriptors.set_gdt(v, [gdt], 512)
        # Its far pointer at TARGET (read-only), with a call-gate selector: the CPU's read
        # gives kvm-pvm's #UD.
        mem.write_u64((g.page << 12) + (TARGET & 0xFFF), OWN_SEL << 32)
        g.map_target(0x25)                           # present, user, accessed
        seen = []
        on_exc, on_ud = eng.on_exception, eng.on_invalid_opcode
        eng.on_exception = lambda vec, err, cr2: seen.append((vec, err))
        eng.on_invalid_opcode = lambda: seen.append((6, 0))
        try:
            _enter_compat(g, b"\xff\x28")                 # ljmp *(%eax)
            mem.map[v.info_maddr + VcpuInfo.evtchn_upcall_pending] = 0
            kvm_run_once(eng, False)
            eng._handle_exit()
        finally:
            eng.on_exception, eng.on_invalid_opcode = on_exc, on_ud
            descriptors.set_gdt(v, [], 0)
        assert seen, "no exit reported"
        assert seen[0] != (13, secret & ~3), "the engine read the bystander's frame"
        assert seen[0] == (13, OWN_SEL), seen        # the CPU's own selector
        assert _victim_hash(g) == before


async def test_refused_ins_never_stores_memory_the_guest_cannot_read():
    """The same upper half of a register through a refused INS: kvm-pvm exits with RIP on a
    `rep insb` to a port of the TSS bitmap (PIT: _DIRECT_PORTS) before storing anything, and
    stores the exit's data area at ES:EDI when the exit completes; for a port the policy
    refuses, the engine (_string_io) filled that area with what the destination holds, read
    at the 64-bit RDI: in compatibility mode the bytes of another machine address landed in
    the guest's own page at EDI. Now read where KVM stores (ES base + EDI in compatibility
    mode, at CPL 3); the guest gets its #GP(0) and its page holds what it held."""
    from test_kvm import kvm_run_once
    async with _guest_and_bystander() as g:
        mem, v, eng = g.mem, g.v, g.v.engine
        secret = b"BYSTANDR"
        at = (g.victim << 12) + (TARGET & 0xFFF)
        mem.map[at:at + 8] = secret
        before = _victim_hash(g)
        g.map_target(0x67)                           # INS's destination: user writable
        # mov $0xe02b,%ax; mov %eax,%es (Xen's flat user data); rep insb (%dx),%es:(%edi)
        _enter_compat(g, b"\x66\xb8\x2b\xe0\x8e\xc0\xf3\x6c\xeb\xfe",
                      rdi=g.rax, rcx=8, rdx=0x40)
        for _ in range(8):
            mem.map[v.info_maddr + VcpuInfo.evtchn_upcall_pending] = 0
            kvm_run_once(eng, False)
            eng._handle_exit()
            if v.pending_trap is not None:
                break
        assert v.pending_trap == (13, 0, USER_CODE_VA + 6), v.pending_trap   # the #GP(0)
        got = bytes(mem.map[(g.page << 12) + (TARGET & 0xFFF):][:8])
        assert got != secret, "the bystander's bytes were stored in the guest's page"
        assert got == bytes(8)
        assert _victim_hash(g) == before
