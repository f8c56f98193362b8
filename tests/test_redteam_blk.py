"""Red-team attacks on blkback's fast path (persistent grants, indirect descriptors) driven
through the real request handler (Blkback._prepare / _map / _disconnect) against a parked
domain (aiovmm.lab) whose grant table, page tables and balloon the test writes as the guest
would, with a real backing file and the ring on a page the guest granted. Complements
tests/test_block.py, where a C guest sends malformed requests over a real connection.

Rules checked (Linux drivers/block/xen-blkback/blkback.c; xen/common/grant_table.c): a
persistent grant is an ordinary mapping (it holds the frame's general and writable-type
references) so whatever the guest later writes into its grant entry, the backend reaches
only the frame first granted, still the guest's: it cannot be ballooned away or become a
page table while held; segment descriptors are copied once and validated from the copy; a
grant naming a frame the guest does not own, or a page table for a READ (which writes it),
is refused; the persistent bound holds; disconnect releases everything (no host mapping,
no frame reference, grant entries' GTF_reading/GTF_writing cleared), auditor clean.
"""
from __future__ import annotations

import asyncio
import struct

import pytest

from aiovmm import Hypervisor, lab, reservation
from aiovmm.abi import DOMID_INVALID, DOMID_XEN, PAGE_SHIFT, MmuExt
from aiovmm.audit import audit
from aiovmm.backends.block import Blkback, DiskConfig
from aiovmm.backends.block.device import (_INDIRECT, _REQ, _SEG, BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE,
                                          BlkDisconnect, Ring)
from aiovmm.grants import GTF_permit_access, GTF_reading, GTF_readonly, GTF_writing, host_map
from conftest import kernel

RING_REF = 1


def clean(hv: Hypervisor) -> None:
    problems = audit(hv)
    assert not problems, "\n".join(problems[:20])


def sector_bytes(n: int) -> bytes:
    return bytes([(n * 7 + 1) & 0xFF]) * 512


def make_disk(tmp_path) -> str:
    img = tmp_path / "d.img"
    img.write_bytes(b"".join(sector_bytes(i) for i in range(256)))
    return str(img)


async def attach(hv: Hypervisor, a: lab.Parked, img: str, persistent: bool) -> Blkback:
    """The connected state _connect leaves, with the ring on the guest's granted page."""
    bb = Blkback(a.dom, 0, DiskConfig.parse(f"target={img},vdev=xvda"))
    bb.backing = await bb.open_backing()
    ring_frame = a.spare[-1]
    a.write_grant(RING_REF, GTF_permit_access, 0, ring_frame)
    bb._ring_maps = [host_map(a.dom, RING_REF)]
    bb.ring = Ring([m.view for m in bb._ring_maps])
    bb.persistent = persistent
    bb.use_uring = False
    return bb


async def attacker_with_bystander(hv: Hypervisor, img: str, name: str) -> tuple[lab.Parked, lab.Parked, Blkback]:
    """A guest whose vbd is attached with persistent grants, and a bystander beside it."""
    a = lab.park(hv, kernel(), 8, name)
    b = lab.park(hv, kernel(), 8, "bystander")
    return a, b, await attach(hv, a, img, persistent=True)


async def detach_all_released(hv: Hypervisor, a: lab.Parked, bb: Blkback, refs: list[int], frames: list[int]) -> None:
    """Disconnect: no mapping left, no grant still marked in use, the frames unreferenced;
    then the guest goes and nothing of it stays."""
    clean(hv)
    await bb._disconnect()
    bb.backing.close()
    assert not a.dom.host_mappings
    for ref in refs:
        assert a.grant_flags(ref) & (GTF_reading | GTF_writing) == 0, ref
    assert all(hv.mem.refs[f] == 0 for f in frames)
    clean(hv)
    lab.destroy(a)
    clean(hv)


async def detach(hv: Hypervisor, a: lab.Parked, bb: Blkback) -> None:
    """Disconnect and close the disk: no mapping of the guest's left, auditor clean."""
    await bb._disconnect()
    bb.backing.close()
    assert not a.dom.host_mappings
    clean(hv)


def req(op: int, rid: int, sector: int, segs: list[tuple[int, int, int]]) -> bytes:
    raw = _REQ.pack(op, len(segs), 0, rid, sector) + b"".join(_SEG.pack(g, f, l) for g, f, l in segs)
    return raw.ljust(112, b"\0")


