"""Red team (backends, 2026-12-02): one blkback pass took a whole ring of indirect requests.

`_drain` validated and mapped every request published, on the event loop, before anything
else ran: a frontend with a 16-page ring (512 entries) of indirect READs of 256 segments
(131,072 segments, each a grant mapped and checked, ~13-30 us) held the loop 4 s in one
pass (measured at load 17: every guest and the control API stopped), and could publish the
next ring as soon as it was answered; answering them all (every segment's mapping released)
was one more callback of 1.4 s. Rule 4: a pass takes at most DRAIN_SEGMENTS segments
(requests counted by what they say they carry) and answers at most as many, the rest waits
for the next pass, after the loop's other work; nothing is lost or reordered.

The real Blkback request path (_drain: copy once, validate, map, submit; _answer) on a
parked domain's ring page and grants, with a real (sparse) backing file: the harness of
test_redteam_blk.py.
"""
from __future__ import annotations

import asyncio
import struct

from aiovmm import Hypervisor, lab
from aiovmm.backends.block.device import (BLKIF_OP_READ, BLKIF_RSP_OKAY, DRAIN_SEGMENTS, MAX_INDIRECT_SEGMENTS,
                                          SLOT, _RSP)
from aiovmm.grants import GTF_permit_access, GTF_readonly
from conftest import kernel
from test_redteam_blk import attach, clean, detach, indirect, with_hv


def test_a_pass_takes_a_bounded_number_of_segments(tmp_path):
    img = tmp_path / "big.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)

    async def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 16, "attacker")
        bb = await attach(hv, a, str(img), persistent=False)
        ring = hv.mem.frame(a.spare[-1])
        data, ind = a.spare[0], a.spare[1]
        a.write_grant(10, GTF_permit_access, 0, data)
        a.write_grant(11, GTF_permit_access | GTF_readonly, 0, ind)
        hv.mem.frame(ind)[:8 * MAX_INDIRECT_SEGMENTS] = struct.pack("<IBB2x", 10, 0, 7) * MAX_INDIRECT_SEGMENTS
        n = bb.ring.nr_ents
        for k in range(n):                        # a full ring of 1 MiB indirect READs
            ring[64 + k * SLOT:64 + (k + 1) * SLOT] = indirect(BLKIF_OP_READ, k, k * 2048, MAX_INDIRECT_SEGMENTS,
                                                               [11])[:SLOT]
        struct.pack_into("<I", ring, 0, n)
        per_request = 1 + MAX_INDIRECT_SEGMENTS
        most = -(-DRAIN_SEGMENTS // per_request)
        taken = []
        while bb.ring.req_cons != n:
            before = bb.ring.req_cons
            bb._kick.clear()
            bb._drain()
            taken.append(bb.ring.req_cons - before)
            if bb.ring.req_cons != n:
                assert bb._kick.is_set()           # the rest is the next pass's
        assert max(taken) <= most < n and sum(taken) == n, taken
        async with asyncio.timeout(30):
            while bb._futures:
                await asyncio.wait(set(bb._futures))
        answered = []
        while bb._done:                           # answered (mappings released) in bounded steps too
            before = bb.stats.rd_reqs
            bb._kick.clear()
            bb._answer()
            answered.append(bb.stats.rd_reqs - before)
            assert bb._kick.is_set() == bool(bb._done)
        assert max(answered) <= most and sum(answered) == n, answered
        got = sorted(_RSP.unpack_from(ring, 64 + k * SLOT)[::2] for k in range(n))
        assert got == [(k, BLKIF_RSP_OKAY) for k in range(n)]
        assert bb.stats.rd_reqs == n and bb.stats.bad_requests == 0
        await detach(hv, a, bb)
        lab.destroy(a)
        clean(hv)

    asyncio.run(with_hv(body))


def test_a_transient_segment_counts_at_its_cost(tmp_path):
    """Red team s19: the bound counted segments, not their cost. A segment on a grant mapped
    for its request only (no feature-persistent, or beyond the persistent bound) is validated
    and mapped in _drain and unmapped in _answer, ~9x the loop time of a held one on the
    whole-page path (bench/blk_pass_stall.py); with every segment counted alike a frontend
    streaming such requests left another guest's 1 ms timer 28-39 ms late at the median
    (--served --ab-cost, load 7), held grants 6-11 ms. At TRANSIENT_SEGMENT_COST, a pass
    takes one 256-segment request of transient grants (not four) and answers one per call,
    and a frontend on held persistent grants still gets four per pass."""
    from aiovmm.backends.block.device import TRANSIENT_SEGMENT_COST
    img = tmp_path / "big.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)

    async def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 16, "streamer")
        for persistent in (False, True):
            bb = await attach(hv, a, str(img), persistent=persistent)
            ring = hv.mem.frame(a.spare[-1])
            ring[:] = bytes(4096)
            data, ind = a.spare[0], a.spare[1]
            a.write_grant(10, GTF_permit_access, 0, data)
            a.write_grant(11, GTF_permit_access | GTF_readonly, 0, ind)
            hv.mem.frame(ind)[:8 * MAX_INDIRECT_SEGMENTS] = struct.pack("<IBB2x", 10, 0, 7) * MAX_INDIRECT_SEGMENTS
            n = bb.ring.nr_ents
            for k in range(n):
                ring[64 + k * SLOT:64 + (k + 1) * SLOT] = indirect(BLKIF_OP_READ, k, k * 2048,
                                                                   MAX_INDIRECT_SEGMENTS, [11])[:SLOT]
            struct.pack_into("<I", ring, 0, n)
            if persistent:                          # the grants held already (a warm frontend)
                bb._drain()
                async with asyncio.timeout(30):
                    while bb._futures:
                        await asyncio.wait(set(bb._futures))
                while bb._done:
                    bb._answer()
            first = bb.ring.req_cons
            per_pass = 1 if not persistent else -(-DRAIN_SEGMENTS // (1 + MAX_INDIRECT_SEGMENTS))
            taken = []
            while bb.ring.req_cons != n:
                before = bb.ring.req_cons
                bb._drain()
                taken.append(bb.ring.req_cons - before)
            assert max(taken) == per_pass and sum(taken) == n - first, (persistent, taken)
            async with asyncio.timeout(30):
                while bb._futures:
                    await asyncio.wait(set(bb._futures))
            answered = []
            while bb._done:
                before = len(bb._done)
                bb._answer()
                answered.append(before - len(bb._done))
            assert max(answered) == per_pass, (persistent, answered)
            assert bb.stats.bad_requests == 0 and bb.stats.rd_reqs == n
            assert TRANSIENT_SEGMENT_COST * MAX_INDIRECT_SEGMENTS > DRAIN_SEGMENTS
            await detach(hv, a, bb)
        lab.destroy(a)
        clean(hv)

    asyncio.run(with_hv(body))
