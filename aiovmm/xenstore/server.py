"""The xenstore daemon on asyncio: unix sockets now, guest rings through the same loop.

    async with XenstoreServer(tmp / "socket") as xs:      # dom0 socket (privileged)
        await xs.listen(tmp / "dom5.sock", domid=5)        # connections here act as dom5
        xs.store.introduce(5)
        transport = xs.serve_ring(5, page, notify)         # a guest ring; transport.kick()
                                                           # on each event from the guest

Clients find the socket through XENSTORED_PATH=<socket path> (libxenstore 4.17 honours it
for both its socket and its "domain device" path; XENSTORE_PATH is *not* honoured).

Every connection is one task in the server's TaskGroup; nothing outlives `async with`.  A
connection that breaks the protocol (oversized message, bad ring indices) is closed on its
own, and so is one whose request hits an internal error: the server keeps serving the others.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path
from typing import Callable, Protocol

from ..hostfile import unlink_stale_socket
from .domain import Connection, Quotas
from .protocol import MessageReader, ProtocolViolation
from .ring import (ERROR_COMM, ERROR_NONE, ERROR_PROTO, MAX_PENDING_OUTPUT, RingError, RingTransport,
                   XenstoreRing)
from .store import Store

log = logging.getLogger(__name__)


class Transport(Protocol):
    """A byte stream to one client.  `send` queues and never blocks or raises."""

    async def recv(self) -> bytes: ...          # b"" when the peer is gone / we closed
    def send(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...          # wait for queued output (back-pressure)
    def close(self, error: int = ERROR_NONE) -> None: ...


class SocketTransport:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    async def recv(self) -> bytes:
        return await self._reader.read(65536)

    def send(self, data: bytes) -> None:
        """Queue output; a client that does not read while output keeps coming (watch
        events) is disconnected once MAX_PENDING_OUTPUT bytes are waiting."""
        if not self._writer.is_closing():
            self._writer.write(data)
            if self._writer.transport.get_write_buffer_size() > MAX_PENDING_OUTPUT:
                log.warning("xenstore: client not reading (%d bytes pending): disconnected",
                            self._writer.transport.get_write_buffer_size())
                self._writer.transport.abort()

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self, error: int = ERROR_NONE) -> None:
        self._writer.close()


class XenstoreServer:
    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 store: Store | None = None, quotas: Quotas | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.store = store or Store(quotas)
        self.store.on_release = self._close_connections
        self._tg: asyncio.TaskGroup | None = None
        self._listeners: list[tuple[socket.socket, Path, asyncio.Task[None]]] = []
        self._inodes: dict[Path, tuple[int, int]] = {}    # path -> (st_dev, st_ino) we bound
        self._transports: dict[Connection, Transport] = {}
        self._closed = False
        self.stats = {"connections": 0, "protocol_errors": 0, "internal_errors": 0}

    async def __aenter__(self) -> XenstoreServer:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        try:
            if self.path is not None:
                await self.listen(self.path)
        except BaseException:
            await self._tg.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose(*exc)

    async def aclose(self, *exc: object) -> None:
        """Stop listening, close every connection, wait for their tasks.  Idempotent."""
        if self._closed or self._tg is None:
            return
        self._closed = True
        for sock, path, task in self._listeners:
            task.cancel()
            sock.close()
            # Only the socket this server bound: another process may have replaced it since.
            try:
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == self._inodes.get(path):
                    os.unlink(path)
            except FileNotFoundError:
                pass
        for transport in list(self._transports.values()):
            transport.close()
        await self._tg.__aexit__(*(exc or (None, None, None)))

    # ---- listeners and connections ----------------------------------------------------------
    async def listen(self, path: str | os.PathLike[str], *, domid: int = 0,
                     privileged: bool | None = None) -> None:
        """Accept connections on a unix socket; they act as `domid` (0 = privileged dom0).

        The accept loop is a task of the server's TaskGroup (asyncio.start_unix_server would
        finish accepting in tasks of its own, outside it).
        """
        assert self._tg is not None, "use `async with XenstoreServer(...)`"
        path = Path(path)
        unlink_stale_socket(str(path))          # a live listener's socket is never taken over
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            st = os.lstat(path)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._inodes[path] = (st.st_dev, st.st_ino)
        task = self._tg.create_task(self._accept_loop(sock, path, domid, privileged),
                                    name=f"xenstore accept {path.name}")
        self._listeners.append((sock, path, task))

    async def _accept_loop(self, sock: socket.socket, path: Path, domid: int,
                           privileged: bool | None) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            client, _ = await loop.sock_accept(sock)
            try:
                reader, writer = await asyncio.open_unix_connection(sock=client)
            except BaseException:
                client.close()
                raise
            transport = SocketTransport(reader, writer)
            if self._closed:
                transport.close()
                return
            self._spawn(transport, domid, privileged, f"sock:{path.name}:dom{domid}")

    def serve_ring(self, domid: int, page: memoryview | bytearray,
                   notify: Callable[[], None]) -> RingTransport:
        """Serve a guest's xenstore ring page as `domid` (unprivileged).

        Returns the transport: call its `kick()` whenever the guest signals the store
        event channel.  The connection ends when the domain is released or breaks the ring.
        """
        transport = RingTransport(XenstoreRing(page, notify))
        self._spawn(transport, domid, False, f"ring:dom{domid}")
        return transport

    def _spawn(self, transport: Transport, domid: int, privileged: bool | None,
               name: str) -> Connection:
        assert self._tg is not None, "use `async with XenstoreServer(...)`"
        conn = self.store.connect(domid, transport.send, privileged=privileged, name=name)
        self._transports[conn] = transport
        self.stats["connections"] += 1
        self._tg.create_task(self._serve(conn, transport), name=f"xenstore {name}")
        return conn

    def _close_connections(self, conns: list[Connection]) -> None:
        for conn in conns:
            transport = self._transports.get(conn)
            if transport is not None:
                transport.close()

    async def _serve(self, conn: Connection, transport: Transport) -> None:
        reader = MessageReader()
        error = ERROR_NONE
        try:
            while not conn.closed:
                data = await transport.recv()
                if not data:
                    break
                for msg in reader.feed(data):
                    self.store.process(conn, msg)
                    if conn.closed:
                        break
                await transport.drain()
        except ProtocolViolation as e:
            self.stats["protocol_errors"] += 1
            log.warning("xenstore %r: %s; closing", conn, e)
            error = ERROR_PROTO
        except RingError as e:
            self.stats["protocol_errors"] += 1
            log.warning("xenstore %r: %s; closing", conn, e)
            error = e.code
        except (ConnectionError, OSError) as e:
            log.debug("xenstore %r: %s", conn, e)
            error = ERROR_COMM
        except Exception:  # a bug must not take the other connections down
            self.stats["internal_errors"] += 1
            log.exception("xenstore %r: internal error; closing this connection", conn)
            error = ERROR_COMM
        finally:
            self.store.disconnect(conn)
            self._transports.pop(conn, None)
            transport.close(error)
