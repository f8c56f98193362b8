"""Host-side xenbus helpers read guest-written nodes: anything may be there."""
from __future__ import annotations

import pytest

from aiovmm.xenbus import XenbusState, read_state, read_str
from aiovmm.xenstore.store import Store


@pytest.mark.parametrize("value", [b"4", b"", b"abc", b"99", b"-1", b"\xff\xfe", b"4\x00"])
def test_read_state_of_guest_garbage(value: bytes):
    st = Store()
    st.write("/dev/x/state", value)
    want = {b"4": XenbusState.Connected, b"": XenbusState.Unknown}.get(value, XenbusState.Unknown)
    assert read_state(st, "/dev/x") is want


def test_missing_nodes_and_non_utf8_text():
    st = Store()
    assert read_state(st, "/nowhere") is XenbusState.Unknown
    assert read_str(st, "/nowhere", "d") == "d"
    st.write("/dev/y", b"\xc3\x28")
    assert read_str(st, "/dev/y", "d") == "d"
    st.write("/dev/y", "caf\u00e9")
    assert read_str(st, "/dev/y") == "caf\u00e9"


def test_cancel_racing_a_child_error_is_not_lost():
    """A backend's TaskGroup child raises its disconnect (the frontend closed) just as the
    toolstack cancels the backend (detach): Python 3.11's TaskGroup reports only the child's
    error, and without reraise_cancellation the backend went on waiting for a reconnect
    while the detach waited for it forever."""
    import asyncio
    from aiovmm.xenbus import reraise_cancellation

    class Gone(Exception):
        pass

    async def child(ev: asyncio.Event) -> None:
        await ev.wait()
        raise Gone()

    async def backend(ev: asyncio.Event, q: asyncio.Queue, fixed: bool) -> None:
        while True:
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(child(ev))
                    tg.create_task(asyncio.sleep(100))
            except* Gone:
                pass
            if fixed:
                reraise_cancellation()
            await q.get()                       # "waiting for the frontend to reconnect"

    async def race(fixed: bool) -> bool:
        ev, q = asyncio.Event(), asyncio.Queue()
        t = asyncio.create_task(backend(ev, q, fixed))
        await asyncio.sleep(0.01)
        ev.set()
        await asyncio.sleep(0)                  # the child is woken, not yet run
        t.cancel()
        done, _ = await asyncio.wait([t], timeout=1)
        if not done:
            t.cancel()
            await asyncio.wait([t], timeout=1)
        return bool(done) and t.cancelled()
    import sys
    if sys.version_info[:2] == (3, 11):
        assert asyncio.run(race(False)) is False  # the race is real here
    assert asyncio.run(race(True)) is True
