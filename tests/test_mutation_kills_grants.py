"""Grant-table checks that bench/mutants.py found no test for (issue 9, mutation testing).

Each drives the real grant code with what a guest (or the toolstack on its behalf) can pass
and asserts what Xen answers, so that weakening the check is noticed.
"""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor, lab
from aiovmm.grants import ENTRIES_PER_FRAME, GntSt, GrantError
from conftest import kernel

MIB = 64


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
