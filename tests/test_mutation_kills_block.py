"""Blkback request validation that bench/mutants.py found untested (issue 9, mutation
testing). The real Blkback validates requests a frontend wrote into the real ring page of a
parked domain (lab.park), with the real grant code mapping the segments: `_prepare` (one
request), `_drain` (the ring), `_connect` (the frontend's xenstore keys) and `_serve`."""
from __future__ import annotations

import asyncio
import os
import struct
import subprocess

import pytest

from aiovmm import Hypervisor, lab
from aiovmm.audit import audit
from aiovmm.grants import GTF_permit_access
from aiovmm.ring import SRING_HDR
from aiovmm.xenbus import write_keys
from backends.block import io as bio
from backends.block.device import (BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_READ,
                                   BLKIF_OP_WRITE, MAX_SEGMENTS, SLOT, BlkDisconnect, Blkback,
                                   DiskConfig, Ring, _DISCARD, _REQ, _RSP, _SEG, _check_blk_writable)
from conftest import kernel

SECTORS = 64


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(SECTORS * 512))
    return str(p)


class Front:
    """A parked domain as a blkfront: its ring page (spare frame) and granted data pages."""

    def __init__(self, hv, path: str, access: str = "rw") -> None:
        self.hv = hv
        self.d = lab.park(hv, kernel(), 8, "blkfront")
        self.ring_mfn = self.d.spare[0]
        cfg = DiskConfig(target=path, access=access)
        self.bb = bb = Blkback(self.d.dom, 0, cfg)
        bb.backing = bio.Backing.open_blocking(path, cfg.readonly)
        bb.discard = True
        bb.ring = Ring([hv.mem.frame(self.ring_mfn)])       # one ring page
        self.prod = 0

    def grant(self, ref: int, i: int) -> int:
        """Grant spare frame i (not the ring) to the backend (domid 0) as `ref`."""
        self.d.write_grant(ref, GTF_permit_access, 0, self.d.spare[1 + i])
        return ref

    def push(self, raw: bytes) -> None:
        """The frontend writes one request into the next slot and publishes it."""
        m = self.hv.mem.frame(self.ring_mfn)
        off = SRING_HDR + (self.prod % 32) * SLOT
        m[off:off + len(raw)] = raw
        self.prod += 1
        struct.pack_into("<I", m, 0, self.prod)

    def rw(self, op: int, rid: int, sector: int, segs: list[tuple[int, int, int]],
           nseg: int | None = None) -> bytes:
        raw = bytearray(SLOT)
        _REQ.pack_into(raw, 0, op, len(segs) if nseg is None else nseg, 0, rid, sector)
        for i, s in enumerate(segs):
            _SEG.pack_into(raw, 24 + 8 * i, *s)
        return bytes(raw)

    def response(self, i: int) -> tuple[int, int, int]:
        m = self.hv.mem.frame(self.ring_mfn)
        return _RSP.unpack_from(m, SRING_HDR + (i % 32) * SLOT)


def _discard(rid: int, sector: int, nr: int) -> bytes:
    raw = bytearray(SLOT)
    _DISCARD.pack_into(raw, 0, BLKIF_OP_DISCARD, 0, 0, rid, sector, nr)
    return bytes(raw)


def test_discard_on_a_readonly_vbd_is_refused(img):
    """DISCARD on a read-only vbd destroys data the guest may not write: an error response,
    counted as a read-only reject, nothing submitted (Linux blkback: -EROFS for a discard
    on a read-only device)."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            f = Front(hv, img, access="ro")
            assert f.bb._prepare(_discard(7, 0, 8)) is None
            assert f.response(0) == (7, BLKIF_OP_DISCARD, -1)
            assert f.bb.stats.ro_rejects == 1
    run(main())


def test_discard_range_ends_exactly_at_the_disk_end(img):
    """A discard up to exactly the last sector is valid; one sector more is an error."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            f = Front(hv, img)
            p = f.bb._prepare(_discard(1, SECTORS - 8, 8))
            assert p is not None and p.sectors == 8
            assert f.bb._prepare(_discard(2, SECTORS - 8, 9)) is None
            assert f.response(0) == (2, BLKIF_OP_DISCARD, -1)
            assert f.bb.stats.bad_requests == 1
    run(main())


