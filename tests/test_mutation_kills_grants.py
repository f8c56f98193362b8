"""Grant-table checks that bench/mutants.py found no test for (issue 9, mutation testing).

Each drives the real grant code with what a guest (or the toolstack on its behalf) can pass
and asserts what Xen answers, so that weakening the check is noticed.
"""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor, grants, lab
from aiovmm.abi import DOMID_SELF, PAGE_SHIFT, PAGE_SIZE
from aiovmm.audit import audit
from aiovmm.grants import ENTRIES_PER_FRAME, GNTCOPY_dest_gref, GNTCOPY_source_gref, GTF_permit_access, \
    GTF_readonly, GTF_reading, GntSt, GrantError
from conftest import kernel

MIB = 64
REF = 10


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("past", [0, 1, ENTRIES_PER_FRAME])
def test_entry_access_past_the_table_is_bad_gntref(past):
    """An entry number at or past the end of the table (or negative) names no entry: Xen's
    shared_entry_v1 is only reached after `ref < nr_grant_entries`; here it is bad_gntref,
    never an entry of another frame (ref // 512 past the list) or of the last one (ref < 0)."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            d = lab.park(hv, kernel(), 8, "g")
            gt = d.dom.grants
            for ref in (gt.nr_entries + past, -1 - past):
                with pytest.raises(GrantError) as e:
                    gt.read_entry(ref)
                assert e.value.status == GntSt.bad_gntref
                with pytest.raises(GrantError) as e:
                    gt.write_entry(ref, 1, 0, 0)
                assert e.value.status == GntSt.bad_gntref
            for ref in (0, gt.nr_entries - 1):               # the first and the last exist
                gt.write_entry(ref, 1, 7, 0x1234 + ref)
                assert gt.read_entry(ref) == (1, 7, 0x1234 + ref)
    run(main())


def test_grant_ops_past_the_table_are_bad_gntref():
    """GNTTABOP_copy and a host backend's copy naming a reference at or past
    nr_grant_entries: GNTST_bad_gntref (Xen checks `ref >= nr_grant_entries(rgt)` before
    reading the entry); the first and the last entry of the table work."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b = lab.park(hv, kernel(), 8, "granter")
            a = lab.park(hv, kernel(), 8, "grantee")
            gt = b.dom.grants
            for ref in (gt.nr_entries, gt.nr_entries + 1, (1 << 32) - 1):
                st = a.grant_copy((ref, b.domid, 0), (a.spare[0], DOMID_SELF, 0), 8,
                                  GNTCOPY_source_gref)
                assert st == GntSt.bad_gntref
            for ref in (gt.nr_entries, -1):
                with pytest.raises(GrantError) as e:
                    grants.host_copy_from(b.dom, ref, 0, 8)
                assert e.value.status == GntSt.bad_gntref
            hv.mem.write(b.spare[0] << PAGE_SHIFT, b"granted!")
            for ref in (0, gt.nr_entries - 1):                 # the first and the last work
                b.write_grant(ref, GTF_permit_access, 0, b.spare[0])
                assert grants.host_copy_from(b.dom, ref, 0, 8) == b"granted!"
    run(main())


def test_dead_granters_table_refuses_a_backend():
    """A backend that still holds a destroyed frontend's domain (its table is dead, its frames
    freed): every grant access is GNTST_bad_domain, as Xen refuses a dying domain's grants;
    nothing is read from or written to the freed frames."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b = lab.park(hv, kernel(), 8, "frontend")
            f = b.spare[0]
            b.write_grant(REF, GTF_permit_access, 0, f)
            assert grants.host_copy_from(b.dom, REF, 0, 4) == bytes(4)
            dom = b.dom
            lab.destroy(b)
            with pytest.raises(GrantError) as e:
                grants.host_copy_from(dom, REF, 0, 4)
            assert e.value.status == GntSt.bad_domain
            with pytest.raises(GrantError) as e:
                grants.host_copy_to(dom, REF, 0, b"late")
            assert e.value.status == GntSt.bad_domain
            with pytest.raises(GrantError) as e:
                grants.host_map(dom, REF)
            assert e.value.status == GntSt.bad_domain
            assert hv.mem.read(f << PAGE_SHIFT, 4) != b"late"
    run(main())


def _copy_from(a, b, ref: int) -> int:
    """A's GNTTABOP_copy of 8 bytes from B's grant `ref` into A's own spare frame."""
    return a.grant_copy((ref, b.domid, 0), (a.spare[0], DOMID_SELF, 0), 8, GNTCOPY_source_gref)


