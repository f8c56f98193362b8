"""blkback: Xen's blkif protocol (xen-pv-abi.md §12) between a guest's ring and a file, a
block device (loop device, disk) or an LVM logical volume.

Handshake (as Linux blkback / QEMU qdisk): the toolstack writes both xenstore directories
(`publish()`: frontend device/vbd/<devid>, backend /local/domain/0/backend/vbd/<domid>/<devid>
with params, type, mode); `run()` opens the backing store in the I/O pool, publishes sectors,
sector-size, info and features early and moves to InitWait; once the frontend has written
ring-ref, event-channel and protocol and moved to Initialised (Linux) or Connected (Mini-OS),
the backend maps the ring grant, binds the event channel and moves to Connected. If the
frontend closes, the backend closes too and waits for it to come back (a frontend may
reconnect, as Linux does on module reload); a frontend that breaks the ring protocol is
disconnected for good (the domain and its other devices carry on).

Data path: every wake-up drains the ring. Each request is copied out of shared memory once
and validated (operation, nr_segments 1..11, first_sect <= last_sect <= 7, the sector range
inside the disk, writes on a read-only vbd, every segment grant mappable for the right
direction); a bad request gets BLKIF_RSP_ERROR and a counter, never an exception. Valid
requests of one drain go to the I/O thread pool as a few jobs (preadv/pwritev straight between
the granted guest pages and the file: zero copies); responses are written in completion order
and pushed with at most one event per batch under the event-index rules. FLUSH_DISKCACHE and
WRITE_BARRIER are ordering points: they wait for every earlier request, run fdatasync (the
barrier after its write) and only then let later requests start. A write is answered OKAY
only after pwritev returned for all of it, so the data is in the host file (page cache);
FLUSH makes it durable.

Extensions Linux's blkfront negotiates (backends/block/README.md has the details):
persistent grants (kept mapped per connection, bounded, released at disconnect), indirect
descriptors (up to 256 segments in granted descriptor pages, copied out once) and multi-page
rings (up to 16 pages). FLUSH_DISKCACHE with segments writes its data before the fdatasync.
"""
from __future__ import annotations

import array
import asyncio
import dataclasses
import fcntl
import itertools
import logging
import os
import re
import stat
import struct
import tempfile
from typing import TYPE_CHECKING

from aiovmm import grants
from aiovmm.ratelimit import Limit, Limiter, Throttle, make_limit, parse_size_rate
from aiovmm.ring import DRAIN_ON_YIELD, BackRing, YieldDrained, hook_yield_drain
from aiovmm.errors import BuildError
from aiovmm.events import EventError
from aiovmm.xenbus import Watch, is_online, XenbusState, read_state, read_str, serve_until, write_keys
from aiovmm.xenstore.core import XsError

from . import io as bio
from . import lvm
from .uring import Uring
from .metrics import BlkStats

if TYPE_CHECKING:
    from aiovmm.domain import Domain

log = logging.getLogger("aiovmm.backends.block")

RING_SIZE = 32                # entries of a one-page ring
SLOT = 112
SECTOR = 512
SECTORS_PER_PAGE = 8
PAGE = 4096
MAX_SEGMENTS = 11             # BLKIF_MAX_SEGMENTS_PER_REQUEST (a direct request)
# Protocol extensions offered, with Linux blkback's values:
# feature-max-indirect-segments: segments per BLKIF_OP_INDIRECT request (Linux's
# MAX_INDIRECT_SEGMENTS); the segment descriptors live in up to 8 granted pages of 512 each.
MAX_INDIRECT_SEGMENTS = 256
MAX_INDIRECT_PAGES = 8        # BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
# Segments one pass takes off the ring (rule 4: the loop's work per pass is bounded, not a
# whole ring's): each is validated and mapped on the loop (~13-30 us). A 16-page ring of
# 512 indirect requests of 256 segments held the loop 4 s in one pass (measured, load 17).
# The rest waits on the ring for the next pass, after the loop's other work. 1024: a Linux
# blkfront's default full ring (32 requests of 32 segments) in one pass; 4 MiB of whole pages.
DRAIN_SEGMENTS = 1024
# What a segment mapped for its request only (no persistent grant: a frontend without
# feature-persistent, or grants beyond the bound) costs a pass's budget, in held segments: its
# grant is validated and mapped in _drain and unmapped in _answer, ~6.2 us of loop thread
# against ~0.7 us for a held one on the whole-page path (bench/blk_pass_stall.py). Counted
# at cost, a pass holds the loop about as long whichever grants the frontend uses (a
# bystander's timer lateness, --served: 54 ms median with every segment transient at 1).
# AIOVMM_BLK_TRANSIENT_COST (read at each connect) for an A/B (bench/blk.py --ab-env).
TRANSIENT_SEGMENT_COST = 8
SEGS_PER_INDIRECT_PAGE = PAGE // 8
# max-ring-page-order: up to 16 ring pages (512 entries), Linux's XENBUS_MAX_RING_GRANT_ORDER.
MAX_RING_PAGE_ORDER = 4
# feature-persistent: at most this many grants per ring stay mapped, as Linux blkback's
# xen_blkif_max_pgrants (max_persistent_grants, per ring whatever the ring's size): without a
# bound one vbd would keep the guest's whole grant table mapped. Beyond it a segment is mapped
# for its request only and unmapped after, as Linux does; every LRU_INTERVAL the pool is purged
# (_purge_persistent, Linux's purge_persistent_gnt): grants unused for PERSISTENT_UNUSED_S,
# and, once the bound was hit, the least recently used ones down to the bound less
# LRU_PERCENT_CLEAN percent. The frontend sees nothing but speed.
# The value departs from Linux's 1,056 (issue 14; backends/block/README.md, "The persistent-
# grant bound on KVM"): Linux's bound is a memory budget, each persistent grant a dom0 page
# (1,056 x 4 KiB = 4.1 MiB per ring); here a kept grant costs ~1.1 KB of Python heap (the
# frame is the guest's, already mapped), so the same budget holds 4,112 = 16 x (256 + 1):
# sixteen 1 MiB indirect requests with their descriptor page, the whole working set of
# blkfront's LIFO grant pool at fio's iodepth 8 (measured: 0 per-request maps, against 42-63
# of 257 segments with 1,056, which cost ~7-10 us of loop-thread CPU each).
MAX_PERSISTENT_GRANTS = 4112
LRU_INTERVAL = 0.1                 # s, Linux's LRU_INTERVAL (100 ms)
LRU_PERCENT_CLEAN = 5
PERSISTENT_UNUSED_S = 60.0         # Linux's persistent_grant_unused_seconds default

BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE = 0, 1, 2, 3
BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT = 5, 6
BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY = -2, -1, 0
VDISK_CDROM, VDISK_REMOVABLE, VDISK_READONLY = 1, 2, 4
BLKROGET = 0x125E
PROTOCOL = "x86_64-abi"

_REQ = struct.Struct("<BBH4xQQ")             # operation nr_segments handle _ id sector_number
# operation indirect_op nr_segments _ id sector_number handle _ indirect_grefs[8]
_INDIRECT = struct.Struct("<BBH4xQQH2x8I")
_DISCARD = struct.Struct("<BBH4xQQQ")        # operation flag handle _ id sector_number nr_sectors
_ORDERING = (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_DISCARD)


def _charged_bytes(io: "bio.IORequest") -> int:
    """What a request costs the vbd's byte limit (bps=), as QEMU's throttle filter counts
    (block/throttle.c): a read or a write its length, a DISCARD its range (charged as a
    write: the host's store does that work, a thin LV or a file's extents), a FLUSH
    no bytes (passed through uncharged there). Every request, a FLUSH too, is one op
    (iops=; QEMU does not count a flush, but here each is an fsync of the host's store,
    which a guest could otherwise repeat without bound)."""
    return io.length if io.op in ("read", "write", "discard") else 0