def indirect(iop: int, rid: int, sector: int, nseg: int, irefs: list[int]) -> bytes:
    return _INDIRECT.pack(BLKIF_OP_INDIRECT, iop, nseg, rid, sector, 0, *(irefs + [0] * (8 - len(irefs)))).ljust(112, b"\0")


def page(hv: Hypervisor, mfn: int) -> bytes:
    return bytes(hv.mem.frame(mfn))


async def with_hv(fn) -> None:
    async with Hypervisor(memory_mib=64) as hv:
        await fn(hv)


def test_persistent_grant_repointed_revoked_ballooned(tmp_path):
    """The guest grants F, the backend keeps it; the guest re-points the entry at G and
    revokes it, then balloons F out and tries to make F a page table. As in Xen's
    guest_remove_page, giving F back succeeds but F is freed only when its last reference
    goes: while the backend holds it, F stays the guest's (never handed to anyone else) and
    cannot become a page table; later requests with that gref still reach F only (never G);
    disconnect drops the last reference and frees F."""
    img = make_disk(tmp_path)

    async def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 8, "attacker")
        b = lab.park(hv, kernel(), 8, "bystander")
        hv.mem.write_u64(b.spare[0] << PAGE_SHIFT, 0xB57A)
        before_b = {f: page(hv, f) for f in b.dom.frames}
        bb = await attach(hv, a, img, persistent=True)
        F, G = a.spare[0], a.spare[1]
        hv.mem.frame(G)[:] = b"\x47" * 4096
        a.write_grant(10, GTF_permit_access, 0, F)
        p = bb._prepare(req(BLKIF_OP_READ, 1, 3, [(10, 0, 7)]))
        assert p is not None and not p.maps and bb._pgnts[10].mfn == F
        bb.backing.run_batch([p.io])
        bb._release(p)
        assert page(hv, F) == b"".join(sector_bytes(i) for i in range(3, 11))
        # Re-point and revoke: the guest's entry now names G with no access at all.
        a.write_grant(10, 0, 0, G)
        assert reservation.do_memory_op(a.v, reservation.XENMEM_decrease_reservation,
                                        a._args(reservation.RESERVATION.pack(
                                            a._args(struct.pack("<Q", F), 1024), 1, 0, 0, 0x7FF0), 64)) == 1
        assert hv.mem.owner[F] == a.domid and F in hv.mem.released
        assert lab._call(lambda: a.mmuext(MmuExt.PIN_L1_TABLE, F)) < 0
        clean(hv)
        # A write through the same gref comes from F, a read lands in F: never G.
        hv.mem.frame(F)[:512] = b"\xF0" * 512
        p = bb._prepare(req(BLKIF_OP_WRITE, 2, 100, [(10, 0, 0)]))
        assert p is not None and bb.stats.persistent_hits >= 1
        bb.backing.run_batch([p.io])
        bb._release(p)
        with open(img, "rb") as fh:
            fh.seek(100 * 512)
            assert fh.read(512) == b"\xF0" * 512
        p = bb._prepare(req(BLKIF_OP_READ, 3, 20, [(10, 0, 7)]))
        bb.backing.run_batch([p.io])
        bb._release(p)
        assert page(hv, F)[:512] == sector_bytes(20) and page(hv, G) == b"\x47" * 4096
        await bb._disconnect()
        bb.backing.close()
        assert not a.dom.host_mappings and hv.mem.refs[F] == 0
        assert a.grant_flags(10) & (GTF_reading | GTF_writing) == 0
        assert hv.mem.owner[F] == DOMID_INVALID and F not in hv.mem.released
        assert F not in a.dom.frames
        assert {f: page(hv, f) for f in b.dom.frames} == before_b
        clean(hv)
        lab.destroy(a)
        clean(hv)

    asyncio.run(with_hv(body))


