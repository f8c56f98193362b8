"""Cost of the locked read-modify-writes on guest-shared words (memory.py atomic_*, through
ctypes into csrc/atomic.c) against the plain byte/word read-modify-writes they replaced,
interleaved in one run (medians of --reps rounds of --ops operations, thread CPU time).

A parked guest (aiovmm.lab) holds the words; no vCPU runs, so both variants are correct
here and only their loop-thread cost differs:
  - evt/locked:   EventChannels.set_pending(port) on a masked port and the close path's
                  _clear_bit of its pending bit (the code in this tree).
  - evt/plain:    the same calls with the previous plain byte read-modify-writes
                  (PlainEvents: the replaced methods, kept here as the reference).
  - grant/locked: GrantTable.acquire(ref, 0, write) + release (first pin by cmpxchg32 on
                  flags+domid, unpin by atomic and16; the code in this tree).
  - grant/plain:  the same calls with the previous flag updates (PlainGrants: unpack,
                  check, pack; unpack, pack), as the reference.
  - frame/locked, frame/plain: grants.host_copy_to_many of a 64 KiB GSO frame into 17
                  grants (bench/grant_copy.py's rx batch), 17 pins and unpins in each.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import struct
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from aiovmm import Hypervisor, grants, lab                           # noqa: E402
from aiovmm.abi import PAGE_SIZE, SharedInfo                # noqa: E402
from aiovmm.events import EventChannels                      # noqa: E402
from aiovmm.grants import (                                  # noqa: E402
    GTF_permit_access, GTF_reading, GTF_readonly, GTF_type_mask, GTF_writing, GntSt, GrantError,
    GrantTable,
)
from conftest import kernel                                  # noqa: E402

PORT, REF = 100, 10
NREFS, FIRST_REF = 17, 20
PIECES: list = []
_U16U16, _U16 = struct.Struct("<HH"), struct.Struct("<H")


class PlainEvents(EventChannels):
    """The previous plain read-modify-writes (reference only)."""

    def _test_and_set(self, byte_addr: int, bit: int) -> bool:
        m = self.dom.mem.map
        b = m[byte_addr]
        if b & bit:
            return True
        m[byte_addr] = b | bit
        return False

    def _clear_bit(self, off: int, port: int) -> bool:
        a, b = self._bit(off, port)
        m = self.dom.mem.map
        was = m[a] & b
        m[a] = m[a] & ~b & 0xFF
        return bool(was)


class PlainGrants(GrantTable):
    """The previous first pin and unpin (reference only)."""

    def _set_status(self, addr: int, ref: int, grantee: int, write: bool, pinned: bool) -> None:
        flags, domid = _U16U16.unpack_from(self.dom.mem.map, addr)
        if not pinned and (flags & GTF_type_mask != GTF_permit_access or domid != grantee):
            raise GrantError(GntSt.general_error)
        if write and flags & GTF_readonly:
            raise GrantError(GntSt.general_error)
        new = flags | (GTF_reading | GTF_writing if write else GTF_reading)
        if new != flags:
            _U16.pack_into(self.dom.mem.map, addr, new)

    def _clear_flags(self, addr: int, clear: int) -> None:
        m = self.dom.mem.map
        f = _U16.unpack_from(m, addr)[0]
        if f & clear:
            _U16.pack_into(m, addr, f & ~clear)


def evt(dom, n: int) -> None:
    ch = dom.evtchn
    for _ in range(n):
        ch.set_pending(PORT)
        ch._clear_bit(SharedInfo.evtchn_pending, PORT)


def grant(dom, n: int) -> None:
    gt = dom.grants
    for _ in range(n):
        gt.release(gt.acquire(REF, 0, True), True)


def frame(dom, n: int) -> None:
    """netback's rx copy of a 64 KiB GSO frame into 17 grants (bench/grant_copy.py's
    batch): 17 first pins and unpins with the data copies around them."""
    for _ in range(n):
        grants.host_copy_to_many(dom, PIECES)


def timed(fn, dom, n: int, plain: bool) -> float:
    dom.evtchn.__class__ = PlainEvents if plain else EventChannels
    dom.grants.__class__ = PlainGrants if plain else GrantTable
    t0 = time.thread_time_ns()
    fn(dom, n)
    return (time.thread_time_ns() - t0) / n


async def main(args) -> None:
    async with Hypervisor(memory_mib=64) as hv:
        p = lab.park(hv, kernel(), 8, "frontend")
        p.write_grant(REF, GTF_permit_access, 0, p.spare[0])
        a, b = p.dom.evtchn._bit(SharedInfo.evtchn_mask, PORT)
        p.dom.mem.map[a] |= b
        for k in range(NREFS):
            p.write_grant(FIRST_REF + k, GTF_permit_access, 0, p.spare[1 + k])
        data = memoryview(os.urandom(16 * PAGE_SIZE + 1500))
        PIECES[:] = [(FIRST_REF + k, 0, data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]) for k in range(16)]
        PIECES.append((FIRST_REF + 16, 0, data[16 * PAGE_SIZE:]))
        kinds = {"evt/plain": (evt, True, args.ops), "evt/locked": (evt, False, args.ops),
                 "grant/plain": (grant, True, args.ops), "grant/locked": (grant, False, args.ops),
                 "frame/plain": (frame, True, args.frames), "frame/locked": (frame, False, args.frames)}
        res: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.reps):
            for k, (fn, plain, n) in kinds.items():
                res[k].append(timed(fn, p.dom, n, plain))
        print(f"load {os.getloadavg()[0]:.2f}; ns of thread CPU per operation pair (frame: per "
              f"64 KiB frame), median of {args.reps} x {args.ops} ({args.frames} frames):")
        for k, v in res.items():
            print(f"  {k:13s} {statistics.median(v):7.0f}")
        for d in ("evt", "grant", "frame"):
            lk, pl = statistics.median(res[d + "/locked"]), statistics.median(res[d + "/plain"])
            print(f"  {d}: locked/plain = {lk / pl:.2f} (+{lk - pl:.0f} ns)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--frames", type=int, default=300)
    asyncio.run(main(ap.parse_args()))
