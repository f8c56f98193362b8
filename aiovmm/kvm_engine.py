"""The KVM vCPU engine: guest code runs natively, behind the same interface as VCPUEngine.

Design (shared/design/ARCHITECTURE.md §2b, measured facts in shared/research/kvm/NOTES.md):
- One KVM VM per vCPU engine (one per domain today: one vCPU per domain). Guest-physical
  address == machine address: the whole machine memfd mapping is memory slot 0, so a guest's
  validated PV page tables (entries hold MFNs) are loaded as CR3 as they are.
- Guest kernel and user both run at CPL 3 (CS 0xe033, SS 0xe02b), as on Xen. Ring 0 holds only
  single exiting instructions: an IDT whose 256 gates all point at `out %al,$vector` stubs,
  and a SYSCALL entry (LSTAR) stub that is also one `out`. Every exception, software
  interrupt and syscall therefore becomes exactly one KVM_EXIT_IO; the host reads the CPU's
  frame from the ring-0 stack (error code, RIP, RFLAGS, RSP) and CR2 from the synced sregs,
  and returns to CPL 3 by setting registers (sysret/iret in ring 0 are never executed: kvm-pvm
  triple-faults on sysretq, and every ring-0 instruction costs ~0.6 us there).
- The hypercall page this engine's builder writes uses `mov $nr,%eax; out %al,$HCALL_PORT`
  from CPL 3 (one exit, no ring-0 transition: ~30 vs ~50 us on kvm-pvm).
- Registers live in kvm_run's sync-regs area (KVM_CAP_SYNC_REGS): one KVM_RUN ioctl per exit,
  no KVM_GET/SET_REGS calls.
- Slices: aiovmm/_native/kvm.so arms a per-thread POSIX timer at the slice deadline whose
  signal sets kvm_run.immediate_exit, so KVM_RUN always returns in time, on the loop thread
  (opt-in, AIOVMM_KVM_VCPU_THREAD=1: on a vCPU thread of the engine's own, _VcpuThread).
- Page-table changes made by the hypervisor (mmu_update, ptwr, grants, new roots) are writes
  to guest memory through the host mapping, which KVM's shadow MMU (kvm-pvm has no EPT)
  never sees: its write protection traps only guest writes. Measured: neither a CR3 reload
  nor KVM_SET_SREGS resyncs it; deleting or moving a memory slot zaps all shadow pages
  (~64 us idle, milliseconds under load, then every page re-faulted). Before the next
  KVM_RUN after a change, _ShadowGuard finds what KVM may hold stale (the frames written
  through MachineMemory.write_pte, diffed against snapshots; tables devalidated since), and
  on kvm-pvm the engine makes KVM forget exactly that: a ring-0 stub, which kvm-pvm runs in
  KVM's emulator, stores each changed entry back unchanged through a supervisor-only direct
  map, and KVM's page-table write tracking zaps the shadow entries made from it
  (_invalidate). On hardware KVM (EPT/NPT, ring 0 native) the same check ends in the zap,
  which is a TLB flush there.
- The guest TSC is the host TSC (kvm-pvm cannot scale it: KVM_SET_TSC_KHZ is refused), so
  pvclock parameters come from `pvclock_params()` (TSC frequency and a TSC/system-time pair),
  not the Unicorn engine's 1 tick = 1 ns.

Known differences from the Unicorn engine (guest-visible only to hostile guests):
- A guest `in`/`ins` is completed by KVM before the #GP is raised; registers are restored, but
  the string form's store to guest memory has happened.
- CPUID: on kvm-pvm it executes natively at CPL 3 (the host's, outer hypervisor leaves
  included); `set_cpuid()` installs a table (KVM's supported one by default) that hardware
  KVM applies, where the shared policy (aiovmm/cpuid.py) can be passed in.
"""
from __future__ import annotations

import asyncio
import collections
import ctypes
import enum
import errno
import fcntl
import logging
import mmap
import os
import signal
import struct
import threading
import time
from typing import TYPE_CHECKING, Callable, Sequence

from .abi import (
    DOMID_XEN, XEN_L4_FIRST, XEN_L4_LAST, MACH2PHYS_VIRT_END, MACH2PHYS_VIRT_START, FLAT_RING0_CS64, FLAT_RING0_DS, FLAT_RING3_CS32, FLAT_RING3_CS64, FLAT_RING3_SS,
    PAGE_SHIFT, PAGE_SIZE, PTE_FRAME_MASK, _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_NX, _PAGE_PRESENT,
    _PAGE_RW, _PAGE_USER, Hypercall, segment_base_limit,
)
from .memory import PageType
from .mmu import PFEC_USER, walk as mmu_walk
from .vcpu_engine import ExitReason

if TYPE_CHECKING:
    from .cpuid import Xstate
    from .memory import MachineMemory
    from .mmu import XenArea

log = logging.getLogger("aiovmm.kvm_engine")

_NATIVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_native", "kvm.so")


class Ioctl(enum.IntEnum):
    """The KVM ioctls this engine uses (linux/kvm.h, x86_64 sizes)."""
    GET_API_VERSION = 0xAE00
    CREATE_VM = 0xAE01
    CHECK_EXTENSION = 0xAE03
    GET_SUPPORTED_CPUID = 0xC008AE05
    GET_VCPU_MMAP_SIZE = 0xAE04
    CREATE_VCPU = 0xAE41
    SET_USER_MEMORY_REGION = 0x4020AE46
    GET_DIRTY_LOG = 0x4010AE42
    GET_REGS = 0x8090AE81
    SET_REGS = 0x4090AE82
    GET_SREGS = 0x8138AE83
    SET_SREGS = 0x4138AE84
    GET_MSRS = 0xC008AE88
    SET_MSRS = 0x4008AE89
    SET_CPUID2 = 0x4008AE90
    GET_TSC_KHZ = 0xAEA3
    GET_VCPU_EVENTS = 0x8040AE9F
    GET_STATS_FD = 0xAECE


class Cap(enum.IntEnum):
    SYNC_REGS = 74
    IMMEDIATE_EXIT = 136


class Exit(enum.IntEnum):
    """kvm_run.exit_reason values handled here."""
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HLT = 5
    MMIO = 6
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    INTERNAL_ERROR = 17


# struct kvm_run layout (x86_64): exit_reason at 8, the exit union at 32, sync regs at 304.
_RUN_EXIT_REASON = 8
_RUN_IO = 32                      # direction u8, size u8, port u16, count u32, data_offset u64
_RUN_VALID_REGS = 288
_RUN_DIRTY_REGS = 296
_EXIT_IO = struct.Struct("<I20xBBHI")   # exit_reason, then the io exit's direction size port count
_RUN_REGS = 304                   # struct kvm_regs (18 u64)
_RUN_SREGS = 448                  # struct kvm_sregs (312 bytes)
SYNC_REGS, SYNC_SREGS = 1, 2

# struct kvm_regs order.
_REG_INDEX = {n: i for i, n in enumerate(
    "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split())}
# struct kvm_sregs: 8 segments of 24 bytes (cs ds es fs gs ss tr ldt), gdt, idt, control regs.
_SEG = {n: 24 * i for i, n in enumerate("cs ds es fs gs ss tr ldt".split())}
_SEG_FMT = struct.Struct("<QIHBBBBBBBBBx")      # base limit selector type present dpl db s l g avl unusable
_SREG_OFF = {"gdt": 192, "idt": 208, "cr0": 224, "cr2": 232, "cr3": 240, "cr4": 248, "cr8": 256,
             "efer": 264}
_SELECTORS = ("cs", "ss", "ds", "es", "fs", "gs")
PFEC_INSN_FETCH = 0x10                          # #PF error code: instruction fetch

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_SMEP = 1 << 5, 1 << 9, 1 << 10, 1 << 20
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1, 1 << 8, 1 << 10, 1 << 11
MSR_IA32_TSC = 0x10
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
RF_TF, RF_IF, RF_DF, RF_NT, RF_AC = 0x100, 0x200, 0x400, 0x4000, 0x40000
RF_IOPL, RF_VM, RF_OF = 0x3000, 0x20000, 0x800

# The engine's ring-0 pages, in Xen's supervisor-only L4 slot 261 (mmu.XenArea), after the
# pages XenArea itself uses (L1 index 32 on): IDT, stubs, TSS, ring-0 stack.
R0_L1_INDEX = 32
HCALL_PORT = 0x5A                  # `out %al,$0x5a` from CPL 3 in kernel mode: a hypercall
_IST = 1                          # every gate's stack: the TSS's IST1, the engine stack
_STUB_STRIDE = 4                   # vector v's stub at stubs + 4*v: out %al,$v ; hlt ; hlt
SYSCALL_PORT = 0x5B               # the SYSCALL entry page's `out`
SYSCALL32_OFF = 0x400             # MSR_CSTAR's entry: in the stubs page, after the vectors'
INVAL_PORT = 0x5C                 # the ring-0 invalidation stub's final `out` (_Ring0)
_INVAL_STUB_OFF = 0x800           # its offset in the stubs page (after the 256 vector stubs)
_INVAL_LIST_PAGES = 4             # list of direct-map VAs it stores to (0-terminated)
INVAL_MAX = _INVAL_LIST_PAGES * 512 - 1
_INVAL_RUNS_MAX = 4               # stub runs for one check before a full zap is cheaper
# Ring-0 code, run from the host (KVMEngine._invalidate), executed by KVM's emulator on
# kvm-pvm: for each direct-map VA in the 0-terminated list at RSI, load the 8-byte entry there
# and store it back unchanged (KVM zaps the shadow entries made from it); a VA with bit 0 set
# gets a 2-byte store instead, which KVM treats as a misaligned page-table write and answers
# by zapping every shadow page of that frame. Then exit.
#   1: lodsq; test %rax,%rax; jz 3f; btr $0,%rax; jc 2f
#      mov (%rax),%rdx; mov %rdx,(%rax); jmp 1b
#   2: mov (%rax),%dx; mov %dx,(%rax); jmp 1b
#   3: out %al,$INVAL_PORT; hlt
_INVAL_CODE = bytes.fromhex("48ad" "4885c0" "7417" "480fbaf000" "7208" "488b10" "488910" "ebea"
                            "668b10" "668910" "ebe2") + bytes([0xE6, INVAL_PORT, 0xF4])
# The direct map of machine memory the stub stores through: supervisor-only 2 MiB pages in
# the engine's L4 slot 257, from L3 index 256 on (below it: the M2P alias).
_DMAP_L3_FIRST = 256
_TRACK_MAX = 8192                 # tracked page-table frames (32 MiB of snapshots) before a full zap
GUEST_L4_SLOT = 257               # the engine's guest-visible pages (M2P alias, SYSCALL entry)
# Ports a PV kernel polls in loops (Linux's quick_pit_calibrate reads the PIT 100,000 times
# during boot): open in the I/O bitmap, so an access exits straight to the host as an I/O exit
# (one exit, no ring-0 stub, no instruction decode) and is answered by the shared port
# policy (emulate.port_in/port_out via on_port_io), exactly as the #GP path would.
_DIRECT_PORTS = (0x40, 0x41, 0x42, 0x43, 0x61)
_LEGACY_PREFIXES = frozenset((0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67))
_ENGINE_PORTS = (HCALL_PORT, SYSCALL_PORT)   # never the port policy's
_SYSCALL = "syscall"                          # its exit_kinds key
_IOBITMAP_BYTES = 32               # ports 0-255; the TSS limit ends the bitmap after them
TSS_LIMIT = 104 + _IOBITMAP_BYTES
_ERR_FRAME = 48                    # bytes the CPU pushes with an error code (40 without)
_EVENTS_SIZE = 64                  # struct kvm_vcpu_events; exception.injected at 0, .pending at 3
_SETTLE_NS = 1_000_000             # deadline re-armed to let a held exception reach its stub
_SETTLE_TRIES = 16
# A settle for a maybe-held #BP (_past_software_trap) is tried again only if the vCPU's
# thread got less CPU than this since the last settle's entry: a held trap is delivered at
# the entry, before any instruction, so a re-entry that ran the guest this long and ended on
# the kick again held none (code whose instructions all end in 0xCC otherwise settled 16
# times per slice, each slice ~138 ms: tests/test_redteam_kvm_settle.py).
_SETTLE_RAN_NS = 200_000
# After an exit handled past the slice's deadline, the guest still runs this long (or to its
# next exit) before the slice ends: the state the handler left (an iret to the interrupted
# code, a hypercall's return) must run before the next slice delivers the next event. Without
# it, a vCPU whose event handling took its whole slice (each exit ~0.3 ms on a loaded
# kvm-pvm host, a 4 ms Linux tick always overdue after the other vCPU's slice) could have
# the next event bounced at the very RIP it was interrupted at, slice after slice (Linux's
# soft lockups with an unchanged RIP, 2 vCPUs at load 15+).
_GRACE_NS = 100_000
# AIOVMM_KVM_VCPU_THREAD=1 (read as each engine is made): every KVM_RUN of an engine (with
# the exits csrc/kvm.c completes itself) runs on a thread of its own, and the vCPU's task
# awaits the exits that need Python while the loop runs backends (_VcpuThread;
# docs/design.md "vCPU slices on a vCPU thread"). Off by default: the measured trade and
# what stays open are written there.
VCPU_THREAD_ENV = "AIOVMM_KVM_VCPU_THREAD"
_VT_RUN_EX, _VT_RUN, _VT_COMPLETE = 1, 2, 3     # csrc/kvm.c VT_*
KICK_SIGNAL = signal.SIGRTMIN + 7  # the slice timer's signal (csrc/kvm.c AIOVMM_KICK_SIGNAL)
_STEP_NS = 50_000_000             # a single step's first deadline (step_to) ...
_STEP_MAX_NS = 2_000_000_000      # ... and how long kicks may keep it from running


_GPR: dict[str, tuple[int, int]] = {}
for _i, _n in enumerate("rax rcx rdx rbx rsp rbp rsi rdi".split()):
    _k = _REG_INDEX[_n]
    _GPR[_n], _GPR["e" + _n[1:]], _GPR[_n[1:]] = (_k, 8), (_k, 4), (_k, 2)
for _n in range(8, 16):
    _k = _REG_INDEX[f"r{_n}"]
    _GPR[f"r{_n}"], _GPR[f"r{_n}d"], _GPR[f"r{_n}w"], _GPR[f"r{_n}b"] = (_k, 8), (_k, 4), (_k, 2), (_k, 1)
for _n, _b in (("al", "rax"), ("cl", "rcx"), ("dl", "rdx"), ("bl", "rbx")):
    _GPR[_n] = (_REG_INDEX[_b], 1)


class KVMUnavailable(RuntimeError):
    """/dev/kvm is absent, not usable, or lacks a capability this engine needs."""


_kvm_fd: int | None = None
_lib: ctypes.CDLL | None = None
_unavailable: str | None = None


def _native() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        if not os.path.exists(_NATIVE):
            raise KVMUnavailable(f"{_NATIVE} not built: run `make setup`")
        lib = ctypes.CDLL(_NATIVE)
        lib.aiovmm_kvm_run.argtypes = [ctypes.c_int]
        lib.aiovmm_kvm_slice_begin.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        lib.aiovmm_kvm_slice_end.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.aiovmm_kvm_complete.argtypes = [ctypes.c_int, ctypes.c_void_p]
        lib.aiovmm_kvm_take_kick.argtypes = [ctypes.c_void_p]
        lib.aiovmm_kvm_timer_create.argtypes = [ctypes.c_void_p]
        lib.aiovmm_kvm_timer_delete.argtypes = [ctypes.c_void_p]
        # aiovmm_kvm_guard_frame: no argtypes (hot): a c_void_p and four ints below 2^31.
        lib.aiovmm_kvm_make_vm.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_char_p,
                                           ctypes.c_void_p, ctypes.c_void_p]
        lib.aiovmm_kvm_run_ex.argtypes = [ctypes.c_void_p]
        lib.aiovmm_kvm_back_to_cpl3.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.aiovmm_kvm_back_to_cpl3.restype = None
        lib.aiovmm_kvm_syscall_entry.argtypes = [ctypes.c_void_p]
        lib.aiovmm_kvm_syscall_entry.restype = None
        lib.aiovmm_kvm_guest_maddr.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int]
        lib.aiovmm_kvm_guest_maddr.restype = ctypes.c_uint64
        lib.aiovmm_kvm_layout.argtypes = [ctypes.c_int]
        lib.aiovmm_kvm_layout.restype = ctypes.c_size_t
        from .vcpu import PVState
        if (lib.aiovmm_kvm_layout(0), lib.aiovmm_kvm_layout(1), lib.aiovmm_kvm_layout(2),
                lib.aiovmm_kvm_layout(3)) != \
                (ctypes.sizeof(_RunCtx), ctypes.sizeof(PVState), ctypes.sizeof(_GuardArgs), CENSUS_N):
            raise KVMUnavailable(f"{_NATIVE} is stale (run `make setup`)")
        lib.aiovmm_kvm_pool_new.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_char_p,
                                            ctypes.c_size_t, ctypes.c_int]
        lib.aiovmm_kvm_pool_new.restype = ctypes.c_void_p
        lib.aiovmm_kvm_pool_take.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.aiovmm_kvm_pool_retire.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.aiovmm_kvm_pool_retire.restype = None
        lib.aiovmm_kvm_pool_refill.argtypes = [ctypes.c_void_p]
        lib.aiovmm_kvm_pool_refill.restype = None
        lib.aiovmm_kvm_pool_state.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.aiovmm_kvm_pool_state.restype = None
        lib.aiovmm_kvm_pool_free.argtypes = [ctypes.c_void_p]
        lib.aiovmm_kvm_pool_free.restype = None
        lib.aiovmm_kvm_thread_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.aiovmm_kvm_thread_new.restype = ctypes.c_void_p
        for fn in ("kick", "free"):
            getattr(lib, f"aiovmm_kvm_thread_{fn}").argtypes = [ctypes.c_void_p]
            getattr(lib, f"aiovmm_kvm_thread_{fn}").restype = None
        for fn in ("post", "call"):
            getattr(lib, f"aiovmm_kvm_thread_{fn}").argtypes = [ctypes.c_void_p, ctypes.c_int]
        for fn in ("result", "quiesce"):
            getattr(lib, f"aiovmm_kvm_thread_{fn}").argtypes = [ctypes.c_void_p]
        lib.aiovmm_kvm_mb.argtypes = []
        lib.aiovmm_kvm_mb.restype = None
        lib.aiovmm_kvm_thread_spin.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.aiovmm_kvm_thread_spin.restype = None
        _lib = lib
    return _lib


