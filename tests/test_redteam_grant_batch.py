"""Red team (s19): a host backend's batched grant copies (grants.host_copy_from_many /
host_copy_to_many, netback's one call per packet) attacked with what a guest controls in its
grant entries: duplicate references, a reference already pinned by a persistent host mapping
(blkback) whose entry the guest then retargets, lengths 0 / 4096 / 4097, offsets at the page
end, references outside the table, a page-table frame as a read source. Every case checks
the same end state: no pin, GTF_reading/GTF_writing, writable type or general reference
left behind beyond the long-lived mapping's own (audit), and only the bytes Xen's
GNTTABOP_copy rules allow moved. These attacks held (docs/threat-model.md)."""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor, grants
from aiovmm.abi import PAGE_SHIFT, PAGE_SIZE
from aiovmm.audit import audit
from aiovmm.grants import GTF_permit_access, GTF_reading, GTF_writing, GntSt, GrantError
from aiovmm.memory import PageType
from test_grant_batch import REF, _setup   # grants REF..REF+2 to domid 0, pages "A" "B" "C"

MIB = 64


def _clean(hv, b, refs=(REF, REF + 1, REF + 2)):
    assert not b.dom.grants.active
    for ref in refs:
        assert b.grant_flags(ref) & (GTF_reading | GTF_writing) == 0
    assert audit(hv) == []


@pytest.mark.parametrize("tail", [(REF + 9, 0, 1), (-1, 0, 1), (1 << 20, 0, 1),
                                  (REF, 1, PAGE_SIZE), (REF, PAGE_SIZE, 1)])
def test_duplicate_refs_then_a_bad_piece_leave_no_pin(tail):
    """A read batch naming one grant three times (three pins on one record), then a bad
    piece: refused whole, every one of the three pins dropped, nothing copied."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b, _f = _setup(hv)
            out = bytearray(b"h")
            with pytest.raises(GrantError) as e:
                grants.host_copy_from_many(b.dom, [(REF, 0, 1), (REF, 0, 1), (REF + 1, 0, 1), (REF, 0, 1), tail], out)
            assert e.value.status in (GntSt.general_error, GntSt.bad_gntref, GntSt.bad_copy_arg)
            assert out == b"h"
            _clean(hv, b)
    asyncio.run(main())


def test_edge_lengths_and_offsets():
    """Length 0 anywhere up to the page end (offset 4096 included, as Xen's offset + len >
    PAGE_SIZE test), a whole page, and one byte more (bad_copy_arg) for both directions."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b, f = _setup(hv)
            out = bytearray()
            grants.host_copy_from_many(b.dom, [(REF, PAGE_SIZE, 0), (REF + 1, 0, PAGE_SIZE), (REF + 2, PAGE_SIZE - 1, 1)], out)
            assert out == b"B" * PAGE_SIZE + b"C"
            for seg in ((REF, 0, PAGE_SIZE + 1), (REF, PAGE_SIZE, 1), (REF, PAGE_SIZE + 1, 0)):
                with pytest.raises(GrantError) as e:
                    grants.host_copy_from_many(b.dom, [seg], out)
                assert e.value.status == GntSt.bad_copy_arg
            errs = grants.host_copy_to_many(b.dom, [(REF, PAGE_SIZE, b""), (REF + 1, 0, b"y" * (PAGE_SIZE + 1)),
                                                    (REF + 2, 0, b"z" * PAGE_SIZE), (REF, PAGE_SIZE - 1, b"xx")])
            assert errs[0] is None and errs[2] is None
            assert errs[1].status == errs[3].status == GntSt.bad_copy_arg
            assert hv.mem.read(f[1] << PAGE_SHIFT, PAGE_SIZE) == b"B" * PAGE_SIZE
            assert hv.mem.read(f[2] << PAGE_SHIFT, PAGE_SIZE) == b"z" * PAGE_SIZE
            assert hv.mem.read(f[0] << PAGE_SHIFT, PAGE_SIZE) == b"A" * PAGE_SIZE
            _clean(hv, b)
    asyncio.run(main())


