"""The Store: the live tree, the connections, the introduced domains and the quotas.

This is the composition root the server and the toolstack share.  Its Python API runs as
dom0 (privileged) and fires watches exactly like the same request over the wire:

    store = Store()
    store.introduce(5)                          # /local/domain/5 owned by dom5, @introduceDomain
    store.write("/local/domain/5/name", b"guest")
    store.read("/local/domain/5/name")          # b"guest"
    store.release(5)                            # @releaseDomain; /local/domain/5 removed
"""
from __future__ import annotations

import logging
from typing import Callable

from . import core, domain, transaction, watch
from .core import Change, Dom0, Perms, Tree
from .domain import Connection, DomainInfo, Quotas
from .protocol import Message, process
from .transaction import Transaction

log = logging.getLogger(__name__)


class Store:
    def __init__(self, quotas: Quotas | None = None) -> None:
        self.tree = Tree.initial()
        self.quotas = quotas or Quotas()
        self.connections: list[Connection] = []
        self.domains: dict[int, DomainInfo] = {}
        self._dom0 = Dom0()
        # Called with a released domain's connections so their transports get closed.
        self.on_release: Callable[[list[Connection]], None] = lambda conns: None

    # ---- connections ------------------------------------------------------------------------
    def connect(self, domid: int, sink: Callable[[bytes], None], *,
                privileged: bool | None = None, name: str = "") -> Connection:
        conn = Connection(domid, sink, privileged=privileged, name=name)
        self.connections.append(conn)
        info = self.domains.get(domid)
        if info is not None:
            info.connections.append(conn)
        return conn

    def disconnect(self, conn: Connection) -> None:
        conn.closed = True
        conn.reset()
        if conn in self.connections:
            self.connections.remove(conn)
        info = self.domains.get(conn.domid)
        if info is not None and conn in info.connections:
            info.connections.remove(conn)

    def process(self, conn: Connection, msg: Message) -> None:
        process(self, conn, msg)

    # ---- changes and transactions -----------------------------------------------------------
    def changed(self, changes: list[Change], tx: Transaction | None = None) -> None:
        """Fire watch events now, or hold them until `tx` commits."""
        if tx is not None:
            tx.hold(changes)
        elif changes:
            watch.fire(self.connections, changes)

    def commit(self, tx: Transaction, who: core.Caller | None = None) -> None:
        """Commit `tx` on behalf of `who` (its node quota is checked again)."""
        self.changed(transaction.commit(self.tree, tx, who, self.quotas))

    # ---- domains ----------------------------------------------------------------------------
    def introduce(self, domid: int, mfn: int = 0, evtchn: int = 0, *,
                  home_perms: Perms | None = None, create_home: bool = True) -> None:
        """Introduce `domid` (XS_INTRODUCE).  The toolstack API also creates its home."""
        self.changed(domain.introduce(self.tree, self.domains, domid, mfn, evtchn,
                                      home_perms, create_home))
        info = self.domains[domid]
        for conn in self.connections:
            if conn.domid == domid and conn not in info.connections:
                info.connections.append(conn)

    def release(self, domid: int, *, remove_home: bool = True) -> None:
        """Release `domid` (XS_RELEASE): @releaseDomain; its connections are closed."""
        changes, conns = domain.release(self.tree, self.domains, domid, remove_home)
        # Disconnect first: the released domain's own watches must not fire into its ring,
        # whose event channel may already be closed (a Linux guest watches its own nodes).
        for conn in conns:
            self.disconnect(conn)
        self.changed(changes)
        self.on_release(conns)

    def is_introduced(self, domid: int) -> bool:
        return domid in self.domains

    def set_target(self, domid: int, target: int) -> None:
        for conn in self.connections:
            if conn.domid == domid:
                conn.target = target

    # ---- toolstack Python API (dom0) --------------------------------------------------------
    def read(self, path: str) -> bytes:
        return core.read(self.tree, self._dom0, core.canonical(0, path))

    def write(self, path: str, value: bytes | str) -> None:
        if isinstance(value, str):
            value = value.encode()
        self.changed(core.write(self.tree, self._dom0, core.canonical(0, path), value))

    def mkdir(self, path: str) -> None:
        self.changed(core.mkdir(self.tree, self._dom0, core.canonical(0, path)))

    def rm(self, path: str) -> None:
        self.changed(core.rm(self.tree, self._dom0, core.canonical(0, path)))

    def directory(self, path: str) -> tuple[str, ...]:
        return core.directory(self.tree, self._dom0, core.canonical(0, path))[1]

    def exists(self, path: str) -> bool:
        return core.canonical(0, path, special=True) in self.tree.nodes

    def get_perms(self, path: str) -> list[str]:
        return core.format_perms(core.get_perms(self.tree, self._dom0,
                                                core.canonical(0, path, special=True)))

    def set_perms(self, path: str, perms: list[str] | tuple[str, ...]) -> None:
        self.changed(core.set_perms(self.tree, self._dom0, core.canonical(0, path, special=True),
                                    core.parse_perms(perms)))