def test_persistent_grants_bounded_per_ring_and_purged_lru(tmp_path):
    """A guest names 1,280 distinct grants in five 256-segment indirect READs: the backend
    keeps the bound per ring (Linux blkback's 1,056 here, as AIOVMM_BLK_MAX_PGRANTS=1056 sets
    it; not the guest's whole grant table), maps the rest
    per request and unmaps them with it; the answers are the same. The purge (Linux's
    purge_persistent_gnt) then drops the least recently used 5% of the bound, never a grant a
    request in flight uses, and every grant unused for 60 s. A purged grant the guest then
    re-points at another domain's frame is validated again: an error response."""
    from aiovmm.backends.block import device as blkdev
    img = make_disk(tmp_path)

    async def body(hv: Hypervisor) -> None:
        a, b, bb = await attacker_with_bystander(hv, img, "hoarder")
        assert bb.max_persistent == blkdev.MAX_PERSISTENT_GRANTS == 4112
        bb.max_persistent = 1056
        mem = hv.mem
        desc = a.spare[0]
        a.write_grant(20, GTF_permit_access | GTF_readonly, 0, desc)
        data = a.spare[1:17]
        first = 100
        grefs = list(range(first, first + 5 * 256))
        for i, g in enumerate(grefs):
            a.write_grant(g, GTF_permit_access, 0, data[i % 16])
        transient = []
        for k in range(5):
            mem.frame(desc)[:8 * 256] = b"".join(_SEG.pack(g, 0, 0) for g in grefs[256 * k:256 * (k + 1)])
            p = bb._prepare(indirect(BLKIF_OP_READ, k, 0, 256, [20]))
            assert p is not None
            transient.append(len(p.maps))
            bb.backing.run_batch([p.io])
            assert p.io.error == 0 or p.io.error is None
            bb._release(p)
        assert len(bb._pgnts) == bb.stats.persistent_grants == 1056
        assert transient == [0, 0, 0, 0, 1280 - 1056]
        assert len(a.dom.host_mappings) == 1 + 1056          # ring + the kept ones
        for g in grefs[1056:]:
            assert a.grant_flags(g) & (GTF_reading | GTF_writing) == 0, g
        clean(hv)

        # The bound was hit: the purge drops the excess plus 5% of the bound, oldest first
        # (grefs[0:256] were used at t=0, the rest later), but not what a request in flight
        # holds: grefs[0] and grefs[1] stay while a request on them is live.
        for k, g in enumerate(grefs[:1056]):
            bb._pused[g] = k // 256 * 1.0
        bb._now = 10.0
        mem.frame(desc)[:16] = _SEG.pack(grefs[0], 0, 0) + _SEG.pack(grefs[1], 0, 0)
        live = bb._prepare(indirect(BLKIF_OP_READ, 9, 0, 2, [20]))
        bb._live[id(live)] = live
        bb._pused[grefs[0]] = bb._pused[grefs[1]] = 0.0
        bb._poverflow = True
        bb._purge_persistent()
        gone = [g for g in grefs[:1056] if g not in bb._pgnts]
        assert gone == grefs[2:52] and len(bb._pgnts) == 1006 == bb.stats.persistent_grants
        assert bb.stats.persistent_purged == 50
        for g in gone:
            assert a.grant_flags(g) & (GTF_reading | GTF_writing) == 0, g
        # Under the bound, nothing overflowed and nothing is 60 s old: nothing goes.
        bb._purge_persistent()
        assert len(bb._pgnts) == 1006

        # A purged grant the guest re-points at another domain's frame: validated again.
        a.write_grant(grefs[2], GTF_permit_access, 0, b.spare[0])
        assert bb._prepare(req(BLKIF_OP_READ, 10, 0, [(grefs[2], 0, 7)])) is None
        assert grefs[2] not in bb._pgnts
        # Re-pointed at its own frame again: mapped again and kept (there is room).
        a.write_grant(grefs[2], GTF_permit_access, 0, data[0])
        p = bb._prepare(req(BLKIF_OP_READ, 11, 0, [(grefs[2], 0, 7)]))
        assert p is not None and not p.maps and grefs[2] in bb._pgnts
        bb._release(p)

        # 60 s later, every grant unused since goes, except the live request's two.
        bb._now = 75.0
        bb._purge_persistent()
        assert sorted(bb._pgnts) == sorted([grefs[0], grefs[1]])
        bb._release(live)
        bb._now = 140.0
        bb._purge_persistent()
        assert not bb._pgnts and len(a.dom.host_mappings) == 1
        await detach_all_released(hv, a, bb, [20, RING_REF] + grefs, data)

    asyncio.run(with_hv(body))


