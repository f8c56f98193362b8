"""xenstore path bounds that bench/mutants.py found untested (issue 9, mutation testing)."""
from __future__ import annotations

import pytest

from aiovmm.xenstore import Quotas, core
from aiovmm.xenstore.core import XsError

from .conftest import XsErr


def test_absolute_path_of_abs_path_max_is_accepted_one_more_is_einval():
    """XENSTORE_ABS_PATH_MAX (3072) is the longest absolute path xenstored accepts; one
    character more is EINVAL."""
    path = "/" + "x" * (core.ABS_PATH_MAX - 1)
    assert core.canonical(3, path) == path
    with pytest.raises(XsError) as e:
        core.canonical(3, path + "x")
    assert e.value.errno == core._errno.EINVAL


@pytest.fixture
def quotas() -> Quotas:
    return Quotas(max_nodes=6, max_value_size=16, max_watches=3, max_transactions=2,
                  max_perms=2, max_tx_nodes=40)


async def test_transaction_adding_no_node_commits_over_the_quota(xs, client):
    """The node quota limits new nodes: a domain already past it (dom0 created nodes in its
    home, which it owns) may still rewrite an existing node in a transaction; the commit-time
    re-check only applies to a transaction that adds nodes."""
    d5, dom0 = await client(xs.dom5_sock), await client()
    await d5.write("a", "v0")
    for i in range(8):                                        # dom0 is not limited
        await dom0.write(f"/local/domain/5/dom0-{i}", "")
    assert xs.store.tree.count(5) > 6
    tx = await d5.tx_start()
    await d5.write("a", "v1", tx)
    await d5.tx_end(tx)
    assert await d5.read("a") == b"v1"
    tx = await d5.tx_start()
    with pytest.raises(XsErr, match="ENOSPC"):                # a new node: over the quota
        await d5.write("b", "new", tx)


async def test_privileged_transaction_is_not_held_to_a_node_quota(xs, client):
    """dom0 (privileged) is not under the per-domain node quota, neither at write nor at the
    commit-time re-check: a transaction adding more nodes than max_nodes commits."""
    dom0 = await client()
    tx = await dom0.tx_start()
    for i in range(10):
        await dom0.write(f"/tool/q{i}", "v", tx)
    await dom0.tx_end(tx)
    assert await dom0.read("/tool/q9") == b"v"
    assert xs.store.tree.count(0) > 10


def test_commit_without_limits_applies_no_quota():
    """transaction.commit without limits (the Python API: no quota configured) applies the
    transaction for an unprivileged caller instead of failing on the missing limits."""
    from types import SimpleNamespace

    from aiovmm.xenstore import transaction
    from aiovmm.xenstore.store import Store

    store = Store()
    store.introduce(5)
    tree = store.tree
    who = SimpleNamespace(domid=5, privileged=False, target=None)
    tx = transaction.start(tree, 1)
    for i in range(3):
        core.write(tx.tree, who, f"/local/domain/5/q{i}", b"v")
    transaction.commit(tree, tx, who, None)
    assert tree.nodes["/local/domain/5/q2"].value == b"v" and tree.count(5) >= 4


def test_commit_without_a_caller_applies_no_quota():
    """transaction.commit with no caller (the toolstack's own transaction through the Python
    API) is not a domain's: no node quota, even with tight limits."""
    from aiovmm.xenstore import transaction
    from aiovmm.xenstore.store import Store

    store = Store(Quotas(max_nodes=1))
    tree = store.tree
    tx = transaction.start(tree, 1)
    for i in range(4):
        core.write(tx.tree, core.Dom0(), f"/tool/t{i}", b"v")
    transaction.commit(tree, tx)
    assert tree.nodes["/tool/t3"].value == b"v"
