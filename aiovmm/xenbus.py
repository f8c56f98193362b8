"""Host-side xenbus: what backends need from xenstore, in-process (no socket).

Backends and the toolstack use the daemon's Store directly as dom0; a watch is an internal
privileged connection whose events land in an asyncio queue (Xen's backends wait on
watches, never poll). XenbusState values and device-directory helpers live here too.
"""
from __future__ import annotations

import asyncio
import enum
import logging

from .xenstore.core import XsError
from .xenstore.protocol import MessageReader, Message, XsType
from .xenstore.store import Store

log = logging.getLogger("aiovmm.xenbus")


class XenbusState(enum.IntEnum):
    Unknown = 0
    Initialising = 1
    InitWait = 2
    Initialised = 3
    Connected = 4
    Closing = 5
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8


class Watch:
    """A xenstore watch on `path` (and its subtree) as an async iterator of changed paths.
    The initial event Xen sends on registration is delivered too."""

    def __init__(self, store: Store, path: str, token: str = "host") -> None:
        self.store = store
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self._reader = MessageReader()
        self.conn = store.connect(0, self._sink, privileged=True, name=f"watch:{path}")
        store.process(self.conn, Message(XsType.WATCH, 0, 0, path.encode() + b"\0" + token.encode() + b"\0"))

    def _sink(self, data: bytes) -> None:
        for msg in self._reader.feed(data):
            if msg.type == XsType.WATCH_EVENT:
                path = msg.payload.split(b"\0", 1)[0].decode()
                self.queue.put_nowait(path)

    async def next(self) -> str:
        return await self.queue.get()

    def close(self) -> None:
        self.store.disconnect(self.conn)


def read_state(store: Store, path: str) -> XenbusState:
    """<path>/state, or Unknown if it is missing or not a XenbusState: the frontend's node is
    guest-written, so anything (not a number, not UTF-8, 99) may be there."""
    try:
        return XenbusState(int(store.read(f"{path}/state").decode() or 0))
    except (XsError, ValueError):          # missing node; UnicodeDecodeError is a ValueError
        return XenbusState.Unknown


def read_str(store: Store, path: str, default: str | None = None) -> str | None:
    """The node's value as text, or `default` if it is missing or not UTF-8 (guest-written)."""
    try:
        return store.read(path).decode()
    except (XsError, UnicodeDecodeError):
        return default


def read_int(store: Store, path: str, default: int) -> int:
    """The node's value as a decimal number (a u32 or so: at most 20 ASCII digits, a sign
    allowed), or `default` if it is missing or anything else: a frontend's nodes are
    guest-written, and int() takes '²' no more than 5000 digits (ValueError)."""
    v = read_str(store, path)
    digits = v[1:] if v and v[0] == "-" else v
    if not digits or len(digits) > 20 or not (digits.isascii() and digits.isdigit()):
        return default
    return int(v)


def write_keys(store: Store, base: str, keys: dict[str, str], perms: list[str]) -> None:
    store.write(base, "")
    store.set_perms(base, perms)
    for k, v in keys.items():
        store.write(f"{base}/{k}", v)
        store.set_perms(f"{base}/{k}", perms)


def is_online(store: Store, back: str) -> bool:
    """Linux's xenbus_dev_is_online: the toolstack writes <backend>/online = 0 before it
    detaches a device. A backend whose frontend has closed then ends instead of waiting for
    a reconnect (a cancel that raced the frontend's close is not lost: serve_until)."""
    return read_str(store, f"{back}/online", "1") != "0"


async def serve_until(stop: type[Exception], *coros) -> list[Exception]:
    """Run a backend's connected phase (`coros` in one TaskGroup) until one of them raises
    `stop`; returns the `stop` errors raised. A cancellation from outside always propagates,
    which Python 3.11's TaskGroup alone does not guarantee:
    - its __aexit__, when a child failed while the parent task was being cancelled from
      outside, raises the children's errors and drops the CancelledError ("other errors
      have priority", taskgroups.py); an `except*` for those errors then swallowed the
      cancellation, and the backend waited for a frontend that would never come back (the
      hypervisor's exit hung at a Linux poweroff: the frontend's Closed and the domain's end
      in one loop turn). The request is still counted in Task.cancelling(): re-raised here.
    - that count is only exact if the parent waits in the group's body: a child failing
      while the parent already waits in __aexit__ leaves the group's own cancel request
      counted (its uncancel() ran on entry, before the request). Hence the wait below."""
    task = asyncio.current_task()
    assert task is not None
    before = task.cancelling()
    errors: list[Exception] = []
    try:
        async with asyncio.TaskGroup() as tg:
            await asyncio.wait([tg.create_task(c) for c in coros])
    except* stop as eg:
        errors = list(eg.exceptions)
    if task.cancelling() > before:
        raise asyncio.CancelledError
    return errors


async def wait_for_state(store: Store, path: str, states: set[XenbusState]) -> XenbusState:
    """Wait (on a watch) until <path>/state is one of `states`; returns it."""
    w = Watch(store, f"{path}/state")
    try:
        while True:
            s = read_state(store, path)
            if s in states:
                return s
            await w.next()
    finally:
        w.close()
