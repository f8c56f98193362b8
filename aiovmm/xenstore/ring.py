"""Serving xenstore over a guest's shared ring page (struct xenstore_domain_interface).

Layout (xs_wire.h; offsets checked against /usr/include/xen/io/xs_wire.h):

    0     req[1024]        guest -> xenstored byte stream
    1024  rsp[1024]        xenstored -> guest byte stream (replies and watch events)
    2048  req_cons   u32   written by us
    2052  req_prod   u32   written by the guest
    2056  rsp_cons   u32   written by the guest
    2060  rsp_prod   u32   written by us
    2064  server_features  u32 (we set XENSTORE_SERVER_FEATURE_ERROR)
    2068  connection       u32
    2072  error            u32 (we set it when we give up on the ring)

Index rules: all four indices are free-running u32 counters; byte `i` of a stream lives at
`i & 1023`.  We keep our own copies of req_cons and rsp_prod and never re-read them from the
page (the guest can scribble on them); the guest's req_prod and rsp_cons are read once per
pass and checked: `req_prod - req_cons` or `rsp_prod - rsp_cons` above 1024 (mod 2^32) is an
inconsistent ring -> error field = XENSTORE_ERROR_RINGIDX and the connection is closed, and
only that one.  A message announcing more than 4096 payload bytes closes it with
XENSTORE_ERROR_PROTO (the framing lives in protocol.MessageReader, shared with sockets).

Python gives us sequential consistency on a bytearray/memoryview in one thread, so the
barriers of the C implementations are implicit; on a page shared with a running vCPU thread
the data is copied out once before use (we never parse in place).
"""
from __future__ import annotations

import asyncio
import struct
from typing import Callable

RING_SIZE = 1024
RING_MASK = RING_SIZE - 1
REQ_OFF, RSP_OFF = 0, 1024
REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD = 2048, 2052, 2056, 2060
SERVER_FEATURES, CONNECTION, ERROR = 2064, 2068, 2072
INTERFACE_SIZE = 2076  # through `error`; evtchn_port (2076) is newer and unused here

FEATURE_RECONNECTION = 1
FEATURE_ERROR = 2
ERROR_NONE, ERROR_COMM, ERROR_RINGIDX, ERROR_PROTO = 0, 1, 2, 3
MAX_PENDING_OUTPUT = 1 << 20      # bytes queued for a guest that does not read its ring

_U32 = struct.Struct("<I")
_M32 = 0xFFFFFFFF


class RingError(Exception):
    """The guest broke the ring protocol; `code` is written to the page's error field."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code


class XenstoreRing:
    """Byte-stream endpoint over one xenstore ring page.

    `receive()` takes every request byte the guest has published; `send()` queues response
    bytes and writes as many as fit; `flush()` retries after the guest consumed some.  Each
    index update is followed by `notify()` (an event on the store event channel).
    """

    def __init__(self, page: memoryview | bytearray, notify: Callable[[], None]) -> None:
        self._page = memoryview(page).cast("B")
        if len(self._page) < INTERFACE_SIZE or self._page.readonly:
            raise ValueError("need a writable view of at least one xenstore interface")
        self._notify = notify
        self._req_cons = self._get(REQ_CONS)   # the starting point is whatever was set up
        self._rsp_prod = self._get(RSP_PROD)
        self._out = bytearray()
        self.failed = ERROR_NONE
        self._put(SERVER_FEATURES, self._get(SERVER_FEATURES) | FEATURE_ERROR)

    def _get(self, off: int) -> int:
        return _U32.unpack_from(self._page, off)[0]

    def _put(self, off: int, value: int) -> None:
        _U32.pack_into(self._page, off, value & _M32)

    def fail(self, code: int, msg: str = "") -> RingError:
        """Record `code` in the page's error field and notify; returns the error to raise."""
        if not self.failed:
            self.failed = code
            self._put(ERROR, code)
            self._notify()
        return RingError(code, msg or f"xenstore ring error {code}")

    @property
    def pending_output(self) -> int:
        return len(self._out)

    def receive(self) -> bytes:
        """All request bytes published since the last call (b"" if none)."""
        if self.failed:
            raise RingError(self.failed, "ring already failed")
        prod = self._get(REQ_PROD)
        avail = (prod - self._req_cons) & _M32
        if avail > RING_SIZE:
            raise self.fail(ERROR_RINGIDX, f"req_prod {prod:#x} req_cons {self._req_cons:#x}")
        if avail == 0:
            return b""
        start = self._req_cons & RING_MASK
        first = min(avail, RING_SIZE - start)
        data = bytes(self._page[REQ_OFF + start:REQ_OFF + start + first])
        if first < avail:
            data += bytes(self._page[REQ_OFF:REQ_OFF + avail - first])
        self._req_cons = (self._req_cons + avail) & _M32
        self._put(REQ_CONS, self._req_cons)
        self._notify()
        return data

    def send(self, data: bytes) -> None:
        """Queue a reply or watch event. A guest that never consumes its responses while it
        keeps causing output (watch events) would grow this queue without bound: past
        MAX_PENDING_OUTPUT the ring is failed (ERROR_COMM) and the connection closed."""
        self._out += data
        self.flush()
        if len(self._out) > MAX_PENDING_OUTPUT:
            raise self.fail(ERROR_COMM, f"{len(self._out)} bytes of output the guest does not read")

    def flush(self) -> int:
        """Write as much queued output as the guest left room for; bytes written."""
        if self.failed:
            raise RingError(self.failed, "ring already failed")
        if not self._out:
            return 0
        cons = self._get(RSP_CONS)
        used = (self._rsp_prod - cons) & _M32
        if used > RING_SIZE:
            raise self.fail(ERROR_RINGIDX, f"rsp_cons {cons:#x} rsp_prod {self._rsp_prod:#x}")
        n = min(RING_SIZE - used, len(self._out))
        if n == 0:
            return 0
        start = self._rsp_prod & RING_MASK
        first = min(n, RING_SIZE - start)
        self._page[RSP_OFF + start:RSP_OFF + start + first] = self._out[:first]
        if first < n:
            self._page[RSP_OFF:RSP_OFF + n - first] = self._out[first:n]
        del self._out[:n]
        self._rsp_prod = (self._rsp_prod + n) & _M32
        self._put(RSP_PROD, self._rsp_prod)
        self._notify()
        return n


class RingTransport:
    """server.Transport over a XenstoreRing.  Call `kick()` when the guest notifies."""

    def __init__(self, ring: XenstoreRing) -> None:
        self.ring = ring
        self._kick = asyncio.Event()
        self._closed = False

    def kick(self) -> None:
        self._kick.set()

    async def recv(self) -> bytes:
        while not self._closed:
            self._kick.clear()
            self.ring.flush()          # the guest may have made room for pending output
            data = self.ring.receive()
            if data:
                return data
            await self._kick.wait()
        return b""

    def send(self, data: bytes) -> None:
        """Called from any connection's task (watch events): never raises."""
        if self._closed or self.ring.failed:
            return
        try:
            self.ring.send(data)
        except RingError:
            self._kick.set()  # our own task sees the failure on its next recv()

    async def drain(self) -> None:
        return None

    def close(self, error: int = ERROR_NONE) -> None:
        if error and not self.ring.failed:
            self.ring.fail(error)
        self._closed = True
        self._kick.set()
