"""`aiovmm serve`: one Hypervisor and the toolstack state around it (the Controller).

The Controller is what xl+libxl are on Xen: it keeps each domain's configuration (for
reboot), applies xl's semantics (names are unique, on_reboot=restart, on_poweroff and
on_crash=destroy), writes the toolstack's xenstore keys (memory/target, control/shutdown)
and hot-plugs devices. Everything runs on the daemon's event loop; the HTTP layer (api.py)
only translates requests into these calls and ControlError into 4xx answers.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import platform
import signal
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any, Callable

from ..abi import ShutdownReason
from ..domain import valid_name
from ..errors import BuildError
from ..hostfile import unlink_stale_socket
from ..hypervisor import Hypervisor
from ..xenbus import XenbusState, read_int, read_state, read_str, wait_for_state
from ..xenstore.core import XsError
from .client import DEFAULT_SOCKET, split_host_port
from .metrics import LoopLag, MeteredScheduler

if TYPE_CHECKING:
    from ..domain import Domain

log = logging.getLogger("aiovmm.control")

DMESG_LINES = 2000
CONSOLE_REPLAY_BYTES = 64 << 10      # history a console client gets on attach
CONSOLE_QUEUE_MAX = 4096             # output chunks queued for one console client
CONSOLE_INPUT_MAX = 64 << 10         # host input queued for a guest not reading it (a pty holds ~4 KiB)
SHUTDOWN_WAIT_S = 60.0
DETACH_WAIT_S = 3.0
API_IDLE_S = 30.0                   # a client sends its (next) request within this, or is closed
TCP_MAX_CONNECTIONS = 64            # TCP API connections at once (TLS handshakes included)
TCP_HANDSHAKE_S = 10.0              # a TLS handshake on the TCP API
MAX_DEVICES = 16                    # vifs, and vbds, per domain (hot-plug included)


class ControlError(Exception):
    """A request the toolstack refuses: one clear message and an HTTP status (4xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def not_found(ref: str) -> ControlError:
    return ControlError(404, f"no domain {ref!r}")


@dataclasses.dataclass
class DomainSpec:
    """What a domain was created from: xl's config, kept for reboot and `list -l`."""
    kernel: str
    memory: int = 32
    name: str | None = None
    cmdline: str = ""
    ramdisk: str | None = None          # xl.cfg ramdisk= (Linux's initramfs)
    maxmem: int | None = None           # xl.cfg maxmem= (MiB): the balloon's ceiling
    vif: list[str] = dataclasses.field(default_factory=list)
    disk: list[str] = dataclasses.field(default_factory=list)
    on_reboot: str = "restart"
    weight: int | None = None           # xl.cfg weight= / cap= (credit scheduler)
    cap: int | None = None
    vcpus: int = 1                      # xl.cfg vcpus=


@dataclasses.dataclass
class Record:
    spec: DomainSpec
    dom: "Domain"
    weight: int = 256
    cap: int = 0
    subscribers: set = dataclasses.field(default_factory=set)   # console queues
    hotplug: dict = dataclasses.field(default_factory=dict)     # (kind, devid) -> task


def _console_sink(holder: list[Record]) -> Callable[[bytes], None]:
    """A domain's console callback for the daemon: output goes to every console client of
    the record in `holder` (appended once the domain exists; output before that has no
    client yet), unfiltered (the domain's console_raw): each client's WebSocket filters it
    for its use (api.console_ws). A client that does not read (or reads slower than the guest prints) loses
    output rather than growing the daemon's memory."""
    def console(data: bytes) -> None:
        if holder:
            for q in list(holder[0].subscribers):
                if q.qsize() < CONSOLE_QUEUE_MAX:
                    q.put_nowait(data)
    return console


class DmesgHandler(logging.Handler):
    """The hypervisor's own log as `xl dmesg` shows Xen's console ring."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=DMESG_LINES)
        self.setFormatter(logging.Formatter("(XEN) [%(asctime)s] %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except (ValueError, TypeError):
            self.handleError(record)


DEFAULT_SAVE_DIR = "/var/lib/aiovmm/save"


class Controller:
    def __init__(self, hv: Hypervisor, scheduler: MeteredScheduler, dmesg: DmesgHandler) -> None:
        self.hv = hv
        self.sched = scheduler
        self.dmesg = dmesg
        self.records: dict[int, Record] = {}
        self.names: set[str] = set()         # taken, including domains being built
        self.lag = LoopLag()
        self.started = time.time()
        self._tg: asyncio.TaskGroup | None = None
        self.save_dir = DEFAULT_SAVE_DIR
        self.migration_secret: bytes | None = None
        self.progress: dict[int, dict] = {}     # domid -> save/migrate progress (GET .../progress)

    # -- lookup -------------------------------------------------------------------------------
    def lookup(self, ref: str) -> Record:
        """A domain by id or by name (xl accepts either). An id is ASCII digits, and not
        thousands of them (int() refuses over 4300: a 500 for a long URL)."""
        if ref.isascii() and ref.isdigit() and len(ref) <= 10:
            rec = self.records.get(int(ref))
            if rec is not None:
                return rec
        for rec in self.records.values():
            if rec.dom.name == ref:
                return rec
        raise not_found(ref)

    def live(self, ref: str) -> Record:
        rec = self.lookup(ref)
        if rec.dom.dying:
            raise ControlError(409, f"d{rec.dom.domid} ({rec.dom.name}) is shutting down")
        return rec

    # -- creation -----------------------------------------------------------------------------
    def spec_from_config(self, text: str, path: str | None) -> DomainSpec:
        from ..config import ConfigError, parse
        try:
            cfg = parse(text, path or "<config>")
        except ConfigError as e:
            raise ControlError(400, str(e)) from None
        return DomainSpec(kernel=cfg.kernel, memory=cfg.memory, name=cfg.name, cmdline=cfg.cmdline,
                          ramdisk=cfg.ramdisk, maxmem=cfg.maxmem, vif=list(cfg.vif), disk=list(cfg.disk), weight=cfg.weight, cap=cfg.cap,
                          vcpus=cfg.vcpus, on_reboot=cfg.on_reboot)

    async def create(self, spec: DomainSpec) -> Record:
        """Build and start a domain, or refuse with nothing left behind."""
        if spec.memory < 1:
            raise ControlError(400, "memory must be at least 1 MiB")
        if spec.memory > self.hv.memory_mib:
            raise ControlError(400, f"memory {spec.memory} MiB is more than the host's {self.hv.memory_mib} MiB")
        free_mib = self.hv.mem.free_frames >> 8
        if spec.memory > free_mib:
            raise ControlError(409, f"not enough free memory for {spec.memory} MiB ({free_mib} MiB free)")
        if spec.name is not None:
            if not valid_name(spec.name):
                raise ControlError(400, f"invalid domain name {spec.name!r}")
            if spec.name in self.names:
                raise ControlError(409, f"a domain named {spec.name!r} already exists")
            self.names.add(spec.name)      # reserved before the first await: no race
        holder: list[Record] = []
        console = _console_sink(holder)
        try:
            dom = await self.hv.create(spec.kernel, memory_mib=spec.memory, cmdline=spec.cmdline,
                                       name=spec.name, ramdisk=spec.ramdisk, max_memory_mib=spec.maxmem, on_console=console, vifs=spec.vif,
                                       disks=spec.disk, vcpus=spec.vcpus, console_raw=True)
        except BuildError as e:
            if spec.name is not None:
                self.names.discard(spec.name)
            msg = str(e)
            raise ControlError(409 if "not enough machine memory" in msg or "in use" in msg else 400,
                               msg) from None
        except BaseException:
            if spec.name is not None:
                self.names.discard(spec.name)
            raise
        if spec.name is None:
            self.names.add(dom.name)
        rec = Record(spec, dom)
        if spec.weight is not None or spec.cap is not None:
            self.sched_credit(rec, spec.weight, spec.cap)
        holder.append(rec)
        self.records[dom.domid] = rec
        self._tg.create_task(self._watch(rec), name=f"d{dom.domid}-watch")
        log.info("d%d (%s): created (%d MiB, %s)", dom.domid, dom.name, spec.memory, spec.kernel)
        return rec

    async def _watch(self, rec: Record) -> None:
        """xl's on_poweroff/on_crash=destroy, on_reboot=restart: once the domain's task has
        finished (everything released), forget it; a reboot builds it again."""
        dom = rec.dom
        reason = await dom.wait()
        if dom.task is not None:
            await asyncio.wait([dom.task])
        for t in rec.hotplug.values():
            t.cancel()
        for q in list(rec.subscribers):
            q.put_nowait(None)                    # console clients: the domain is gone
        self.records.pop(dom.domid, None)
        self.names.discard(dom.name)
        log.info("d%d (%s): gone (%s)", dom.domid, dom.name, dom.describe_end())
        if reason == ShutdownReason.crash:
            for line in dom.console_lines[-3:]:          # why, in the guest's words
                log.warning("d%d (%s) console: %s", dom.domid, dom.name, line)
        if reason == ShutdownReason.reboot and rec.spec.on_reboot == "restart":
            spec = dataclasses.replace(rec.spec, name=dom.name)
            try:
                new = await self.create(spec)
            except ControlError as e:
                log.error("d%d (%s): restart after reboot failed: %s", dom.domid, dom.name, e.message)
                return
            self.sched_credit(new, rec.weight, rec.cap)

    # -- lifecycle --------------------------------------------------------------------------------
    def pause(self, ref: str) -> Record:
        rec = self.live(ref)
        rec.dom.pause()
        return rec

    def unpause(self, ref: str) -> Record:
        rec = self.live(ref)
        rec.dom.unpause()
        return rec

    def _request_shutdown(self, rec: Record, reason: ShutdownReason) -> None:
        """As xl: write control/shutdown for the guest's PV driver. A guest that has not
        advertised control/feature-<reason> (the project's kernels have no such driver) is
        shut down by the hypervisor with that reason, as if it had obeyed at once."""
        dom = rec.dom
        st = self.hv.xenstore.store
        word = {ShutdownReason.poweroff: "poweroff", ShutdownReason.reboot: "reboot"}[reason]
        st.write(f"/local/domain/{dom.domid}/control/shutdown", word)
        feature = read_str(st, f"/local/domain/{dom.domid}/control/feature-{word}", "0")
        if feature != "1":
            dom.unpause()
            dom.shutdown(reason)
        elif dom.paused:
            dom.unpause()

    async def wait_gone(self, rec: Record, timeout: float) -> None:
        dom = rec.dom
        try:
            async with asyncio.timeout(timeout):
                await dom.wait()
                if dom.task is not None:
                    await asyncio.wait([dom.task])
        except TimeoutError:
            raise ControlError(409, f"d{dom.domid} ({dom.name}) did not shut down within {timeout:g} s") from None

    async def shutdown(self, ref: str, wait: bool, timeout: float = SHUTDOWN_WAIT_S) -> Record:
        rec = self.live(ref)
        self._request_shutdown(rec, ShutdownReason.poweroff)
        if wait:
            await self.wait_gone(rec, timeout)
        return rec

    def reboot(self, ref: str) -> Record:
        rec = self.live(ref)
        self._request_shutdown(rec, ShutdownReason.reboot)
        return rec

    # -- save / restore (migration/) -------------------------------------------------------------
    def save_path(self, path: str, *, exists: bool) -> str:
        """A save file's path, refused unless absolute and inside the daemon's save
        directory (`serve --save-dir`): the API must not write or read anywhere as root."""
        if not os.path.isabs(path):
            raise ControlError(400, "the save file path must be absolute")
        real = os.path.realpath(path)
        root = os.path.realpath(self.save_dir)
        if os.path.commonpath([real, root]) != root or real == root:
            raise ControlError(400, f"{path}: outside the daemon's save directory {self.save_dir} "
                                    "(aiovmm serve --save-dir)")
        if exists and not os.path.isfile(real):
            raise ControlError(404, f"{path}: no such save file")
        if not exists and not os.path.isdir(os.path.dirname(real)):
            raise ControlError(400, f"{path}: the directory does not exist")
        return real

    async def save(self, ref: str, path: str, checkpoint: bool,
                   abort: asyncio.Event | None = None) -> dict:
        from ..migration.save import SaveError
        from ..migration.suspend import SuspendError
        rec = self.live(ref)
        real = self.save_path(path, exists=False)
        dom = rec.dom
        self.progress[dom.domid] = {"operation": "save", "phase": "suspend", "done": 0,
                                    "total": dom.nr_pages}

        def progress(done: int, total: int) -> None:
            self.progress[dom.domid].update(phase="pages", done=done, total=total)
        try:
            st = await dom.save(real, checkpoint=checkpoint, progress=progress, abort=abort)
        except (SaveError, SuspendError) as e:
            raise ControlError(409, str(e)) from None
        except OSError as e:
            raise ControlError(400, f"{path}: {e.strerror or e}") from None
        finally:
            self.progress.pop(dom.domid, None)
        if not checkpoint:
            rec.spec.on_reboot = "destroy"
        return {"id": dom.domid, "name": dom.name, "file": path, "pages": st.pages,
                "bytes": st.bytes, "seconds": round(st.seconds, 6),
                "status": "running" if checkpoint else "saved"}

    async def restore(self, path: str, name: str | None) -> Record:
        from ..migration.stream import StreamError
        real = self.save_path(path, exists=True)
        if name is not None and not valid_name(name):
            raise ControlError(400, f"invalid domain name {name!r}")
        if name is not None and name in self.names:
            raise ControlError(409, f"a domain named {name!r} already exists")
        holder: list[Record] = []
        console = _console_sink(holder)
        try:
            dom = await self.hv.restore(real, name=name, on_console=console)
        except StreamError as e:
            raise ControlError(400, f"{path}: refused: {e}") from None
        except BuildError as e:
            raise ControlError(409, str(e)) from None
        except OSError as e:
            raise ControlError(400, f"{path}: {e.strerror or e}") from None
        return self.adopt(dom, f"restored from {path}", holder)

    def adopt(self, dom: "Domain", origin: str, holder: list | None = None) -> Record:
        """Take a restored or migrated-in domain under the daemon's management."""
        if dom.name in self.names:             # a name taken meanwhile: keep both, renamed
            dom.name = f"{dom.name}-{dom.domid}"
        self.names.add(dom.name)
        rec = Record(DomainSpec(kernel=f"({origin})", memory=dom.nr_pages >> 8,
                                name=dom.name, on_reboot="destroy"), dom)
        if holder is None:                     # migrated in: console output from now on
            holder = []

            def console(data: bytes) -> None:
                for q in list(rec.subscribers):
                    if q.qsize() < CONSOLE_QUEUE_MAX:
                        q.put_nowait(data)
            dom._console_cb = console
        dom.console_raw = True                 # console clients filter for their own output
        holder.append(rec)
        self.records[dom.domid] = rec
        self._tg.create_task(self._watch(rec), name=f"d{dom.domid}-watch")
        log.info("d%d (%s): %s", dom.domid, dom.name, origin)
        return rec

    async def migrate(self, ref: str, dest: str, downtime_ms: float, bandwidth: float,
                      abort: asyncio.Event | None = None) -> dict:
        from .. import migration
        await migration.load("live")           # scapy's first import: off the loop
        from ..migration import live
        try:
            host, port = split_host_port(dest)
        except ValueError as e:
            raise ControlError(400, str(e)) from None
        if self.migration_secret is None:
            raise ControlError(409, "migration needs a shared secret (aiovmm serve --migration-secret-file)")
        rec = self.live(ref)
        domid = rec.dom.domid
        self.progress[domid] = {"operation": "migrate", "phase": "connect", "done": 0,
                                "total": rec.dom.nr_pages, "rounds": 0, "dirty": 0,
                                "round_done": 0, "round_total": 0}

        def progress(phase: str, st) -> None:
            self.progress[domid].update(phase=phase, done=st.pages_sent, rounds=st.rounds,
                                        dirty=st.dirty_per_round[-1] if st.dirty_per_round else 0,
                                        round_done=st.round_sent, round_total=st.round_pages)
        try:
            st = await live.migrate(rec.dom, host, port, self.migration_secret,
                                    downtime_ms=downtime_ms, bandwidth=bandwidth, progress=progress,
                                    abort=abort)
        except live.MigrationError as e:
            raise ControlError(409, str(e)) from None
        finally:
            self.progress.pop(domid, None)
        rec.spec.on_reboot = "destroy"
        return {"id": rec.dom.domid, "name": rec.dom.name, "destination": dest, "remote_id": st.domid,
                "rounds": st.rounds, "pages_sent": st.pages_sent, "bytes_sent": st.bytes_sent,
                "pages_ratio": round(st.pages_sent / rec.dom.nr_pages, 3),
                "downtime_ms": round(st.downtime_ms, 2), "total_s": round(st.total_s, 3)}

    async def destroy(self, ref: str) -> Record:
        rec = self.lookup(ref)
        rec.spec.on_reboot = "destroy"
        rec.dom.unpause()
        rec.dom.shutdown(ShutdownReason.poweroff)
        await self.wait_gone(rec, SHUTDOWN_WAIT_S)
        return rec

    # -- memory -------------------------------------------------------------------------------------
    def target_kib(self, dom: "Domain") -> int:
        return read_int(self.hv.xenstore.store, f"/local/domain/{dom.domid}/memory/target", dom.max_pages * 4)

    def static_max_kib(self, dom: "Domain") -> int:
        """memory/static-max (xl's maxmem, what `xl list -l` shows as max_memkb): the ceiling
        for mem-set. Not the hypervisor's max_pages, which mem-set lowers to the target."""
        return read_int(self.hv.xenstore.store, f"/local/domain/{dom.domid}/memory/static-max",
                        dom.max_pages * 4)

    def mem_set(self, ref: str, mib: int) -> Record:
        """xl mem-set (libxl_set_memory_target with enforce): the balloon target in xenstore
        (KiB), and the hypervisor's limit lowered (or raised) to it (XEN_DOMCTL_max_mem), so a
        guest cannot balloon back past its target. Our toolstack's build adds no slack to
        max_pages (libxl's arch extra memory), so neither does this."""
        rec = self.live(ref)
        dom = rec.dom
        if mib < 1:
            raise ControlError(400, "memory target must be at least 1 MiB")
        static_max = self.static_max_kib(dom)
        if mib * 1024 > static_max:
            raise ControlError(400, f"target {mib} MiB is above d{dom.domid}'s maximum {static_max // 1024} MiB")
        # Xen's max_mem: a limit below tot_pages is allowed; the domain just cannot grow
        # until its balloon driver has given the difference back.
        dom.max_pages = mib * 256
        self.hv.xenstore.store.write(f"/local/domain/{dom.domid}/memory/target", str(mib * 1024))
        log.info("d%d (%s): memory target %d MiB", dom.domid, dom.name, mib)
        return rec

    def mem_max(self, ref: str, mib: int) -> Record:
        """xl mem-max (libxl_domain_setmaxmem): memory/static-max and the hypervisor's limit
        (memory_op increase_reservation's), never below the target."""
        rec = self.live(ref)
        dom = rec.dom
        if mib * 1024 < self.target_kib(dom):
            raise ControlError(400, f"maximum {mib} MiB is below d{dom.domid}'s target {self.target_kib(dom) // 1024} MiB")
        if mib > self.hv.memory_mib:
            raise ControlError(400, f"maximum {mib} MiB is more than the host's {self.hv.memory_mib} MiB")
        dom.max_pages = mib * 256
        self.hv.xenstore.store.write(f"/local/domain/{dom.domid}/memory/static-max", str(mib * 1024))
        log.info("d%d (%s): memory maximum %d MiB", dom.domid, dom.name, mib)
        return rec

    # -- scheduling -----------------------------------------------------------------------------------
    def sched_credit(self, ref: "str | Record", weight: int | None, cap: int | None) -> Record:
        """xl sched-credit: set the domain's weight and/or cap in the credit scheduler
        (effective from its next slice); the record shows what the scheduler holds."""
        rec = ref if isinstance(ref, Record) else self.live(ref)
        try:
            ds = rec.dom.set_sched(weight=weight, cap=cap)
        except ValueError as e:
            raise ControlError(400, str(e)) from None
        rec.weight, rec.cap = ds.weight, ds.cap
        return rec

    def io_limit(self, ref: str, dev: str, rate: str | None, iops: int | None, bps: int | None,
                 burst_ms: int | None) -> dict:
        """Set or lift a device's token bucket at run time: a vif (devid) takes xl's `rate`
        string, a vbd (vdev) takes iops/bps/burst_ms; nothing given lifts the limit."""
        from ..ratelimit import make_limit, parse_vif_rate, DEFAULT_INTERVAL_US
        rec = self.live(ref)
        dom = rec.dom
        try:
            if any(str(dev) in (str(b.devid), f"vif{b.devid}") for b in self.vifs(dom)):
                if iops is not None or bps is not None or burst_ms is not None:
                    raise ValueError("a vif takes `rate` (xl syntax), not iops/bps/burst_ms")
                limit = parse_vif_rate(rate) if rate else None
            elif any(b.vdev == dev for b in self.vbds(dom)):
                if rate is not None:
                    raise ValueError("a vbd takes iops/bps/burst_ms, not `rate`")
                limit = (make_limit(bps, iops, burst_ms * 1000 if burst_ms else DEFAULT_INTERVAL_US)
                         if iops or bps else None)
            else:
                raise ControlError(404, f"d{dom.domid} has no vif or vbd {dev!r}")
            dom.set_io_limit(dev, limit)
        except ValueError as e:
            raise ControlError(400, str(e)) from None
        return {"id": dom.domid, "device": dev, "limit": limit.describe() if limit else None}

    # -- devices --------------------------------------------------------------------------------------
    @staticmethod
    def vifs(dom: "Domain") -> list:
        from ..backends.net import Netback
        return [b for b in dom.backends if isinstance(b, Netback)]

    @staticmethod
    def vbds(dom: "Domain") -> list:
        from ..backends.block import Blkback
        return [b for b in dom.backends if isinstance(b, Blkback)]

    async def network_attach(self, ref: str, spec: str) -> Any:
        """xl network-attach: publish the device directories and run netback; the guest's
        frontend sees device/vif/<n> appear (xenbus hot-plug) and connects. Its namespace
        and bridge must exist, as at create (Hypervisor.create): a vif for a missing bridge
        was published and never came up (the backend stopped, the device stayed listed)."""
        from ..backends.net import Netback, VifConfig
        from ..backends.net.tap import TapError, check_bridge
        rec = self.live(ref)
        dom = rec.dom
        try:
            cfg = VifConfig.parse(spec)
            await asyncio.to_thread(check_bridge, cfg.bridge, cfg.netns)
        except (ValueError, TapError) as e:
            raise ControlError(400, f"vif {spec!r}: {e}") from None
        if dom.dying:
            raise ControlError(409, f"d{dom.domid} ({dom.name}) is shutting down")
        taken = {b.devid for b in self.vifs(dom)}
        if len(taken) >= MAX_DEVICES:
            raise ControlError(409, f"d{dom.domid} already has {MAX_DEVICES} vifs")
        devid = next(i for i in range(len(taken) + 1) if i not in taken)
        nb = Netback(dom, devid, cfg, ifname_prefix=self.hv.vif_prefix)
        nb.publish()
        dom.backends.append(nb)
        try:
            rec.hotplug[("vif", devid)] = self.hv.start_backend(dom, nb)
        except BuildError as e:
            dom.backends.remove(nb)
            self._remove_device_nodes(nb)
            raise ControlError(409, str(e)) from None
        log.info("d%d (%s): vif %d attached (%s)", dom.domid, dom.name, devid, nb.mac)
        return nb

    async def block_attach(self, ref: str, spec: str) -> Any:
        from ..backends.block import Blkback, DiskConfig
        rec = self.live(ref)
        dom = rec.dom
        try:
            cfg = DiskConfig.parse(spec)
            await asyncio.to_thread(cfg.check, {k: set(v) for k, v in self.hv.disks_in_use.items()})
        except ValueError as e:
            raise ControlError(400, f"disk {spec!r}: {e}") from None
        if dom.dying:
            raise ControlError(409, f"d{dom.domid} ({dom.name}) is shutting down")
        index = len(self.vbds(dom))
        if index >= MAX_DEVICES:
            raise ControlError(409, f"d{dom.domid} already has {MAX_DEVICES} vbds")
        bb = Blkback(dom, index, cfg)
        if any(b.devid == bb.devid for b in self.vbds(dom)):
            raise ControlError(409, f"d{dom.domid} already has a disk {bb.vdev}")
        try:
            await bb.claim(self.hv.disks_in_use)      # the image lock is taken off the loop
        except ValueError as e:
            raise ControlError(409, f"disk {spec!r}: {e}") from None
        # The world may have moved during that await: the domain dying, or a concurrent
        # attach of the same vdev. Re-check before anything is published.
        if dom.dying or any(b.devid == bb.devid for b in self.vbds(dom)):
            bb.release(self.hv.disks_in_use)
            raise ControlError(409, f"d{dom.domid} is shutting down" if dom.dying
                               else f"d{dom.domid} already has a disk {bb.vdev}")
        bb.publish()
        dom.backends.append(bb)
        try:
            rec.hotplug[("vbd", bb.devid)] = self.hv.start_backend(dom, bb)
        except BuildError as e:
            dom.backends.remove(bb)
            bb.release(self.hv.disks_in_use)
            self._remove_device_nodes(bb)
            raise ControlError(409, str(e)) from None
        log.info("d%d (%s): vbd %s attached (%s)", dom.domid, dom.name, bb.vdev, cfg.target)
        return bb

    def _find_device(self, rec: Record, kind: str, key: str) -> Any:
        devs = self.vifs(rec.dom) if kind == "vif" else self.vbds(rec.dom)
        for b in devs:
            if str(b.devid) == key or (kind == "vbd" and b.vdev == key) or \
                    (kind == "vif" and b.mac.lower() == key.lower()):
                return b
        raise ControlError(404, f"d{rec.dom.domid} has no {kind} {key!r}")

    async def detach(self, ref: str, kind: str, key: str) -> Any:
        """xl *-detach: the backend goes Closing, the frontend closes (waited for a short
        while, as libxl does), then the backend stops and both directories are removed."""
        rec = self.live(ref)
        dom = rec.dom
        dev = self._find_device(rec, kind, key)
        st = self.hv.xenstore.store
        st.write(f"{dev.back}/online", "0")
        st.write(f"{dev.back}/state", str(int(XenbusState.Closing)))
        try:
            async with asyncio.timeout(DETACH_WAIT_S):
                if read_state(st, dev.front) not in (XenbusState.Unknown, XenbusState.Initialising,
                                                     XenbusState.InitWait):
                    await wait_for_state(st, dev.front, {XenbusState.Closed, XenbusState.Unknown})
        except TimeoutError:
            log.warning("d%d: %s %s: frontend did not close in %g s; removed anyway",
                        dom.domid, kind, key, DETACH_WAIT_S)
        task = rec.hotplug.pop((kind, dev.devid), None)
        if task is None:                   # a device from the config: its task by name
            name = f"d{dom.domid}-{type(dev).__name__}-{dev.devid}"
            task = next((t for t in dom.backend_tasks if t.get_name() == name), None)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
            if task in dom.backend_tasks:
                dom.backend_tasks.remove(task)
        if dev in dom.backends:
            dom.backends.remove(dev)
        if kind == "vbd":
            dev.release(self.hv.disks_in_use)
        self._remove_device_nodes(dev)
        log.info("d%d (%s): %s %s detached", dom.domid, dom.name, kind, key)
        return dev

    def _remove_device_nodes(self, dev: Any) -> None:
        st = self.hv.xenstore.store
        for path in (dev.front, dev.back):
            try:
                st.rm(path)
            except XsError as e:
                log.debug("d%d: rm %s: %s", dev.dom.domid, path, e)

    # -- console --------------------------------------------------------------------------------------
    def console_input(self, rec: Record, data: bytes) -> int:
        """Queue input for the guest's console; returns the bytes taken. What a guest does
        not read waits here up to CONSOLE_INPUT_MAX, the rest is refused (it grew without
        bound, each flush copying all of it)."""
        dom = rec.dom
        take = data[:max(0, CONSOLE_INPUT_MAX - len(dom.console_input))]
        dom.console_input += take
        if dom.console_backend is not None:
            dom.console_backend.flush_input()
        return len(take)

    # -- views ------------------------------------------------------------------------------------------
    def cpu_seconds(self, dom: "Domain") -> float:
        return sum(self.sched.vcpu_seconds(v) for v in dom.vcpus)

    @staticmethod
    def state_flags(dom: "Domain") -> str:
        """xl list's State column: r b p s c d."""
        running = any(not v.blocked for v in dom.vcpus) and not dom.paused and not dom.dying
        blocked = not running and not dom.paused and not dom.dying
        crashed = dom.shutdown_reason == ShutdownReason.crash
        shut = dom.dying and not crashed
        return "".join(c if on else "-" for c, on in
                       (("r", running), ("b", blocked), ("p", dom.paused), ("s", shut),
                        ("c", crashed), ("d", dom.destroyed)))

    def status(self, dom: "Domain") -> str:
        if dom.dying:
            return "shutdown"
        if dom.paused:
            return "paused"
        return "running" if "r" in self.state_flags(dom) else "blocked"

    def describe(self, rec: Record, long: bool = False) -> dict:
        dom = rec.dom
        now = self.hv.system_time_ns()
        d: dict[str, Any] = {
            "id": dom.domid, "name": dom.name, "uuid": str(dom.uuid),
            "state": self.state_flags(dom), "status": self.status(dom),
            "memory_kib": dom.tot_pages * 4, "max_memory_kib": self.static_max_kib(dom),
            "max_pages_kib": dom.max_pages * 4,      # the hypervisor's limit (mem-set lowers it)
            "target_kib": self.target_kib(dom), "vcpus": len(dom.vcpus),
            "cpu_time_s": round(self.cpu_seconds(dom), 6),
            "uptime_s": round((now - dom.created_ns) / 1e9, 3),
            "weight": rec.weight, "cap": rec.cap,
            "vifs": [self.describe_vif(b) for b in self.vifs(dom)],
            "vbds": [self.describe_vbd(b) for b in self.vbds(dom)],
            "hypercalls": sum(dom.hypercall_counts.values()),
        }
        if long:
            d["config"] = dataclasses.asdict(rec.spec)
            d["vcpu_accounting"] = self.vcpu_list(rec)
        return d

    def describe_vif(self, b: Any) -> dict:
        st = self.hv.xenstore.store
        return {"devid": b.devid, "mac": b.mac, "ifname": b.ifname, "bridge": b.cfg.bridge or "",
                "backend": b.back, "state": int(read_state(st, b.back)),
                "frontend_state": int(read_state(st, b.front)),
                "event_channel": read_int(st, f"{b.front}/event-channel", -1),    # guest-written
                "tx_ring_ref": read_int(st, f"{b.front}/tx-ring-ref", -1),
                "rx_ring_ref": read_int(st, f"{b.front}/rx-ring-ref", -1),
                **{k: getattr(b.stats, k) for k in ("tx_bytes", "tx_packets", "rx_bytes", "rx_packets")}}

    def describe_vbd(self, b: Any) -> dict:
        st = self.hv.xenstore.store
        return {"devid": b.devid, "vdev": b.vdev, "target": b.cfg.target, "backend": b.back,
                "readonly": bool(b.readonly), "state": int(read_state(st, b.back)),
                "frontend_state": int(read_state(st, b.front)),
                "event_channel": read_int(st, f"{b.front}/event-channel", -1),    # guest-written
                "ring_ref": read_int(st, f"{b.front}/ring-ref", -1),
                **{k: getattr(b.stats, k) for k in ("rd_reqs", "wr_reqs", "rd_sectors", "wr_sectors")}}

    def vcpu_list(self, rec: Record) -> list[dict]:
        dom = rec.dom
        out = []
        for v in dom.vcpus:
            state = "p" if dom.paused else ("b" if v.blocked else "r")
            acct = self.sched.accounting(v)
            out.append({"vcpu": v.id, "cpu": 0, "state": state, "online": v.online,
                        "time_s": round(acct["cpu_ns"] / 1e9, 6), "affinity": "all / all",
                        "wait_s": round(acct["wait_ns"] / 1e9, 6),
                        "host_steal_s": round(acct["host_steal_ns"] / 1e9, 6),
                        "slices": acct["slices"], "priority": acct["pri"], "parked": acct["parked"]})
        return out

    def info(self) -> dict:
        u = platform.uname()
        return {
            "host": u.node, "release": u.release, "version": u.version, "machine": u.machine,
            "nr_cpus": os.cpu_count() or 1, "nr_nodes": 1,
            "total_memory": self.hv.memory_mib, "free_memory": self.hv.mem.free_frames >> 8,
            "free_frames": self.hv.mem.free_frames,
            "xen_major": 4, "xen_minor": 17, "xen_extra": ".0-aiovmm", "xen_version": "4.17.0-aiovmm",
            "xen_caps": "xen-3.0-x86_64", "xen_scheduler": "credit",
            "xen_commandline": "", "nr_domains": len(self.records),
            "uptime_s": round(time.time() - self.started, 3),
            "event_loop_lag_s": round(self.lag.last, 6),
            "tasks": len(asyncio.all_tasks()),
            "xenstore_nodes": _count_nodes(self.hv.xenstore.store),
            "xend_config_format": 4,
        }

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tg.create_task(self.lag.run(), name="loop-lag")
            await asyncio.Event().wait()


def _count_nodes(store: Any) -> int:
    """Every xenstore node (leak checks, `info`)."""
    return len(store.tree.nodes)


# ----------------------------------------------------------------------------------- serve
def _bind_unix(path: str) -> socket.socket:
    """The API socket: mode 0600 from the start (umask while binding), in a 0700 directory
    we create if missing. A stale socket from a dead daemon is replaced; a live one is not."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, mode=0o700, exist_ok=True)
    unlink_stale_socket(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    s.listen(256)
    s.setblocking(False)
    return s


class TcpListener:
    """The TCP API's accept loop (TLS + token): at most TCP_MAX_CONNECTIONS connections at
    once, counted from accept() (a TLS handshake in progress holds a descriptor too), each
    handshake done within TCP_HANDSHAKE_S; a connection beyond the limit is closed at once.
    Anyone who can reach the port gets this far before the token is checked: without a
    bound, idle connections (held for aiohttp's hour of keep-alive) took the daemon's
    descriptors, and with them domain creation and the local socket."""

    def __init__(self, handler: Callable[[], asyncio.Protocol], host: str, port: int,
                 ctx: ssl.SSLContext) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=128)
        self.sock.setblocking(False)
        self._handler = handler
        self._ctx = ctx
        self._live: list[socket.socket] = []    # accepted; closed by their transport at the end
        self.refused = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    try:
                        conn, _ = await loop.sock_accept(self.sock)
                    except OSError as e:      # EMFILE and the like: as asyncio's own servers
                        log.warning("api: accept failed: %s; retrying in 1 s", e)
                        await asyncio.sleep(1.0)
                        continue
                    self._live = [c for c in self._live if c.fileno() != -1]
                    if len(self._live) >= TCP_MAX_CONNECTIONS:
                        self.refused += 1
                        conn.close()
                        continue
                    self._live.append(conn)
                    tg.create_task(self._connect(loop, conn), name="api-tls-handshake")
        finally:
            self.sock.close()

    async def _connect(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        try:
            await loop.connect_accepted_socket(self._handler, conn, ssl=self._ctx,
                                               ssl_handshake_timeout=TCP_HANDSHAKE_S)
        except OSError as e:              # handshake failed or timed out (ssl.SSLError too)
            log.debug("api: TLS connection dropped: %s", e)
            conn.close()


@dataclasses.dataclass
class ServeOptions:
    socket_path: str = DEFAULT_SOCKET
    machine_memory: int = 2048
    listen: str | None = None           # host:port for TCP (TLS + bearer token required)
    tls_cert: str | None = None
    tls_key: str | None = None
    token_file: str | None = None
    xenstore_socket: str | None = None
    log_dir: str | None = None
    vif_prefix: str = "vif"
    save_dir: str = DEFAULT_SAVE_DIR     # save/restore files only under this directory
    migration_listen: str | None = None  # host:port for incoming live migrations
    migration_secret_file: str | None = None   # shared secret (HMAC) for both directions


def check_tcp_options(o: ServeOptions) -> tuple[ssl.SSLContext, str] | None:
    """TCP only with TLS and a bearer token: anything less is refused before binding."""
    if o.listen is None:
        return None
    if not (o.tls_cert and o.tls_key and o.token_file):
        raise ValueError("--listen needs --tls-cert, --tls-key and --token-file (TCP is TLS + bearer token only)")
    host, sep, port = o.listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen {o.listen!r}: expected HOST:PORT")
    with open(o.token_file) as f:
        token = f.read().strip()
    if len(token) < 16:
        raise ValueError(f"{o.token_file}: the token must be at least 16 characters")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(o.tls_cert, o.tls_key)
    return ctx, token


def _quiet_forked_child() -> None:
    """A child forked by a library (pyroute2 forks to open sockets in a network namespace)
    inherits the loop's signal wakeup fd; the SIGTERM the library sends that child when done
    would be written there and read by the daemon as its own SIGTERM. The child gets
    default dispositions and no wakeup fd instead."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    except ValueError:           # not the main thread of the child: nothing was inherited there
        pass


_fork_hook_installed = False


async def serve(o: ServeOptions, ready: asyncio.Event | None = None) -> None:
    from aiohttp import web
    from pyroute2 import config as pyroute2_config
    from .api import make_app
    global _fork_hook_installed
    tcp = check_tcp_options(o)
    pyroute2_config.disable_mp_signal = True       # its children: SIGTERM = default (die)
    if not _fork_hook_installed:
        os.register_at_fork(after_in_child=_quiet_forked_child)
        _fork_hook_installed = True
    dmesg = DmesgHandler()
    logging.getLogger("aiovmm").addHandler(dmesg)
    if logging.getLogger("aiovmm").getEffectiveLevel() > logging.INFO:
        logging.getLogger("aiovmm").setLevel(logging.INFO)
    sched = MeteredScheduler()
    os.makedirs(o.save_dir, mode=0o700, exist_ok=True)
    sock = _bind_unix(o.socket_path)
    runner = None
    try:
        async with Hypervisor(memory_mib=o.machine_memory, scheduler=sched, log_dir=o.log_dir,
                              xenstore_path=o.xenstore_socket, vif_prefix=o.vif_prefix) as hv:
            ctl = Controller(hv, sched, dmesg)
            ctl.save_dir = o.save_dir
            receiver = None
            if o.migration_secret_file:
                with open(o.migration_secret_file, "rb") as f:
                    ctl.migration_secret = f.read().strip()
                if len(ctl.migration_secret) < 16:
                    raise ValueError(f"{o.migration_secret_file}: the secret must be at least 16 bytes")
            if o.migration_listen:
                from ..migration import live
                if ctl.migration_secret is None:
                    raise ValueError("--migration-listen needs --migration-secret-file")
                mh, _, mp = o.migration_listen.rpartition(":")
                receiver = await live.serve(hv, mh.strip("[]") or "0.0.0.0", int(mp), ctl.migration_secret,
                                            lambda d: ctl.adopt(d, "migrated in"))
            # What a Xen host's store holds before any guest (dom0's home, /vm, the backend
            # directories the toolstack fills), so a destroyed guest leaves the count as it was.
            for path in ("/vm", "/local/domain/0/backend/vif", "/local/domain/0/backend/vbd"):
                hv.xenstore.store.mkdir(path)
            app = make_app(ctl, token=tcp[1] if tcp else None)
            runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                   keepalive_timeout=API_IDLE_S)
            await runner.setup()
            listener = None
            if tcp:                 # first, so that an answer on the socket means all is up
                host, _, port = o.listen.rpartition(":")
                listener = TcpListener(runner.server, host.strip("[]") or "0.0.0.0", int(port), tcp[0])
            await web.SockSite(runner, sock).start()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            def on_signal(sig: signal.Signals) -> None:
                log.info("%s received", sig.name)
                stop.set()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal, sig)
            log.info("serving on %s%s", o.socket_path, f" and https://{o.listen}" if tcp else "")
            if ready is not None:
                ready.set()
            async with asyncio.TaskGroup() as tg:
                ctl_task = tg.create_task(ctl.run(), name="controller")
                tcp_task = tg.create_task(listener.run(), name="api-tcp") if listener else None
                await stop.wait()
                log.info("stopping: destroying %d domain(s)", len(ctl.records))
                if tcp_task is not None:
                    tcp_task.cancel()
                await runner.cleanup()
                runner = None
                for rec in list(ctl.records.values()):
                    rec.spec.on_reboot = "destroy"
                    rec.dom.unpause()
                    rec.dom.shutdown(ShutdownReason.poweroff)
                ctl_task.cancel()
                if receiver is not None:
                    await receiver.aclose()
    finally:
        if runner is not None:
            await runner.cleanup()
        try:
            os.unlink(o.socket_path)
        except FileNotFoundError:
            pass
        logging.getLogger("aiovmm").removeHandler(dmesg)
