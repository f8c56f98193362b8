"""Per-connection and per-domain state, quotas, and introduce/release of domains.

A `Connection` is one client: a unix-socket connection (dom0, privileged, or bound to a domid
for tests and unprivileged tools) or, later, a guest's shared ring.  It owns its watches and
open transactions; closing it discards both.

Quotas (Xen's xenstored defaults; only unprivileged callers are limited):

=================  ======  =====================================================  =======
field              default meaning                                                 error
=================  ======  =====================================================  =======
max_nodes          1000    nodes owned by one domain                              ENOSPC
max_value_size     2048    bytes in one node's value                               ENOSPC
max_watches        128     watches on one connection                               E2BIG
max_transactions   10      open transactions on one connection                     ENOSPC
max_tx_nodes       4096    paths one transaction reads or changes (aiovmm)        ENOSPC
max_tx_bytes       256K    bytes of those paths and of values it wrote (aiovmm)   ENOSPC
max_perms          5       permission entries beyond the owner's on one node       ENOSPC
=================  ======  =====================================================  =======
"""
from __future__ import annotations

import collections
import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from . import core
from .core import Change, Dom0, Perm, Perms, Tree, XsError
from .protocol import PAYLOAD_MAX, XsType, _bytes, pack

if TYPE_CHECKING:
    from .transaction import Transaction
    from .watch import Watch


@dataclass
class Quotas:
    max_nodes: int = 1000
    max_value_size: int = 2048
    max_watches: int = 128
    max_transactions: int = 10
    max_tx_nodes: int = 4096       # what one open transaction may make the daemon track
    # ... and its bytes (checked before each request): max_transactions of them are 2.5 MiB,
    # Xen's hard memory quota per domain (quota-memory-per-domain-hard)
    max_tx_bytes: int = 256 << 10
    max_perms: int = 5


class Connection:
    """One client's state.  `sink` queues bytes towards the client and must not block."""

    def __init__(self, domid: int, sink: Callable[[bytes], None], *,
                 privileged: bool | None = None, name: str = "") -> None:
        self.domid = domid
        self.privileged = (domid == 0) if privileged is None else privileged
        self.target: int | None = None  # SET_TARGET: device model of this domain
        self.name = name or f"dom{domid}"
        self._sink = sink
        self.watches: list[Watch] = []
        self.transactions: dict[int, Transaction] = {}
        self._next_tx = 1
        self.closed = False
        self.stats: collections.Counter[str] = collections.Counter()

    def send(self, type_: int, req_id: int, tx_id: int, payload: bytes) -> None:
        if self.closed:
            self.stats["dropped_after_close"] += 1
            return
        self._sink(pack(type_, req_id, tx_id, payload))

    def send_event(self, path: str, token: str) -> None:
        """One XS_WATCH_EVENT. The token is the watcher's bytes (any, as over the wire), and
        an event longer than a message (a deep path under a watch registered with a long
        token) is not sent, as Xen's send_event ("Don't try to send over-long events"): it
        must not fail the write that fired it, whoever made that write."""
        payload = _bytes(path) + b"\0" + _bytes(token) + b"\0"
        if len(payload) > PAYLOAD_MAX:
            self.stats["events_too_long"] += 1
            return
        self.stats["watch_events"] += 1
        self.send(XsType.WATCH_EVENT, 0, 0, payload)

    def new_tx_id(self) -> int:
        while True:
            tx_id = self._next_tx
            self._next_tx = (self._next_tx % 0xFFFFFFFF) + 1  # u32, never 0
            if tx_id not in self.transactions:
                return tx_id

    def reset(self) -> None:
        """XS_RESET_WATCHES and disconnect: forget watches and open transactions."""
        self.watches.clear()
        self.transactions.clear()

    def __repr__(self) -> str:
        return f"<Connection {self.name} domid={self.domid} priv={self.privileged}>"


@dataclass
class DomainInfo:
    domid: int
    mfn: int = 0
    evtchn: int = 0
    connections: list[Connection] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Workers for XS_INTRODUCE / XS_RELEASE and the toolstack API (plain functions over state).

def introduce(tree: Tree, domains: dict[int, DomainInfo], domid: int, mfn: int = 0,
              evtchn: int = 0, home_perms: Perms | None = None,
              create_home: bool = True) -> list[Change]:
    """Mark `domid` introduced; create /local/domain/<id> if missing; fire @introduceDomain.

    XS_INTRODUCE passes create_home=False (over the wire the toolstack makes the home itself).

    The home is created owned by the domain (`n<id>`) unless `home_perms` says otherwise
    (libxl itself uses `n0 r<id>` and makes the guest-writable subdirectories separately).
    Introducing an introduced domain again is accepted and changes nothing.
    """
    if domid == 0 or domid > 0x7FEF:
        raise XsError(errno.EINVAL, f"cannot introduce domain {domid}")
    if domid in domains:
        return []
    domains[domid] = DomainInfo(domid, mfn, evtchn)
    home = core.domain_path(domid)
    changes: list[Change] = []
    if create_home and tree.get(home) is None:
        changes += core.mkdir(tree, Dom0(), home)
        changes += core.set_perms(tree, Dom0(), home, home_perms or (Perm(domid, core.PERM_NONE),))
    special = tree.get(core.INTRODUCE_DOMAIN)
    assert special is not None
    changes.append(Change(core.INTRODUCE_DOMAIN, special.perms))
    return changes


def release(tree: Tree, domains: dict[int, DomainInfo], domid: int,
            remove_home: bool = False) -> tuple[list[Change], list[Connection]]:
    """Forget `domid`; its nodes go to dom0; fire @releaseDomain.

    Returns the watch events and the domain's connections, which the caller must close.
    ENOENT if the domain was not introduced.
    """
    info = domains.pop(domid, None)
    if info is None:
        raise XsError(errno.ENOENT, f"domain {domid} not introduced")
    changes: list[Change] = []
    if remove_home and tree.get(core.domain_path(domid)) is not None:
        changes += core.rm(tree, Dom0(), core.domain_path(domid))
    core.chown_all(tree, domid, 0)
    special = tree.get(core.RELEASE_DOMAIN)
    assert special is not None
    changes.append(Change(core.RELEASE_DOMAIN, special.perms))
    return changes, info.connections


__all__ = ["Quotas", "Connection", "DomainInfo", "introduce", "release"]
