"""Xen x86_64 PV ABI constants and layouts, as aiovmm speaks them.

Every number here is Xen's (xen/include/public/*.h, restated in
shared/design/xen-pv-abi.md). tests/test_abi.py compiles a C file against Debian's
libxen-dev headers and checks each offset and size below against Xen's own definitions,
so a layout mistake fails a test instead of a guest.
"""
from __future__ import annotations

import enum
import struct

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)


class Hypercall(enum.IntEnum):
    set_trap_table = 0
    mmu_update = 1
    set_gdt = 2
    stack_switch = 3
    set_callbacks = 4
    fpu_taskswitch = 5
    sched_op_compat = 6
    platform_op = 7
    set_debugreg = 8
    get_debugreg = 9
    update_descriptor = 10
    memory_op = 12
    multicall = 13
    update_va_mapping = 14
    set_timer_op = 15
    event_channel_op_compat = 16
    xen_version = 17
    console_io = 18
    physdev_op_compat = 19
    grant_table_op = 20
    vm_assist = 21
    update_va_mapping_otherdomain = 22
    iret = 23
    vcpu_op = 24
    set_segment_base = 25
    mmuext_op = 26
    xsm_op = 27
    nmi_op = 28
    sched_op = 29
    callback_op = 30
    xenoprof_op = 31
    event_channel_op = 32
    physdev_op = 33
    xenpmu_op = 40


class Errno(enum.IntEnum):
    """Xen's errno values (xen/include/public/errno.h); hypercalls return the negation."""
    EPERM = 1
    ENOENT = 2
    ESRCH = 3
    ENXIO = 6
    EIO = 5
    E2BIG = 7
    EBADF = 9
    EAGAIN = 11
    ENOMEM = 12
    EACCES = 13
    EFAULT = 14
    EBUSY = 16
    EEXIST = 17
    EXDEV = 18
    ENODEV = 19
    EINVAL = 22
    ENOSPC = 28
    ENOSYS = 38
    ENODATA = 61
    ETIME = 62
    EOPNOTSUPP = 95
    ENOBUFS = 105


# start_info (xen.h) -------------------------------------------------------------------
START_INFO_MAGIC = b"xen-3.0-x86_64"
START_INFO_SIZE = 1168
MAX_GUEST_CMDLINE = 1024


class StartInfo(enum.IntEnum):
    """Field offsets inside struct start_info (x86_64)."""
    magic = 0
    nr_pages = 32
    shared_info = 40
    flags = 48
    store_mfn = 56
    store_evtchn = 64
    console_mfn = 72
    console_evtchn = 80
    pt_base = 88
    nr_pt_frames = 96
    mfn_list = 104
    mod_start = 112
    mod_len = 120
    cmd_line = 128
    first_p2m_pfn = 1152
    nr_p2m_frames = 1160


# shared_info / vcpu_info (xen.h, arch-x86/xen.h) --------------------------------------
VCPU_INFO_SIZE = 64
XEN_LEGACY_MAX_VCPUS = 32
SHARED_INFO_SIZE = 3136


class VcpuInfo(enum.IntEnum):
    evtchn_upcall_pending = 0
    evtchn_upcall_mask = 1
    evtchn_pending_sel = 8
    arch_cr2 = 16
    time = 32


class VcpuTimeInfo(enum.IntEnum):
    version = 0
    tsc_timestamp = 8
    system_time = 16
    tsc_to_system_mul = 24
    tsc_shift = 28
    flags = 29


class SharedInfo(enum.IntEnum):
    vcpu_info = 0
    evtchn_pending = 2048
    evtchn_mask = 2560
    wc_version = 3072
    wc_sec = 3076
    wc_nsec = 3080
    wc_sec_hi = 3084
    arch = 3088


XEN_PVCLOCK_TSC_STABLE_BIT = 1

# Selectors (arch-x86/xen-x86_64.h) ------------------------------------------------------
FLAT_RING0_CS64 = 0xE008
FLAT_RING0_DS = 0xE010
FLAT_RING3_CS32 = 0xE023
FLAT_RING3_SS = 0xE02B
FLAT_RING3_CS64 = 0xE033
FLAT_KERNEL_CS = FLAT_RING3_CS64
FLAT_KERNEL_SS = FLAT_RING3_SS
FIRST_RESERVED_GDT_ENTRY = 7168
FIRST_RESERVED_GDT_BYTE = FIRST_RESERVED_GDT_ENTRY * 8

