"""A host backend's batched grant copies (grants.host_copy_from_many / host_copy_to_many:
netback's one call per packet, issue 14): every piece goes through the one check of an
entry (GrantTable.acquire) before its bytes move, and a bad piece in the middle of a batch
gets exactly what Xen's rules allow -- a read batch (one tx packet) is refused whole with
nothing copied; a write batch is answered piece by piece like GNTTABOP_copy's ops, the
refused piece's page untouched, the others written. No pin or type reference is left behind.
"""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor, grants, lab
from aiovmm.abi import PAGE_SHIFT, PAGE_SIZE
from aiovmm.audit import audit
from aiovmm.grants import GTF_permit_access, GTF_readonly, GntSt, GrantError
from aiovmm.memory import PageType
from conftest import kernel

MIB = 64
REF = 10


def run(coro):
    return asyncio.run(coro)


def _setup(hv):
    """A parked frontend granting three of its frames to domid 0 (REF, REF+1, REF+2), each
    page filled with its own byte."""
    b = lab.park(hv, kernel(), 8, "frontend")
    frames = b.spare[:3]
    for k, f in enumerate(frames):
        hv.mem.write(f << PAGE_SHIFT, bytes([0x41 + k]) * PAGE_SIZE)
        b.write_grant(REF + k, GTF_permit_access, 0, f)
    return b, frames


def _page_table_frame(hv, b) -> int:
    """One of the frontend's own page-table frames (typed: never writable)."""
    for mfn in b.dom.p2m:
        if hv.mem.type[mfn] in (PageType.l1, PageType.l2, PageType.l3, PageType.l4):
            return mfn
    raise AssertionError("no page table frame")


BAD_MIDDLE = {
    "revoked": lambda b, f: b.write_grant(REF + 1, 0, 0, f[1]),
    "foreign": lambda b, f: b.write_grant(REF + 1, GTF_permit_access, 7, f[1]),
    "not-the-granters-frame": lambda b, f: b.write_grant(REF + 1, GTF_permit_access, 0, 1),
}


@pytest.mark.parametrize("bad", sorted(BAD_MIDDLE))
def test_a_bad_grant_in_a_read_batch_refuses_it_whole(bad):
    """One tx packet's slots: a revoked, foreign or not-owned grant in the middle refuses
    the batch with the single-copy status, `out` untouched (not even the first piece), and
    the good entries' pins are dropped (GTF_reading cleared)."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b, f = _setup(hv)
            BAD_MIDDLE[bad](b, f)
            out = bytearray(b"hdr")
            with pytest.raises(GrantError) as e:
                grants.host_copy_from_many(b.dom, [(REF, 0, 100), (REF + 1, 0, 100), (REF + 2, 0, 100)], out)
            want = GntSt.bad_page if bad == "not-the-granters-frame" else GntSt.general_error
            assert e.value.status == want
            assert out == b"hdr"
            for ref in (REF, REF + 2):
                assert b.grant_flags(ref) == GTF_permit_access
            assert not b.dom.grants.active
            # the same pieces without the bad one: copied in order, from the right offsets
            grants.host_copy_from_many(b.dom, [(REF + 2, 5, 3), (REF, PAGE_SIZE - 2, 2)], out)
            assert out == b"hdrCCCAA"
            assert audit(hv) == []
    run(main())


def test_a_bad_range_in_a_read_batch_refuses_it_whole():
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b, _f = _setup(hv)
            out = bytearray()
            for seg in ((REF + 1, PAGE_SIZE - 3, 4), (REF + 1, 0, -1), (REF + 1, -1, 2)):
                with pytest.raises(GrantError) as e:
                    grants.host_copy_from_many(b.dom, [(REF, 0, 10), seg, (REF + 2, 0, 10)], out)
                assert e.value.status == GntSt.bad_copy_arg
                assert out == b""
            assert not b.dom.grants.active
            assert audit(hv) == []
    run(main())


BAD_WRITE = dict(BAD_MIDDLE, **{
    "read-only": lambda b, f: b.write_grant(REF + 1, GTF_permit_access | GTF_readonly, 0, f[1]),
})


@pytest.mark.parametrize("bad", sorted(BAD_WRITE) + ["page-table", "range"])
def test_a_bad_piece_in_a_write_batch_is_answered_alone(bad):
    """One rx frame's slots: the bad piece in the middle is refused with the single copy's
    status and writes nothing (its page keeps its bytes); the pieces before and after it are
    written, as GNTTABOP_copy answers each op of a batch; nothing stays pinned or typed."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b, f = _setup(hv)
            victim = f[1]
            off = 0
            if bad == "page-table":
                victim = _page_table_frame(hv, b)
                b.write_grant(REF + 1, GTF_permit_access, 0, victim)
            elif bad == "range":
                off = PAGE_SIZE - 1
            elif bad != "not-the-granters-frame":
                BAD_WRITE[bad](b, f)
            else:
                b.write_grant(REF + 1, GTF_permit_access, 0, 1)
                victim = 1
            before = hv.mem.read(victim << PAGE_SHIFT, PAGE_SIZE)
            type_before = hv.mem.type[victim], hv.mem.type_count[victim]
            errs = grants.host_copy_to_many(b.dom, [(REF, 0, b"x" * 8), (REF + 1, off, b"y" * 8),
                                                    (REF + 2, 8, memoryview(b"z" * 8))])
            want = {"not-the-granters-frame": GntSt.bad_page, "range": GntSt.bad_copy_arg}.get(bad, GntSt.general_error)
            assert errs[0] is None and errs[2] is None
            assert isinstance(errs[1], GrantError) and errs[1].status == want
            assert hv.mem.read(victim << PAGE_SHIFT, PAGE_SIZE) == before
            assert (hv.mem.type[victim], hv.mem.type_count[victim]) == type_before
            assert hv.mem.read(f[0] << PAGE_SHIFT, 9) == b"x" * 8 + b"A"
            assert hv.mem.read(f[2] << PAGE_SHIFT, 17) == b"C" * 8 + b"z" * 8 + b"C"
            for ref in (REF, REF + 2):
                assert b.grant_flags(ref) == GTF_permit_access
            assert not b.dom.grants.active
            assert audit(hv) == []
    run(main())


def test_a_write_batch_may_name_one_grant_twice():
    """Two pieces into one grant (pinned twice, typed twice, both written, all dropped)."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b, f = _setup(hv)
            assert grants.host_copy_to_many(b.dom, [(REF, 0, b"12"), (REF, 2, b"34")]) == [None, None]
            assert hv.mem.read(f[0] << PAGE_SHIFT, 5) == b"1234A"
            assert hv.mem.type_count[f[0]] == 0
            assert b.grant_flags(REF) == GTF_permit_access
            assert audit(hv) == []
    run(main())
