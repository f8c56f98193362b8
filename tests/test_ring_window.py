"""The shared-ring back end (aiovmm/ring.py) against a page the test writes as a frontend would.

Netback and blkback both consume through BackRing, so its checks are the first line against a
frontend's indices: a producer index more than the ring can hold past what the backend has
answered is refused (-1, the caller disconnects: Linux's RING_REQUEST_PROD_OVERFLOW), a full
ring is not. The page here is a plain 4 KiB buffer written with the frontend's layout (sring
header, then slots), the same memory a guest's granted page gives the backend.
"""
from __future__ import annotations

import struct

import pytest

from aiovmm.ring import MASK32, SRING_HDR, BackRing

PAGE = 4096
U32 = struct.Struct("<I")


def page() -> memoryview:
    return memoryview(bytearray(PAGE))


def publish(v: memoryview, req_prod: int) -> None:
    U32.pack_into(v, 0, req_prod & MASK32)


def answer(r: BackRing, n: int) -> None:
    for _ in range(n):
        r.take()
        r.respond_done()


@pytest.mark.parametrize("nr_ents,slot", [(32, 112), (256, 12), (256, 8)])
def test_full_ring_is_accepted_one_more_is_overflow(nr_ents, slot):
    v = page()
    r = BackRing(v, nr_ents, slot)
    publish(v, nr_ents)                        # every slot holds a request: legal
    assert r.unconsumed() == nr_ents
    publish(v, nr_ents + 1)                    # one more than the ring holds
    assert r.unconsumed() == -1
    publish(v, 2 * nr_ents)                    # far more (a doubled bound would let it by)
    assert r.unconsumed() == -1
    publish(v, 0xFFFFFFFF)                     # "negative": behind what was answered
    assert r.unconsumed() == -1


def test_the_window_moves_with_responses_not_with_consumption():
    """Consuming without answering frees no slot: the frontend may only run ahead of the
    responses the backend produced, whatever the backend has read."""
    v = page()
    r = BackRing(v, 32, 112)
    publish(v, 32)
    for _ in range(10):
        r.take()                               # consumed, not answered
    assert r.unconsumed() == 22
    publish(v, 33)
    assert r.unconsumed() == -1                # slot 0 is still owed a response
    for _ in range(10):
        r.respond_done()
    publish(v, 42)
    assert r.unconsumed() == 32                # 42 published - 10 consumed
    publish(v, 43)
    assert r.unconsumed() == -1


def test_free_running_indices_wrap_at_2_32():
    v = page()
    r = BackRing(v, 32, 112)
    start = MASK32 - 4                         # both sides just below the wrap
    r.req_cons = r.rsp_prod_pvt = start
    publish(v, start + 32)                     # wraps to 27
    assert r.unconsumed() == 32
    answer(r, 32)
    assert r.req_cons == r.rsp_prod_pvt == (start + 32) & MASK32
    publish(v, start + 64)
    assert r.unconsumed() == 32
    publish(v, start + 65)
    assert r.unconsumed() == -1


def test_take_copies_the_request_once():
    """The copy is the backend's: the frontend rewriting the slot afterwards changes nothing."""
    v = page()
    r = BackRing(v, 32, 112)
    off = r.slot_off(0)
    v[off:off + 112] = bytes(range(112))
    publish(v, 1)
    raw = r.take()
    v[off:off + 112] = b"\xff" * 112
    assert raw == bytes(range(112)) and isinstance(raw, bytes)
    assert r.req_cons == 1


def test_slots_stay_inside_the_page():
    v = page()
    r = BackRing(v, 32, 112)
    offs = [r.slot_off(i) for i in range(0, 1000, 7)]
    assert min(offs) >= SRING_HDR and max(offs) + 112 <= SRING_HDR + 32 * 112 <= PAGE


@pytest.mark.parametrize("nr_ents,slot,fits", [
    (32, 112, True), (32, 126, True),          # 64 + 32 * 126 = 4096: exactly the page
    (32, 127, False),                          # one byte too many
    (64, 64, False), (24, 16, False), (0x100, 16, False), (256, 15, True),
])
def test_geometry_must_fit_the_page_and_be_a_power_of_two(nr_ents, slot, fits):
    if fits:
        BackRing(page(), nr_ents, slot)
    else:
        with pytest.raises(ValueError):
            BackRing(page(), nr_ents, slot)


def test_push_responses_notifies_as_rsp_event_asks():
    v = page()
    r = BackRing(v, 32, 112)
    publish(v, 3)
    U32.pack_into(v, 12, 1)                    # rsp_event: wake me at the first response
    answer(r, 2)
    assert r.push_responses() is True
    assert U32.unpack_from(v, 8)[0] == 2
    U32.pack_into(v, 12, 10)                   # not before the 10th
    answer(r, 1)
    assert r.push_responses() is False


def test_final_check_sees_a_request_published_meanwhile():
    v = page()
    r = BackRing(v, 32, 112)
    publish(v, 1)
    answer(r, 1)
    assert r.final_check() is False
    assert U32.unpack_from(v, 4)[0] == 2       # req_event: notify me at the next request
    publish(v, 2)
    assert r.final_check() is True