def test_persistent_bound_and_bad_grants_in_indirect_requests(tmp_path, monkeypatch):
    """One indirect READ of 8 segments on 8 distinct grants with the bound at 3: three
    are kept, five mapped for the request only and released with it. Then indirect pages
    and segments naming what the guest may not hand over: a pinned page table (READ writes
    it), another domain's frame, Xen's M2P frame, a frame beyond memory: each an error
    response, nothing written anywhere, no mapping left behind."""
    img = make_disk(tmp_path)

    async def body(hv: Hypervisor) -> None:
        a, b, bb = await attacker_with_bystander(hv, img, "indirect")
        mem = hv.mem
        bb.max_persistent = 3
        desc_frame = a.spare[0]
        data = a.spare[1:9]
        a.write_grant(20, GTF_permit_access | GTF_readonly, 0, desc_frame)
        for i, f in enumerate(data):
            a.write_grant(30 + i, GTF_permit_access, 0, f)
        mem.frame(desc_frame)[:64] = b"".join(_SEG.pack(30 + i, 0, 7) for i in range(8))
        p = bb._prepare(indirect(BLKIF_OP_READ, 7, 0, 8, [20]))
        assert p is not None
        assert len(bb._pgnts) == 3 and len(p.maps) == 5 + 0
        # TOCTOU: the descriptors were copied once; rewriting the page now changes nothing.
        mem.frame(desc_frame)[:64] = b"".join(_SEG.pack(999, 0, 8) for _ in range(8))
        bb.backing.run_batch([p.io])
        bb._release(p)
        for i, f in enumerate(data):
            assert page(hv, f) == b"".join(sector_bytes(8 * i + k) for k in range(8))
        assert len(a.dom.host_mappings) == 1 + 3            # ring + the persistent ones
        clean(hv)

        t = a.spare[10]
        assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
        victim = b.spare[0]
        mem.write_u64(victim << PAGE_SHIFT, 0x5EC12E7)
        before_b = {f: page(hv, f) for f in b.dom.frames}
        t_before = page(hv, t)
        bad_frames = (t, victim, mem.m2p_first, mem.nr_frames + 5)
        errors0, grants0 = bb.stats.errors, bb.stats.bad_grants
        for k, bad in enumerate(bad_frames):
            a.write_grant(50, GTF_permit_access, 0, bad)
            # As a segment of a READ (the backend would write into it) ...
            mem.frame(desc_frame)[:8] = _SEG.pack(50, 0, 7)
            assert bb._prepare(indirect(BLKIF_OP_READ, 100 + k, 0, 1, [20])) is None
            # ... as a direct segment, and as the descriptor page itself.
            assert bb._prepare(req(BLKIF_OP_READ, 200 + k, 0, [(50, 0, 7)])) is None
            if bad != t:          # the guest may let the backend read its own table
                assert bb._prepare(indirect(BLKIF_OP_WRITE, 300 + k, 0, 1, [50])) is None
            assert 50 not in bb._pgnts
        assert bb.stats.bad_grants > grants0 and bb.stats.errors > errors0
        assert page(hv, t) == t_before
        assert {f: page(hv, f) for f in b.dom.frames} == before_b
        assert len(a.dom.host_mappings) == 1 + 3
        await detach_all_released(hv, a, bb, [20, RING_REF] + [30 + i for i in range(8)], data)

    asyncio.run(with_hv(body))


