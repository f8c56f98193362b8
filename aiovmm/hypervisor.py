"""The hypervisor as a library: `async with Hypervisor() as hv: dom = await hv.create(...)`.

Owns machine memory, Xen's area, the page-table bookkeeping, the scheduler and every domain.
Each domain runs as one task in the hypervisor's TaskGroup (its vCPUs in a nested
TaskGroup), so nothing outlives `async with`: leaving it destroys all domains.
"""
from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from typing import TYPE_CHECKING, Callable

from . import builder, descriptors, timers, toolstack
from .xenstore.server import XenstoreServer
from .clock import SystemClock
from .abi import DOMID_XEN, FLAT_KERNEL_SS, PAGE_SHIFT, ElfNote, ShutdownReason
from .domain import Domain
from .events import HostEvents
from .errors import BuildError
from .memory import MachineMemory, OutOfMemory
from .mmu import PageTables, XenArea
from .scheduler import Scheduler
from .vcpu import VCPU
from .vcpu_engine import VCPUEngine
from .memory import PageType

if TYPE_CHECKING:
    from .backends.block import DiskConfig
    from .backends.net import VifConfig

log = logging.getLogger("aiovmm.hypervisor")

DEFAULT_MACHINE_MIB = 2048


class HostConfigError(BuildError):
    """The hypervisor's own settings cannot be used on this host (machine memory, log
    directory, xenstore socket path): one line naming the setting, nothing left behind."""


def _check_log_dir(path: str) -> None:
    """Blocking (stat, access): the console logs go there, so refuse it up front."""
    if not os.path.isdir(path):
        raise HostConfigError(f"log directory {path}: "
                              + ("not a directory" if os.path.exists(path) else "does not exist"))
    if not os.access(path, os.W_OK | os.X_OK):
        raise HostConfigError(f"log directory {path}: not writable")


# libxenguest's limit on a kernel image (XC_DOM_DECOMPRESS_MAX, 1 GiB, from XSA-25). Not the
# guest's memory: an ELF with debug info may be larger than the memory its loaded parts need.
MAX_KERNEL_BYTES = 1 << 30


