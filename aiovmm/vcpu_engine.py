"""The vCPU engine: one x86_64 CPU emulated by Unicorn 2.1.4 (built with aiovmm's patches by
`make setup`: csrc/unicorn/README.md; the wheel's library works too, slower).

This is the only module that imports unicorn. Everything above it sees a small interface
(`VCPUEngine`): registers by name, run a slice with a block budget, flush the TLB, and
callbacks for hypercalls (SYSCALL), exceptions and invalid opcodes. A KVM engine can slot in
behind the same interface later.

Unicorn quirks handled here, each measured in shared/research/unicorn/NOTES.md:
- Slices end through aiovmm/_native/preempt.so: either a C block hook (budget, preempt flag,
  deadline) or, with "timer" slices, a per-thread POSIX timer whose signal asks the CPU to
  leave its translated code and a stop raised by the emulation thread itself between two
  blocks (csrc/preempt.c says why each part is needed). Never emu_stop from another thread,
  timeout= or count= (they re-execute read-modify-write instructions, skip instruction hooks,
  or cost a per-instruction hook).
- Unicorn bug #1883: env->old_exception is never reset, so the 2nd fault becomes #DF and the
  3rd a silent triple fault. Every exception hook resets it through the context blob.
- In the SYSCALL hook RIP is the syscall itself and Unicorn adds 2 after the hook returns, so a
  RIP written inside the hook is written as target-2 (`set_rip` does this).
- The TLB is never flushed by Unicorn; it is flushed where Xen flushes the real one: the
  guest's own flushes (MMUEXT_TLB_FLUSH*/INVLPG*, update_va_mapping's flags, CR3 loads),
  Xen's own mappings changing (GDT/LDT, ptwr's scratch frame, a grant unmap), and, whatever
  the guest asked, a frame being freed or taking a page-table or descriptor type
  (MachineMemory.tlb_engines). A page-table write alone flushes nothing (`pt_written`).
- Hot paths use raw batched uc_reg_read/write calls (1.6-2.3 us), not the binding (5 us each).
- CS/SS cannot be made CPL3 by reg_write: the first slice starts in a ring-0 stub that runs a
  real `iretq` into the guest (see `start_in_stub`). reg_write of CS/SS changes only the
  selector: `load_segment` writes the hidden part and QEMU's mode flags itself (_Segments),
  so an iret to a 32-bit code segment really runs in compatibility mode.
"""
from __future__ import annotations

import ctypes
import enum
import logging
import os
import struct
import time
import typing
from typing import Callable, Sequence

# Unicorn 2.1.4 with aiovmm's patches (csrc/unicorn/README.md: guest stores off the slow path
# on pages without translated code, the block-start exit check inline), built by `make setup`
# into _native/unicorn/: loaded instead of the wheel's library unless LIBUNICORN_PATH names
# another (bench A/B: the wheel's own directory). Same source and layout, same behaviour.
_PATCHED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_native", "unicorn")
if os.path.exists(os.path.join(_PATCHED_DIR, "libunicorn.so.2")):
    os.environ.setdefault("LIBUNICORN_PATH", _PATCHED_DIR)

from unicorn import Uc, UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, UC_HOOK_INTR, UC_HOOK_INSN, \
    UC_HOOK_INSN_INVALID, UC_HOOK_BLOCK
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uclib

from .abi import segment_base_limit
from .clock import SystemClock
from .tcg_memory import TcgMemory

if typing.TYPE_CHECKING:
    from .memory import MachineMemory

log = logging.getLogger("aiovmm.vcpu_engine")

# True if the patched library is the one loaded (false: the wheel's, e.g. `unicorn` was
# imported before this module, or LIBUNICORN_PATH chose another).
UNICORN_PATCHED = os.path.dirname(os.path.abspath(uclib._name)) == _PATCHED_DIR
if not UNICORN_PATCHED:
    log.info("unpatched Unicorn library %s: guest stores and block starts are slower "
             "(make setup builds the patched one)", uclib._name)

# QEMU's tb_invalidate_phys_range(uc, start, end): drops the translated blocks of RAM bytes
# [start, end), by RAM offset (which is the machine address here: guest memory is the one
# RAM block, mapped at 0). Exported by libunicorn; without it (another build) the whole
# translation cache goes instead (VcpuEngine.code_written).
_tb_invalidate = getattr(uclib, "tb_invalidate_phys_range_x86_64", None)
if _tb_invalidate is not None:
    _tb_invalidate.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64]
    _tb_invalidate.restype = None

_NATIVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_native", "preempt.so")

REGS: dict[str, int] = {
    n: getattr(X, "UC_X86_REG_" + n.upper()) for n in (
        "rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags "
        "cs ss ds es fs gs fs_base gs_base cr0 cr2 cr3 cr4").split()
}
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip", "rflags")

# Control-register values for long mode with paging (NOTES.md "Paging").
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
MSR_EFER = 0xC0000080
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1, 1 << 8, 1 << 10, 1 << 11

# Hundreds of guests: keep the translation buffer small (NOTES.md: 1 GiB by default).
# Not a multiple of 2 MiB: QEMU madvises the buffer MADV_HUGEPAGE and Linux aligns
# PMD-multiple anonymous mappings, so the first translation touched a whole 2 MiB
# huge page per vCPU (bench/density.py: 3.3 -> 1.35 MiB host RSS per idle guest).
_TCG_BUFFER = 31 << 20
_UC_CTL_TLB_FLUSH_WRITE = 11 | (1 << 30)       # UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0)
_INTR_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p)
_INVALID_CB = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p)
_SYSENTER_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_RDTSC_CB = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p)
_IN_CB = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p)
_OUT_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p)


class _Slice(ctypes.Structure):
    """Mirror of struct aiovmm_slice in csrc/preempt.c."""
    _fields_ = [("preempt", ctypes.c_int32), ("reason", ctypes.c_int32),
                ("budget", ctypes.c_int64), ("blocks", ctypes.c_uint64), ("stop", ctypes.c_void_p),
                ("deadline_ns", ctypes.c_int64)]


class _Hcall(ctypes.Structure):
    """Mirror of struct aiovmm_hcall in csrc/preempt.c."""
    _fields_ = [("args", ctypes.c_uint64 * 6), ("ret", ctypes.c_uint64), ("set_ret", ctypes.c_int32),
                ("ids", ctypes.c_int32 * 6), ("rax_id", ctypes.c_int32),
                ("read_batch", ctypes.c_void_p), ("write_reg", ctypes.c_void_p), ("enter", ctypes.c_void_p)]


_TIMER_DEFAULT_NS = 2_000_000    # timer slices: the bound of a run() given no max_ns
_STEP_LIMIT_NS = 1_000_000_000   # timer slices: the bound of one step_to (one instruction)

# uc_struct fields of Unicorn 2.1.4 (include/uc_priv.h), relative to `stop_request`, the
# one byte uc_emu_stop sets: a fingerprint of the layout, and `no_exit_request`.
_UC_PAGE_SIZES = 1984 - 1389     # uint32 target_page_size, target_page_align; uint64 x2
_UC_FLAGS = 2032 - 1389          # bool hook_insert, first_tb, no_exit_request, init_done


def _mid_block_exits_off(uc: Uc) -> int | None:
    """Make the translator check Unicorn's exit request only at block starts (as QEMU
    does), not after every guest load and store, so an exit request (timer slices) ends a
    slice between two blocks, never in the middle of an instruction. Set before anything
    is translated. Unicorn has no API for it: the field is located from the byte
    uc_emu_stop sets, and the layout around it is checked against 2.1.4's before anything
    is written. Returns the flag's address, or None (nothing changed) if it does not match."""
    base = ctypes.cast(uc._uch, ctypes.c_void_p).value
    n = _UC_FLAGS + 4 + 4096
    before = ctypes.string_at(base, n)
    uclib.uc_emu_stop(uc._uch)
    after = ctypes.string_at(base, n)
    changed = [i for i in range(n) if before[i] != after[i]]
    if len(changed) != 1 or (before[changed[0]], after[changed[0]]) != (0, 1):
        return None
    stop = changed[0]
    ctypes.c_bool.from_address(base + stop).value = False
    if stop + _UC_FLAGS + 4 > n:
        return None
    tps, tpa, hps, rhps = struct.unpack_from("<IIQQ", after, stop + _UC_PAGE_SIZES)
    hook_insert, _first_tb, no_exit, init_done = after[stop + _UC_FLAGS:stop + _UC_FLAGS + 4]
    if (tps, tpa, hps, rhps) != (4096, 4095, 4096, 4096) or (hook_insert, no_exit, init_done) != (0, 0, 1):
        return None
    flag = base + stop + _UC_FLAGS + 2
    ctypes.c_bool.from_address(flag).value = True
    return flag


