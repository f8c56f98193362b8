"""Watches: registration, matching a change against every watch, and event delivery.

A watch on <wpath> fires for a change of any path that is a child of <wpath> (itself included;
xenstore.txt's is_child rule).  Removing a node also fires watches set *below* it, reporting
the watch's own path.  A watch registered with a relative path reports relative event paths.
Registering a watch immediately fires it once with <wpath> (and the token).  Events are only
delivered to connections that may read the changed node (for removals, the node as it was).
The special paths @introduceDomain / @releaseDomain match only the events of those names,
and only callers allowed to read the special node (dom0 by default) receive them.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from .core import PERM_READ, Change, Perms, XsError, is_child, perm_for

if TYPE_CHECKING:
    from .domain import Connection, Quotas


@dataclass(frozen=True, slots=True)
class Watch:
    path: str                 # absolute path, or an '@' special
    token: str
    relative_base: str = ""   # "/local/domain/<id>/" when registered relative

    def reported(self, path: str) -> str:
        if self.relative_base and path.startswith(self.relative_base):
            return path[len(self.relative_base):]
        return path

    @property
    def wire_path(self) -> str:
        return self.reported(self.path)


def add(conn: Connection, watch: Watch, quotas: Quotas) -> None:
    """Register `watch` on `conn` (the caller sends the initial event).  EEXIST, E2BIG."""
    if any(w.path == watch.path and w.token == watch.token for w in conn.watches):
        raise XsError(errno.EEXIST, "watch already registered")
    if not conn.privileged and len(conn.watches) >= quotas.max_watches:
        raise XsError(errno.E2BIG, "watch quota")
    conn.watches.append(watch)


def remove(conn: Connection, path: str, token: str) -> None:
    for i, w in enumerate(conn.watches):
        if w.path == path and w.token == token:
            del conn.watches[i]
            return
    raise XsError(errno.ENOENT, "no such watch")


def _matches(watch: Watch, change: Change) -> tuple[str, Perms] | None:
    """The event path to report for `change` on `watch` and the perms deciding visibility."""
    special_w, special_c = watch.path.startswith("@"), change.path.startswith("@")
    if special_w != special_c:
        return None
    if is_child(change.path, watch.path):
        return change.path, change.perms
    if change.removed is not None and watch.path in change.removed:
        return watch.path, change.removed[watch.path]
    return None


def fire(connections: Iterable[Connection], changes: Iterable[Change]) -> int:
    """Send one XS_WATCH_EVENT per (change, matching watch) the watcher may read."""
    sent = 0
    conns = list(connections)
    for change in changes:
        for conn in conns:
            for w in conn.watches:
                m = _matches(w, change)
                if m is None:
                    continue
                path, perms = m
                if not perm_for(conn, perms) & PERM_READ:
                    conn.stats["events_suppressed"] += 1
                    continue
                conn.send_event(w.reported(path), w.token)
                sent += 1
    return sent
