"""Red-team: a hostile guest and a hostile migration peer against save and restore.

1. A guest gives back a frame (XENMEM_decrease_reservation) and is saved afterwards. The
   frame has gone to another domain by then; the hypervisor's P2M of the saver still names
   it. Xen's saver takes each page through the guest's P2M and maps it as the guest's
   (xg_sr_save: a frame the domain does not own goes as XTAB, no data): nothing of the next
   owner may go into the stream.
2. A stream names a page-table page as one the restorer writes itself: a P2M-list frame
   (X86_PV_P2M_FRAMES) or start_info (vCPU 0's RDX). Xen's restorer writes both through
   writable foreign mappings (process_start_info, update_guest_p2m), which a page table
   refuses: the restore fails. Here the L1 tables are validated early as they arrive, so a
   host write into one afterwards would change a validated (later pinned) table without
   validation: entries naming any machine frame. The restore must be refused, leaving
   nothing behind, the neighbour running and the frame table clean.
"""
from __future__ import annotations

import re
import struct

import pytest

from aiovmm.abi import DOMID_INVALID
from aiovmm.audit import audit
from aiovmm.migration import stream as S
from aiovmm.migration.context import SIZE as CTX_SIZE, VcpuContext
from aiovmm.migration.stream import StreamError
from conftest import ENGINES, guest
from test_migration import MEM_MIB, _early_l1_stream, _patch, _records, _refused, running_guest, saved, uptime  # noqa: F401

pytestmark = ENGINES

NO_DATA = (S.PfnType.xtab, S.PfnType.broken, S.PfnType.xalloc)


def _entries(data: bytes):
    """(pfn, type, offset of its page or None) of every PAGE_DATA entry, in stream order."""
    for off, t, _n in _records(data):
        if t != S.Rec.page_data:
            continue
        count = struct.unpack_from("<I", data, off + 8)[0]
        page = off + 16 + 8 * count
        for e in struct.unpack_from(f"<{count}Q", data, off + 16):
            typ = e >> S.TYPE_SHIFT
            if typ in NO_DATA:
                yield e & S.PFN_MASK, typ, None
            else:
                yield e & S.PFN_MASK, typ, page
                page += 4096


async def test_given_back_frame_not_saved_from_its_next_owner(hv, tmp_path):
    a = await hv.create(guest("suspend"), memory_mib=MEM_MIB, cmdline="pages=8 every=10 balloon=1")
    line = await a.wait_for_line(r"balloon: gave back", 20)
    m = re.search(r"mfn=(0x[0-9a-f]+) pfn=(0x[0-9a-f]+) rc=(-?\d+)", line)
    mfn, pfn, rc = int(m.group(1), 16), int(m.group(2), 16), int(m.group(3))
    assert rc == 1 and hv.mem.owner[mfn] == DOMID_INVALID
    # The next domain gets the frame (the free list hands the lowest freed frame out first)
    # and puts its own data there (its kernel image).
    b = await running_guest(hv)
    assert mfn in b.frames
    theirs = bytes(hv.mem.frame(mfn))
    assert any(theirs)
    await a.wait_for_line(r"uptime: ticks=20 ", 20)
    path = str(tmp_path / "a.save")
    await a.save(path)
    data = open(path, "rb").read()
    got = [(typ, off) for p, typ, off in _entries(data) if p == pfn]
    assert got, "the given-back pfn is not in the stream"
    for typ, off in got:
        assert typ == S.PfnType.xtab, f"pfn {pfn:#x} went as type {typ:#x}"
        assert off is None or data[off:off + 4096] != theirs
    # The bystander runs on, its frame unchanged.
    t, s = uptime(b)
    await b.wait_for_line(rf"uptime: ticks={t + 10} ", 10)
    assert uptime(b)[1] == s and bytes(hv.mem.frame(mfn)) == theirs
    assert audit(hv) == []