# uc_struct (include/uc_priv.h) from `vm_start`: stop_interrupt is 4 pointers before it,
# cpu 23 after it; CPUState starts with nr_cores = nr_threads = 1 and has exit_request at 21.
_UC_STOP_INTERRUPT = -4 * 8
_UC_CPU = 23 * 8
_CPU_EXIT_REQUEST = 21


def _uc_vm_start(uc: Uc) -> int | None:
    """Offset of uc_struct.vm_start in an initialised instance, located from the two
    exported functions stored in adjacent fields (vm_start, tcg_exec_init); None unless
    exactly one place holds them."""
    base = ctypes.cast(uc._uch, ctypes.c_void_p).value
    pair = (ctypes.cast(uclib.vm_start_x86_64, ctypes.c_void_p).value,
            ctypes.cast(uclib.tcg_exec_init_x86_64, ctypes.c_void_p).value)
    blob = ctypes.string_at(base, 1024 + 16)
    found = [i for i in range(0, 1024, 8) if struct.unpack_from("<QQ", blob, i) == pair]
    return found[0] if len(found) == 1 else None


def _timer_slice_fields(uc: Uc) -> tuple[int, int] | None:
    """(address of uc_struct.stop_interrupt, uc_struct.cpu) for timer slices
    (csrc/preempt.c), after _mid_block_exits_off succeeded (its uc_emu_stop initialised the
    instance and ran cpu_exit on its CPU). Located from the two exported functions stored in
    adjacent fields (vm_start, tcg_exec_init) and checked against the CPU that cpu_exit
    marked; None if anything does not match 2.1.4's layout."""
    base = ctypes.cast(uc._uch, ctypes.c_void_p).value
    vm_start = _uc_vm_start(uc)
    if vm_start is None or vm_start + _UC_STOP_INTERRUPT < 0:
        return None
    slot = base + vm_start + _UC_STOP_INTERRUPT
    stop_interrupt, = struct.unpack("<Q", ctypes.string_at(slot, 8))
    cpu, = struct.unpack("<Q", ctypes.string_at(base + vm_start + _UC_CPU, 8))
    if not stop_interrupt or not cpu:
        return None
    head = ctypes.string_at(cpu, 32)
    if struct.unpack_from("<ii", head, 0) != (1, 1) or head[_CPU_EXIT_REQUEST] != 1:
        return None
    return slot, cpu


class _PioFast(ctypes.Structure):
    _fields_ = [("port", ctypes.c_uint32), ("size", ctypes.c_int32), ("value", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


_PIO_FAST_MAX = 8                # AIOVMM_PIO_FAST_MAX


class _Pio(ctypes.Structure):
    """Mirror of struct aiovmm_pio in csrc/preempt.c."""
    _fields_ = [("in_", ctypes.c_void_p), ("out", ctypes.c_void_p), ("cpu", ctypes.c_void_p),
                ("loop_exit", ctypes.c_void_p), ("refused", ctypes.c_int32),
                ("fast_n", ctypes.c_uint32), ("fast_hits", ctypes.c_uint64),
                ("fast", _PioFast * _PIO_FAST_MAX)]


class _Tsc(ctypes.Structure):
    """Mirror of struct aiovmm_tsc in csrc/preempt.c."""
    _fields_ = [("origin_ns", ctypes.c_int64), ("aux", ctypes.c_uint64), ("ids", ctypes.c_int32 * 3),
                ("write_batch", ctypes.c_void_p)]


_ENTER_CB = ctypes.CFUNCTYPE(None)


class FpuState(typing.NamedTuple):
    fcw: int
    fsw: int
    ftw: int                         # FXSAVE's abridged tag: bit i set = ST register i valid
    mxcsr: int
    st: list[tuple[int, int]]        # ST(0..7): (64-bit mantissa, sign+exponent)
    xmm: list[int]                   # XMM0..15
    raw: bytes                       # the image as given (KVM takes its own layout of it)

    @property
    def tag_word(self) -> int:
        """The full x87 tag word: 3 (empty) for an abridged 0, 0 (valid) otherwise."""
        return sum((0 if self.ftw >> i & 1 else 3) << 2 * i for i in range(8))


FXSAVE_SIZE = 512
MXCSR_RESET, FCW_RESET = 0x1F80, 0x37F


def fpu_state(fxsave: bytes | None) -> FpuState:
    """Parse an FXSAVE image once (None: Xen's vcpu_reset_fpu state). MXCSR keeps its 16
    defined bits: reserved ones make FXRSTOR (and KVM_SET_FPU's restore) fault."""
    if fxsave is None:
        img = bytearray(FXSAVE_SIZE)
        struct.pack_into("<H", img, 0, FCW_RESET)
        struct.pack_into("<I", img, 24, MXCSR_RESET)
        fxsave = bytes(img)
    fxsave = bytes(fxsave[:FXSAVE_SIZE])
    fcw, fsw, ftw = struct.unpack_from("<HHB", fxsave, 0)
    mxcsr = struct.unpack_from("<I", fxsave, 24)[0] & 0xFFFF
    st = [struct.unpack_from("<QH", fxsave, 32 + 16 * i) for i in range(8)]
    xmm = [int.from_bytes(fxsave[160 + 16 * i:176 + 16 * i], "little") for i in range(16)]
    return FpuState(fcw, fsw, ftw, mxcsr, st, xmm, fxsave)


class ExitReason(enum.Enum):
    BUDGET = "budget"          # slice budget used up
    PREEMPT = "preempt"        # preempt flag raised
    STOPPED = "stopped"        # a handler asked to stop (block, shutdown, crash)
    ERROR = "error"            # the engine itself failed (message in last_error)


class EngineUnavailable(RuntimeError):
    """The native slice hook is missing (run `make setup`)."""


_native_lib: ctypes.CDLL | None = None


def _native() -> ctypes.CDLL:
    global _native_lib
    if _native_lib is None:
        if not os.path.exists(_NATIVE):
            raise EngineUnavailable(f"{_NATIVE} not built: run `make setup`")
        _native_lib = ctypes.CDLL(_NATIVE)
        vp = ctypes.c_void_p
        _native_lib.aiovmm_timer_new.restype = vp
        _native_lib.aiovmm_timer_new.argtypes = [vp, vp, vp, vp, vp]
        _native_lib.aiovmm_timer_arm.argtypes = [vp, ctypes.c_int64, ctypes.c_int]
        _native_lib.aiovmm_timer_disarm.argtypes = [vp]
        _native_lib.aiovmm_timer_kick.argtypes = [vp]
        _native_lib.aiovmm_timer_free.argtypes = [vp]
    return _native_lib


class _RegBatch:
    """A prepared raw uc_reg_read_batch/uc_reg_write_batch over a fixed register list."""

    def __init__(self, h, names: Sequence[str]) -> None:
        n = len(names)
        self.h, self.n, self.names = h, n, tuple(names)
        self.ids = (ctypes.c_int * n)(*[REGS[x] for x in names])
        self.vals = (ctypes.c_uint64 * n)()
        base = ctypes.addressof(self.vals)
        self.ptrs = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])

    def read(self) -> list[int]:
        uclib.uc_reg_read_batch(self.h, self.ids, self.ptrs, self.n)
        return self.vals[:]

    def write(self, values: Sequence[int]) -> None:
        for i, v in enumerate(values):
            self.vals[i] = v & 0xFFFFFFFFFFFFFFFF
        uclib.uc_reg_write_batch(self.h, self.ids, self.ptrs, self.n)