def test_whole_page_fast_path_only_for_held_grants(tmp_path):
    """A request of whole-page segments that are all held persistent grants skips the
    per-segment loop (blkback's fast path): its data still lands in the frames first
    granted. One more whole-page segment naming a grant the guest may not hand over (a
    pinned page table) sends the whole request down the checked path: an error response,
    nothing written into the table or the held frames, no mapping added."""
    img = make_disk(tmp_path)

    async def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 8, "fastpath")
        mem = hv.mem
        bb = await attach(hv, a, img, persistent=True)
        data = a.spare[1:4]
        for i, f in enumerate(data):
            a.write_grant(30 + i, GTF_permit_access, 0, f)
        segs = [(30 + i, 0, 7) for i in range(3)]
        p = bb._prepare(req(BLKIF_OP_READ, 1, 0, segs))        # first use: mapped and kept
        assert p is not None and not p.maps and len(bb._pgnts) == 3
        bb.backing.run_batch([p.io])
        bb._release(p)
        for f in data:
            mem.frame(f)[:] = bytes(4096)
        from aiovmm.backends.block.uring import Uring
        bb.uring = Uring.open(32)
        for rid, sector in ((2, 8), (4, 32)):
            hits = bb.stats.persistent_hits
            p = bb._prepare(req(BLKIF_OP_READ, rid, sector, segs))     # all held: the fast path
            assert p is not None and not p.maps and bb.stats.persistent_hits == hits + 3
            if rid == 2 or bb.uring is None:
                bb.backing.run_batch([p.io])       # the pool: views cut from the mappings
                bb._release(p)
            else:
                bb._submit([p])                    # io_uring: the iovec addresses
                async with asyncio.timeout(10):
                    while bb._futures:
                        await asyncio.wait(set(bb._futures))
                assert bb._done == [p] and not p.io.error
                bb._release_all(bb._done)
                bb._done.clear()
            for i, f in enumerate(data):
                assert page(hv, f) == b"".join(sector_bytes(sector + 8 * i + k) for k in range(8))
        if bb.uring is not None:
            bb.uring.close()
            bb.uring = None
        t = a.spare[10]
        assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
        a.write_grant(50, GTF_permit_access, 0, t)
        t_before = page(hv, t)
        held_before = [page(hv, f) for f in data]
        errors, bad = bb.stats.errors, bb.stats.bad_grants
        assert bb._prepare(req(BLKIF_OP_READ, 3, 16, segs + [(50, 0, 7)])) is None
        assert bb.stats.errors == errors + 1 and bb.stats.bad_grants == bad + 1
        assert 50 not in bb._pgnts and len(a.dom.host_mappings) == 1 + 3
        assert page(hv, t) == t_before and [page(hv, f) for f in data] == held_before
        await detach(hv, a, bb)
        lab.destroy(a)
        clean(hv)

    asyncio.run(with_hv(body))


def _front(hv: Hypervisor, bb: Blkback, keys: dict[str, str]) -> None:
    st = hv.xenstore.store
    for k, v in keys.items():
        st.write(f"{bb.front}/{k}", v)


@pytest.mark.parametrize("refs,ok", [
    (["40", "40", "40", "40"], True),           # one page four times: maps, all released
    (["40", "41", "-1", "42"], False),          # negative
    (["40", "41", str(1 << 32), "42"], False),  # beyond the table (and 32 bits)
    (["40", "41", "PT", "42"], False),          # a pinned page table: not mappable writable
    (["40", "41", "OTHER", "42"], False),       # a frame of another domain
])
def test_ring_refs_hostile(tmp_path, refs, ok):
    """ring-page-order 2 with ring-ref0..3 the guest chose. A bad one anywhere: the vbd
    does not connect and nothing stays mapped (the good ones before it are released, the
    event channel is not bound). Repeated good connects and disconnects leak nothing."""
    img = make_disk(tmp_path)

    async def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 8, "rings")
        b = lab.park(hv, kernel(), 8, "bystander")
        mem = hv.mem
        t = a.spare[0]
        assert a.mmuext(MmuExt.PIN_L1_TABLE, t) == 0
        for i, f in enumerate(a.spare[1:4]):
            a.write_grant(40 + i, GTF_permit_access, 0, f)
        a.write_grant(60, GTF_permit_access, 0, t)
        a.write_grant(61, GTF_permit_access, 0, b.spare[0])
        names = [{"PT": "60", "OTHER": "61"}.get(r, r) for r in refs]
        bb = Blkback(a.dom, 0, DiskConfig.parse(f"target={img},vdev=xvda"))
        bb.use_uring = False
        ports0 = len(hv.host.ports)
        refs0 = [mem.refs[f] for f in a.spare[:4]]
        for _ in range(3):
            port = a.dom.evtchn.alloc_unbound(0)
            _front(hv, bb, {"ring-page-order": "2", "event-channel": str(port), "protocol": "x86_64-abi",
                            **{f"ring-ref{i}": r for i, r in enumerate(names)}})
            if ok:
                bb._connect()
                assert bb.ring.nr_ents == 128 and len(bb._ring_maps) == 4
                await bb._disconnect()
            else:
                with pytest.raises(BlkDisconnect):
                    bb._connect()
                assert not bb._ring_maps and bb.ring is None and bb.port is None
            a.dom.evtchn.close(port)
            assert not a.dom.host_mappings and len(hv.host.ports) == ports0
            assert [mem.refs[f] for f in a.spare[:4]] == refs0
            for ref in (40, 41, 42, 60, 61):
                assert a.grant_flags(ref) & (GTF_reading | GTF_writing) == 0, ref
            clean(hv)
        lab.destroy(a)
        clean(hv)

    asyncio.run(with_hv(body))