def test_a_persistently_mapped_grant_retargeted_by_the_guest():
    """blkback keeps REF mapped read-only (a transient or persistent host mapping); the guest
    then points REF's entry at another of its frames. A write batch naming REF is refused
    (the write pin re-reads the entry and compares the frame, Xen's acquire_grant_for_copy):
    neither frame written; a read batch uses the pinned frame (Xen: act->frame, the entry is
    not read again while pinned). The mapping's own pin and reference survive; its close
    leaves nothing."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b, f = _setup(hv)
            hm = grants.host_map(b.dom, REF, readonly=True)
            b.write_grant(REF, GTF_permit_access | GTF_reading, 0, f[1])
            errs = grants.host_copy_to_many(b.dom, [(REF, 0, b"w" * 8)])
            assert errs[0] is not None and errs[0].status == GntSt.general_error
            assert hv.mem.read(f[0] << PAGE_SHIFT, 8) == b"A" * 8
            assert hv.mem.read(f[1] << PAGE_SHIFT, 8) == b"B" * 8
            assert b.grant_flags(REF) & GTF_writing == 0
            out = bytearray()
            grants.host_copy_from_many(b.dom, [(REF, 0, 2), (REF, 0, 2)], out)
            assert out == b"AAAA"
            act = b.dom.grants.active[REF]
            assert (act.readers, act.writers, act.frame) == (1, 0, f[0])
            hm.close()
            _clean(hv, b)
    asyncio.run(main())


def test_a_writable_host_mapping_shares_its_pin_with_a_write_batch():
    """A persistent writable host mapping (blkback) and a write batch on the same grant:
    written, and the mapping's GTF_writing and writable type stay until it is closed."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b, f = _setup(hv)
            hm = grants.host_map(b.dom, REF, readonly=False)
            tc = hv.mem.type_count[f[0]]
            assert grants.host_copy_to_many(b.dom, [(REF, 0, b"q"), (REF, 1, b"r")]) == [None, None]
            assert bytes(hm.view[:3]) == b"qrA"
            assert b.grant_flags(REF) & (GTF_reading | GTF_writing) == GTF_reading | GTF_writing
            assert hv.mem.type_count[f[0]] == tc
            hm.close()
            assert hv.mem.type_count[f[0]] == 0
            _clean(hv, b)
    asyncio.run(main())


def test_a_page_table_may_be_read_never_written():
    """A grant of one of the guest's page-table frames: a tx read copies it (Xen reads a
    typed frame through a copy), an rx write is refused and its type count is unchanged."""
    async def main():
        async with Hypervisor(memory_mib=MIB) as hv:
            b, _f = _setup(hv)
            pt = next(m for m in b.dom.p2m if hv.mem.type[m] in (PageType.l1, PageType.l2, PageType.l3, PageType.l4))
            b.write_grant(REF + 5, GTF_permit_access, 0, pt)
            before = hv.mem.read(pt << PAGE_SHIFT, PAGE_SIZE)
            tb = hv.mem.type[pt], hv.mem.type_count[pt]
            out = bytearray()
            grants.host_copy_from_many(b.dom, [(REF + 5, 0, PAGE_SIZE)], out)
            assert bytes(out) == before
            errs = grants.host_copy_to_many(b.dom, [(REF + 5, 0, b"\0" * 8), (REF + 5, 8, b"\xff")])
            assert all(e is not None and e.status == GntSt.general_error for e in errs)
            assert hv.mem.read(pt << PAGE_SHIFT, PAGE_SIZE) == before
            assert (hv.mem.type[pt], hv.mem.type_count[pt]) == tb
            _clean(hv, b, (REF, REF + 1, REF + 2, REF + 5))
    asyncio.run(main())