_SOFT_INT = 1 << 30        # in the error code: a software interrupt, its length below (the patch)


class _ExcFix:
    """Work-around for unicorn #1883 (see shared/research/unicorn/excfix.py for the method).

    CPUX86State keeps `error_code` 16 bytes before dr[0] and `old_exception` after dr[8] and
    4 breakpoint pointers; dr6/dr7 at their reset values anchor the search in the context blob.
    The context blob is a copy of the CPU's live CPUX86State (uc_context_save memcpys
    cpu->env_ptr on x86), so once the live state is located (`_live_env`) the two fields are
    read and written in place: ~0.2 us instead of a context save, patch and restore (2-9 us),
    paid at every slice start and every exception. If the live state is
    not found (another Unicorn layout), the context path is used.
    """

    _offsets: tuple[int, int] | None = None        # same for every instance of the library
    _env_ptr_off: int | None = None                # offset of CPUState.env_ptr (probed once)

    def __init__(self, uc: Uc) -> None:
        self.h = uc._uch
        self.ctx = ctypes.c_void_p()
        if uclib.uc_context_alloc(self.h, ctypes.byref(self.ctx)) != 0:
            raise RuntimeError("uc_context_alloc failed")
        self.size = uclib.uc_context_size(self.h)
        self._err: ctypes.c_int32 | None = None
        self._old: ctypes.c_int32 | None = None
        self.env: int | None = None               # the live CPUX86State, if located
        uclib.uc_context_save(self.h, self.ctx)
        blob = ctypes.string_at(self.ctx.value, self.size)
        if _ExcFix._offsets is None:
            _ExcFix._offsets = self._find_offsets(blob)
        self.err_off, self.old_off = _ExcFix._offsets
        # struct uc_context's header precedes the CPU state copy: its first field is the
        # size of that copy.
        header = self.size - ctypes.c_size_t.from_address(self.ctx.value).value
        env = self.env = self._live_env(uc, blob[header:])
        if env is not None:
            self._err = ctypes.c_int32.from_address(env + self.err_off - header)
            self._old = ctypes.c_int32.from_address(env + self.old_off - header)

    @staticmethod
    def _find_offsets(blob: bytes) -> tuple[int, int]:
        pat = struct.pack("<QQ", 0xFFFF0FF0, 0x400)
        for i in range(0, len(blob) - 16, 8):
            if blob[i:i + 16] == pat:
                dr0 = i - 48
                old = dr0 + 64 + 32
                if struct.unpack_from("<i", blob, old)[0] == -1:
                    return dr0 - 16, old
        raise RuntimeError("unicorn #1883 work-around: old_exception not found in context")

    @staticmethod
    def _live_env(uc: Uc, state: bytes) -> int | None:
        """The address of the CPU's live CPUX86State (CPUState.env_ptr), checked byte for
        byte against `state`, a context copy just taken; None if it cannot be located.
        CPUState (include/hw/core/cpu.h) holds env_ptr, then icount_decr_ptr, both pointing
        into the X86CPU that begins with it (icount_decr in front of env): the first
        instance finds the one such pair among CPUState's first fields, later instances
        read the same field and still check the content. icount_decr is the last field of
        the negative-offset state that directly precedes env."""
        vm_start = _uc_vm_start(uc)
        if vm_start is None:
            return None
        base = ctypes.cast(uc._uch, ctypes.c_void_p).value
        cpu, = struct.unpack("<Q", ctypes.string_at(base + vm_start + _UC_CPU, 8))
        if not cpu:
            return None
        off = _ExcFix._env_ptr_off
        if off is None:
            head = ctypes.string_at(cpu, 2048)
            pairs = [struct.unpack_from("<QQ", head, i) for i in range(0, len(head) - 16, 8)]
            hits = [8 * i for i, (env, decr) in enumerate(pairs)
                    if cpu < decr < env <= decr + 64 and env < cpu + (1 << 20)]
            if len(hits) != 1:
                return None
            off = hits[0]
        env, = struct.unpack("<Q", ctypes.string_at(cpu + off, 8))
        if not cpu < env < cpu + (1 << 20) or ctypes.string_at(env, len(state)) != state:
            return None
        _ExcFix._env_ptr_off = off
        return env

    def read_error_and_reset(self) -> int:
        """The error code of the exception being reported; env->old_exception reset."""
        if self._old is not None:
            self._old.value = -1
            return self._err.value & 0xFFFFFFFF
        uclib.uc_context_save(self.h, self.ctx)
        a = self.ctx.value
        err = ctypes.c_int32.from_address(a + self.err_off).value
        ctypes.c_int32.from_address(a + self.old_off).value = -1
        uclib.uc_context_restore(self.h, self.ctx)
        return err & 0xFFFFFFFF

    def free(self) -> None:
        self._err = self._old = None             # the CPU state goes with the instance
        self.env = None
        if self.ctx:
            uclib.uc_context_free(self.ctx)
            self.ctx = ctypes.c_void_p()


# QEMU's hidden-flag bits (target/i386/cpu.h) and descriptor bits, for _Segments.
_HF_CPL, _HF_CS32, _HF_SS32, _HF_ADDSEG, _HF_LMA, _HF_CS64 = 3, 1 << 4, 1 << 5, 1 << 6, 1 << 14, 1 << 15
_DESC_B, _DESC_L = 1 << 22, 1 << 21
_R_ES, _R_CS, _R_SS, _R_DS = 0, 1, 2, 3
_SEG_CACHE = struct.Struct("<IxxxxQII")      # SegmentCache: selector, base, limit, flags
_SEG_PROBE = {_R_ES: 0x1108, _R_CS: 0x2210, _R_SS: 0x3318, _R_DS: 0x4420}


class _Segments:
    """A real segment load into the emulated CPU: the selector AND its hidden part (base,
    limit, attributes), with QEMU's hidden flags (64-bit or compatibility mode, 32-bit stack,
    CPL from SS.DPL) recomputed as cpu_x86_load_seg_cache does. In 64-bit mode Unicorn's
    reg_write of CS/SS changes only the selector (NOTES.md), and its own loads (helper_load_seg,
    iretq) fault by longjmp from inside a hook; the descriptor the hypervisor checked is
    written instead, so what runs is exactly what was validated. CPUX86State's `segs` array
    is located once, on a fresh instance, from four distinctive selectors written through
    reg_write (which does set the selector field); `hflags` precedes it (uint32 hflags,
    hflags2). None of this is touched if the layout is not the one probed."""

    _segs_off: int | None = None

    def __init__(self, uc: Uc, env: int | None) -> None:
        self.env = None
        if env is None:
            return
        if _Segments._segs_off is None:
            regs = {_R_ES: X.UC_X86_REG_ES, _R_CS: X.UC_X86_REG_CS, _R_SS: X.UC_X86_REG_SS,
                    _R_DS: X.UC_X86_REG_DS}
            before = {r: uc.reg_read(regs[r]) for r in regs}
            for r, val in _SEG_PROBE.items():
                uc.reg_write(regs[r], val)
            blob = ctypes.string_at(env, 4096)
            for r, val in before.items():
                uc.reg_write(regs[r], val)
            hits = [i for i in range(0, 4096 - 96, 8)
                    if all(struct.unpack_from("<I", blob, i + 24 * r)[0] == val
                           for r, val in _SEG_PROBE.items())]
            if len(hits) != 1:
                log.warning("Unicorn's segment state not found: compatibility mode unavailable")
                return
            hflags = struct.unpack_from("<I", blob, hits[0] - 8)[0]
            if hflags & (_HF_LMA | _HF_CS64) != _HF_LMA | _HF_CS64:
                log.warning("Unicorn's hidden flags not found: compatibility mode unavailable")
                return
            _Segments._segs_off = hits[0]
        self.env = env
        self.hflags = ctypes.c_uint32.from_address(env + _Segments._segs_off - 8)

    def _addr(self, reg: int) -> int:
        return self.env + _Segments._segs_off + _SEG_CACHE.size * reg

    def cache(self, reg: int) -> tuple[int, int, int, int]:
        return _SEG_CACHE.unpack(ctypes.string_at(self._addr(reg), _SEG_CACHE.size))

    def load(self, reg: int, selector: int, desc: int) -> None:
        """cpu_x86_load_seg_cache(env, reg, selector, base, limit, flags) for the 8-byte
        descriptor `desc` (QEMU keeps the descriptor's high word as the flags)."""
        if self.env is None:
            raise RuntimeError("this Unicorn's segment state was not located")
        hi = desc >> 32
        base, limit = segment_base_limit(desc)
        ctypes.memmove(self._addr(reg), _SEG_CACHE.pack(selector & 0xFFFF, base, limit, hi),
                       _SEG_CACHE.size)
        hf = self.hflags.value
        if reg == _R_CS:
            if hf & _HF_LMA and hi & _DESC_L:
                hf = (hf | _HF_CS32 | _HF_SS32 | _HF_CS64) & ~_HF_ADDSEG
            else:
                hf = (hf & ~(_HF_CS32 | _HF_CS64)) | (_HF_CS32 if hi & _DESC_B else 0)
        elif reg == _R_SS:
            hf = (hf & ~_HF_CPL) | ((hi >> 13) & 3)
        new = _HF_SS32 if self.cache(_R_SS)[3] & _DESC_B else 0
        if not hf & _HF_CS64:
            if not hf & _HF_CS32:
                new |= _HF_ADDSEG
            elif self.cache(_R_DS)[1] | self.cache(_R_ES)[1] | self.cache(_R_SS)[1]:
                new |= _HF_ADDSEG
        self.hflags.value = (hf & ~(_HF_SS32 | _HF_ADDSEG)) | new

    def compat_mode(self) -> bool:
        return self.env is not None and not self.hflags.value & _HF_CS64

    def free(self) -> None:
        self.env = None
        self.hflags = None