_SEG = struct.Struct("<IBB2x")               # gref first_sect last_sect _
_RSP = struct.Struct("<QBxh")                # id operation _ status (16-byte slot)
# first_sect / last_sect bytes of MAX_INDIRECT_SEGMENTS descriptors that each cover a whole page.
_WHOLE_FIRST = bytes(MAX_INDIRECT_SEGMENTS)
_WHOLE_LAST = bytes([SECTORS_PER_PAGE - 1]) * MAX_INDIRECT_SEGMENTS

# How a drained batch is handed to the thread pool: each job does its requests one after the
# other in one worker, so a batch costs a few thread hand-offs (~90-140 us each here) instead
# of one per request, while big batches still overlap across workers (a cold or real disk).
# the former bench/block.py sweep, warm page cache, guest at depth 16: one job per request 9.6k IOPS, 4 jobs
# per batch 10.7k, one job per batch 24k; hence jobs of at least REQS_PER_JOB requests.
JOBS_PER_BATCH = 4
REQS_PER_JOB = 8
# io_uring requests at least this big run on the kernel's io-wq threads (IOSQE_ASYNC): a
# cached read otherwise copies inside io_uring_enter on the loop thread, which also runs
# the guest's vCPU; small ones stay inline (a thread hand-off costs more than their copy).
URING_OFFLOAD_BYTES = 64 << 10


# --------------------------------------------------------------------------- configuration
def vdev_to_devid(vdev: str) -> int:
    """Xen's virtual-device number for a vdev name (docs/misc/vbd-interface.txt):
    xvdX -> 202<<8 | disk<<4 | part (disk < 16, part < 16), else 1<<28 | disk<<8 | part;
    sdX -> 8<<8 | disk<<4 | part; hda/hdb -> 3<<8, hdc/hdd -> 22<<8; or a plain number."""
    if vdev.isdigit():
        return int(vdev)
    m = re.fullmatch(r"(xvd|sd|hd)([a-z]+)(\d*)", vdev)
    if not m:
        raise ValueError(f"bad vdev {vdev!r} (want xvda, xvdb, ..., sda, hda or a number)")
    kind, letters, part_s = m.groups()
    disk = 0
    for ch in letters:
        disk = disk * 26 + (ord(ch) - ord("a") + 1)
    disk -= 1
    part = int(part_s) if part_s else 0
    if kind == "xvd":
        if disk < 16 and part < 16:
            return (202 << 8) | (disk << 4) | part
        if disk < (1 << 20) and part < 256:
            return (1 << 28) | (disk << 8) | part
    elif kind == "sd":
        if disk < 16 and part < 16:
            return (8 << 8) | (disk << 4) | part
    elif kind == "hd":
        if disk < 4 and part < 64:
            return ((3 if disk < 2 else 22) << 8) | ((disk & 1) << 6) | part
    raise ValueError(f"vdev {vdev!r} is out of range")


def default_vdev(index: int) -> str:
    letters = ""
    n = index + 1
    while n:
        n, r = divmod(n - 1, 26)
        letters = chr(ord("a") + r) + letters
    return "xvd" + letters


_FORMATS = ("raw",)
_ACCESS = {"r": True, "ro": True, "w": False, "rw": False}
_KEYS = ("target", "vdev", "access", "format", "devtype", "backendtype", "script", "discard",
         "no-discard", "direct-io-safe", "iops", "bps", "burst_ms")
_PREFIXES = {"phy:": "phy", "file:": "file", "aio:": "file", "tap:aio:": "file",
             "tap2:aio:": "file", "lvm:": "lvm"}


def _strip_prefix(target: str) -> tuple[str, str | None]:
    for p, kind in _PREFIXES.items():
        if target.startswith(p):
            return target[len(p):], kind
    return target, None


@dataclasses.dataclass(frozen=True)
class DiskSource:
    """What a disk's target resolves to on this host (DiskConfig.resolve)."""
    kind: str                   # "file" | "phy" | "lvm"
    path: str                   # what is opened: the file, the block device, or the LV's PV
    identity: tuple             # canonical key of the backing store (DiskConfig.check's in_use)
    lv: tuple[str, str] | None = None     # (VG, LV) for an LV served without device-mapper
    label: str = ""             # for messages


