"""Block devices: blkback (backends/block) against the guest's blkfront (guests/tests/blk.c).

Real backing stores only: sparse files, loop devices (losetup) and an LVM logical volume on a
loop device, served without device-mapper by mapping its extents onto the PV. Every guest
write is checked from the host afterwards by reading the file or device itself.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import time
import uuid

import pytest

from aiovmm import Hypervisor, ShutdownReason
from aiovmm.backends.block import Blkback, DiskConfig
from aiovmm.backends.block import device as blkdev
from aiovmm.backends.block.device import vdev_to_devid
from aiovmm.errors import BuildError
from aiovmm.xenbus import XenbusState, read_state
from conftest import (BUILD, GUESTS_DIR, HV_MEMORY_MIB, ROOT, _cli_command, attach_loop, guest, host_run,
                      lvm_on_loop, results, run_cli)

PREFIX = f"aiovmm-blk-{uuid.uuid4().hex[:8]}"
M64 = (1 << 64) - 1


# ------------------------------------------------------------------------ the pattern
def _word(seed: int, sector: int, w: int) -> int:
    x = (seed * 0x9E3779B97F4A7C15 + sector * 0xC2B2AE3D27D4EB4F + w) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def pattern(seed: int, sector: int) -> bytes:
    """Sector `sector` of blk.c's pattern for `seed` (512 bytes)."""
    return struct.pack("<64Q", *(_word(seed, sector, w) for w in range(64)))


def pattern_range(seed: int, start: int, n: int) -> bytes:
    return b"".join(pattern(seed, s) for s in range(start, start + n))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def blk_guest():
    path = BUILD / "tests" / "blk.elf"
    if not path.exists():
        subprocess.run(["make", "-C", str(GUESTS_DIR)], check=True, stdout=subprocess.DEVNULL)
    assert path.exists()
    return str(path)


@pytest.fixture
def disk_file(tmp_path):
    def make(size_mib: int = 4, name: str = "disk.img") -> str:
        p = tmp_path / f"{PREFIX}-{name}"
        with open(p, "wb") as f:
            f.truncate(size_mib << 20)
        return str(p)
    return make


def _detach_all(backing: str) -> None:
    out = host_run("losetup", "-j", backing, "-O", "NAME", "-n", check=False).stdout
    for dev in out.split():
        host_run("losetup", "-d", dev, check=False)


@pytest.fixture
def loop_device(tmp_path):
    if shutil.which("losetup") is None:
        pytest.skip("losetup (util-linux) is not installed")
    made: list[str] = []

    def make(size_mib: int = 4) -> tuple[str, str]:
        backing = str(tmp_path / f"{PREFIX}-loop{len(made)}.img")
        with open(backing, "wb") as f:
            f.truncate(size_mib << 20)
        made.append(backing)
        return attach_loop(backing), backing
    try:
        yield make
    finally:
        for b in made:
            for dev in host_run("losetup", "-j", b, "-O", "NAME", "-n", check=False).stdout.split():
                host_run("blockdev", "--setrw", dev, check=False)
            _detach_all(b)


@pytest.fixture
def lvm_volume(tmp_path):
    """A VG on a loop device with two LVs; lv0 is split in two segments around lv1:
    lv0 = extents 0-1 and 3-4, lv1 = extent 2 (4 MiB extents). Yields a dict."""
    with lvm_on_loop(tmp_path, "aiovmmtest", 32, [("lv0", "8M"), ("lv1", "4M"), ("lv0", "16M")]) as v:
        with open(v.dev, "r+b") as f:          # lv1 (extent 2) full of data, not zeros
            f.seek(v.pe_start + 2 * v.extent)
            f.write(os.urandom(v.extent))
            os.fsync(f.fileno())
        yield {"vg": v.vg, "dev": v.dev, "backing": v.backing, "target": f"/dev/{v.vg}/lv0",
               "pe_start": v.pe_start, "extent": v.extent, "lv0_extents": [0, 1, 3, 4],
               "lv1_extents": [2]}


async def run_guest(cmdline: str, disks: list, *, timeout: float = 60.0, memory_mib: int = 16):
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
        dom = await hv.create(guest("blk"), memory_mib=memory_mib, cmdline=cmdline, disks=disks)
        async with asyncio.timeout(timeout):
            reason = await dom.wait()
        backs = [b for b in dom.backends if isinstance(b, Blkback)]
        states = {b.vdev: read_state(hv.xenstore.store, b.back) for b in backs}
        return dom, reason, results(list(dom.console_lines)), backs, states


def assert_rw_ok(dom, reason, res, n: int) -> None:
    assert reason == ShutdownReason.poweroff, (dom.describe_end(), dom.console_lines)
    assert res["write"] == str(n), dom.console_lines
    assert res["flush"] == "0"
    assert res["ordered"] == "0"                     # FLUSH + WRITE_BARRIER behind writes in flight
    assert res["read_ok"] == str(n)
    assert res["errors"] == "0"
    assert int(res["io_ns"]) > 0


