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
import hashlib
import struct

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


async def test_far_gate_check_never_reads_memory_the_guest_cannot():
    from test_kvm import kvm_run_once
    from aiovmm.kvm_engine import ring0
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine="kvm") as hv:
        dom = await hv.create(kernel(), memory_mib=8, cmdline="ticks=1 spin=0", name="evil")
        await dom.wait_for_line(r"^spin 1$", timeout=30)
        by = await hv.create(kernel(), memory_mib=8, cmdline="ticks=1 spin=0", name="by")
        await by.wait_for_line(r"^spin 1$", timeout=30)
        by.paused = dom.paused = True
        await asyncio.sleep(0.05)
        v, mem, rd = dom.vcpus[0], hv.mem, hv.mem.read_u64
        eng = v.engine
        # The engine's direct map (2 MiB pages) walked as if of 4 KiB pages: the first frame
        # of each 2 MiB region is read as an L1 table. Machine frame 0x400 (2 MiB aligned)
        # is a data frame of the guest's own: its entry 0x100 names the bystander's frame,
        # so dmap_va + 0x500000 + off is read from that frame.
        own = 0x400
        assert mem.owner[own] == dom.domid and mem.type_count[own] == 0 or \
            mem.type[own] == PageType.writable
        victim = max(m for m in range(mem.nr_frames) if mem.owner[m] == by.domid
                     and mem.type_count[m] == 0)
        saved_own = bytes(mem.map[(own << 12) + 0x800:(own << 12) + 0x808])
        mem.write_u64((own << 12) + 8 * 0x100, (victim << 12) | 1)
        target = 0x500100
        secret = 0x0123 << 3 | 3                       # GDT index 0x123: a call gate below
        mem.map[(victim << 12) + 0x104:(victim << 12) + 0x106] = struct.pack("<H", secret)
        by_hash = hashlib.sha256(bytes(mem.map[victim << 12:(victim + 1) << 12])).hexdigest()
        # The guest's GDT: every entry of its first page a call gate (all accepted, DPL 0).
        gdt = mem.alloc(dom.domid)[0]
        dom.frames.add(gdt)
        for i in range(1, 512):
            mem.write_u64((gdt << 12) + 8 * i, GATE)
        descriptors.set_gdt(v, [gdt], 512)
        # Its far pointer at the low address `target`: a frame of its own mapped there, user
        # readable, with a call-gate selector (the CPU's read: #UD from kvm-pvm).
        page = mem.alloc(dom.domid)[0]
        dom.frames.add(page)
        mem.write_u64((page << 12) + 0x100, OWN_SEL << 32)
        l3 = rd((v.user_root << 12) + 8 * ((target >> 39) & 511)) & F
        l2 = rd(l3 + 8 * ((target >> 30) & 511)) & F
        assert (target >> 21) == (USER_CODE_VA >> 21), "not in the program's L1"
        l1 = rd(l2 + 8 * ((target >> 21) & 511)) & F
        slot = l1 + 8 * ((target >> 12) & 511)
        assert not rd(slot) & 1
        _update(v, slot, (page << 12) | 0x25)             # present, user, accessed; read-only
        code_ma = hv.pagetables.translate(v.user_root << 12, USER_CODE_VA, False)
        saved_code = bytes(mem.map[code_ma:code_ma + 2])
        mem.map[code_ma:code_ma + 2] = b"\xff\x28"         # ljmp *(%eax)
        pending = v.info_maddr + VcpuInfo.evtchn_upcall_pending
        seen = []
        on_exc = eng.on_exception
        eng.on_exception = lambda vec, err, cr2: seen.append((vec, err))
        on_ud = eng.on_invalid_opcode
        eng.on_invalid_opcode = lambda: seen.append((6, 0))
        try:
            rax = ring0(hv.xen).dmap_va + target             # low 32 bits: `target`
            assert rax & 0xFFFFFFFF == target
            v.copy_to_guest(DATA_VA, IRET_CONTEXT.pack(rax, 0, 0, 0, USER_CODE_VA, 0xE023,
                                                       0x202, USER_STACK_TOP - 64, 0xE02B))
            eng.write({"rsp": DATA_VA})
            traps.do_iret(v)
            assert eng.get("cs") == 0xE023 and eng.get("rax") == rax
            mem.map[pending] = 0
            kvm_run_once(eng, False)
            eng._handle_exit()
            assert seen, "no exit reported"
            vec, err = seen[0]
            assert (vec, err) != (13, secret & ~3), "the engine read the bystander's frame"
            assert (vec, err) == (13, OWN_SEL), (vec, hex(err))   # the CPU's own selector
        finally:
            eng.on_exception, eng.on_invalid_opcode = on_exc, on_ud
            if not v.kernel_mode:
                v.switch_to_kernel()
            traps.load_segments(v, 0xE033, XEN_GDT[0xE033], 0xE02B, XEN_GDT[0xE02B])
            mem.map[code_ma:code_ma + 2] = saved_code
            _update(v, slot, 0)
            mem.map[(own << 12) + 0x800:(own << 12) + 0x808] = saved_own
        assert hashlib.sha256(bytes(mem.map[victim << 12:(victim + 1) << 12])).hexdigest() == by_hash