# Xen's virtual range and the read-only M2P (arch-x86/xen-x86_64.h) ---------------------
HYPERVISOR_VIRT_START = 0xFFFF800000000000
HYPERVISOR_VIRT_END = 0xFFFF880000000000
MACH2PHYS_VIRT_START = 0xFFFF800000000000
MACH2PHYS_VIRT_END = 0xFFFF804000000000
XEN_L4_FIRST, XEN_L4_LAST = 256, 271      # inclusive: the L4 slots Xen keeps
INVALID_M2P_ENTRY = (1 << 64) - 1

# Page-table entry bits -------------------------------------------------------------------
_PAGE_PRESENT = 0x001
_PAGE_RW = 0x002
_PAGE_USER = 0x004
_PAGE_PWT = 0x008
_PAGE_PCD = 0x010
_PAGE_ACCESSED = 0x020
_PAGE_DIRTY = 0x040
_PAGE_PSE = 0x080
_PAGE_PAT = 0x080
_PAGE_GLOBAL = 0x100
_PAGE_GUEST_KERNEL = 1 << 52
_PAGE_NX = 1 << 63
PTE_FRAME_MASK = 0x000FFFFFFFFFF000

# ELF notes (elfnote.h) -------------------------------------------------------------------


class ElfNote(enum.IntEnum):
    INFO = 0
    ENTRY = 1
    HYPERCALL_PAGE = 2
    VIRT_BASE = 3
    PADDR_OFFSET = 4
    XEN_VERSION = 5
    GUEST_OS = 6
    GUEST_VERSION = 7
    LOADER = 8
    PAE_MODE = 9
    FEATURES = 10
    BSD_SYMTAB = 11
    HV_START_LOW = 12
    L1_MFN_VALID = 13
    SUSPEND_CANCEL = 14
    INIT_P2M = 15
    MOD_START_PFN = 16
    SUPPORTED_FEATURES = 17
    PHYS32_ENTRY = 18


# sched_op (sched.h) ------------------------------------------------------------------------


class SchedOp(enum.IntEnum):
    yield_ = 0
    block = 1
    shutdown = 2
    poll = 3
    remote_shutdown = 4
    shutdown_code = 5
    watchdog = 6


class ShutdownReason(enum.IntEnum):
    poweroff = 0
    reboot = 1
    suspend = 2
    crash = 3
    watchdog = 4
    soft_reset = 5


# vcpu_op (vcpu.h) --------------------------------------------------------------------------


class VcpuOp(enum.IntEnum):
    initialise = 0
    up = 1
    down = 2
    is_up = 3
    get_runstate_info = 4
    register_runstate_memory_area = 5
    set_periodic_timer = 6
    stop_periodic_timer = 7
    set_singleshot_timer = 8
    stop_singleshot_timer = 9
    register_vcpu_info = 10
    send_nmi = 11
    get_physid = 12


VCPU_SSHOTTMR_future = 1

# callbacks (callback.h) --------------------------------------------------------------------


class CallbackOp(enum.IntEnum):
    register = 0
    unregister = 1


class CallbackType(enum.IntEnum):
    event = 0
    failsafe = 1
    syscall = 2
    sysenter_deprecated = 3
    nmi = 4
    sysenter = 5
    syscall32 = 7


CALLBACKF_mask_events = 1
TI_FLAG_MASK_EVENTS = 4          # trap_info.flags bit 2
VGCF_in_syscall = 0x100
IRET_CONTEXT_SIZE = 72

# set_segment_base ---------------------------------------------------------------------------
SEGBASE_FS = 0
SEGBASE_GS_USER = 1
SEGBASE_GS_KERNEL = 2
SEGBASE_GS_USER_SEL = 3

# console_io ----------------------------------------------------------------------------------
CONSOLEIO_write = 0
CONSOLEIO_read = 1

# xen_version (version.h) -----------------------------------------------------------------------


class XenVer(enum.IntEnum):
    version = 0
    extraversion = 1
    compile_info = 2
    capabilities = 3
    changeset = 4
    platform_parameters = 5
    get_features = 6
    pagesize = 7
    guest_handle = 8
    commandline = 9


XEN_VERSION_MAJOR, XEN_VERSION_MINOR = 4, 17

# features.h
XENFEAT_writable_page_tables = 0
XENFEAT_supervisor_mode_kernel = 3

# event channels (event_channel.h, xen.h) ---------------------------------------------------


