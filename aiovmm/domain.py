"""A domain: its frames, P2M, shared_info, event channels, vCPUs and lifecycle.

Lifecycle: built -> running -> (shutdown with a reason | crashed) -> destroyed. A crash is
logged with the domain id and the reason (vector, RIP); it stops only this domain.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import re
import time
import uuid
from typing import TYPE_CHECKING, Callable, Iterator

from .abi import PAGE_SHIFT, ShutdownReason, VcpuInfo, VCPU_INFO_SIZE, XEN_LEGACY_MAX_VCPUS
from .events import EventChannels
from .scheduler import DomainSched
from . import console as _console
from .hostfile import open_own

if TYPE_CHECKING:
    from .ratelimit import Limit
    from .hypervisor import Hypervisor
    from .vcpu import VCPU

log = logging.getLogger("aiovmm.domain")
guest_log = logging.getLogger("aiovmm.guest")       # guests' console_io output (Xen's "(dN)" lines)

# Longest stretch of a destroy's work between two turns of the event loop (destroy_preemptible).
DESTROY_SLICE_S = 0.002

# In-memory console history per domain (the log file, if any, keeps everything); the same
# 1 MiB as xl's console/limit.
CONSOLE_KEEP_BYTES = 1 << 20
CONSOLE_KEEP_LINES = 20_000


NAME_MAX = 64


def valid_name(name: str) -> bool:
    """A domain name as create, restore and a stream's header all take it: printable, at
    most NAME_MAX, not all digits (that is an id to xl) and without "/" (it is part of the
    console log's file name and of the API's URLs)."""
    return (0 < len(name) <= NAME_MAX and name.isprintable() and not name.isdigit()
            and "/" not in name)


class ConsoleLog:
    """The per-domain console log file. Appends are buffered on the loop and written by
    this object's task through a worker thread (no blocking file I/O on the loop)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._buf = bytearray()
        self._wake = asyncio.Event()
        self._closing = False
        self._lock = asyncio.Lock()          # writes reach the file in append order
        self._writing: asyncio.Future | None = None   # the write in the worker thread
        self.failed = False

    def close(self) -> None:
        """Ask run() to write what is buffered and return."""
        self._closing = True
        self._wake.set()

    def append(self, data: bytes) -> None:
        self._buf += data
        self._wake.set()

    def _write(self, data: bytes) -> None:
        """The guest writes this file's content: never through a symlink or into another
        user's file or a hard link, whoever can write in the log directory. A log that
        cannot be written is given up (said once), not the domain."""
        if self.failed:
            return
        try:
            with open(self.path, "ab", opener=lambda p, fl: open_own(p, fl, 0o640)) as f:
                f.write(data)
        except OSError as e:
            self.failed = True
            log.error("console log %s: %s; not logging this domain's console", self.path, e)

    async def flush(self) -> None:
        """Write everything appended so far; returns when it is in the file. Usable whether
        or not run() is still running (Domain.wait: the domain's end waits for its log)."""
        async with self._lock:
            while self._writing is not None or self._buf:
                if self._writing is None:
                    data, self._buf = bytes(self._buf), bytearray()
                    self._writing = asyncio.get_running_loop().run_in_executor(None, self._write, data)
                # Shielded: a cancelled caller leaves the write running; the next flush
                # waits for it before writing more, so the file keeps the append order.
                await asyncio.shield(self._writing)
                self._writing = None

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()
            if self._closing and not self._buf:
                return