def test_domain_destroyed_while_grants_held(tmp_path):
    """The domain is destroyed while the backend still holds a persistent and a transient
    grant and a READ into both is still to run (Hypervisor._run_domain stops the backends
    first, but Domain.destroy must not rely on it). As for a guest grantee (Xen keeps a
    dying granter's mapped pages until the last unmap), the mapped frames stay allocated,
    owned by Xen, while the backend maps them: a domain created meanwhile never gets them,
    and the late I/O lands in the orphaned frames, not in its memory. The backend's
    disconnect then frees them: no reference dropped twice, nothing leaks."""
    img = make_disk(tmp_path)

    async def body(hv: Hypervisor) -> None:
        free0 = hv.mem.free_frames
        a = lab.park(hv, kernel(), 8, "dying")
        mem = hv.mem
        bb = await attach(hv, a, img, persistent=True)
        bb.max_persistent = 1
        F, T, R = a.spare[0], a.spare[1], a.spare[-1]          # R: the ring page
        a.write_grant(10, GTF_permit_access, 0, F)
        a.write_grant(11, GTF_permit_access, 0, T)
        p = bb._prepare(req(BLKIF_OP_READ, 1, 0, [(10, 0, 7), (11, 0, 7)]))
        assert p is not None and len(p.maps) == 1 and bb._pgnts[10].mfn == F
        lab.destroy(a)
        clean(hv)
        for f in (F, T, R):
            assert mem.owner[f] == DOMID_XEN and hv.orphan_frames.get(f) == a.domid, hex(f)
            assert mem.refs[f] == 1 and mem.type_count[f] == 1
        assert len(hv.orphan_host_maps) == 3
        c = lab.park(hv, kernel(), 8, "next")
        assert not {F, T, R} & c.dom.frames
        before_c = {f: page(hv, f) for f in c.dom.frames}
        bb.backing.run_batch([p.io])                # the I/O still in flight at destroy
        bb._done.append(p)
        assert page(hv, F) == b"".join(sector_bytes(i) for i in range(8))
        assert page(hv, T) == b"".join(sector_bytes(i) for i in range(8, 16))
        assert {f: page(hv, f) for f in c.dom.frames} == before_c
        clean(hv)
        await bb._disconnect()
        bb.backing.close()
        for f in (F, T, R):
            assert mem.owner[f] == DOMID_INVALID and mem.refs[f] == mem.type_count[f] == 0
        assert not hv.orphan_frames and not hv.orphan_host_maps
        clean(hv)
        lab.destroy(c)
        assert mem.free_frames == free0
        clean(hv)

    asyncio.run(with_hv(body))


def test_bad_segment_after_transient_maps_releases_them(tmp_path):
    """Bound at 1: the first segment's grant is kept, the second mapped for the request,
    the third cannot be mapped. The request is refused and the second's mapping released
    at once (its entry loses GTF_reading/GTF_writing, its frame's references go); only
    the persistent one stays. The same gref 11 times in one request is one grant."""
    img = make_disk(tmp_path)

    async def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 8, "midway")
        mem = hv.mem
        bb = await attach(hv, a, img, persistent=True)
        bb.max_persistent = 1
        F, T = a.spare[0], a.spare[1]
        a.write_grant(10, GTF_permit_access, 0, F)
        a.write_grant(11, GTF_permit_access, 0, T)
        a.write_grant(12, GTF_permit_access | GTF_readonly, 0, a.spare[2])   # READ needs writable
        assert bb._prepare(req(BLKIF_OP_READ, 1, 0, [(10, 0, 7), (11, 0, 7), (12, 0, 7)])) is None
        assert list(bb._pgnts) == [10] and len(a.dom.host_mappings) == 2
        assert a.grant_flags(11) & (GTF_reading | GTF_writing) == 0 and mem.refs[T] == 0
        assert a.grant_flags(12) & (GTF_reading | GTF_writing) == 0
        p = bb._prepare(req(BLKIF_OP_READ, 2, 0, [(10, k, k) for k in range(8)] + [(10, 0, 0)] * 3))
        assert p is not None and not p.maps and p.sectors == 11
        bb.backing.run_batch([p.io])
        bb._release(p)
        clean(hv)
        await bb._disconnect()
        bb.backing.close()
        assert not a.dom.host_mappings and mem.refs[F] == 0
        clean(hv)

    asyncio.run(with_hv(body))