async def test_balloon_down_and_up_then_saved(hv, tmp_path):
    """What Linux's balloon does between two migrations: a pfn given back and populated
    again has a new frame; the guest's pattern lives in it. The save carries that frame
    (the restored guest's checksum is the same), not the old one (gone to someone else)."""
    a = await hv.create(guest("suspend"), memory_mib=MEM_MIB, cmdline="pages=8 every=10 balloon=2 refill=1")
    await a.wait_for_line(r"uptime: ticks=20 ", 20)
    gave = {int(p, 16): int(m, 16) for m, p in
            (re.search(r"mfn=(0x[0-9a-f]+) pfn=(0x[0-9a-f]+)", ln).groups()
             for ln in a.console_lines if ln.startswith("balloon: gave back"))}
    refilled = {int(p, 16): int(m, 16) for p, m in
                (re.search(r"pfn=(0x[0-9a-f]+) mfn=(0x[0-9a-f]+) rc=1", ln).groups()
                 for ln in a.console_lines if ln.startswith("balloon: refilled"))}
    assert len(refilled) == 2 and refilled.keys() == gave.keys() and refilled != gave   # swapped
    assert all(hv.mem.owner[m] == a.domid for m in refilled.values())
    path = str(tmp_path / "refilled.save")
    await a.save(path)
    ticks, checksum = uptime(a)
    got = [(typ, off) for p, typ, off in _entries(open(path, "rb").read()) if p in refilled]
    assert got and all(typ == S.PfnType.notab for typ, _off in got), got
    dom = await hv.restore(path)
    await dom.wait_for_line(r"suspend: resumed rc=0", 10)
    await dom.wait_for_line(rf"uptime: ticks={ticks + 20} ", 10)
    assert uptime(dom)[1] == checksum
    assert audit(hv) == []
    dom.shutdown()


def _first_l1(data: bytes) -> tuple[int, int]:
    """(pfn, page offset) of the first L1 table in the stream's page data."""
    for p, typ, off in _entries(data):
        if typ & 7 == 1 and off is not None:
            return p, off
    raise AssertionError("no L1 table in the stream")


async def _refused_with_neighbour(hv, path: str, data: bytes, match: str) -> None:
    neighbour = await running_guest(hv)
    await _refused(hv, path, data, match)
    assert audit(hv) == []
    t, s = uptime(neighbour)
    await neighbour.wait_for_line(rf"uptime: ticks={t + 10} ", 10)
    assert uptime(neighbour)[1] == s and not neighbour.dying


async def test_p2m_frame_that_is_an_l1_table_refused(hv, saved, tmp_path):
    """X86_PV_P2M_FRAMES names an L1 table of the stream: the restorer's P2M write would
    land in a table validated when it arrived (its new entries: raw MFNs, present when
    odd, naming low machine frames). Xen: update_guest_p2m's writable mapping of a page
    table fails after the pinning."""
    path, _ = saved
    data = open(path, "rb").read()
    l1, _ = _first_l1(data)
    off = next(off for off, t, _n in _records(data) if t == S.Rec.x86_pv_p2m_frames)
    first, second = struct.unpack_from("<2Q", data, off + 16)
    assert l1 != second
    await _refused_with_neighbour(hv, str(tmp_path / "p2m.save"),
                                  _patch(data, off + 16, struct.pack("<Q", l1)), "P2M")


async def test_start_info_that_is_an_l1_table_refused(hv, saved, tmp_path):
    """vCPU 0's RDX (start_info) names an L1 table of the stream whose entries 4-10 (where
    the restorer writes nr_pages, shared_info, the store and console MFNs and ports) are
    empty: the writes would make present entries of a pinned table without validation.
    Xen: process_start_info's writable mapping of a page table fails."""
    path, _ = saved
    data = bytearray(open(path, "rb").read())
    l1, page = _first_l1(bytes(data))
    data[page + 4 * 8:page + 11 * 8] = bytes(7 * 8)
    off = next(off for off, t, _n in _records(bytes(data)) if t == S.Rec.x86_pv_vcpu_basic)
    body = off + 8 + S.VCPU_HDR.size
    c = VcpuContext.unpack(bytes(data[body:body + CTX_SIZE]))
    c.regs["rdx"] = l1
    new = c.pack()
    data[body:body + len(new)] = new
    await _refused_with_neighbour(hv, str(tmp_path / "si.save"), bytes(data), "start_info")


