"""ring.py against a bytearray page playing the guest's side of xenstore_domain_interface."""
from __future__ import annotations

import asyncio
import struct

import pytest

from aiovmm.xenstore import RingError, XenstoreRing, XsType
from aiovmm.xenstore import ring as R

from .conftest import HDR, XsErr

U32 = struct.Struct("<I")


class Guest:
    """The guest end: writes req[], reads rsp[], keeps its own producer/consumer indices."""

    def __init__(self, page: bytearray, start: int = 0) -> None:
        self.page = page
        for off in (R.REQ_CONS, R.REQ_PROD, R.RSP_CONS, R.RSP_PROD):
            U32.pack_into(page, off, start)
        self.req_prod = self.rsp_cons = start
        self.rx = bytearray()

    def get(self, off: int) -> int:
        return U32.unpack_from(self.page, off)[0]

    def put(self, off: int, v: int) -> None:
        U32.pack_into(self.page, off, v & 0xFFFFFFFF)

    def write(self, data: bytes) -> int:
        """Write as much as fits (free = 1024 - (prod - cons)); returns bytes written."""
        free = 1024 - ((self.req_prod - self.get(R.REQ_CONS)) & 0xFFFFFFFF)
        n = min(free, len(data))
        for i in range(n):
            self.page[R.REQ_OFF + ((self.req_prod + i) & 1023)] = data[i]
        self.req_prod = (self.req_prod + n) & 0xFFFFFFFF
        self.put(R.REQ_PROD, self.req_prod)
        return n

    def read(self) -> bytes:
        prod = self.get(R.RSP_PROD)
        n = (prod - self.rsp_cons) & 0xFFFFFFFF
        assert n <= 1024
        out = bytes(self.page[R.RSP_OFF + ((self.rsp_cons + i) & 1023)] for i in range(n))
        self.rsp_cons = prod
        self.put(R.RSP_CONS, prod)
        self.rx += out
        return out

    def messages(self) -> list[tuple[int, int, int, bytes]]:
        out = []
        while len(self.rx) >= 16:
            t, r, tx, n = HDR.unpack_from(self.rx)
            if len(self.rx) < 16 + n:
                break
            out.append((t, r, tx, bytes(self.rx[16:16 + n])))
            del self.rx[:16 + n]
        return out


def msg(type_: int, req_id: int, payload: bytes, tx: int = 0) -> bytes:
    return HDR.pack(type_, req_id, tx, len(payload)) + payload


# ---- XenstoreRing alone ---------------------------------------------------------------------

def test_layout_matches_xs_wire_h():
    assert (R.REQ_CONS, R.REQ_PROD, R.RSP_CONS, R.RSP_PROD) == (2048, 2052, 2056, 2060)
    assert (R.SERVER_FEATURES, R.CONNECTION, R.ERROR) == (2064, 2068, 2072)


@pytest.mark.parametrize("start", [0, 1000, 0xFFFFFF00, 0xFFFFFFFF])
def test_indices_are_free_running_and_wrap(start):
    page = bytearray(4096)
    guest = Guest(page, start)
    notes = []
    ring = XenstoreRing(page, lambda: notes.append(1))
    assert guest.get(R.SERVER_FEATURES) & R.FEATURE_ERROR
    data = bytes(range(256)) * 3                              # 768 bytes, crosses the wrap
    for _ in range(3):
        assert guest.write(data) == len(data)
        assert ring.receive() == data
        assert guest.get(R.REQ_CONS) == guest.req_prod
    assert ring.receive() == b""
    ring.send(data * 2)                                       # 1536 bytes: 1024 fit
    assert ring.pending_output == 512
    assert guest.read() == (data * 2)[:1024]
    assert ring.flush() == 512
    assert guest.read() == (data * 2)[1024:]
    assert guest.get(R.RSP_PROD) == (start + 1536) & 0xFFFFFFFF
    assert notes


def test_guest_scribbling_our_indices_is_ignored():
    page = bytearray(4096)
    guest = Guest(page)
    ring = XenstoreRing(page, lambda: None)
    guest.write(b"abc")
    guest.put(R.REQ_CONS, 0xDEAD)                              # ours, the guest's bogus write
    guest.put(R.RSP_PROD, 0xBEEF)
    assert ring.receive() == b"abc"
    ring.send(b"xy")
    assert guest.get(R.RSP_PROD) == 2


