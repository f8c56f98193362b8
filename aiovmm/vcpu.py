"""A virtual CPU: hypervisor-side state and its run loop (an asyncio task).

The engine (vcpu_engine.py) executes guest code; this module keeps what Xen keeps per vCPU
(guest kernel/user mode, the two page-table roots, trap table, callbacks, kernel stack,
timers, blocked state) and turns engine exits into hypervisor actions. Handlers run
synchronously inside emulation hooks on the event-loop thread, so all state stays on the loop.

Events are injected only at precise points: on hypercall return (inside the SYSCALL hook) and
at the start of a slice (the previous one ended at a block boundary).
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import struct
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

from .abi import PAGE_SIZE, CallbackType, VcpuInfo, VCPU_INFO_SIZE
from . import cpuid, descriptors, emulate, tcg_memory, vcpu_op
from .vcpu_engine import ExitReason, VCPUEngine

# An IPI drops the receiver's translated code at most this often (VCPU.ipi_code_sync): a
# 2-vCPU Linux boot took 89 s at 0.1 s, 68 s at 1 s, 59 s without (run side by side).
CODE_SYNC_S = 1.0


def loop_time() -> float:
    return asyncio.get_running_loop().time()

if TYPE_CHECKING:
    from .domain import Domain

log = logging.getLogger("aiovmm.vcpu")

_SYSCALL_CALLBACK = int(CallbackType.syscall)
_EVENT_CALLBACK = int(CallbackType.event)
_THREADED = object()        # _enter's answer when the engine run is to be awaited
IDLE_RELEASE_S = 2.0   # asleep this long: the engine's translator memory goes back (_sleep)


class PVState(ctypes.Structure):
    """The part of Xen's per-vCPU PV state that an engine may read or write outside Python
    (csrc/kvm.c struct aiovmm_pv, same layout: the KVM engine completes stack_switch,
    set_segment_base, iret, a user process's syscall bounce and the singleshot timer's
    set/stop in C; the timer stays the event loop's, C only records its last change in
    sshot_op/sshot_deadline for timers.apply_engine_singleshot). This struct is the only
    copy: VCPU.kernel_mode, iopl, kernel_ss, kernel_sp, kernel_root, user_root, the two saved
    GS bases, info_maddr, fault_depth, last_frame_rsp and hypercalls are views of it, and the
    syscall callback is mirrored into it by VCPU.set_callback, so C and Python never hold two
    values of one thing. gdt_frame0 is VCPU.gdt_frames[0] (0: no GDT frame), mirrored by
    that attribute's setter: C reads the guest's descriptor of an iret's CS there."""
    _fields_ = [("kernel_mode", ctypes.c_uint8), ("iopl", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 6),
                ("kernel_ss", ctypes.c_uint64), ("kernel_sp", ctypes.c_uint64),
                ("info_maddr", ctypes.c_uint64), ("fault_depth", ctypes.c_uint64),
                ("hypercalls", ctypes.c_uint64), ("kernel_root", ctypes.c_uint64),
                ("user_root", ctypes.c_uint64), ("kernel_gs_base", ctypes.c_uint64),
                ("user_gs_base", ctypes.c_uint64), ("last_frame_rsp", ctypes.c_uint64),
                ("syscall_cb", ctypes.c_uint64), ("syscall_cb_flags", ctypes.c_uint64),
                ("vcpu_id", ctypes.c_uint32), ("sshot_op", ctypes.c_uint32),
                ("sshot_deadline", ctypes.c_uint64), ("clock_origin_ns", ctypes.c_int64),
                ("vm_assist_ptr", ctypes.c_uint64),
                ("xenver_version", ctypes.c_uint64), ("no_vcpu", ctypes.c_uint64),
                ("max_vcpus", ctypes.c_uint32), ("pad2", ctypes.c_uint32),
                ("gdt_frame0", ctypes.c_uint64), ("gdt_frames_nr", ctypes.c_uint64),
                ("event_cb", ctypes.c_uint64)]