async def test_pinned_table_then_xtab_not_pinned(hv, saved, tmp_path):
    """A page sent early as a pinned L1 (mapping one of the guest's L1 tables writable),
    then as XTAB (no page: a live guest ballooned it out meanwhile). Xen's restorer
    records every entry's type (process_page_data: set_page_type), XTAB included, so the
    page is not pinned at the end; pinned, its stale entries would keep the mapped table
    typed writable for good. The guest carries on; nothing holds the page."""
    path, (ticks, checksum) = saved
    bad, p = _early_l1_stream(path, str(tmp_path / "pinned-xtab.save"),
                              S.PfnType.l1 | S.PfnType.pinned, xtab_later=True)
    dom = await hv.restore(bad)
    await dom.wait_for_line(r"suspend: resumed rc=0", 10)
    await dom.wait_for_line(rf"uptime: ticks={ticks + 20} ", 10)
    assert uptime(dom)[1] == checksum
    mfn = dom.p2m[p]
    assert (hv.mem.pinned[mfn], hv.mem.type_count[mfn]) == (0, 0)
    assert audit(hv) == []
    dom.shutdown()


async def test_hostile_vcpu_contexts_refused(hv, saved, tmp_path):
    """vCPU 0's context names what _finish checks one field at a time (each check alone
    refuses it: one bad field per stream): CR3 misaligned or beyond the domain, a user CR3
    beyond it or not an L4, start_info (RDX) beyond the domain, negative or a page the
    stream never sent, not suspended in kernel mode, a non-canonical RIP or callback.
    Refused with nothing left behind, the neighbour running, the frame table clean."""
    from aiovmm.migration.context import VGCF
    path, _ = saved
    data = open(path, "rb").read()
    off = next(off for off, t, _n in _records(data) if t == S.Rec.x86_pv_vcpu_basic)
    body = off + 8 + S.VCPU_HDR.size
    nr = MEM_MIB << 8
    never_sent = next(p for p, typ, _o in _entries(data) if typ == S.PfnType.xtab) \
        if any(typ == S.PfnType.xtab for _p, typ, _o in _entries(data)) else None

    def ctx_with(edit) -> bytes:
        c = VcpuContext.unpack(data[body:body + CTX_SIZE])
        edit(c)
        return _patch(data, body, c.pack())

    def cr3(c, v):
        c.ctrlreg[3] = v
    good_cr3 = VcpuContext.unpack(data[body:body + CTX_SIZE]).ctrlreg[3]
    cases = [
        (lambda c: cr3(c, good_cr3 | 8), "CR3"),
        (lambda c: cr3(c, nr << 12), "CR3"),
        (lambda c: cr3(c, (2 * nr + 5) << 12), "CR3"),
        (lambda c: c.ctrlreg.__setitem__(1, nr << 12), "user CR3"),
        (lambda c: c.ctrlreg.__setitem__(1, 1 << 12), "user CR3"),
        (lambda c: c.regs.__setitem__("rdx", nr), "start_info"),
        (lambda c: c.regs.__setitem__("rdx", 2 * nr + 5), "start_info"),
        (lambda c: setattr(c, "flags", c.flags & ~VGCF.in_kernel), "kernel mode"),
        (lambda c: c.regs.__setitem__("rip", 1 << 47), "non-canonical"),
        (lambda c: c.regs.__setitem__("rip", (1 << 48) - 1), "non-canonical"),
        (lambda c: setattr(c, "event_callback", 0xFFFF7FFFFFFFFFFF), "non-canonical"),
    ]
    if never_sent is not None:
        cases.append((lambda c: c.regs.__setitem__("rdx", never_sent), "start_info"))
    await _refused_with_neighbour_many(hv, str(tmp_path / "ctx.save"),
                                       [(ctx_with(edit), match) for edit, match in cases])


async def _refused_with_neighbour_many(hv, path: str, streams: list[tuple[bytes, str]]) -> None:
    neighbour = await running_guest(hv)
    for data, match in streams:
        await _refused(hv, path, data, match)
    assert audit(hv) == []
    t, s = uptime(neighbour)
    await neighbour.wait_for_line(rf"uptime: ticks={t + 10} ", 10)
    assert uptime(neighbour)[1] == s and not neighbour.dying