class Domain:
    @property
    def vm_assist(self) -> int:
        """Xen's d->vm_assist (HYPERVISOR_vm_assist): the VMASST_TYPE_* bits enabled.
        architectural_iopl is an input of every vCPU's port policy, so a change empties
        their answered-IN tables (emulate.port_policy_changed)."""
        return self._vm_assist.value

    @vm_assist.setter
    def vm_assist(self, value: int) -> None:
        value &= 0xFFFFFFFFFFFFFFFF
        old = self._vm_assist.value
        self._vm_assist.value = value
        if value != old:
            from . import emulate
            emulate.port_policy_changed(self)

    @property
    def vm_assist_address(self) -> int:
        """Where the vm_assist word lives (an engine's C code reads it there, never a copy)."""
        return ctypes.addressof(self._vm_assist)

    def __init__(self, hv: "Hypervisor", domid: int, name: str, nr_pages: int,
                 on_console: Callable[[bytes], None] | None = None, log_dir: str | None = None,
                 console_raw: bool = False) -> None:
        self.hypervisor = hv
        self.engine_kind = "unicorn"     # set by Hypervisor.create: the domain's vCPU engine
        self.mem = hv.mem
        self.domid = domid
        self.name = name
        self.uuid = uuid.uuid4()
        self.nr_pages = nr_pages
        frames = self.mem.alloc(domid, nr_pages)
        self.p2m = list(frames)
        self.mem.set_m2p(frames)
        self.shared_info_mfn = self.mem.alloc(domid)[0]
        self.frames: set[int] = set(frames)
        self.frames.add(self.shared_info_mfn)
        self.max_pages = nr_pages
        # The E820 limit the toolstack sets at build (xc_domain_set_memmap_limit): XENMEM_memory_map
        # keeps answering it when mem-set later lowers max_pages.
        self.memmap_pages = nr_pages
        # Frames Xen shares with the guest (shared_info, grant-table frames): mappable
        # writable, never retyped (a permanent writable type reference) and never freed
        # by the guest.
        self.shared_frames: set[int] = set()
        self._share(self.shared_info_mfn)
        self.destroyed = False
        self.host_mappings: set = set()
        for i in range(XEN_LEGACY_MAX_VCPUS):
            self.mem.map[self.shared_info_maddr + VCPU_INFO_SIZE * i + VcpuInfo.evtchn_upcall_mask] = 1
        self.vcpus: list["VCPU"] = []
        self.evtchn = EventChannels(self)
        from .grants import GrantTable
        self.grants: GrantTable | None = GrantTable(self)
        # The toolstack allocates the xenstore port first, then the console's (xen-pv-abi §2.5).
        self.store_port = self.evtchn.alloc_unbound(0)
        self.console_port = self.evtchn.alloc_unbound(0)
        # HYPERVISOR_vm_assist bits in one ctypes word: the KVM engine's C loop reads them
        # there (csrc/kvm.c architectural_iopl, through each vCPU's PVState.vm_assist_ptr).
        self._vm_assist = ctypes.c_uint64(0)
        self.ldt = (0, 0)
        self.boot_l4 = 0
        self.paused = False
        self.suspended = None            # migration.suspend.Suspended while suspended for a save
        self.suspend_waiter: asyncio.Future | None = None
        self.suspend_cancel = False      # the kernel declared XEN_ELFNOTE_SUSPEND_CANCEL
        self.start_info_pfn = 0          # set by the builder (or restore)
        self.shutdown_reason: ShutdownReason | None = None
        self.shutdown_code: int | None = None
        self.crash_reason = ""
        self.console = bytearray()
        self.console_input = bytearray()      # host input not yet in the guest's ring
        self.console_lines: list[str] = []
        self.console_rate = _console.OutputRate()
        self._console_linebuf = _console.LineBuffer()
        self._console_io_linebuf = _console.LineBuffer()      # console_io lines for the log
        self._console_lines_bytes = 0
        self._console_dropping = False
        self._console_warned_ns = -(1 << 62)
        self._console_cb = on_console
        self.console_raw = console_raw   # on_console gets unfiltered bytes (console_write)
        self._line_waiters: list[tuple[re.Pattern, asyncio.Future]] = []
        self.first_output_ns: int | None = None
        self.log_path = os.path.join(log_dir, f"{name}-d{domid}.log") if log_dir else None
        self.console_log = ConsoleLog(self.log_path) if self.log_path else None
        self.console_backend = None
        self.backends: list = []          # device backends (netback, blkback) of this domain
        self.created_ns = hv.system_time_ns()
        self.done: asyncio.Future[ShutdownReason] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task | None = None          # the domain's task in the hypervisor
        self.device_tg: asyncio.TaskGroup | None = None  # its backends' TaskGroup while running
        self.backend_tasks: list[asyncio.Task] = []      # cancelled once the vCPUs have stopped
        self.hypercall_counts: dict[int, int] = {}     # hypercall number -> calls (known only)
        self.sched = DomainSched()                     # credit scheduler weight and cap
        # Backends' ring passes run when one of its vCPUs ends a slice (drain_backends).
        self.yield_drains: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"<Domain d{self.domid} {self.name}>"

    @property
    def tot_pages(self) -> int:
        """Pages the domain owns, as Xen counts them (Xen's shared frames not counted)."""
        return len(self.frames) - len(self.shared_frames)

    def _share(self, mfn: int) -> None:
        self.mem.get_writable(mfn)
        self.shared_frames.add(mfn)

    def add_shared_frame(self) -> int:
        mfn = self.mem.alloc(self.domid)[0]
        self.frames.add(mfn)
        self._share(mfn)
        return mfn

    def add_frame(self) -> int:
        mfn = self.mem.alloc(self.domid)[0]
        self.frames.add(mfn)
        return mfn

    def release_frame(self, mfn: int) -> None:
        """Give back one of this domain's frames: freed now, or, still referenced, when its
        last reference drops (counted to the domain until then; MachineMemory.give_back)."""
        if not self.mem.give_back(mfn, self.frames):
            log.debug("d%d: frame %#x given back while referenced: freed on its last reference",
                      self.domid, mfn)

    @property
    def shared_info_maddr(self) -> int:
        return self.shared_info_mfn << PAGE_SHIFT

    def vcpu(self, i: int) -> "VCPU | None":
        return self.vcpus[i] if 0 <= i < len(self.vcpus) else None

    @property
    def dying(self) -> bool:
        return self.shutdown_reason is not None

    # -- console -------------------------------------------------------------------------------
    def console_write(self, data: bytes, *, final: bool = False, hypercall: bool = False) -> None:
        """Guest console output, from console_io and from the xencons ring alike: the one
        place its cost to the host is bounded. Bytes beyond the domain's output budget
        (console_rate) are discarded and counted; control bytes other than \\n and \\t are
        replaced, as Xen filters output of unprivileged domains; the unfinished line is at
        most LINE_MAX bytes; history is bounded in lines and bytes. `final`: the last ring's
        worth of a stopped guest, charged but never discarded. The guest terminal's CR LF
        line ends become LF (console_io and ring alike). With `console_raw` the console
        stream's callback gets the guest's bytes unfiltered instead (budget applied), for a
        user's terminal that filters them itself (console.TerminalFilter).

        `hypercall` (console_io output): as on Xen, where a domU's console_io goes to the
        hypervisor's own console (`xl dmesg`, lines prefixed "(dN)") and never to the
        guest's console (xenconsoled's pty is the ring only), those lines go to the
        hypervisor's log (logger aiovmm.guest, shown by `aiovmm run -v`) and not to the
        console stream (on_console: `aiovmm run`'s stdout; the log-dir file). A guest
        writing both ways (Linux with earlyprintk=xen) thus shows each line once. They stay
        in `console`/`console_lines`, the domain's record of everything it printed."""
        if self.first_output_ns is None and data:
            self.first_output_ns = self.hypervisor.system_time_ns()
        rate = self.console_rate
        allowed = rate.take(len(data), force=final)
        if allowed < len(data):
            if not self._console_dropping:
                self._console_dropping = True
                # At most one warning a minute per domain: the host's log is bounded too.
                now = self.hypervisor.system_time_ns()
                level = logging.WARNING if now - self._console_warned_ns >= 60_000_000_000 else logging.DEBUG
                if level == logging.WARNING:
                    self._console_warned_ns = now
                log.log(level, "d%d: console output over %d bytes/s: discarding (%d bytes so far)",
                        self.domid, rate.rate, rate.dropped)
            data = data[:allowed]
        elif self._console_dropping:
            self._console_dropping = False
            self._console_line_out(f"[aiovmm: console output over {rate.rate} bytes/s "
                                   f"discarded ({rate.dropped} bytes so far)]".encode())
        if not data:
            return
        raw = data
        data = _console.text(data)
        self.console += data
        if len(self.console) > 2 * CONSOLE_KEEP_BYTES:       # a guest may print forever
            del self.console[:len(self.console) - CONSOLE_KEEP_BYTES]
        if hypercall:
            for raw in self._console_io_linebuf.feed(data):
                guest_log.warning("(d%d) %s", self.domid, raw.decode("ascii", "replace"))
        else:
            if self.console_log is not None:
                self.console_log.append(data)
            if self._console_cb:
                self._console_cb(raw if self.console_raw else data)
        for raw in self._console_linebuf.feed(data):
            self._console_line_out(raw)
        self._line_waiters = [(p, f) for p, f in self._line_waiters if not f.done()]

    def _console_line_out(self, raw: bytes) -> None:
        line = raw.decode("ascii", "replace")
        lines = self.console_lines
        lines.append(line)
        self._console_lines_bytes += len(raw)
        if len(lines) > 2 * CONSOLE_KEEP_LINES or self._console_lines_bytes > 2 * CONSOLE_KEEP_BYTES:
            # Trimmed in chunks, down to both limits.
            cut, size = 0, self._console_lines_bytes
            while cut < len(lines) and (len(lines) - cut > CONSOLE_KEEP_LINES
                                        or size > CONSOLE_KEEP_BYTES):
                size -= len(lines[cut])
                cut += 1
            del lines[:cut]
            self._console_lines_bytes = size
        log.debug("d%d console: %s", self.domid, line)
        for pat, fut in self._line_waiters:
            if not fut.done() and pat.search(line):
                fut.set_result(line)

    async def wait_for_line(self, pattern: str, timeout: float = 30.0) -> str:
        """Wait until a console line matches `pattern` (regex); earlier lines count too."""
        pat = re.compile(pattern)
        for line in self.console_lines:
            if pat.search(line):
                return line
        fut = asyncio.get_running_loop().create_future()
        self._line_waiters.append((pat, fut))
        async with asyncio.timeout(timeout):
            done, _ = await asyncio.wait([fut, self.done], return_when=asyncio.FIRST_COMPLETED)
        if fut.done():
            return fut.result()
        fut.cancel()
        raise LookupError(f"d{self.domid} ended ({self.describe_end()}) before a line matched {pattern!r}")

    def drain_backends(self) -> None:
        """A vCPU of this domain ended a slice (blocked, yielded, polled, was preempted or ran
        out of time). Its frontends can only have produced ring requests inside slices, so a
        backend in `yield_drains` that takes them here needs no notification from the guest
        (one hypercall exit and a loop hop per request on KVM; issue 14). A failing pass is
        this device's bug, not the vCPU's: logged with its traceback, the pass dropped (the
        device then waits for notifications again only if it re-arms; its own task reports)."""
        for fn in list(self.yield_drains):
            try:
                fn()
            except Exception:                # deliberate boundary: one device, not the domain
                log.exception("d%d: backend pass at a slice end failed; dropped", self.domid)
                if fn in self.yield_drains:
                    self.yield_drains.remove(fn)

    # -- lifecycle ----------------------------------------------------------------------------------
    def pause(self) -> None:
        """Stop scheduling the vCPUs (xl pause). Called on the loop, so no slice is running:
        every vCPU task waits at the top of its run loop until unpause(). Timers still fire
        and leave events pending, delivered after unpause as on Xen."""
        if not self.dying:
            self.paused = True
            for v in self.vcpus:
                v.engine.quiesce()          # a vCPU running on its engine's own thread
            log.info("d%d (%s): paused", self.domid, self.name)

    def unpause(self) -> None:
        if self.paused and self.suspended is None:
            self.paused = False
            log.info("d%d (%s): unpaused", self.domid, self.name)
            for v in self.vcpus:
                v.wake()

    def set_sched(self, weight: int | None = None, cap: int | None = None) -> DomainSched:
        """xl sched-credit -w/-c: weight (1..65535, default 256) and cap (percent of one CPU,
        0 = none), effective from the next slice. ValueError when out of range."""
        return self.hypervisor.scheduler.set_params(self, weight, cap)

    def set_io_limit(self, device: str | int, limit: "Limit | None") -> None:
        """Set or lift (None) the token-bucket limit of a vif (its devid: 0, "0", "vif0")
        or a vbd (its vdev: "xvda") at run time (aiovmm/ratelimit.py)."""
        for b in self.backends:
            if hasattr(b, "set_rate") and str(device) in (str(b.devid), f"vif{b.devid}"):
                b.set_rate(limit)
                return
            if hasattr(b, "set_limit") and device == getattr(b, "vdev", None):
                b.set_limit(limit)
                return
        raise LookupError(f"d{self.domid} has no vif or vbd {device!r}")

    def shutdown(self, reason: ShutdownReason | int = ShutdownReason.poweroff) -> None:
        """Stop the domain with a reason (the toolstack's `destroy` is poweroff)."""
        if self.dying:
            return
        reason = ShutdownReason(reason)
        self.shutdown_reason = reason
        if reason != ShutdownReason.crash:
            log.info("d%d (%s): shutdown: %s", self.domid, self.name, reason.name)
        for v in self.vcpus:
            v.stop_timers()
            v.wake()
        self._console_end()
        if not self.done.done():
            self.done.set_result(reason)

    def _console_end(self) -> None:
        """The guest's last output, taken in before anyone waiting for the domain's end is
        told: what is still in the xencons ring (the backend reads it only between slices,
        and the slice that shut down may have written after its last read; on this loop no
        vCPU of the domain runs now, so the ring holds all it wrote) and an unfinished last
        line. Without this, done resolved first and a waiter could find the last lines
        missing from console_lines (tests/test_console_last_words.py)."""
        if self.console_backend is not None:
            self.console_backend.drain_final()
        if (raw := self._console_io_linebuf.flush()) is not None:
            guest_log.warning("(d%d) %s", self.domid, raw.decode("ascii", "replace"))
        if (raw := self._console_linebuf.flush()) is not None:
            self._console_line_out(raw)

    def crash(self, why: str) -> None:
        if self.dying:
            return
        self.crash_reason = why
        log.error("d%d (%s) crashed: %s", self.domid, self.name, why)
        self.shutdown(ShutdownReason.crash)

    def describe_end(self) -> str:
        if self.shutdown_reason is None:
            return "running"
        if self.shutdown_reason == ShutdownReason.crash:
            return f"crashed: {self.crash_reason}" if self.crash_reason else "crashed (guest request)"
        return self.shutdown_reason.name

    async def save(self, path: str, *, checkpoint: bool = False, progress=None,
                   abort: asyncio.Event | None = None):
        """Suspend the guest (Xen's cooperative protocol) and write it to `path` as xl's
        save file (migration stream v2). The domain is destroyed afterwards, as by
        `xl save`, unless `checkpoint` (then it resumes: a cancelled suspend). `abort`
        set before the file is complete fails the save; the guest resumes (save_file)."""
        from . import migration
        await migration.load("files")         # scapy's first import: off the loop
        from .migration.files import save_file
        return await save_file(self, path, checkpoint=checkpoint, progress=progress, abort=abort)

    async def wait(self) -> ShutdownReason:
        """The domain's end; by then all its console output is in console/console_lines
        (shutdown: _console_end) and in its log file."""
        reason = await asyncio.shield(self.done)
        if self.console_log is not None:
            await self.console_log.flush()
        return reason

    # The steps of this domain's teardown in progress (destroy, destroy_preemptible): one
    # generator that every caller drives, so a destroy racing another one finishes it.
    _release: "Iterator[None] | None" = None

    def destroy(self) -> None:
        """Release everything: engines, host mappings, grant mappings, page tables, frames.
        Idempotent. Order as Xen's domain_relinquish_resources: this domain's mappings of
        other domains' grants go first (their references are the grant table's), then its
        own page tables release every reference they hold, then its frames are freed except
        those another domain still maps through one of its grants (from the active records):
        those stay allocated, owned by Xen, until the grantee's last unmap frees them.
        A host backend (blkback, netback) is such a grantee too: its mappings are not closed
        here (an I/O in flight may still write through one), they keep their frames until
        the backend closes them (grants.HostMapping.close frees the orphan)."""
        for _ in self._release_steps():
            pass

    async def destroy_preemptible(self, slice_s: float = DESTROY_SLICE_S) -> None:
        """destroy(), letting the loop run after every `slice_s` of work (Xen makes
        domain_relinquish_resources preemptible): freeing a 256 MiB guest is 0.3-1.3 s of
        Python in which every other guest would stand still. No frame is freed before it
        is fully released (see _release_steps), so the pauses are safe for other domains'
        creates, destroys and migrations. Cancelled, it finishes the teardown at once."""
        steps = self._release_steps()
        t = time.perf_counter()
        try:
            for _ in steps:
                if time.perf_counter() - t >= slice_s:
                    await asyncio.sleep(0)
                    t = time.perf_counter()
        except asyncio.CancelledError:
            for _ in steps:
                pass
            raise

    def _release_steps(self) -> "Iterator[None]":
        if self._release is None:
            self._release = self._release_gen()
        return self._release

    def _release_gen(self) -> "Iterator[None]":
        """The teardown as steps of bounded work. Everything up to the page tables' teardown
        is done in the first step: grants, event channels and vCPUs go at once, so nothing
        of the domain runs or is reachable by a new grant operation while it yields. Then
        its tables drop their references (frames stay owned by it, out of the free list),
        then the frames nobody else holds are freed in chunks (zeroed by MADV_REMOVE)."""
        if self.destroyed:
            return
        for v in self.vcpus:
            v.engine.quiesce()          # none runs on an engine thread while it goes
        self.destroyed = True
        from . import descriptors, grants, physdev, vcpu_op
        grants.release_all(self)
        physdev.release(self)
        # Close every port: interdomain peers (guests or host backends) go back to unbound,
        # as on Xen when a domain dies.
        try:
            self.evtchn.reset()
        except Exception:
            log.exception("d%d: closing event channels", self.domid)
        # The vCPUs' references go as in Xen's PROGRESS(vcpu_pagetables): GDT/LDT frames and
        # the vcpu_info frame here (their run loop may never have started, or ended), the
        # roots' table references first thing in the tables' teardown.
        roots: list[int] = []
        for v in self.vcpus:
            v.stop_timers()
            descriptors.release(v)
            vcpu_op.release(v)
            v.engine.close()
            roots += [r for r in (v.kernel_root, v.user_root) if r]
            v.kernel_root = v.user_root = 0
        self.vcpus = []
        if self.frames:
            mem = self.mem
            hv = self.hypervisor
            mem.forget_released(self.frames)    # freed or orphaned below with the rest
            # Xen's own pages of the domain (PROGRESS(xen), before its tables): their
            # lifetime writable reference, or an orphaned one would never be freed.
            for mfn in self.shared_frames:
                mem.put_writable(mfn)
            yield from hv.pagetables.teardown_domain_steps(self.domid, self.frames, roots)
            held = grants.held_by_others(self)
            stray = {f for f in self.frames if mem.refs[f] and f not in held}
            if stray:
                log.error("d%d: frames %s still referenced after teardown; kept, not freed",
                          self.domid, sorted(stray)[:8])
                held |= stray
            for mfn in held:
                mem.owner[mfn] = grants.ORPHAN_OWNER
                hv.orphan_frames[mfn] = self.domid
            self.frames.difference_update(held)     # Xen's now, no longer this domain's
            hv.orphan_host_maps.update(self.host_mappings)
            yield
            # Freed frames may go to another domain at the next turn: out of this one's set.
            for freed in mem.release_domain_steps(self.domid, [f for f in self.frames if f not in held]):
                self.frames.difference_update(freed)
                yield
            self.frames = set()
