"""Quotas for unprivileged domains (dom5 socket), with small limits; dom0 is exempt."""
from __future__ import annotations

import pytest

from aiovmm.xenstore import Quotas, XsType

from .conftest import XsErr


@pytest.fixture
def quotas() -> Quotas:
    return Quotas(max_nodes=6, max_value_size=16, max_watches=3, max_transactions=2,
                  max_perms=2, max_tx_nodes=40)


def test_defaults_are_xens():
    q = Quotas()
    assert (q.max_nodes, q.max_value_size, q.max_watches, q.max_transactions) == \
        (1000, 2048, 128, 10)


async def test_node_quota(xs, client):
    d5, dom0 = await client(xs.dom5_sock), await client()
    # dom5 owns its home already (1 node): 5 more fit, in one go with parents
    await d5.write("a/b/c", "")
    await d5.write("a/d", "")
    await d5.write("a/e", "")
    with pytest.raises(XsErr, match="ENOSPC"):
        await d5.write("a/f", "")
    with pytest.raises(XsErr, match="ENOSPC"):
        await d5.write("x/y/z", "")                          # nothing half-created
    assert "x" not in await d5.directory("/local/domain/5")
    await d5.write("a/e", "rewrite is fine")                  # existing node: no new entry
    await d5.call(XsType.RM, "a/e")
    await d5.write("a/f", "")                                 # room again after rm
    for i in range(10):                                       # dom0 is not limited
        await dom0.write(f"/local/domain/5/dom0-{i}", "")


async def test_node_quota_inside_a_transaction(xs, client):
    d5 = await client(xs.dom5_sock)
    tx = await d5.tx_start()
    for i in range(5):
        await d5.write(f"n{i}", "", tx)
    with pytest.raises(XsErr, match="ENOSPC"):
        await d5.write("n5", "", tx)
    await d5.tx_end(tx)
    assert len(await d5.directory("/local/domain/5")) == 5


async def test_value_size_quota(xs, client):
    d5, dom0 = await client(xs.dom5_sock), await client()
    await d5.write("v", "x" * 16)
    with pytest.raises(XsErr, match="ENOSPC"):
        await d5.write("v", "x" * 17)
    assert await d5.read("v") == b"x" * 16
    await dom0.write("/local/domain/5/big", "x" * 4000)


async def test_watch_quota(xs, client):
    d5, dom0 = await client(xs.dom5_sock), await client()
    for i in range(3):
        await d5.watch(f"w{i}", "t")
    with pytest.raises(XsErr, match="E2BIG"):
        await d5.watch("w3", "t")
    await d5.call(XsType.UNWATCH, "w0", "t")
    await d5.watch("w3", "t")
    for i in range(10):
        await dom0.watch(f"/w{i}", "t")


async def test_transaction_quota(xs, client):
    d5, dom0 = await client(xs.dom5_sock), await client()
    for k in ("in-t2", "in-t3"):
        await d5.write(k, "")
    t1, t2 = await d5.tx_start(), await d5.tx_start()
    assert t1 != t2
    with pytest.raises(XsErr, match="ENOSPC"):
        await d5.tx_start()
    await d5.tx_end(t1, commit=False)
    t3 = await d5.tx_start()                                  # room again after one ended
    with pytest.raises(XsErr, match="ENOSPC"):
        await d5.tx_start()                                   # t2 and t3 are still open
    # The refused starts did not disturb the open ones: both still work and commit (the
    # nodes existed before they started, so the commits touch disjoint nodes: no conflict).
    await d5.write("in-t2", "2", t2)
    await d5.write("in-t3", "3", t3)
    await d5.tx_end(t2)
    await d5.tx_end(t3)
    assert (await d5.read("in-t2"), await d5.read("in-t3")) == (b"2", b"3")
    dom0_txs = [await dom0.tx_start() for _ in range(5)]      # dom0 is not limited
    assert len(set(dom0_txs)) == 5


async def test_parallel_transactions_cannot_exceed_node_quota_together(xs, client):
    """Issue 9 finding 8: ten transactions under different parents, each within the node
    quota on its own (dom5 owns 1 node, quota 6, each adds 3): the quota is checked again at
    commit against the live count, as in Xen's xenstored, so only the first one commits and
    the others get ENOSPC with nothing applied."""
    dom0 = await client()
    for i in range(10):                     # the parents: dom0's, writable by dom5
        await dom0.write(f"/local/domain/5/p{i}", "")
        await dom0.call(XsType.SET_PERMS, f"/local/domain/5/p{i}", "n0", "b5")
    conns = [await client(xs.dom5_sock) for _ in range(5)]
    txs = []
    for i in range(10):
        c = conns[i // 2]                                    # two open transactions each
        tx = await c.tx_start()
        await c.write(f"p{i}/a/b/c", "x", tx)                # 3 new nodes: 1 + 3 fits alone
        txs.append((c, tx))
    outcomes = []
    for c, tx in txs:
        try:
            await c.tx_end(tx)
            outcomes.append("ok")
        except XsErr as e:
            outcomes.append(str(e))
    assert outcomes[0] == "ok", outcomes
    assert all("ENOSPC" in o for o in outcomes[1:]), outcomes
    assert await conns[0].directory("/local/domain/5/p0") == ["a"]
    for i in range(1, 10):
        assert await conns[0].directory(f"/local/domain/5/p{i}") == []
    assert xs.store.tree.count(5) == 4


async def test_transaction_tracks_a_bounded_number_of_paths(xs, client):
    """What one open transaction makes the daemon keep is bounded (max_tx_nodes paths read
    or changed, here 40): reading past it is refused with ENOSPC; dom0 is exempt."""
    d5, dom0 = await client(xs.dom5_sock), await client()
    tx = await d5.tx_start()
    refused = None
    for i in range(60):
        try:
            await d5.read(f"missing{i}", tx)
        except XsErr as e:
            if "ENOSPC" in str(e):
                refused = i
                break
            assert "ENOENT" in str(e)
    assert refused is not None and refused < 40, refused
    await d5.tx_end(tx, commit=False)
    t0 = await dom0.tx_start()
    for i in range(60):
        with pytest.raises(XsErr, match="ENOENT"):
            await dom0.read(f"/missing{i}", t0)


async def test_perms_quota(xs, client):
    d5 = await client(xs.dom5_sock)
    await d5.write("p", "")
    await d5.call(XsType.SET_PERMS, "p", "n5", "r1", "r2")
    with pytest.raises(XsErr, match="ENOSPC"):
        await d5.call(XsType.SET_PERMS, "p", "n5", "r1", "r2", "r3")
