"""Fixtures for the xenstore tests: a real server on real unix sockets, a raw wire client.

`xs` is a running XenstoreServer with a dom0 socket (`xs.sock`) and a socket whose
connections act as unprivileged domain 5 (`xs.dom5_sock`); domain 5 is introduced, so
/local/domain/5 exists and is owned by dom5.  `client(path)` opens a raw protocol client.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import struct
from pathlib import Path

import pytest

from aiovmm.xenstore import Quotas, XenstoreServer, XsType

HDR = struct.Struct("<IIII")


class XsErr(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class Client:
    """A raw xenstore client: one request at a time, watch events stashed aside."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.events: list[tuple[str, str]] = []
        self._req = 0

    @classmethod
    async def open(cls, path) -> "Client":
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def read_msg(self, timeout: float = 2.0) -> tuple[int, int, int, bytes]:
        hdr = await asyncio.wait_for(self.reader.readexactly(16), timeout)
        t, r, tx, n = HDR.unpack(hdr)
        body = await asyncio.wait_for(self.reader.readexactly(n), timeout)
        return t, r, tx, body

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def call_raw(self, type_: int, payload: bytes, tx: int = 0) -> tuple[int, bytes]:
        self._req += 1
        req = self._req
        self.writer.write(HDR.pack(type_, req, tx, len(payload)) + payload)
        await self.writer.drain()
        while True:
            t, r, rtx, body = await self.read_msg()
            if t == XsType.WATCH_EVENT:
                self._stash(body)
                continue
            assert r == req and rtx == tx, (t, r, rtx, body)
            return t, body

    async def call(self, type_: int, *args: str, tx: int = 0, payload: bytes | None = None
                   ) -> bytes:
        if payload is None:
            payload = b"".join(a.encode() + b"\0" for a in args)
        t, body = await self.call_raw(type_, payload, tx)
        if t == XsType.ERROR:
            raise XsErr(body.rstrip(b"\0").decode())
        assert t == type_
        return body

    # conveniences
    async def read(self, path: str, tx: int = 0) -> bytes:
        return await self.call(XsType.READ, path, tx=tx)

    async def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        v = value.encode() if isinstance(value, str) else value
        await self.call(XsType.WRITE, tx=tx, payload=path.encode() + b"\0" + v)

    async def rm(self, path: str, tx: int = 0) -> None:
        await self.call(XsType.RM, path, tx=tx)

    async def directory(self, path: str, tx: int = 0) -> list[str]:
        body = await self.call(XsType.DIRECTORY, path, tx=tx)
        return [s.decode() for s in body.split(b"\0")[:-1]]

    async def watch(self, path: str, token: str) -> None:
        await self.call(XsType.WATCH, path, token)

    async def tx_start(self) -> int:
        return int((await self.call(XsType.TRANSACTION_START, "")).rstrip(b"\0"))

    async def tx_end(self, tx: int, commit: bool = True) -> None:
        await self.call(XsType.TRANSACTION_END, "T" if commit else "F", tx=tx)

    def _stash(self, body: bytes) -> None:
        path, token = body.split(b"\0")[:2]
        self.events.append((path.decode(), token.decode()))

    async def event(self, timeout: float = 2.0) -> tuple[str, str]:
        while not self.events:
            t, r, tx, body = await self.read_msg(timeout)
            assert t == XsType.WATCH_EVENT and r == 0 and tx == 0, (t, body)
            self._stash(body)
        return self.events.pop(0)

    async def no_event(self, timeout: float = 0.05) -> None:
        """Assert that no watch event arrives within `timeout`."""
        if self.events:
            raise AssertionError(f"unexpected events {self.events}")
        try:
            t, r, tx, body = await self.read_msg(timeout)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"unexpected message {t} {body!r}")

    async def closed(self, timeout: float = 2.0) -> bool:
        """True once the server has closed this connection."""
        data = await asyncio.wait_for(self.reader.read(65536), timeout)
        return data == b""

    async def aclose(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass




@pytest.fixture
def quotas() -> Quotas:
    return Quotas()


@pytest.fixture
async def xs(sock_dir: Path, quotas: Quotas):
    async with XenstoreServer(sock_dir / "xs.sock", quotas=quotas) as server:
        server.sock = sock_dir / "xs.sock"
        server.dom5_sock = sock_dir / "dom5.sock"
        await server.listen(server.dom5_sock, domid=5)
        server.store.introduce(5)
        yield server


@pytest.fixture
async def client(xs):
    opened: list[Client] = []

    async def open_client(path: Path | None = None) -> Client:
        reader, writer = await asyncio.open_unix_connection(str(path or xs.sock))
        c = Client(reader, writer)
        opened.append(c)
        return c

    yield open_client
    for c in opened:
        await c.aclose()


@pytest.fixture
def xs_env(xs) -> dict[str, str]:
    """Environment for Debian's xenstore-utils to talk to `xs` (dom0 socket)."""
    if shutil.which("xenstore-read") is None:
        pytest.skip("xenstore-utils not installed (apt-get install -y xenstore-utils)")
    return dict(os.environ, XENSTORED_PATH=str(xs.sock))
