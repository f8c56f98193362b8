"""Mutated-stream fuzzing of the receiver (tests/test_migration_fuzz.py bounded, bench/migrate.py
longer): a real save stream, mutated where it matters (headers, record framing, pfn[]
entries, page-table entries, vCPU context) or anywhere, restored into a hypervisor that
also runs a neighbour guest. Invariants: only StreamError/BuildError come out, a refused
stream leaves the machine's free frames and the domain table as they were, a stream that
is accepted yields a domain that can be destroyed (its frames all come back), and the
neighbour keeps running."""
from __future__ import annotations

import asyncio
import struct

from hypothesis import strategies as st

from ..errors import BuildError
from . import restore as _restore, stream as S

INTERESTING = [0, 1, 2, 7, 8, 0xFF, 0x1000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               (1 << 52) - 1, 1 << 60, 0x8 << 60, 0xF << 60, (1 << 64) - 1]


def structure(data: bytes) -> list[tuple[int, int, int]]:
    """[(offset, type, length)] of the libxc records (offset of the record header)."""
    optlen = struct.unpack_from("<I", data, 44)[0]
    off = 48 + optlen + S.LIBXL_HDR.size + 8 + S.IHDR.size + S.DHDR.size
    out = []
    while off + 8 <= len(data):
        t, n = S.RH.unpack_from(data, off)
        out.append((off, t, n))
        if t == S.Rec.end:
            break
        off += 8 + n + (-n & 7)
    return out


def hot_offsets(data: bytes) -> list[int]:
    """Offsets worth mutating: headers, record headers, pfn[] entries, page-table pages'
    entries, the vCPU context."""
    offs = list(range(0, 48, 4)) + list(range(48, 48 + struct.unpack_from("<I", data, 44)[0], 8))
    for off, t, n in structure(data):
        offs += [off, off + 4]
        if t == S.Rec.page_data:
            count = struct.unpack_from("<I", data, off + 8)[0]
            offs += [off + 8] + [off + 16 + 8 * i for i in range(0, count, 37)]
            pfns = struct.unpack_from(f"<{count}Q", data, off + 16)
            k = 0
            for e in pfns:
                if (e >> 60) & 7:
                    page = off + 16 + 8 * count + 4096 * k
                    offs += [page + 8 * i for i in range(0, 512, 13)]
                if (e >> 60) not in (0xD, 0xE, 0xF):
                    k += 1
        elif t != S.Rec.shared_info:
            offs += list(range(off + 8, off + 8 + min(n, 5168), 8))
    return [o for o in offs if o < len(data)]


@st.composite
def mutations(draw, data: bytes, hot: list[int]):
    kind = draw(st.sampled_from(["u64", "u32", "byte", "truncate", "dup", "drop"]))
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    recs = structure(data)
    if kind in ("dup", "drop"):
        off, t, n = draw(st.sampled_from(recs[:-1]))
        rec = data[off:off + 8 + n + (-n & 7)]
        if kind == "drop":
            return data[:off] + data[off + len(rec):]
        at, _, _ = draw(st.sampled_from(recs))
        return data[:at] + rec + data[at:]
    off = draw(st.sampled_from(hot) if draw(st.booleans()) else st.integers(0, len(data) - 8))
    if kind == "byte":
        return data[:off] + bytes([draw(st.integers(0, 255))]) + data[off + 1:]
    size = 8 if kind == "u64" else 4
    val = draw(st.sampled_from(INTERESTING) | st.integers(0, (1 << (8 * size)) - 1))
    return data[:off] + (val & ((1 << (8 * size)) - 1)).to_bytes(size, "little") + data[off + size:]


async def run_case(hv, data: bytes) -> str:
    """Restore one (mutated) stream; returns "refused" or "accepted". Raises AssertionError
    when an invariant breaks."""
    before = (hv.mem.free_frames, set(hv.domains))
    try:
        dom, _ = await _restore.read_stream(hv, S.BytesSource(data))
    except (S.StreamError, BuildError):
        after = (hv.mem.free_frames, set(hv.domains))
        assert after == before, f"refused stream left state behind: {before} -> {after}"
        return "refused"
    dom.shutdown()
    if dom.task is not None:
        await asyncio.wait([dom.task])
    after = (hv.mem.free_frames, set(hv.domains))
    assert after == before, f"accepted stream's domain did not release everything: {before} -> {after}"
    return "accepted"