def _system_fd() -> int:
    global _kvm_fd
    if _kvm_fd is None:
        try:
            fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KVMUnavailable(f"/dev/kvm: {e.strerror}") from None
        if fcntl.ioctl(fd, Ioctl.GET_API_VERSION) != 12:
            os.close(fd)
            raise KVMUnavailable("/dev/kvm: unexpected KVM API version")
        for cap in (Cap.SYNC_REGS, Cap.IMMEDIATE_EXIT):
            if not fcntl.ioctl(fd, Ioctl.CHECK_EXTENSION, int(cap)):
                os.close(fd)
                raise KVMUnavailable(f"/dev/kvm lacks KVM_CAP_{cap.name}")
        _kvm_fd = fd
    return _kvm_fd


_mmap_size = 0


def _vcpu_mmap_size() -> int:
    global _mmap_size
    if not _mmap_size:
        _mmap_size = fcntl.ioctl(_system_fd(), Ioctl.GET_VCPU_MMAP_SIZE)
    return _mmap_size


def unavailable_reason() -> str | None:
    """None if this engine can run here, else why not (cached)."""
    global _unavailable
    if _unavailable is None:
        try:
            _system_fd()
            _native()
            _unavailable = ""
        except (KVMUnavailable, OSError) as e:
            _unavailable = str(e) or type(e).__name__
    return _unavailable or None


def supported_cpuid() -> list[tuple[int, int, int, int, int, int]]:
    """KVM's supported CPUID table on this host, as set_cpuid() entries (a base a CPUID
    policy can edit)."""
    n = 256
    buf = bytearray(struct.pack("<II", n, 0) + bytes(40 * n))
    fcntl.ioctl(_system_fd(), Ioctl.GET_SUPPORTED_CPUID, buf)
    count = struct.unpack_from("<I", buf, 0)[0]
    out = []
    for i in range(count):
        leaf, sub, _flags, a, b, c, d = struct.unpack_from("<IIIIIII", buf, 8 + 40 * i)
        out.append((leaf, sub, a, b, c, d))
    return out


_cpuid_cache: list[tuple[int, int, int, int, int, int]] | None = None


def _default_cpuid() -> list[tuple[int, int, int, int, int, int]]:
    global _cpuid_cache
    if _cpuid_cache is None:
        _cpuid_cache = supported_cpuid()
    return _cpuid_cache


def _cpuid2(entries: Sequence[tuple[int, int, int, int, int, int]]) -> bytes:
    """struct kvm_cpuid2 of (leaf, subleaf, eax, ebx, ecx, edx) entries, each matched on its
    subleaf."""
    ent = struct.Struct("<IIIIIII12x")
    buf = bytearray(struct.pack("<II", len(entries), 0))
    for leaf, sub, a, b, c, d in entries:
        buf += ent.pack(leaf, sub, 1, a, b, c, d)         # KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return bytes(buf)


_cpuid2_default: bytes | None = None


# The vendor of the VM's CPUID table on kvm-pvm: neither AMD nor Hygon (nor Intel), so that
# KVM's emulator refuses SYSCALL outside 64-bit mode (em_syscall_is_enabled: #UD). Measured:
# with AMD's vendor a compat-mode SYSCALL continues IN RING 0 at MSR_CSTAR truncated to 32
# bits, a guest address: code a guest maps there ran in ring 0 of a VM whose memory is all
# machine memory. With this one it is a #UD at CPL 3 at the instruction, which _from_vector
# turns into the compat SYSCALL it was (Xen's cstar_enter). Guest-invisible there: CPUID runs
# natively at CPL 3 on kvm-pvm (the host's). Hardware KVM keeps the table as it is (there
# the table is the guest's CPUID, and SYSCALL enters CSTAR, the engine's stub, in full).
_PVM_VENDOR = struct.unpack("<III", b"aiovmmNoSysc")     # ebx, edx, ecx


def _cpuid2_buffer() -> bytes:
    """The default table (KVM's supported CPUID) as a kvm_cpuid2, built once; on kvm-pvm
    with _PVM_VENDOR in leaf 0."""
    global _cpuid2_default
    if _cpuid2_default is None:
        table = _default_cpuid()
        if not hardware_virtualization():
            b, d, c = _PVM_VENDOR
            table = [(0, sub, a, b, c, d) if leaf == 0 else (leaf, sub, a, b_, c_, d_)
                     for leaf, sub, a, b_, c_, d_ in table]
        _cpuid2_default = _cpuid2(table)
    return _cpuid2_default