@pytest.mark.parametrize("field,value", [(R.REQ_PROD, 1025), (R.REQ_PROD, 0xFFFFFFFF)])
def test_inconsistent_request_index_fails_the_ring(field, value):
    page = bytearray(4096)
    Guest(page)
    ring = XenstoreRing(page, lambda: None)
    U32.pack_into(page, field, value)
    with pytest.raises(RingError) as e:
        ring.receive()
    assert e.value.code == R.ERROR_RINGIDX
    assert U32.unpack_from(page, R.ERROR)[0] == R.ERROR_RINGIDX
    with pytest.raises(RingError):
        ring.flush()


def test_inconsistent_response_index_fails_the_ring():
    page = bytearray(4096)
    Guest(page)
    ring = XenstoreRing(page, lambda: None)
    U32.pack_into(page, R.RSP_CONS, 5)                         # consumed more than produced
    with pytest.raises(RingError):
        ring.send(b"x")
    assert U32.unpack_from(page, R.ERROR)[0] == R.ERROR_RINGIDX


def test_guest_that_never_reads_its_responses_is_cut_off():
    """Output queued for a guest that never consumes rsp[] is bounded: past
    MAX_PENDING_OUTPUT the ring fails with XENSTORE_ERROR_COMM instead of growing host memory."""
    page = bytearray(4096)
    Guest(page)
    ring = XenstoreRing(page, lambda: None)
    event = b"x" * 4000
    with pytest.raises(RingError) as e:
        for _ in range(R.MAX_PENDING_OUTPUT // len(event) + 2):
            ring.send(event)
    assert e.value.code == R.ERROR_COMM
    assert U32.unpack_from(page, R.ERROR)[0] == R.ERROR_COMM
    assert ring.pending_output <= R.MAX_PENDING_OUTPUT + len(event)


# ---- through the server -----------------------------------------------------------------------

class GuestConn:
    def __init__(self, xs, domid: int, start: int = 0) -> None:
        self.page = bytearray(4096)
        self.guest = Guest(self.page, start)
        self.wake = asyncio.Event()
        self.transport = xs.serve_ring(domid, self.page, self.wake.set)

    async def send(self, data: bytes) -> None:
        while data:
            n = self.guest.write(data)
            data = data[n:]
            self.transport.kick()
            if data:
                await self.until(lambda: self.guest.get(R.REQ_CONS) == self.guest.req_prod)

    async def until(self, cond, timeout: float = 2.0) -> None:
        async def loop():
            while not cond():
                self.wake.clear()
                await self.wake.wait()
        await asyncio.wait_for(loop(), timeout)

    async def recv(self, count: int = 1) -> list[tuple[int, int, int, bytes]]:
        got: list = []

        def have():
            self.guest.read()
            self.transport.kick()                              # room for more output
            got.extend(self.guest.messages())
            return len(got) >= count
        await self.until(have)
        return got


async def test_guest_ring_requests_watches_and_wrap(xs, client):
    xs.store.introduce(7)
    g = GuestConn(xs, 7, start=0xFFFFFFF0)                      # indices wrap at once
    await g.send(msg(XsType.WRITE, 1, b"device/vif/0/state\x004"))
    assert await g.recv() == [(XsType.WRITE, 1, 0, b"OK\0")]
    assert xs.store.read("/local/domain/7/device/vif/0/state") == b"4"
    await g.send(msg(XsType.WATCH, 2, b"control\0tok\0"))
    assert await g.recv(2) == [(XsType.WATCH, 2, 0, b"OK\0"),
                               (XsType.WATCH_EVENT, 0, 0, b"control\0tok\0")]
    dom0 = await client()
    await dom0.write("/local/domain/7/control/shutdown", "poweroff")
    assert await g.recv() == [(XsType.WATCH_EVENT, 0, 0, b"control/shutdown\0tok\0")]
    # a request bigger than the ring, delivered in pieces; a reply bigger than the ring
    big = b"v" * 2000
    await g.send(msg(XsType.WRITE, 3, b"data/big\0" + big))
    assert await g.recv() == [(XsType.WRITE, 3, 0, b"OK\0")]
    await g.send(msg(XsType.READ, 4, b"data/big\0"))
    assert await g.recv() == [(XsType.READ, 4, 0, big)]
    # transactions over the ring
    await g.send(msg(XsType.TRANSACTION_START, 5, b"\0"))
    [(_, _, _, txid)] = await g.recv()
    tx = int(txid.rstrip(b"\0"))
    await g.send(msg(XsType.WRITE, 6, b"data/t\0x", tx=tx) + msg(XsType.TRANSACTION_END, 7,
                                                                    b"T\0", tx=tx))
    assert [m[:2] for m in await g.recv(2)] == [(XsType.WRITE, 6), (XsType.TRANSACTION_END, 7)]
    assert xs.store.read("/local/domain/7/data/t") == b"x"
    # the guest is unprivileged
    await g.send(msg(XsType.READ, 8, b"/local/domain/0\0"))
    assert await g.recv() == [(XsType.ERROR, 8, 0, b"EACCES\0")]


async def test_oversized_ring_message_closes_only_that_ring(xs, client):
    xs.store.introduce(7)
    xs.store.introduce(8)
    bad, good = GuestConn(xs, 7), GuestConn(xs, 8)
    await bad.send(HDR.pack(XsType.WRITE, 1, 0, 5000))
    await bad.until(lambda: bad.guest.get(R.ERROR) == R.ERROR_PROTO)
    await good.send(msg(XsType.WRITE, 1, b"ok\0yes"))
    assert await good.recv() == [(XsType.WRITE, 1, 0, b"OK\0")]
    c = await client()
    assert await c.read("/local/domain/8/ok") == b"yes"
    # broken indices on another ring: same story
    bad2 = GuestConn(xs, 8)
    bad2.guest.put(R.REQ_PROD, 4000)
    bad2.transport.kick()
    await bad2.until(lambda: bad2.guest.get(R.ERROR) == R.ERROR_RINGIDX)
    assert await c.read("/local/domain/8/ok") == b"yes"
    assert xs.stats["protocol_errors"] == 2


async def test_release_closes_the_domains_ring(xs):
    xs.store.introduce(9)
    g = GuestConn(xs, 9)
    await g.send(msg(XsType.WATCH, 1, b"@releaseDomain\0r\0"))
    await g.recv(2)
    conns = [c for c in xs.store.connections if c.domid == 9]
    assert len(conns) == 1
    xs.store.release(9)
    for _ in range(100):
        if not any(c.domid == 9 for c in xs.store.connections):
            break
        await asyncio.sleep(0.01)
    assert not any(c.domid == 9 for c in xs.store.connections)


async def test_unfinished_ring_message_waits_for_the_rest_without_spinning(xs, client):
    """Issue 9: a ring consumer waits on an event for a message the guest left unfinished (a
    header announcing more bytes than published): over the following interval the process's
    CPU share stays at the idle reference (a spin takes a core's share), and the message is
    served once its remaining bytes arrive."""
    import time

    async def cpu_share(interval: float = 0.5) -> float:
        c0, t0 = time.process_time(), time.monotonic()
        await asyncio.sleep(interval)
        return (time.process_time() - c0) / (time.monotonic() - t0)

    xs.store.introduce(7)
    g = GuestConn(xs, 7)
    ref = await cpu_share()                                   # the same daemon, idle
    whole = msg(XsType.WRITE, 1, b"data/late\0" + b"z" * 80)
    await g.send(whole[:30])                                  # header + part of the payload
    during = await cpu_share()
    assert during < ref + 0.1, (ref, during)                  # a spin: a core's share
    c = await client()
    with pytest.raises(XsErr, match="ENOENT"):
        await c.read("/local/domain/7/data/late")
    await g.send(whole[30:])
    assert await g.recv() == [(XsType.WRITE, 1, 0, b"OK\0")]
    assert await c.read("/local/domain/7/data/late") == b"z" * 80
