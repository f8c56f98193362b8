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