def test_read_of_max_segments_is_valid(img):
    """BLKIF_MAX_SEGMENTS_PER_REQUEST (11) segments is a valid request; nr_segments 12 is
    an error (the 12th would be read past the request's slot)."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            f = Front(hv, img)
            segs = [(f.grant(20 + i, i), 0, 0) for i in range(MAX_SEGMENTS)]
            p = f.bb._prepare(f.rw(BLKIF_OP_READ, 3, 0, segs))
            assert p is not None and len(p.maps) == MAX_SEGMENTS and p.sectors == MAX_SEGMENTS
            f.bb._release_all_maps(p.maps)
            assert f.bb._prepare(f.rw(BLKIF_OP_READ, 4, 0, segs, MAX_SEGMENTS + 1)) is None
            assert f.response(0) == (4, BLKIF_OP_READ, -1)
            assert audit(hv) == []
    run(main())


def test_an_ordering_point_holds_the_rest_of_the_ring(img):
    """A FLUSH (an ordering point) is submitted alone; the requests behind it stay on the
    ring until it completes (Linux blkback drains before a flush/barrier). An empty ring is
    not a batch."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            f = Front(hv, img)
            bb = f.bb
            bb._drain()
            assert bb.stats.batches == 0 and bb.ring.req_cons == 0
            f.push(f.rw(BLKIF_OP_FLUSH_DISKCACHE, 1, 0, []))
            f.push(f.rw(BLKIF_OP_WRITE, 2, 0, [(f.grant(21, 0), 0, 0)]))
            bb._drain()
            assert bb._blocked and bb.ring.req_cons == 1 and bb.ring.unconsumed() == 1
            assert bb.stats.batches == 1
            async with asyncio.timeout(10):
                while bb._futures:
                    await asyncio.wait(set(bb._futures))
            bb._release_all(bb._done)
    run(main())


@pytest.mark.parametrize("keys", [{"ring-page-order": "1"}, {"protocol": "x86_32-abi"},
                                  {"ring-page-order": "2", "protocol": "x86_64-abi"}])
def test_connect_refuses_what_is_not_offered(img, keys):
    """A frontend asking for a multi-page ring (not offered) or another ABI's protocol
    disconnects that vbd before its ring is mapped; the plain keys connect."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            f = Front(hv, img)
            bb = f.bb
            store = hv.xenstore.store
            f.d.write_grant(9, GTF_permit_access, 0, f.ring_mfn)
            port = f.d.dom.evtchn.alloc_unbound(0)
            base = {"ring-ref": "9", "event-channel": str(port)}
            write_keys(store, bb.front, {**base, **keys}, [f"n{f.d.domid}"])
            with pytest.raises(BlkDisconnect):
                bb._connect()
            assert not bb._ring_maps and 9 not in f.d.dom.grants.active
            write_keys(store, bb.front, {**base, "ring-page-order": "0", "protocol": "x86_64-abi"},
                       [f"n{f.d.domid}"])
            bb._connect()
            assert len(bb._ring_maps) == 1
            bb.port.close()
            bb._release_all_maps(bb._ring_maps)
    run(main())


def test_serve_stops_for_a_destroyed_domain(img):
    """The data path of a destroyed domain ends (BlkDisconnect) instead of waiting for
    events that cannot come."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            f = Front(hv, img)
            f.bb.dom.destroyed = True
            with pytest.raises(BlkDisconnect, match="destroyed"):
                async with asyncio.timeout(5):
                    await f.bb._serve()
            f.bb.dom.destroyed = False
    run(main())


def test_blk_writable_check_refuses_a_readonly_filesystem(tmp_path):
    """A target the host cannot write (a file on a read-only mount: EROFS even for root) is
    refused for access=rw with a message naming access=ro; a writable file passes."""
    mnt = tmp_path / "romnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "aiovmm-test-ro", str(mnt)], check=True)
    try:
        (mnt / "disk.img").write_bytes(bytes(512))
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        assert not os.access(mnt / "disk.img", os.W_OK)
        with pytest.raises(ValueError, match="access=ro"):
            _check_blk_writable(str(mnt / "disk.img"), "disk")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    w = tmp_path / "w.img"
    w.write_bytes(bytes(512))
    _check_blk_writable(str(w), "disk")


def test_read_of_the_last_sector_is_valid(img):
    """A request ending exactly at the disk's last sector is valid; one sector further is
    an error response (Linux blkback: sector + nr beyond the device size)."""
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            f = Front(hv, img)
            g = f.grant(20, 0)
            p = f.bb._prepare(f.rw(BLKIF_OP_READ, 5, SECTORS - 2, [(g, 0, 1)]))
            assert p is not None and p.sectors == 2
            f.bb._release_all_maps(p.maps)
            assert f.bb._prepare(f.rw(BLKIF_OP_READ, 6, SECTORS - 1, [(g, 0, 1)])) is None
            assert f.response(0) == (6, BLKIF_OP_READ, -1)
            assert audit(hv) == []
    run(main())


def test_a_rate_limited_vbd_leaves_requests_on_the_ring(img):
    """With an iops limit (1 op/s, a 100 ms bucket), _drain dispatches what the bucket
    allows and leaves the rest published on the ring for the timer, instead of taking
    every request at once."""
    from aiovmm.ratelimit import make_limit

    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            f = Front(hv, img)
            bb = f.bb
            bb.set_limit(make_limit(None, 1, 100_000))
            for i in range(4):
                f.push(f.rw(BLKIF_OP_READ, 10 + i, i, [(f.grant(20 + i, i), 0, 0)]))
            bb._drain()
            assert bb._throttled and bb.throttle._handle is not None
            assert 1 <= bb.ring.req_cons < 4 and bb.ring.unconsumed() == 4 - bb.ring.req_cons
            bb.throttle.cancel()
            async with asyncio.timeout(10):
                while bb._futures:
                    await asyncio.wait(set(bb._futures))
            bb._release_all(bb._done)
            assert audit(hv) == []
    run(main())


