"""MachineMemory: frame allocation, ownership, the M2P, FrameInUse; and a domain's frames."""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings, strategies as st

from aiovmm import ShutdownReason
from aiovmm.abi import DOMID_INVALID, DOMID_XEN, INVALID_M2P_ENTRY, PAGE_SHIFT, PAGE_SIZE
from aiovmm.memory import FrameInUse, MachineMemory, OutOfMemory, PageType
from conftest import guest

MIB = 1 << 20


@pytest.fixture
def mem():
    m = MachineMemory(16 * MIB)
    yield m
    m.close()


def test_geometry(mem):
    assert mem.nr_frames == 4096
    assert mem.m2p_frames == 4096 * 8 // PAGE_SIZE == 8
    assert mem.m2p_first == 4096 - 8
    assert mem.free_frames == 4096 - 8


def test_size_must_be_whole_frames():
    with pytest.raises(ValueError):
        MachineMemory(16 * MIB + 100)


def test_m2p_owned_by_xen_and_invalid(mem):
    for mfn in range(mem.m2p_first, mem.nr_frames):
        assert mem.owner[mfn] == DOMID_XEN
    assert all(mem.m2p[i] == INVALID_M2P_ENTRY for i in range(mem.nr_frames))
    for mfn in range(mem.m2p_first):
        assert mem.owner[mfn] == DOMID_INVALID


def test_alloc_lowest_first_and_owned(mem):
    a = mem.alloc(5, 3)
    assert a == [0, 1, 2]
    b = mem.alloc(6)
    assert b == [3]
    assert [mem.owner[m] for m in a + b] == [5, 5, 5, 6]
    assert mem.free_frames == mem.m2p_first - 4
    assert all(mem.type[m] == PageType.none and mem.type_count[m] == 0 for m in a)


def test_alloc_zeroes(mem):
    [m] = mem.alloc(1)
    mem.write(m << PAGE_SHIFT, b"\xab" * PAGE_SIZE)
    mem.free([m])
    [m2] = mem.alloc(1)
    assert m2 == m
    assert mem.read(m2 << PAGE_SHIFT, PAGE_SIZE) == bytes(PAGE_SIZE)


