"""Optimistic xenstore transactions.

Design
------
TRANSACTION_START takes a snapshot of the tree: a copy of the path -> Node dict (Nodes are
immutable, so this is a shallow copy).  Every request carrying that tx_id runs the ordinary
workers of core.py against the snapshot, which records

* `accessed`: each path the transaction looked at or changed, with the generation the node had
  in the snapshot (None when it did not exist).  Parents consulted for a permission check, or
  changed because a child was added/removed, are included;
* `written`: each path it created, changed or removed.

Watch events produced meanwhile are held back in `changes`.

TRANSACTION_END "T" commits: if any accessed path has, in the live tree, a generation other
than the one recorded (changed, created or removed by somebody else since the snapshot), the
commit fails with EAGAIN and nothing is applied; the client retries the whole transaction.
Otherwise each written path is copied from the snapshot into the live tree (with a new
generation) and the held-back watch events fire.  "F" discards everything.  A transaction that
hit an error in one of its requests may still be committed (as in xenstored, errors are per
request).  Only conflicts on touched nodes fail a commit: unrelated writes elsewhere do not.

Worked example 1: a conflict
    live: /a = "1" (gen 10)
    T1 = start()              snapshot {/a: gen 10}
    T1: read /a  -> "1"       accessed {/a: 10}
    dom0 (no tx): write /a "2"   live /a gen 11
    T1: write /a "3"          accessed {/a: 10}, written {/a}
    T1: end(T)                live gen 11 != 10  -> EAGAIN, live /a stays "2"
    retry: T2 = start(); read /a -> "2"; write /a "3"; end(T) -> OK, live /a = "3"

Worked example 2: no conflict
    live: /a, /b exist
    T1 = start(); T1: write /a/x "1"     accessed {/a/x: None, /a: g(/a)}  (parent gets a child)
    dom0: write /b "2"                   touches /b only
    T1: end(T) -> OK                     /a and /a/x unchanged in live tree since the snapshot

Worked example 3: creation race
    T1 = start(); T1: read /new -> ENOENT    accessed {/new: None}
    dom0: write /new "x"                     live /new now exists
    T1: end(T) -> EAGAIN                     T1's view of /new as absent is stale

Limits: per connection, at most Quotas.max_transactions open transactions for unprivileged
callers (ENOSPC beyond); a snapshot costs one dict copy of the tree.  Node quotas are checked
against the snapshot's counts while the transaction runs, not again at commit.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field

from .core import Change, Tree, XsError


@dataclass(slots=True)
class Transaction:
    id: int
    tree: Tree
    changes: list[Change] = field(default_factory=list)


def start(live: Tree, tx_id: int) -> Transaction:
    return Transaction(tx_id, live.snapshot())


def conflicts(live: Tree, tx: Transaction) -> list[str]:
    """Paths whose live generation differs from what the transaction saw."""
    assert tx.tree.accessed is not None
    out = []
    for path, gen in tx.tree.accessed.items():
        node = live.nodes.get(path)
        if (node.gen if node else None) != gen:
            out.append(path)
    return out


def commit(live: Tree, tx: Transaction) -> list[Change]:
    """Apply `tx` to `live`; return the watch events to fire.  EAGAIN on conflict."""
    if conflicts(live, tx):
        raise XsError(errno.EAGAIN, f"transaction {tx.id} conflicts")
    for path in sorted(tx.tree.written, key=lambda p: p.count("/")):
        node = tx.tree.nodes.get(path)
        if node is None:
            live.delete(path)
        else:
            live.put(path, node)
    return tx.changes