@dataclasses.dataclass
class DiskConfig:
    """One disk, in xl's terms (docs/man/xl-disk-configuration.5): a subset of
    `disk = ['target=/path,vdev=xvda,access=rw']`:

    - target: a file, a block device (/dev/loop0, /dev/sdb) or an LVM LV (/dev/VG/LV,
      /dev/mapper/VG-LV); the last key, as in xl (it may contain commas).
    - vdev: xvda..xvdz, xvdaa.., sdX, hdX or a number (default: xvd + letter of the index).
    - access: r/ro (read-only: VDISK_READONLY, writes refused) or w/rw (default).
    - format: raw only.
    - devtype: disk (cdrom is accepted and implies read-only).

    The positional form is accepted too: '/path,raw,xvda,rw' and the legacy
    'phy:/dev/loop0,xvda,w' / 'file:/img,xvdb,r' / 'lvm:VG/LV,xvdc,w'. A prefix (also on a
    target= value) fixes the kind: phy: must be a block device, lvm: an LV named VG/LV."""
    target: str = ""
    vdev: str | None = None
    access: str = "rw"
    format: str = "raw"
    devtype: str = "disk"
    kind: str | None = None          # "file" | "phy" | "lvm" from a prefix; None: from the target
    discard: bool = True             # offer DISCARD if the store supports it ('no-discard': never)
    limit: Limit | None = None       # iops=/bps=/burst_ms= token buckets (aiovmm/ratelimit.py)
    source: DiskSource | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def readonly(self) -> bool:
        return _ACCESS[self.access] or self.devtype == "cdrom"

    @classmethod
    def parse(cls, spec: str) -> "DiskConfig":
        cfg = cls()
        items = [x.strip() for x in spec.split(",")]
        positional: list[str] = []
        i = 0
        while i < len(items):
            item = items[i]
            if not item:
                i += 1
                continue
            key, eq, val = item.partition("=")
            if eq and key == "target":
                # xl wants target= last because a path may contain commas; we also accept it
                # first (as in 'target=/p,vdev=xvda'): later items that are known options
                # stay options, anything else belongs to the path.
                parts = [val]
                while i + 1 < len(items) and items[i + 1].partition("=")[0] not in _KEYS:
                    i += 1
                    parts.append(items[i])
                cfg.target = ",".join(parts)
                i += 1
                continue
            if eq:
                if key == "vdev":
                    vdev_to_devid(val)
                    cfg.vdev = val
                elif key == "access":
                    if val not in _ACCESS:
                        raise ValueError(f"bad access {val!r} (want r, ro, w or rw)")
                    cfg.access = val
                elif key == "format":
                    if val not in _FORMATS:
                        raise ValueError(f"format {val!r} is not supported (raw only)")
                    cfg.format = val
                elif key == "devtype":
                    if val not in ("disk", "cdrom"):
                        raise ValueError(f"bad devtype {val!r}")
                    cfg.devtype = val
                elif key in ("iops", "bps", "burst_ms"):
                    lim = cfg.limit or Limit()
                    try:
                        if key == "burst_ms":
                            ms = int(val)
                            cfg.limit = make_limit(lim.bytes_per_s, lim.ops_per_s, ms * 1000)
                        else:
                            n = parse_size_rate(val)
                            cfg.limit = make_limit(n if key == "bps" else lim.bytes_per_s,
                                                   n if key == "iops" else lim.ops_per_s,
                                                   lim.interval_us)
                    except ValueError as e:
                        raise ValueError(f"bad {key}={val!r}: {e}") from None
                elif key in ("backendtype", "script", "direct-io-safe"):
                    pass        # accepted for compatibility; ignored
                else:
                    raise ValueError(f"unknown disk option {key!r}")
            elif item in ("discard", "no-discard"):
                cfg.discard = item == "discard"
            elif item == "direct-io-safe":
                pass
            else:
                positional.append(item)
            i += 1
        for n, item in enumerate(positional):
            if n == 0 and not cfg.target:
                cfg.target = item
            elif item in _FORMATS:
                cfg.format = item
            elif item in _ACCESS:
                cfg.access = item
            elif item.split(":")[0] and re.fullmatch(r"(xvd|sd|hd)[a-z]+\d*(:cdrom|:disk)?|\d+", item):
                name, _, dt = item.partition(":")
                vdev_to_devid(name)
                cfg.vdev = name
                if dt:
                    cfg.devtype = dt
            else:
                raise ValueError(f"cannot place positional disk parameter {item!r}")
        if not cfg.target:
            raise ValueError("disk has no target")
        cfg.target, cfg.kind = _strip_prefix(cfg.target)
        if not cfg.target or "\0" in cfg.target:
            raise ValueError("bad target")
        if cfg.kind == "lvm":
            lv = lvm.split_lv_path(cfg.target)
            if lv is None:
                raise ValueError(f"lvm:{cfg.target}: want lvm:VG/LV")
            cfg.target = f"{lv[0]}/{lv[1]}"
        return cfg

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.target}" if self.kind else self.target

    # -- before boot: does the target exist, may it be opened this way, is it in use? ----------
    def resolve(self) -> DiskSource:
        """Find the backing store on this host (blocking: stat, ioctl, and `lvm lvs` for an
        LV without device-mapper). Raises ValueError with a one-line reason: missing target,
        phy: that is not a block device, neither file nor block device, or (access w) a
        read-only source: no write permission, read-only file system, read-only block device,
        read-only LV, or an LV whose PV is read-only."""
        target = self.target
        lv = None
        if self.kind == "lvm":
            lv = lvm.split_lv_path(target)
            dm_path = f"/dev/{lv[0]}/{lv[1]}"
            if os.path.exists(dm_path):        # activated LV (device-mapper): a block device
                return self._resolve_path(dm_path, want_blk=True)
            return self._resolve_lv(*lv)
        if not os.path.exists(target):
            lv = lvm.split_lv_path(target) if target.startswith("/dev/") else None
            if lv is not None and not lvm.device_mapper_present() and self.kind != "file":
                return self._resolve_lv(*lv)
            raise ValueError(f"{self.label}: no such file or device")
        return self._resolve_path(target, want_blk=self.kind == "phy")

    def _resolve_path(self, path: str, want_blk: bool) -> DiskSource:
        label = self.label
        try:
            st = os.stat(path)
        except OSError as e:
            raise ValueError(f"{label}: {e.strerror}") from None
        if stat.S_ISBLK(st.st_mode):
            if not self.readonly:
                _check_blk_writable(path, label)
            return DiskSource("phy", path, ("blk", os.major(st.st_rdev), os.minor(st.st_rdev)), None, label)
        if want_blk:
            raise ValueError(f"{label} is not a block device")
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{label} is neither a regular file nor a block device")
        if not self.readonly:
            if not os.access(path, os.W_OK) or not st.st_mode & 0o222:
                ro_fs = False
                try:
                    ro_fs = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
                except OSError:
                    pass
                why = "is on a read-only file system" if ro_fs else \
                    f"is not writable (mode {stat.S_IMODE(st.st_mode):04o})"
                raise ValueError(f"{label} {why}; give access=ro or make it writable")
        return DiskSource("file", path, ("file", st.st_dev, st.st_ino), None, label)

    def _resolve_lv(self, vg: str, name: str) -> DiskSource:
        label = self.label
        try:
            info = lvm.lv_info_blocking(vg, name)
        except lvm.LvmError as e:
            raise ValueError(f"{label}: {e}") from None
        if not self.readonly:
            if info["read_only"]:
                raise ValueError(f"{label}: LV {vg}/{name} is read-only (lvchange -prw {vg}/{name})")
            _check_blk_writable(info["pv"], f"{label}: its PV {info['pv']}")
        return DiskSource("lvm", info["pv"], ("lv", info["uuid"]), (vg, name), label)

    def check(self, in_use: dict) -> None:
        """Refuse this disk before boot (ValueError, one line) if its target is missing, of
        the wrong kind, read-only while access is w, or in use in a conflicting way:
        `in_use` maps a backing store's identity (DiskSource.identity: ("file", st_dev,
        st_ino), ("blk", major, minor) or ("lv", lv_uuid)) to the set of (domid, access)
        using it, access "r" or "w". As xl's block script: a writable user excludes every
        other user; any number of read-only users may share. Blocking (stat, ioctl, lvs)."""
        src = self.resolve()
        _conflict(in_use, src, self.access_char)
        self.source = src

    @property
    def access_char(self) -> str:
        return "r" if self.readonly else "w"


def _check_blk_writable(path: str, label: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"{label}: cannot open: {e.strerror}") from None
    try:
        ro = struct.unpack("i", fcntl.ioctl(fd, BLKROGET, b"\0" * 4))[0]
    except OSError:
        ro = 0
    finally:
        os.close(fd)
    if ro or not os.access(path, os.W_OK):
        raise ValueError(f"{label} is a read-only block device; give access=ro")


def _conflict(in_use: dict, src: DiskSource, access: str) -> str | None:
    users = in_use.get(src.identity) or set()
    writers = sorted(d for d, a in users if a == "w")
    readers = sorted(d for d, a in users if a != "w")
    if writers:
        raise ValueError(f"{src.label} is already in use writable by "
                         + ", ".join(f"d{d}" for d in writers))
    if access == "w" and readers:
        raise ValueError(f"{src.label} is already in use read-only by "
                         + ", ".join(f"d{d}" for d in readers) + "; it cannot also be writable")
    return None


# Cross-process exclusion (two aiovmm processes on one host): a BSD lock, exclusive for a
# writable user, shared for a read-only one. Files lock the image itself; block devices and
# LVs a lock file (udev takes shared locks on block devices while it probes them).
LOCK_DIR = os.environ.get("AIOVMM_LOCK_DIR", "/run/aiovmm/disks")


def _take_lock(src: DiskSource, access: str) -> int:
    """Blocking (mkdir, open, flock): runs in a worker thread (Blkback.claim). Returns the fd
    holding the lock; ValueError (one line) if it cannot be had."""
    if src.kind == "file":
        path = src.path
    else:
        d = LOCK_DIR
        try:
            os.makedirs(d, mode=0o1777, exist_ok=True)
        except OSError:
            d = os.path.join(tempfile.gettempdir(), "aiovmm-disks")
            try:
                os.makedirs(d, mode=0o1777, exist_ok=True)
            except OSError as e:
                raise ValueError(f"{src.label}: cannot create lock directory {d}: {e.strerror}") from None
        path = os.path.join(d, "-".join(str(x) for x in src.identity) + ".lock")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (0 if src.kind == "file" else os.O_CREAT), 0o666)
    except OSError as e:
        raise ValueError(f"{src.label}: cannot open: {e.strerror}") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if access == "w" else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"{src.label} is already in use by another aiovmm process"
                         + ("" if access == "w" else " (writable)")) from None
    except OSError:
        pass                            # no locking on this file system: in-process check only
    return fd


def _close_lock_fd(fut: asyncio.Future) -> None:
    """Done callback for a lock taken after its claim was cancelled: let it go."""
    if not fut.cancelled() and fut.exception() is None:
        os.close(fut.result())


# ------------------------------------------------------------------------------- the ring
class BlkDisconnect(Exception):
    """This vbd stops (frontend closed or misbehaved); the domain carries on."""


class FrontendGone(BlkDisconnect):
    """The frontend closed: the vbd may be reconnected."""