def test_alloc_of_a_run_zeroes_the_dirty_frames(mem):
    """A contiguous run of frames (alloc's slice-assignment path) is owned as a whole, and a
    frame in it that may hold old data (dirty: its MADV_REMOVE did not happen) reads as zero."""
    a = mem.alloc(3, 3)
    for m in a:
        mem.write(m << PAGE_SHIFT, b"\xcd" * PAGE_SIZE)
    mem.free(a)
    for m in a:                          # as if the host had not taken the pages back
        mem.write(m << PAGE_SHIFT, b"\xcd" * PAGE_SIZE)
    mem.dirty[a[1]] = 1
    b = mem.alloc(4, 3)
    assert b == a
    assert [mem.owner[m] for m in b] == [4, 4, 4] and mem.owner[b[-1] + 1] == DOMID_INVALID
    assert mem.read(b[1] << PAGE_SHIFT, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert all(mem.dirty[m] == 0 for m in b)


def test_set_m2p_of_a_run_and_of_scattered_frames(mem):
    run = mem.alloc(1, 5)
    mem.set_m2p(run, 7)
    assert [mem.m2p[m] for m in run] == [7, 8, 9, 10, 11]
    scattered = [run[3], run[0], run[4]]
    mem.set_m2p(scattered)
    assert [mem.m2p[m] for m in scattered] == [0, 1, 2]
    assert mem.m2p[run[5 - 4]] == 8 and mem.m2p[run[-1] + 1] == INVALID_M2P_ENTRY


def test_alloc_all_or_nothing(mem):
    free = mem.free_frames
    with pytest.raises(OutOfMemory):
        mem.alloc(1, free + 1)
    assert mem.free_frames == free
    frames = mem.alloc(1, free)
    assert len(set(frames)) == free
    assert max(frames) < mem.m2p_first, "handed out an M2P frame"
    with pytest.raises(OutOfMemory):
        mem.alloc(1)


def test_free_resets_owner_and_m2p(mem):
    frames = mem.alloc(7, 4)
    for pfn, mfn in enumerate(frames):
        mem.m2p[mfn] = pfn
    mem.free(frames)
    for mfn in frames:
        assert mem.owner[mfn] == DOMID_INVALID
        assert mem.m2p[mfn] == INVALID_M2P_ENTRY
    assert mem.free_frames == mem.m2p_first


def test_free_of_runs_leaves_the_frames_between_them(mem):
    """free() stores the frame table per contiguous run: two runs around a frame that stays
    allocated (owned, typed, referenced, in the M2P) leave that frame as it was, and the
    freed ones go back lowest first."""
    frames = mem.alloc(7, 7)
    mem.set_m2p(frames)
    keep = frames[3]
    mem.get_writable(keep)
    mem.refs[keep] = 1
    gone = frames[:3] + frames[4:]
    mem.free(list(reversed(gone)))
    assert (mem.owner[keep], mem.type[keep], mem.type_count[keep], mem.refs[keep], mem.m2p[keep]) == \
        (7, PageType.writable, 1, 1, 3)
    for m in gone:
        assert (mem.owner[m], mem.type[m], mem.refs[m], mem.m2p[m]) == \
            (DOMID_INVALID, PageType.none, 0, INVALID_M2P_ENTRY)
    assert mem.alloc(8, 6) == gone


def test_m2p_visible_in_machine_memory(mem):
    """The M2P is guest-readable memory (Xen's read-only mapping): entries live in frames."""
    frames = mem.alloc(1, 600)
    for pfn, mfn in enumerate(frames):
        mem.m2p[mfn] = pfn + 0x1000
    base = mem.m2p_first << PAGE_SHIFT
    for mfn in (frames[0], frames[511], frames[512], frames[-1]):
        assert mem.read_u64(base + 8 * mfn) == mem.m2p[mfn]


@pytest.mark.parametrize("how", ["type_count", "pinned", "mapped"])
def test_frame_in_use(mem, how):
    """A typed frame (a pin is a type reference too: MMUEXT_PIN_* takes it through
    get_type, so a pinned frame has a count) or a mapped one is not freed."""
    frames = mem.alloc(3, 3)
    if how == "mapped":
        mem.refs[frames[1]] = 1
    else:
        mem.type[frames[1]] = PageType.l1
        mem.type_count[frames[1]] = 1
        mem.pinned[frames[1]] = int(how == "pinned")
    free = mem.free_frames
    with pytest.raises(FrameInUse):
        mem.free(frames)
    # Nothing was freed: all or nothing.
    assert mem.free_frames == free
    assert all(mem.owner[m] == 3 for m in frames)
    mem.free(frames, force=True)
    assert mem.free_frames == free + 3
    assert mem.pinned[frames[1]] == 0 and mem.type_count[frames[1]] == 0


def test_release_domain_only_its_frames(mem):
    a = mem.alloc(1, 4)
    b = mem.alloc(2, 4)
    mem.type_count[a[0]] = 2                  # a live page table: torn down anyway
    mem.release_domain(1, a + b)
    assert all(mem.owner[m] == DOMID_INVALID for m in a)
    assert all(mem.owner[m] == 2 for m in b)


def test_raw_access(mem):
    [m] = mem.alloc(1)
    ma = (m << PAGE_SHIFT) + 8
    mem.write_u64(ma, -1)
    assert mem.read_u64(ma) == (1 << 64) - 1
    mem.write(ma, b"\x01\x02")
    assert mem.read(ma, 3) == b"\x01\x02\xff"
    assert mem.frame(m)[8:10] == b"\x01\x02"
    assert mem.valid_mfn(0) and mem.valid_mfn(mem.nr_frames - 1)
    assert not mem.valid_mfn(mem.nr_frames) and not mem.valid_mfn(-1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free"]), st.integers(1, 300),
                          st.integers(1, 5)), max_size=30))
def test_alloc_free_property(ops):
    mem = MachineMemory(4 * MIB)
    try:
        held: dict[int, list[int]] = {}
        usable = mem.m2p_first
        for op, n, owner in ops:
            if op == "alloc":
                before = mem.free_frames
                if n > before:
                    with pytest.raises(OutOfMemory):
                        mem.alloc(owner, n)
                    assert mem.free_frames == before
                    continue
                got = mem.alloc(owner, n)
                assert len(got) == n
                held.setdefault(owner, []).extend(got)
            elif held.get(owner):
                mem.free(held.pop(owner))
            all_held = [m for fs in held.values() for m in fs]
            assert len(all_held) == len(set(all_held)), "a frame was handed out twice"
            assert mem.free_frames + len(all_held) == usable
            for o, fs in held.items():
                assert all(mem.owner[m] == o for m in fs)
            assert all(m < usable for m in all_held)
    finally:
        mem.close()


async def test_domain_frames_and_m2p(hv):
    free = hv.mem.free_frames
    dom = await hv.create(guest("hello"), memory_mib=4)
    mem = hv.mem
    assert len(dom.p2m) == dom.nr_pages == 1024
    assert len(set(dom.p2m)) == 1024
    for pfn, mfn in enumerate(dom.p2m):
        assert mem.owner[mfn] == dom.domid
        assert mem.m2p[mfn] == pfn
    assert mem.owner[dom.shared_info_mfn] == dom.domid
    # nr_pages frames + shared_info (+ any per-domain hypervisor frames)
    assert free - mem.free_frames >= 1025
    assert await dom.wait() == ShutdownReason.poweroff
    frames = dom.p2m
    # wait() returns at shutdown; the domain is destroyed when its task ends just after.
    for _ in range(200):
        if dom.domid not in hv.domains:
            break
        await asyncio.sleep(0.01)
    assert dom.domid not in hv.domains
    assert mem.free_frames == free, "frames not returned after the domain ended"
    for mfn in frames:
        assert mem.owner[mfn] == DOMID_INVALID
        assert mem.m2p[mfn] == INVALID_M2P_ENTRY