class EvtchnOp(enum.IntEnum):
    bind_interdomain = 0
    bind_virq = 1
    bind_pirq = 2
    close = 3
    send = 4
    status = 5
    alloc_unbound = 6
    bind_ipi = 7
    bind_vcpu = 8
    unmask = 9
    reset = 10


class EvtchnStat(enum.IntEnum):
    closed = 0
    unbound = 1
    interdomain = 2
    pirq = 3
    virq = 4
    ipi = 5


class Virq(enum.IntEnum):
    TIMER = 0
    DEBUG = 1
    CONSOLE = 2
    DOM_EXC = 3
    XENOPROF = 7
    XENPMU = 13


PER_VCPU_VIRQS = frozenset({Virq.TIMER, Virq.DEBUG, Virq.XENOPROF, Virq.XENPMU})
NR_VIRQS = 24
EVTCHN_2L_NR_CHANNELS = 4096

DOMID_SELF = 0x7FF0
DOMID_XEN = 0x7FF2
DOMID_INVALID = 0x7FF4

# mmu (xen.h) ----------------------------------------------------------------------------------
MMU_NORMAL_PT_UPDATE = 0
MMU_MACHPHYS_UPDATE = 1
MMU_PT_UPDATE_PRESERVE_AD = 2
MMU_PT_UPDATE_NO_TRANSLATE = 3


class MmuExt(enum.IntEnum):
    PIN_L1_TABLE = 0
    PIN_L2_TABLE = 1
    PIN_L3_TABLE = 2
    PIN_L4_TABLE = 3
    UNPIN_TABLE = 4
    NEW_BASEPTR = 5
    TLB_FLUSH_LOCAL = 6
    INVLPG_LOCAL = 7
    TLB_FLUSH_MULTI = 8
    INVLPG_MULTI = 9
    TLB_FLUSH_ALL = 10
    INVLPG_ALL = 11
    FLUSH_CACHE = 12
    SET_LDT = 13
    NEW_USER_BASEPTR = 15
    CLEAR_PAGE = 16
    COPY_PAGE = 17
    FLUSH_CACHE_GLOBAL = 18
    MARK_SUPER = 19
    UNMARK_SUPER = 20


UVMF_NONE = 0
UVMF_TLB_FLUSH = 1
UVMF_INVLPG = 2
UVMF_FLUSHTYPE_MASK = 3
UVMF_ALL = 4

# Exceptions ----------------------------------------------------------------------------------
EXCEPTIONS_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
TRAP_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
              8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
              17: "#AC", 18: "#MC", 19: "#XM"}

# Layout structs (little-endian) ----------------------------------------------------------------
TRAP_INFO = struct.Struct("<BBH4xQ")          # vector, flags, cs, address   (16 bytes)
MULTICALL_ENTRY = struct.Struct("<QQ6Q")        # op, result, args[6]          (64 bytes)
MMU_UPDATE = struct.Struct("<QQ")               # ptr, val                     (16 bytes)
MMUEXT_OP = struct.Struct("<I4xQQ")             # cmd, arg1, arg2              (24 bytes)
IRET_CONTEXT = struct.Struct("<9Q")             # rax r11 rcx flags rip cs rflags rsp ss
CALLBACK_REGISTER = struct.Struct("<HH4xQ")     # type, flags, address         (16 bytes)
SCHED_POLL = struct.Struct("<QI4xQ")            # ports, nr_ports, timeout     (24 bytes)
VCPU_SET_SINGLESHOT_TIMER = struct.Struct("<QI4x")  # timeout_abs_ns, flags    (16 bytes)
EVTCHN_STATUS = struct.Struct("<H2xIIIHHI")     # dom, port, status, vcpu, u.. (24 bytes)


def signed64(v: int) -> int:
    """A register value as the signed C long the guest sees."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def segment_base_limit(desc: int) -> tuple[int, int]:
    """(base, byte limit) of an 8-byte code/data segment descriptor (G: 4 KiB units), as a
    segment load puts them in the hidden part (the engines' load_segment)."""
    hi = desc >> 32
    base = ((desc >> 16) & 0xFFFFFF) | ((hi >> 24) << 24)
    limit = (desc & 0xFFFF) | (hi & 0xF0000)
    return base, (limit << 12) | 0xFFF if hi & (1 << 23) else limit


def is_canonical(va: int) -> bool:
    top = va >> 47
    return top == 0 or top == 0x1FFFF