def _check_file(path: str, what: str, limit: int, limit_text: str) -> None:
    """Blocking: refuse what is not a regular file (a device, a FIFO: /dev/zero would be read
    without end) or is larger than `limit` bytes."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise BuildError(f"{path}: cannot read {what}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BuildError(f"{path}: cannot read {what}: not a regular file")
    if st.st_size > limit:
        raise BuildError(f"{path}: {what} file is {st.st_size} bytes, more than {limit_text}")


def _load_kernel(path: str) -> builder.KernelImage:
    _check_file(path, "kernel", MAX_KERNEL_BYTES, f"{MAX_KERNEL_BYTES >> 20} MiB")
    return builder.parse_kernel(path)


def _load_ramdisk(path: str, memory_mib: int) -> bytes:
    _check_file(path, "ramdisk", memory_mib << 20, f"the guest's {memory_mib} MiB of memory")
    return builder.read_ramdisk(path)


def _load_image(kernel: str, ramdisk: str | None, memory_mib: int) -> tuple[builder.KernelImage, bytes | None]:
    """Blocking (a worker thread's): the parsed kernel and the ramdisk's bytes."""
    img = _load_kernel(kernel)
    return img, (_load_ramdisk(ramdisk, memory_mib) if ramdisk else None)


def _retrieve(fut: "asyncio.Future") -> None:
    """Done callback of the image load: create() reports its exception when it waits for it;
    one nobody waits for any more (create failed or was cancelled) is not an error."""
    if not fut.cancelled():
        fut.exception()


# An image up to this size (kernel segments plus ramdisk) is copied into the new domain's
# frames on the loop (pwrite on the memfd: ~0.1 ms per MiB): a worker thread's hand-off costs
# more wall time than that on a loaded host. Larger ones (Linux: tens of MB) in a thread.
_COPY_ON_LOOP_MAX = 1 << 20


def _hypercall_page(engine_kind: str) -> bytes:
    """The hypercall page the builder writes: each engine exits its own cheapest way."""
    if engine_kind == "kvm":
        from .kvm_engine import hypercall_page
        return hypercall_page()
    return builder.hypercall_page()


class Hypervisor:
    def __init__(self, memory_mib: int = DEFAULT_MACHINE_MIB, scheduler: Scheduler | None = None,
                 log_dir: str | None = None, xenstore_path: str | None = None,
                 vif_prefix: str = "vif", engine: str = "auto", netns: str | None = None) -> None:
        """`xenstore_path`: also serve xenstore to host tools on this unix socket (Debian's
        xenstore-utils find it through XENSTORED_PATH). `engine`: the default vCPU engine
        of new domains, "unicorn", "kvm" or "auto" (kvm_engine.choose_engine). `netns`:
        the network namespace of this host's bridges, where the taps of guests restored
        or migrated in are created (None: the hypervisor's own)."""
        self.netns = netns
        self.memory_mib = memory_mib
        self.log_dir = log_dir
        self.xenstore_path = xenstore_path
        self.vif_prefix = vif_prefix      # tap names: <prefix><domid>.<devid>
        self.scheduler = scheduler or Scheduler()
        from .kvm_engine import choose_engine
        self.engine = choose_engine(engine)
        self.domains: dict[int, Domain] = {}
        # Granted frames of dead domains still mapped by a grantee -> the dead granter's domid.
        self.orphan_frames: dict[int, int] = {}
        # Host backends' mappings (grants.HostMapping) of dead domains' grants, until closed.
        self.orphan_host_maps: set = set()
        self.disks_in_use: dict = {}            # disk source identity -> {(domid, access)}
        self._next_domid = 1
        self._t0 = time.monotonic_ns()
        self.boot_unix_ns = time.time_ns() - (time.monotonic_ns() - self._t0)
        # Xen system time (ns since this hypervisor started), callable; also the guest TSC.
        self.system_time_ns = SystemClock(self._t0)
        self._tg: asyncio.TaskGroup | None = None

    async def __aenter__(self) -> "Hypervisor":
        """Raises HostConfigError (a BuildError) for settings this host cannot honour."""
        if self.log_dir is not None:
            await asyncio.to_thread(_check_log_dir, self.log_dir)
        try:
            self.mem = MachineMemory(self.memory_mib << 20)
        except (OSError, ValueError, OverflowError) as e:
            raise HostConfigError(f"cannot reserve {self.memory_mib} MiB of machine memory: "
                                  f"{getattr(e, 'strerror', None) or e}") from None
        try:
            self.xen = XenArea(self.mem)
            self.pagetables = PageTables(self.mem, self.xen, crash_domain=self._crash_domain)
            self.ptwr_scratch = self.mem.alloc(DOMID_XEN)[0]     # see ptwr.py
            descriptors.area_of(self.xen)      # GDT/LDT windows: Xen's own frames, made once
            self.host = HostEvents(self)
            self.host.evtchn = self.host
            self.host.grants = None
            self.xenstore = XenstoreServer(self.xenstore_path)
            try:
                await self.xenstore.__aenter__()
            except OSError as e:
                raise HostConfigError(f"xenstore socket {self.xenstore_path}: {e.strerror or e}") from None
        except BaseException:
            self.mem.close()
            raise
        if self.engine == "kvm":
            from .kvm_engine import vm_pool
            vm_pool(self.mem)                   # KVM VMs made ahead, in a worker thread
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, et, exc, tb) -> None:
        """Shut every domain down and wait for their tasks. An exception from the body of
        `async with` propagates as itself (not wrapped in an ExceptionGroup)."""
        for dom in list(self.domains.values()):
            if not dom.dying:
                dom.shutdown(ShutdownReason.poweroff)
        try:
            if et is not None and not issubclass(et, asyncio.CancelledError):
                await self._tg.__aexit__(None, None, None)
            else:
                await self._tg.__aexit__(et, exc, tb)
        finally:
            for dom in list(self.domains.values()):
                try:
                    dom.destroy()
                except Exception:         # deliberate per-domain crash boundary
                    log.exception("d%d: destroy failed", dom.domid)
            self.domains.clear()
            self.scheduler.close()
            await self.xenstore.aclose()
            from .kvm_engine import close_vm_pool
            await close_vm_pool(self.mem)
            self.mem.close()

    def _crash_domain(self, domid: int, why: str) -> None:
        """PageTables' crash hook (an implicit unmap of a granted PTE): the domain stops at
        once, its vCPUs do not return into the guest."""
        dom = self.domains.get(domid)
        if dom is not None:
            dom.crash(why)
            for v in dom.vcpus:
                v.engine.stop()

    def domain(self, domid: int):
        """A guest domain, or the host's event-channel endpoint table for domid 0."""
        if domid == 0:
            return self.host
        return self.domains.get(domid)

    async def create(self, kernel: str, *, memory_mib: int = 32, cmdline: str = "",
                     name: str | None = None, ramdisk: str | None = None,
                     on_console: Callable[[bytes], None] | None = None,
                     vifs: "list[VifConfig | str] | None" = None,
                     disks: "list[DiskConfig | str] | None" = None,
                     engine: str | None = None, max_memory_mib: int | None = None,
                     vcpus: int = 1, console_raw: bool = False) -> Domain:
        """Build a domain from a Xen PV kernel and start it. Raises BuildError.

        `vifs`: network interfaces, each a VifConfig or xl syntax 'mac=...,bridge=...'.
        `disks`: block devices, each a DiskConfig or xl syntax 'target=/path,vdev=xvda,access=rw'.
        `ramdisk`: a file loaded after the kernel and announced in start_info (mod_start/mod_len).
        `engine`: "unicorn", "kvm" or "auto" for this domain (default: the hypervisor's).
        `max_memory_mib`: xl's maxmem: the domain's maximum reservation (its balloon may grow
        to it); `memory_mib` is what is populated at boot (start_info nr_pages).
        `vcpus`: 1..vcpu_op.MAX_VCPUS; vCPU 0 starts, the others wait down until the guest
        initialises and raises them (VCPUOP_initialise, VCPUOP_up), as on Xen.
        `console_raw`: `on_console` gets the guest's console bytes unfiltered (for a terminal
        that filters them itself, console.TerminalFilter); by default text (console.text)."""
        from .kvm_engine import choose_engine
        engine_kind = choose_engine(engine) if engine else self.engine
        from .backends.net import VifConfig
        from .backends.net.tap import TapError, check_bridge
        vif_cfgs = []
        for v in vifs or []:
            try:
                cfg = v if isinstance(v, VifConfig) else VifConfig.parse(v)
                # Its namespace and bridge must exist now (never created for it): a missing
                # one is the user's error, reported before anything is built.
                await asyncio.to_thread(check_bridge, cfg.bridge, cfg.netns)
                vif_cfgs.append(cfg)
            except (ValueError, TapError) as e:
                raise BuildError(f"vif {v!r}: {e}") from None
        disk_cfgs = []
        if disks:
            from .backends.block import DiskConfig
            for d in disks:
                try:
                    cfg = d if isinstance(d, DiskConfig) else DiskConfig.parse(d)
                    await asyncio.to_thread(cfg.check, {k: set(v) for k, v in self.disks_in_use.items()})
                    disk_cfgs.append(cfg)
                except ValueError as e:
                    raise BuildError(f"disk {d!r}: {e}") from None
        if memory_mib < 1:
            raise BuildError("memory must be at least 1 MiB")
        if max_memory_mib is not None and not memory_mib <= max_memory_mib <= self.memory_mib:
            raise BuildError(f"maxmem {max_memory_mib} MiB must be at least memory ({memory_mib} MiB) "
                             f"and at most the host's {self.memory_mib} MiB")
        from .vcpu_op import MAX_VCPUS, create_secondary
        if not isinstance(vcpus, int) or not 1 <= vcpus <= MAX_VCPUS:
            raise BuildError(f"vcpus must be 1..{MAX_VCPUS}")
        # Reading the kernel file (and, below, probing disk sources with stat/ioctl/lvm) is
        # blocking I/O: it runs in a worker thread, never on the loop; kernel and ramdisk in
        # one job (one hand-off), submitted at the first await below, after the domain is
        # built (frames, event channels, grant table: none of it needs the image).
        # Submitting it before the build (run_in_executor), to overlap the two, measured no
        # better (30 + 30 interleaved boots, twice, load 10): the woken worker preempts the
        # build instead. The hand-off itself is ~2-5 ms of wall time at load 10.
        load = asyncio.ensure_future(asyncio.to_thread(_load_image, kernel, ramdisk, memory_mib))
        load.add_done_callback(_retrieve)       # left behind by a failed or cancelled create
        domid = self._next_domid
        nr_pages = memory_mib << 20 >> PAGE_SHIFT
        try:
            dom = Domain(self, domid, name or f"dom{domid}", nr_pages, on_console, log_dir=self.log_dir,
                         console_raw=console_raw)
        except OutOfMemory as e:
            await asyncio.wait({load})
            load.result()                       # a kernel the load refused is reported first
            raise BuildError(f"not enough machine memory for {memory_mib} MiB: {e}") from None
        dom.engine_kind = engine_kind
        if max_memory_mib is not None:
            dom.max_pages = dom.memmap_pages = max_memory_mib << 20 >> PAGE_SHIFT
        self._next_domid += 1
        self.domains[domid] = dom
        try:
            img, rd = await asyncio.shield(load)
            dom.suspend_cancel = bool(img.notes.get(ElfNote.SUSPEND_CANCEL, 0))
            log.info("d%d: vCPU engine %s", domid, engine_kind)
            if engine_kind == "kvm":            # Xen-area pages KVM needs, before any L4 is validated
                from .kvm_engine import ring0
                ring0(self.xen)
            lay = builder.plan(dom, img, cmdline, rd)
            if builder.image_bytes(img, rd) <= _COPY_ON_LOOP_MAX:
                builder.copy_image(dom, img, lay, rd)
            else:
                # The image copy (tens of MB for Linux) runs in a worker thread; if create()
                # is cancelled meanwhile, the copy is waited for before the frames are freed.
                copy = asyncio.ensure_future(asyncio.to_thread(builder.copy_image, dom, img, lay, rd))
                try:
                    await asyncio.shield(copy)
                except asyncio.CancelledError:
                    await asyncio.wait({copy})
                    raise
            builder.finish(dom, img, lay, cmdline, rd, hcall_page=_hypercall_page(engine_kind))
            dom.start_info_pfn = lay.start_info_pfn     # where save/migration find the P2M list
            self._create_vcpu0(dom, img, lay)
            for i in range(1, vcpus):
                create_secondary(dom, i)
            toolstack.introduce(self, dom)
            from .backends.net import Netback
            for devid, cfg in enumerate(vif_cfgs):
                nb = Netback(dom, devid, cfg, ifname_prefix=self.vif_prefix)
                nb.publish()
                dom.backends.append(nb)
            if disk_cfgs:
                from .backends.block import Blkback
                for devid, cfg in enumerate(disk_cfgs):
                    bb = Blkback(dom, devid, cfg)
                    bb.publish()
                    await bb.claim(self.disks_in_use)
                    dom.backends.append(bb)
        except BaseException:
            self._release_disks(dom)
            toolstack.release(self, dom)
            dom.destroy()
            del self.domains[domid]
            raise
        self.start_domain(dom)
        return dom

    def start_backend(self, dom: Domain, backend) -> asyncio.Task:
        """Hot-plug: run a device backend of a running domain in that domain's TaskGroup
        (it is cancelled with the domain like the backends given to create())."""
        if dom.device_tg is None or dom.dying:
            raise BuildError(f"d{dom.domid} is not running")
        task = dom.device_tg.create_task(self._run_backend(dom, backend),
                                         name=f"d{dom.domid}-{type(backend).__name__}-{backend.devid}")
        dom.backend_tasks.append(task)
        return task

    def new_engine(self, dom: Domain, vcpu_id: int):
        """A vCPU engine of the domain's kind (the builder and restore both use it)."""
        if dom.engine_kind == "kvm":
            from .kvm_engine import KVMEngine
            return KVMEngine(self.mem, self.xen, name=f"d{dom.domid}v{vcpu_id}")
        return VCPUEngine(self.mem.fd_address, self.mem.size, until=self.xen.UNTIL_VA,
                          name=f"d{dom.domid}v{vcpu_id}", mem=self.mem)

    def start_domain(self, dom: Domain) -> None:
        """Run a built (or restored) domain as a task of the hypervisor's TaskGroup."""
        dom.task = self._tg.create_task(self._run_domain(dom), name=f"d{dom.domid}")

    async def restore(self, path: str, *, name: str | None = None,
                      on_console: Callable[[bytes], None] | None = None, progress=None) -> Domain:
        """A domain from a save file (`Domain.save`); raises migration.StreamError for a
        file it refuses (nothing is left behind)."""
        from . import migration
        await migration.load("files")         # scapy's first import: off the loop
        from .migration.files import restore_file
        dom, _stats = await restore_file(self, path, name=name, on_console=on_console,
                                         progress=progress)
        return dom

    def _create_vcpu0(self, dom: Domain, img: builder.KernelImage, lay: builder.Layout) -> None:
        eng = self.new_engine(dom, 0)
        v = VCPU(dom, 0, eng)
        eng.kernel_mode = lambda: v.kernel_mode
        dom.vcpus.append(v)
        # CR3 reference on the root, as Xen's new_guest_cr3 takes one.
        self.pagetables.get_type(dom.boot_l4, PageType.l4, dom.domid)
        v.kernel_root = dom.boot_l4
        eng.setup_long_mode(dom.boot_l4 << PAGE_SHIFT, self.xen.GDT_VA, self.xen.GDT_LIMIT)
        stack_top = lay.va(lay.stack_pfn + 1)
        v.kernel_sp, v.kernel_ss = stack_top, FLAT_KERNEL_SS
        eng.start_in_stub(self.xen.STUB_VA, self.xen.STUB_STACK_TOP,
                          {"rsi": lay.va(lay.start_info_pfn)}, img.entry, stack_top, 0x200)
        timers.write_pvclock(v)
        timers.write_wallclock(dom)

    def _release_disks(self, dom: Domain) -> None:
        if not dom.backends:
            return                  # and no first import of blkback on the loop (0.1-0.2 s)
        from .backends.block import Blkback
        for b in dom.backends:
            if isinstance(b, Blkback):
                b.release(self.disks_in_use)

    @staticmethod
    async def _run_backend(dom: Domain, backend) -> None:
        """A device backend failing (tap cannot be created, frontend misbehaves) stops that
        device only; the domain and the other devices carry on."""
        try:
            await backend.run()
        except Exception as e:
            log.error("d%d: device %s stopped: %s", dom.domid, getattr(backend, "ifname", backend), e)

    async def _run_domain(self, dom: Domain) -> None:
        """The domain's lifetime: its vCPUs and backends in one TaskGroup; backends are
        cancelled once every vCPU has stopped."""
        from .backends.console import ConsoleBackend
        try:
            for v in dom.vcpus:
                if v.online:            # the others' when they come up (vcpu_op.bring_up)
                    timers.set_periodic(v, timers.DEFAULT_PERIOD_NS)
            dom.console_backend = ConsoleBackend(dom)
            async with asyncio.TaskGroup() as tg:
                dom.device_tg = tg
                backend_tasks = dom.backend_tasks
                backend_tasks += [tg.create_task(dom.console_backend.run(), name=f"d{dom.domid}-console"),
                                 tg.create_task(toolstack.serve_store_ring(self, dom), name=f"d{dom.domid}-store")]
                if dom.console_log is not None:
                    tg.create_task(dom.console_log.run(), name=f"d{dom.domid}-log")
                for b in dom.backends:
                    backend_tasks.append(tg.create_task(self._run_backend(dom, b), name=f"d{dom.domid}-{type(b).__name__}-{b.devid}"))
                vcpu_tasks = [tg.create_task(v.run(), name=repr(v)) for v in dom.vcpus]
                await asyncio.gather(*vcpu_tasks)
                dom.device_tg = None
                dom.console_backend.drain_final()
                for t in backend_tasks:
                    t.cancel()
                if dom.console_log is not None:
                    dom.console_log.close()
        except Exception as e:                 # a hypervisor bug: contain it to this domain
            log.exception("d%d: hypervisor error", dom.domid)
            dom.crash(f"hypervisor error: {e!r}")
        finally:
            if not dom.dying:
                dom.crash("all vCPUs stopped")
            try:
                await self._teardown(dom)
            finally:
                self.domains.pop(dom.domid, None)

    async def _teardown(self, dom: Domain) -> None:
        """Release a domain's toolstack state, disks and resources. A failure in one step is
        a hypervisor bug confined to this domain (logged with its traceback; the other steps
        still run): it never reaches the TaskGroup and the other domains. The resources go
        in slices (destroy_preemptible): the other guests keep running meanwhile."""
        for what, step in (("toolstack", lambda: toolstack.release(self, dom)),
                           ("disks", lambda: self._release_disks(dom))):
            try:
                step()
            except Exception:             # deliberate per-domain crash boundary
                log.exception("d%d: teardown (%s) failed", dom.domid, what)
        try:
            await dom.destroy_preemptible()
        except Exception:                 # deliberate per-domain crash boundary
            log.exception("d%d: teardown (destroy) failed", dom.domid)
