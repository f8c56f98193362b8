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


# -- map_grant / unmap_grant argument checks (mutation survivors of the second run) ------------

def _scene(hv):
    from test_grants_security import Scene
    return Scene(hv)


def test_map_grant_onto_a_present_pte_is_bad_virt_addr():
    """GNTTABOP_map_grant_ref at a host_addr whose L1 entry is already present: Xen's
    create_grant_pv_mapping refuses to replace a present entry (GNTST_general_error from
    the failed update; here bad_virt_addr). The entry is unchanged, nothing is pinned: the
    grant entry has no GTF_reading, the granted frame no reference."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            s = _scene(hv)
            a = s.a
            va = a.lay.va(a.lay.start_info_pfn)               # present in the bootstrap L1
            pte = a.l1_of(va)
            before = hv.mem.read_u64(pte)
            refs = hv.mem.refs[s.f]
            for ro in (False, True):
                st, _h = a.map_grant(s.b.domid, REF, va, readonly=ro)
                assert st == GntSt.bad_virt_addr
                assert hv.mem.read_u64(pte) == before
                assert s.b.grant_flags(REF) == GTF_permit_access
                assert hv.mem.refs[s.f] == refs and not a.dom.grants.maptrack
            st, h = a.map_grant(s.b.domid, REF, s.va)        # an empty entry works
            assert st == GntSt.okay
            assert a.unmap_grant(h, s.va) == GntSt.okay
            assert audit(hv) == []
    run(main())


@pytest.mark.parametrize("flags", [0, grants.GNTMAP_readonly, grants.GNTMAP_application_map,
                                   grants.GNTMAP_host_map | grants.GNTMAP_contains_pte,
                                   grants.GNTMAP_device_map | grants.GNTMAP_contains_pte])
def test_map_grant_flags_refused(flags):
    """Neither GNTMAP_host_map nor GNTMAP_device_map: nothing to map (Xen: GNTST_bad_gntref).
    GNTMAP_contains_pte (host_addr is a PTE's machine address) is not supported and must
    not be taken for a virtual address: GNTST_bad_virt_addr. Either way nothing is pinned
    and the guest's L1 entry at that address stays empty."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            s = _scene(hv)
            a = s.a
            pte = a.l1_of(s.va)
            st, _h = a.map_grant(s.b.domid, REF, s.va, flags=flags)
            want = GntSt.bad_virt_addr if flags & grants.GNTMAP_contains_pte else GntSt.bad_gntref
            assert st == want
            assert hv.mem.read_u64(pte) == 0
            assert s.b.grant_flags(REF) == GTF_permit_access
            assert not a.dom.grants.maptrack and hv.mem.refs[s.f] == 0
            assert audit(hv) == []
    run(main())


def test_maptrack_full_is_no_space_and_pins_nothing():
    """A grantee may hold 65,536 maptrack handles (Xen's maptrack limit); the next map is
    GNTST_no_space before the grant is pinned: the active record's pin count, the frame's
    references and the entry stay as they were (a pin taken and left behind would keep the
    granter's frame alive forever)."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            s = _scene(hv)
            a, b = s.a, s.b
            flags = grants.GNTMAP_device_map | grants.GNTMAP_readonly
            for _ in range(1 << 16):
                grants.map_grant(a.v, 0, flags, REF, b.domid)
            act = b.dom.grants.active[REF]
            assert (act.readers, act.writers, hv.mem.refs[s.f]) == (1 << 16, 0, 1 << 16)
            for fl in (flags, grants.GNTMAP_device_map, grants.GNTMAP_host_map):
                with pytest.raises(GrantError) as e:
                    grants.map_grant(a.v, s.va, fl, REF, b.domid)
                assert e.value.status == GntSt.no_space
            assert (act.readers, act.writers, hv.mem.refs[s.f]) == (1 << 16, 0, 1 << 16)
            assert hv.mem.type_count[s.f] == 0
            assert hv.mem.read_u64(a.l1_of(s.va)) == 0
            assert len(a.dom.grants.maptrack) == 1 << 16
            h = next(iter(a.dom.grants.maptrack))
            assert a.unmap_grant(h) == GntSt.okay             # one freed: one more fits
            grants.map_grant(a.v, 0, flags, REF, b.domid)
            assert audit(hv) == []
    run(main())


def test_unmap_with_another_host_addr_is_refused():
    """GNTTABOP_unmap_grant_ref with a host_addr that is not the mapping's: Xen's
    unmap_common refuses (GNTST_bad_virt_addr for the mismatching address) and the mapping
    stays (its PTE present, the handle valid); the right address then unmaps it."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            s = _scene(hv)
            h = s.map()
            pte = s.a.l1_of(s.va)
            e = hv.mem.read_u64(pte)
            assert e & 1
            for other in (s.va + PAGE_SIZE, s.va - PAGE_SIZE, 1 << PAGE_SHIFT):
                assert s.a.unmap_grant(h, other) == GntSt.bad_virt_addr
                assert hv.mem.read_u64(pte) == e and h in s.a.dom.grants.maptrack
            assert s.a.unmap_grant(h, s.va) == GntSt.okay
            assert hv.mem.read_u64(pte) == 0
            assert audit(hv) == []
    run(main())


@pytest.mark.parametrize("readonly", [False, True])
def test_host_mapping_close_twice_drops_once(readonly):
    """A backend closing a host mapping twice (an error path and then its teardown): the
    second close does nothing. Dropping the frame's references twice would underflow them
    (the frame could then be freed or typed as a page table while another mapping of it
    lives) and unpin a grant the backend no longer holds."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b = lab.park(hv, kernel(), 8, "frontend")
            f = b.spare[0]
            b.write_grant(REF, GTF_permit_access, 0, f)
            keep = grants.host_map(b.dom, REF, readonly=True)       # a second holder
            hm = grants.host_map(b.dom, REF, readonly=readonly)
            hm.close()
            hm.close()
            act = b.dom.grants.active[REF]
            assert (act.readers, act.writers) == (1, 0)
            assert hv.mem.refs[f] == 1 and hv.mem.type_count[f] == 0
            assert b.grant_flags(REF) == GTF_permit_access | GTF_reading
            assert audit(hv) == []
            keep.close()
            assert b.grant_flags(REF) == GTF_permit_access and REF not in b.dom.grants.active
            assert audit(hv) == []
    run(main())


@pytest.mark.parametrize("domid", [0, 0x7FEF, 0x7FF0 - 1])
def test_grant_of_a_domain_without_a_table_is_bad_domain(domid):
    """A grant operation naming a domain that does not exist, or the host (domid 0, the
    hypervisor's backends: no grant table of its own): GNTST_bad_domain, for map and for
    copy in both directions."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            a = lab.park(hv, kernel(), 8, "grantee")
            va = a.free_l2_va()
            st, _ = a.map_grant(domid, REF, va, flags=grants.GNTMAP_device_map)
            assert st == GntSt.bad_domain
            assert _copy_from(a, _Dom(domid), REF) == GntSt.bad_domain
            assert _copy_into(a, _Dom(domid), REF) == GntSt.bad_domain
            assert audit(hv) == []
    run(main())


class _Dom:
    """Only a domain id (for _copy_from/_copy_into against a domain that is not there)."""

    def __init__(self, domid: int) -> None:
        self.domid = domid


def test_entry_stays_writing_while_a_write_pin_remains():
    """Two writable host mappings of one entry: closing one leaves GTF_reading|GTF_writing
    set and the active record alive (Xen clears GTF_writing only with the last write pin,
    GTF_reading only with the last pin); the granter, seeing the flags, knows the frame may
    still be written. The last close clears both and ends the record."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b = lab.park(hv, kernel(), 8, "frontend")
            f = b.spare[0]
            b.write_grant(REF, GTF_permit_access, 0, f)
            busy = GTF_permit_access | GTF_reading | grants.GTF_writing
            h1 = grants.host_map(b.dom, REF)
            h2 = grants.host_map(b.dom, REF)
            assert b.grant_flags(REF) == busy
            h1.close()
            assert b.grant_flags(REF) == busy
            act = b.dom.grants.active.get(REF)
            assert act is not None and (act.readers, act.writers) == (0, 1)
            assert audit(hv) == []
            r = grants.host_map(b.dom, REF, readonly=True)    # a reader left after the writer
            h2.close()
            assert b.grant_flags(REF) == GTF_permit_access | GTF_reading
            r.close()
            assert b.grant_flags(REF) == GTF_permit_access and REF not in b.dom.grants.active
            assert audit(hv) == []
    run(main())


def test_a_dead_granters_table_is_never_written():
    """A host backend still maps a grant when its granter dies (Domain.destroy leaves host
    mappings to their backend). The granter's grant-table frames are freed at once and may
    belong to the next domain; the backend's later unmap updates only the active record,
    never the old table (Xen: a dying domain's grant table is not touched after
    relinquish): the next domain's page is unchanged, the granted frame freed, audit clean."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            mem = hv.mem
            free0 = mem.free_frames
            a = lab.park(hv, kernel(), 8, "granter")
            f = a.spare[0]
            a.write_grant(REF, GTF_permit_access, 0, f)
            hm = grants.host_map(a.dom, REF)
            table = a.dom.grants.frames[0]
            lab.destroy(a)
            c = lab.park(hv, kernel(), 8, "next")
            assert table in c.dom.frames and f not in c.dom.frames
            mem.frame(table)[:] = b"\xFF" * PAGE_SIZE          # c's data, grant-flag bits set
            assert audit(hv) == []
            hm.close()
            assert bytes(mem.frame(table)) == b"\xFF" * PAGE_SIZE
            assert not hv.orphan_frames and not hv.orphan_host_maps
            assert audit(hv) == []
            lab.destroy(c)
            assert mem.free_frames == free0
    run(main())


def test_mapping_ones_own_grant_is_bad_domain():
    """A domain whose entry grants its own frame to itself, then maps it (by its domid
    and by DOMID_SELF): refused with GNTST_bad_domain before anything is pinned (no
    GTF_reading, no reference on the frame, the PTE stays empty)."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            s = _scene(hv)
            a = s.a
            f = a.spare[3]
            a.write_grant(REF, GTF_permit_access, a.domid, f)
            refs = hv.mem.refs[f]
            for dom in (a.domid, DOMID_SELF):
                st, _h = a.map_grant(dom, REF, s.va)
                assert st == GntSt.bad_domain
                assert a.grant_flags(REF) == GTF_permit_access and hv.mem.refs[f] == refs
                assert hv.mem.read_u64(a.l1_of(s.va)) == 0 and not a.dom.grants.maptrack
            assert audit(hv) == []
    run(main())


def test_batch_bound_is_4096_inclusive():
    """GNTTABOP_* batches: a count up to 4096 is taken (an unknown sub-op then answers
    -ENOSYS, checked after the count), 4097 is -EINVAL before anything is read."""
    from aiovmm import hypercall
    from aiovmm.abi import Errno, Hypercall

    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            call = lambda count: hypercall.call(a.v, Hypercall.grant_table_op, 99, a.args_va, count)
            assert call(4096) == -int(Errno.ENOSYS)
            assert call(4097) == -int(Errno.EINVAL)
            assert call(1 << 32 | 5) == -int(Errno.ENOSYS)          # a 32-bit count
    run(main())


def test_single_op_subcommands_and_foreign_queries():
    """query_size/setup_table/get_status_frames take exactly one op (count 2: -EINVAL);
    query_size of another domain's table is permission_denied (a missing one bad_domain),
    nothing else written; get_version of another domain is -EPERM; get_status_frames'
    list must be a guest address (the non-canonical hole: -EFAULT), an empty request at
    the top of the lower half is fine."""
    from aiovmm import hypercall
    from aiovmm.abi import Errno, Hypercall
    from aiovmm.grants import GnttabOp

    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            a = lab.park(hv, kernel(), 8, "a")
            b = lab.park(hv, kernel(), 8, "b")
            v = a.v

            def call(cmd, data: bytes, count=1):
                va = a._args(data, 64)
                return hypercall.call(v, Hypercall.grant_table_op, cmd, va, count), va

            EINVAL = -int(Errno.EINVAL)
            for cmd in (GnttabOp.setup_table, GnttabOp.query_size, GnttabOp.get_status_frames):
                assert call(cmd, bytes(64), 2)[0] == EINVAL
            for gdom, want in ((b.domid, GntSt.permission_denied), (999, GntSt.bad_domain)):
                rc, va = call(GnttabOp.query_size, struct.pack("<H", gdom).ljust(16, b"\xEE"))
                out = v.copy_from_guest(va, 16)
                assert rc == 0 and struct.unpack_from("<h", out, 12)[0] == want
                assert out[4:12] == b"\xEE" * 8                    # no sizes given away
            rc, va = call(GnttabOp.query_size, struct.pack("<H", a.domid).ljust(16, b"\xEE"))
            assert rc == 0 and struct.unpack_from("<h", v.copy_from_guest(va, 16), 12)[0] == GntSt.okay
            assert call(GnttabOp.get_version, struct.pack("<H", b.domid).ljust(8, b"\0"))[0] == -int(Errno.EPERM)
            assert call(GnttabOp.get_version, struct.pack("<H", a.domid).ljust(8, b"\0"))[0] == 0
            EFAULT = -int(Errno.EFAULT)
            for frame_list, nr, want in ((1 << 47, 1, EFAULT), (HVE - 8, 1, EFAULT),
                                         ((1 << 47) - 8, 1, 0), (HVE, 1, 0), ((1 << 64) - 8, 1, 0),
                                         ((1 << 64) - 8, 2, EFAULT)):
                rc, _va = call(GnttabOp.get_status_frames, struct.pack("<IHhQ", nr, DOMID_SELF, 0, frame_list))
                assert rc == want, (hex(frame_list), nr, rc)
    import struct
    from aiovmm.abi import HYPERVISOR_VIRT_END as HVE
    run(main())
