"""Red team (backends, 2026-12-02, round s19): an ordering point held across a disconnect.

blkback holds a WRITE_BARRIER / FLUSH_DISKCACHE until every earlier request is done
(`_held`), and `_completed` starts it when the last one completes. `_disconnect` waited only
for the futures in flight when it began: the last of them completing started the held
barrier (a new future), and the disconnect went on to unmap the persistent grants and the
ring under it. The barrier's transient mappings were never released (no `_answer` after the
ring is gone; the next `_connect` cleared `_done` without releasing): the guest's frames
stayed referenced and their grant entries marked in use, one leak per connect cycle. A
persistent grant it used was unmapped (its frame's references dropped) while a worker could
be writing it to disk. On the next connection the old barrier completed into the new ring
(an id the new frontend never sent) and cleared `_blocked`, letting the new connection's own
barrier be overtaken. Linux blkback: xen_blkif_disconnect stops the ring's thread, then waits
until `inflight` is 0 before it frees the persistent grants (-EBUSY, retried until then); a
barrier waits inside the thread (xen_blk_drain_io), so none is started after the stop.

The real Blkback path (_drain, _submit, _completed, _disconnect, _connect) on a parked
domain's ring and grants, a real backing file, the I/O pool.
"""
from __future__ import annotations

import asyncio
import struct

from aiovmm import Hypervisor, lab
from aiovmm.backends.block import Blkback, DiskConfig
from aiovmm.backends.block.device import (BLKIF_OP_READ, BLKIF_OP_WRITE_BARRIER, SLOT, _RSP)
from aiovmm.grants import GTF_permit_access, GTF_reading, GTF_writing
from conftest import kernel
from test_redteam_blk import RING_REF, clean, detach, make_disk, req, with_hv


def connect(hv: Hypervisor, a: lab.Parked, bb: Blkback) -> int:
    """The real _connect on the guest's ring page (RING_REF) and a fresh unbound port."""
    a.write_grant(RING_REF, GTF_permit_access, 0, a.spare[-1])
    hv.mem.frame(a.spare[-1])[:] = bytes(4096)
    port = a.dom.evtchn.alloc_unbound(0)
    st = hv.xenstore.store
    for k, v in {"ring-ref": str(RING_REF), "event-channel": str(port), "protocol": "x86_64-abi",
                 "feature-persistent": "1" if bb.persistent else "0"}.items():
        st.write(f"{bb.front}/{k}", v)
    bb._connect()
    return port


def test_a_held_barrier_never_starts_after_the_disconnect(tmp_path):
    img = make_disk(tmp_path)

    async def body(hv: Hypervisor) -> None:
        a = lab.park(hv, kernel(), 8, "barrier")
        ring = hv.mem.frame(a.spare[-1])
        data = a.spare[0:4]
        for i, f in enumerate(data):
            a.write_grant(30 + i, GTF_permit_access, 0, f)
        for persistent in (False, True):
            bb = Blkback(a.dom, 0, DiskConfig.parse(f"target={img},vdev=xvda"))
            bb.backing = await bb.open_backing()
            bb.use_uring = False
            bb.persistent = persistent
            port = connect(hv, a, bb)
            assert bb.persistent == persistent
            # A READ in flight, then a barrier with data: held until the READ is done.
            ring[64:64 + SLOT] = req(BLKIF_OP_READ, 1, 0, [(30, 0, 7), (31, 0, 7)])
            ring[64 + SLOT:64 + 2 * SLOT] = req(BLKIF_OP_WRITE_BARRIER, 2, 64, [(32, 0, 7), (33, 0, 7)])
            struct.pack_into("<I", ring, 0, 2)
            bb._drain()
            assert bb._held is not None and bb._futures, persistent
            # The frontend goes away now: the disconnect waits for the READ, and the barrier
            # that was still waiting for it never starts.
            await bb._disconnect()
            a.dom.evtchn.close(port)
            await asyncio.sleep(0.2)                 # a barrier started late would be done by now
            assert not bb._futures and bb._held is None and not bb._done, persistent
            assert not a.dom.host_mappings, (persistent, a.dom.host_mappings)
            for ref in (RING_REF, 30, 31, 32, 33):
                assert a.grant_flags(ref) & (GTF_reading | GTF_writing) == 0, (persistent, ref)
            assert all(hv.mem.refs[f] == 0 for f in data), persistent
            clean(hv)
            # The frontend reconnects: nothing of the old connection reaches its ring, and its
            # own barrier holds the request behind it until the one before it is done.
            port = connect(hv, a, bb)
            ring[64:64 + SLOT] = req(BLKIF_OP_READ, 11, 0, [(30, 0, 7)])
            ring[64 + SLOT:64 + 2 * SLOT] = req(BLKIF_OP_WRITE_BARRIER, 12, 64, [(32, 0, 7)])
            ring[64 + 2 * SLOT:64 + 3 * SLOT] = req(BLKIF_OP_READ, 13, 8, [(31, 0, 7)])
            struct.pack_into("<I", ring, 0, 3)
            bb._drain()
            assert bb._blocked and bb.ring.req_cons == 2
            async with asyncio.timeout(10):
                while bb._futures or bb._held is not None or bb.ring.req_cons < 3:
                    if not bb._futures:
                        bb._drain()
                    else:
                        await asyncio.wait(set(bb._futures))
                        bb._answer()
                        bb._drain()
                while bb._futures:
                    await asyncio.wait(set(bb._futures))
            bb._answer()
            ids = [_RSP.unpack_from(ring, 64 + k * SLOT)[0] for k in range(struct.unpack_from("<I", ring, 8)[0])]
            assert ids == [11, 12, 13], ids
            await detach(hv, a, bb)
            a.dom.evtchn.close(port)
        lab.destroy(a)
        clean(hv)

    asyncio.run(with_hv(body))