def ring_entries(nr_pages: int) -> int:
    """Slots of a blkif ring over `nr_pages` pages (io/ring.h's __CONST_RING_SIZE: what
    fits after the 64-byte header, rounded down to a power of two): 1 page 32 ... 16 pages 512."""
    n = (nr_pages * PAGE - 64) // SLOT
    return 1 << (n.bit_length() - 1)


class Ring(BackRing):
    """The blkif ring seen from the backend: one page (32 slots of 112 bytes) or, with
    ring-page-order, 2^order granted pages that are not contiguous in machine memory. The
    header is on page 0; a 112-byte request may straddle two pages (copied out piecewise),
    a 16-byte response never does (slot offsets are multiples of 16)."""

    def __init__(self, pages: list[memoryview]) -> None:
        if len(pages) == 1:
            super().__init__(pages[0], RING_SIZE, SLOT)
        else:
            # BackRing checks that the geometry fits one view; here it spans the pages.
            self.v = pages[0]
            self.nr_ents = ring_entries(len(pages))
            self.slot = SLOT
            self.req_cons = 0
            self.rsp_prod_pvt = 0
        self.pages = pages

    def take(self) -> bytes:
        if len(self.pages) == 1:
            return super().take()
        off = self.slot_off(self.req_cons)
        pg, o = divmod(off, PAGE)
        if o + SLOT <= PAGE:
            raw = bytes(self.pages[pg][o:o + SLOT])
        else:
            raw = bytes(self.pages[pg][o:]) + bytes(self.pages[pg + 1][:o + SLOT - PAGE])
        self.req_cons = (self.req_cons + 1) & 0xFFFFFFFF
        return raw

    def respond(self, rid: int, op: int, status: int) -> None:
        pg, o = divmod(self.next_response_off(), PAGE)
        _RSP.pack_into(self.pages[pg], o, rid, op, status)
        self.respond_done()



@dataclasses.dataclass
class _Pending:
    """A validated request on its way through the pool."""
    rid: int
    op: int
    io: bio.IORequest
    maps: list
    sectors: int