def _pv_field(name: str, doc: str, conv=int) -> property:
    def get(self: "VCPU"):
        return conv(getattr(self.pv, name))

    def set_(self: "VCPU", value) -> None:
        setattr(self.pv, name, int(value) & 0xFFFFFFFFFFFFFFFF)
    return property(get, set_, doc=doc)


class VCPU:
    kernel_mode = _pv_field("kernel_mode", "guest kernel (True) or user mode", bool)
    kernel_ss = _pv_field("kernel_ss", "HYPERVISOR_stack_switch: the kernel stack selector")
    kernel_sp = _pv_field("kernel_sp", "HYPERVISOR_stack_switch: the kernel stack pointer")
    info_maddr = _pv_field("info_maddr", "machine address of this vCPU's vcpu_info")
    fault_depth = _pv_field("fault_depth", "nested faults since the last hypercall (traps.py)")
    hypercalls = _pv_field("hypercalls", "hypercalls made (Python and engine together)")
    kernel_root = _pv_field("kernel_root", "MFN of the kernel L4 (NEW_BASEPTR)")
    user_root = _pv_field("user_root", "MFN of the user L4 (NEW_USER_BASEPTR), 0 = none")

    @property
    def gdt_frames(self) -> tuple[int, ...]:
        """The guest's GDT frames (HYPERVISOR_set_gdt, descriptors.set_gdt). A tuple, so
        that every change is an assignment here: the first frame and the count are mirrored
        into PVState (gdt_frame0, gdt_frames_nr), where csrc/kvm.c fast_iret reads the
        descriptor of an iret frame's CS in the first GDT page (descriptors.iret_code_segment
        is the rule; C takes only the 64-bit code segments it accepts, Python the rest)."""
        return self._gdt_frames

    @gdt_frames.setter
    def gdt_frames(self, frames) -> None:
        self._gdt_frames = tuple(int(f) for f in frames)
        self.pv.gdt_frame0 = self._gdt_frames[0] if self._gdt_frames else 0
        self.pv.gdt_frames_nr = len(self._gdt_frames)
    kernel_gs_base = _pv_field("kernel_gs_base", "GS base of kernel mode while in user mode")
    user_gs_base = _pv_field("user_gs_base", "GS base of user mode while in kernel mode")
    last_frame_rsp = _pv_field("last_frame_rsp", "the last bounce frame (traps.py nesting)")

    @property
    def iopl(self) -> int:
        """Virtual IOPL 0..3 (PHYSDEVOP_set_iopl; iret with VMASST architectural_iopl): an
        input of the port policy (emulate.port_policy_changed)."""
        return int(self.pv.iopl)

    @iopl.setter
    def iopl(self, value: int) -> None:
        old = self.pv.iopl
        self.pv.iopl = int(value) & 0xFF
        if self.pv.iopl != old:
            emulate.port_policy_changed(self.domain)

    @property
    def emulated(self) -> int:
        """Privileged instructions emulated: by emulate.py (emulated_here) and by the engine
        itself (the KVM engine's C loop completes cli/sti: csrc/kvm.c fast_cli_sti)."""
        in_c = getattr(self.engine, "exits_in_c", None)
        return self.emulated_here + (in_c.get("cli/sti", 0) if in_c else 0)

    @property
    def iobmp(self) -> tuple[int, int]:
        """(guest VA, nr_ports) of PHYSDEVOP_set_iobitmap: an input of the port policy."""
        return self._iobmp

    @iobmp.setter
    def iobmp(self, value: tuple[int, int]) -> None:
        changed = value != getattr(self, "_iobmp", None)
        self._iobmp = value
        if changed:
            emulate.port_policy_changed(self.domain)

    @property
    def callbacks(self) -> Mapping[int, tuple[int, int]]:
        """type -> (address, flags) (HYPERVISOR_set_callbacks, callback_op). Read-only:
        changed by set_callback, or replaced whole by assigning a mapping."""
        return self._callbacks_view

    @callbacks.setter
    def callbacks(self, table: Mapping[int, tuple[int, int]]) -> None:
        self._callbacks: dict[int, tuple[int, int]] = {}
        self._callbacks_view = MappingProxyType(self._callbacks)
        self.set_callback(_SYSCALL_CALLBACK, None)
        self.set_callback(_EVENT_CALLBACK, None)
        for ctype, entry in table.items():
            self.set_callback(ctype, entry)

    def set_callback(self, ctype: int, entry: tuple[int, int] | None) -> None:
        """Register (address, flags) for callback type `ctype`, or drop it (None). The one
        place the table changes: the syscall callback is copied into the PVState
        (syscall_cb, syscall_cb_flags), where the KVM engine's C loop bounces a user
        process's syscall, and the event callback's address (event_cb), where it bounces
        the upcall after a hypercall it completed; the table stays the authority, the
        PVState only mirrors it."""
        if entry is None:
            self._callbacks.pop(ctype, None)
        else:
            self._callbacks[ctype] = entry
        if ctype == _SYSCALL_CALLBACK:
            address, flags = entry or (0, 0)
            self.pv.syscall_cb = address & 0xFFFFFFFFFFFFFFFF
            self.pv.syscall_cb_flags = flags & 0xFFFFFFFFFFFFFFFF
        elif ctype == _EVENT_CALLBACK:
            self.pv.event_cb = (entry or (0, 0))[0] & 0xFFFFFFFFFFFFFFFF

    def __init__(self, domain: "Domain", vcpu_id: int, engine: VCPUEngine) -> None:
        self.domain = domain
        self.id = vcpu_id
        self.engine = engine
        self.pv = PVState()
        self.pv.vcpu_id = vcpu_id
        self.pv.clock_origin_ns = domain.hypervisor.system_time_ns.origin_ns
        self.pv.vm_assist_ptr = domain.vm_assist_address     # the domain's word, not a copy
        _hypercall.store_query_answers(self)
        self.kernel_mode = True
        self.kernel_root = 0
        self.user_root = 0
        self.kernel_gs_base = 0
        self.user_gs_base = 0
        self.trap_table: list[tuple[int, int, int]] = [(0, 0, 0)] * 256   # (flags, cs, address)
        self.callbacks = {}
        self.kernel_ss = 0
        self.kernel_sp = 0
        self.fpu_ts = False
        self.online = True
        self.initialised = True        # vCPUs 1..N-1 wait for VCPUOP_initialise (vcpu_op.py)
        self.flush_code_pending = False  # drop translated code before the next slice (traps.py)
        self.blocked = False
        self.idle_released = False     # translator memory released while asleep (_sleep)
        self._until = 0                 # the awaited engine run's bound (_enter_threaded)
        self.code_writes_seen = 0      # engine.code_invalidations() last seen (_share_code_writes)
        self.code_flushed_at = -CODE_SYNC_S   # loop time of the last drop of translated code
        self.code_sync_due: float | None = None   # an IPI's drop, deferred (ipi_code_sync)
        self.polling: frozenset[int] | None = None
        self._wake = asyncio.Event()
        self.fault_depth = 0
        self.last_frame_rsp = 0
        self.periodic_ns = 0
        self.periodic_last_ns = 0              # system time of the last periodic event (Xen's periodic_last_event)
        self.periodic_handle: asyncio.TimerHandle | None = None
        self.periodic_next_ns = 0              # system time the armed periodic_handle is due
        self.singleshot_handle: asyncio.TimerHandle | None = None
        self.singleshot_deadline_ns = 0        # system time the armed singleshot_handle is due
        self.poll_timeout_handle: asyncio.TimerHandle | None = None
        self.poll_deadline_ns = 0              # system time the armed poll_timeout_handle is due
        self.hypercalls = 0
        self.ptwr_updates = 0
        self.in_ptwr_step = False
        self.pending_ptwr = None
        self.pending_trap: tuple[int, int, int] | None = None
        # Xen's arch.nmi_pending and async_exception_mask's NMI bit (traps.deliver_nmi):
        # set by VCPUOP_send_nmi; masked from a delivery to the next HYPERVISOR_iret.
        self.nmi_pending = False
        self.nmi_masked = False
        # A context's data selectors that did not load (vcpu_context.load_data_segments):
        # the failsafe callback at the next slice's start (traps.failsafe).
        self.pending_failsafe: tuple[int, int, int, int] | None = None
        self.in_multicall = False
        # Privileged state Xen keeps per PV vCPU (emulate.py, cpuid.py).
        self.iopl = 0
        self.iobmp = (0, 0)
        self.cr2 = 0
        self.cr4 = cpuid.fixup_guest_cr4(0)
        self.dr = [0, 0, 0, 0, 0, 0, emulate.DR6_ONES, emulate.DR7_ONES]
        self.tsc_aux = 0
        self.xcr0 = int(cpuid.Xcr0.X87)
        # Every XCR0 component the guest ever enabled (Xen's xcr0_accum: its XSAVE state
        # may hold them; a save carries it in X86_PV_VCPU_XSAVE). 0: never used XSAVE.
        self.xcr0_accum = 0
        self.vmce: dict = {}                       # virtual machine-check MSR values
        self.emulated_here = 0                     # of `emulated`: by emulate.py
        # Descriptor tables (descriptors.py): window in Xen's area, GDT frames, LDT.
        self.desc_window: int | None = None
        self.gdt_frames = ()
        self.gdt_ents = 0
        self.ldt_base = 0
        self.ldt_ents = 0
        self.ldt_shadow: dict[int, int] = {}       # LDT page index -> mapped frame
        engine.on_hypercall = self._on_syscall
        engine.on_syscall32 = self._on_syscall32
        if hasattr(engine, "segment_descriptor"):
            engine.segment_descriptor = (
                lambda name, sel: descriptors.current_descriptor(self, name, sel))
        engine.on_hypercall_done = self._after_fast_hypercall
        # No C fast paths while an NMI is masked: its HYPERVISOR_iret must reach traps.do_iret.
        engine.fast_hypercalls_ok = lambda: self.domain.shutdown_reason is None and not self.nmi_masked
        attach = getattr(engine, "attach_pv", None)
        if attach is not None:
            attach(self.pv)
        engine.on_exception = self._on_exception
        engine.on_invalid_opcode = self._on_invalid_opcode
        if hasattr(engine, "on_sysenter"):
            engine.on_sysenter = self._on_sysenter
        engine.on_port_io = self._on_port_io
        engine.port_in_fixed = lambda: emulate.port_in_fixed(self)
        engine.rdtsc = domain.hypervisor.system_time_ns
        engine.cpuid = self._on_cpuid
        self._map = domain.mem.map
        # vcpu_info: in shared_info until VCPUOP_register_vcpu_info moves it (vcpu_op.py).
        self.info_maddr = domain.shared_info_maddr + VCPU_INFO_SIZE * vcpu_id
        self.info_frame = 0
        self.runstate = vcpu_op.RunState.running
        self.runstate_entry = domain.hypervisor.system_time_ns()
        self.runstate_time = [0, 0, 0, 0]
        self.runstate_area = 0
        self.time_area = 0

    def __repr__(self) -> str:
        return f"d{self.domain.domid}v{self.id}"

    # -- vcpu_info -----------------------------------------------------------------------------------
    def set_info_maddr(self, maddr: int) -> None:
        self.info_maddr = maddr

    @property
    def upcall_mask(self) -> int:
        return self.domain.mem.map[self.info_maddr + VcpuInfo.evtchn_upcall_mask]

    @upcall_mask.setter
    def upcall_mask(self, v: int) -> None:
        self.domain.mem.map[self.info_maddr + VcpuInfo.evtchn_upcall_mask] = 1 if v else 0

    @property
    def upcall_pending(self) -> bool:
        return bool(self.domain.mem.map[self.info_maddr + VcpuInfo.evtchn_upcall_pending])

    def event_deliverable(self) -> bool:
        """evtchn_upcall_pending && !evtchn_upcall_mask (hot: after every hypercall)."""
        m = self._map
        a = self.pv.info_maddr
        return bool(m[a] and not m[a + 1])

    # -- guest memory through the current page tables ---------------------------------------------------
    @property
    def current_root(self) -> int:
        pv = self.pv                     # hot (every guest buffer a hypercall reads): no properties
        return pv.kernel_root if pv.kernel_mode else self.user_root

    def copy_from_guest(self, va: int, n: int) -> bytes:
        mmu = self.domain.hypervisor.pagetables
        root = self.current_root << 12
        mem = self.domain.mem
        if 0 < n <= PAGE_SIZE - (va & (PAGE_SIZE - 1)):
            # Within one page (most hypercall arguments: one walk, one copy).
            ma = mmu.translate(root, va, False)
            return bytes(mem.view[ma:ma + n])
        out = bytearray()
        while n > 0:
            chunk = min(n, PAGE_SIZE - (va & (PAGE_SIZE - 1)))
            ma = mmu.translate(root, va, False)
            out += mem.view[ma:ma + chunk]
            va += chunk
            n -= chunk
        return bytes(out)

    def copy_to_guest(self, va: int, data: bytes) -> None:
        mmu = self.domain.hypervisor.pagetables
        root = self.current_root << 12
        mem = self.domain.mem
        # Translate every page first so a fault leaves guest memory untouched.
        parts = []
        off, n, v = 0, len(data), va
        while n > 0:
            chunk = min(n, PAGE_SIZE - (v & (PAGE_SIZE - 1)))
            parts.append((mmu.translate(root, v, True), off, chunk))
            v += chunk
            off += chunk
            n -= chunk
        for ma, o, c in parts:
            mem.view[ma:ma + c] = data[o:o + c]

    def read_struct(self, va: int, st: struct.Struct) -> tuple:
        return st.unpack(self.copy_from_guest(va, st.size))

    def write_struct(self, va: int, st: struct.Struct, *values) -> None:
        self.copy_to_guest(va, st.pack(*values))

    # -- mode switching ---------------------------------------------------------------------------------
    def switch_to_kernel(self) -> None:
        if self.kernel_mode:
            return
        self.user_gs_base = self.engine.get("gs_base")
        self.kernel_mode = True
        self.engine.write({"cr3": self.kernel_root << 12, "gs_base": self.kernel_gs_base})

    def switch_to_user(self) -> None:
        if not self.kernel_mode:
            return
        self.kernel_gs_base = self.engine.get("gs_base")
        self.kernel_mode = False
        self.engine.write({"cr3": self.user_root << 12, "gs_base": self.user_gs_base})

    def load_root(self) -> None:
        """Reload CR3 after a root change (also flushes the TLB)."""
        self.engine.set_cr3(self.current_root << 12)

    # -- blocking -------------------------------------------------------------------------------------------
    def block(self) -> None:
        """Called from a hypercall handler: end the slice and sleep until kicked."""
        self.blocked = True
        self._wake.clear()
        vcpu_op.set_runstate(self, vcpu_op.RunState.blocked)
        self.engine.stop()

    def kick(self) -> None:
        """An event became pending for this vCPU (vcpu_mark_events_pending): unblock it.
        As Xen's vcpu_unblock, this also ends a SCHEDOP_poll on other ports ("polling
        period ends when a VCPU is unblocked"): Linux's PV spinlock waits in poll and must
        still take an IPI meanwhile, or a lock holder waiting for that IPI deadlocks."""
        if self.blocked:
            if self.polling is not None:
                self.end_poll()
            else:
                self.blocked = False
                self.wake()
        else:
            self.engine.kick_thread()   # running on its vCPU thread: it sees the event now

    def poll_kick(self, port: int) -> None:
        if self.blocked and self.polling is not None and port in self.polling:
            self.end_poll()

    def end_poll(self) -> None:
        self.polling = None
        if self.poll_timeout_handle:
            self.poll_timeout_handle.cancel()
            self.poll_timeout_handle = None
        self.blocked = False
        self.wake()

    # -- exits from emulation ----------------------------------------------------------------------------------
    def _in_ptwr_step(self) -> bool:
        """During ptwr's step of a page-table store (ptwr.complete) nothing but the store
        runs: Xen's ptwr emulation has no hook for a hypercall, port I/O or an emulated
        instruction, the emulation fails and the #PF goes to the guest. Any such exit ends
        the step here, so it fails the same way (the bytes stepped need not be the store
        that faulted: a vCPU's stale translated code). True if so."""
        if self.in_ptwr_step:
            self.engine.stop()
            return True
        return False

    def _on_syscall(self) -> None:
        if self.domain.shutdown_reason is not None or self._in_ptwr_step():
            self.engine.stop()
        elif self.pv.kernel_mode:          # hot (every hypercall): the field, not the property
            _hypercall.dispatch(self)
        else:
            _traps.user_syscall(self)

    def _on_syscall32(self) -> None:
        if self.domain.shutdown_reason is not None or self._in_ptwr_step():
            self.engine.stop()
        else:
            _traps.syscall32(self)

    def _after_fast_hypercall(self, counts: dict[int, int], events: bool) -> None:
        """The engine completed hypercalls itself (`counts`: number -> calls since the last
        report, for the domain's statistics); `events`: the last one left an event
        deliverable, so its tail (Xen's test_all_events) runs now."""
        _hypercall.completed_elsewhere(self, counts, events)

    def _on_exception(self, vector: int, error: int, cr2: int) -> None:
        _traps.exception(self, vector, error, cr2)

    def _on_invalid_opcode(self) -> None:
        if self._in_ptwr_step():
            return
        if not emulate.ud_fault(self):
            _traps.inject_exception(self, 6, 0, 0)

    def _on_sysenter(self, rip: int) -> None:
        """A SYSENTER the engine reports without a fault (Unicorn): the #GP(0) at the
        instruction an Intel CPU gives without SYSENTER_CS, delivered by the run loop
        (a RIP written in the hook is not honoured); emulate.gp_fault takes it as Xen's
        sysenter_entry, the one rule for every engine."""
        if self._in_ptwr_step():
            return
        self.pending_trap = (13, 0, rip)
        self.engine.stop()

    def _on_port_io(self, port: int, size: int, write: bool, value: int) -> int | None:
        """Port I/O the engine intercepted without a fault (Unicorn at CPL 3). Allowed
        accesses are answered by the shared emulator; refused ones become #GP(0) at the
        instruction. A RIP written inside Unicorn's IN/OUT hook is not honoured, so the slice
        ends here and the run loop delivers the fault with RIP back on the instruction."""
        if self._in_ptwr_step():
            return None
        if write:
            ok = emulate.port_out(self, port, size, value)
            val: int | None = 0 if ok else None
        else:
            val = emulate.port_in(self, port, size)
        if val is None:
            self.pending_trap = (13, 0, self.engine.get("rip"))
            self.engine.stop()
        return val

    def _on_cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        return emulate.cpuid(self, leaf, subleaf)

    def crash(self, why: str) -> None:
        """Crash the whole domain from inside a handler."""
        rip = self.engine.get("rip")
        self.domain.crash(f"{why} (vcpu {self.id}, rip {rip:#x})")
        self.engine.stop()

    # -- the task ------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        from . import timers, traps
        dom = self.domain
        sched = dom.hypervisor.scheduler
        woke = False
        try:
            while not dom.dying:
                if self.blocked or not self.online or dom.paused:
                    was_blocked = self.blocked
                    sched.sleep(self)
                    await self._sleep()
                    self._wake.clear()
                    woke = woke or was_blocked
                    continue
                if woke:
                    sched.woke(self)
                    woke = False
                await sched.acquire(self)           # the credit scheduler picks who runs
                reason = None
                try:
                    if self.blocked or not self.online or dom.paused or dom.dying:
                        continue
                    # The slice is the vCPU's from here: what the hypervisor does for it
                    # before the guest is entered (its due timers, event and trap bounces) is
                    # charged to it, as Xen's burn_credits charges from the context switch.
                    sched.begin(self)
                    while True:
                        reason = self._enter(sched, timers, traps)
                        if reason is _THREADED:
                            reason = await self._enter_threaded(sched, timers)
                        if reason is not ExitReason.BUDGET or not self._slice_goes_on(sched):
                            break
                        if dom.yield_drains:
                            dom.drain_backends()
                finally:
                    sched.release(self)
                if reason is ExitReason.ERROR:
                    dom.crash(f"vcpu {self.id}: {self.engine.last_error} "
                              f"(rip {self.engine.get('rip'):#x})")
                    break
                if reason is not None and dom.yield_drains:
                    dom.drain_backends()            # what the slice put on device rings
                await sched.yield_point(self)
        finally:
            sched.forget(self)
            self.stop_timers()
            descriptors.release(self)
            vcpu_op.release(self)

    def _enter(self, sched, timers, traps) -> ExitReason | None:
        """Prepare and run one engine run of the current slice: what is pending for the vCPU
        (page-table write step, code sync, failsafe, trap), its due timers (Xen's timer
        softirq before the return to the guest), NMI and event bounces, then the guest until
        the slice's bound or the vCPU's next timer. None: the domain died meanwhile."""
        dom = self.domain
        if self.runstate != vcpu_op.RunState.running:
            vcpu_op.set_runstate(self, vcpu_op.RunState.running)
        if self.pending_ptwr is not None:
            traps.finish_ptwr(self)
            if dom.dying:
                return None
        if self.code_sync_due is not None and loop_time() >= self.code_sync_due:
            self.code_sync_due = None
            self.flush_code_pending = True
        if self.flush_code_pending:
            self.flush_code_pending = False
            self.code_flushed_at = loop_time()
            self.engine.flush_code()
        if self.pending_failsafe is not None:
            sels, self.pending_failsafe = self.pending_failsafe, None
            traps.failsafe(self, sels)
            if dom.dying:
                return None
        if self.pending_trap is not None:
            vector, error, rip = self.pending_trap
            self.pending_trap = None
            self.engine.set("rip", rip)
            traps.exception(self, vector, error, 0)
            if dom.dying:
                return None
        due = timers.run_due(self)      # before the NMI and event checks, as Xen's softirq
        if self.nmi_pending:
            traps.deliver_nmi(self)
            if dom.dying:
                return None
        if self.event_deliverable():
            traps.deliver_event(self)
            if dom.dying:
                return None
        left = max(timers.TIMER_SLOP_NS, sched.slice_left(self))   # the guest runs, however long the above took
        if self.engine.threaded:
            self._until = timers.slice_until(self, due, left)
            return _THREADED
        reason = self.engine.run(sched.budget(self), timers.slice_until(self, due, left))
        self.idle_released = False
        if len(dom.vcpus) > 1:
            self._share_code_writes()
        return reason

    async def _enter_threaded(self, sched, timers) -> ExitReason:
        """_enter's engine run on an engine whose guest runs on a thread of its own (the KVM
        engine's vCPU thread): awaited, so the loop runs backends meanwhile."""
        reason = await self.engine.run_async(sched.budget(self), self._until)
        self.idle_released = False
        if len(self.domain.vcpus) > 1:
            self._share_code_writes()
        return reason

    def _slice_goes_on(self, sched) -> bool:
        """The engine run ended on time (ExitReason.BUDGET): True if that was the vCPU's own
        timer and not the slice's bound, so the slice goes on with the timer's event (Xen's
        timer interrupt raises the event on the running vCPU and returns to it; only the
        scheduler's own timer deschedules it). Not when the vCPU stopped wanting the CPU or
        less than TIMER_SLOP_NS of the slice is left, nor a lengthened slice when the loop
        has I/O ready (Scheduler.goes_on)."""
        from .timers import TIMER_SLOP_NS
        d = self.domain
        if self.blocked or not self.online or d.paused or d.dying:
            return False
        return sched.goes_on(self, TIMER_SLOP_NS)

    def runs_translated_code(self) -> bool:
        """True if the vCPU's engine runs its own translations of guest code (Unicorn, which
        counts the translations a store dropped: code_invalidations) rather than the bytes
        in memory (KVM): only then can it run code that memory no longer holds, which the
        SMP rules here (_share_code_writes, ipi_code_sync) and traps._stale_int3 are for."""
        return getattr(self.engine, "code_invalidations", None) is not None

    def _share_code_writes(self) -> None:
        """This vCPU's stores invalidated some of its translated code (its engine counts
        them): the other vCPUs' engines keep their own translations of the same bytes, so
        they drop theirs before their next slice. Covers code that the writing vCPU also
        ran (kernel text patching: alternatives, jump labels, text_poke); code only other
        vCPUs translated is not seen (docs/design.md, SMP)."""
        if not self.runs_translated_code():
            return
        n = self.engine.code_invalidations()
        if n != self.code_writes_seen:
            self.code_writes_seen = n
            for other in self.domain.vcpus:
                if other is not self:
                    other.flush_code_pending = True

    def ipi_code_sync(self) -> None:
        """Another vCPU of the domain sent this one an IPI. An SMP kernel that rewrites code
        other CPUs may run (Linux's text_poke: static keys such as the freezer's, alternatives)
        makes them see it with an IPI whose handler serializes (Intel SDM vol. 3 8.1.3,
        cross-modifying code). An emulated vCPU keeps translations of the old bytes that no
        store of another instance reaches unless the writer had translated them too
        (_share_code_writes), so an IPI drops this vCPU's translated code before its next
        slice: at most once per CODE_SYNC_S (retranslation costs ms), an IPI inside that
        window deferring the drop to the window's end. Old code thus lives at most
        CODE_SYNC_S past an IPI. Engines that run the bytes in memory (KVM) need nothing."""
        if not self.runs_translated_code():
            return
        due = max(loop_time(), self.code_flushed_at + CODE_SYNC_S)
        if self.code_sync_due is None or due < self.code_sync_due:
            self.code_sync_due = due

    async def _sleep(self) -> None:
        """Wait for a wake-up. A vCPU asleep for IDLE_RELEASE_S gives its engine's
        translated code and translator tables back to the kernel (the Unicorn engine's
        release_idle_memory; an engine without it keeps everything): what lets a thousand idle
        guests fit (bench/density.py). Once per sleep: nothing is retranslated until it runs.
        Only in a single-vCPU domain: a store into code is seen only by an instance that
        translated it (_share_code_writes), so a vCPU whose translations were released
        would rewrite code another vCPU still runs translated without anyone noticing
        (tests/test_redteam_smp.py)."""
        release = getattr(self.engine, "release_idle_memory", None)
        if release is not None and not self.idle_released and len(self.domain.vcpus) == 1:
            try:
                async with asyncio.timeout(IDLE_RELEASE_S):
                    await self._wake.wait()
                return
            except TimeoutError:
                freed = release()
                self.idle_released = True
                tcg_memory.trim_heap_soon(asyncio.get_running_loop())
                log.debug("%r: idle, released %d KiB of translator memory", self, freed >> 10)
        await self._wake.wait()

    def wake(self) -> None:
        """Let the run loop re-check its state (an unblock, pause, shutdown, online): the
        scheduler hears of it at once (Scheduler.unblocked: a lengthened slice of another
        vCPU is cut back), as Xen's vcpu_wake tickles the pCPU."""
        self._wake.set()
        if self.domain.shutdown_reason is None:      # not a vCPU on its way out
            self.domain.hypervisor.scheduler.unblocked(self)

    def stop_timers(self) -> None:
        for h in (self.periodic_handle, self.singleshot_handle, self.poll_timeout_handle):
            if h is not None:
                h.cancel()
        self.periodic_handle = self.singleshot_handle = self.poll_timeout_handle = None


from . import hypercall as _hypercall, traps as _traps  # noqa: E402  (they import this module's users)