def hardware_virtualization() -> bool:
    """True on VMX/SVM hosts; False on kvm-pvm (no vmx/svm in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "vmx" in flags or "svm" in flags
    except OSError:
        pass
    return False


# kvm-pvm reports an I/O exit with RIP already past the instruction; hardware KVM with RIP on
# it (KVM skips it at the next KVM_RUN unless RIP was changed).
_IO_RIP_AFTER = not hardware_virtualization()
# kvm-pvm emulates every CPL-0 instruction, a SYSCALL from compatibility mode too, and writes
# its RIP back truncated to 32 bits: MSR_CSTAR's low half, a guest user address, run at ring 0
# (setup_long_mode). CR4.SMEP makes that fetch fault (every guest mapping is a user page).
# Not with hardware virtualization: there SYSCALL enters the entry page (a user page) at ring
# 0 at its full address, and SMEP would fault every one.
_CR4_SMEP = 0 if hardware_virtualization() else CR4_SMEP
# Targeted shadow invalidation needs KVM to emulate the ring-0 stub's stores (kvm-pvm: every
# CPL-0 instruction is emulated). With hardware virtualization the stub would run natively
# and its stores would invalidate nothing, so there the engine zaps instead.
_TARGETED = _IO_RIP_AFTER


_cpl3_xstate_cache: list["Xstate | None"] = []


def cpl3_xstate() -> "Xstate | None":
    """The XSAVE state a guest's CPL-3 code can use on this host's KVM whatever its kernel
    enabled, offered to the kernel through the PV CPUID (cpuid.xstate) so that it switches
    that state between its processes. kvm-pvm runs guest code under the host's XCR0 (KVM
    does not load the guest's there; measured: with guest CR4.OSXSAVE and KVM_SET_XCRS(XCR0=3)
    a CPL-3 XGETBV still returns the host's 0x207, and `vpxor %ymm0` runs) and CPUID at CPL 3
    is the host's (no CPUID faulting). A kernel told "no XSAVE" switches with FXSAVE, which
    leaves the upper 16 bytes of each ymm register to whichever process ran last: Linux's
    glibc copies with ymm registers, and 16-byte runs of one process's data showed up in
    another's console output (issue 11). The components are the host's XCR0 (KVM's leaf 0xd)
    within what Xen gives a PV guest; None on hardware KVM, which loads the guest's XCR0
    (and the engine's CR4 has no OSXSAVE, so AVX faults there as the policy says)."""
    if not _cpl3_xstate_cache:
        from .cpuid import PV_XCR0, XCR0_FP_SSE, Xcr0, Xstate
        offer: Xstate | None = None
        if not hardware_virtualization():
            leaves = {(leaf, sub): (a, b) for leaf, sub, a, b, c, d in _default_cpuid() if leaf == 0xD}
            lo, hi = next(((a, d) for leaf, sub, a, b, c, d in _default_cpuid() if (leaf, sub) == (0xD, 0)),
                          (0, 0))
            mask = (lo | hi << 32) & PV_XCR0
            if mask & Xcr0.AVX and (mask & XCR0_FP_SSE) == XCR0_FP_SSE:
                layout = {bit: leaves[(0xD, bit)] for bit in range(2, 64)
                          if mask >> bit & 1 and (0xD, bit) in leaves}
                offer = Xstate(sum(1 << b for b in layout) | XCR0_FP_SSE, layout)
        _cpl3_xstate_cache.append(offer)
    return _cpl3_xstate_cache[0]


def hypercall_page() -> bytes:
    """This engine's hypercall page: `mov $nr,%eax; out %al,$HCALL_PORT; ret` per 32-byte
    stub (no clobbers, unlike syscall); iret (23) pushes rcx, r11, rax first as on Xen."""
    page = bytearray(b"\xcc" * PAGE_SIZE)
    out = bytes([0xE6, HCALL_PORT])
    for i in range(128):
        if i == 23:
            stub = b"\x51\x41\x53\x50\xb8" + (23).to_bytes(4, "little") + out
        else:
            stub = b"\xb8" + i.to_bytes(4, "little") + out + b"\xc3"
        page[32 * i:32 * i + len(stub)] = stub
    return bytes(page)


class _Ring0:
    """IDT, stubs, TSS and ring-0 stack: four DOMID_XEN frames mapped supervisor-only in Xen's
    slot 261 of every address space. Built once per XenArea (shared by all KVM engines)."""

    def __init__(self, xen: "XenArea") -> None:
        mem = xen.mem
        base = xen.BASE + R0_L1_INDEX * PAGE_SIZE
        self.idt_va, self.stubs_va, self.tss_va, self.stack_va = (base + i * PAGE_SIZE for i in range(4))
        self.stack_top = self.stack_va + PAGE_SIZE
        idt, stubs, tss, stack = (mem.alloc(DOMID_XEN)[0] for _ in range(4))
        self.stack_maddr = stack << PAGE_SHIFT
        code = bytearray(b"\xf4" * PAGE_SIZE)
        for v in range(256):
            h = self.stubs_va + _STUB_STRIDE * v
            code[_STUB_STRIDE * v:_STUB_STRIDE * v + 2] = bytes([0xE6, v])
            # DPL 3 everywhere so `int $n` reaches the host as vector n (the host applies
            # Xen's gate rules, _from_vector). Measured: with DPL-0 gates kvm-pvm reports
            # `int $n` inconsistently (#UD at the instruction, or #GP(0) past it).
            # IST 1 (the same stack as RSP0): a fault taken in ring 0 (kvm-pvm's compat
            # SYSCALL, below) lands on the engine stack too, never on the guest's.
            attr = 0xEE
            lo = (h & 0xFFFF) | (FLAT_RING0_CS64 << 16) | (_IST << 32) | (attr << 40) \
                | (((h >> 16) & 0xFFFF) << 48)
            mem.write(idt << PAGE_SHIFT | 16 * v, struct.pack("<QQ", lo, h >> 32))
        # MSR_CSTAR's entry: SYSCALL from compatibility mode (Xen's cstar_enter, told apart
        # from LSTAR's by where it exits), in the supervisor-only stubs page: on hardware KVM
        # it enters ring 0 there. kvm-pvm would enter ring 0 at CSTAR truncated to 32 bits, a
        # guest address (measured): there the VM's CPUID vendor makes it a #UD instead
        # (_PVM_VENDOR), which _from_vector turns back into the compat SYSCALL.
        code[SYSCALL32_OFF:SYSCALL32_OFF + 3] = bytes([0xE6, SYSCALL_PORT, 0xF4])
        self.syscall32_va = self.stubs_va + SYSCALL32_OFF
        mem.write(stubs << PAGE_SHIFT, bytes(code))
        mem.write((tss << PAGE_SHIFT) + 4, struct.pack("<Q", self.stack_top))
        mem.write((tss << PAGE_SHIFT) + 0x24, struct.pack("<Q", self.stack_top))   # IST1
        # I/O permission bitmap: only HCALL_PORT is open at CPL 3 (an exit); every other port
        # faults #GP natively, as for a Xen PV guest without I/O privilege.
        bitmap = bytearray(b"\xff" * (_IOBITMAP_BYTES + 1))
        for port in (HCALL_PORT, SYSCALL_PORT, *_DIRECT_PORTS):
            bitmap[port >> 3] &= ~(1 << (port & 7))
        struct.pack_into("<H", mem.map, (tss << PAGE_SHIFT) + 102, 104)
        mem.write((tss << PAGE_SHIFT) + 104, bytes(bitmap))
        # Walk slot 261 (L3 -> L2[0] -> L1) and add the four pages after XenArea's own.
        l3 = xen.slots[261] & PTE_FRAME_MASK
        l2 = mem.read_u64(l3) & PTE_FRAME_MASK
        l1 = mem.read_u64(l2) & PTE_FRAME_MASK
        sup = _PAGE_PRESENT | _PAGE_ACCESSED
        for i, (mfn, flags) in enumerate(((idt, sup | _PAGE_NX), (stubs, sup),
                                          (tss, sup | _PAGE_NX),
                                          (stack, sup | _PAGE_RW | _PAGE_DIRTY | _PAGE_NX))):
            mem.write_u64(l1 + 8 * (R0_L1_INDEX + i), (mfn << PAGE_SHIFT) | flags)
        # Guest-visible pages of this engine, in Xen's L4 slot 257 (unused by Xen for PV
        # guests, outside the slots the hostile suite proves unreadable):
        # - the M2P again, read-only, from its base: kvm-pvm reserves slot 256 (Xen's M2P
        #   address), so XENMEM_machphys_mapping reports this one; reads at Xen's fixed
        #   address fault and are emulated (_emulate_m2p_read);
        # - the SYSCALL entry (last page of the slot). Measured on kvm-pvm: SYSCALL from CPL 3
        #   jumps to LSTAR but stays at CPL 3, so a supervisor-only entry page faults. The
        #   entry holds one `out` to SYSCALL_PORT, harmless to run directly (a syscall).
        page, e3, e2, e1 = (mem.alloc(DOMID_XEN)[0] for _ in range(4))
        mem.write(page << PAGE_SHIFT, bytes([0xE6, SYSCALL_PORT]) + b"\xf4" * 14)
        user = _PAGE_PRESENT | _PAGE_ACCESSED | _PAGE_USER
        m2p_l3 = xen.slots[256] & PTE_FRAME_MASK
        mem.write(e3 << PAGE_SHIFT, mem.read(m2p_l3, 8 * 511))
        mem.write_u64((e1 << PAGE_SHIFT) + 8 * 511, (page << PAGE_SHIFT) | user)
        mem.write_u64((e2 << PAGE_SHIFT) + 8 * 511, (e1 << PAGE_SHIFT) | user | _PAGE_RW)
        mem.write_u64((e3 << PAGE_SHIFT) + 8 * 511, (e2 << PAGE_SHIFT) | user | _PAGE_RW)
        xen.slots[GUEST_L4_SLOT] = (e3 << PAGE_SHIFT) | user | _PAGE_RW
        self.m2p_va = 0xFFFF000000000000 | (GUEST_L4_SLOT << 39)
        self.syscall_va = self.m2p_va + (1 << 39) - PAGE_SIZE
        self.m2p_maddr = mem.m2p_first << PAGE_SHIFT
        self.m2p_bytes = mem.m2p_frames << PAGE_SHIFT
        if self.m2p_bytes > _DMAP_L3_FIRST << 30:
            raise ValueError("machine memory too large for the engine's direct map")
        # Targeted shadow invalidation (_ShadowInvalidator): the stub, its list pages
        # (supervisor-only, after the IDT/stubs/TSS/stack), and a supervisor-only direct map of
        # all machine memory (2 MiB pages, A/D preset so KVM's walker writes nothing there).
        # Nothing in it ever changes, so no shadow of it can go stale; CPL 3 cannot reach it
        # (the L3 entries lack _PAGE_USER).
        mem.write((stubs << PAGE_SHIFT) + _INVAL_STUB_OFF, _INVAL_CODE)
        self.inval_stub_va = self.stubs_va + _INVAL_STUB_OFF
        self.list_maddrs = []
        for i in range(_INVAL_LIST_PAGES):
            f = mem.alloc(DOMID_XEN)[0]
            mem.write_u64(l1 + 8 * (R0_L1_INDEX + 4 + i),
                          (f << PAGE_SHIFT) | sup | _PAGE_RW | _PAGE_DIRTY | _PAGE_NX)
            self.list_maddrs.append(f << PAGE_SHIFT)
        self.list_va = base + 4 * PAGE_SIZE
        self.dmap_va = self.m2p_va + (_DMAP_L3_FIRST << 30)
        sup_rw = _PAGE_PRESENT | _PAGE_ACCESSED | _PAGE_RW
        big = sup_rw | _PAGE_DIRTY | _PAGE_NX | 0x80               # PS: a 2 MiB page
        for g in range((mem.size + (1 << 30) - 1) >> 30):
            l2 = mem.alloc(DOMID_XEN)[0]
            mem.write((l2 << PAGE_SHIFT), b"".join(
                struct.pack("<Q", ((g << 30) + (j << 21)) | big) for j in range(512)))
            mem.write_u64((e3 << PAGE_SHIFT) + 8 * (_DMAP_L3_FIRST + g), (l2 << PAGE_SHIFT) | sup_rw)


def ring0(xen: "XenArea") -> _Ring0:
    r = getattr(xen, "_kvm_ring0", None)
    if r is None:
        r = xen._kvm_ring0 = _Ring0(xen)
    return r


_FAST_IN_MAX = 4                  # csrc/kvm.c AIOVMM_FAST_IN_MAX


class _FastIn(ctypes.Structure):
    """An IN aiovmm_kvm_run_ex answers all ones itself (RIP, the instruction's machine
    address, port)."""
    _fields_ = [("rip", ctypes.c_uint64), ("maddr", ctypes.c_uint64), ("port", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


# Hypercalls aiovmm_kvm_run_ex completes itself (fast_hypercall), in its fast_calls order.
_FAST_CALLS = (Hypercall.stack_switch, Hypercall.set_segment_base, Hypercall.iret, Hypercall.vcpu_op)
# The queries it answers (fast_query), in its fast_queries order: xen_version(XENVER_version),
# vcpu_op naming no vCPU.
_FAST_QUERIES = (Hypercall.xen_version, Hypercall.vcpu_op)


class _RunCtx(ctypes.Structure):
    """csrc/kvm.c struct aiovmm_kvm_ctx: what aiovmm_kvm_run_ex needs to recognise a
    hypercall exit without Python decoding kvm_run."""
    _fields_ = [("vcpu_fd", ctypes.c_int32), ("hcall_port", ctypes.c_int32), ("run", ctypes.c_void_p),
                ("stubs_lo", ctypes.c_uint64), ("stubs_hi", ctypes.c_uint64), ("exits", ctypes.c_uint64),
                ("timer", ctypes.c_void_p), ("grace_ns", ctypes.c_int64),
                ("syscall_port", ctypes.c_int32), ("pad", ctypes.c_int32), ("syscall_va", ctypes.c_uint64),
                ("mem_base", ctypes.c_uint64), ("run_size", ctypes.c_uint64),
                ("fast_n", ctypes.c_uint32), ("fast_next", ctypes.c_uint32), ("fast_hits", ctypes.c_uint64),
                ("fast", _FastIn * _FAST_IN_MAX),
                ("cs64", ctypes.c_uint8 * 24), ("cs32", ctypes.c_uint8 * 24), ("ss3", ctypes.c_uint8 * 24),
                ("pv", ctypes.c_void_p), ("fast_hc", ctypes.c_uint32), ("page_rip_after", ctypes.c_uint32),
                ("mem_size", ctypes.c_uint64), ("fast_calls", ctypes.c_uint64 * len(_FAST_CALLS)),
                ("deadline_ns", ctypes.c_int64),
                ("ready_kroot", ctypes.c_uint64), ("ready_uroot", ctypes.c_uint64),
                ("fast_bounces", ctypes.c_uint64), ("fast_user_irets", ctypes.c_uint64),
                ("fast_page", ctypes.c_uint64), ("fast_queries", ctypes.c_uint64 * len(_FAST_QUERIES)),
                ("r0_stack_va", ctypes.c_uint64), ("r0_stack_maddr", ctypes.c_uint64),
                ("fast_cli_sti", ctypes.c_uint64),
                ("fast_upcalls", ctypes.c_uint64),
                ("cpl3_cs", ctypes.c_uint8 * 24), ("cpl3_cs_set", ctypes.c_uint32),
                ("pad3", ctypes.c_uint32), ("census", ctypes.c_void_p),
                ("cpl3_ss", ctypes.c_uint8 * 24), ("cpl3_ss_set", ctypes.c_uint32), ("pad4", ctypes.c_uint32)]


# csrc/kvm.c's exit census keys (census_note): what one KVM_RUN ended with.
_CK_KICK, _CK_PORT, _CK_SYSCALL32, _CK_VIA_PAGE, _CK_HC = 32, 33, 34, 35, 64
_CK_USER = _CK_HC + 64 * 64
_CK_VEC = _CK_USER + 512
CENSUS_N = _CK_VEC + 256


def census_key(k: int) -> tuple[int | str, ...]:
    """A census counter's index as what it counts: ("hypercall", nr, sub) with sub the
    command (first argument, 63: 63 or more) of hypercalls that take one first, else 0;
    ("user syscall", RAX) (511: 511 or more); ("vector", v); ("slice end",) (the timer's
    kick); ("port io",); ("syscall32",); ("kvm exit", reason) for exits other than I/O; and
    CENSUS_VIA_PAGE, not an exit: how many of the hypercalls came through the engine's
    hypercall page rather than a `syscall`."""
    if k >= _CK_VEC:
        return ("vector", k - _CK_VEC)
    if k >= _CK_USER:
        return ("user syscall", k - _CK_USER)
    if k >= _CK_HC:
        return ("hypercall", (k - _CK_HC) // 64, (k - _CK_HC) % 64)
    return {_CK_KICK: ("slice end",), _CK_PORT: ("port io",), _CK_SYSCALL32: ("syscall32",),
            _CK_VIA_PAGE: CENSUS_VIA_PAGE}.get(k, ("kvm exit", k))


CENSUS_VIA_PAGE = ("of the hypercalls: through the hypercall page",)


class _VMPool:
    """Fresh KVM VMs for one machine memory, made ahead of need by a C worker thread
    (csrc/kvm.c aiovmm_kvm_pool_*), so that a domain's creation takes a ready VM instead of
    paying KVM_CREATE_VM, memory slot 0 and KVM_CREATE_VCPU on the loop (~5-8 ms of create()
    under load, measured: mostly KVM_CREATE_VCPU on kvm-pvm). Each VM is one with one vCPU,
    slot 0 the whole machine memory, KVM's supported CPUID set; never run.

    Honest accounting: the work is not gone, it runs in the worker (when the hypervisor
    starts, and again after each take) while the loop runs guests; a burst of more than
    POOL_SIZE creations makes the extra ones build their VM on the loop as before, and a
    hypervisor's first KVM domain finds the pool still filling if it is created at once.
    Engines also hand their VM back to be destroyed in the worker (KVM's VM teardown, ~3 ms
    under load, was on the loop). The pool never reuses a VM that has run: a vCPU that ran
    holds a previous guest's state (FPU/SSE registers, shadow pages). The worker is C, not a
    Python thread: its GIL re-acquisitions between ioctls stalled the loop for scheduler
    latencies on a loaded machine (take() ~1.8 ms median)."""

    POOL_SIZE = 2
    REFILL_DELAY_S = 0.02    # after a take: past the new domain's first slices (create -> first byte)

    def __init__(self, mem: "MachineMemory") -> None:
        self.mem = mem
        self._lib = _native()
        cpuid = _cpuid2_buffer()
        self._pool = self._lib.aiovmm_kvm_pool_new(_system_fd(), mem.size, mem.fd_address, cpuid,
                                                   len(cpuid), self.POOL_SIZE)
        self._refill: "asyncio.TimerHandle | None" = None

    def take(self) -> tuple[int, int]:
        """(vm_fd, vcpu_fd) of a fresh VM, made here if none is ready. Raises OSError."""
        fds = (ctypes.c_int * 2)()
        lib = self._lib
        if self._pool:
            self._schedule_refill()
            if lib.aiovmm_kvm_pool_take(self._pool, ctypes.byref(fds, 0), ctypes.byref(fds, 4)) == 0:
                return fds[0], fds[1]
        rc = lib.aiovmm_kvm_make_vm(_system_fd(), self.mem.size, self.mem.fd_address, _cpuid2_buffer(),
                                    ctypes.byref(fds, 0), ctypes.byref(fds, 4))
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        return fds[0], fds[1]

    def _schedule_refill(self) -> None:
        """Wake the worker REFILL_DELAY_S from now, on the loop (not during the domain's
        creation and first slices: the woken worker can preempt the loop thread). Without
        a running loop (a synchronous caller), at once."""
        if self._refill is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._refill_now()
            return
        self._refill = loop.call_later(self.REFILL_DELAY_S, self._refill_now)

    def _refill_now(self) -> None:
        self._refill = None
        if self._pool:
            self._lib.aiovmm_kvm_pool_refill(self._pool)

    def state(self) -> tuple[int, int]:
        """(VMs ready, retired VMs not closed yet)."""
        out = (ctypes.c_int * 2)()
        if self._pool:
            self._lib.aiovmm_kvm_pool_state(self._pool, ctypes.byref(out, 0), ctypes.byref(out, 4))
        return out[0], out[1]

    def retire(self, vm_fd: int, vcpu_fd: int) -> None:
        """Destroy a VM an engine is done with, in the worker."""
        if self._pool:
            self._lib.aiovmm_kvm_pool_retire(self._pool, vcpu_fd, vm_fd)
        else:
            os.close(vcpu_fd)
            os.close(vm_fd)

    def close(self) -> None:
        """Stop the worker once it has destroyed the retired VMs; destroy the ready ones.
        Blocks for up to one VM creation: call it from a thread."""
        pool, self._pool = self._pool, None
        if self._refill is not None:
            self._refill.cancel()
            self._refill = None
        if pool:
            self._lib.aiovmm_kvm_pool_free(pool)


def vm_pool(mem: "MachineMemory") -> _VMPool:
    """The VM pool of this machine memory (made on first use)."""
    p = getattr(mem, "_kvm_pool", None)
    if p is None:
        p = mem._kvm_pool = _VMPool(mem)
    return p


async def close_vm_pool(mem: "MachineMemory") -> None:
    """Before the machine memory is unmapped: destroy the pooled VMs, wait for the worker."""
    p = getattr(mem, "_kvm_pool", None)
    if p is not None:
        del mem._kvm_pool
        await asyncio.to_thread(p.close)


_ENTRIES = struct.Struct("<512Q")
_PT_L1, _PT_L4 = int(PageType.l1), int(PageType.l4)      # page-table types are levels 1..4
_HCALL_ARGS = struct.Struct("<Q16xQQQ16xQ8xQ")   # kvm_regs: rax, rdx, rsi, rdi, r8, r10


class _GuardArgs(ctypes.Structure):
    """csrc/kvm.c struct aiovmm_guard: aiovmm_kvm_guard_frame's inputs and outputs."""
    _fields_ = [("mem_base", ctypes.c_uint64), ("arena", ctypes.c_uint64), ("owner", ctypes.c_uint64),
                ("nr_frames", ctypes.c_uint64), ("l4_first", ctypes.c_int32), ("l4_last", ctypes.c_int32),
                ("cleared", ctypes.c_int32 * 512), ("out", ctypes.c_uint64 * 1536)]


class _ShadowGuard:
    """Tracks what KVM's shadow pages may hold of the page tables, so that the engine can
    invalidate exactly what the hypervisor changed behind KVM's back (its host-side writes
    to guest page tables, docs/design.md).

    Invariant: KVM holds shadow pages only of tracked frames, and for each its view equals
    the snapshot kept here, except for entries that only became present (KVM never caches a
    non-present guest entry: it walks the guest tables again on the fault), and for the
    `deferred` entries, whose old translation KVM may still hold as a TLB may on Xen.
    - KVM can only shadow frames reachable from the roots it was given: every root is walked
      before the KVM_RUN that uses it, and so is every table an entry links in, one that
      became present or one retargeted from another table (mmu_update's present-to-present
      write: untracked, the new table's later changes were never invalidated, not even at
      the guest's flush; tests/test_redteam_kvm_guard_retarget.py). The engine checks
      before each KVM_RUN that follows a page-table write.
    - A tracked frame is a validated page table, tracked at most at its type's level (a
      validated entry links no table of a lower type than its level; `_reach`, which
      `_walk` asks for every frame), which only MachineMemory.write_pte changes;
      the frames it wrote are diffed against their snapshots: every entry removed,
      retargeted or with changed permissions must be invalidated, or the whole frame if
      many changed. A/D bits aside: KVM sets them in guest memory itself, so a snapshot
      does not show them; an entry the host wrote without A or D that were set just before
      (write_pte reports it) is invalidated too, or KVM's writable shadow entry would let
      the next write leave it clean.
    - A frame that stops being a page table (mmu devalidates it; it may be written as data
      from then on) has every shadow page of it dropped and is untracked, before the guest
      runs again. It can only become reachable again through a root load or an entry
      linking it in, both of which track it anew from its contents then.
    - Deferred (Xen's TLB semantics): an L1 entry removed or reduced by mmu_update,
      update_va_mapping or a ptwr store, whose old translation named a frame of the
      table's own domain, stays in KVM until the guest flushes its TLB (flush_tlb, a CR3
      load: `flush_deferred`), as Xen leaves it in the TLB. At the points where Xen flushes
      whatever the guest asked, a frame freed (it may go to another domain) or taking a
      page-table or descriptor type (it must not stay writable), MachineMemory sets
      `flush_deferred` on every guard. Anything else (upper levels, grants, Xen's pages,
      ptwr's scratch frame) is invalidated before the next KVM_RUN. Linux's mark_rodata_ro
      (one mmu_update per PTE, one flush at the end) costs one invalidation run, not one
      per PTE.
    MachineMemory reports writes and drops into `written` and `dropped`."""

    WHOLE_FRAME_OVER = 16            # more changed entries than this: drop the frame's shadows

    def __init__(self, mem: "MachineMemory") -> None:
        self.mem = mem
        self.level: dict[int, int] = {}       # frame -> highest level it is reached at
        self.slot: dict[int, int] = {}        # frame -> its snapshot's page in the arena
        self.roots: set[int] = set()
        self.written: set[int] = set()
        self.dropped: set[int] = set()
        self.ad_cleared: set[int] = set()     # entries that stayed present but lost A or D
        # Removed or reduced L1 entries of the domain's own frames whose invalidation waits
        # for the guest's next TLB flush, CR3 load, or a safety point (flush_deferred).
        self.deferred: set[int] = set()
        self.flush_deferred = False
        self.deferred_max = 0                  # the largest `deferred` seen (measurement)
        self._free: list[int] = []
        self._arena = ctypes.create_string_buffer(0)
        self._cap = 0
        self._args = _GuardArgs(mem.fd_address, 0, 0, mem.nr_frames, XEN_L4_FIRST, XEN_L4_LAST)
        self._args_ptr = ctypes.c_void_p(ctypes.addressof(self._args))
        self._out, self._cleared = self._args.out, self._args.cleared
        self._step = _native().aiovmm_kvm_guard_frame
        mem.pt_watchers.append(self)

    def close(self) -> None:
        if self in self.mem.pt_watchers:
            self.mem.pt_watchers.remove(self)

    def __len__(self) -> int:
        return len(self.level)

    def reset(self, root: int) -> None:
        """After a zap KVM holds nothing; track from the current root on."""
        self.level.clear()
        self.slot.clear()
        self.written.clear()
        self.dropped.clear()
        self.ad_cleared.clear()
        self.deferred.clear()
        self.flush_deferred = False
        self._free = list(range(self._cap - 1, -1, -1))
        self.roots = set()
        self.add_root(root)

    def add_root(self, root: int) -> None:
        if root not in self.roots:
            self.roots.add(root)
            self._walk(root)

    def _snapshot(self, mfn: int) -> None:
        """Copy the frame's current contents into its arena page (allocated if new)."""
        slot = self.slot.get(mfn)
        if slot is None:
            if not self._free:
                self._grow()
            slot = self.slot[mfn] = self._free.pop()
        ctypes.memmove(ctypes.addressof(self._arena) + (slot << PAGE_SHIFT),
                       self.mem.fd_address + (mfn << PAGE_SHIFT), PAGE_SIZE)

    def _grow(self) -> None:
        cap = max(16, 2 * self._cap)
        arena = ctypes.create_string_buffer(cap << PAGE_SHIFT)
        ctypes.memmove(arena, self._arena, self._cap << PAGE_SHIFT)
        self._arena = arena
        self._args.arena = ctypes.addressof(arena)
        self._free.extend(range(cap - 1, self._cap - 1, -1))
        self._cap = cap

    def _walk(self, top: int, top_level: int = 4) -> None:
        """Track every table reachable from `top` (the tracked ones are current here: called
        after the pending writes were diffed, or after a reset). A frame seen again at a
        higher level than before (a linear-table entry reached it first) is descended from
        that level too. The one place that decides what is tracked and at which level:
        only a validated page table, at most at its type's level (`_reach`)."""
        level_of, reach = self.level, self._reach
        todo = [(top, top_level)]
        while todo:
            mfn, level = todo.pop()
            level = reach(mfn, level)
            if not level:
                continue
            seen = level_of.get(mfn)
            if seen is None:
                self._snapshot(mfn)
            elif seen >= level:
                continue
            level_of[mfn] = level
            if level > 1:
                todo += self._children(_ENTRIES.unpack_from(self._arena, self.slot[mfn] << PAGE_SHIFT), level)

    def _reach(self, mfn: int, level: int) -> int:
        """The level at which KVM can walk frame `mfn` when a path reaches it as a table of
        `level`, or 0: it is no page table (then no validated entry above level 1 names it,
        and it must not be tracked: a tracked frame is never walked again, and the snapshot
        of a data page, diffed once it became a table, hides the changes to its entries).
        A validated level-k entry names a table of type k-1, or k (linear, self), never one
        of a lower type than the level it links at: the level is at most the type's. A path's
        level can exceed it only for a table whose level was taken from before it was
        devalidated and validated anew at a lower one (an L2 made an L1 in one batch:
        walked as an L2, its data frames were tracked as L1s;
        tests/test_redteam_kvm_guard_retarget.py)."""
        if not 0 <= mfn < self.mem.nr_frames:
            return 0
        t = self.mem.type[mfn]
        return min(level, t) if _PT_L1 <= t <= _PT_L4 else 0

    @staticmethod
    def _children(entries: Sequence[int], level: int) -> list[tuple[int, int]]:
        if level == 4:
            entries = entries[:XEN_L4_FIRST] + entries[XEN_L4_LAST + 1:]   # Xen's slots: static
        return [((e & PTE_FRAME_MASK) >> PAGE_SHIFT, level - 1) for e in entries if e & _PAGE_PRESENT]

    def changes(self) -> tuple[list[int], list[int]]:
        """Consume the reported writes and drops: make the snapshots current, track the tables
        that added or retargeted entries reach, and return (machine addresses of entries KVM
        must forget, frames whose every shadow page KVM must drop). An L1 entry whose old
        translation named a frame of the table's own domain is deferred (`deferred`) until
        the next `flush_deferred`; everything else is returned at once.

        A dropped frame has all its shadows dropped and is untracked; one that is a page table
        again by now (devalidated and validated anew since the last check: an entry cleared
        and set back to it in one batch, which no diff shows) is walked again from its
        contents, at its level or its new type's if lower (`_walk`), as it may still be
        linked by entries that look unchanged."""
        frames: list[int] = []
        again: list[tuple[int, int]] = []
        if self.dropped:
            dropped, self.dropped = self.dropped, set()
            for mfn in dropped:
                level = self.level.get(mfn)
                if level is not None:
                    frames.append(mfn)
                    self._untrack(mfn)
                    again.append((mfn, level))       # _walk: only if a table again
        entries: list[int] = []
        if self.written:
            self._diff_written(entries, frames)
        for mfn, level in again:              # after the diffs: tracked snapshots are current
            self._walk(mfn, level)
        if self.flush_deferred:
            self.flush_deferred = False
            if self.deferred:
                by_frame: dict[int, list[int]] = {}
                level = self.level
                for a in self.deferred:
                    if a >> PAGE_SHIFT in level:      # untracked since: all of it dropped
                        by_frame.setdefault(a >> PAGE_SHIFT, []).append(a)
                self.deferred = set()
                for mfn, addrs in by_frame.items():
                    if len(addrs) > self.WHOLE_FRAME_OVER:
                        frames.append(mfn)
                    else:
                        entries += addrs
        return entries, frames

    def _diff_written(self, entries: list[int], frames: list[int]) -> None:
        """Diff every tracked frame written since the last check against its snapshot and
        make the snapshot current, in C (aiovmm_kvm_guard_frame: one call per frame, which
        classifies each lost entry as deferred or at once and lists the tables that added
        entries link in)."""
        written, self.written = self.written, set()
        cleared: dict[int, list[int]] = {}
        if self.ad_cleared:
            for a in self.ad_cleared:
                cleared.setdefault(a >> PAGE_SHIFT, []).append((a & (PAGE_SIZE - 1)) >> 3)
            self.ad_cleared = set()
        walks = []
        args, out, cl = self._args, self._out, self._cleared
        args.owner = self.mem.owner.buffer_info()[0]      # re-read: the array is the memory's
        step, args_ptr = self._step, self._args_ptr
        level_of, slot, deferred = self.level, self.slot, self.deferred
        for mfn in written:
            level = level_of.get(mfn)
            if level is None:
                continue                      # not tracked: KVM holds nothing of it
            ncl = 0
            if mfn in cleared:
                for ncl, i in enumerate(cleared[mfn], 1):
                    cl[ncl - 1] = i
            r = step(args_ptr, mfn, slot[mfn], level, ncl)
            if not r:
                continue
            if r < 0:
                raise ValueError(f"shadow guard: frame {mfn:#x} out of range")
            now, later, added = r & 0x3FF, (r >> 10) & 0x3FF, r >> 20
            if later:
                deferred.update(out[512:512 + later])
                if len(deferred) > self.deferred_max:
                    self.deferred_max = len(deferred)
            if now > self.WHOLE_FRAME_OVER:
                frames.append(mfn)
            elif now:
                entries += out[:now]
            if added:
                walks += [(child, level - 1) for child in out[1024:1024 + added]]
        for child, level in walks:
            self._walk(child, level)

    def _untrack(self, mfn: int) -> None:
        del self.level[mfn]
        self._free.append(self.slot.pop(mfn))
        self.roots.discard(mfn)


def _seg(selector: int, dpl: int, *, code: bool, long: bool = False, db: bool = False) -> bytes:
    return _SEG_FMT.pack(0, 0xFFFFFFFF, selector, 0xB if code else 0x3, 1, dpl, 1 if db else 0,
                         1, 1 if long else 0, 1, 0, 0)


def _seg_image(selector: int, desc: int) -> bytes:
    """The kvm_segment a load of `selector` with the 8-byte descriptor `desc` leaves."""
    hi = desc >> 32
    base, limit = segment_base_limit(desc)
    return _SEG_FMT.pack(base, limit, selector & 0xFFFF, (hi >> 8) & 0xF, (hi >> 15) & 1,
                         (hi >> 13) & 3, (hi >> 22) & 1, (hi >> 12) & 1, (hi >> 21) & 1,
                         (hi >> 23) & 1, (hi >> 20) & 1, 0)


_CS64 = _seg(FLAT_RING3_CS64, 3, code=True, long=True)
_CS0 = _seg(FLAT_RING0_CS64, 0, code=True, long=True)      # the invalidation stub's
_SS0 = _seg(FLAT_RING0_DS, 0, code=False, db=True)
_CS32 = _seg(FLAT_RING3_CS32, 3, code=True, db=True)
_SS3 = _seg(FLAT_RING3_SS, 3, code=False, db=True)



class _VcpuThread:
    """The vCPU thread of one engine (csrc/kvm.c aiovmm_kvm_thread_*): a plain pthread
    that makes every KVM_RUN of the vCPU, signalled by the engine's slice timer (made
    there). `run_ex` awaits one aiovmm_kvm_run_ex there, told by an eventfd the loop
    watches; `call` runs an operation there and blocks the loop until it ended (the
    invalidation stub, an IN's completion, single steps: short, and KVM_RUN must never
    move between threads, which costs KVM a synchronize_rcu each time). `kick` ends the
    KVM_RUN in flight (an event or a stop for the running vCPU, Xen's vcpu_kick IPI);
    `quiesce` kicks it and waits until the guest is out (pause, close)."""

    def __init__(self, lib: ctypes.CDLL, ctx_ptr: int) -> None:
        self._lib = lib
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ptr = lib.aiovmm_kvm_thread_new(ctx_ptr, self.efd)
        if not self.ptr:
            os.close(self.efd)
            raise KVMUnavailable("cannot start the vCPU thread")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fut: asyncio.Future[int] | None = None
        self.in_flight = False           # a run_ex posted whose result the task has not taken

    def _ended(self) -> None:
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            return
        fut, self._fut = self._fut, None
        if fut is not None and not fut.done():
            fut.set_result(self._lib.aiovmm_kvm_thread_result(self.ptr))

    async def run_ex(self) -> int:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self.efd)
            loop.add_reader(self.efd, self._ended)
            self._loop = loop
        if not self.ptr:
            return -errno.EBADF
        fut = self._fut = loop.create_future()
        rc = self._lib.aiovmm_kvm_thread_post(self.ptr, _VT_RUN_EX)
        if rc < 0:
            self._fut = None
            return rc
        self.in_flight = True
        try:
            return await fut
        finally:
            if self.in_flight and not fut.done() and self.ptr:  # cancelled: the guest stops first
                self._lib.aiovmm_kvm_thread_quiesce(self.ptr)
            self.in_flight = False

    def call(self, op: int) -> int:
        return self._lib.aiovmm_kvm_thread_call(self.ptr, op)

    def kick(self) -> None:
        self._lib.aiovmm_kvm_thread_kick(self.ptr)

    def quiesce(self) -> None:
        self._lib.aiovmm_kvm_thread_quiesce(self.ptr)

    def spin(self, ns: int) -> None:
        """After each run, poll this long for the next before sleeping (csrc/kvm.c)."""
        self._lib.aiovmm_kvm_thread_spin(self.ptr, ns)

    def close(self) -> None:
        """Stop the thread. A run in flight ends first (kicked), and its result still goes
        to the awaiting task: an exit the guest made (a hypercall's RIP is past it) must be
        handled, or the guest goes on as if it had been."""
        rc = -errno.EINTR
        if self.ptr:
            self._lib.aiovmm_kvm_thread_quiesce(self.ptr)
            rc = self._lib.aiovmm_kvm_thread_result(self.ptr)
            self._lib.aiovmm_kvm_thread_free(self.ptr)      # joins, deletes the timer
            self.ptr = None
        fut, self._fut = self._fut, None
        if fut is not None and not fut.done():
            fut.set_result(rc)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.efd)
        self._loop = None
        if self.efd >= 0:
            os.close(self.efd)
            self.efd = -1

class KVMEngine:
    """One x86_64 vCPU on KVM over the shared machine memory (interface of VCPUEngine).

    Callbacks, as VCPUEngine: on_hypercall(), on_exception(vector, error, cr2),
    on_invalid_opcode(), on_port_io(); plus `kernel_mode() -> bool` (set by the hypervisor):
    an `out` to HCALL_PORT is a hypercall only from guest kernel mode, else port I/O (#GP).
    """

    # Length of the `int $n` whose vector on_exception reports, RIP past it (traps.inject_
    # exception: a gate the guest may not use is #GP at the instruction): `cd n` but while
    # _int_n reports one it decoded after legacy prefixes.
    int_length = 2

    kind = "kvm"

    def __init__(self, mem: "MachineMemory", xen: "XenArea", *, name: str = "vcpu") -> None:
        self.name = name
        self.mem = mem
        self.r0 = ring0(xen)
        self.m2p_va = self.r0.m2p_va      # announced by XENMEM_machphys_mapping
        self.cpl3_xstate = cpl3_xstate()  # XSAVE offered to the guest kernel (cpuid.xstate)
        lib = _native()
        self._pool = vm_pool(mem)
        self.vm_fd = self.vcpu_fd = -1
        try:
            self.vm_fd, self.vcpu_fd = self._pool.take()
        except OSError as e:
            raise KVMUnavailable(f"creating a KVM VM and vCPU: {e}") from None
        try:
            self._run_map = mmap.mmap(self.vcpu_fd, _vcpu_mmap_size(), mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            self.close()
            raise KVMUnavailable(f"mapping the KVM vCPU: {e}") from None
        # The zap slot: one private page far above RAM, moved to make KVM drop every
        # shadow page (see the module docstring). Registered at the first zap only: a
        # memslot change costs a synchronize_srcu (milliseconds under load) and, with
        # targeted invalidation, most VMs never zap.
        self._zap_page: mmap.mmap | None = None     # made at the first zap, as the slot
        self._zap_anchor = None
        self._zap_gpa = ((mem.size >> 30) + 2) << 30    # moves to and fro by 1 GiB
        self._zap_slot = False
        self._run_anchor = ctypes.c_char.from_buffer(self._run_map)
        self._run_ptr = ctypes.addressof(self._run_anchor)
        self.regs = (ctypes.c_uint64 * 18).from_buffer(self._run_map, _RUN_REGS)
        self._sregs = memoryview(self._run_map)[_RUN_SREGS:_RUN_SREGS + 312]
        self._valid = ctypes.c_uint64.from_buffer(self._run_map, _RUN_VALID_REGS)
        self._dirty = ctypes.c_uint64.from_buffer(self._run_map, _RUN_DIRTY_REGS)
        # Initial state into the sync area; applied by the first KVM_RUN.
        self._run_map[_RUN_REGS:_RUN_REGS + 144] = fcntl.ioctl(self.vcpu_fd, Ioctl.GET_REGS, bytes(144))
        self._sregs[:] = fcntl.ioctl(self.vcpu_fd, Ioctl.GET_SREGS, bytes(312))
        self._valid.value = SYNC_REGS | SYNC_SREGS
        self._dirty.value = SYNC_REGS | SYNC_SREGS
        self._timer = ctypes.c_void_p()
        rc = lib.aiovmm_kvm_timer_create(ctypes.byref(self._timer))
        if rc < 0:
            self.close()
            raise KVMUnavailable(f"timer_create: {os.strerror(-rc)}")
        self._timer_tid = _gettid()
        self._run_thread = 0                # threading ident of the thread running slices (interrupt)
        self.interrupted = False            # interrupt() since the scheduler cleared it
        self._lib = lib
        self._kvm_run_fn = lib.aiovmm_kvm_run
        self._ctx = _RunCtx(self.vcpu_fd, HCALL_PORT, self._run_ptr, self.r0.stubs_va,
                            self.r0.stubs_va + PAGE_SIZE, 0)
        self._ctx.syscall_port, self._ctx.syscall_va = SYSCALL_PORT, self.r0.syscall_va
        self._ctx.timer = self._timer.value
        self._ctx.mem_base, self._ctx.run_size = mem.fd_address, _vcpu_mmap_size()
        self._ctx.mem_size = mem.size
        self._ctx.cs64[:], self._ctx.cs32[:], self._ctx.ss3[:] = _CS64, _CS32, _SS3
        self._ctx.page_rip_after = _IO_RIP_AFTER    # else the hypercall page is Python's only
        self._ctx.r0_stack_va, self._ctx.r0_stack_maddr = self.r0.stack_va, self.r0.stack_maddr
        self._pv = None                 # the vCPU's PVState (attach_pv), kept alive here
        self._fast_seen = [0] * (len(_FAST_CALLS) + len(_FAST_QUERIES))
        # The invalidation stub's entry registers (_invalidate): all zero but RSI (its list),
        # RSP (the ring-0 stack), RIP and RFLAGS (IF, TF clear).
        stub = [0] * 18
        stub[_REG_INDEX["rsi"]], stub[_REG_INDEX["rsp"]] = self.r0.list_va, self.r0.stack_top
        stub[16], stub[17] = self.r0.inval_stub_va, 2
        self._stub_regs = struct.pack("<18Q", *stub)
        self._ctx_ptr = ctypes.addressof(self._ctx)
        self._run_ex = lib.aiovmm_kvm_run_ex
        self._thread: _VcpuThread | None = None
        if os.environ.get(VCPU_THREAD_ENV, "") == "1":
            # An experiment, not a supported mode: the loop's read-modify-writes of guest
            # memory (event bits, grant pins) are not yet atomic against a guest running on
            # another core (docs/design.md "vCPU slices on a vCPU thread", what stays open).
            log.warning("%s=1: experimental vCPU thread, isolation not yet reviewed; "
                        "do not use with untrusted guests", VCPU_THREAD_ENV)
            try:
                self.use_vcpu_thread(True)
            except KVMUnavailable:
                self.close()
                raise

        self.on_hypercall: Callable[[], None] = lambda: None
        self.on_syscall32: Callable[[], None] = lambda: None
        # CS and SS as the last far transfer loaded them (load_segment): an exit through
        # the ring-0 stubs returns to these when the CPU's frame names them.
        self._cpl3_segs = {"cs": _CS64, "ss": _SS3}
        # The descriptor a selector names in the guest's GDT/LDT now, or None (set by the
        # vCPU: descriptors.current_descriptor).
        self.segment_descriptor: Callable[[str, int], int | None] = lambda name, sel: None
        self.on_exception: Callable[[int, int, int], None] = lambda v, e, c: None
        self.on_invalid_opcode: Callable[[], None] = lambda: None
        self.on_port_io: Callable[[], None] = lambda: None
        # Hypercalls completed in C (number -> calls since the last report) and whether one
        # of them left an event deliverable (the hypercall's tail is then the caller's).
        self.on_hypercall_done: Callable[[dict[int, int], bool], None] = lambda counts, events: None
        # Whether C may complete hypercalls this slice (not while the domain shuts down:
        # then every hypercall must reach the dispatcher, which stops the vCPU).
        self.fast_hypercalls_ok: Callable[[], bool] = lambda: False
        # True while the port policy's answer to an allowed IN does not depend on guest
        # memory (emulate.port_in_fixed): only then may C repeat it (aiovmm_kvm_run_ex).
        self.port_in_fixed: Callable[[], bool] = lambda: False
        self.kernel_mode: Callable[[], bool] = lambda: True
        self.rdtsc: Callable[[], int] = lambda: 0          # unused: RDTSC runs natively
        self.stop_requested = False
        self.last_error = ""
        self.callback_error: BaseException | None = None
        self._preempt = False
        self._check_pending = False
        self._guard = _ShadowGuard(mem)
        # _read_code's translations (root, VA page) -> machine page, valid while no page
        # table changes (mem.pt_generation): Linux polls the PIT from one instruction.
        self._xlate: dict[tuple[int, int], int] = {}
        self._xlate_gen = -1
        self._fast_key = (-1, -1)       # (pt_generation, CR3) of the INs C answers (_remember_in)
        self._pt_gen = -1
        self.invalidations = 0        # ring-0 invalidation runs (targeted, kvm-pvm)
        self.invalidated = 0          # entries and frames they invalidated
        self._stepping = False
        self._step_hit = False
        self.zaps = 0
        self.step_kicks = 0           # single steps entered again after a kick (step_to)
        self.kicks = 0                # slices ended by the timer inside KVM_RUN
        # Exits by kind ("hypercall", "syscall", "vector N", "io", "intr", ...): what limits a
        # guest on this engine (bench/linux.py prints them).
        self._exit_kinds: collections.Counter[str] = collections.Counter()
        self._hypercalls = 0          # the hot kind, counted apart (exit_kinds adds it)
        self._dirty_log = False
        self._tsc_khz = 0
        self._pvclock: tuple[int, int, int, int] | None = None    # pvclock_params, once sampled
        self._events = bytearray(_EVENTS_SIZE)
        self.settles = 0              # slice ends deferred until a held exception was reported
        self._census: ctypes.Array[ctypes.c_uint64] | None = None    # census(), once asked
        self._stats_fd: int | None = None       # kvm_stats(), opened once asked

    @property
    def exits(self) -> int:
        """KVM_RUN calls that ran the guest (the invalidation stub's are not counted)."""
        return self._ctx.exits

    @property
    def exits_in_c(self) -> dict[str, int]:
        """Exits completed by the C run loop without Python, by kind (bench/linux.py)."""
        ctx = self._ctx
        return {"stack_switch": ctx.fast_calls[0], "set_segment_base": ctx.fast_calls[1],
                "iret to kernel": ctx.fast_calls[2] - ctx.fast_user_irets,
                "iret to user": ctx.fast_user_irets, "user syscall": ctx.fast_bounces,
                "vcpu_op singleshot": ctx.fast_calls[3],
                "xen_version": ctx.fast_queries[0], "vcpu_op no vCPU": ctx.fast_queries[1],
                "cli/sti": ctx.fast_cli_sti,
                "event upcall": ctx.fast_upcalls,
                "port in": ctx.fast_hits}

    def attach_pv(self, pv: ctypes.Structure) -> None:
        """Share the vCPU's PV state (vcpu.PVState) with the C run loop, which completes
        stack_switch, set_segment_base and iret in it (csrc/kvm.c fast_hypercall) and bounces
        a user process's syscall (fast_user_syscall)."""
        self._pv = pv
        self._ctx.pv = ctypes.addressof(pv)

    @property
    def exit_kinds(self) -> collections.Counter[str]:
        out = collections.Counter(self._exit_kinds)
        # C's completions by the entry they came through, as Python counts its own
        # (_run_slice): the hypercall page's are "hypercall", a guest `syscall`'s "syscall".
        ctx = self._ctx
        fast = sum(ctx.fast_calls) + sum(ctx.fast_queries) + ctx.fast_bounces - ctx.fast_page
        if fast:
            out[_SYSCALL] += fast
        if self._hypercalls + ctx.fast_page:
            out["hypercall"] += self._hypercalls + ctx.fast_page
        if self._ctx.fast_hits:
            out["port io"] += self._ctx.fast_hits
        if ctx.fast_cli_sti:
            out["vector 13"] += ctx.fast_cli_sti            # #GP: csrc/kvm.c fast_cli_sti
        return out

    def census(self) -> collections.Counter[tuple[int | str, ...]]:
        """Every exit since the census was first asked for, by what it was (census_key),
        counted by the C run loop before the exit is handled (bench/net_exits.py). The
        first call turns the census on and returns it empty."""
        arr = self._census
        if arr is None:
            arr = self._census = (ctypes.c_uint64 * CENSUS_N)()
            self._ctx.census = ctypes.addressof(arr)
        return collections.Counter({census_key(i): n for i, n in enumerate(arr) if n})

    def kvm_stats(self) -> dict[str, int]:
        """KVM's own statistics of this vCPU (KVM_GET_STATS_FD, Documentation/virt/kvm/api.rst
        "binary statistics"): its exits handled inside the kernel as well as those that
        reached this engine ("exits", "pf_fixed", "io_exits", ...), first value of each.
        Empty where KVM has no such interface."""
        fd = self._stats_fd
        if fd is None:
            try:
                fd = self._stats_fd = fcntl.ioctl(self.vcpu_fd, Ioctl.GET_STATS_FD, 0)
            except OSError:
                self._stats_fd = -1
                return {}
        if fd < 0:
            return {}
        hdr = os.pread(fd, 24, 0)
        _flags, name_size, n, _id, desc_off, data_off = struct.unpack("<6I", hdr)
        step = 16 + name_size
        descs = os.pread(fd, n * step, desc_off)
        data = os.pread(fd, 1 << 16, data_off)
        out: dict[str, int] = {}
        for i in range(n):
            d = descs[i * step:(i + 1) * step]
            _fl, _exp, _size, off = struct.unpack_from("<IhHI", d)
            name = d[16:].split(b"\0", 1)[0].decode()
            if off + 8 <= len(data):
                out[name] = struct.unpack_from("<Q", data, off)[0]
        return out

    def _set_slot(self, slot: int, gpa: int, size: int, addr: int, flags: int = 0) -> None:
        fcntl.ioctl(self.vm_fd, Ioctl.SET_USER_MEMORY_REGION, struct.pack("<IIQQQ", slot, flags, gpa, size, addr))

    # -- registers ---------------------------------------------------------------------------
    def _sreg_u64(self, off: int) -> int:
        return struct.unpack_from("<Q", self._sregs, off)[0]

    def _get(self, name: str) -> int:
        i = _REG_INDEX.get(name)
        if i is not None:
            return self.regs[i]
        if name in _SELECTORS:
            return struct.unpack_from("<H", self._sregs, _SEG[name] + 12)[0]
        if name in ("fs_base", "gs_base"):
            return self._sreg_u64(_SEG[name[:2]])
        return self._sreg_u64(_SREG_OFF[name])

    def _set(self, name: str, value: int) -> None:
        value &= 0xFFFFFFFFFFFFFFFF
        i = _REG_INDEX.get(name)
        if i is not None:
            self.regs[i] = value
            self._dirty.value |= SYNC_REGS
            return
        if name == "cs" and (value | 3) in (FLAT_RING3_CS64, FLAT_RING3_CS32):
            # Xen's flat user code segments: the whole hidden part (L/D: 64-bit or
            # compatibility mode), as the IRETQ that loads them would set it.
            o = _SEG["cs"]
            self._sregs[o:o + 24] = _CS64 if (value | 3) == FLAT_RING3_CS64 else _CS32
        elif name in _SELECTORS:
            struct.pack_into("<H", self._sregs, _SEG[name] + 12, value)
        elif name in ("fs_base", "gs_base"):
            struct.pack_into("<Q", self._sregs, _SEG[name[:2]], value)
        else:
            struct.pack_into("<Q", self._sregs, _SREG_OFF[name], value)
            if name == "cr3":
                # A root to track before the next KVM_RUN; a CR3 load flushes the TLB
                # (also the user/kernel switch: Xen's toggle_guest_mode writes CR3).
                self._check_pending = True
                self._guard.flush_deferred = True
        self._dirty.value |= SYNC_SREGS

    def read(self, names: Sequence[str]) -> list[int]:
        return [self._get(n) for n in names]

    def load_segment(self, name: str, selector: int, desc: int) -> None:
        """Load CS or SS as a far transfer does: the selector and the whole hidden part
        from the 8-byte descriptor `desc` (checked by the caller), kept for the returns to
        CPL 3 after exits through the ring-0 stubs. DS/ES: the selector (kvm-pvm runs the
        guest on the host's descriptor tables: the hidden part is not the guest's)."""
        if name in ("ds", "es"):
            self._set(name, selector)
            return
        img = self._cpl3_segs[name] = _seg_image(selector, desc)
        if name == "cs":
            self._ctx.cpl3_cs_set = 0           # this load is newer than C's fast_iret's
        else:
            self._ctx.cpl3_ss_set = 0
        o = _SEG[name]
        if self._sregs[o:o + 24] != img:
            self._sregs[o:o + 24] = img
            self._dirty.value |= SYNC_SREGS

    def write(self, values: dict[str, int]) -> None:
        for n, v in values.items():
            self._set(n, v)

    def get(self, name: str) -> int:
        return self._get(name)

    def set(self, name: str, value: int) -> None:
        self._set(name, value)

    def set_rax(self, value: int) -> None:
        self.regs[0] = value & 0xFFFFFFFFFFFFFFFF
        self._dirty.value |= SYNC_REGS

    def hypercall_args(self) -> tuple[int, ...]:
        """(rax, rdi, rsi, rdx, r10, r8) at the hypercall exit (one unpack of the sync area:
        fewer Python operations per exit than six ctypes reads)."""
        rax, rdx, rsi, rdi, r8, r10 = _HCALL_ARGS.unpack_from(self._run_map, _RUN_REGS)
        return rax, rdi, rsi, rdx, r10, r8

    def _msrs(self, pairs: Sequence[tuple[int, int]]) -> None:
        buf = bytearray(struct.pack("<II", len(pairs), 0) + b"".join(struct.pack("<IIQ", i, 0, v) for i, v in pairs))
        if fcntl.ioctl(self.vcpu_fd, Ioctl.SET_MSRS, buf) != len(pairs):
            raise KVMUnavailable(f"KVM_SET_MSRS refused one of {[hex(i) for i, _ in pairs]}")

    def set_msr(self, msr: int, value: int) -> None:
        self._msrs([(msr, value)])

    def load_fpu(self, fxsave: bytes | None) -> None:
        """x87/SSE state from an FXSAVE image or the reset state (VCPUEngine.load_fpu).
        KVM_SET_XSAVE with XSTATE_BV = x87|SSE, as Xen's vcpu_setup_fpu builds its area:
        KVM_SET_FPU leaves XSTATE_BV as it was, and XRSTOR then loads the init state."""
        from .vcpu_engine import fpu_state
        st = fpu_state(fxsave)
        buf = bytearray(4096)                       # struct kvm_xsave: the XSAVE area
        buf[0:512] = st.raw
        struct.pack_into("<I", buf, 24, st.mxcsr)
        struct.pack_into("<Q", buf, 512, 3)         # XSTATE_BV: x87, SSE
        fcntl.ioctl(self.vcpu_fd, 0x5000AEA5, buf)  # KVM_SET_XSAVE

    def save_fpu(self) -> bytes:
        """The x87/SSE state as a 512-byte FXSAVE image (VCPUEngine.save_fpu): the legacy
        region of KVM_GET_XSAVE (KVM fills it with the init state where XSTATE_BV says so)."""
        buf = bytearray(4096)                       # struct kvm_xsave
        fcntl.ioctl(self.vcpu_fd, 0x9000AEA4, buf)  # KVM_GET_XSAVE
        return bytes(buf[:512])

    def save_xsave(self) -> bytes:
        """The whole XSAVE area (KVM_GET_XSAVE's 4096 bytes, standard format): the vCPU's
        x87/SSE and extended state, for a save's X86_PV_VCPU_XSAVE record."""
        buf = bytearray(4096)                       # struct kvm_xsave
        fcntl.ioctl(self.vcpu_fd, 0x9000AEA4, buf)  # KVM_GET_XSAVE
        return bytes(buf)

    def load_xsave(self, area: bytes) -> None:
        """Load a standard-format XSAVE area (a restored X86_PV_VCPU_XSAVE record's,
        validated against cpl3_xstate: migration/context.py): KVM_SET_XSAVE, MXCSR to its
        defined bits as load_fpu keeps it (reserved ones make the restore fail)."""
        buf = bytearray(4096)
        buf[:len(area)] = area[:4096]
        struct.pack_into("<I", buf, 24, struct.unpack_from("<I", buf, 24)[0] & 0xFFFF)
        fcntl.ioctl(self.vcpu_fd, 0x5000AEA5, buf)  # KVM_SET_XSAVE

    def get_msr(self, msr: int) -> int:
        buf = bytearray(struct.pack("<IIIIQ", 1, 0, msr, 0, 0))
        fcntl.ioctl(self.vcpu_fd, Ioctl.GET_MSRS, buf)
        return struct.unpack_from("<Q", buf, 16)[0]

    # -- CPUID -------------------------------------------------------------------------------
    def set_cpuid(self, entries: Sequence[tuple[int, int, int, int, int, int]]) -> None:
        """Install the CPUID the guest sees: (leaf, subleaf, eax, ebx, ecx, edx) per entry,
        each matched on its subleaf (KVM_SET_CPUID2). CPUID at CPL 3 is emulated by KVM from
        this table, so the shared policy (aiovmm/cpuid.py) reaches the guest unchanged.
        Call before the first slice; the table must keep long mode, NX and SYSCALL (KVM
        checks EFER against it)."""
        fcntl.ioctl(self.vcpu_fd, Ioctl.SET_CPUID2, bytearray(_cpuid2(entries)))

    # -- MMU --------------------------------------------------------------------------------
    def setup_long_mode(self, cr3: int, gdt_base: int, gdt_limit: int) -> None:
        """Long mode with paging, NX, SSE, SYSCALL; CPL 3 flat segments; the engine's IDT,
        TSS and syscall entry."""
        s = self._sregs
        s[_SEG["cs"]:_SEG["cs"] + 24] = _CS64
        for seg in ("ss", "ds", "es", "fs", "gs"):
            s[_SEG[seg]:_SEG[seg] + 24] = _SS3
        s[_SEG["tr"]:_SEG["tr"] + 24] = _SEG_FMT.pack(self.r0.tss_va, TSS_LIMIT, 0, 0xB, 1, 0, 0, 0, 0, 0, 0, 0)
        struct.pack_into("<QH", s, _SREG_OFF["gdt"], gdt_base, gdt_limit)
        struct.pack_into("<QH", s, _SREG_OFF["idt"], self.r0.idt_va, 256 * 16 - 1)
        for name, val in (("cr0", CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG), ("cr3", cr3),
                          ("cr4", CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | _CR4_SMEP),
                          ("efer", EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE)):
            struct.pack_into("<Q", s, _SREG_OFF[name], val)
        self._dirty.value |= SYNC_SREGS
        self._check_pending = True
        # CSTAR: SYSCALL from compatibility mode (FLAT_RING3_CS32, or a far jump to a 32-bit
        # code segment) enters there. Its own entry, as Xen's cstar_enter: it goes to the
        # syscall32 callback, never to a hypercall. In ring 0 on hardware KVM (AMD; left at 0
        # it would run the guest's code at VA 0 in ring 0). kvm-pvm would enter ring 0 at
        # CSTAR truncated to 32 bits, a guest address, on the caller's stack: the VM's CPUID
        # vendor (_PVM_VENDOR) makes it a #UD at CPL 3 instead; should it ever enter ring 0,
        # CR4.SMEP (above) keeps ring 0 from running guest pages there and IST1 (_Ring0)
        # keeps its fault's frame off the guest's stack (_from_vector takes that fault as the
        # compat SYSCALL). Without them a guest user process ran its own code at ring 0,
        # where the direct map reaches all machine memory (tests/test_redteam_iret_cs.py).
        self._msrs([(MSR_STAR, (FLAT_RING3_CS32 << 48) | (FLAT_RING0_CS64 << 32)), (MSR_LSTAR, self.r0.syscall_va),
                    (MSR_CSTAR, self.r0.syscall32_va), (MSR_SFMASK, RF_TF | RF_IF | RF_DF | RF_NT | RF_AC)])

    def set_descriptor_tables(self, gdt_base: int, gdt_limit: int, ldt_base: int, ldt_limit: int) -> None:
        """GDTR and the LDTR cache at linear addresses in Xen's area (descriptors.py), as the
        emulated engine does; an empty LDT is marked unusable. The caller flushes the TLB."""
        s = self._sregs
        struct.pack_into("<QH", s, _SREG_OFF["gdt"], gdt_base, gdt_limit)
        s[_SEG["ldt"]:_SEG["ldt"] + 24] = _SEG_FMT.pack(ldt_base if ldt_limit else 0, ldt_limit, 0, 0x2,
                                                        1 if ldt_limit else 0, 0, 0, 0, 0, 0, 0,
                                                        0 if ldt_limit else 1)
        self._dirty.value |= SYNC_SREGS

    def set_cr3(self, cr3: int) -> None:
        """Load a page-table root that may have been (re)validated (a TLB flush, as on Xen)."""
        self._set("cr3", cr3)

    def flush_tlb(self) -> None:
        """The guest's TLB is flushed (its own request, a CR3 load, or a point where Xen
        flushes: a grant unmap, ptwr's scratch mapping): before the next KVM_RUN, KVM forgets
        every entry the hypervisor removed or reduced since, deferred ones included
        (_ShadowGuard)."""
        self._guard.flush_deferred = True
        self._check_pending = True

    def pt_written(self) -> None:
        """The hypervisor changed page-table entries where Xen does not flush the TLB
        (mmu_update, update_va_mapping without flush flags, a ptwr store, an unpin): the
        guard sees every write and defers what it may until the guest's own flush."""
        self._check_pending = True

    def flush_code(self) -> None:
        """Nothing to do: KVM runs the bytes in memory."""

    def _zap(self) -> None:
        """Move the dummy slot between two addresses: one memslot update (measured 64 us
        median vs 82 for delete + re-add) that makes KVM drop every shadow page."""
        if not self._zap_slot:
            self._zap_page = mmap.mmap(-1, PAGE_SIZE)
            self._zap_anchor = ctypes.c_char.from_buffer(self._zap_page)
            self._set_slot(1, self._zap_gpa, PAGE_SIZE, ctypes.addressof(self._zap_anchor))
            self._zap_slot = True           # created: only a move or delete zaps
        self._zap_gpa ^= 1 << 30
        self._set_slot(1, self._zap_gpa, PAGE_SIZE, ctypes.addressof(self._zap_anchor))
        self._guard.reset(self._sreg_u64(_SREG_OFF["cr3"]) >> PAGE_SHIFT)
        self.zaps += 1

    def start_in_stub(self, stub_va: int, stub_stack_va: int, regs: dict[str, int],
                      rip: int, rsp: int, rflags: int, direct: bool = False) -> None:
        """Enter the guest at CPL 3 directly (segments are set from the host; no stub):
        always `direct`, in Xen's flat 64-bit segments unless the caller loads others."""
        for i in range(18):
            self.regs[i] = 0
        vals = dict(regs, rip=rip, rsp=rsp, rflags=rflags | 2)
        self.write(vals)

    # -- pvclock -------------------------------------------------------------------------------
    def pvclock_params(self, system_time_ns: Callable[[], int]) -> tuple[int, int, int, int]:
        """(tsc_timestamp, system_time, tsc_to_system_mul, tsc_shift) for vcpu_time_info:
        the guest reads the host TSC natively, so the parameters are its frequency and one
        (guest TSC, system time) pair sampled as tightly as possible. Sampled once per
        engine and given again at every later publication (register_vcpu_info, a vCPU's
        initialise): a new sample is off the first by up to ~0.8 us (the MSR read between two
        clock reads; measured -98..+764 ns), so each publication stepped the guest's clock,
        backwards too, which Linux does not guard against under PVCLOCK_TSC_STABLE_BIT."""
        if self._pvclock is not None:
            return self._pvclock
        if not self._tsc_khz:
            self._tsc_khz = fcntl.ioctl(self.vcpu_fd, Ioctl.GET_TSC_KHZ)
        best = None
        for _ in range(5):
            a = system_time_ns()
            tsc = self.get_msr(MSR_IA32_TSC)
            b = system_time_ns()
            if best is None or b - a < best[0]:
                best = (b - a, tsc, (a + b) // 2)
        _, tsc, now = best
        scale = (1_000_000 << 32) / self._tsc_khz       # ns per tick, in 32.32 fixed point
        shift = 0
        while scale >= 1 << 32:
            scale /= 2
            shift += 1
        while scale < 1 << 31:
            scale *= 2
            shift -= 1
        self._pvclock = tsc, now, int(scale), shift
        return self._pvclock

    # -- running -------------------------------------------------------------------------------
    def decode(self, code: bytes) -> tuple[int, str, str] | None:
        from .vcpu_engine import VCPUEngine
        return VCPUEngine.decode(self, code)        # the one capstone decoder (no engine state)

    def compat_mode(self) -> bool:
        """CS is a 32-bit code segment (its L bit clear): compatibility mode."""
        return not self._sregs[_SEG["cs"] + 19]

    def step_to(self, end: int) -> bool:
        """Execute exactly one instruction (RFLAGS.TF: #DB after it, reported by the IDT stub)
        and return True if RIP reached `end` with no other exception or stop.

        A kick that ends KVM_RUN before the instruction ran (the step's deadline passed while
        the host was descheduled or ran the invalidation stub, or any signal to the loop
        thread) is not a failure: the vCPU is entered again, each time with twice the time,
        for up to _STEP_MAX_NS. Reporting it as a failure made ptwr bounce the guest's own
        page-table store back to it as a #PF: on a loaded host, Linux's Oops in
        copy_page_range during fork (its wrprotect is a stepped `lock andb`, taken with two
        page-table locks held: "sh exited with preempt_count 2"; tests/test_ptwr_forms.py)."""
        self._stepping = True
        self._step_hit = False
        self.stop_requested = False
        self._ctx.fast_hc = 0                   # every exit of the step is Python's
        self._ctx.fast_n = 0
        rf = self.regs[17]
        start = self.regs[16]
        self.regs[17] = rf | RF_TF
        self._dirty.value |= SYNC_REGS
        t0 = time.monotonic_ns()
        wait = _STEP_NS
        self._begin(t0 + wait)
        try:
            exits = 0
            for _ in range(64):
                rc = self._kvm_run()
                if rc == -errno.EINTR:
                    now = time.monotonic_ns()
                    if self.delivery_pending():
                        self._begin(now + _SETTLE_NS)
                        continue
                    if self.regs[16] != start or now - t0 >= _STEP_MAX_NS:
                        break
                    self.step_kicks += 1                # not run yet: enter it again
                    wait = max(2 * wait, _SETTLE_NS)
                    self._begin(now + wait)
                    continue
                if rc < 0:
                    break
                if rc == 3:                     # the SYSCALL entry, already set back in C
                    self._call(self.on_hypercall)
                else:
                    self._handle_exit()
                exits += 1
                if self._step_hit or self.stop_requested or self.callback_error is not None \
                        or exits >= 4:
                    break
        finally:
            self._end()
            self._stepping = False
            self.regs[17] &= ~RF_TF
            self.regs[17] |= rf & RF_TF
            self._dirty.value |= SYNC_REGS
            self._finish_in()
        return self._step_hit and not self.stop_requested and self.regs[16] == end

    def _begin(self, deadline_ns: int) -> None:
        if self._thread is None and _gettid() != self._timer_tid:   # the loop moved threads
            self._lib.aiovmm_kvm_timer_delete(self._timer)
            self._lib.aiovmm_kvm_timer_create(ctypes.byref(self._timer))
            self._timer_tid = _gettid()
            self._ctx.timer = self._timer.value
        ctx = self._ctx
        ctx.grace_ns = 0
        if ctx.fast_n:
            self._keep_port_answers()
        ctx.deadline_ns = deadline_ns     # run_ex enters no guest past it
        self._lib.aiovmm_kvm_slice_begin(self._run_ptr, self._timer, deadline_ns)

    def _end(self) -> None:
        self._ctx.grace_ns = 0
        self._ctx.deadline_ns = 0
        self._lib.aiovmm_kvm_slice_end(self._run_ptr, self._timer)

    def _kvm_run(self) -> int:
        self._shadow_check()
        return self._run_ex(self._ctx_ptr)

    def _shadow_check(self) -> None:
        """What must precede a guest entry after the hypervisor changed page tables."""
        gen = self.mem.pt_generation
        if self._check_pending or gen != self._pt_gen:
            # After a page-table write, a TLB flush or a CR3 load (only the host loads CR3:
            # _set marks it; the guest's mov-to-CR3 faults).
            self._check_pending = False
            self._pt_gen = gen
            self._sync_shadow()
            root = self._sreg_u64(_SREG_OFF["cr3"]) >> PAGE_SHIFT
            if root not in self._guard.roots:
                self._guard.add_root(root)
            self._ready_roots()

    def _ready_roots(self) -> None:
        """Tell C which of the vCPU's two roots it may load as CR3 when it toggles between
        guest kernel and user mode (csrc/kvm.c root_ready): a root the shadow guard tracks,
        while the guard defers nothing, so that the CR3 load needs none of the work it
        triggers here (tracking a new root, flushing deferred entries). Called after every
        guard check, the only place where its roots and deferred entries change; a root the
        guest registers later differs from the one recorded and is Python's until then."""
        pv, ctx = self._pv, self._ctx
        if pv is None:
            return
        guard = self._guard
        ok = not guard.deferred and not guard.flush_deferred
        roots = guard.roots
        ctx.ready_kroot = pv.kernel_root if ok and pv.kernel_root in roots else 0
        ctx.ready_uroot = pv.user_root if ok and pv.user_root in roots else 0

    def _sync_shadow(self) -> None:
        """Make KVM forget what the hypervisor changed in page tables since the last check
        (_ShadowGuard), except what the guard defers until the guest's next flush. On kvm-pvm
        (shadow paging, ring 0 emulated by KVM) exactly the changed entries, through the
        ring-0 stub (_invalidate, up to INVAL_MAX per run); on hardware KVM, or when the
        change is too large or the stub fails, by zapping every shadow page."""
        guard = self._guard
        entries, frames = guard.changes()
        if not entries and not frames:
            if len(guard) > _TRACK_MAX:
                self._zap()
            return
        n = len(entries) + len(frames)
        if not _TARGETED or n > _INVAL_RUNS_MAX * INVAL_MAX or len(guard) > _TRACK_MAX:
            self._zap()
            return
        while entries or frames:
            e, entries = entries[:INVAL_MAX], entries[INVAL_MAX:]
            f, frames = frames[:INVAL_MAX - len(e)], frames[INVAL_MAX - len(e):]
            if not self._invalidate(e, f):
                self._zap()
                return

    def _invalidate(self, entries: list[int], frames: list[int]) -> bool:
        """Run the ring-0 invalidation stub (_INVAL_CODE) over `entries` (machine addresses of
        8-byte entries) and `frames` (every shadow page of each dropped). KVM's emulator
        performs each store, and KVM's page-table write tracking zaps the shadow entries (or
        pages) made from what was written, in every shadow page of that frame: the same path
        that keeps shadows right when a guest writes its own page tables. The guest's
        registers are put back untouched. False if the stub did not complete (the caller
        then zaps everything)."""
        # The stub's KVM_RUN must not be the guest's next entry (_finish_in says why); an
        # exception KVM holds after the guest's IN was completed (its store's #PF) is the
        # guest's next entry's too, so KVM is made to forget by a zap instead.
        if self._finish_in() and self.delivery_pending():
            return False
        r0 = self.r0
        dmap = r0.dmap_va
        vas = [dmap + a for a in entries] + [dmap + (f << PAGE_SHIFT) + 1 for f in frames] + [0]
        m = self.mem.map
        for i in range(0, len(vas), 512):
            chunk = vas[i:i + 512]
            struct.pack_into(f"<{len(chunk)}Q", m, r0.list_maddrs[i >> 9], *chunk)
        run = self._run_map
        regs = run[_RUN_REGS:_RUN_REGS + 144]
        sregs = bytes(self._sregs)
        run[_RUN_REGS:_RUN_REGS + 144] = self._stub_regs      # one copy, not 22 ctypes stores
        r = self.regs
        s = self._sregs
        s[_SEG["cs"]:_SEG["cs"] + 24] = _CS0
        s[_SEG["ss"]:_SEG["ss"] + 24] = _SS0
        self._dirty.value |= SYNC_REGS | SYNC_SREGS
        # The slice's kick (immediate_exit, set by the timer's signal handler at any moment)
        # is taken atomically and put back at the end, never cleared there: the one-shot
        # timer does not fire again, so a kick overwritten here (it used to be restored from
        # a copy read before the stub ran, losing one that landed after the stub's exit) left
        # the guest's next KVM_RUN running until the guest exited by itself. A vCPU spinning
        # for the other vCPU of its domain never does (that one cannot run meanwhile): the
        # event loop hung in KVM_RUN for good (2-vCPU Linux boots under load; CI).
        kicked = self._lib.aiovmm_kvm_take_kick(self._run_ptr)
        ok = False
        try:
            for _ in range(64):
                rc = self._kvm_run_fn(self.vcpu_fd)
                if rc == -errno.EINTR:
                    kicked = 1                   # the slice's deadline: keep it for the caller
                    run[1] = 0
                    continue
                if rc < 0:
                    break
                reason, direction, _size, port, _count = _EXIT_IO.unpack_from(run, _RUN_EXIT_REASON)
                ok = reason == Exit.IO and port == INVAL_PORT and direction == 1 \
                    and r0.inval_stub_va <= r[16] <= r0.inval_stub_va + len(_INVAL_CODE)
                break
        finally:
            run[_RUN_REGS:_RUN_REGS + 144] = regs
            self._sregs[:] = sregs
            self._dirty.value |= SYNC_REGS | SYNC_SREGS
            if kicked:
                run[1] = 1                       # a kick since the take is there already
        if not ok:
            log.warning("%s: shadow invalidation stub did not complete; zapping", self.name)
            return False
        self.invalidations += 1
        self.invalidated += len(vas) - 1
        return True

    def run(self, budget: int, max_ns: int = 0) -> ExitReason:
        """Run until `max_ns` of wall time (2 ms if 0) has passed, a handler stops, or a
        preempt. `budget` (Unicorn blocks) has no meaning here."""
        deadline = self._slice_start(max_ns)
        slice_ = self._run_slice(deadline)
        run_ex, ctx_ptr = self._run_ex, self._ctx_ptr
        try:
            slice_.send(None)
            while True:
                slice_.send(run_ex(ctx_ptr))
        except StopIteration as e:
            return e.value
        finally:
            self._slice_done()

    @property
    def threaded(self) -> bool:
        """True if KVM_RUN runs on the vCPU thread (VCPU_THREAD): use run_async."""
        return self._thread is not None

    async def run_async(self, budget: int, max_ns: int = 0) -> ExitReason:
        """run(), each aiovmm_kvm_run_ex on the vCPU thread, awaited: the loop runs other
        work while the guest runs. Exits are handled here on the loop, as run() does."""
        deadline = self._slice_start(max_ns)
        slice_ = self._run_slice(deadline)
        try:
            slice_.send(None)
            while True:
                t = self._thread        # use_vcpu_thread(False) may come inside the slice
                rc = await t.run_ex() if t is not None else self._run_ex(self._ctx_ptr)
                if self.vcpu_fd < 0:            # the engine closed meanwhile
                    slice_.close()
                    return ExitReason.STOPPED
                slice_.send(rc)
        except StopIteration as e:
            return e.value
        finally:
            if self.vcpu_fd >= 0:
                self._slice_done()
            else:                               # the engine closed (the domain destroyed)
                self._report_fast_calls(False)

    def _slice_start(self, max_ns: int) -> int:
        deadline = time.monotonic_ns() + (max_ns or 2_000_000)
        self.stop_requested = False
        self._ctx.fast_hc = 1 if self._pv is not None and self.fast_hypercalls_ok() else 0
        self._run_thread = threading.get_ident()
        self._begin(deadline)
        if self.interrupted:
            self._run_map[1] = 1                # kvm_run.immediate_exit: -EINTR at once
        return deadline

    def _slice_done(self) -> None:
        self._ctx.fast_hc = 0
        self._end()
        self._finish_in()
        self._report_fast_calls(False)

    def use_vcpu_thread(self, on: bool, spin_ns: int = 0) -> None:
        """Run this vCPU's KVM_RUNs on a vCPU thread (on; it polls `spin_ns` for its next
        run before it sleeps) or on the calling loop thread, from the next run on (a run in
        flight ends first, its exit handled as usual). The slice timer moves with them: it
        signals the thread that makes the KVM_RUNs."""
        if on and self._thread is not None:
            self._thread.spin(spin_ns)
        if on == (self._thread is not None):
            return
        lib = self._lib
        if on:
            from . import memory
            memory.guest_runs_concurrently(lib.aiovmm_kvm_mb)      # for good: cheap enough
            t = self._thread = _VcpuThread(lib, self._ctx_ptr)     # makes ctx.timer
            t.spin(spin_ns)
            lib.aiovmm_kvm_timer_delete(self._timer)
            self._timer = ctypes.c_void_p(self._ctx.timer)
            self._run_ex = lambda _ctx: t.call(_VT_RUN_EX)
            self._kvm_run_fn = lambda _fd: t.call(_VT_RUN)
            self._rearm()
            return
        self._thread.close()                                       # deletes its timer
        self._thread = None
        self._timer = ctypes.c_void_p()
        rc = lib.aiovmm_kvm_timer_create(ctypes.byref(self._timer))
        if rc < 0:
            raise KVMUnavailable(f"timer_create: {os.strerror(-rc)}")
        self._timer_tid = _gettid()
        self._ctx.timer = self._timer.value
        self._run_ex = lib.aiovmm_kvm_run_ex
        self._kvm_run_fn = lib.aiovmm_kvm_run
        self._rearm()

    def _rearm(self) -> None:
        """Inside a slice (a switch between its runs): its deadline on the new timer, a
        kick already taken kept."""
        if self._ctx.deadline_ns:
            kicked = self._lib.aiovmm_kvm_take_kick(self._run_ptr)
            self._lib.aiovmm_kvm_slice_begin(self._run_ptr, self._timer, self._ctx.deadline_ns)
            if kicked:
                self._run_map[1] = 1

    @property
    def in_flight(self) -> bool:
        """True while the task awaits a run on the vCPU thread: the guest may be running."""
        return self._thread is not None and self._thread.in_flight

    def kick_thread(self) -> None:
        """End the KVM_RUN in flight on the vCPU thread now (an event became pending for
        this vCPU, or it must stop): Xen's vcpu_kick. Nothing on the loop thread, where no
        KVM_RUN is in flight while the loop runs anything else."""
        if self._thread is not None and self._thread.in_flight:
            self._thread.kick()

    def quiesce(self) -> None:
        """Return only when the guest is not running (pause, close): the KVM_RUN in flight
        on the vCPU thread is kicked and waited for; its exit stays for the vCPU's task."""
        if self._thread is not None and self._thread.in_flight:
            self.stop_requested = True
            self._thread.quiesce()

    def _finish_in(self) -> bool:
        """Complete, in the guest's own context, an IN (plain or INS) whose exit the host
        answered and left for KVM to finish at the next KVM_RUN; True if there was one.
        KVM finishes it there whatever the registers are by then (measured on kvm-pvm, also
        for the plain form): it stores the data (AL/AX/EAX, or at ES:RDI for INS, with the
        privilege of the CS loaded then) and sets RIP past the instruction, undoing a RIP
        the host set meanwhile. So it must never be left to a KVM_RUN that is not the
        guest's next entry with the state of its exit: not the invalidation stub's (ring 0:
        the guest's store through supervisor mappings, then its code at CPL 0), and not one
        after a slice end where the hypervisor bounces an event (the IN must complete
        before the event's frame, as on Xen: else the guest resumes after the IN with the
        frame pushed and events masked; measured in kernel mode, where the bounce sets only
        registers: a bounce that also loads CR3 made kvm-pvm drop the completion;
        tests/test_redteam_kvm_ins.py, test_redteam_in_event.py). An immediate exit: KVM
        runs no instruction."""
        m = self._run_map
        if m[_RUN_EXIT_REASON] != Exit.IO or m[_RUN_IO] != 0:
            return False
        self._kvm_complete()
        return True

    def _kvm_complete(self) -> None:
        """KVM_RUN with immediate exit (completes the pending I/O), then the exit marked as
        consumed (kvm_run keeps its exit_reason across such a call)."""
        if self._thread is not None:
            self._thread.call(_VT_COMPLETE)
        else:
            self._lib.aiovmm_kvm_complete(self.vcpu_fd, self._run_ptr)
        struct.pack_into("<I", self._run_map, _RUN_EXIT_REASON, Exit.INTR)

    def _report_fast_calls(self, events: bool) -> None:
        """Hand the hypercalls C completed since the last report to on_hypercall_done (the
        domain's statistics); `events`: the last one left an event deliverable."""
        ctx, seen = self._ctx, self._fast_seen
        counts: dict[int, int] = {}
        for i, (nr, done) in enumerate(zip(_FAST_CALLS + _FAST_QUERIES,
                                           tuple(ctx.fast_calls) + tuple(ctx.fast_queries))):
            n = done - seen[i]
            if n:
                counts[int(nr)] = counts.get(int(nr), 0) + n
                seen[i] = done
        if counts or events:
            self._call(self.on_hypercall_done, counts, events)

    def delivery_pending(self) -> bool:
        """True if the vCPU stopped between raising an exception and this engine's stub
        reporting it: KVM still holds the exception for its next entry (KVM_GET_VCPU_EVENTS:
        pending, or injected when the kick came during its delivery; KVM_SET_REGS discards
        only a pending one), or the CPU is already in the ring-0 stub before its `out`.
        The registers then are not a guest context the hypervisor may act on: after an
        event bounced from them, kvm-pvm delivers the held exception at the bounced RIP
        with the old error code and CR2, i.e. at the event callback in guest kernel mode
        (issue 11: a user #PF became Linux's "supervisor instruction fetch" Oops 0010)."""
        if self._get("cs") & 3 == 0:
            return True
        ev = self._events
        fcntl.ioctl(self.vcpu_fd, Ioctl.GET_VCPU_EVENTS, ev)
        return bool(ev[0] or ev[3])

    def _past_software_trap(self) -> bool:
        """True if RIP is just past an instruction that traps with RIP after it (`int3`,
        `int1`, `int $n`): a kick can end KVM_RUN after kvm-pvm took that trap and before
        it entered the vector stub with nothing of it in KVM_GET_VCPU_EVENTS (measured:
        ~3% of 30 us slices over an int3 loop). A register write before the next entry
        (an event bounced at the slice's start: Linux's IPIs) then drops it, or kvm-pvm
        delivers it at the bounced RIP; the guest's frame says RIP past the int3 (Debian's
        2-vCPU Linux: "invalid opcode" at the second byte of a NOP text_poke_bp patched).
        The slice then settles as for a held exception (_run_slice): the vCPU is entered
        again with its state untouched; a guest merely resuming there runs on, and is not
        settled again once a re-entry ran it (_SETTLE_RAN_NS: bytes cannot be decoded
        backwards, and code made of instructions ending in 0xCC looks the same at every
        kick), at most _SETTLE_TRIES times (tests/test_redteam_kvm_int3.py,
        tests/test_redteam_kvm_settle.py)."""
        if self._get("cs") & 3 != 3:
            return False
        rip = self.regs[16]
        try:
            if self._read_code(rip - 1, 1)[0] in (0xCC, 0xF1):
                return True
            return self._read_code(rip - 2, 1)[0] == 0xCD
        except LookupError:
            return False

    def _run_slice(self, deadline: int):
        """The slice's exits, as a generator: it yields where the guest is to be entered
        (aiovmm_kvm_run_ex) and is sent that run's result; run() makes the call on the loop
        thread, run_async awaits it on the vCPU thread. Returns the ExitReason."""
        handle = self._handle_exit
        mem = self.mem
        settle = 0
        settle_cpu = -1                 # thread CPU time at the last settle's entry
        grace = True
        syscalls = self._exit_kinds
        pv = self._pv                   # the vCPU's PV state: its kernel_mode() reads this field
        kernel_mode = self.kernel_mode
        hypercall = self.on_hypercall
        monotonic_ns = time.monotonic_ns
        while True:
            if self._check_pending or mem.pt_generation != self._pt_gen:
                self._shadow_check()
            rc = yield
            if rc == 3 or (rc == 1 and _IO_RIP_AFTER and (pv.kernel_mode if pv is not None else kernel_mode())):
                # The hot paths, as in _handle_exit without decoding kvm_run (aiovmm_kvm_run_ex
                # recognised the exit): 3, a guest `syscall` through the entry page (RIP/RFLAGS/
                # CS/SS already set back): Linux's hypercalls and its user processes' system
                # calls, the commonest exit of a Linux guest; 1, a hypercall through this
                # engine's hypercall page.
                if rc == 3:
                    syscalls[_SYSCALL] += 1
                else:
                    self._hypercalls += 1
                try:
                    hypercall()
                except BaseException as e:      # never let a handler bug unwind the loop
                    log.exception("%s: handler raised", self.name)
                    self.callback_error = e
                    self.stop_requested = True
            elif rc == 4:
                # C completed a hypercall (stack_switch, set_segment_base) and an event is
                # deliverable: the hypercall's tail (the upcall) runs here.
                self._report_fast_calls(True)
            elif rc == -errno.EINTR:
                if self.delivery_pending() or (
                        settle < _SETTLE_TRIES and self._past_software_trap()
                        and (settle_cpu < 0 or time.thread_time_ns() - settle_cpu < _SETTLE_RAN_NS)):
                    # Xen bounces an exception the moment the guest raises it, before it
                    # schedules or delivers an event (x86_64/entry.S: create_bounce_frame
                    # for the trap_bounce, then test_all_events). The slice's end waits
                    # until KVM has handed the exception to the stub and it was reported
                    # through the same path as any other; the re-armed deadline covers only
                    # that delivery (a few instructions).
                    settle += 1
                    if settle > _SETTLE_TRIES:
                        self.last_error = "an exception's delivery did not complete"
                        return ExitReason.ERROR
                    self.settles += 1
                    settle_cpu = time.thread_time_ns()
                    self._begin(time.monotonic_ns() + settle * _SETTLE_NS)
                    continue
                self.kicks += 1
                return ExitReason.BUDGET
            elif rc < 0:
                self.last_error = f"KVM_RUN: {os.strerror(-rc)}"
                return ExitReason.ERROR
            elif not handle():
                return ExitReason.ERROR
            if self.stop_requested:
                if self.callback_error is not None:
                    e, self.callback_error = self.callback_error, None
                    self.last_error = f"hypervisor error in handler: {e!r}"
                    return ExitReason.ERROR
                return ExitReason.STOPPED
            if self._preempt:
                self._preempt = False
                return ExitReason.PREEMPT
            if monotonic_ns() >= deadline:
                if not grace:
                    return ExitReason.BUDGET
                grace = False
                deadline = 0                        # any later exit ends the slice
                self._ctx.grace_ns = _GRACE_NS      # armed in C right before the entry

    def _handle_exit(self) -> bool:
        """Turn one KVM exit into a callback. False: the engine cannot go on (last_error)."""
        m = self._run_map
        reason, direction, size, port, count = _EXIT_IO.unpack_from(m, _RUN_EXIT_REASON)
        if reason != Exit.IO or direction != 0:
            self._ctx.fast_n = 0    # any exit but an IN may change what the port policy answers
        if reason == Exit.IO:
            rip = self.regs[16]
            r0 = self.r0
            in_stubs = r0.stubs_va <= rip <= r0.stubs_va + PAGE_SIZE
            if port == HCALL_PORT and not in_stubs and direction == 1 and size == 1 and count == 1 \
                    and self.kernel_mode():
                # The hot path: a hypercall through this engine's hypercall page.
                self._hypercalls += 1
                if not _IO_RIP_AFTER:
                    self.regs[16] = rip + 2
                    self._dirty.value |= SYNC_REGS
                try:
                    self.on_hypercall()
                except BaseException as e:      # never let a handler bug unwind the loop
                    log.exception("%s: handler raised", self.name)
                    self.callback_error = e
                    self.stop_requested = True
                return True
            if port == SYSCALL_PORT and r0.syscall32_va <= rip <= r0.syscall32_va + 2:
                self._exit_kinds["syscall32"] += 1
                self._lib.aiovmm_kvm_syscall_entry(self._ctx_ptr)
                self._call(self.on_syscall32)
                return True
            if in_stubs:
                self._ctx.fast_n = 0
                self._exit_kinds[f"vector {port}"] += 1
                self._from_vector(port)
                return True
            if port == SYSCALL_PORT and r0.syscall_va <= rip <= r0.syscall_va + 2:
                self._exit_kinds[_SYSCALL] += 1
                self._from_syscall()
                return True
            self._exit_kinds["port io"] += 1
            self._guest_io(direction, size, port, count)
            return True
        if reason == Exit.INTR:
            self._exit_kinds["intr"] += 1
            return True
        if reason == Exit.SHUTDOWN:
            self.last_error = "triple fault (KVM_EXIT_SHUTDOWN)"
        elif reason == Exit.MMIO:
            addr = struct.unpack_from("<Q", m, _RUN_IO)[0]
            self.last_error = f"access to unbacked guest-physical address {addr:#x}"
        elif reason == Exit.HLT:
            self.last_error = "HLT in the engine's ring-0 stubs"
        else:
            self.last_error = f"unexpected KVM exit {reason}"
        return False

    def _complete_io_keeping_regs(self) -> None:
        """Let KVM finish a pending I/O instruction without entering the guest, then put the
        registers (and segment/control registers) back as they were: KVM completes a pending
        `in` at the next KVM_RUN whatever RIP is by then."""
        m = self._run_map
        dirty = self._dirty.value
        snap = bytes(m[_RUN_REGS:_RUN_SREGS + 312])
        self._dirty.value = 0
        self._kvm_complete()
        m[_RUN_REGS:_RUN_SREGS + 312] = snap
        self._dirty.value = dirty | SYNC_REGS

    def _call(self, fn, *args):
        """fn(*args)'s result, or None when it raised: the engine's crash boundary for
        handler bugs (logged, kept in callback_error, the slice stopped)."""
        try:
            return fn(*args)
        except BaseException as e:          # never let a handler bug unwind through the loop
            log.exception("%s: handler raised", self.name)
            self.callback_error = e
            self.stop_requested = True
            return None

    def _back_to_cpl3(self, cs_selector: int, ss_selector: int) -> None:
        """CS/SS back to CPL-3 state (csrc/kvm.c aiovmm_kvm_back_to_cpl3: no KVM_SET_SREGS
        at the next entry when they already are, as after kvm-pvm's SYSCALL); a selector
        the last far transfer loaded (load_segment) gets that load's hidden part back."""
        self._lib.aiovmm_kvm_back_to_cpl3(
            self._ctx_ptr, (cs_selector & ~3) == (FLAT_RING3_CS32 & ~3))
        ctx = self._ctx
        if ctx.cpl3_cs_set:
            # C's fast_iret loaded a guest GDT code segment since: its image is the one the
            # CPU keeps (not the descriptor read again, nor an older load's).
            self._cpl3_segs["cs"] = bytes(ctx.cpl3_cs)
            ctx.cpl3_cs_set = 0
        if ctx.cpl3_ss_set:                     # the same for a guest GDT stack segment
            self._cpl3_segs["ss"] = bytes(ctx.cpl3_ss)
            ctx.cpl3_ss_set = 0
        for name, sel, flat in (("cs", cs_selector, (FLAT_RING3_CS64, FLAT_RING3_CS32)),
                                ("ss", ss_selector, (FLAT_RING3_SS,))):
            sel &= 0xFFFF
            img = self._cpl3_segs[name]
            if struct.unpack_from("<H", img, 12)[0] != sel:
                if sel in flat:
                    continue                    # the C call wrote Xen's own
                # One the guest loaded itself (a far jump/return to its own GDT/LDT): the
                # descriptor it names, as the CPU loaded it (the vCPU reads its tables).
                desc = self.segment_descriptor(name, sel)
                if desc is None:
                    continue
                img = self._cpl3_segs[name] = _seg_image(sel, desc)
            o = _SEG[name]
            if self._sregs[o:o + 24] != img:
                self._sregs[o:o + 24] = img
                self._dirty.value |= SYNC_SREGS

    def _from_syscall(self) -> None:
        """SYSCALL at CPL 3 reached the LSTAR stub: RCX/R11 hold the return RIP/RFLAGS
        (set back by csrc/kvm.c aiovmm_kvm_syscall_entry, the one place of that rule: R11
        never raises IOPL or sets VM/NT)."""
        self._lib.aiovmm_kvm_syscall_entry(self._ctx_ptr)
        self._call(self.on_hypercall)

    def _from_vector(self, vector: int) -> None:
        """An exception or INT n went through the IDT: read the CPU's frame, return to CPL 3
        state as it was at the fault, and report it."""
        r = self.regs
        sp = r[6]
        if not self.r0.stack_top - 64 <= sp <= self.r0.stack_top - 40:
            # Not a frame the CPU pushed from CPL 3 onto our stack: end with an error.
            self.last_error = f"exception {vector} with ring-0 RSP {sp:#x} outside the engine stack"
            self.callback_error = RuntimeError(self.last_error)
            self.stop_requested = True
            return
        has_err = sp == self.r0.stack_top - _ERR_FRAME
        off = self.r0.stack_maddr + (sp - self.r0.stack_va)
        if has_err:
            err, rip, cs, rflags, rsp, ss = struct.unpack_from("<6Q", self.mem.map, off)
        else:
            err = 0
            rip, cs, rflags, rsp, ss = struct.unpack_from("<5Q", self.mem.map, off)
        if not cs & 3:
            # The guest never runs at ring 0. The one way there: a SYSCALL from compatibility
            # mode, which kvm-pvm emulates (KVM's em_syscall writes RIP back in the caller's
            # mode): MSR_CSTAR truncated to 32 bits, a guest address, entered at ring 0 on the
            # caller's stack. The VM's CPUID vendor (_PVM_VENDOR) makes that SYSCALL a #UD at
            # CPL 3 (below); should kvm-pvm enter ring 0 all the same, CR4.SMEP faults that
            # fetch (every guest mapping is a user page) and IST1 puts every vector's frame
            # on the engine stack, never on a stack the guest chose (setup_long_mode, _Ring0).
            # That SYSCALL is the guest's, taken as Xen's cstar_enter (on_syscall32); any
            # other ring-0 fault ends the vCPU.
            if vector == 14 and rip == self.r0.syscall32_va & 0xFFFFFFFF:
                r[6] = rsp
                self._lib.aiovmm_kvm_syscall_entry(self._ctx_ptr)    # RIP, RFLAGS, CS back
                self._exit_kinds["syscall32"] += 1
                self._call(self.on_syscall32)
                return
            self.last_error = f"exception {vector} at ring 0, RIP {rip:#x}"
            self.callback_error = RuntimeError(self.last_error)
            self.stop_requested = True
            return
        r[16], r[17], r[6] = rip, rflags & ~RF_TF if self._stepping else rflags, rsp
        self._back_to_cpl3(cs, ss)
        if self._stepping and vector == 1:
            self._step_hit = True
            return
        if not has_err and vector < 32 and vector not in (1, 3, 4):
            # `int $n` to an exception vector arrives as vector n without an error code, RIP
            # past `cd n`. Xen's gate there is DPL 0: the guest gets #GP((n << 3) | 2) at the
            # INT. (kvm-pvm is not consistent for these vectors: some arrive as #UD at the
            # instruction, handled below; the hostile sweep covers 3, 4 and 32-255.)
            try:
                before = self._read_code(rip - 2, 2)
            except LookupError:
                before = b""
            if before == bytes([0xCD, vector]):
                r[16] = rip - 2
                self._call(self.on_exception, 13, (vector << 3) | 2, 0)
                return
        if vector == 13 and has_err and err == 0 and self._int_before(rip) is not None:
            # kvm-pvm (measured for `int $23`): #GP(0) with RIP already past `cd n`.
            n = self._int_before(rip)
            if n < 32 and n not in (3, 4):
                r[16] = rip - 2
                self._call(self.on_exception, 13, (n << 3) | 2, 0)
            else:
                self._call(self.on_exception, n, 0, 0)
            return
        if vector == 6 and self._one_byte_trap(rip):
            return
        if vector in (6, 13):
            # kvm-pvm turns some `int $n` (measured: int $0x80) into #UD at the instruction
            # itself; report it as the Unicorn engine and a real CPU with a DPL-3 gate do:
            # vector n, RIP past the instruction.
            try:
                code = self._read_code(rip, 2)
            except LookupError:
                code = b""
            if code == b"\x0f\x05" and vector == 6 and not self._sregs[_SEG["cs"] + 19]:
                # SYSCALL refused by kvm-pvm outside 64-bit mode (_PVM_VENDOR; CS's L bit
                # clear): the compat SYSCALL, as the CPU would have made it (RCX, R11), to
                # MSR_CSTAR's path.
                self._exit_kinds["syscall32"] += 1
                r[2], r[11], r[16] = rip + 2, r[17], rip + 2
                self._call(self.on_syscall32)
                return
            if len(code) == 2 and code[0] == 0xCD and vector == 6:
                self._int_n(rip, code[1], 2)
                return
            if vector == 13 and code == b"\x0f\x01":
                # vmcall outside VMX operation is #UD on a real CPU and on Xen; kvm-pvm
                # raises #GP for it.
                try:
                    third = self._read_code(rip + 2, 1)
                except LookupError:
                    third = b""
                if third == b"\xc1":
                    self._call(self.on_invalid_opcode)
                    return
        if vector == 6:
            sel = self._far_transfer_gate(rip)
            if sel is not None:
                # kvm-pvm raises #UD for a far call/jmp through a call gate; a CPU (and Xen,
                # whose gates are stored with DPL 0) gives #GP(selector) at the instruction.
                self._call(self.on_exception, 13, sel & 0xFFFC, 0)
                return
            self._call(self.on_invalid_opcode)
            return
        cr2 = self._sreg_u64(_SREG_OFF["cr2"]) if vector == 14 else 0
        if vector == 14 and MACH2PHYS_VIRT_START <= cr2 < MACH2PHYS_VIRT_END:
            if cr2 - MACH2PHYS_VIRT_START < self.r0.m2p_bytes:
                # An instruction fetch there (RIP in the M2P: a jump, a trap or NMI handler
                # set to it) is never a load to perform: Xen maps the M2P read-only and NX
                # (__PAGE_HYPERVISOR_RO), its bytes are the guest's (machphys_update).
                fetch = bool(err & PFEC_INSN_FETCH) or 0 <= cr2 - rip < 15
                if not err & 2 and not fetch and self._emulate_m2p_read(rip, cr2):
                    return
                # Xen's M2P is mapped there read-only: a present-page fault, never the
                # reserved-bit fault kvm-pvm reports for its own slot.
                err = (err & ~8) | 1 | (PFEC_INSN_FETCH if fetch else 0)
        self._call(self.on_exception, vector, err, cr2)

    def _far_transfer_gate(self, rip: int) -> int | None:
        """The selector if the instruction at `rip` is an indirect far call/jmp (FF /3, /5,
        optionally REX-prefixed) whose target selector names a call gate in the GDT/LDT the
        engine has loaded; else None. Read-only walks, so a hostile guest gets at worst #UD."""
        try:
            code = self._read_code(rip, 3)
            i = 1 if 0x40 <= code[0] <= 0x4F else 0
            if code[i] != 0xFF or (code[i + 1] >> 3) & 7 not in (3, 5) or code[i + 1] >> 6 == 3:
                return None
            d = self.decode(self._read_code(rip, 15))
            if d is None or "[" not in d[2]:
                return None
            addr = self._operand_address(rip + d[0], d[2])
            if addr is None:
                return None
            if not self._sregs[_SEG["cs"] + 19]:
                # Compatibility mode: the CPU's address is 32 bits (EAX...); the upper half of
                # the 64-bit registers is the guest's and names nothing the CPU read.
                addr &= 0xFFFFFFFF
            width = 8 if i == 1 and code[0] & 8 else 4
            # The far pointer as the CPU read it, at CPL 3: never through a supervisor page.
            sel = int.from_bytes(self._read_user(addr + width, 2), "little")
            if sel & 4:
                base, limit = self._sreg_u64(_SEG["ldt"]), struct.unpack_from("<I", self._sregs, _SEG["ldt"] + 8)[0]
            else:
                base, limit = struct.unpack_from("<QH", self._sregs, _SREG_OFF["gdt"])
            off = sel & ~7
            if off + 7 > limit:
                return None
            desc = self._read_descriptor(base + off)
        except LookupError:
            return None
        return sel if (desc >> 40) & 0x1F == 0x0C else None      # system, type 0xC: call gate

    def _operand_address(self, rip_next: int, ops: str) -> int | None:
        """The linear address of a capstone memory operand `[reg + disp]`, `[rip + disp]` or
        `[disp]` (no index register: enough for the far-pointer operands checked here)."""
        inner = ops[ops.index("[") + 1:ops.index("]")].replace(" ", "")
        total = 0
        for term in inner.replace("-", "+-").split("+"):
            if not term:
                continue
            neg = term.startswith("-")
            term = term.lstrip("-")
            if term == "rip":
                val = rip_next
            elif term in _GPR and _GPR[term][1] == 8:
                val = self.regs[_GPR[term][0]]
            else:
                try:
                    val = int(term, 0)
                except ValueError:
                    return None
            total += -val if neg else val
        return total & 0xFFFFFFFFFFFFFFFF

    def _one_byte_trap(self, rip: int) -> bool:
        """kvm-pvm reports in compatibility mode as #UD at the instruction (measured): `int3`
        (cc) and `icebp` (f1), `into` (ce) with OF set, and each of them or `int $n` (cd n)
        after legacy prefixes (in 64-bit mode int3, icebp and int $n arrive as their vectors
        past the instruction, prefixes and all; `into` is #UD there, as on a CPU). A CPU,
        and Xen (its IDT gates 1, 3, 4 are DPL 3; do_int3, do_trap), trap past the whole
        instruction, the prefixes ignored (LOCK: #UD, emulate.legacy_prefixes): the guest's
        trap 3 / 1 / 4 (gdb's breakpoints in a 32-bit process), `int $n` as _int_n; `into`
        with OF clear does nothing. True if it was one of them, reported so."""
        from .emulate import legacy_prefixes
        try:
            code = self._read_code(rip, 15)
        except LookupError:
            try:
                code = self._read_code(rip, PAGE_SIZE - (rip & 0xFFF))   # up to an unmapped page
            except LookupError:
                return False
        n = legacy_prefixes(code, rex=not self.compat_mode())
        if n is None or n >= len(code):
            return False
        op = code[n]
        r = self.regs
        if op == 0xCD and n and n + 1 < len(code):
            self._int_n(rip, code[n + 1], n + 2)
            return True
        if op == 0xCE and not self._sregs[_SEG["cs"] + 19]:      # compatibility mode
            r[16] = rip + n + 1
            self._dirty.value |= SYNC_REGS
            if r[17] & RF_OF:
                self._call(self.on_exception, 4, 0, 0)
            return True
        if op not in (0xCC, 0xF1):
            return False
        r[16] = rip + n + 1
        self._call(self.on_exception, 3 if op == 0xCC else 1, 0, 0)
        return True

    def _int_n(self, rip: int, n: int, length: int) -> None:
        """`int $n` of `length` bytes at `rip` that kvm-pvm reported as #UD at the
        instruction: as the CPU with Xen's IDT gives it (DPL-3 gates only for 3 and 4 among
        the exceptions), #GP((n << 3) | 2) at the instruction for a vector below 32, else
        vector n past it (traps.inject_exception checks the guest's gate)."""
        if n < 32 and n not in (3, 4):
            self._call(self.on_exception, 13, (n << 3) | 2, 0)
        else:
            self.regs[16] = rip + length
            self.int_length = length        # a #GP for a refused gate points at `rip`
            try:
                self._call(self.on_exception, n, 0, 0)
            finally:
                self.int_length = 2

    def _int_before(self, rip: int) -> int | None:
        """n if the two bytes before `rip` are `int $n` (cd n), else None."""
        try:
            b = self._read_code(rip - 2, 2)
        except LookupError:
            return None
        return b[1] if b[0] == 0xCD else None

    def _emulate_m2p_read(self, rip: int, cr2: int) -> bool:
        """A load from Xen's fixed M2P address (reserved by kvm-pvm): perform it from the M2P
        frames. Register-destination mov/movzx/movsx/movsxd only; anything else is bounced
        as the #PF. True if done (RIP advanced)."""
        try:
            d = self.decode(self._read_code(rip, 15))
        except LookupError:
            return False
        if d is None:
            return False
        n, mnemonic, ops = d
        if mnemonic not in ("mov", "movzx", "movsx", "movsxd") or ", " not in ops:
            return False
        dst, src = ops.split(", ", 1)
        width = {"qword": 8, "dword": 4, "word": 2, "byte": 1}.get(src.split(" ", 1)[0])
        reg = _GPR.get(dst)
        if width is None or reg is None or "[" not in src:
            return False
        idx, dwidth = reg
        off = cr2 - MACH2PHYS_VIRT_START
        if off + width > self.r0.m2p_bytes:
            return False
        val = int.from_bytes(self.mem.read(self.r0.m2p_maddr + off, width), "little")
        if mnemonic in ("movsx", "movsxd") and val >> (8 * width - 1):
            val -= 1 << (8 * width)
        r = self.regs
        if dwidth == 8:
            r[idx] = val & 0xFFFFFFFFFFFFFFFF
        elif dwidth == 4:
            r[idx] = val & 0xFFFFFFFF                 # 32-bit writes zero-extend
        else:
            mask = (1 << (8 * dwidth)) - 1
            r[idx] = (r[idx] & ~mask) | (val & mask)
        r[16] = rip + n
        self._dirty.value |= SYNC_REGS
        return True

    def _guest_io(self, direction: int, size: int, port: int, count: int) -> None:
        """Port I/O by the guest itself through a port open in the I/O bitmap. KVM completes a
        pending `in` at the next KVM_RUN whatever RIP is, so complete it now and put the
        registers back as they were before the instruction. A plain IN/OUT is then answered
        by the shared port policy through on_port_io(port, size, write, value), as on the
        emulated engine (a refusal becomes #GP(0) at the instruction there); anything else
        (INS/OUTS, or an `out` to the hypercall port outside kernel mode) is reported as the
        #GP(0) a closed port gives, for the shared emulator to decode."""
        m = self._run_map
        data_off = struct.unpack_from("<Q", m, _RUN_IO + 8)[0]
        if direction == 0 and count == 1 and port not in _ENGINE_PORTS \
                and self._plain_io_at(self.regs[16], 0, size, port):
            # The hot case (Linux polls the PIT 100,000 times while booting): a plain IN, RIP
            # on it. An allowed one is answered in the exit's data area and KVM completes it
            # at the next KVM_RUN (AL/AX merged, EAX zero-extended, RIP advanced; dropped if
            # RIP was moved meanwhile, e.g. for an event, and then simply executed again).
            val = self._call(self.on_port_io, port, size, False, 0)
            if val is not None:
                m[data_off:data_off + size] = (val & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
                if size == 1 and val & 0xFF == 0xFF and not self.stop_requested:
                    self._remember_in(self.regs[16], port)
                else:
                    self._ctx.fast_n = 0
                return
            # Refused (#GP(0) queued at the instruction): KVM must not complete it.
            self._ctx.fast_n = 0
            self._complete_io_keeping_regs()
            return
        self._ctx.fast_n = 0
        if self._string_io(direction, size, port, count, data_off):
            return
        value = int.from_bytes(m[data_off:data_off + size], "little") if direction == 1 else 0
        self._complete_io_keeping_regs()
        rip = self.regs[16]
        # kvm-pvm reports an OUT with RIP past the instruction, an IN (KVM's fast PIO path)
        # with RIP on it.
        at = count == 1 and self._plain_io_at(rip, direction, size, port)
        if not at and _IO_RIP_AFTER:
            rip -= self._io_insn_len(rip, direction, size, port)
        self.regs[16] = rip
        self._dirty.value |= SYNC_REGS
        plain = count == 1 and port not in _ENGINE_PORTS and (at or self._plain_io_at(rip, direction, size, port))
        if not plain:
            self._call(self.on_exception, 13, 0, 0)
            return
        val = self._call(self.on_port_io, port, size, direction == 1, value)
        if val is None:
            return                          # refused (the handler queued #GP(0) at `rip`) or raised
        r = self.regs
        if direction == 0:                  # IN: AL/AX/EAX (a 32-bit write zero-extends)
            mask = (1 << (8 * size)) - 1
            r[0] = val & mask if size == 4 else (r[0] & ~mask) | (val & mask)
        r[16] = rip + self._plain_io_len(rip)

    def _string_io(self, direction: int, size: int, port: int, count: int, data_off: int) -> bool:
        """INS/OUTS on a port open in the TSS bitmap (_DIRECT_PORTS): KVM's emulator has begun
        it before the host sees the exit, so the port policy is applied here, to the state
        the guest had before the instruction, as Xen's guest_io_okay is before any access.
        INS: KVM exits with RIP on it and nothing done, and stores the data area at ES:RDI
        when the exit completes: allowed, the data area gets the policy's answer per element
        (KVM stores it and advances RDI/RCX at the next entry); refused, it gets what the
        destination holds, so the completion stores nothing new, and the #GP(0) is queued at
        the instruction. OUTS: KVM did one element (RSI, RCX advanced; RIP on a REP one, also
        after its last element, past a single one): allowed, that is the whole effect (writes
        are dropped); refused, RSI/RCX/RIP are put back before the #GP(0). A single OUTS right
        before a REP OUTS is taken for the REP one (the bytes cannot tell them apart): only the
        guest's own registers are off then. False: a plain IN/OUT, or no OUTS found."""
        r = self.regs
        rip = r[16]
        step = -size if r[17] & RF_DF else size
        m = self._run_map
        if direction == 0:
            if self._plain_io_at(rip, 0, size, port):
                return False
            val = self._call(self.on_port_io, port, size, False, 0)
            if val is not None:
                m[data_off:data_off + count * size] = \
                    (val & ((1 << (8 * size)) - 1)).to_bytes(size, "little") * count
                return True
            try:
                dest = self._ins_destination(rip)
                m[data_off:data_off + count * size] = b"".join(
                    self._read_user(dest(r[5] + k * step), size) for k in range(count))
            except LookupError:
                pass                        # unmapped: KVM's store faults (#PF), nothing written
            self._complete_io_keeping_regs()
            return True
        self._complete_io_keeping_regs()    # nothing left for KVM to do with it
        insn = self._outs_at(rip, size)
        if insn is not None and insn[1]:
            start, rep = rip, True          # REP: RIP stays on it, also after the last element
        else:
            try:
                tail = self._read_code(rip - 3, 3)
            except LookupError:
                return False
            n = 1                           # the opcode, then prefixes read backwards
            while n < 3 and tail[2 - n] in (0xF2, 0xF3, 0x66):
                n += 1
            insn = self._outs_at(rip - n, size)
            if insn is None or insn[0] != n:
                return False
            start, rep = rip - n, insn[1]
        value = int.from_bytes(m[data_off:data_off + size], "little")
        r[16] = start
        ok = self._call(self.on_port_io, port, size, True, value) is not None
        if ok:
            r[16] = rip
            return True
        r[4] = (r[4] - step) & 0xFFFFFFFFFFFFFFFF
        if rep:
            r[2] = (r[2] + 1) & 0xFFFFFFFFFFFFFFFF
        self._dirty.value |= SYNC_REGS
        return True

    def _ins_destination(self, rip: int) -> Callable[[int], int]:
        """RDI -> the linear address the INS at `rip` stores to, as the CPU computes it: the
        address size (64-bit mode 64, compatibility mode 32; a 67 prefix halves it) and, in
        compatibility mode, ES's base. The upper part of RDI beyond the address size is the
        guest's and names nothing the CPU writes."""
        try:
            code = self._read_code(rip, 15)
        except LookupError:                  # the instruction ends before an unmapped page
            code = self._read_code(rip, PAGE_SIZE - (rip & 0xFFF))
        compat = not self._sregs[_SEG["cs"] + 19]
        a16 = 0x67 in code[:next((i for i, b in enumerate(code) if b not in _LEGACY_PREFIXES), len(code))]
        if not compat:
            mask = 0xFFFFFFFF if a16 else 0xFFFFFFFFFFFFFFFF
            return lambda rdi: rdi & mask
        mask = 0xFFFF if a16 else 0xFFFFFFFF
        base = self._sreg_u64(_SEG["es"])
        return lambda rdi: (base + (rdi & mask)) & 0xFFFFFFFF

    def _outs_at(self, va: int, size: int) -> tuple[int, bool] | None:
        """(length, REP) of an OUTS of `size` bytes starting at `va` (prefixes F2/F3, 66), or
        None if the bytes there are not one."""
        try:
            code = self._read_code(va, 3)
        except LookupError:
            return None
        i, rep = 0, False
        while i < 2 and code[i] in (0xF2, 0xF3, 0x66):
            rep = rep or code[i] != 0x66
            i += 1
        want = 0x6E if size == 1 else 0x6F
        if code[i] != want or (size == 2) != (0x66 in code[:i]):
            return None
        return i + 1, rep

    def _keep_port_answers(self) -> None:
        """At a slice's start: keep the INs C answers by itself (_remember_in) only if what
        each answer was checked against is unchanged since, though no exit of this vCPU was
        handled in between (the slice ended on the timer): the instruction's translation (no
        page-table write, the same CR3: an event bounced at the slice's end may have switched
        to the kernel's root) and the port policy's answer without guest memory
        (emulate.port_in_fixed again: the guest's mode may have changed; its other inputs,
        the VM assists, IOPL and I/O bitmap, empty the table where they change,
        forget_port_answers). Linux's quick_pit_calibrate spans hundreds of slices."""
        if self._fast_key != (self.mem.pt_generation, self._sreg_u64(_SREG_OFF["cr3"])) \
                or not self.port_in_fixed():
            self._ctx.fast_n = 0

    def forget_port_answers(self) -> None:
        """Empty the table of INs aiovmm_kvm_run_ex answers by itself
        (emulate.port_policy_changed: the port policy's inputs changed)."""
        self._ctx.fast_n = 0

    def _remember_in(self, rip: int, port: int) -> None:
        """The one-byte IN at `rip` was just answered all ones: let aiovmm_kvm_run_ex answer
        it again by itself until the host handles any other exit (which empties the table:
        the port policy's inputs, the guest's mode, IOPL and page tables, only change then,
        or between slices, where _keep_port_answers checks them),
        if the policy's answer does not depend on guest memory (an I/O bitmap the guest can
        rewrite without an exit) and the instruction's bytes lie in one frame."""
        ctx = self._ctx
        for i in range(ctx.fast_n):
            if ctx.fast[i].rip == rip and ctx.fast[i].port == port:
                return
        if (rip & 0xFFF) == 0xFFF or not self.port_in_fixed():
            return
        try:
            maddr = self._code_maddr(rip)
        except LookupError:
            return
        key = (self.mem.pt_generation, self._sreg_u64(_SREG_OFF["cr3"]))
        if ctx.fast_n and key != self._fast_key:
            ctx.fast_n = 0                  # every entry in the table was made under one key
        self._fast_key = key
        slot = ctx.fast[ctx.fast_next % _FAST_IN_MAX]
        slot.rip, slot.maddr, slot.port = rip, maddr, port
        ctx.fast_next = (ctx.fast_next + 1) % _FAST_IN_MAX
        ctx.fast_n = min(ctx.fast_n + 1, _FAST_IN_MAX)

    def _plain_io_at(self, rip: int, direction: int, size: int, port: int) -> bool:
        """True if the bytes at `rip` are a non-string IN/OUT (E4-E7 imm8 or EC-EF DX form,
        with an optional 66 prefix for 16-bit accesses)."""
        try:
            code = self._read_code(rip, 3)
        except LookupError:
            return False
        if size == 2:
            if code[0] != 0x66:
                return False
            code = code[1:]
        op = code[0]
        if op != (0xE4 if direction == 0 else 0xE6) + (size > 1) and op != (0xEC if direction == 0 else 0xEE) + (size > 1):
            return False
        return op >= 0xEC or code[1] == port

    def _plain_io_len(self, rip: int) -> int:
        code = self._read_code(rip, 2)
        n = 1 if code[0] == 0x66 else 0
        return n + (2 if code[n] in (0xE4, 0xE5, 0xE6, 0xE7) else 1)

    def _io_insn_len(self, rip_after: int, direction: int, size: int, port: int) -> int:
        """Length of the I/O instruction that ends at rip_after (kvm-pvm reports RIP past it):
        the imm8 forms (E4-E7) are 2 bytes, the DX and string forms 1, plus a 66 operand-size
        prefix for 16-bit accesses and a rep prefix for string forms."""
        try:
            before = self._read_code(rip_after - 4, 4)
        except LookupError:
            return 2
        n = 2 if before[2] in (0xE4, 0xE5, 0xE6, 0xE7) and before[3] == (port & 0xFF) else 1
        if before[3] in (0x6C, 0x6D, 0x6E, 0x6F) and n == 1 and before[2] in (0xF2, 0xF3):
            n += 1
        if size == 2 and before[4 - n - 1] == 0x66:
            n += 1
        return n

    def _page_maddr(self, va: int) -> int:
        """Machine address of the page holding guest VA `va` as a CPL-3 access finds it
        (`_walk_va`, user), cached per root and page while no page table changes: Linux polls
        the PIT from one instruction. LookupError if not mapped so."""
        mem = self.mem
        cache = self._xlate
        if self._xlate_gen != mem.pt_generation:      # a page table changed: walks are stale
            cache.clear()
            self._xlate_gen = mem.pt_generation
        key = (self._sreg_u64(_SREG_OFF["cr3"]) & PTE_FRAME_MASK, va >> 12)
        t = cache.get(key)
        if t is None:
            t = self._walk_va(va, user=True)
            if len(cache) > 64:
                cache.clear()
            cache[key] = t
        return t

    def _code_maddr(self, va: int) -> int:
        return self._page_maddr(va) + (va & 0xFFF)

    def _walk_va(self, va: int, user: bool) -> int:
        """The one walk of the current page tables every guest-VA read of this engine uses:
        machine address of the 4 KiB page holding `va` for a read (a CPL-3 one if `user`),
        by mmu.walk's rule (present, user, no reserved bit, no large page at any level: the
        engine's supervisor direct map is never walked as tables). LookupError otherwise."""
        ma = mmu_walk(self.mem, self._sreg_u64(_SREG_OFF["cr3"]), va, PFEC_USER if user else 0)
        if ma < 0:
            raise LookupError(hex(va))
        return ma & ~0xFFF

    def _read_va(self, va: int, n: int, page: Callable[[int], int]) -> bytes:
        """`n` bytes at guest VA `va`, each page's machine address from `page`."""
        view, out, a, end = self.mem.view, b"", va, va + n
        while a < end:
            t = page(a)
            take = min(end - a, PAGE_SIZE - (a & 0xFFF))
            out += bytes(view[t + (a & 0xFFF):t + (a & 0xFFF) + take])
            a += take
        return out

    def _read_user(self, va: int, n: int) -> bytes:
        """Bytes at a guest VA as a CPL-3 read finds them (`_walk_va`; Xen's area and the
        engine's supervisor mappings are refused). Not cached: for guest-chosen data addresses
        (_far_transfer_gate, _string_io), not code."""
        return self._read_va(va, n, lambda a: self._walk_va(a, user=True))

    def _read_code(self, va: int, n: int) -> bytes:
        """Bytes at a guest VA as a CPL-3 read finds them, through the cached walk
        (`_page_maddr`): instruction bytes at or near the RIP the guest ran at."""
        return self._read_va(va, n, self._page_maddr)

    def _read_descriptor(self, va: int) -> int:
        """The 8-byte descriptor at `va` in the GDT/LDT window the engine loaded: Xen's
        area, supervisor-only, read as the CPU's descriptor-table access does."""
        return int.from_bytes(self._read_va(va, 8, lambda a: self._walk_va(a, user=False)), "little")

    def stop(self) -> None:
        """End the current slice after the running handler returns (or now, on the vCPU
        thread)."""
        self.stop_requested = True
        self.kick_thread()

    def preempt(self) -> None:
        """End the slice at the next exit (from the loop thread)."""
        self._preempt = True
        self.kick_thread()

    def interrupt(self) -> None:
        """End the running engine run soon, from any thread (the scheduler's I/O watcher):
        the slice timer's signal to the thread running it, whose handler sets
        kvm_run.immediate_exit only inside a run (KVM_RUN returns -EINTR, as at the
        deadline), and `interrupted`, which ends every later run at once until the
        scheduler clears it (a kick between two runs is cleared by the next run's start)."""
        self.interrupted = True
        tid = self._run_thread
        if tid:
            signal.pthread_kill(tid, KICK_SIGNAL)

    def cut_slice(self, ns: int) -> None:
        """End the running slice `ns` from now if it would run longer (a timer the guest
        armed from inside it falls due first: timers.py); nothing between slices. From an
        exit's handler (the slice timer is re-armed; run_ex enters no guest past it)."""
        c = self._ctx
        deadline = time.monotonic_ns() + max(ns, 1)
        if c.deadline_ns and deadline < c.deadline_ns:
            c.deadline_ns = deadline
            kicked = self._lib.aiovmm_kvm_take_kick(self._run_ptr)   # slice_begin clears it
            self._lib.aiovmm_kvm_slice_begin(self._run_ptr, self._timer, deadline)
            if kicked:
                self._run_map[1] = 1

    @property
    def blocks_executed(self) -> int:
        return self.exits

    def enable_instruction_count(self) -> None:
        """Not available under KVM (instructions run natively); instructions_executed stays 0."""

    @property
    def instructions_executed(self) -> int:
        return 0

    # -- dirty tracking (migration) -------------------------------------------------------------
    def start_dirty_log(self) -> None:
        """Track guest writes to machine memory (KVM_MEM_LOG_DIRTY_PAGES on slot 0)."""
        self._set_slot(0, 0, self.mem.size, self.mem.fd_address, 1)
        self._dirty_log = True

    def get_dirty_log(self) -> set[int]:
        """MFNs the guest wrote since the last call (or start_dirty_log); resets the log."""
        if not self._dirty_log:
            raise RuntimeError("dirty logging is not started")
        nbits = self.mem.nr_frames
        bitmap = ctypes.create_string_buffer(((nbits + 63) // 64) * 8)
        fcntl.ioctl(self.vm_fd, Ioctl.GET_DIRTY_LOG, struct.pack("<IIQ", 0, 0, ctypes.addressof(bitmap)))
        raw = int.from_bytes(bitmap.raw, "little")
        out = set()
        while raw:
            low = raw & -raw
            out.add(low.bit_length() - 1)
            raw ^= low
        out.discard(self.r0.stack_maddr >> PAGE_SHIFT)    # the CPU's exception frames, not guest data
        return out

    def close(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self._thread.close()                  # the guest is out before anything goes
            self._thread = None
            self._timer = ctypes.c_void_p()       # the thread deleted it
        if getattr(self, "_guard", None) is not None:
            self._guard.close()
        if getattr(self, "_lib", None) is not None and self._timer:
            self._lib.aiovmm_kvm_timer_delete(self._timer)
            self._timer = ctypes.c_void_p()
        for attr in ("regs", "_valid", "_dirty", "_run_anchor"):
            if hasattr(self, attr):
                delattr(self, attr)
        if hasattr(self, "_sregs"):
            self._sregs.release()
            del self._sregs
        if hasattr(self, "_run_map"):
            self._run_map.close()
            del self._run_map
        if (getattr(self, "_stats_fd", None) or -1) >= 0:
            os.close(self._stats_fd)
            self._stats_fd = -1
        if self.vm_fd >= 0:
            self._pool.retire(self.vm_fd, self.vcpu_fd)     # KVM's VM teardown, in the worker
        self.vcpu_fd = self.vm_fd = -1


def _gettid() -> int:
    return threading.get_native_id()


ENGINES = ("unicorn", "kvm", "auto")


def choose_engine(kind: str) -> str:
    """Resolve an engine name. "kvm" requires a usable /dev/kvm (KVMUnavailable otherwise).
    "auto": KVM on hardware virtualization; on kvm-pvm the emulated engine, because there
    every exit costs ~30 us and the project's guests are exit-bound, not CPU-bound
    (docs/design.md, "Which engine `auto` picks")."""
    if kind not in ENGINES:
        raise ValueError(f"unknown vCPU engine {kind!r} (choose from {', '.join(ENGINES)})")
    if kind == "unicorn":
        return kind
    why = unavailable_reason()
    if kind == "kvm":
        if why:
            raise KVMUnavailable(why)
        return kind
    return "kvm" if not why and hardware_virtualization() else "unicorn"