# ----------------------------------------------------------------------------- the backend
class Blkback(YieldDrained):
    """One vbd of one domain. `devid` is the disk's index in the domain's config (it picks
    the default vdev); the xenstore device id is Xen's number for the vdev (xvda = 51712)."""

    def __init__(self, dom: "Domain", devid: int, cfg: DiskConfig, *,
                 jobs_per_batch: int | None = None) -> None:
        self.dom = dom
        self.index = devid
        self.cfg = cfg
        self.vdev = cfg.vdev or default_vdev(devid)
        self.devid = vdev_to_devid(self.vdev)
        self.ifname = self.vdev               # name used in task names and logs
        self.readonly = cfg.readonly
        self.front = f"/local/domain/{dom.domid}/device/vbd/{self.devid}"
        self.back = f"/local/domain/0/backend/vbd/{dom.domid}/{self.devid}"
        self.jobs_per_batch = max(1, jobs_per_batch or JOBS_PER_BATCH)
        self.stats = BlkStats()
        self.backing: bio.Backing | None = None
        self.ring: Ring | None = None
        self.port = None
        self._ring_maps: list = []                  # the ring's page grants (1 << ring-page-order)
        # feature-persistent (negotiated per connection): gref -> its mapping, kept until the
        # disconnect. Each holds the granted frame's references (general + writable type) like
        # any host mapping, so the frame stays the guest's and cannot become a page table while
        # mapped, whatever the guest later writes into its grant entry.
        self.persistent = False
        self.max_persistent = MAX_PERSISTENT_GRANTS       # per ring (set at connect)
        self.transient_cost = TRANSIENT_SEGMENT_COST      # (set at connect)
        self._pgnts: dict[int, grants.HostMapping] = {}
        # gref -> host address of its page, for every key of _pgnts (set and cleared with it).
        self._paddr: dict[int, int] = {}
        # gref -> loop time of its last use, for every key of _pgnts (the purge's LRU order).
        self._pused: dict[int, float] = {}
        self._poverflow = False                    # a grant was refused a slot since the purge
        self._now = 0.0                            # loop time of the current drain
        self._next_lru = 0.0
        # Every validated request not yet released (id -> it): the persistent grants its
        # segments use are active and cannot be purged (their pages are under I/O).
        self._live: dict[int, _Pending] = {}
        # Reads and writes through io_uring when the kernel allows it (per connection).
        self.use_uring = True
        self.uring: Uring | None = None
        self._kick = asyncio.Event()
        self._done: list[_Pending] = []            # completed, not yet answered
        self._futures: set[asyncio.Future] = set()
        self._inflight = 0
        self._held: _Pending | None = None         # an ordering point waiting for the drain
        self._blocked = False                      # an ordering point is queued or running
        self.connected = asyncio.Event()
        self.error: str | None = None
        self.discard = False                       # feature-discard offered (set by run())
        self._claim: tuple | None = None          # (identity, (domid, access)) in in_use
        self._lock_fd = -1
        self.limiter = Limiter(cfg.limit)          # request dispatch waits for tokens
        self._throttled = False
        self.throttle = Throttle(self._kick.set)
        # Take requests at the domain's slice ends (Domain.yield_drains) instead of asking
        # the guest for a notification per request (ring.BackRing.more_requests).
        self.drain_on_yield = DRAIN_ON_YIELD
        self._yield_fn = self._on_yield             # the one bound method registered

    # -- exclusion (the toolstack's part, before the domain runs) ------------------------------
    async def claim(self, in_use: dict) -> None:
        """Record this vbd's use of its backing store in `in_use` (see DiskConfig.check) and
        take the cross-process lock (exclusive if writable, shared if read-only). Raises
        BuildError (one line) on a conflict, including one with another disk of the same
        domain or another aiovmm process. Call once per vbd; `release` undoes it.

        The blocking part (resolving the source; the lock's mkdir, open and flock) runs in a
        worker thread, never on the loop. The in-process record is made on the loop before
        that await, so two domains created at the same time cannot both claim one image."""
        if self._claim is not None:
            return
        cfg = self.cfg
        access = cfg.access_char
        try:
            src = cfg.source or await asyncio.to_thread(cfg.resolve)
            _conflict(in_use, src, access)
        except ValueError as e:
            raise BuildError(f"disk {self.vdev}: {e}") from None
        cfg.source = src
        entry = (self.dom.domid, access)
        in_use.setdefault(src.identity, set()).add(entry)
        self._claim = (src.identity, entry)
        locking = asyncio.get_running_loop().run_in_executor(None, _take_lock, src, access)
        try:
            self._lock_fd = await asyncio.shield(locking)
        except asyncio.CancelledError:
            locking.add_done_callback(_close_lock_fd)   # the thread finishes regardless
            self.release(in_use)
            raise
        except ValueError as e:
            self.release(in_use)
            raise BuildError(f"disk {self.vdev}: {e}") from None

    def release(self, in_use: dict) -> None:
        """Undo `claim` (idempotent; safe if claim was never called or failed)."""
        if self._claim is not None:
            key, entry = self._claim
            users = in_use.get(key)
            if users is not None:
                users.discard(entry)
                if not users:
                    del in_use[key]
            self._claim = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- toolstack ------------------------------------------------------------------------------
    def publish(self) -> None:
        """Write both device directories (libxl's part), states Initialising."""
        st = self.dom.hypervisor.xenstore.store
        d = self.dom.domid
        write_keys(st, self.front, {
            "backend": self.back, "backend-id": "0", "state": str(int(XenbusState.Initialising)),
            "virtual-device": str(self.devid), "device-type": self.cfg.devtype,
        }, [f"n{d}", "r0"])
        write_keys(st, self.back, {
            "frontend": self.front, "frontend-id": str(d), "online": "1", "removable": "0",
            "bootable": "1", "state": str(int(XenbusState.Initialising)), "dev": self.vdev,
            "type": "phy" if self.cfg.kind in ("phy", "lvm") or self.cfg.target.startswith("/dev/") else "file",
            "mode": "r" if self.readonly else "w", "params": self.cfg.target,
            "device-type": self.cfg.devtype,
        }, ["n0", f"r{d}"])

    @property
    def store(self):
        return self.dom.hypervisor.xenstore.store

    def _set_state(self, s: XenbusState) -> None:
        self.store.write(f"{self.back}/state", str(int(s)))

    def _write_back(self, key: str, value: str) -> None:
        st = self.store
        st.write(f"{self.back}/{key}", value)
        st.set_perms(f"{self.back}/{key}", ["n0", f"r{self.dom.domid}"])

    # -- opening the backing store ------------------------------------------------------------
    async def open_backing(self) -> bio.Backing:
        target = self.cfg.target
        ro = self.readonly
        if self.cfg.kind == "lvm":
            lv = lvm.split_lv_path(target)
            if await bio.run(_exists, f"/dev/{lv[0]}/{lv[1]}"):
                return await bio.run(bio.Backing.open_blocking, f"/dev/{lv[0]}/{lv[1]}", ro)
        elif await bio.run(_exists, target):
            return await bio.run(bio.Backing.open_blocking, target, ro)
        else:
            lv = lvm.split_lv_path(target) if target.startswith("/dev/") else None
        if lv is None:
            raise bio.BackingError(f"{target}: no such file or device")
        if await bio.run(lvm.device_mapper_present):
            raise bio.BackingError(f"{target}: no such device (is the LV active? lvchange -ay {lv[0]}/{lv[1]})")
        try:
            pv, extents, size = await lvm.lv_extents(*lv)
        except lvm.LvmError as e:
            raise bio.BackingError(str(e)) from None
        return await bio.run(bio.Backing.open_blocking, pv, ro, extents, size,
                             f"LV {lv[0]}/{lv[1]} on {pv} ({len(extents)} segments)")

    # -- lifecycle --------------------------------------------------------------------------------
    async def run(self) -> None:
        """The vbd's whole life; runs in the domain's TaskGroup until cancelled."""
        st = self.store
        try:
            self.backing = await self.open_backing()
        except bio.BackingError as e:
            self.error = str(e)
            self._write_back("hotplug-error", self.error)
            self._set_state(XenbusState.Closed)
            raise
        b = self.backing
        info = VDISK_READONLY if self.readonly else 0
        if self.cfg.devtype == "cdrom":
            info |= VDISK_CDROM
        self.discard = b.discard and self.cfg.discard and not self.readonly
        features = {"feature-discard": "1" if self.discard else "0"}
        if self.discard:
            features.update({"discard-granularity": str(b.discard_granularity),
                             "discard-alignment": str(b.discard_alignment), "discard-secure": "0"})
        for k, v in features.items():
            self._write_back(k, v)
        for k, v in {"feature-flush-cache": "1", "feature-barrier": "1",
                     "feature-persistent": "1",
                     "feature-max-indirect-segments": str(MAX_INDIRECT_SEGMENTS),
                     "max-ring-page-order": str(MAX_RING_PAGE_ORDER),
                     "sectors": str(b.sectors), "sector-size": str(SECTOR),
                     "physical-sector-size": str(b.physical_sector_size), "info": str(info),
                     "hotplug-status": "connected", "physical-device-path": b.path}.items():
            self._write_back(k, v)
        watch = Watch(st, f"{self.front}/state", token=f"vbd{self.dom.domid}.{self.devid}")
        try:
            while True:
                self._set_state(XenbusState.InitWait)
                while read_state(st, self.front) not in (XenbusState.Initialised, XenbusState.Connected):
                    await watch.next()
                try:
                    self._connect()
                except BlkDisconnect as e:
                    log.warning("d%d: vbd %s: cannot connect: %s", self.dom.domid, self.vdev, e)
                    self.error = str(e)
                    self._set_state(XenbusState.Closed)
                    return
                self._set_state(XenbusState.Connected)
                self.connected.set()
                log.info("d%d: vbd %s connected: %s, %d sectors%s", self.dom.domid, self.vdev,
                         b.description, b.sectors, " (read-only)" if self.readonly else "")
                outcome = await self._connected_phase(watch)
                await self._disconnect()
                if isinstance(outcome, FrontendGone):
                    log.info("d%d: vbd %s: frontend closed", self.dom.domid, self.vdev)
                    self._set_state(XenbusState.Closed)
                    if not is_online(st, self.back):
                        return                   # being detached: no reconnect (Linux blkback)
                    # Wait for the frontend to start over before offering the device again.
                    while read_state(st, self.front) not in (XenbusState.Initialising, XenbusState.InitWait):
                        await watch.next()
                    continue
                self.error = str(outcome)
                log.warning("d%d: vbd %s disconnected: %s", self.dom.domid, self.vdev, self.error)
                self._set_state(XenbusState.Closing)
                self._set_state(XenbusState.Closed)
                return
        finally:
            watch.close()
            await self._disconnect()
            if self.backing is not None:
                try:
                    await asyncio.shield(bio.run(self.backing.close))
                except (asyncio.CancelledError, OSError):
                    self.backing.close()         # cancelled while closing: finish it here
                self.backing = None
            try:
                if read_state(st, self.back) != XenbusState.Closed:
                    self._set_state(XenbusState.Closed)
            except XsError as e:                 # the backend directory went with the domain
                log.debug("d%d: vbd %s: state Closed not written: %s", self.dom.domid, self.vdev, e)

    async def _connected_phase(self, watch: Watch) -> BlkDisconnect:
        """Serve the ring until the frontend closes or misbehaves; returns why it ended."""
        why = await serve_until(BlkDisconnect, self._serve(), self._watch_front(watch))
        why.sort(key=lambda e: isinstance(e, FrontendGone))
        return why[0] if why else BlkDisconnect("stopped")

    def _connect(self) -> None:
        st = self.store
        order_s = read_str(st, f"{self.front}/ring-page-order", "0") or "0"
        if not re.fullmatch(r"[0-9]{1,2}", order_s) or int(order_s) > MAX_RING_PAGE_ORDER:
            raise BlkDisconnect(f"ring-page-order {order_s!r} is not 0..{MAX_RING_PAGE_ORDER}")
        order = int(order_s)
        if read_str(st, f"{self.front}/multi-queue-num-queues", "1") not in ("1", ""):
            raise BlkDisconnect("multiple queues are not offered")
        keys = ["ring-ref"] if order == 0 else [f"ring-ref{i}" for i in range(1 << order)]
        try:
            refs = [int(read_str(st, f"{self.front}/{k}", "")) for k in keys]
            evtchn = int(read_str(st, f"{self.front}/event-channel", ""))
        except ValueError:
            raise BlkDisconnect(f"frontend keys {keys[0]}../event-channel missing or malformed") from None
        proto = read_str(st, f"{self.front}/protocol", PROTOCOL)
        if proto != PROTOCOL:
            raise BlkDisconnect(f"unsupported protocol {proto!r}")
        self.persistent = read_str(st, f"{self.front}/feature-persistent", "0") == "1"
        # Per ring, as Linux (one ring here); AIOVMM_BLK_MAX_PGRANTS as Linux's module
        # parameter max_persistent_grants (host-wide, read at each connect).
        self.max_persistent = max(0, int(os.environ.get("AIOVMM_BLK_MAX_PGRANTS", "") or MAX_PERSISTENT_GRANTS))
        self.transient_cost = max(1, int(os.environ.get("AIOVMM_BLK_TRANSIENT_COST", "") or TRANSIENT_SEGMENT_COST))
        try:
            for ref in refs:
                self._ring_maps.append(grants.host_map(self.dom, ref))
        except grants.GrantError as e:
            self._release_all_maps(self._ring_maps)
            self._ring_maps = []
            raise BlkDisconnect(f"cannot map ring page grant {ref}: {e}") from None
        try:
            self.port = self.dom.hypervisor.host.endpoint_bind(self.dom.domid, evtchn)
            self.port.link(self._kick)             # guest events wake _serve directly
        except EventError as e:
            self._release_all_maps(self._ring_maps)
            self._ring_maps = []
            raise BlkDisconnect(f"cannot bind event channel {evtchn}: {e}") from None
        self.ring = Ring([m.view for m in self._ring_maps])
        if self.use_uring:
            self.uring = Uring.open(self.ring.nr_ents)
            if self.uring is not None:
                self.uring.after_reap = self._after_reap
        log.info("d%d: vbd %s: ring of %d page(s), %d entries, persistent grants %s",
                 self.dom.domid, self.vdev, len(refs), self.ring.nr_ents,
                 "on" if self.persistent else "off")
        self._done.clear()
        self._held = None
        self._blocked = False
        hook_yield_drain(self.dom.yield_drains, self._yield_fn, self.drain_on_yield)

    async def _disconnect(self) -> None:
        """Wait for I/O in flight (the pool cannot cancel it, and it writes into granted
        pages), answer nothing more, unmap the ring and close the port."""
        hook_yield_drain(self.dom.yield_drains, self._yield_fn, False)
        self.throttle.cancel()
        self._throttled = False
        # An ordering point still waiting for the requests before it never starts now (as
        # Linux's, which waits inside the ring's thread, stopped before the disconnect waits
        # for `inflight`): _completed would start it under the mappings released below.
        if self._held is not None:
            held, self._held = self._held, None
            self._release(held)
        # Until nothing is in flight, including what a completion started meanwhile (an
        # io_uring short transfer redone in the pool): Linux's wait for inflight == 0.
        while self._futures:
            pending = set(self._futures)
            try:
                await asyncio.shield(asyncio.wait(pending))
            except asyncio.CancelledError:
                # Cancelled again while draining: wait anyway, the pages must not go away
                # under a worker thread; then let the cancellation through.
                while self._futures:
                    await asyncio.wait(set(self._futures))
                raise
        self._reads_landed(self._done)           # in the guest's pages, answered or not
        self._release_all(self._done)
        self._done.clear()
        self._inflight = 0
        self._blocked = False
        # Nothing uses a persistent mapping any more: unmap them all (the frames' references
        # go, the guest's grant entries lose GTF_reading/GTF_writing).
        pg, self._pgnts = self._pgnts, {}
        self._paddr = {}
        self._pused = {}
        self._poverflow = False
        self._live = {}
        self._release_all_maps(list(pg.values()))
        self.stats.persistent_grants = 0
        if self.port is not None:
            self.stats.notifies += self.port.notifications
            self.port.close()
            self.port = None
        self._release_all_maps(self._ring_maps)
        self._ring_maps = []
        self.ring = None
        if self.uring is not None:               # nothing in flight: drained above
            self.uring.close()
            self.uring = None
        self.connected.clear()

    async def quiesce(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until no request is in flight and every completed one has its
        response in the ring: the guest is suspended and its last pages are about to be
        copied (migration: an acknowledged write must be in the copy)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while (self._futures or self._done or self._held is not None) and self.ring is not None:
            if loop.time() >= end:
                log.warning("d%d: vbd %s: requests still in flight after %.1f s", self.dom.domid,
                            self.vdev, timeout)
                return
            self._kick.set()
            await asyncio.sleep(0.001)

    async def _watch_front(self, watch: Watch) -> None:
        """As Linux blkback's frontend_changed: the frontend's Closing is answered Closing
        and the ring stays served; its Closed (or Unknown: its directory gone) ends the
        connection, and only then does the backend go Closed (`run`). Linux's frontend at
        shutdown (xenbus_frontend_dev_shutdown) writes Closing and waits up to 5 s to see
        the backend Closing: a backend already Closed is never seen Closing."""
        while True:
            await watch.next()
            state = read_state(self.store, self.front)
            if state == XenbusState.Closing:
                if read_state(self.store, self.back) != XenbusState.Closing:
                    self._set_state(XenbusState.Closing)
            elif state in (XenbusState.Closed, XenbusState.Unknown):
                raise FrontendGone("frontend closed")

    # -- the data path -----------------------------------------------------------------------
    async def _serve(self) -> None:
        r = self.ring
        while True:
            if self.dom.destroyed:
                raise BlkDisconnect("domain destroyed")
            self._pass()
            if not self._blocked and not self._throttled and r.more_requests(self._armed()):
                await asyncio.sleep(0)
                continue
            await self._kick.wait()
            self._kick.clear()

    def _pass(self) -> None:
        """Drain the ring, submit, answer what has completed (one push, one event at most)."""
        r = self.ring
        self._drain()
        if self._done:
            self._answer()
        elif r.rsp_prod_pvt != r.get(8):
            self._push()                         # requests refused while draining

    def _rings_connected(self) -> bool:
        return self.ring is not None

    def _pass_soon(self) -> None:
        self._kick.set()

    def _on_yield(self) -> None:
        """A vCPU of the domain ended a slice: take what it published on the ring (the same
        pass as _serve's, so the same copy-once validation), unless an ordering point or
        the rate limit holds the ring (their completion or timer runs the pass)."""
        r = self.ring
        if r is None or self._blocked or self._throttled or self.dom.destroyed:
            return
        n = r.unconsumed()
        if n < 0:
            self._kick.set()                     # _serve's own pass meets it and disconnects
        if n <= 0:
            return
        self.stats.yield_passes += 1
        self._pass()

    def _after_reap(self) -> None:
        """io_uring completions were taken (eventfd reader, or inside io_uring_enter):
        answer them now, one push and at most one event, instead of a loop turn later."""
        if self._done and self.ring is not None:
            self._answer()

    def _drain(self) -> None:
        """Consume every published request (unless an ordering point holds the ring)."""
        if self._blocked:
            return
        r = self.ring
        n = r.unconsumed()
        if n < 0:
            self.stats.bad_indices += 1
            raise BlkDisconnect("frontend broke the ring protocol (req_prod beyond the ring)")
        if n == 0:
            return
        self.stats.batches += 1
        if self.persistent:
            self._now = now = asyncio.get_running_loop().time()
            if now >= self._next_lru:
                self._next_lru = now + LRU_INTERVAL
                self._purge_persistent()
        batch: list[_Pending] = []
        self._throttled = False
        limited = self.limiter.active
        budget = DRAIN_SEGMENTS
        while n > 0:
            if limited and self.throttle.blocked(self.limiter):
                self._throttled = True            # the rest stays on the ring for the timer
                break
            if budget <= 0:
                self._kick.set()                  # the rest in the next pass, others first
                break
            raw = r.take()
            n -= 1
            # Its segments (as the request says: a refused one may have mapped that many).
            budget -= 1 + min(int.from_bytes(raw[2:4], "little") if raw[0] == BLKIF_OP_INDIRECT else raw[1],
                              MAX_INDIRECT_SEGMENTS)
            p = self._prepare(raw)
            if p is None:
                continue
            budget -= (self.transient_cost - 1) * len(p.maps)
            self._live[id(p)] = p
            if limited:
                self.limiter.charge(_charged_bytes(p.io))
            if p.op in _ORDERING:
                self._submit(batch)
                batch = []
                self._blocked = True
                if self._inflight:
                    self._held = p                  # starts when everything before it is done
                else:
                    self._submit([p])
                return
            batch.append(p)
        self._submit(batch)

    # -- limits ------------------------------------------------------------------------------------
    def set_limit(self, limit: Limit | None) -> None:
        """Set or lift (None) the vbd's iops/bps limit at run time."""
        self.cfg.limit = limit
        self.limiter.set(limit)
        log.info("d%d: vbd %s: limit %s", self.dom.domid, self.vdev,
                 limit.describe() if limit else "none")
        self._kick.set()

    def _error(self, rid: int, op: int, status: int = BLKIF_RSP_ERROR) -> None:
        self.ring.respond(rid, op, status)
        if status == BLKIF_RSP_EOPNOTSUPP:
            self.stats.unsupported += 1
        else:
            self.stats.errors += 1

    def _prepare(self, raw: bytes) -> _Pending | None:
        """Validate one request and map its segments; None if it was answered already."""
        op, nseg, _handle, rid, sector = _REQ.unpack_from(raw)
        st = self.stats
        if op == BLKIF_OP_INDIRECT:
            return self._prepare_indirect(raw)
        if nseg == 0 and op in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
            # A flush or barrier without data is a flush, as in Linux blkback
            # (dispatch_rw_block_io: zero segments are allowed only for the PREFLUSH
            # operations): blkfront sends one for every REQ_PREFLUSH.
            return _Pending(rid, op, bio.IORequest("flush"), [], 0)
        if op == BLKIF_OP_DISCARD and self.discard:
            # The secure flag is ignored: discard-secure is 0 (blkif.h).
            _op, _flag, _h, rid, sector, nr = _DISCARD.unpack_from(raw)
            if self.readonly:
                st.ro_rejects += 1
                self._error(rid, op)
                return None
            if sector + nr > self.backing.sectors:
                st.bad_requests += 1
                self._error(rid, op)
                return None
            return _Pending(rid, op, bio.IORequest("discard", sector * SECTOR, (), nr * SECTOR), [], nr)
        if op not in (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE):
            self._error(rid, op, BLKIF_RSP_EOPNOTSUPP)
            return None
        if not 1 <= nseg <= MAX_SEGMENTS:
            st.bad_requests += 1
            self._error(rid, op)
            return None
        return self._prepare_rw(rid, op, sector, raw[24:24 + 8 * nseg])

    def _prepare_indirect(self, raw: bytes) -> _Pending | None:
        """BLKIF_OP_INDIRECT: READ or WRITE whose segment descriptors are in granted pages.
        As Linux blkback: indirect_op must be READ or WRITE, 1..MAX_INDIRECT_SEGMENTS
        segments, the response carries indirect_op. Each descriptor page is mapped read-only
        (or found among the persistent grants), the descriptors this request uses are copied
        out once, the page is released, then every segment is validated like a direct one."""
        _op, iop, nseg, rid, sector, _handle, *irefs = _INDIRECT.unpack_from(raw)
        st = self.stats
        if iop not in (BLKIF_OP_READ, BLKIF_OP_WRITE) or not 1 <= nseg <= MAX_INDIRECT_SEGMENTS:
            st.bad_requests += 1
            self._error(rid, iop)
            return None
        descs = bytearray()
        for i in range(-(-nseg // SEGS_PER_INDIRECT_PAGE)):
            n = min(SEGS_PER_INDIRECT_PAGE, nseg - i * SEGS_PER_INDIRECT_PAGE)
            try:
                m, transient = self._map(irefs[i], readonly=True)
            except grants.GrantError as e:
                log.debug("d%d: vbd %s: bad indirect page grant: %s", self.dom.domid, self.vdev, e)
                st.bad_grants += 1
                self._error(rid, iop)
                return None
            descs += m.view[:8 * n]
            if transient:
                self._release_all_maps([m])
        st.indirect_reqs += 1
        return self._prepare_rw(rid, iop, sector, bytes(descs))

    def _prepare_rw(self, rid: int, op: int, sector: int, descs: bytes) -> _Pending | None:
        """A READ, WRITE, WRITE_BARRIER or FLUSH_DISKCACHE with data: the checks every one
        of them passes, direct or indirect (one place). `descs`: the segment descriptors
        (blkif_request_segment, 8 bytes each), already copied out of guest memory."""
        st = self.stats
        write = op != BLKIF_OP_READ
        n = len(descs) // _SEG.size
        whole = descs[4::8] == _WHOLE_FIRST[:n] and descs[5::8] == _WHOLE_LAST[:n]
        if whole:                                # every segment a whole page (O_DIRECT, 4 KiB aligned)
            total = n * SECTORS_PER_PAGE
            segs = None
        else:
            segs = list(_SEG.iter_unpack(descs))
            total = 0
            for _gref, first, last in segs:
                if not first <= last < SECTORS_PER_PAGE:
                    st.bad_requests += 1
                    self._error(rid, op)
                    return None
                total += last - first + 1
        if write and self.readonly:
            st.ro_rejects += 1
            self._error(rid, op)
            return None
        if sector + total > self.backing.sectors:
            st.bad_requests += 1
            self._error(rid, op)
            return None
        sync = op in (BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE)
        if whole and self.persistent:
            # Whole pages, all of them persistent grants already held: no Python per segment
            # (slices and dict look-ups in C). Otherwise the general path below maps them.
            grefs = array.array("I", descs)[0::2]
            addrs = list(map(self._paddr.get, grefs))
            if None not in addrs:
                flat = [PAGE] * (2 * n)
                flat[0::2] = addrs
                held = self._pgnts
                pieces = list(zip(map(held.__getitem__, grefs), itertools.repeat(0), itertools.repeat(PAGE)))
                self._pused.update(zip(grefs, itertools.repeat(self._now)))
                st.persistent_hits += n
                io = bio.IORequest("write" if write else "read", sector * SECTOR, (), total * SECTOR,
                                   sync=sync, addrs=array.array("Q", flat), segments=pieces)
                return _Pending(rid, op, io, [], total)
            segs = list(_SEG.iter_unpack(descs))
        elif whole:
            segs = list(_SEG.iter_unpack(descs))
        # Per segment (up to 256 in a 1 MiB indirect request) only what io_uring needs: the
        # mapping (a dict hit for a persistent grant) and its iovec in one flat u64 array;
        # the pool's memoryviews are cut from `pieces` only for a request that goes there
        # (IORequest.buffers, in the worker).
        maps, pieces = [], []
        iov = array.array("Q")
        base = self.dom.mem.fd_address
        held = self._pgnts if self.persistent else {}
        hits = 0
        try:
            for gref, first, last in segs:
                m = held.get(gref)
                if m is None:
                    # A READ fills the guest's pages: the grant must be writable.
                    m, transient = self._map(gref, readonly=write)
                    if transient:
                        maps.append(m)
                else:
                    self._pused[gref] = self._now
                    hits += 1
                off = first * SECTOR
                size = (last + 1) * SECTOR - off
                pieces.append((m, off, size))
                iov.append(base + (m.mfn << 12) + off)
                iov.append(size)
        except grants.GrantError as e:
            log.debug("d%d: vbd %s: bad segment grant: %s", self.dom.domid, self.vdev, e)
            self._release_all_maps(maps)
            st.bad_grants += 1
            self._error(rid, op)
            return None
        st.persistent_hits += hits
        # FLUSH_DISKCACHE with data (REQ_PREFLUSH on a write, as Linux blkback submits it)
        # and WRITE_BARRIER: the write, then fdatasync; both are ordering points.
        io = bio.IORequest("write" if write else "read", sector * SECTOR, (), total * SECTOR,
                           sync=sync, addrs=iov, segments=pieces)
        return _Pending(rid, op, io, maps, total)

    def _map(self, gref: int, readonly: bool) -> tuple[grants.HostMapping, bool]:
        """The mapping of grant `gref` and whether it is transient (release it after the
        request) or persistent (kept until the disconnect). Raises GrantError.

        With feature-persistent a grant is mapped writable the first time it is seen (blkif.h:
        the frontend lets the backend map every grant with write access) and kept, up to
        `max_persistent` grants; a grant that cannot be mapped writable (a read-only grant)
        or one past the bound is mapped for this request only, with the access it needs."""
        if self.persistent:
            m = self._pgnts.get(gref)
            if m is not None:
                self.stats.persistent_hits += 1
                self._pused[gref] = self._now
                return m, False
            if len(self._pgnts) >= self.max_persistent:
                self._poverflow = True           # the purge makes room (Linux: overflow_max_grants)
            else:
                try:
                    m = grants.host_map(self.dom, gref, readonly=False)
                except grants.GrantError:
                    pass                     # mapped per request below, with its own checks
                else:
                    self._pgnts[gref] = m
                    self._paddr[gref] = self.dom.mem.fd_address + (m.mfn << 12)
                    self._pused[gref] = self._now
                    self.stats.persistent_grants = len(self._pgnts)
                    return m, False
        return grants.host_map(self.dom, gref, readonly=readonly), True

    def _submit(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        loop = asyncio.get_running_loop()
        u = self.uring
        if u is not None:
            # Plain reads and writes go to io_uring (one io_uring_enter for the batch); the
            # rest (flush, barrier, discard, LV extents) to the pool as before.
            rest = []
            sent = 0
            fd = self.backing.fd
            plain = self.backing.extents is None
            for p in batch:
                io = p.io
                if plain and io.addrs and not io.sync and io.op in ("read", "write") and u.free() > 0:
                    fut = u.submit(io.op == "write", fd, io.offset, io.addrs,
                                   lambda f, p=p: self._uring_done(f, p),
                                   offload=io.length >= URING_OFFLOAD_BYTES)
                    self._futures.add(fut)
                    sent += 1
                else:
                    rest.append(p)
            if sent:
                self.stats.uring_reqs += sent
                self._inflight += sent
                self.stats.max_inflight = max(self.stats.max_inflight, self._inflight)
                u.flush()
            batch = rest
            if not batch:
                return
        k = max(1, min(self.jobs_per_batch, -(-len(batch) // REQS_PER_JOB)))
        size = -(-len(batch) // k)
        for i in range(0, len(batch), size):
            chunk = batch[i:i + size]
            fut = loop.run_in_executor(bio.pool(), self.backing.run_batch, [p.io for p in chunk])
            self._futures.add(fut)
            fut.add_done_callback(lambda f, c=chunk: self._completed(f, c))
            self.stats.jobs += 1
        self._inflight += len(batch)
        self.stats.max_inflight = max(self.stats.max_inflight, self._inflight)

    def _uring_done(self, fut: asyncio.Future, p: _Pending) -> None:
        """An io_uring completion: done, an error (its errno), or short (the file shrank,
        or a partial transfer): then the whole request is redone in the pool, which loops
        over partial transfers and reads past the end as zeros."""
        if not fut.cancelled():
            e = fut.exception()
            if isinstance(e, OSError):
                p.io.error = e.errno or 5
            elif e is None and fut.result() != p.io.length:
                self._futures.discard(fut)
                redo = asyncio.get_running_loop().run_in_executor(bio.pool(), self.backing.run_batch, [p.io])
                self._futures.add(redo)
                redo.add_done_callback(lambda f, c=[p]: self._completed(f, c))
                self.stats.jobs += 1
                return
        self._completed(fut, [p])

    def _completed(self, fut: asyncio.Future, chunk: list[_Pending]) -> None:
        self._futures.discard(fut)
        if fut.cancelled() or fut.exception() is not None:
            for p in chunk:
                p.io.error = p.io.error or 5
        self._inflight -= len(chunk)
        self._done.extend(chunk)
        if any(p.op in _ORDERING for p in chunk):
            self._blocked = False                # the ordering point itself completed
        elif self._held is not None and self._inflight == 0:
            held, self._held = self._held, None
            self._submit([held])
        self._kick.set()

    def _answer(self) -> None:
        """Write the responses of what has completed, in completion order, at most
        DRAIN_SEGMENTS segments' worth per call, a transient one at TRANSIENT_SEGMENT_COST
        (the rest at the next pass: rule 4, each segment's mapping is released here); one
        event."""
        r = self.ring
        st = self.stats
        k = self._answerable(self._done)
        batch, self._done = self._done[:k], self._done[k:]
        self._reads_landed(batch)
        for p in batch:
            io = p.io
            st.io_ns += io.ns
            if io.error:
                st.io_errors += 1
                st.errors += 1
                status = BLKIF_RSP_ERROR
                log.debug("d%d: vbd %s: I/O error %d", self.dom.domid, self.vdev, io.error)
            else:
                status = BLKIF_RSP_OKAY
                if io.op == "read":
                    st.rd_reqs += 1
                    st.rd_sectors += p.sectors
                elif io.op == "write":
                    st.wr_reqs += 1
                    st.wr_sectors += p.sectors
                if io.op == "flush" or io.sync:
                    st.flushes += 1
                elif io.op == "discard":
                    st.discards += 1
                    st.discard_sectors += p.sectors
            r.respond(p.rid, p.op, status)
            self._release(p)
        if self._done:
            self._kick.set()
        self._push()

    def _answerable(self, done: list[_Pending]) -> int:
        """How many of `done` one _answer call takes (its DRAIN_SEGMENTS budget)."""
        budget = DRAIN_SEGMENTS
        k = 0
        extra = self.transient_cost - 1
        while k < len(done) and budget > 0:
            p = done[k]
            budget -= 1 + len(p.io.segments) + extra * len(p.maps)
            k += 1
        return k

    def _reads_landed(self, ps: list[_Pending]) -> None:
        """The pool or io_uring stored these READs' data into the guest's frames behind
        every vCPU's back: their translations of those pages go before the guest can see a
        response or run on after a disconnect (grants.frame_written, as every host write
        into guest frames), or code read from disk into a page that ran code before runs
        the old bytes on an emulated vCPU. A failed read may have stored part of it. Once
        per page per call, and nothing per page where no engine translates (KVM:
        grants.frames_written consumes the frames only if some engine keeps translations)."""
        grants.frames_written(self.dom, (m.mfn for p in ps if p.io.op == "read"
                                         for m, _off, _n in p.io.segments))

    def _push(self) -> None:
        if self.ring.push_responses():
            self.port.notify()
            self.stats.events_sent += 1

    def _purge_persistent(self) -> None:
        """Linux blkback's purge_persistent_gnt: unmap the persistent grants no request in
        flight uses that were unused for PERSISTENT_UNUSED_S and, when the pool is over its
        bound or was full when a grant needed a slot, at least the bound's LRU_PERCENT_CLEAN
        percent plus the excess, least recently used first. The frontend is not told: a
        purged grant is mapped again (and validated again) the next time a request names it."""
        pg = self._pgnts
        count, bound = len(pg), self.max_persistent
        if count < bound or (count == bound and not self._poverflow):
            num_clean = 0
        else:
            num_clean = min(count, count - bound + bound // 100 * LRU_PERCENT_CLEAN)
        self._poverflow = False
        old = self._now - PERSISTENT_UNUSED_S
        used = self._pused
        if not num_clean and (not used or min(used.values()) > old):
            return
        active = {id(m) for p in self._live.values() for m, _o, _n in p.io.segments}
        victims = []
        for gref in sorted(used, key=used.__getitem__):
            if id(pg[gref]) in active:
                continue
            if len(victims) >= num_clean and used[gref] > old:
                break
            victims.append(gref)
        for gref in victims:
            del self._paddr[gref], used[gref]
        self._release_all_maps([pg.pop(gref) for gref in victims])
        self.stats.persistent_grants = len(pg)
        self.stats.persistent_purged += len(victims)

    def _release(self, p: _Pending) -> None:
        self._live.pop(id(p), None)
        p.io.bufs = ()
        p.io.segments = ()
        self._release_all_maps(p.maps)
        p.maps = []

    def _release_all(self, ps: list[_Pending]) -> None:
        for p in ps:
            self._release(p)

    def _release_all_maps(self, maps: list) -> None:
        for m in maps:
            try:
                m.close()
            except (BufferError, grants.GrantError) as e:   # a view of the page still held
                log.warning("d%d: vbd %s: unmapping a segment: %s", self.dom.domid, self.vdev, e)


def _exists(path: str) -> bool:
    import os
    return os.path.exists(path)