def read_host(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------- tests
def test_diskconfig_parse():
    c = DiskConfig.parse("target=/path/a.img,vdev=xvda,access=rw")
    assert (c.target, c.vdev, c.readonly, c.format) == ("/path/a.img", "xvda", False, "raw")
    c = DiskConfig.parse("vdev=xvdb,access=ro,target=/weird,name.img")
    assert (c.target, c.vdev, c.readonly) == ("/weird,name.img", "xvdb", True)
    c = DiskConfig.parse("phy:/dev/loop7,xvdc,w")
    assert (c.target, c.vdev, c.readonly) == ("/dev/loop7", "xvdc", False)
    c = DiskConfig.parse("/img,raw,xvdd,r")
    assert (c.target, c.vdev, c.readonly) == ("/img", "xvdd", True)
    c = DiskConfig.parse("lvm:vg0/data,xvdc,w")
    assert (c.kind, c.target, c.vdev, c.readonly) == ("lvm", "vg0/data", "xvdc", False)
    c = DiskConfig.parse("vdev=xvdb,no-discard,target=phy:/dev/loop3")
    assert (c.kind, c.target, c.discard) == ("phy", "/dev/loop3", False)
    assert DiskConfig.parse("file:/a.img,xvda,w").kind == "file"
    for bad in ("vdev=xvda", "target=/a,format=qcow2", "target=/a,access=x", "target=/a,vdev=floppy",
                "colour=blue,target=/a", "lvm:novg,xvda,w", "lvm:/,xvda"):
        with pytest.raises(ValueError):
            DiskConfig.parse(bad)
    assert vdev_to_devid("xvda") == 51712 and vdev_to_devid("xvdb") == 51728
    assert vdev_to_devid("xvdq") == (1 << 28) | (16 << 8)


async def test_bad_disk_spec_is_a_build_error(blk_guest):
    from aiovmm.errors import BuildError
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
        with pytest.raises(BuildError):
            await hv.create(blk_guest, memory_mib=16, disks=["target=/x,format=qcow2"])


def _uring_available() -> bool:
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            return f.read().strip() == "0"
    except OSError:
        return os.uname().release >= "5.6"


@pytest.mark.parametrize("path", ["uring", "pool"])
async def test_file_write_read_back(disk_file, monkeypatch, path):
    """Both I/O paths: reads and writes through io_uring (where the kernel has it) and all of
    them through the thread pool (AIOVMM_BLK_URING=0, the fallback)."""
    if path == "uring" and not _uring_available():
        pytest.skip("io_uring is disabled on this host")
    monkeypatch.setenv("AIOVMM_BLK_URING", "1" if path == "uring" else "0")
    img = disk_file(4)
    n, seed = 300, 11
    dom, reason, res, (bb,), states = await run_guest(
        f"mode=rw sectors={n} pattern={seed} start=5", [f"target={img},vdev=xvda,access=rw"])
    assert_rw_ok(dom, reason, res, n)
    assert dom.console_lines[0] == "blk: sectors=8192 size=512 ro=0"
    # The host sees exactly what the guest wrote, and nothing around it.
    assert read_host(img, 5 * 512, n * 512) == pattern_range(seed, 5, n)
    assert read_host(img, 0, 5 * 512) == bytes(5 * 512)
    assert read_host(img, (5 + n) * 512, 4096) == bytes(4096)
    s = bb.stats
    assert s.wr_sectors == n + 40 and s.rd_sectors == n and s.flushes == 3 and s.errors == 0
    assert s.events_sent <= s.batches + s.jobs + s.uring_reqs   # at most one event per batch of completions
    assert states["xvda"] == XenbusState.Closed      # the guest closed the device before poweroff
    # Plain reads and writes (not the barrier) went through io_uring, or none did.
    assert (s.uring_reqs >= 2 * -(-n // 64)) if path == "uring" else s.uring_reqs == 0, s


@pytest.mark.parametrize("drain", [True, False])
async def test_drain_at_slice_ends_instead_of_notifications(disk_file, monkeypatch, drain):
    """Issue 14: blkback takes the ring at the domain's slice ends and leaves req_event
    unarmed, so a frontend that follows the ring macros (the C blkfront pushes with
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY) stops notifying after its first push; the same
    I/O reads back. Switched off (AIOVMM_DRAIN_ON_YIELD=0), it notifies as before."""
    monkeypatch.setattr(blkdev, "DRAIN_ON_YIELD", drain)
    img = disk_file(4)
    n, seed = 1200, 3
    dom, reason, res, (bb,), states = await run_guest(
        f"mode=rw sectors={n} pattern={seed}", [f"target={img},vdev=xvda,access=rw"])
    assert_rw_ok(dom, reason, res, n)
    assert read_host(img, 0, n * 512) == pattern_range(seed, 0, n)
    s = bb.stats
    requests = s.rd_reqs + s.wr_reqs + s.flushes
    assert requests >= 40, s
    if drain:
        assert s.yield_passes >= 1 and s.notifies <= 2, s      # the push past req_event 1 (+ a barrier)
    else:
        assert s.yield_passes == 0 and s.notifies >= 5, s
    assert not dom.yield_drains                     # unregistered at the disconnect


async def test_frontend_closes_and_reconnects(disk_file):
    """A frontend that closes (Closing, Closed) and starts over (Initialising, as a reloaded
    driver does) finds the backend back in InitWait (Linux blkback frontend_changed: "prepare
    for reconnect") and connects a new ring: the pattern it wrote reads back through it, and
    the first connection's grants and mappings were all let go."""
    img = disk_file(1)
    n, seed = 64, 5
    dom, reason, res, (bb,), states = await run_guest(
        f"mode=rw sectors={n} pattern={seed} reconnect=1", [f"target={img},vdev=xvda,access=rw"])
    assert_rw_ok(dom, reason, res, n)
    assert res["reconnect_state"] == str(int(XenbusState.InitWait)), dom.console_lines
    assert res["reconnect_read_ok"] == str(n), dom.console_lines
    assert bb.stats.rd_sectors == 2 * n and bb.stats.errors == 0, bb.stats
    assert bb.error is None and states["xvda"] == XenbusState.Closed
    assert read_host(img, 0, n * 512) == pattern_range(seed, 0, n)


# Each point of a vbd's life at which the domain's end can find it, as (whose state, state,
# how many times seen): the backend's InitWait and Connected, the frontend's Closing and the
# backend's answer, the frontend's Closed (the race: it and the cancel in one loop turn), the
# backend's Closed, the frontend starting over (Initialising) and the backend's InitWait again.
_END_POINTS = [("back", XenbusState.Initialising, 1), ("back", XenbusState.InitWait, 1),
               ("back", XenbusState.Connected, 1), ("front", XenbusState.Closing, 1),
               ("back", XenbusState.Closing, 1), ("front", XenbusState.Closed, 1),
               ("back", XenbusState.Closed, 1), ("front", XenbusState.Initialising, 2),
               ("back", XenbusState.InitWait, 2)]


@pytest.mark.parametrize("side,state,nth", _END_POINTS,
                         ids=[f"{s}-{st.name}-{n}" for s, st, n in _END_POINTS])
async def test_domain_end_at_each_vbd_state(disk_file, side, state, nth):
    """The domain's end cancels its vbd (as _run_domain does once the vCPUs stop) in the
    very loop turn a vbd state is written, at each state of a close and reconnect: the
    vbd's task ends (Closed, disk closed), then the hypervisor exits promptly. At the frontend's Closed, the
    vbd's watch raises FrontendGone in the same turn: Python 3.11's TaskGroup reported that
    and dropped the cancellation, and the vbd waited for a reconnect for ever (the exit hung
    at Linux's poweroff once blkback answered Closing; xenbus.serve_until)."""
    from aiovmm.xenbus import Watch
    img = disk_file(1)
    seen: list[XenbusState] = []
    async with asyncio.timeout(60):
        async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
            dom = await hv.create(guest("blk"), memory_mib=16,
                                  cmdline="mode=rw sectors=64 pattern=9 reconnect=1",
                                  disks=[f"target={img},vdev=xvda,access=rw"])
            bb = next(b for b in dom.backends if isinstance(b, Blkback))
            name = f"d{dom.domid}-Blkback-{bb.devid}"
            while not (task := next((t for t in dom.backend_tasks if t.get_name() == name), None)):
                await asyncio.sleep(0)               # the domain's task starts its backends
            path = bb.back if side == "back" else bb.front
            st = hv.xenstore.store
            watch = Watch(st, f"{path}/state")
            try:
                count = 0
                while True:
                    if dom.done.done():
                        pytest.fail(f"the guest ended before {side} {state.name} #{nth}: {seen}")
                    s = read_state(st, path)
                    if not seen or seen[-1] != s:
                        seen.append(s)
                        count += s == state
                    if count >= nth:
                        break
                    await asyncio.wait_for(watch.next(), 30)
            finally:
                watch.close()
            # In this same turn (no await since the write), the cancel _run_domain sends the
            # backends once the vCPUs stopped; the guest runs on, so a vbd that lost it
            # would go on to serve the reconnect.
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=10)
            assert done, f"vbd task still running after its cancel at {side} {state.name}: {seen}"
            assert task.cancelled() or task.exception() is None
            # Closed, or never started (cancelled before its first step: nothing opened), or
            # no state node at all (Unknown): the domain's teardown removed the backend's
            # directory (seen once in a fresh-clone run at back Closed #1).
            assert read_state(st, bb.back) in (XenbusState.Closed, state, XenbusState.Unknown), seen
            assert bb.backing is None
            dom.shutdown(ShutdownReason.poweroff)
        assert not dom.backend_tasks or all(t.done() for t in dom.backend_tasks)


async def test_vbd_keys(disk_file):
    img = disk_file(1)
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
        dom = await hv.create(guest("blk"), memory_mib=16, cmdline="mode=ro sectors=8",
                              disks=[f"target={img},vdev=xvdb,access=ro"])
        bb = dom.backends[-1]
        await asyncio.wait_for(bb.connected.wait(), 30)
        st = hv.xenstore.store
        key = lambda k: st.read(f"{bb.back}/{k}").decode()
        assert bb.back == f"/local/domain/0/backend/vbd/{dom.domid}/51728"
        assert (key("sectors"), key("sector-size"), key("info"), key("mode")) == ("2048", "512", "4", "r")
        assert key("feature-flush-cache") == "1"
        front = lambda k: st.read(f"{bb.front}/{k}").decode()
        assert front("protocol") == "x86_64-abi"
        assert front("virtual-device") == "51728"
        await asyncio.wait_for(dom.wait(), 30)


async def test_readonly_refuses_writes(disk_file):
    img = disk_file(1)
    n, seed = 64, 3
    with open(img, "r+b") as f:
        f.write(pattern_range(seed, 0, n))
    before = read_host(img, 0, 1 << 20)
    dom, reason, res, (bb,), _ = await run_guest(f"mode=ro sectors={n} pattern={seed}",
                                                 [f"target={img},vdev=xvda,access=ro"])
    assert reason == ShutdownReason.poweroff, dom.console_lines
    assert dom.console_lines[0] == "blk: sectors=2048 size=512 ro=1"
    assert res["ro_write"] == "-1"                   # BLKIF_RSP_ERROR
    assert res["read_ok"] == str(n) and res["errors"] == "0"
    assert read_host(img, 0, 1 << 20) == before      # not a byte changed
    assert bb.stats.ro_rejects == 1 and bb.stats.wr_sectors == 0


async def test_loop_device(loop_device):
    dev, backing = loop_device(4)
    n, seed = 200, 21
    dom, reason, res, (bb,), _ = await run_guest(f"mode=rw sectors={n} pattern={seed} start=100",
                                                 [f"phy:{dev},xvda,w"])
    assert_rw_ok(dom, reason, res, n)
    assert bb.backing is None and bb.stats.wr_sectors == n + 40
    assert read_host(dev, 100 * 512, n * 512) == pattern_range(seed, 100, n)
    os.sync()
    assert read_host(backing, 100 * 512, n * 512) == pattern_range(seed, 100, n)


async def test_lvm_logical_volume(lvm_volume):
    """An LV in two segments: the guest's writes cross the segment boundary and land on the
    right extents of the PV; the neighbouring LV stays untouched."""
    lv = lvm_volume
    ext = lv["extent"]
    boundary = 2 * ext // 512                  # lv0 sector where its second segment starts
    n, seed, start = 512, 5, boundary - 256
    pv, pe = lv["dev"], lv["pe_start"]
    neighbour = lambda: hashlib.sha256(read_host(pv, pe + 2 * ext, ext)).hexdigest()
    before = neighbour()
    dom, reason, res, (bb,), _ = await run_guest(f"mode=rw sectors={n} pattern={seed} start={start}",
                                                 [f"lvm:{lv['vg']}/lv0,xvda,w"])
    assert_rw_ok(dom, reason, res, n)
    assert dom.console_lines[0] == f"blk: sectors={16 * 2048} size=512 ro=0"
    first = read_host(pv, pe + 1 * ext + ext - 256 * 512, 256 * 512)     # end of extent 1
    second = read_host(pv, pe + 3 * ext, 256 * 512)                      # start of extent 3
    assert first + second == pattern_range(seed, start, n)
    assert neighbour() == before                                         # lv1 byte-for-byte untouched
    # The same LV through its /dev path, discarding across the segment boundary: the holes
    # land in lv0's extents on the PV, lv1 still untouched.
    dom, reason, res, (bb,), _ = await run_guest(
        f"mode=discard sectors=1024 pattern=8 start={boundary - 512}",
        [f"target={lv['target']},vdev=xvda,access=rw"])
    assert reason == ShutdownReason.poweroff, dom.console_lines
    assert res["discard"] == "0" and res["discard_zero"] == "512" and res["discard_kept"] == "512", res
    assert neighbour() == before


def test_device_mapper_detection_asks_the_kernel(tmp_path):
    """device_mapper_present() (used by lvm_on_loop and by blkback) follows what the kernel
    registered, never the /dev node: a /dev/mapper/control left by user space on a kernel
    without device-mapper made the LVM tests activate LVs and fail. Fake /proc files: dm's
    misc device or its block major means present; neither (a node or not) means absent; and on
    this host the answer is /proc/misc's."""
    from aiovmm.backends.block.lvm import device_mapper_present
    misc, devices = tmp_path / "misc", tmp_path / "devices"
    misc.write_text("200 tun\n237 loop-control\n")
    devices.write_text("Character devices:\n 10 misc\n\nBlock devices:\n  7 loop\n253 zram\n")
    node = tmp_path / "mapper" / "control"          # a stray node: must not change the answer
    node.parent.mkdir()
    node.write_bytes(b"")
    assert not device_mapper_present(str(misc), str(devices))
    assert not device_mapper_present(str(tmp_path / "absent"), str(tmp_path / "absent2"))
    misc.write_text("200 tun\n236 device-mapper\n")
    assert device_mapper_present(str(misc), str(devices))
    misc.write_text("200 tun\n")
    devices.write_text("Character devices:\n 10 misc\n\nBlock devices:\n  7 loop\n254 device-mapper\n")
    assert device_mapper_present(str(misc), str(devices))
    with open("/proc/misc") as f:
        kernel_has_dm = any(l.split()[1:] == ["device-mapper"] for l in f)
    assert device_mapper_present() == kernel_has_dm


async def test_hostile_frontend(disk_file):
    """Malformed requests are answered with errors; a ring-index violation disconnects that
    vbd only: the guest keeps running and its second vbd still works."""
    a, b = disk_file(1, "a.img"), disk_file(1, "b.img")
    dom, reason, res, (ba, bb), states = await run_guest(
        "mode=hostile pattern=9", [f"target={a},vdev=xvda", f"target={b},vdev=xvdb"])
    assert reason == ShutdownReason.poweroff, dom.console_lines
    errors = ["nseg0", "write_nseg0", "nseg12", "nseg255", "first_gt_last", "last8", "beyond_end", "sector_wrap",
              "bad_gref", "ungranted", "other_domain_grant", "read_into_ro_grant", "second_seg_bad"]
    for k in errors:
        assert res[f"hostile_{k}"] == "-1", k
    # DISCARD is offered (files punch holes): the hostile one (nr_sectors = a segment's bytes)
    # is out of range.
    assert res["hostile_discard"] == "-1"
    assert res["hostile_unknown_op"] == "-2"
    # Indirect descriptors (offered, 256 segments at most): valid reads and a write work, and
    # the write landed; every malformed one is an error: inner op not READ/WRITE, 0 or too
    # many segments, a descriptor page that cannot be mapped, a bad descriptor in the page,
    # a segment grant that cannot be mapped for the direction, a range past the end.
    assert res["indirect_read"] == "0" and res["indirect_write"] == "0" and res["indirect_read256"] == "0"
    for k in ("op", "nested", "nseg0", "nseg257", "bad_page_gref", "page_other_domain", "last8",
              "first_gt_last", "bad_seg_gref", "read_into_ro", "beyond_end"):
        assert res[f"hostile_indirect_{k}"] == "-1", k
    assert res["indirect_page_free"] == "1" and res["indirect_write_free"] == "1"
    assert read_host(a, 16 * 512, 8 * 512) == pattern_range(9, 16, 8)
    # FLUSH_DISKCACHE with a segment is a write followed by the flush (it was answered
    # OKAY without writing before).
    assert res["flush_with_data"] == "0"
    assert read_host(a, 24 * 512, 8 * 512) == pattern_range(9, 24, 8)
    # So is a WRITE_BARRIER with a segment (Linux blkback: drain, then a REQ_PREFLUSH write).
    assert res["barrier_with_data"] == "0"
    assert read_host(a, 32 * 512, 8 * 512) == pattern_range(9, 32, 8)
    # Each of the four (two with data, two without) was answered after its fdatasync.
    assert ba.stats.flushes == 4, ba.stats
    assert ba.stats.indirect_reqs == 3 + 5        # 3 valid, 5 refused after the descriptors were read
    assert res["hostile_after"] == "0"
    # A WRITE_BARRIER or FLUSH_DISKCACHE without segments is a flush (Linux blkback).
    assert res["barrier_nseg0"] == "0" and res["flush_nseg0"] == "0"
    assert res["hostile_grant_free"] == "1"          # the backend released every grant
    assert int(res["hostile_disconnect"]) >= XenbusState.Closing
    assert res["other_ok"] == "1"
    assert states["xvda"] == XenbusState.Closed
    assert ba.stats.bad_indices == 1 and ba.stats.bad_requests == 9 + 7 and ba.stats.bad_grants == 5 + 4
    assert ba.error and "ring" in ba.error
    assert read_host(b, 0, 8 * 512) == pattern_range(9, 0, 8)


def test_multi_page_ring_geometry_and_straddling_slots():
    """A 4-page ring (ring-page-order 2, 128 entries): the 112-byte slot 72 straddles pages
    1 and 2 (it starts at 8128) and comes out whole; responses land in the right page; the
    entry counts are io/ring.h's for 1..16 pages."""
    from aiovmm.backends.block.device import _RSP, Ring, ring_entries
    assert [ring_entries(1 << o) for o in range(5)] == [32, 64, 128, 256, 512]
    pages = [memoryview(bytearray(4096)) for _ in range(4)]
    flat = bytearray(4 * 4096)
    req = bytes(range(112))
    off = 64 + 72 * 112
    flat[off:off + 112] = req
    for i in range(4):
        pages[i][:] = flat[i * 4096:(i + 1) * 4096]
    r = Ring(pages)
    assert r.nr_ents == 128
    r.req_cons = 72
    struct.pack_into("<I", pages[0], 0, 73)              # req_prod
    assert r.unconsumed() == 1 and r.take() == req
    r.rsp_prod_pvt = 72                                  # slot 72's response: 16 bytes at 8128
    r.respond(0x1234, 1, -1)
    assert _RSP.unpack_from(pages[1], off - 4096) == (0x1234, 1, -1)
    struct.pack_into("<I", pages[0], 0, r.rsp_prod_pvt + 129)   # one more than the ring holds
    assert r.unconsumed() == -1


@pytest.mark.parametrize("key,value,why", [
    ("ring-page-order", "5", "ring-page-order"),          # beyond max-ring-page-order 4
    ("ring-page-order", "\u00b2", "ring-page-order"),     # not ASCII digits
    ("ring-page-order", "1", "ring-ref0"),                # 2 pages announced, ring-ref0/1 missing
    ("multi-queue-num-queues", "2", "queues"),            # not offered
])
async def test_bad_ring_parameters_refused(disk_file, key, value, why):
    """Transport parameters the backend did not offer or cannot use: the vbd fails to
    connect (Closed, with a reason) and maps nothing; the domain itself is not harmed (the
    guest's blkfront gives up and panics, as it does for any connection failure)."""
    a = disk_file(1, "r.img")
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
        dom = await hv.create(guest("blk"), memory_mib=16, cmdline="mode=rw sectors=8",
                              disks=[f"target={a},vdev=xvda"])
        # The guest has not run yet (create starts it; nothing has awaited since): the key
        # is there before its blkfront writes ring-ref and moves to Initialised.
        (bb,) = [b for b in dom.backends if isinstance(b, Blkback)]
        hv.xenstore.store.write(f"{bb.front}/{key}", value)
        async with asyncio.timeout(60):
            await dom.wait()
        assert bb.error and why in bb.error, bb.error
        assert read_state(hv.xenstore.store, bb.back) == XenbusState.Closed
        assert not bb._ring_maps and not bb._pgnts and bb.ring is None
        assert any("blkfront" in l for l in dom.console_lines), dom.console_lines


async def test_persistent_grants_hostile_frontend(disk_file, monkeypatch):
    """feature-persistent: the backend keeps the grants it maps. The guest rewrites an entry
    the backend holds to point at another of its pages, then revokes it: reads still land
    in the page first granted (never the new one), writes still come from it. The bound
    (lowered to 2 here) holds: of three fresh grants only one more is kept. Disconnecting
    releases every persistent grant (the guest's entries lose GTF_reading/GTF_writing)."""
    from aiovmm.backends.block import device as blkdev
    monkeypatch.setattr(blkdev, "MAX_PERSISTENT_GRANTS", 2)
    a = disk_file(1, "p.img")
    dom, reason, res, (bb,), states = await run_guest("mode=persistent pattern=5",
                                                      [f"target={a},vdev=xvda"])
    assert reason == ShutdownReason.poweroff, dom.console_lines
    assert res["persist_write"] == "0" and res["persist_held"] == "1"
    assert res["persist_read"] == "0" and res["persist_read_original"] == "8"
    assert res["persist_repointed_untouched"] == "1"
    assert res["persist_write_revoked"] == "0"
    assert read_host(a, 0, 16 * 512) == pattern_range(5, 0, 16)
    assert res["persist_three"] == "0" and res["persist_bound_held"] == "1"
    assert res["persist_still_held_after_close"] == "0" and res["persist_end_access"] == "1"
    assert bb.stats.persistent_hits >= 2 and bb.stats.persistent_grants == 0
    assert not dom.host_mappings


async def test_target_vanishing_after_check_fails_device_only(disk_file):
    """A target that passed the pre-boot check but is gone when the backend opens it: that
    vbd fails (hotplug-error, Closed), the guest sees it and carries on."""
    img = disk_file(1, "vanishing.img")
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
        dom = await hv.create(guest("blk"), memory_mib=16, cmdline="mode=rw sectors=8",
                              disks=[f"target={img},vdev=xvda"])
        os.unlink(img)                       # before the backend task first runs
        async with asyncio.timeout(30):
            await dom.wait()
        (bb,) = [b for b in dom.backends if isinstance(b, Blkback)]
        assert read_state(hv.xenstore.store, bb.back) == XenbusState.Closed
        assert "no such file" in (bb.error or "")
        assert any("blkfront" in l for l in dom.console_lines)


# ------------------------------------------------------------- refusals before boot
def _cli_refused(*disk_specs: str) -> str:
    """Run the CLI with these --disk specs; it must refuse before boot: exit 64, one line."""
    args = ["run", guest("blk"), "--memory", "16", "--cmdline", "mode=rw sectors=8"]
    for d in disk_specs:
        args += ["--disk", d]
    r = run_cli(*args, timeout=30)
    assert r.returncode == 64, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""                                     # the guest never ran
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("aiovmm: disk "), r.stderr
    return lines[0]


def test_refusals_cli(tmp_path, loop_device):
    missing = tmp_path / f"{PREFIX}-missing.img"
    assert "no such file or device" in _cli_refused(f"target={missing},vdev=xvda,access=rw")
    img = tmp_path / f"{PREFIX}-plain.img"
    img.write_bytes(bytes(1 << 20))
    assert "is not a block device" in _cli_refused(f"phy:{img},xvda,w")
    assert "neither a regular file nor a block device" in _cli_refused(f"target={tmp_path}")
    ro = tmp_path / f"{PREFIX}-ro.img"
    ro.write_bytes(bytes(1 << 20))
    ro.chmod(0o444)
    assert "is not writable (mode 0444)" in _cli_refused(f"target={ro},vdev=xvda,access=rw")
    dev, _ = loop_device(1)
    host_run("blockdev", "--setro", dev)
    assert "read-only block device" in _cli_refused(f"phy:{dev},xvda,w")
    assert "no logical volume" in _cli_refused(f"lvm:{PREFIX.replace('-', '')}/nolv,xvda,w")
    # The read-only forms of the same sources boot.
    for spec in (f"target={ro},vdev=xvda,access=ro", f"phy:{dev},xvda,r"):
        r = run_cli("run", guest("blk"), "--memory", "16", "--cmdline", "mode=ro sectors=8",
                    "--disk", spec, timeout=30)
        assert r.returncode == 0 and "result read_ok 0" in r.stdout, (spec, r.stdout, r.stderr)


def test_lv_on_readonly_pv_refused(lvm_volume):
    lv = lvm_volume
    host_run("blockdev", "--setro", lv["dev"])
    try:
        with pytest.raises(ValueError, match="read-only block device"):
            DiskConfig.parse(f"lvm:{lv['vg']}/lv0,xvda,w").check({})
        DiskConfig.parse(f"lvm:{lv['vg']}/lv0,xvda,r").check({})          # read-only is fine
    finally:
        host_run("blockdev", "--setrw", lv["dev"], check=False)


async def _all_released(hv) -> None:
    """Claims are released when a domain is torn down, just after dom.wait() returns."""
    for _ in range(250):
        if not hv.disks_in_use:
            return
        await asyncio.sleep(0.02)
    assert hv.disks_in_use == {}


async def test_shared_image_rules(disk_file):
    """As xl's block script: a writable user excludes every other user (in this hypervisor:
    hv.disks_in_use; in other aiovmm processes: a lock); read-only users share."""
    img, other = disk_file(1, "shared.img"), disk_file(1, "other.img")
    hold = "mode=rw sectors=8 hold=1"
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
        d1 = await hv.create(guest("blk"), memory_mib=16, cmdline=hold, disks=[f"target={img},vdev=xvda"])
        for spec in (f"target={img},vdev=xvda,access=rw", f"file:{img},xvdb,r"):
            with pytest.raises(BuildError, match=r"already in use writable by d1"):
                await hv.create(guest("blk"), memory_mib=16, cmdline=hold, disks=[spec])
        # Two disks of one new domain on one image: refused too, and nothing stays claimed.
        with pytest.raises(BuildError, match="already in use"):
            await hv.create(guest("blk"), memory_mib=16, cmdline=hold,
                            disks=[f"target={other},vdev=xvda", f"target={other},vdev=xvdb,access=ro"])
        # Another aiovmm process is refused as well (cross-process lock).
        line = _cli_refused(f"target={img},vdev=xvda,access=ro")
        assert "in use by another aiovmm process" in line
        d1.shutdown(ShutdownReason.poweroff)
        await asyncio.wait_for(d1.wait(), 30)
        await _all_released(hv)
        # Read-only users share; then a writer is refused while they run.
        ro = [await hv.create(guest("blk"), memory_mib=16, cmdline="mode=ro sectors=8 hold=1",
                              disks=[f"target={img},vdev=xvda,access=ro"]) for _ in range(2)]
        assert len(next(iter(hv.disks_in_use.values()))) == 2
        with pytest.raises(BuildError, match=r"read-only by d\d+, d\d+; it cannot also be writable"):
            await hv.create(guest("blk"), memory_mib=16, cmdline=hold, disks=[f"target={img},vdev=xvda"])
        for d in ro:
            d.shutdown(ShutdownReason.poweroff)
            await asyncio.wait_for(d.wait(), 30)
        await _all_released(hv)
        d3 = await hv.create(guest("blk"), memory_mib=16, cmdline="mode=rw sectors=8",
                             disks=[f"target={img},vdev=xvda"])      # released: writable again
        assert await asyncio.wait_for(d3.wait(), 30) == ShutdownReason.poweroff


# -------------------------------------------------------------- durability
def test_flush_survives_kill9(disk_file):
    """write + FLUSH in the guest, SIGKILL the aiovmm process, then the data is in the image
    (host read) and a second aiovmm (legacy syntax, read-only) reads it back."""
    img = disk_file(4, "kill9.img")
    n, seed, start = 300, 77, 8
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.Popen(_cli_command() + [
        "run", guest("blk"), "--memory", "16",
        "--cmdline", f"mode=rw sectors={n} pattern={seed} start={start} hold=1",
        "--disk", f"target={img},vdev=xvda,access=rw"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    lines = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.strip() == "result hold 1":
                break
        assert "result flush 0" in lines and lines[-1] == "result hold 1", (lines, proc.poll())
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert read_host(img, start * 512, n * 512) == pattern_range(seed, start, n)
    r = run_cli("run", guest("blk"), "--memory", "16",
                "--cmdline", f"mode=ro sectors={n} pattern={seed} start={start}",
                "--disk", f"file:{img},xvda,r", timeout=30)
    assert r.returncode == 0, r.stderr
    res = results(r.stdout.splitlines())
    assert res["read_ok"] == str(n) and res["ro_write"] == "-1", r.stdout


# ----------------------------------------------------------------- DISCARD
@pytest.mark.parametrize("kind", ["file", "loop"])
async def test_discard(kind, disk_file, loop_device):
    if kind == "file":
        path = backing = disk_file(4, "discard.img")
        spec = f"target={path},vdev=xvda,access=rw"
    else:
        path, backing = loop_device(4)
        spec = f"phy:{path},xvda,w"
    n, seed = 1024, 31
    dom, reason, res, (bb,), _ = await run_guest(f"mode=discard sectors={n} pattern={seed}", [spec])
    assert reason == ShutdownReason.poweroff, dom.console_lines
    assert res["feature_discard"] == "1"
    assert int(res["discard_granularity"]) in (512, 4096) and res["discard_alignment"] == "0"
    assert res["discard"] == "0" and res["discard_beyond"] == "-1"
    assert res["discard_zero"] == str(n // 2) and res["discard_kept"] == str(n // 2), res
    assert res["errors"] == "0"
    assert bb.stats.discards == 1 and bb.stats.discard_sectors == n // 2
    # From the host: zeros where discarded, and the file has a hole there now.
    assert read_host(path, n // 4 * 512, n // 2 * 512) == bytes(n // 2 * 512)
    assert read_host(path, 0, n // 4 * 512) == pattern_range(seed, 0, n // 4)
    fd = os.open(backing, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == n // 4 * 512
    finally:
        os.close(fd)


async def test_no_discard_option(disk_file):
    img = disk_file(1, "nodiscard.img")
    dom, reason, res, _, _ = await run_guest("mode=discard sectors=64 pattern=3",
                                             [f"target={img},vdev=xvda,no-discard"])
    assert res["feature_discard"] == "0" and res["discard"] == "-2"


async def test_concurrent_creates_on_one_writable_image_one_wins(disk_file):
    """The disk lock (mkdir, open, flock) is taken in a worker thread, so two creates can be
    at that await together: the in-process claim made before it lets exactly one through."""
    img = disk_file(1, "race.img")
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
        for _ in range(3):
            res = await asyncio.gather(
                *(hv.create(guest("blk"), memory_mib=16, cmdline="mode=rw sectors=8 hold=1",
                            disks=[f"target={img},vdev=xvda"]) for _ in range(2)),
                return_exceptions=True)
            doms = [r for r in res if not isinstance(r, BaseException)]
            errs = [r for r in res if isinstance(r, BaseException)]
            assert len(doms) == 1 and len(errs) == 1, res
            assert isinstance(errs[0], BuildError), errs
            assert f"already in use writable by d{doms[0].domid}" in str(errs[0]), errs
            assert list(hv.disks_in_use.values()) == [{(doms[0].domid, "w")}]
            doms[0].shutdown(ShutdownReason.poweroff)
            await asyncio.wait_for(doms[0].wait(), 30)
            await _all_released(hv)