def test_ring_of_the_largest_offered_order_connects(img):
    """max-ring-page-order is offered inclusive (blkif.h: the frontend may use any order up
    to it): order MAX_RING_PAGE_ORDER connects with 2**order granted pages, one more does not
    (and leaves nothing mapped)."""
    from backends.block.device import MAX_RING_PAGE_ORDER

    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            f = Front(hv, img)
            bb = f.bb
            store = hv.xenstore.store
            n = 1 << MAX_RING_PAGE_ORDER
            for i in range(n):
                f.d.write_grant(40 + i, GTF_permit_access, 0, f.d.spare[1 + i])
            port = f.d.dom.evtchn.alloc_unbound(0)
            keys = {"event-channel": str(port), "protocol": "x86_64-abi",
                    **{f"ring-ref{i}": str(40 + i) for i in range(n)}}
            write_keys(store, bb.front, {**keys, "ring-page-order": str(MAX_RING_PAGE_ORDER + 1)},
                       [f"n{f.d.domid}"])
            with pytest.raises(BlkDisconnect):
                bb._connect()
            assert not bb._ring_maps and not f.d.dom.host_mappings
            write_keys(store, bb.front, {**keys, "ring-page-order": str(MAX_RING_PAGE_ORDER)},
                       [f"n{f.d.domid}"])
            bb._connect()
            assert len(bb._ring_maps) == n and bb.ring.nr_ents == 32 * n
            bb.port.close()
            bb._release_all_maps(bb._ring_maps)
            assert not f.d.dom.host_mappings and audit(hv) == []
    run(main())


def test_short_uring_read_is_redone(img):
    """The image shrank on the host after the vbd opened it (its size is read once): an
    io_uring READ across the new end completes short. The request is redone in the pool,
    which reads past the end as zeros, so the guest's buffer holds the disk's data and then
    zeros, never its own stale bytes reported as read data."""
    from backends.block.uring import Uring

    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            with open(img, "r+b") as fh:
                fh.write(b"\xAB" * SECTORS * 512)
            f = Front(hv, img)
            bb = f.bb
            bb.uring = Uring.open(32)
            if bb.uring is None:
                pytest.skip("io_uring unavailable on this host")
            page = f.d.spare[1]
            hv.mem.frame(page)[:] = b"\xCD" * 4096
            os.truncate(img, (SECTORS - 4) * 512)
            p = bb._prepare(f.rw(BLKIF_OP_READ, 1, SECTORS - 8, [(f.grant(20, 0), 0, 7)]))
            assert p is not None
            bb._submit([p])
            assert bb.stats.uring_reqs == 1
            async with asyncio.timeout(10):
                while bb._futures:
                    await asyncio.wait(set(bb._futures))
            assert bb._done == [p] and not p.io.error
            assert bytes(hv.mem.frame(page)) == b"\xAB" * 2048 + bytes(2048)
            bb._release_all(bb._done)
            bb.uring.close()
            assert audit(hv) == []
    run(main())


def test_a_discard_is_charged_its_range_to_the_byte_limit(tmp_path):
    """bps=: a DISCARD costs the bytes of its range, as a write (QEMU's throttle filter,
    block/throttle.c); a FLUSH costs none. A discard of 1 MiB on a 64 KiB/s vbd leaves the
    limit in debt, so the write behind it waits on the ring for the timer (before: a
    discard was charged nothing, and a guest discarding its whole disk in a loop ran
    unlimited)."""
    from aiovmm.ratelimit import make_limit
    from test_net_writer import _wait
    path = tmp_path / "big.img"
    with open(path, "wb") as fh:
        fh.truncate(4 << 20)

    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            f = Front(hv, str(path))
            bb = f.bb
            bb.limiter.set(make_limit(64 << 10, None, 20_000))
            try:
                f.push(f.rw(BLKIF_OP_FLUSH_DISKCACHE, 1, 0, []))
                bb._pass()                             # the flush: no bytes
                await _wait(lambda: not bb._blocked and bb._held is None and not bb._inflight)
                bb._pass()
                assert f.response(0) == (1, BLKIF_OP_FLUSH_DISKCACHE, 0)
                assert not bb.throttle.blocked(bb.limiter)
                f.push(_discard(2, 0, (1 << 20) // 512))
                f.push(f.rw(BLKIF_OP_WRITE, 3, 0, [(f.grant(21, 0), 0, 7)]))
                bb._pass()                             # the discard, alone (an ordering point)
                assert bb.ring.req_cons == 2
                await _wait(lambda: not bb._blocked and bb._held is None and not bb._inflight)
                bb._pass()                             # its completion's pass
                assert f.response(1) == (2, BLKIF_OP_DISCARD, 0) and bb.stats.discards == 1
                assert bb._throttled and bb.ring.req_cons == 2 and bb.ring.unconsumed() == 1
            finally:
                bb.throttle.cancel()
    run(main())