# `until` of every emu_start: an address the guest never executes. It MUST be mapped in every
# address space the vCPU runs on: at emu_start Unicorn translates `until` to invalidate any
# translated block there, and an unmapped `until` raises a #PF internally (never reported),
# which leaves env->old_exception set, so the guest's next real fault becomes #DF and the one
# after a silent triple fault (unicorn #1883). The hypervisor passes a supervisor-only page of
# Xen's area (mmu.XenArea.UNTIL_VA): mapped in every validated L4, unreachable from CPL 3.


class VCPUEngine:
    """One emulated x86_64 CPU over the shared machine memory.

    Callbacks (set by the hypervisor's vCPU) run synchronously inside emulation:
      on_hypercall()                       SYSCALL executed in 64-bit mode
      on_syscall32()                       SYSCALL executed in compatibility mode
      on_exception(vector, error, cr2)     CPU exception or software interrupt, RIP on the
                                           faulting instruction (traps: after it)
      on_invalid_opcode()                  #UD-class instruction, RIP on it
      on_port_io(port, size, write, value) -> int | None
                                           IN/OUT that did not fault (Unicorn at CPL 3): the
                                           value read (IN), or None when refused (the vCPU
                                           then arranges #GP and stop()s the slice)
      rdtsc() -> int                       value for RDTSC (and RDTSCP's EDX:EAX)
      cpuid(leaf, subleaf) -> (a, b, c, d) value for CPUID (the shared policy, cpuid.py)
    They must never raise: the engine logs and stops the slice if they do.

    The privileged-operation emulator (emulate.py) is engine-agnostic: an engine only reports
    #GP/#UD through on_exception/on_invalid_opcode (an engine on which IN/OUT, CPUID or RDTSC
    fault reports them the same way: the emulator decodes them from guest memory), and the
    emulator works through read()/write()/get()/set() of registers (GPRs, rip, rflags,
    fs_base, gs_base, cr3), set_msr(TSC_AUX), set_descriptor_tables(), flush_tlb() and
    flush_code() (after it rewrote guest code: the hypercall-page MSR).
    """

    # Length of the `int $n` whose vector on_exception reports (traps.inject_exception):
    # Unicorn reports RIP past it; the patched library (csrc/unicorn/aiovmm-int-length.patch)
    # tells its length (_soft_int); the stock one does not: taken as `cd n`.
    int_length = 2

    # XSAVE state the guest's CPL-3 code can use whatever its kernel enables (cpuid.Xstate):
    # none here (the model has no AVX, and its CPUID at CPL 3 is the policy's).
    cpl3_xstate = None

    def __init__(self, mem_address: int, mem_size: int, *, until: int, name: str = "vcpu",
                 slices: str | None = None, mem: "MachineMemory | None" = None) -> None:
        self.name = name
        self.flushes = 0                      # TLB flushes asked of Unicorn (not CR3 loads)
        self.until = until
        self.uc = uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.h = uc._uch
        uc.ctl_set_tcg_buffer_size(_TCG_BUFFER)
        self._excfix = _ExcFix(uc)            # must probe on a fresh instance
        self._segs = _Segments(uc, self._excfix.env)     # so must this
        uc.mem_map_ptr(0, mem_size, UC_PROT_ALL, mem_address)
        # The TB hash table is 512 KiB of zeros until code is translated (tcg_memory.py).
        self._tcg = TcgMemory(ctypes.cast(self.h, ctypes.c_void_p).value, _TCG_BUFFER)
        self._tcg.drop_zero_buckets()
        self._own_invalidations = 0           # ctl_remove_cache of step_to (not the guest's)

        self.on_hypercall: Callable[[], None] = lambda: None
        self.on_syscall32: Callable[[], None] = lambda: None
        self.on_exception: Callable[[int, int, int], None] = lambda v, e, c: None
        self.on_invalid_opcode: Callable[[], None] = lambda: None
        self._tsc = _Tsc()
        self._tsc.ids[:] = [REGS[n] for n in ("rax", "rdx", "rcx")]
        self._tsc.write_batch = ctypes.cast(uclib.uc_reg_write_batch, ctypes.c_void_p).value
        self._clock: Callable[[], int] = SystemClock(0)
        # `mem`: the machine memory of a hypervisor's guest, whose frees and type changes
        # must empty this TLB at once (MachineMemory._stale_translations_unsafe).
        self._mem = mem
        if mem is not None:
            mem.tlb_engines.append(self)

        self.in_syscall_hook = False
        self._df_retry_rip = -1
        self.stop_requested = False
        self.last_error = ""
        self.callback_error: BaseException | None = None

        self.slice = _Slice()
        self.slice.stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
        lib = self._lib = _native()
        self._hooks = []
        # How slices end (csrc/preempt.c): "timer" (default), Unicorn's own block-start exit
        # check raised by a per-thread timer signal, the stop itself made between two
        # blocks; or "hook", a C block hook counting blocks (a helper call per translated
        # block: slower; also the fallback for a Unicorn whose layout is not the probed one).
        self._timer: int | None = None
        self._in_slice = False
        self._deadline_ns = 0
        if slices is None:
            slices = os.environ.get("AIOVMM_UNICORN_SLICES", "timer")
        if slices == "timer":
            self._timer = self._timer_slices(uc, lib)
            if not self._timer:
                log.warning("%s: this Unicorn's layout is not the one probed: slices use the block hook", name)
                slices = "hook"
        if slices != "timer":
            self._add_hook(UC_HOOK_BLOCK, ctypes.cast(lib.aiovmm_block_hook, ctypes.c_void_p),
                           ctypes.cast(ctypes.byref(self.slice), ctypes.c_void_p))
        self.slices = slices
        self._hc = hc = _Hcall()
        hc.ids[:] = [REGS[n] for n in ("rax", "rdi", "rsi", "rdx", "r10", "r8")]
        hc.rax_id = REGS["rax"]
        hc.read_batch = ctypes.cast(uclib.uc_reg_read_batch, ctypes.c_void_p).value
        hc.write_reg = ctypes.cast(uclib.uc_reg_write, ctypes.c_void_p).value
        self._cb_syscall = _ENTER_CB(self._hook_syscall)
        hc.enter = ctypes.cast(self._cb_syscall, ctypes.c_void_p).value
        self._add_hook(UC_HOOK_INSN, ctypes.cast(lib.aiovmm_syscall_hook, ctypes.c_void_p),
                       ctypes.cast(ctypes.byref(hc), ctypes.c_void_p), X.UC_X86_INS_SYSCALL)
        self._cb_intr = _INTR_CB(self._hook_intr)
        self._add_hook(UC_HOOK_INTR, ctypes.cast(self._cb_intr, ctypes.c_void_p), None)
        self._cb_invalid = _INVALID_CB(self._hook_invalid)
        self._add_hook(UC_HOOK_INSN_INVALID, ctypes.cast(self._cb_invalid, ctypes.c_void_p), None)
        # Unicorn's SYSENTER only runs its hooks and steps over the instruction (no ring
        # change, whatever the SYSENTER MSRs say): reported here, RIP on the instruction.
        self.on_sysenter: Callable[[int], None] = lambda rip: None
        self._cb_sysenter = _SYSENTER_CB(self._hook_sysenter)
        self._add_hook(UC_HOOK_INSN, ctypes.cast(self._cb_sysenter, ctypes.c_void_p), None,
                       X.UC_X86_INS_SYSENTER)
        # Port I/O, CPUID and RDTSC(P) are not trapped by Unicorn at CPL 3 (NOTES.md): hook
        # them and ask the shared emulator/policy (emulate.py, cpuid.py), as a fault would.
        self.on_port_io: Callable[[int, int, bool, int], int | None] = lambda p, s, w, v: None
        self.cpuid: Callable[[int, int], tuple[int, int, int, int]] = lambda leaf, sub: (0, 0, 0, 0)
        self._cb_cpuid = _RDTSC_CB(self._hook_cpuid)
        self._add_hook(UC_HOOK_INSN, ctypes.cast(self._cb_cpuid, ctypes.c_void_p), None,
                       X.UC_X86_INS_CPUID)
        # True if port_in's answer depends on nothing the guest can change without the
        # hypervisor running (emulate.port_in_fixed; vcpu.py sets it): only then is an IN
        # answered again in C (csrc/preempt.c aiovmm_in_hook).
        self.port_in_fixed: Callable[[], bool] = lambda: False
        self._cb_in = _IN_CB(self._hook_in)
        self._cb_out = _OUT_CB(self._hook_out)
        # IN/OUT go through C hooks (csrc/preempt.c): a repeated IN is answered from a table
        # without Python; with timer slices a refused IN/OUT ends the slice at the instruction.
        self._pio = pio = _Pio()
        pio.in_ = ctypes.cast(self._cb_in, ctypes.c_void_p).value
        pio.out = ctypes.cast(self._cb_out, ctypes.c_void_p).value
        if self._timer:
            pio.cpu = self._cpu
            pio.loop_exit = ctypes.cast(uclib.cpu_loop_exit_x86_64, ctypes.c_void_p).value
        pio_ref = ctypes.cast(ctypes.byref(pio), ctypes.c_void_p)
        self._add_hook(UC_HOOK_INSN, ctypes.cast(lib.aiovmm_in_hook, ctypes.c_void_p), pio_ref,
                       X.UC_X86_INS_IN)
        self._add_hook(UC_HOOK_INSN, ctypes.cast(lib.aiovmm_out_hook, ctypes.c_void_p), pio_ref,
                       X.UC_X86_INS_OUT)
        # RDTSC and RDTSCP (which does not go through the RDTSC hook: same clock, ECX =
        # TSC_AUX) are answered in C from the clock's origin (the `rdtsc` setter).
        tsc = ctypes.cast(ctypes.byref(self._tsc), ctypes.c_void_p)
        self._add_hook(UC_HOOK_INSN, ctypes.cast(lib.aiovmm_rdtsc_hook, ctypes.c_void_p), tsc,
                       X.UC_X86_INS_RDTSC)
        self._add_hook(UC_HOOK_INSN, ctypes.cast(lib.aiovmm_rdtscp_hook, ctypes.c_void_p), tsc,
                       X.UC_X86_INS_RDTSCP)

        # Prepared raw register batches for the hot paths.
        self._rax = _RegBatch(self.h, ("rax",))
        self._rip = _RegBatch(self.h, ("rip",))
        self._rdx_rax = _RegBatch(self.h, ("rax", "rdx"))
        self._batches: dict[tuple[str, ...], _RegBatch] = {}

    def _timer_slices(self, uc: Uc, lib: ctypes.CDLL) -> int | None:
        """Set up timer slices (csrc/preempt.c) on a fresh instance: the translator's
        mid-block exit checks off, Unicorn's stop_interrupt chained to ours. None (nothing
        changed) if this Unicorn's layout is not the probed one."""
        flag = _mid_block_exits_off(uc)
        fields = _timer_slice_fields(uc) if flag is not None else None
        timer = None
        if fields is not None:
            self._cpu = fields[1]
            timer = lib.aiovmm_timer_new(self.h, fields[1], fields[0], self.slice.stop,
                                         ctypes.cast(uclib.cpu_exit, ctypes.c_void_p).value)
        if not timer and flag is not None:
            ctypes.c_bool.from_address(flag).value = False
        return timer or None

    def _add_hook(self, htype: int, cb, user_data, insn: int | None = None) -> None:
        hh = ctypes.c_size_t()
        if insn is None:
            err = uclib.uc_hook_add(self.h, ctypes.byref(hh), htype, cb, user_data,
                                    ctypes.c_uint64(1), ctypes.c_uint64(0))
        else:
            err = uclib.uc_hook_add(self.h, ctypes.byref(hh), htype, cb, user_data,
                                    ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(insn))
        if err:
            raise RuntimeError(f"uc_hook_add({htype}) failed: {err}")
        self._hooks.append(hh)

    # -- registers ------------------------------------------------------------------------
    def _batch(self, names: Sequence[str]) -> _RegBatch:
        key = tuple(names)
        b = self._batches.get(key)
        if b is None:
            b = self._batches[key] = _RegBatch(self.h, key)
        return b

    def read(self, names: Sequence[str]) -> list[int]:
        vals = self._batch(names).read()
        if self.in_syscall_hook and "rip" in names:
            # Inside the SYSCALL hook RIP is still the syscall; report the architectural
            # value (the next instruction) so callers need not know the quirk.
            i = names.index("rip")
            vals[i] += 2
        return vals

    def write(self, values: dict[str, int]) -> None:
        if self.in_syscall_hook and "rip" in values:
            values = dict(values)
            values["rip"] -= 2
        names = tuple(values)
        self._batch(names).write([values[n] for n in names])

    def get(self, name: str) -> int:
        return self.read((name,))[0]

    def load_segment(self, name: str, selector: int, desc: int) -> None:
        """Load CS or SS as a far transfer does: the selector and the hidden part from the
        8-byte descriptor `desc` (checked by the caller: descriptors.iret_code_segment),
        so a code segment without L runs in compatibility mode from the next instruction;
        DS or ES the same (Unicorn's register write in 64-bit mode sets their selector
        only, and an IRETQ to ring 3 then nulls them)."""
        self._segs.load({"cs": _R_CS, "ss": _R_SS, "ds": _R_DS, "es": _R_ES}[name], selector, desc)

    def set(self, name: str, value: int) -> None:
        self.write({name: value})

    def set_rax(self, value: int) -> None:
        if self.in_syscall_hook:          # written back by the C hook after we return
            self._hc.ret = value & 0xFFFFFFFFFFFFFFFF
            self._hc.set_ret = 1
            return
        self._rax.vals[0] = value & 0xFFFFFFFFFFFFFFFF
        uclib.uc_reg_write_batch(self.h, self._rax.ids, self._rax.ptrs, 1)

    def hypercall_args(self) -> list[int]:
        """(rax, rdi, rsi, rdx, r10, r8) as the C hook read them at the SYSCALL."""
        return self._hc.args[:]

    def set_msr(self, msr: int, value: int) -> None:
        self.uc.msr_write(msr, value)
        if msr == MSR_TSC_AUX:                # RDTSCP's ECX, read by the C hook
            self._tsc.aux = value & 0xFFFFFFFF

    @property
    def rdtsc(self) -> Callable[[], int]:
        """The guest's TSC source: a clock of CLOCK_MONOTONIC nanoseconds since `origin_ns`
        (Hypervisor.system_time_ns). RDTSC/RDTSCP are answered in C from that origin."""
        return self._clock

    @rdtsc.setter
    def rdtsc(self, clock: Callable[[], int]) -> None:
        origin = getattr(clock, "origin_ns", None)
        if not isinstance(origin, int):
            raise TypeError("the Unicorn engine's TSC clock must be monotonic_ns() - origin_ns "
                            "(it has an int origin_ns)")
        self._clock = clock
        self._tsc.origin_ns = origin

    def get_msr(self, msr: int) -> int:
        return self.uc.msr_read(msr)

    # -- MMU --------------------------------------------------------------------------------
    def setup_long_mode(self, cr3: int, gdt_base: int, gdt_limit: int) -> None:
        """Paging on, long mode, NX, SSE; the GDT at a linear address in Xen's area."""
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_CR4, CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT)
        uc.msr_write(MSR_EFER, EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE)
        uc.reg_write(X.UC_X86_REG_CR3, cr3)
        uc.reg_write(X.UC_X86_REG_CR0, CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG)
        uc.reg_write(X.UC_X86_REG_GDTR, (0, gdt_base, gdt_limit, 0))

    def set_descriptor_tables(self, gdt_base: int, gdt_limit: int, ldt_base: int, ldt_limit: int) -> None:
        """Point GDTR and the LDTR cache at linear addresses in Xen's area (descriptors.py);
        the caller flushes the TLB after changing what those addresses map."""
        self.uc.reg_write(X.UC_X86_REG_GDTR, (0, gdt_base, gdt_limit, 0))
        self.uc.reg_write(X.UC_X86_REG_LDTR, (0, ldt_base, ldt_limit, 0x8200 if ldt_limit else 0))

    def set_cr3(self, cr3: int) -> None:
        """Load a page-table root; Unicorn flushes its TLB on a CR3 write."""
        self.write({"cr3": cr3})

    def flush_tlb(self) -> None:
        self.flushes += 1
        uclib.uc_ctl(self.h, _UC_CTL_TLB_FLUSH_WRITE)

    def pt_written(self) -> None:
        """The hypervisor changed page-table entries where Xen does not flush the TLB
        (mmu_update, update_va_mapping without flush flags, a ptwr store, an unpin): nothing
        to do. A translation the soft TLB still holds is one the real TLB would hold on Xen
        until the guest flushes; the cases where that would be unsafe (the frame freed, or
        becoming a page table or descriptor page) flush through MachineMemory.tlb_engines."""

    def flush_code(self) -> None:
        """Drop translated code (after the hypervisor rewrote guest code bytes)."""
        self.uc.ctl_flush_tb()

    def code_written(self, start: int, end: int) -> None:
        """The hypervisor wrote machine bytes [start, end) (a grant copy, a backend's copy):
        QEMU drops translations only on this instance's own stores, and Xen's guest runs
        the bytes in memory, so the translations of these are dropped here. One C call
        (the hot path of every backend copy; ~1 us of C, the rest is ctypes); blocks it
        did drop count in code_invalidations as a guest store would (the counter is not
        read twice per copy for what a page without code never changes)."""
        if _tb_invalidate is not None:
            _tb_invalidate(self.h, start, end)
        else:
            self.uc.ctl_flush_tb()

    def code_invalidations(self) -> int:
        """Translated blocks the guest's own stores invalidated in this instance (QEMU's
        self-modifying-code detection), a counter that only grows. The other vCPUs of
        the domain have their own translations, which no store of this instance reaches:
        when this grows, the vCPU has them dropped (vcpu.py)."""
        return self._tcg.invalidations() - self._own_invalidations

    def release_idle_memory(self) -> int:
        """The vCPU sleeps: drop its translated code and give the translator's memory back
        to the kernel (tcg_memory.py). Retranslating on wake costs what the first run did
        (bench/density.py). Returns bytes released; the caller trims malloc's heap."""
        self.uc.ctl_flush_tb()
        return self._tcg.drop_code() + self._tcg.drop_zero_buckets() * 4096

    def start_in_stub(self, stub_va: int, stub_stack_va: int, regs: dict[str, int],
                      rip: int, rsp: int, rflags: int, direct: bool = False) -> None:
        """Arrange for the first slice to enter the guest at CPL3 through a real iretq.
        `direct`: no stub; the registers are set here and the caller loads CS and SS
        (load_segment: the CPL is SS's DPL), for segments other than Xen's flat 64-bit
        pair the stub pushes (vcpu_context.enter).

        The ring-0 stub (built by the hypervisor at stub_va, mmu.XenArea.STUB_CODE) builds
        the frame from CR2 (RSP), RFLAGS, DR3 (RIP), then loads rax, rcx and rdx from DR0-2
        and executes iretq: every GPR in `regs` reaches the guest (Xen's arch_set_info_guest
        loads them all). CR2 and the debug registers of the engine are not the guest's (both
        are virtual, vcpu.py); a #PF sets CR2 again before anyone reads it.
        """
        init = {n: 0 for n in GPRS if n not in ("rip", "rsp", "rflags")}
        init.update(regs)
        if direct:
            init.update(rip=rip, rsp=rsp, rflags=rflags)
            self.write(init)
            return
        carried = {"dr0": init.pop("rax"), "dr1": init.pop("rcx"), "dr2": init.pop("rdx"),
                   "dr3": rip, "cr2": rsp}
        init.update(rax=0, rcx=0, rdx=0, rip=stub_va, rsp=stub_stack_va, rflags=rflags)
        self.uc.reg_write(X.UC_X86_REG_RIP, stub_va)
        self.write(init)
        for name, value in carried.items():
            self.uc.reg_write(getattr(X, "UC_X86_REG_" + name.upper()), value)

    def load_fpu(self, fxsave: bytes | None) -> None:
        """The x87/SSE state from a 512-byte FXSAVE image (vcpu_guest_context.fpu_ctxt with
        VGCF_i387_valid: Xen's vcpu_setup_fpu), or the reset state for None (vcpu_reset_fpu:
        FCW 0x37f, MXCSR 0x1f80, all registers empty). fpu_state() parses the image."""
        st = fpu_state(fxsave)
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_FPCW, st.fcw)
        uc.reg_write(X.UC_X86_REG_FPSW, st.fsw)
        uc.reg_write(X.UC_X86_REG_FPTAG, st.tag_word)
        top = (st.fsw >> 11) & 7
        for i, (mant, exp) in enumerate(st.st):
            uc.reg_write(X.UC_X86_REG_FP0 + ((top + i) & 7), (mant, exp))
        for i, x in enumerate(st.xmm):
            uc.reg_write(X.UC_X86_REG_XMM0 + i, x)
        uc.reg_write(X.UC_X86_REG_MXCSR, st.mxcsr)

    def save_fpu(self) -> bytes:
        """The x87/SSE state as a 512-byte FXSAVE image (vcpu_guest_context.fpu_ctxt, as
        Xen's arch_get_info_guest hands it out): load_fpu's inverse, for a save of the vCPU."""
        uc = self.uc
        img = bytearray(FXSAVE_SIZE)
        fsw = uc.reg_read(X.UC_X86_REG_FPSW)
        tag = uc.reg_read(X.UC_X86_REG_FPTAG)
        ftw = sum(1 << i for i in range(8) if (tag >> 2 * i) & 3 != 3)
        mxcsr = uc.reg_read(X.UC_X86_REG_MXCSR)
        struct.pack_into("<HHB", img, 0, uc.reg_read(X.UC_X86_REG_FPCW), fsw, ftw)
        struct.pack_into("<II", img, 24, mxcsr, 0xFFFF)
        top = (fsw >> 11) & 7
        for i in range(8):
            mant, exp = uc.reg_read(X.UC_X86_REG_FP0 + ((top + i) & 7))
            struct.pack_into("<QH", img, 32 + 16 * i, mant, exp)
        for i in range(16):
            img[160 + 16 * i:176 + 16 * i] = uc.reg_read(X.UC_X86_REG_XMM0 + i).to_bytes(16, "little")
        return bytes(img)

    # -- running ---------------------------------------------------------------------------------
    def step_to(self, end: int) -> bool:
        """Execute from RIP up to (not including) `end`: one instruction when `end` is the
        next instruction's address. Returns True if RIP reached `end` with no handler stop.
        Used to emulate a single trapped store (writable page tables).

        Unicorn checks `until` only when it translates code, so a block translated earlier
        runs straight past `end`: the blocks covering [rip, end] are dropped before the step
        and again after it (the step's own translation has `end` built in). The block
        budget of 2 is a second guard: execution never enters a second block."""
        uclib.uc_reg_read_batch(self.h, self._rip.ids, self._rip.ptrs, 1)
        start = self._rip.vals[0]
        inval = self._tcg.invalidations
        before = inval()
        self.uc.ctl_remove_cache(start, end + 1)
        self._own_invalidations += inval() - before
        self.slice.budget = 2
        self.slice.deadline_ns = 0
        self.slice.reason = 0
        self.stop_requested = False
        self._excfix.read_error_and_reset()
        # With timer slices, a step inside a running slice (from a fault hook) must not be
        # cut by the slice's timer, and the slice must still end at its deadline after it,
        # or at once if its stop was already raised (the nested emu_start clears a stop
        # already requested): pause, then re-arm with what had fired.
        nested = self._timer is not None and self._in_slice
        fired = 0
        if nested:
            fired = self._lib.aiovmm_timer_disarm(self._timer)
        # Timer slices count no blocks: the step's own deadline bounds it (bytes that never
        # reach `end`, e.g. `jmp .`, must not hold the loop thread; ptwr then bounces the #PF).
        timed = False
        slice_deadline = self._deadline_ns
        if self._timer is not None:
            self._deadline_ns = time.monotonic_ns() + _STEP_LIMIT_NS
            try:
                self._arm(0)
                timed = True
            except OSError as e:            # not this thread's timer: as before, unbounded
                log.warning("%s: step not bounded: %s", self.name, e)
        try:
            while True:
                err = uclib.uc_emu_start(self.h, start, end, 0, 0)
                if not timed or err or self.stop_requested:
                    break
                # A kick from another thread (the scheduler's I/O watcher, interrupt() ->
                # preempt: the timer's `want` 2) ends the step at its first block boundary,
                # before the store ran: ptwr would refuse it and bounce the #PF into the
                # guest (Linux's fork: "Oops in copy_page_range"). The kick is the slice's:
                # the step runs again (within its own deadline) and the slice ends after.
                if self._lib.aiovmm_timer_disarm(self._timer) != 2 or self.get("rip") != start \
                        or time.monotonic_ns() >= self._deadline_ns:
                    break
                fired = fired or 2
                self._arm(0)
        finally:
            if timed:
                self._lib.aiovmm_timer_disarm(self._timer)
            self._deadline_ns = slice_deadline
            before = inval()
            self.uc.ctl_remove_cache(start, end + 1)
            self._own_invalidations += inval() - before
            if nested:
                self._arm(fired)
        return not err and not self.stop_requested and self.get("rip") == end

    def decode(self, code: bytes) -> tuple[int, str, str] | None:
        """(length, mnemonic, operands) of the first x86_64 instruction in `code` (Intel
        syntax, emulate.disasm), or None if it does not decode."""
        from .emulate import disasm
        return disasm(code)

    def compat_mode(self) -> bool:
        """CS is a 32-bit code segment: the vCPU runs in compatibility mode."""
        return self._segs.compat_mode()

    def run(self, budget: int, max_ns: int = 0) -> ExitReason:
        """Run until the block budget or `max_ns` of wall time is used (checked every 64
        blocks by the C hook; timer slices have no block count and end on `max_ns`, 2 ms
        if 0), a preempt, or a handler's stop()."""
        s = self.slice
        s.budget = budget
        s.deadline_ns = time.monotonic_ns() + max_ns if max_ns else 0
        s.reason = 0
        self.stop_requested = False
        self._hypervisor_runs()
        # Unicorn raises a #PF internally, never reported, the first time it translates a
        # block at the start of a page whose previous page is unmapped; that leaves
        # env->old_exception set (unicorn #1883). Clear it before every slice.
        self._excfix.read_error_and_reset()
        uclib.uc_reg_read_batch(self.h, self._rip.ids, self._rip.ptrs, 1)
        start_rip = self._rip.vals[0]
        self._deadline_ns = time.monotonic_ns() + (max_ns or _TIMER_DEFAULT_NS)
        err = self._emu_start(start_rip, self.until)
        if not err and not s.reason and not self.stop_requested and self.callback_error is None:
            # A "triple fault" (two unreported internal faults, then a real one) ends
            # emulation silently. Clear the state and let the faulting instruction retry once.
            rip = self.get("rip")
            if rip != self.until:
                self._excfix.read_error_and_reset()
                err = self._emu_start(rip, self.until)
        if self.callback_error is not None:
            e, self.callback_error = self.callback_error, None
            self.last_error = f"hypervisor error in handler: {e!r}"
            return ExitReason.ERROR
        if self.stop_requested:
            return ExitReason.STOPPED
        if err:
            self.last_error = uclib.uc_strerror(err).decode()
            return ExitReason.ERROR
        if s.reason in (1, 3):
            return ExitReason.BUDGET
        if s.reason == 2:
            return ExitReason.PREEMPT
        self.last_error = "guest jumped into the hypervisor's reserved range"
        return ExitReason.ERROR

    def _emu_start(self, rip: int, until: int) -> int:
        """One uc_emu_start of a slice; with the timer, armed for the slice's deadline
        (its reason lands in slice.reason as the hook's would)."""
        if self._timer is None:
            if self.interrupted:
                self.slice.preempt = 1
            return uclib.uc_emu_start(self.h, rip, until, 0, 0)
        self._arm(2 if self.interrupted else 0)
        self._in_slice = True
        try:
            return uclib.uc_emu_start(self.h, rip, until, 0, 0)
        finally:
            self._in_slice = False
            self.slice.reason = self._lib.aiovmm_timer_disarm(self._timer)

    def _arm(self, fired: int) -> None:
        """Arm this thread's slice timer for the slice's deadline (timer slices)."""
        err = self._lib.aiovmm_timer_arm(self._timer, ctypes.c_int64(self._deadline_ns), fired)
        if err:
            raise OSError(-err, f"{self.name}: cannot arm the slice timer: {os.strerror(-err)}")

    def stop(self) -> None:
        """End the current slice after the running hook returns (call only from a hook)."""
        self.stop_requested = True
        uclib.uc_emu_stop(self.h)

    def cut_slice(self, ns: int) -> None:
        """End the running slice `ns` from now if it would run longer (a timer the guest
        armed from inside it falls due first: timers.py); nothing between slices. From a
        hook on the emulating thread."""
        deadline = time.monotonic_ns() + max(ns, 1)
        if self._timer is not None:
            if self._in_slice and deadline < self._deadline_ns:
                self._deadline_ns = deadline
                self._arm(self._lib.aiovmm_timer_disarm(self._timer))   # what had fired stays
        elif self.slice.deadline_ns and deadline < self.slice.deadline_ns:
            self.slice.deadline_ns = deadline

    threaded = False            # slices run on the loop thread (engine.run) ...
    in_flight = False           # ... so no guest code runs while the loop runs anything else

    def kick_thread(self) -> None:
        """End a run in flight on another thread: none here (the KVM engine's vCPU thread)."""

    def quiesce(self) -> None:
        """Return when no guest code runs: always, here (runs hold the loop thread)."""

    def preempt(self) -> None:
        """Ask the running slice to end at the next block boundary (any thread)."""
        if self._timer is not None:
            self._lib.aiovmm_timer_kick(self._timer)
        else:
            self.slice.preempt = 1

    interrupted = False                  # interrupt() since the scheduler cleared it

    def interrupt(self) -> None:
        """End the running engine run soon, from any thread (the scheduler's I/O watcher):
        preempt, and `interrupted`, which ends every later run at once until the scheduler
        clears it (a preempt between two runs does not reach the next one)."""
        self.interrupted = True
        self.preempt()

    @property
    def blocks_executed(self) -> int:
        """Translated blocks run (the block hook counts them; 0 with timer slices)."""
        return self.slice.blocks

    def enable_instruction_count(self) -> None:
        """Count every executed instruction (C code hook; halves speed: benchmarks only)."""
        if hasattr(self, "_insn_count"):
            return
        from unicorn import UC_HOOK_CODE
        self._insn_count = ctypes.c_uint64(0)
        self._add_hook(UC_HOOK_CODE, ctypes.cast(_native().aiovmm_insn_hook, ctypes.c_void_p),
                       ctypes.cast(ctypes.byref(self._insn_count), ctypes.c_void_p))
        self.uc.ctl_flush_tb()

    @property
    def instructions_executed(self) -> int:
        """Instructions since enable_instruction_count() (0 if never enabled)."""
        c = getattr(self, "_insn_count", None)
        return c.value if c is not None else 0

    # -- hooks ---------------------------------------------------------------------------------------
    def _fail(self, e: BaseException) -> None:
        log.exception("%s: handler raised", self.name)
        self.callback_error = e
        self.stop_requested = True
        uclib.uc_emu_stop(self.h)

    def _hypervisor_runs(self) -> None:
        """The hypervisor is about to run for this vCPU (a slice starts, or one of its
        hooks enters Python): what the port policy answers may change now (the vCPU's mode,
        its IOPL, the domain's VM assists or I/O bitmap), so the INs answered in C
        (csrc/preempt.c aiovmm_in_hook) are forgotten. The one place of that rule: every
        Python entry of the engine calls it first, except an IN's (the port policy only
        reads: it changes none of its own inputs)."""
        self.forget_port_answers()

    def forget_port_answers(self) -> None:
        """Empty the table of INs the C hook answers by itself (emulate.port_policy_changed:
        the port policy's inputs changed)."""
        self._pio.fast_n = 0

    @property
    def fast_port_reads(self) -> int:
        """INs answered by the C hook from its table (statistics)."""
        return self._pio.fast_hits

    def _hook_syscall(self) -> None:
        self._hypervisor_runs()
        self.in_syscall_hook = True
        try:
            if self._segs.compat_mode():
                self.on_syscall32()         # SYSCALL in compatibility mode: MSR_CSTAR's
            else:
                self.on_hypercall()
        except BaseException as e:      # never let an exception unwind through C
            self._fail(e)
        finally:
            self.in_syscall_hook = False

    def _hook_intr(self, uc, vector, user_data) -> None:
        self._hypervisor_runs()
        try:
            err = self._excfix.read_error_and_reset()
            if err & _SOFT_INT:
                self._soft_int(vector, err & 0xF)
                return
            if vector == 8:
                # A PV guest never takes a real #DF (exceptions are not delivered through an
                # IDT): this is a fault converted to #DF because an unreported internal #PF
                # left old_exception set. The state is now clear; faults restart at their
                # instruction, so returning retries it and reports the real vector. A second
                # #DF at the same RIP is a genuine failure and goes to the handler.
                rip = self.get("rip")
                if rip != self._df_retry_rip:
                    self._df_retry_rip = rip
                    return
            self._df_retry_rip = -1
            cr2 = self.uc.reg_read(X.UC_X86_REG_CR2) if vector == 14 else 0
            self.on_exception(vector, err, cr2)
        except BaseException as e:
            self._fail(e)

    def _soft_int(self, vector: int, length: int) -> None:
        """A software interrupt (`int $n`, `int3`, `into`) of `length` bytes, prefixes and
        all, that the patched library marked (aiovmm-int-length.patch), RIP past it. Xen's
        IDT gates are DPL 0 but for 1, 3 and 4: `int $n` to another exception vector is
        #GP((n << 3) | 2) at its first byte, whatever the guest's gate says (the KVM
        engine's rule too); a vector of 32 or more goes to traps.inject_exception, which
        checks the guest's gate and puts a refused one's #GP at the INT (int_length)."""
        if vector < 32 and vector not in (1, 3, 4):
            self.set("rip", self.get("rip") - length)
            self.on_exception(13, (vector << 3) | 2, 0)
            return
        self.int_length = length
        try:
            self.on_exception(vector, 0, 0)
        finally:
            self.int_length = 2

    def _hook_invalid(self, uc, user_data) -> bool:
        self._hypervisor_runs()
        try:
            self.on_invalid_opcode()
            return True
        except BaseException as e:
            self._fail(e)
            return False

    def _hook_sysenter(self, uc, user_data) -> None:
        try:
            self.on_sysenter(self.uc.reg_read(X.UC_X86_REG_RIP))
        except BaseException as e:
            self._fail(e)

    def _hook_in(self, uc, port, size, user_data) -> int:
        # No _hypervisor_runs(): answering an IN (the port policy) only reads; what it
        # answered before holds as long as no other entry happened (each empties the table).
        try:
            val = self.on_port_io(port, size, False, 0)
            if val is not None:
                val &= (1 << (8 * size)) - 1
                if not self.stop_requested and self.port_in_fixed():
                    self._remember_in(port, size, val)
                return val
            self._refused()
        except BaseException as e:
            self._fail(e)
        return 0xFFFFFFFF

    def _remember_in(self, port: int, size: int, value: int) -> None:
        """The policy just answered this IN and its answer is fixed until the hypervisor
        next runs: let the C hook repeat it. A full table starts over (the C hook never
        misses an entry it has, so this is only reached for a new port or size)."""
        pio = self._pio
        if pio.fast_n >= _PIO_FAST_MAX:
            pio.fast_n = 0
        e = pio.fast[pio.fast_n]
        e.port, e.size, e.value = port, size, value
        pio.fast_n += 1

    def _hook_out(self, uc, port, size, value, user_data) -> None:
        self._hypervisor_runs()
        try:
            if self.on_port_io(port, size, True, value) is None:
                self._refused()
        except BaseException as e:
            self._fail(e)

    def _refused(self) -> None:
        """The handler refused this IN/OUT (and stop()ped the slice): with timer slices the
        C hook leaves the block at the instruction once the handler returned."""
        self._pio.refused = 1

    def _hook_cpuid(self, uc, user_data) -> int:
        self._hypervisor_runs()
        try:
            leaf, sub = self._batch(("rax", "rcx")).read()
            a, b, c, d = self.cpuid(leaf & 0xFFFFFFFF, sub & 0xFFFFFFFF)
            self._batch(("rax", "rbx", "rcx", "rdx")).write((a, b, c, d))
        except BaseException as e:
            self._fail(e)
        return 1

    # -- dirty tracking (migration) -----------------------------------------------------------
    def start_dirty_log(self) -> None:
        """Not implemented on this engine yet (the KVM engine has it): the planned mechanism
        is the TLB-fill write hook measured in shared/research/unicorn/NOTES.md."""
        raise NotImplementedError("dirty-page tracking is not implemented on the Unicorn engine")

    def get_dirty_log(self) -> set[int]:
        raise NotImplementedError("dirty-page tracking is not implemented on the Unicorn engine")

    def close(self) -> None:
        if self._mem is not None:
            if self in self._mem.tlb_engines:
                self._mem.tlb_engines.remove(self)
            self._mem = None
        if self._timer is not None:
            self._lib.aiovmm_timer_free(self._timer)
            self._timer = None
        self._excfix.free()
        self._segs.free()
        for hh in self._hooks:
            uclib.uc_hook_del(self.h, hh)
        self._hooks.clear()
        # No mem_unmap: unmapping a 1 GiB region costs ~37 ms (blocking the loop), closing
        # the instance ~2 ms. uc_close never touches the memfd mapping it was given.
        uc, self.uc = self.uc, None
        del uc