def _copy_into(a, b, ref: int) -> int:
    """A's GNTTABOP_copy of 8 bytes from its own spare frame into B's grant `ref`."""
    return a.grant_copy((a.spare[0], DOMID_SELF, 0), (ref, b.domid, 0), 8, GNTCOPY_dest_gref)


def test_entry_must_permit_access_to_exactly_this_grantee():
    """Xen's _set_status: an entry whose type is not GTF_permit_access, or that names another
    domain, is GNTST_general_error for the caller; nothing is pinned (flags unchanged)."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b = lab.park(hv, kernel(), 8, "granter")
            a = lab.park(hv, kernel(), 8, "grantee")
            f = b.spare[0]
            for flags, domid in ((GTF_permit_access, a.domid + 7),     # granted to someone else
                                 (0, a.domid),                           # no grant
                                 (2, a.domid),                           # GTF_accept_transfer
                                 (GTF_permit_access | 2, a.domid)):      # type 3
                b.write_grant(REF, flags, domid, f)
                assert _copy_from(a, b, REF) == GntSt.general_error
                assert _copy_into(a, b, REF) == GntSt.general_error
                assert b.grant_flags(REF) == flags
            b.write_grant(REF, GTF_permit_access, a.domid, f)
            assert _copy_from(a, b, REF) == GntSt.okay
            assert audit(hv) == []
    run(main())


def test_readonly_entry_refuses_every_write_pin():
    """GTF_readonly: a copy into the grant is general_error while a copy from it works; and
    with the entry already pinned for reading (a backend's read-only mapping), the first
    write pin re-reads the flags and still refuses (Xen's _set_status on the upgrade)."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b = lab.park(hv, kernel(), 8, "granter")
            a = lab.park(hv, kernel(), 8, "grantee")
            f = b.spare[0]
            hv.mem.write(f << PAGE_SHIFT, b"readonly")
            b.write_grant(REF, GTF_permit_access | GTF_readonly, a.domid, f)
            assert _copy_into(a, b, REF) == GntSt.general_error
            assert _copy_from(a, b, REF) == GntSt.okay
            assert hv.mem.read(f << PAGE_SHIFT, 8) == b"readonly"
            # The upgrade path: pinned read-only by the host backend, then a write.
            b.write_grant(REF + 1, GTF_permit_access | GTF_readonly, 0, f)
            hm = grants.host_map(b.dom, REF + 1, readonly=True)
            try:
                with pytest.raises(GrantError) as e:
                    grants.host_copy_to(b.dom, REF + 1, 0, b"written!")
                assert e.value.status == GntSt.general_error
                with pytest.raises(GrantError) as e:
                    grants.host_map(b.dom, REF + 1)
                assert e.value.status == GntSt.general_error
            finally:
                hm.close()
            assert hv.mem.read(f << PAGE_SHIFT, 8) == b"readonly"
            assert audit(hv) == []
    run(main())


def test_entry_in_use_belongs_to_its_grantee():
    """While the host backend (domid 0) holds B's entry, the active record says who it is
    for: A's copy through the same reference is general_error, even if B rewrites the
    entry to name A (the record, not the guest-writable entry, decides)."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b = lab.park(hv, kernel(), 8, "granter")
            a = lab.park(hv, kernel(), 8, "grantee")
            f = b.spare[0]
            b.write_grant(REF, GTF_permit_access, 0, f)
            hm = grants.host_map(b.dom, REF, readonly=True)
            try:
                assert _copy_from(a, b, REF) == GntSt.general_error
                b.write_grant(REF, GTF_permit_access | GTF_reading, a.domid, f)
                assert _copy_from(a, b, REF) == GntSt.general_error
                assert _copy_into(a, b, REF) == GntSt.general_error
            finally:
                hm.close()
            assert audit(hv) == []
    run(main())


def test_granted_frame_must_be_the_granters():
    """The frame of an entry must be a frame the granter owns (Xen: GNTST_bad_page): not the
    grantee's own frame, not a frame past the end of memory."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b = lab.park(hv, kernel(), 8, "granter")
            a = lab.park(hv, kernel(), 8, "grantee")
            for frame in (a.spare[1], hv.mem.nr_frames, hv.mem.nr_frames + 5, 0xFFFFFFFF):
                b.write_grant(REF, GTF_permit_access, a.domid, frame)
                assert _copy_from(a, b, REF) == GntSt.bad_page
                assert _copy_into(a, b, REF) == GntSt.bad_page
                assert b.grant_flags(REF) == GTF_permit_access
            assert audit(hv) == []
    run(main())


@pytest.mark.parametrize("side", ["src", "dst"])
def test_copy_must_stay_inside_the_page(side):
    """GNTTABOP_copy: offset + length up to exactly PAGE_SIZE is okay, one byte more is
    GNTST_bad_copy_arg (Xen's gnttab_copy_one checks both sides before claiming)."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            a = lab.park(hv, kernel(), 8, "copier")
            s, d = a.spare[0], a.spare[1]
            hv.mem.write((s << PAGE_SHIFT) + PAGE_SIZE - 8, b"lastword")
            for off, length, want in ((PAGE_SIZE - 8, 8, GntSt.okay), (PAGE_SIZE - 8, 9, GntSt.bad_copy_arg),
                                      (PAGE_SIZE - 1, 2, GntSt.bad_copy_arg), (0, PAGE_SIZE, GntSt.okay),
                                      (1, PAGE_SIZE, GntSt.bad_copy_arg)):
                so, do = (off, 0) if side == "src" else (0, off)
                if side == "dst":
                    so = PAGE_SIZE - 8 if length <= 8 else 0
                st = a.grant_copy((s, DOMID_SELF, so), (d, DOMID_SELF, do), length, 0)
                assert st == want, (off, length)
            assert hv.mem.read((d << PAGE_SHIFT) + PAGE_SIZE - 8, 8) == b"lastword"
            assert audit(hv) == []
    run(main())


def test_copy_by_frame_only_of_own_frames():
    """A copy side given by frame number (no GNTCOPY_*_gref) may only name the caller's own
    frames: another domid is GNTST_permission_denied, a frame it does not own (another
    domain's, or past memory) GNTST_bad_page, in either direction; nothing is written."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            a = lab.park(hv, kernel(), 8, "copier")
            b = lab.park(hv, kernel(), 8, "victim")
            mine, theirs = a.spare[0], b.spare[0]
            hv.mem.write(theirs << PAGE_SHIFT, b"victim!!")
            assert a.grant_copy((theirs, b.domid, 0), (mine, DOMID_SELF, 0), 8, 0) == GntSt.permission_denied
            assert a.grant_copy((mine, DOMID_SELF, 0), (theirs, b.domid, 0), 8, 0) == GntSt.permission_denied
            for frame in (theirs, hv.mem.nr_frames, hv.mem.nr_frames + 9):
                for dom in (DOMID_SELF, a.domid):
                    assert a.grant_copy((frame, dom, 0), (mine, DOMID_SELF, 0), 8, 0) == GntSt.bad_page
                    assert a.grant_copy((mine, DOMID_SELF, 0), (frame, dom, 0), 8, 0) == GntSt.bad_page
            assert hv.mem.read(theirs << PAGE_SHIFT, 8) == b"victim!!"
            assert hv.mem.read(mine << PAGE_SHIFT, 8) != b"victim!!"
            assert a.grant_copy((mine, a.domid, 0), (a.spare[1], DOMID_SELF, 0), 8, 0) == GntSt.okay
            assert audit(hv) == []
    run(main())


def test_host_copies_stay_inside_the_granted_page():
    """A host backend's copy from/to a grant: offset and length are checked against the page
    (bad_copy_arg), exactly like a guest's GNTTABOP_copy; the edges themselves work."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b = lab.park(hv, kernel(), 8, "frontend")
            f = b.spare[0]
            b.write_grant(REF, GTF_permit_access, 0, f)
            for off, length in ((-1, 4), (0, -1), (PAGE_SIZE - 3, 4), (PAGE_SIZE, 1), (1, PAGE_SIZE)):
                with pytest.raises(GrantError) as e:
                    grants.host_copy_from(b.dom, REF, off, length)
                assert e.value.status == GntSt.bad_copy_arg
            for off, n in ((-1, 4), (PAGE_SIZE - 3, 4), (PAGE_SIZE, 1), (1, PAGE_SIZE)):
                with pytest.raises(GrantError) as e:
                    grants.host_copy_to(b.dom, REF, off, b"x" * n)
                assert e.value.status == GntSt.bad_copy_arg
            grants.host_copy_to(b.dom, REF, 0, b"head")
            grants.host_copy_to(b.dom, REF, PAGE_SIZE - 4, b"tail")
            assert grants.host_copy_from(b.dom, REF, 0, 4) == b"head"
            assert grants.host_copy_from(b.dom, REF, PAGE_SIZE - 4, 4) == b"tail"
            assert grants.host_copy_from(b.dom, REF, 0, 0) == b""
            assert len(grants.host_copy_from(b.dom, REF, 0, PAGE_SIZE)) == PAGE_SIZE
            assert hv.mem.read(f << PAGE_SHIFT, 4) == b"head"
            assert audit(hv) == []
    run(main())
