#!/usr/bin/env python3
"""kvm-pvm: which guest events this /dev/kvm handles without an exit to user space, and at what cost.

No dependencies beyond Python (run as root). Each probe builds a minimal VM (4 MiB at
guest-physical 0, identity-mapped by 4 KiB user pages, also at 0xffffffff80000000), with its
own GDT (Linux's selectors: ring-0 0x08/0x10, user 0x23/0x2b/0x33, TSS 0x40), an IDT, and a
64-bit TSS with an I/O bitmap for ports 0-255, then runs a loop of N guest events at CPL 3
and counts what reaches the Python loop around KVM_RUN. Every timing is printed next to the
exit floor measured in the same run (N `out` exits from CPL 3), interleaved over --reps.

  pvm_paths.py info            MSR index list, KVM's CPUID leaves 0x4000xxxx, capabilities;
                               CPUID 0x40000000/0x40000100/0x40000200/0x40000201 executed in the
                               guest (plain and PVM's synthetic `invlpg 0xffffffffff4d5650;
                               cpuid`); KVM_GET/SET_MSRS on the PVM MSR ranges
  pvm_paths.py ports           `in $0x61` at CPL 3: no TSS / bitmap open / bitmap closed with
                               ring-0 IDT stubs / bitmap closed with a DPL-3 #GP gate to a CPL-3
                               handler (with and without IST); ioeventfd and coalesced PIO on
                               the port (reads)
  pvm_paths.py events          #UD, int3, int $0x80 at CPL 3 through DPL-3 gates whose target
                               code segment is DPL 3 (handler at CPL 3, iretq back), with and
                               without IST; whether the handler runs natively
  pvm_paths.py ring0           #UD -> ring-0 handler (DPL-0 code: emulated) -> iretq to CPL 3,
                               with 20 extra instructions and with a CR3 reload; a host-started
                               ring-0 stub (the engine's invalidation stub) returning to CPL 3 by
                               iretq vs by an exit and the host setting registers
  pvm_paths.py all             everything above

Last line: key=value pairs (medians, us per event) and load=<1 min load average>.
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import mmap
import os
import statistics
import struct
import sys
import time

KVM_GET_API_VERSION, KVM_CREATE_VM, KVM_CHECK_EXTENSION = 0xAE00, 0xAE01, 0xAE03
KVM_GET_MSR_INDEX_LIST, KVM_GET_SUPPORTED_CPUID, KVM_GET_VCPU_MMAP_SIZE = 0xC004AE02, 0xC008AE05, 0xAE04
KVM_CREATE_VCPU, KVM_RUN, KVM_SET_USER_MEMORY_REGION = 0xAE41, 0xAE80, 0x4020AE46
KVM_GET_REGS, KVM_SET_REGS, KVM_GET_SREGS, KVM_SET_SREGS = 0x8090AE81, 0x4090AE82, 0x8138AE83, 0x4138AE84
KVM_GET_MSRS, KVM_SET_MSRS = 0xC008AE88, 0x4008AE89
KVM_IOEVENTFD = 0x4040AE79
KVM_REGISTER_COALESCED_MMIO = 0x4010AE67
KVM_GET_VCPU_EVENTS = 0x8040AE9F
EXIT_NAMES = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 5: "HLT", 6: "MMIO", 8: "SHUTDOWN", 9: "FAIL_ENTRY",
              10: "INTR", 17: "INTERNAL_ERROR"}
EXIT_IO, EXIT_SHUTDOWN = 2, 8
RAX, RBX, RCX, RDX, RSP, R11, RIP, RFLAGS = 0, 1, 2, 3, 6, 11, 16, 17    # struct kvm_regs

SIZE = 4 << 20
PML4, PDPT, PD, PT0, PDPT_HI = 0x1000, 0x2000, 0x3000, 0x4000, 0x6000
GDT, IDT, TSS = 0x8000, 0x9000, 0xA000
CODE, HANDLERS, R0STUBS = 0x10000, 0x20000, 0x30000
STACK, R0STACK, ISTSTACK = 0x100000, 0x180000, 0x1C0000
DONE_PORT = 0x10
KCS, KDS, UCS32, UDS, UCS, TSS_SEL = 0x08, 0x10, 0x23, 0x2B, 0x33, 0x40
GP, UD, BP = 13, 6, 3

# Handlers (hand-assembled, GNU as syntax in the comments).
GP_FIX_IN = bytes.fromhex("4883c408" "b0ff" "4883042402" "48cf")   # add $8,%rsp; mov $0xff,%al; addq $2,(%rsp); iretq
SKIP2_IRET = bytes.fromhex("4883042402" "48cf")                      # addq $2,(%rsp); iretq
IRET = bytes.fromhex("48cf")                                         # iretq
# The same #GP handler on the IST stack (frame at ISTSTACK-48: error code, RIP, CS, RFLAGS, RSP,
# SS) returning without iretq, so that no selector is loaded:
#   mov $0xff,%al; addq $2,RIP; pushq RFLAGS; popfq; mov RSP,%rsp; jmp *RIP
GP_FIX_IN_NOIRET = bytes.fromhex("b0ff" "48830425d8ff1b0002" "ff3425e8ff1b00" "9d" "488b2425f0ff1b00" "ff2425d8ff1b00")


def spin_iret(n: int, skip: int) -> bytes:
    """mov $n,%rcx; 1: add %rcx,%rax; dec %rcx; jnz 1b; [addq $skip,(%rsp)]; iretq"""
    body = b"\x48\xb9" + struct.pack("<Q", n) + bytes.fromhex("4801c8" "48ffc9" "75f8")
    return body + (bytes.fromhex("48830424") + bytes([skip]) if skip else b"") + IRET


# A ring-0 SYSCALL entry that returns to CPL 3 with iretq on the user stack:
#   [mov %cr3,%rax; mov %rax,%cr3]; K x mov %rax,%rdx; mov %rsp,%rdx; push $0x2b; push %rdx;
#   push %r11; push $0x33; push %rcx; iretq
def ring0_stub(k: int, cr3: bool) -> bytes:
    return ((bytes.fromhex("0f20d8" "0f22d8") if cr3 else b"") + bytes.fromhex("4889c2") * k
            + bytes.fromhex("4889e2" "6a2b" "52" "4153" "6a33" "51" "48cf"))


# iretq to the next instruction at CPL 3 (a frame built on the stack):
#   mov %rsp,%rdx; push $0x2b; push %rdx; pushfq; push $0x33; lea 3(%rip),%rax; push %rax; iretq
IRETQ_SELF = bytes.fromhex("4889e2" "6a2b" "52" "9c" "6a33" "488d0503000000" "50" "48cf")


def loop(body: bytes, n: int) -> bytes:
    """mov $n,%rbx; 1: <body>; dec %rbx; jnz 1b; out %al,$DONE_PORT"""
    back = -(len(body) + 5) & 0xFF
    return b"\x48\xbb" + struct.pack("<Q", n) + body + bytes([0x48, 0xFF, 0xCB, 0x75, back, 0xE6, DONE_PORT])


IN_61 = bytes.fromhex("e461")          # in $0x61,%al
OUT_20 = bytes.fromhex("e620")         # out %al,$0x20
UD2, INT3, INT80, SYSCALL = bytes.fromhex("0f0b"), b"\xcc", bytes.fromhex("cd80"), bytes.fromhex("0f05")
SYNTH_CPUID = bytes.fromhex("0f013c25" "50564dff" "0fa2")   # invlpg 0xffffffffff4d5650; cpuid


_kvm = -1


def kvm() -> int:
    global _kvm
    if _kvm < 0:
        _kvm = os.open("/dev/kvm", os.O_RDWR)
    return _kvm


def gate(off: int, sel: int, dpl: int, ist: int = 0) -> bytes:
    return struct.pack("<HHBBHII", off & 0xFFFF, sel, ist, 0x80 | dpl << 5 | 0xE, (off >> 16) & 0xFFFF, off >> 32, 0)


class VM:
    """One VM, one vCPU at CPL 3 (CS 0x33, SS 0x2b), long mode, the layout in the module doc.

    tss: install the 64-bit TSS (RSP0, IST1, I/O bitmap) as TR; open: ports the bitmap opens.
    gates: vector -> (handler VA, code selector, gate DPL, IST). Vectors without a gate get a
    DPL-3 gate to a ring-0 stub `out %al,$vector; hlt` (the engine's design)."""

    def __init__(self, *, tss: bool = True, open_ports: tuple[int, ...] = (),
                 gates: dict[int, tuple[int, int, int, int]] | None = None) -> None:
        self._priv_anchor = None
        self.vm = fcntl.ioctl(kvm(), KVM_CREATE_VM, 0)
        self.mem = mmap.mmap(-1, SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._anchor = ctypes.c_char.from_buffer(self.mem)
        fcntl.ioctl(self.vm, KVM_SET_USER_MEMORY_REGION,
                    struct.pack("<IIQQQ", 0, 0, 0, SIZE, ctypes.addressof(self._anchor)))
        self.vcpu = fcntl.ioctl(self.vm, KVM_CREATE_VCPU, 0)
        self.run = mmap.mmap(self.vcpu, fcntl.ioctl(kvm(), KVM_GET_VCPU_MMAP_SIZE), mmap.MAP_SHARED)
        w = self.w64
        w(PML4, PDPT | 7); w(PDPT, PD | 7)
        w(PML4 + 8 * 511, PDPT_HI | 7); w(PDPT_HI + 8 * 510, PD | 7)      # 0xffffffff80000000
        for i in range(SIZE >> 21):
            w(PD + 8 * i, (PT0 + 0x1000 * i) | 7)
        for p in range(SIZE >> 12):
            w(PT0 + 8 * p, (p << 12) | 7)
        for sel, desc in ((KCS, 0x00AF9B000000FFFF), (KDS, 0x00CF93000000FFFF), (UCS32, 0x00CFFB000000FFFF),
                          (UDS, 0x00CFF3000000FFFF), (UCS, 0x00AFFB000000FFFF)):
            w(GDT + (sel & ~7), desc)
        tss_limit = 0x68 + 32
        w(GDT + TSS_SEL, (tss_limit & 0xFFFF) | (TSS & 0xFFFFFF) << 16 | 0x89 << 40 | ((TSS >> 24) & 0xFF) << 56)
        w(GDT + TSS_SEL + 8, TSS >> 32)
        struct.pack_into("<Q", self.mem, TSS + 4, R0STACK)
        struct.pack_into("<Q", self.mem, TSS + 0x24, ISTSTACK)
        struct.pack_into("<H", self.mem, TSS + 0x66, 0x68)
        bitmap = bytearray(b"\xff" * 32)
        for p in (DONE_PORT,) + tuple(open_ports):
            bitmap[p >> 3] &= ~(1 << (p & 7))
        self.mem[TSS + 0x68:TSS + 0x68 + 32] = bytes(bitmap)
        self.mem[TSS + 0x68 + 32] = 0xFF
        self.mem[R0STUBS:R0STUBS + 0x1000] = b"\xf4" * 0x1000
        gates = gates or {}
        for v in range(256):
            if v in gates:
                off, sel, dpl, ist = gates[v]
            else:
                self.mem[R0STUBS + 4 * v:R0STUBS + 4 * v + 2] = bytes([0xE6, v])
                off, sel, dpl, ist = R0STUBS + 4 * v, KCS, 3, 0
            self.mem[IDT + 16 * v:IDT + 16 * v + 16] = gate(off, sel, dpl, ist)
        sregs = bytearray(fcntl.ioctl(self.vcpu, KVM_GET_SREGS, bytes(312)))

        def seg(i, sel, typ, dpl, long, db, s=1, base=0, limit=0xFFFFFFFF, g=1):
            struct.pack_into("<QIHBBBBBBBBBx", sregs, i * 24, base, limit, sel, typ, 1, dpl, db, s, long, g, 0, 0)
        seg(0, UCS, 0xB, 3, 1, 0)
        for i in (1, 2, 3, 4, 5):
            seg(i, UDS, 3, 3, 0, 1)
        if tss:
            seg(6, TSS_SEL, 0xB, 0, 0, 0, s=0, base=TSS, limit=tss_limit, g=0)
        struct.pack_into("<QH", sregs, 192, GDT, 0x4F)
        struct.pack_into("<QH", sregs, 208, IDT, 0xFFF)
        struct.pack_into("<QQQQQQ", sregs, 224, 0x80050033, 0, PML4, 0x6E0, 0, 0xD01)  # cr0 cr2 cr3 cr4 cr8 efer
        fcntl.ioctl(self.vcpu, KVM_SET_SREGS, bytes(sregs))
        self.set_msrs([(0xC0000081, (0x23 << 48) | (KCS << 32)), (0xC0000082, 0x40000), (0xC0000084, 0x700)])

    def close(self) -> None:
        self.run.close()
        os.close(self.vcpu)
        os.close(self.vm)
        self._anchor = self._priv_anchor = None

    def w64(self, a: int, v: int) -> None:
        struct.pack_into("<Q", self.mem, a, v)

    def put(self, va: int, code: bytes) -> None:
        self.mem[va:va + len(code)] = code

    def set_msrs(self, pairs) -> int:
        """How many of the MSRs KVM accepted."""
        buf = bytearray(struct.pack("<II", len(pairs), 0) + b"".join(struct.pack("<IIQ", i, 0, v) for i, v in pairs))
        return fcntl.ioctl(self.vcpu, KVM_SET_MSRS, buf, True)

    def get_msr(self, index: int) -> int | None:
        buf = bytearray(struct.pack("<IIIIQ", 1, 0, index, 0, 0))
        n = fcntl.ioctl(self.vcpu, KVM_GET_MSRS, buf, True)
        return struct.unpack_from("<Q", buf, 16)[0] if n == 1 else None

    def regs(self) -> list[int]:
        return list(struct.unpack("<18Q", fcntl.ioctl(self.vcpu, KVM_GET_REGS, bytes(144))))

    def set_regs(self, r: list[int]) -> None:
        fcntl.ioctl(self.vcpu, KVM_SET_REGS, struct.pack("<18Q", *r))

    def start(self, code: bytes, **regs: int) -> None:
        self.put(CODE, code)
        r = [0] * 18
        r[RIP], r[RFLAGS], r[RSP] = CODE, 0x202, STACK
        for name, v in regs.items():
            r[{"rax": RAX, "rbx": RBX, "rcx": RCX}[name]] = v
        self.set_regs(r)

    def enter(self) -> tuple[int, int | None]:
        fcntl.ioctl(self.vcpu, KVM_RUN, 0)
        reason = struct.unpack_from("<I", self.run, 8)[0]
        if reason == EXIT_IO:
            direction, size, port, count, off = struct.unpack_from("<BBHIQ", self.run, 32)
            if direction == 0:                              # in: answer ~0, as Xen does for a domU
                self.run[off:off + size * count] = b"\xff" * (size * count)
            return reason, port
        return reason, None

    def go(self, limit: int = 10_000_000) -> tuple[dict, tuple, float]:
        """Run to the DONE port (or anything but an I/O exit): ({(reason, port): count}, last, s)."""
        seen: dict = {}
        t = time.perf_counter()
        for _ in range(limit):
            ex = self.enter()
            if ex == (EXIT_IO, DONE_PORT) or ex[0] != EXIT_IO:
                break
            seen[ex] = seen.get(ex, 0) + 1
        return seen, ex, time.perf_counter() - t


# The design's shape: the #GP handler in a page of a private read-only memslot (guest-physical
# PRIV, outside the machine memory a guest's page tables may name), its IST stack in a private
# writable one (PRIV + 4 KiB), mapped at 0x300000/0x301000 by PTEs the host writes; IST2.
PRIV = 1 << 32
PRIV_CODE_VA, PRIV_IST_TOP = 0x300000, 0x302000
#   mov $0xff,%al; addq $2,RIP; pushq RFLAGS; popfq; mov RSP,%rsp; jmp *RIP  (frame at 0x301fd0)
GP_FIX_IN_PRIV = bytes.fromhex("b0ff" "48830425d81f300002" "ff3425e81f3000" "9d" "488b2425f01f3000" "ff2425d81f3000")


def private_pages(vm: "VM") -> None:
    vm.priv = mmap.mmap(-1, 0x2000, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    vm._priv_anchor = ctypes.c_char.from_buffer(vm.priv)
    a = ctypes.addressof(vm._priv_anchor)
    vm.priv[0:len(GP_FIX_IN_PRIV)] = GP_FIX_IN_PRIV
    fcntl.ioctl(vm.vm, KVM_SET_USER_MEMORY_REGION, struct.pack("<IIQQQ", 1, 2, PRIV, 0x1000, a))  # KVM_MEM_READONLY
    fcntl.ioctl(vm.vm, KVM_SET_USER_MEMORY_REGION, struct.pack("<IIQQQ", 2, 0, PRIV + 0x1000, 0x1000, a + 0x1000))
    vm.w64(PT0 + 8 * (PRIV_CODE_VA >> 12), PRIV | 5)                          # user, read-only
    vm.w64(PT0 + 8 * ((PRIV_CODE_VA >> 12) + 1), (PRIV + 0x1000) | 7 | 1 << 63)  # user, writable, NX
    struct.pack_into("<Q", vm.mem, TSS + 0x2C, PRIV_IST_TOP)                     # IST2
    vm.put(IDT + 16 * GP, gate(PRIV_CODE_VA, XEN_CS, 0, 2))
    xen_selectors(vm)


def exit_name(ex) -> str:
    reason, port = ex
    return f"IO port {port:#x}" if reason == EXIT_IO else EXIT_NAMES.get(reason, str(reason))


def describe(seen: dict, last, n: int) -> str:
    parts = [f"{c} x {exit_name(k)}" for k, c in sorted(seen.items(), key=lambda kv: -kv[1])]
    return (", ".join(parts) or "no user exits") + f"; ended by {exit_name(last)} (loop of {n})"


# ---------------------------------------------------------------- probes

XEN_CS, XEN_SS = 0xE033, 0xE02B         # Xen's FLAT_RING3_CS64/SS64, what the engine's guests run with
BIG_GDT = 0x200000


def xen_selectors(vm: "VM") -> None:
    """Run the vCPU on Xen's selectors (CS 0xe033, SS 0xe02b) as the engine does: a 64 KiB GDT
    at 2 MiB holding them and the probe's own entries."""
    for sel, desc in ((KCS, 0x00AF9B000000FFFF), (KDS, 0x00CF93000000FFFF), (UCS32, 0x00CFFB000000FFFF),
                      (UDS, 0x00CFF3000000FFFF), (UCS, 0x00AFFB000000FFFF), (XEN_CS, 0x00AFFB000000FFFF),
                      (XEN_SS, 0x00CFF3000000FFFF)):
        vm.w64(BIG_GDT + (sel & ~7), desc)
    vm.mem[BIG_GDT + TSS_SEL:BIG_GDT + TSS_SEL + 16] = vm.mem[GDT + TSS_SEL:GDT + TSS_SEL + 16]
    s = bytearray(fcntl.ioctl(vm.vcpu, KVM_GET_SREGS, bytes(312)))
    for i in range(6):
        struct.pack_into("<QIHBBBBBBBBBx", s, i * 24, 0, 0xFFFFFFFF, XEN_CS if i == 0 else XEN_SS,
                         0xB if i == 0 else 3, 1, 3, 0 if i == 0 else 1, 1, 1 if i == 0 else 0, 1, 0, 0)
    struct.pack_into("<QH", s, 192, BIG_GDT, 0xFFFF)
    fcntl.ioctl(vm.vcpu, KVM_SET_SREGS, bytes(s))


def inkernel_floor(n: int) -> float:
    """us per `out` that KVM completes itself (KVM_IOEVENTFD on the port): an exit handled in
    the kernel, for reference."""
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    vm = VM(open_ports=(0x20,))
    try:
        fcntl.ioctl(vm.vm, KVM_IOEVENTFD, struct.pack("<QQIiI36x", 0, 0x20, 1, efd, 1 << 1))
        vm.start(loop(OUT_20, n))
        seen, last, dt = vm.go()
        assert not seen and last == (EXIT_IO, DONE_PORT), (seen, last)
        return dt / n * 1e6
    finally:
        vm.close()
        os.close(efd)


def exit_floor(n: int) -> float:
    """us per `out` exit from CPL 3 to this Python loop and back (the reference)."""
    vm = VM(open_ports=(0x20,))
    try:
        vm.start(loop(OUT_20, n))
        seen, last, dt = vm.go()
        assert seen.get((EXIT_IO, 0x20)) == n and last == (EXIT_IO, DONE_PORT), (seen, last)
        return dt / n * 1e6
    finally:
        vm.close()


def run_case(n: int, body: bytes, **vmkw) -> tuple[float, dict, tuple, list[int]]:
    """Run loop(body, n) in a fresh VM: (us per iteration, exits seen, last exit, regs at end)."""
    setup = vmkw.pop("setup", None)
    vm = VM(**vmkw)
    try:
        if setup:
            setup(vm)
        vm.start(loop(body, n))
        seen, last, dt = vm.go()
        return dt / n * 1e6, seen, last, vm.regs()
    finally:
        vm.close()


def cmd_info(args) -> dict:
    out = {}
    buf = bytearray(struct.pack("<I", 1024) + bytes(4096))
    fcntl.ioctl(kvm(), KVM_GET_MSR_INDEX_LIST, buf)
    n = struct.unpack_from("<I", buf)[0]
    idx = struct.unpack_from(f"<{n}I", buf, 4)
    para = sorted(i for i in idx if 0x4B564D00 <= i <= 0x4B564DFF)
    print(f"KVM_GET_MSR_INDEX_LIST: {n} MSRs; in 0x4b564dxx (KVM/PVM paravirt): {[hex(i) for i in para]}")
    buf = bytearray(struct.pack("<II", 256, 0) + bytes(40 * 256))
    fcntl.ioctl(kvm(), KVM_GET_SUPPORTED_CPUID, buf)
    for i in range(struct.unpack_from("<I", buf)[0]):
        leaf, sub, _f, a, b, c, d = struct.unpack_from("<IIIIIII", buf, 8 + 40 * i)
        if 0x40000000 <= leaf < 0x50000000:
            print(f"KVM_GET_SUPPORTED_CPUID {leaf:#x}: eax={a:#x} ebx={b:#x} ecx={c:#x} edx={d:#x} "
                  f"{struct.pack('<III', b, c, d)!r}")
    caps = {"PIT2": 33, "IOEVENTFD": 36, "COALESCED_MMIO": 15, "COALESCED_PIO": 162, "IRQCHIP": 0,
            "X86_DISABLE_EXITS": 143, "EXIT_HYPERCALL": 201, "X86_USER_SPACE_MSR": 188, "SET_GUEST_DEBUG": 23}
    print("KVM_CHECK_EXTENSION:", ", ".join(f"{k}={fcntl.ioctl(kvm(), KVM_CHECK_EXTENSION, v)}" for k, v in caps.items()))
    vm = VM()
    try:
        rows = []
        for lo, hi in ((0x4B564D00, 0x4B564D30), (0x4B564DF0, 0x4B564E00)):
            for m in range(lo, hi):
                got = vm.get_msr(m)
                if got is not None:
                    rows.append(f"{m:#x}={got:#x}")
        print("KVM_GET_MSRS accepted in 0x4b564d00-2f, 0x4b564df0-ff:", ", ".join(rows) or "none")
        wrote = []
        for m in (0x4B564D20, 0x4B564D21, 0x4B564D22, 0x4B564DF0, 0x4B564DF1, 0x4B564DF4):
            try:
                ok = vm.set_msrs([(m, 0xB000 if m in (0x4B564D20, 0x4B564DF1) else 0x20000)])
            except OSError as e:
                ok = f"error {e.errno}"
            wrote.append(f"{m:#x}:{ok}")
        print("KVM_SET_MSRS (1 = accepted):", ", ".join(wrote))
    finally:
        vm.close()
    for leaf in (0x40000000, 0x40000001, 0x40000100, 0x40000200, 0x40000201):
        res = []
        for name, insn in (("cpuid", b"\x0f\xa2"), ("synthetic", SYNTH_CPUID)):
            vm = VM()
            try:
                vm.start(insn + bytes([0xE6, DONE_PORT]), rax=leaf)
                seen, last, _ = vm.go()
                r = vm.regs()
                ok = last == (EXIT_IO, DONE_PORT)
                sig = struct.pack("<III", r[RBX] & 0xFFFFFFFF, r[RCX] & 0xFFFFFFFF, r[RDX] & 0xFFFFFFFF)
                res.append(f"{name}: " + (f"eax={r[RAX]:#x} {sig!r}" if ok else f"ended by {exit_name(last)} at rip {r[RIP]:#x}")
                           + (f" (+{describe(seen, last, 1)})" if seen else ""))
            finally:
                vm.close()
        print(f"guest CPL 3 leaf {leaf:#x}: " + "; ".join(res))
    return out


def cmd_ports(args) -> dict:
    n, res = args.n, {}
    cases = {
        "no_tss": dict(tss=False),
        "bitmap_open": dict(open_ports=(0x61,)),
        "bitmap_closed_r0_idt": dict(),
        "bitmap_closed_gp_cpl3": dict(gates={GP: (HANDLERS, UCS, 0, 0)}, setup=lambda vm: vm.put(HANDLERS, GP_FIX_IN)),
        "bitmap_closed_gp_cpl3_ist": dict(gates={GP: (HANDLERS, UCS, 0, 1)}, setup=lambda vm: vm.put(HANDLERS, GP_FIX_IN)),
        "xen_cs_gp_cpl3_ist": dict(gates={GP: (HANDLERS, XEN_CS, 0, 1)},
                                   setup=lambda vm: (xen_selectors(vm), vm.put(HANDLERS, GP_FIX_IN))),
        "xen_cs_gp_cpl3_ist_noiret": dict(gates={GP: (HANDLERS, XEN_CS, 0, 1)},
                                          setup=lambda vm: (xen_selectors(vm), vm.put(HANDLERS, GP_FIX_IN_NOIRET))),
        "xen_cs_gp_private_slots": dict(setup=private_pages),
    }

    def with_ioeventfd(vm):
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        fcntl.ioctl(vm.vm, KVM_IOEVENTFD, struct.pack("<QQIiI36x", 0, 0x61, 1, efd, 1 << 1))  # PIO, any value

    def with_coalesced(vm):
        fcntl.ioctl(vm.vm, KVM_REGISTER_COALESCED_MMIO, struct.pack("<QII", 0x61, 1, 1))    # pio=1
    cases["bitmap_open_ioeventfd"] = dict(open_ports=(0x61,), setup=with_ioeventfd)
    cases["bitmap_open_coalesced_pio"] = dict(open_ports=(0x61,), setup=with_coalesced)
    times: dict[str, list[float]] = {"floor": [], "kernel_floor": []}
    notes: dict[str, str] = {}
    for rep in range(args.reps):
        times["floor"].append(exit_floor(n))
        times["kernel_floor"].append(inkernel_floor(n))
        for name, kw in cases.items():
            us, seen, last, regs = run_case(n, IN_61, **dict(kw))
            times.setdefault(name, []).append(us if last == (EXIT_IO, DONE_PORT) else float("nan"))
            notes[name] = describe(seen, last, n) + f"; al={regs[RAX] & 0xFF:#x}"
    print(f"exit floor (out from CPL 3 to this loop): {statistics.median(times['floor']):.2f} us; "
          f"in-kernel exit (ioeventfd): {statistics.median(times['kernel_floor']):.2f} us")
    for name in cases:
        if times[name][0] != times[name][0]:
            print(f"in $0x61 [{name}]: did not complete: {notes[name]}")
            continue
        ratio = statistics.median(f / t for f, t in zip(times["floor"], times[name]))
        print(f"in $0x61 [{name}]: {statistics.median(times[name]):.2f} us/iteration "
              f"(floor/this per rep, median {ratio:.2f}x); {notes[name]}")
        res[f"in_{name}_us"] = statistics.median(times[name])
    for key in ("xen_cs_gp_cpl3_ist", "xen_cs_gp_cpl3_ist_noiret", "xen_cs_gp_private_slots"):
        res[f"{key}_speedup"] = statistics.median(f / t for f, t in zip(times["bitmap_open"], times[key]))
    res["floor_us"] = statistics.median(times["floor"])
    res["kernel_floor_us"] = statistics.median(times["kernel_floor"])
    return res


def cmd_events(args) -> dict:
    n, res = args.n, {}
    cases = {
        "ud2_cpl3": (UD2, dict(gates={UD: (HANDLERS, UCS, 0, 0)}, setup=lambda vm: vm.put(HANDLERS, SKIP2_IRET))),
        "ud2_cpl3_ist": (UD2, dict(gates={UD: (HANDLERS, UCS, 0, 1)}, setup=lambda vm: vm.put(HANDLERS, SKIP2_IRET))),
        "int3_cpl3": (INT3, dict(gates={BP: (HANDLERS, UCS, 3, 0)}, setup=lambda vm: vm.put(HANDLERS, IRET))),
        "int80_cpl3": (INT80, dict(gates={0x80: (HANDLERS, UCS, 3, 0)}, setup=lambda vm: vm.put(HANDLERS, IRET))),
        "int80_cpl3_ist": (INT80, dict(gates={0x80: (HANDLERS, UCS, 3, 1)}, setup=lambda vm: vm.put(HANDLERS, IRET))),
        "ud2_xen_cs_ist": (UD2, dict(gates={UD: (HANDLERS, XEN_CS, 0, 1)},
                                     setup=lambda vm: (xen_selectors(vm), vm.put(HANDLERS, SKIP2_IRET)))),
        "ud2_r0_handler": (UD2, dict(gates={UD: (HANDLERS, KCS, 0, 1)}, setup=lambda vm: vm.put(HANDLERS, SKIP2_IRET))),
        "syscall_lstar_iretq": (SYSCALL, dict(setup=lambda vm: vm.put(0x40000, ring0_stub(0, False)))),
        "iretq_cpl3": (IRETQ_SELF, dict()),
    }
    times: dict[str, list[float]] = {"floor": []}
    notes: dict[str, str] = {}
    for rep in range(args.reps):
        times["floor"].append(exit_floor(n))
        for name, (body, kw) in cases.items():
            us, seen, last, regs = run_case(n, body, **dict(kw))
            times.setdefault(name, []).append(us if last == (EXIT_IO, DONE_PORT) else float("nan"))
            notes[name] = describe(seen, last, n) + f"; rip at end {regs[RIP]:#x}"
    print(f"exit floor (out from CPL 3 to this loop): {statistics.median(times['floor']):.2f} us")
    for name in cases:
        if times[name][0] != times[name][0]:            # NaN: the loop did not complete
            print(f"{name}: did not complete: {notes[name]}")
            continue
        ratio = statistics.median(f / t for f, t in zip(times["floor"], times[name]))
        print(f"{name}: {statistics.median(times[name]):.2f} us/iteration (floor/this {ratio:.2f}x); {notes[name]}")
        res[f"{name}_us"] = statistics.median(times[name])
    # A software `int $0xd` cannot enter a #GP handler (with a DPL-0 or a DPL-3 gate)?
    for dpl in (0, 3):
        us, seen, last, regs = run_case(1, bytes.fromhex("cd0d"), gates={GP: (HANDLERS, UCS, dpl, 1)},
                                        setup=lambda vm: vm.put(HANDLERS, b"\xe6\x11"), open_ports=(0x11,))
        print(f"int $0xd with a DPL-{dpl} #GP gate: {describe(seen, last, 1)}")
    # A CPL-3 store to the private read-only memslot, through a writable PTE:
    def ro_store(vm):
        private_pages(vm)
        vm.w64(PT0 + 8 * (PRIV_CODE_VA >> 12), PRIV | 7)
    us, seen, last, regs = run_case(1, bytes.fromhex("c6042500003000" "01"), setup=ro_store)
    print(f"CPL-3 store to a KVM_MEM_READONLY page through a writable PTE: {describe(seen, last, 1)}")
    # Where SYSCALL lands: CS as read by the LSTAR code (mov %cs,%eax; out %al,$0x11), and KVM's view.
    vm = VM(open_ports=(0x11,))
    try:
        vm.put(0x40000, bytes.fromhex("8cc8" "e611"))
        vm.start(loop(SYSCALL, 1))
        ex = vm.enter()
        r = vm.regs()
        sel, _typ, _p, dpl = struct.unpack_from("<HBBB", fcntl.ioctl(vm.vcpu, KVM_GET_SREGS, bytes(312)), 12)
        print(f"SYSCALL from CPL 3 lands at MSR_LSTAR with %cs={r[RAX] & 0xFFFF:#x} (KVM: cs {sel:#x} dpl {dpl}), "
              f"rcx={r[RCX]:#x}; stopped by {exit_name(ex)}")
    finally:
        vm.close()
    # Does the CPL-3 handler run natively? One #UD whose handler spins m iterations (3 insns each).
    m = 3_000_000
    vm = VM(gates={UD: (HANDLERS, UCS, 0, 0)})
    try:
        vm.put(HANDLERS, spin_iret(m, 2))
        vm.start(loop(UD2, 1))
        seen, last, dt = vm.go()
        print(f"CPL-3 #UD handler spinning {m} iterations: {dt * 1e3:.1f} ms ({3 * m / dt / 1e9:.2f} G instr/s); "
              f"{describe(seen, last, 1)}")
        res["handler_ginstr_s"] = 3 * m / dt / 1e9
    finally:
        vm.close()
    res["events_floor_us"] = statistics.median(times["floor"])
    return res


def ring0_sregs(vm: "VM", cpl3: bytes) -> bytes:
    """The vCPU's sregs with CS/SS switched to ring 0 (0x08/0x10), from its CPL-3 sregs."""
    s = bytearray(cpl3)
    struct.pack_into("<QIHBBBBBBBBBx", s, 0, 0, 0xFFFFFFFF, KCS, 0xB, 1, 0, 0, 1, 1, 1, 0, 0)
    struct.pack_into("<QIHBBBBBBBBBx", s, 5 * 24, 0, 0xFFFFFFFF, KDS, 3, 1, 0, 1, 1, 0, 1, 0, 0)
    return bytes(s)


def host_started_stub(n: int, k: int, by_iretq: bool) -> tuple[float, int]:
    """The engine's ring-0 invalidation pattern: the host points the vCPU at a ring-0 stub
    (KVM_SET_REGS + KVM_SET_SREGS), the stub runs k instructions and then either
    - by_iretq: iretq to the CPL-3 context from a frame the host wrote on the ring-0 stack
      (one KVM_RUN per round: the guest's own next exit, `out $0x20`, ends it), or
    - `out $0x5c`: an exit, after which the host sets the CPL-3 registers and sregs back and
      runs the vCPU again (two KVM_RUNs per round, today's engine).
    Returns (us per round, KVM_RUNs per round)."""
    vm = VM(open_ports=(0x20, 0x5C))
    try:
        vm.put(CODE, OUT_20 + b"\xf4")
        tail = IRET if by_iretq else bytes.fromhex("e65c" "f4")
        vm.put(0x40000, bytes.fromhex("4889c2") * k + tail)
        cpl3 = fcntl.ioctl(vm.vcpu, KVM_GET_SREGS, bytes(312))
        r0 = ring0_sregs(vm, cpl3)
        struct.pack_into("<5Q", vm.mem, R0STACK - 40, CODE, UCS, 0x202, STACK, UDS)
        r0regs = [0] * 18
        r0regs[RIP], r0regs[RFLAGS], r0regs[RSP] = 0x40000, 0x2, R0STACK - 40
        u3 = [0] * 18
        u3[RIP], u3[RFLAGS], u3[RSP] = CODE, 0x202, STACK
        runs = 0
        t = time.perf_counter()
        for _ in range(n):
            vm.set_regs(r0regs)
            fcntl.ioctl(vm.vcpu, KVM_SET_SREGS, r0)
            ex = vm.enter(); runs += 1
            if not by_iretq:
                assert ex == (EXIT_IO, 0x5C), exit_name(ex)
                vm.set_regs(u3)
                fcntl.ioctl(vm.vcpu, KVM_SET_SREGS, cpl3)
                ex = vm.enter(); runs += 1
            assert ex == (EXIT_IO, 0x20), exit_name(ex)
        return (time.perf_counter() - t) / n * 1e6, runs // n
    finally:
        vm.close()


def cmd_ring0(args) -> dict:
    n, res = args.n, {}
    r0 = lambda code: dict(gates={UD: (HANDLERS, KCS, 0, 1)}, setup=lambda vm: vm.put(HANDLERS, code))
    cr3 = bytes.fromhex("0f20d8" "0f22d8")                   # mov %cr3,%rax; mov %rax,%cr3
    mov = bytes.fromhex("4889c2")                            # mov %rax,%rdx
    cases = {
        "ud2_r0_k0": r0(SKIP2_IRET),
        "ud2_r0_k20": r0(mov * 20 + SKIP2_IRET),
        "ud2_r0_cr3": r0(cr3 + SKIP2_IRET),
    }
    times: dict[str, list[float]] = {"floor": [], "stub_out": [], "stub_iretq": [], "stub_iretq_k20": []}
    notes: dict[str, str] = {}
    for rep in range(args.reps):
        times["floor"].append(exit_floor(n))
        for name, kw in cases.items():
            us, seen, last, regs = run_case(n, UD2, **dict(kw))
            times.setdefault(name, []).append(us)
            notes[name] = describe(seen, last, n)
        m = max(200, n // 10)
        times["stub_out"].append(host_started_stub(m, 0, False)[0])
        times["stub_iretq"].append(host_started_stub(m, 0, True)[0])
        times["stub_iretq_k20"].append(host_started_stub(m, 20, True)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"exit floor (out from CPL 3 to this loop): {med['floor']:.2f} us")
    for name in cases:
        print(f"#UD -> ring-0 handler [{name}] -> iretq to CPL 3: {med[name]:.2f} us/round trip; {notes[name]}")
        res[f"r0_{name}_us"] = med[name]
    res["r0_per_insn_us"] = (med["ud2_r0_k20"] - med["ud2_r0_k0"]) / 20
    res["r0_cr3_us"] = med["ud2_r0_cr3"] - med["ud2_r0_k0"]
    print(f"per extra ring-0 instruction: {res['r0_per_insn_us']:.3f} us; mov from+to CR3: {res['r0_cr3_us']:.2f} us")
    print(f"host-started ring-0 stub, then back to CPL 3 by `out` + SET_REGS/SET_SREGS + KVM_RUN (2 runs): "
          f"{med['stub_out']:.2f} us/round; by iretq in the stub (1 run): {med['stub_iretq']:.2f} us "
          f"(+20 insns: {med['stub_iretq_k20']:.2f} us); ratio {med['stub_out'] / med['stub_iretq']:.2f}x")
    res.update(stub_out_us=med["stub_out"], stub_iretq_us=med["stub_iretq"], ring0_floor_us=med["floor"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("info", "ports", "events", "ring0", "all"))
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if not os.path.exists("/dev/kvm"):
        sys.exit("no /dev/kvm")
    res: dict = {}
    for what in (("info", "ports", "events", "ring0") if args.what == "all" else (args.what,)):
        print(f"== {what}")
        res.update(globals()[f"cmd_{what}"](args))
    print(" ".join(f"{k}={v:.2f}" for k, v in res.items()) + f" load={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
