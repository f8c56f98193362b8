"""Optimistic xenstore transactions.

Design
------
TRANSACTION_START costs O(1): the transaction gets a `core.TxTree` over the live tree (Xen's C
xenstored works the same way; aiovmm used to copy the whole tree per transaction).  Every
request carrying that tx_id runs the ordinary workers of core.py against it: nodes the
transaction changed are read from its overlay, all others from the live tree, and it records

* `accessed`: each path the transaction looked at or changed, with the generation the node had
  when first looked at (None when it did not exist).  Parents consulted for a permission
  check, or changed because a child was added/removed, are included;
* `overlay`: each path it created, changed (the new Node) or removed (None);
* `delta`: how many nodes each owner gains or loses.

Watch events produced meanwhile are held back in `changes`.

TRANSACTION_END "T" commits: if any accessed path has, in the live tree, a generation other
than the one recorded (changed, created or removed by somebody else since), the commit fails
with EAGAIN and nothing is applied; the client retries the whole transaction.  Then the node
quota is checked again against the live counts (Xen re-checks at commit): transactions that
each fit the quota alone cannot together exceed it; ENOSPC and nothing applied.  Otherwise each
written path is copied from the overlay into the live tree (with a new generation) and the
held-back watch events fire.  "F" discards everything.  A transaction that hit an error in one
of its requests may still be committed (as in xenstored, errors are per request).  Only
conflicts on touched nodes fail a commit: unrelated writes elsewhere do not.

Worked example 1: a conflict
    live: /a = "1" (gen 10)
    T1 = start()              nothing copied
    T1: read /a  -> "1"       accessed {/a: 10}
    dom0 (no tx): write /a "2"   live /a gen 11
    T1: write /a "3"          accessed {/a: 10}, written {/a}
    T1: end(T)                live gen 11 != 10  -> EAGAIN, live /a stays "2"
    retry: T2 = start(); read /a -> "2"; write /a "3"; end(T) -> OK, live /a = "3"

Worked example 2: no conflict
    live: /a, /b exist
    T1 = start(); T1: write /a/x "1"     accessed {/a/x: None, /a: g(/a)}  (parent gets a child)
    dom0: write /b "2"                   touches /b only
    T1: end(T) -> OK                     /a and /a/x unchanged in live tree since T1 read them

Worked example 3: creation race
    T1 = start(); T1: read /new -> ENOENT    accessed {/new: None}
    dom0: write /new "x"                     live /new now exists
    T1: end(T) -> EAGAIN                     T1's view of /new as absent is stale

Limits: per connection, at most Quotas.max_transactions open transactions for unprivileged
callers (ENOSPC beyond, Xen's quota-maxtransaction); each tracks at most
Quotas.max_tx_nodes paths (ENOSPC beyond) and, once past Quotas.max_tx_bytes of paths and
values, takes no request but its end (ENOSPC); node quotas are checked while the transaction runs
(live count + its delta) and again at commit.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field

from .core import Caller, Change, Limits, Tree, TxTree, XsError


@dataclass(slots=True)
class Transaction:
    id: int
    tree: TxTree
    changes: list[Change] = field(default_factory=list)
    # (path, is-removal) -> index in `changes`: one held-back event per changed node
    _seen: dict[tuple[str, bool], int] = field(default_factory=dict)

    def hold(self, changes: list[Change]) -> None:
        """Keep watch events until commit, one per (node, write-or-removal): a transaction
        rewriting one node a million times holds one event, not a million (the held-back
        events are bounded by the paths the transaction touched). A repeated removal merges
        the removed subtrees, so every watch below still fires."""
        for ch in changes:
            key = (ch.path, ch.removed is not None)
            i = self._seen.get(key)
            if i is None:
                self._seen[key] = len(self.changes)
                self.changes.append(ch)
            elif ch.removed is None:
                self.changes[i] = ch
            else:
                old = self.changes[i].removed or {}
                self.changes[i] = Change(ch.path, ch.perms, {**old, **ch.removed})


def start(live: Tree, tx_id: int, max_tracked: int | None = None,
          max_bytes: int | None = None) -> Transaction:
    """O(1): no copy of the tree."""
    return Transaction(tx_id, TxTree(live, max_tracked, max_bytes))


def conflicts(live: Tree, tx: Transaction) -> list[str]:
    """Paths whose live generation differs from what the transaction saw."""
    out = []
    for path, gen in tx.tree.accessed.items():
        node = live.nodes.get(path)
        if (node.gen if node else None) != gen:
            out.append(path)
    return out


def check_quota(live: Tree, tx: Transaction, who: Caller | None, limits: Limits | None) -> None:
    """The node quota again at commit, against the live count (Xen's xenstored re-checks
    when a transaction ends): several transactions that each fit cannot add up past it."""
    if who is None or who.privileged or limits is None:
        return
    gain = tx.tree.delta.get(who.domid, 0)
    if gain > 0 and live.count(who.domid) + gain > limits.max_nodes:
        raise XsError(errno.ENOSPC, f"transaction {tx.id}: node quota of domain {who.domid}")


def commit(live: Tree, tx: Transaction, who: Caller | None = None,
           limits: Limits | None = None) -> list[Change]:
    """Apply `tx` to `live`; return the watch events to fire.  EAGAIN on conflict, ENOSPC
    over the node quota of `who` (unprivileged callers only); nothing applied on error."""
    if conflicts(live, tx):
        raise XsError(errno.EAGAIN, f"transaction {tx.id} conflicts")
    check_quota(live, tx, who, limits)
    for path in sorted(tx.tree.overlay, key=lambda p: p.count("/")):
        node = tx.tree.overlay[path]
        if node is None:
            live.delete(path)
        else:
            live.put(path, node)
    return tx.changes