async def test_refused_ins_never_stores_memory_the_guest_cannot_read():
    """The same upper half of a register through a refused INS: kvm-pvm exits with RIP on a
    `rep insb` to a port of the TSS bitmap (PIT: _DIRECT_PORTS) before storing anything, and
    stores the exit's data area at ES:EDI when the exit completes; for a port the policy
    refuses, the engine (_string_io) filled that area with what the destination holds, read
    at the 64-bit RDI: in compatibility mode the bytes of another machine address landed in
    the guest's own page at EDI. Now read where KVM stores (ES base + EDI in compatibility
    mode, at CPL 3); the guest gets its #GP(0) and its page holds what it held."""
    from test_kvm import kvm_run_once
    from aiovmm.kvm_engine import ring0
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine="kvm") as hv:
        dom = await hv.create(kernel(), memory_mib=8, cmdline="ticks=1 spin=0", name="evil")
        await dom.wait_for_line(r"^spin 1$", timeout=30)
        by = await hv.create(kernel(), memory_mib=8, cmdline="ticks=1 spin=0", name="by")
        await by.wait_for_line(r"^spin 1$", timeout=30)
        by.paused = dom.paused = True
        await asyncio.sleep(0.05)
        v, mem, rd = dom.vcpus[0], hv.mem, hv.mem.read_u64
        eng = v.engine
        own = 0x400                    # read as the L1 of dmap_va + 0x400000 (see above)
        assert mem.owner[own] == dom.domid and mem.type_count[own] == 0 or \
            mem.type[own] == PageType.writable
        victim = max(m for m in range(mem.nr_frames) if mem.owner[m] == by.domid
                     and mem.type_count[m] == 0)
        saved_own = bytes(mem.map[(own << 12) + 0x800:(own << 12) + 0x808])
        mem.write_u64((own << 12) + 8 * 0x100, (victim << 12) | 1)
        secret = b"BYSTANDR"
        mem.map[(victim << 12) + 0x100:(victim << 12) + 0x108] = secret
        by_hash = hashlib.sha256(bytes(mem.map[victim << 12:(victim + 1) << 12])).hexdigest()
        # The guest's own page at 0x500000, user writable: INS's destination EDI.
        page = mem.alloc(dom.domid)[0]
        dom.frames.add(page)
        target = 0x500100
        l3 = rd((v.user_root << 12) + 8 * ((target >> 39) & 511)) & F
        l2 = rd(l3 + 8 * ((target >> 30) & 511)) & F
        l1 = rd(l2 + 8 * ((target >> 21) & 511)) & F
        slot = l1 + 8 * ((target >> 12) & 511)
        assert not rd(slot) & 1
        _update(v, slot, (page << 12) | 0x67)             # present, RW, user, A, D
        code_ma = hv.pagetables.translate(v.user_root << 12, USER_CODE_VA, False)
        # mov $0xe02b,%ax; mov %eax,%es (Xen's flat user data); rep insb (%dx),%es:(%edi)
        code = b"\x66\xb8\x2b\xe0\x8e\xc0\xf3\x6c\xeb\xfe"
        saved_code = bytes(mem.map[code_ma:code_ma + len(code)])
        mem.map[code_ma:code_ma + len(code)] = code
        pending = v.info_maddr + VcpuInfo.evtchn_upcall_pending
        try:
            v.copy_to_guest(DATA_VA, IRET_CONTEXT.pack(0, 0, 0, 0, USER_CODE_VA, 0xE023,
                                                       0x202, USER_STACK_TOP - 64, 0xE02B))
            eng.write({"rsp": DATA_VA})
            traps.do_iret(v)
            rdi = ring0(hv.xen).dmap_va + target
            eng.write({"rdi": rdi, "rcx": 8, "rdx": 0x40})
            assert eng.get("cs") == 0xE023
            for _ in range(8):
                mem.map[pending] = 0
                kvm_run_once(eng, False)
                eng._handle_exit()
                if v.pending_trap is not None:
                    break
            assert v.pending_trap == (13, 0, USER_CODE_VA + 6), v.pending_trap   # the #GP(0)
            got = bytes(mem.map[(page << 12) + 0x100:(page << 12) + 0x108])
            assert got != secret, "the bystander's bytes were stored in the guest's page"
            assert got == bytes(8)
        finally:
            v.pending_trap = None
            if not v.kernel_mode:
                v.switch_to_kernel()
            traps.load_segments(v, 0xE033, XEN_GDT[0xE033], 0xE02B, XEN_GDT[0xE02B])
            mem.map[code_ma:code_ma + len(code)] = saved_code
            _update(v, slot, 0)
            mem.map[(own << 12) + 0x800:(own << 12) + 0x808] = saved_own
        assert hashlib.sha256(bytes(mem.map[victim << 12:(victim + 1) << 12])).hexdigest() == by_hash
