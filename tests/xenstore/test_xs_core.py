"""The tree, paths, permissions, transactions and wire constants, without any I/O."""
from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from aiovmm.xenstore import core, transaction
from aiovmm.xenstore.core import Dom0, Perm, XsError
from aiovmm.xenstore.domain import Quotas
from aiovmm.xenstore.protocol import DISPATCH, MessageReader, ProtocolViolation, XsType, pack
from aiovmm.xenstore.store import Store

XS_WIRE = Path("/usr/include/xen/io/xs_wire.h")


@dataclass
class Dom:
    domid: int
    privileged: bool = False
    target: int | None = None


def err(fn, *a):
    with pytest.raises(XsError) as e:
        fn(*a)
    return core.error_name(e.value.errno)


# ---- paths ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["", "a//b", "/a/", "/a b", "/a\x00", "/ä", "x" * 2049,
                                  "/" + "x" * 3072, "@foo"])
def test_bad_paths_are_einval(path):
    assert err(core.canonical, 3, path) == "EINVAL"


def test_relative_paths_resolve_under_the_domain_home():
    assert core.canonical(3, "device/vif/0") == "/local/domain/3/device/vif/0"
    assert core.canonical(0, "/") == "/"
    assert core.canonical(0, "@introduceDomain", special=True) == "@introduceDomain"
    assert core.canonical(0, "@anything", watch=True) == "@anything"
    assert err(lambda: core.canonical(0, "@anything", special=True)) == "EINVAL"


def test_relative_path_length_boundary():
    """A relative path of XENSTORE_REL_PATH_MAX (2048) characters is accepted, one more is
    EINVAL (4.17's is_valid_nodename: strlen > local_off + 2048 is refused)."""
    assert core.canonical(3, "x" * 2048) == "/local/domain/3/" + "x" * 2048
    assert err(core.canonical, 3, "x" * 2049) == "EINVAL"


def test_is_child_rule():
    assert core.is_child("/a", "/a") and core.is_child("/a/b", "/a")
    assert core.is_child("/a", "/") and not core.is_child("/ab", "/a")


# ---- permissions ----------------------------------------------------------------------------

def test_perm_evaluation():
    perms = core.parse_perms(["n5", "r6", "w7", "b8"])
    assert core.perm_for(Dom(5), perms) == core.PERM_ALL          # owner
    assert core.perm_for(Dom(6), perms) == core.PERM_READ
    assert core.perm_for(Dom(7), perms) == core.PERM_WRITE
    assert core.perm_for(Dom(8), perms) == core.PERM_READ | core.PERM_WRITE
    assert core.perm_for(Dom(9), perms) == core.PERM_NONE         # default = entry 0's letter
    assert core.perm_for(Dom(0, True), perms) == core.PERM_ALL    # dom0
    assert core.perm_for(Dom(9, target=5), perms) == core.PERM_ALL  # device model of owner
    assert core.format_perms(perms) == ["n5", "r6", "w7", "b8"]


@pytest.mark.parametrize("bad", ["x1", "r", "r-1", "r70000", ""])
def test_bad_perm_strings(bad):
    assert err(Perm.parse, bad) == "EINVAL"


def test_unprivileged_creator_owns_new_nodes_and_needs_write_on_parent():
    t = core.Tree.initial()
    core.mkdir(t, Dom0(), "/local/domain/5")
    core.set_perms(t, Dom0(), "/local/domain/5", core.parse_perms(["n0", "w5", "r6"]))
    core.write(t, Dom(5), "/local/domain/5/a/b", b"v")
    assert core.format_perms(t.nodes["/local/domain/5/a/b"].perms) == ["n5", "w5", "r6"]
    assert core.format_perms(t.nodes["/local/domain/5/a"].perms) == ["n5", "w5", "r6"]
    assert err(core.write, t, Dom(6), "/local/domain/5/x", b"") == "EACCES"
    assert err(core.read, t, Dom(7), "/local/domain/5/a/b") == "EACCES"
    assert core.read(t, Dom(6), "/local/domain/5/a/b") == b"v"
    # missing node: ENOENT if the caller can read the parent, EACCES if not
    assert err(core.read, t, Dom(6), "/local/domain/5/a/zz") == "ENOENT"
    assert err(core.read, t, Dom(7), "/local/domain/5/a/zz") == "EACCES"
    assert t.count(5) == 2


def test_only_privileged_may_change_owner():
    t = core.Tree.initial()
    core.write(t, Dom0(), "/x", b"")
    core.set_perms(t, Dom0(), "/x", core.parse_perms(["n5"]))
    assert err(core.set_perms, t, Dom(5), "/x", core.parse_perms(["n6"])) == "EPERM"
    assert err(core.set_perms, t, Dom(6), "/x", core.parse_perms(["b6"])) == "EACCES"
    core.set_perms(t, Dom(5), "/x", core.parse_perms(["n5", "r6"]))
    assert err(core.set_perms, t, Dom(5), "/x", core.parse_perms(["n5"] + ["r1"] * 6),
               Quotas()) == "ENOSPC"


def test_each_change_needs_write_permission_on_the_node():
    """WRITE (existing node), MKDIR (existing), RM and SET_PERMS each check the caller's
    access on the node itself (C xenstored: get_node(..., XS_PERM_WRITE) in do_write,
    do_mkdir, do_rm, do_set_perms): read access is not enough, write access is, and the
    refused call changes nothing."""
    t = core.Tree.initial()
    core.write(t, Dom0(), "/n/leaf", b"v")
    core.set_perms(t, Dom0(), "/n", core.parse_perms(["b0"]))           # parent: anyone rw
    core.set_perms(t, Dom0(), "/n/leaf", core.parse_perms(["n0", "r6", "w7", "b8"]))
    for who in (Dom(6), Dom(9)):                                          # read-only, none
        assert err(core.rm, t, who, "/n/leaf") == "EACCES"
        assert err(core.write, t, who, "/n/leaf", b"x") == "EACCES"
        assert err(core.mkdir, t, who, "/n/leaf") == "EACCES"
        assert err(core.set_perms, t, who, "/n/leaf", core.parse_perms(["n0"])) == "EACCES"
    assert t.nodes["/n/leaf"].value == b"v"
    assert core.format_perms(t.nodes["/n/leaf"].perms) == ["n0", "r6", "w7", "b8"]
    core.write(t, Dom(7), "/n/leaf", b"w")                                # write-only is enough
    assert core.mkdir(t, Dom(8), "/n/leaf") == []
    assert core.rm(t, Dom(8), "/n/leaf")[0].path == "/n/leaf"
    assert "/n/leaf" not in t.nodes


# ---- tree operations ------------------------------------------------------------------------

def test_write_creates_parents_and_rm_removes_subtree():
    t = core.Tree.initial()
    core.write(t, Dom0(), "/a/b/c", b"1")
    assert t.nodes["/a"].value == b"" and t.nodes["/a"].children == ("b",)
    core.mkdir(t, Dom0(), "/a/d")
    assert core.directory(t, Dom0(), "/a")[1] == ("b", "d")
    assert core.mkdir(t, Dom0(), "/a/d") == []            # exists: OK, no event
    ch = core.rm(t, Dom0(), "/a/b")
    assert set(ch[0].removed) == {"/a/b", "/a/b/c"}
    assert "/a/b/c" not in t.nodes and core.directory(t, Dom0(), "/a")[1] == ("d",)
    assert core.rm(t, Dom0(), "/a/b") == []                 # gone, parent exists: OK
    assert err(core.rm, t, Dom0(), "/a/b/c") == "ENOENT"   # parent gone too
    assert err(core.rm, t, Dom0(), "/") == "EINVAL"


@given(st.lists(st.tuples(st.sampled_from(["w", "rm", "mk"]),
                          st.lists(st.sampled_from("abc"), min_size=1, max_size=3)),
                max_size=30))
def test_tree_invariants_hold(ops):
    """Parents always exist, children lists match the flat map, counts match owners."""
    t = core.Tree.initial()
    for op, parts in ops:
        path = "/" + "/".join(parts)
        {"w": lambda: core.write(t, Dom0(), path, b"x"), "rm": lambda: core.rm(t, Dom0(), path)
         if core.parent_of(path) in t.nodes else None,
         "mk": lambda: core.mkdir(t, Dom0(), path)}[op]()
    for path, node in t.nodes.items():
        if path.startswith("@") or path == "/":
            continue
        assert core.basename(path) in t.nodes[core.parent_of(path)].children
        for c in node.children:
            assert core.join(path, c) in t.nodes
    owners: dict[int, int] = {}
    for node in t.nodes.values():
        owners[node.owner] = owners.get(node.owner, 0) + 1
    assert {k: v for k, v in t.counts.items() if v} == owners


# ---- transactions (pure) ------------------------------------------------------------------

def test_transaction_conflict_and_retry():
    live = core.Tree.initial()
    core.write(live, Dom0(), "/a", b"1")
    tx = transaction.start(live, 1)
    assert core.read(tx.tree, Dom0(), "/a") == b"1"
    core.write(live, Dom0(), "/a", b"2")                    # intervening write
    core.write(tx.tree, Dom0(), "/a", b"3")
    assert err(transaction.commit, live, tx) == "EAGAIN"
    assert live.nodes["/a"].value == b"2"
    tx = transaction.start(live, 2)
    core.write(tx.tree, Dom0(), "/a", core.read(tx.tree, Dom0(), "/a") + b"3")
    transaction.commit(live, tx)
    assert live.nodes["/a"].value == b"23"


def test_transaction_unrelated_write_does_not_conflict():
    live = core.Tree.initial()
    core.write(live, Dom0(), "/a/x", b"")
    core.write(live, Dom0(), "/b", b"")
    tx = transaction.start(live, 1)
    core.write(tx.tree, Dom0(), "/a/y", b"1")
    core.write(live, Dom0(), "/b", b"2")
    transaction.commit(live, tx)
    assert live.nodes["/a"].children == ("x", "y")


def test_transaction_sees_absence_conflict():
    live = core.Tree.initial()
    tx = transaction.start(live, 1)
    assert err(core.read, tx.tree, Dom0(), "/new") == "ENOENT"
    core.write(live, Dom0(), "/new", b"x")
    assert err(transaction.commit, live, tx) == "EAGAIN"


def test_store_python_api_introduce_release():
    s = Store()
    s.introduce(7)
    assert s.is_introduced(7) and s.get_perms("/local/domain/7") == ["n7"]
    s.write("/local/domain/7/name", "g")
    s.release(7)
    assert not s.is_introduced(7) and not s.exists("/local/domain/7")
    with pytest.raises(XsError):
        s.release(7)


# ---- wire constants against the installed header ---------------------------------------------

@pytest.mark.skipif(not XS_WIRE.exists(), reason="libxen-dev not installed")
def test_message_numbers_and_errors_match_xs_wire_h():
    text = XS_WIRE.read_text()
    body = re.search(r"enum xsd_sockmsg_type\s*{(.*?)};", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/|#define.*", "", body)
    value, numbers = -1, {}
    for item in (i.strip() for i in body.split(",")):
        if not item:
            continue
        name, _, expr = (s.strip() for s in item.partition("="))
        if expr:
            m = re.fullmatch(r"(\w+)\s*\+\s*(\d+)|(0x[0-9a-f]+)", expr)
            value = numbers[m.group(1)] + int(m.group(2)) if m.group(1) else int(m.group(3), 16)
        else:
            value += 1
        numbers[name] = value
    for name, value in numbers.items():
        assert XsType[name.removeprefix("XS_")] == value, name
    errs = re.findall(r"XSD_ERROR\((E\w+)\)", text)
    assert tuple(errs) == core.XSD_ERRORS
    for e in errs:
        assert core.error_name(getattr(errno, e)) == e
    assert core.error_name(errno.EXDEV) == "EINVAL"
    assert "#define XENSTORE_PAYLOAD_MAX 4096" in text


def test_every_request_type_is_dispatched_and_events_are_not():
    for t in XsType:
        if t in (XsType.WATCH_EVENT, XsType.ERROR, XsType.TYPE_COUNT, XsType.INVALID):
            assert t not in DISPATCH
        else:
            assert DISPATCH[t].handler is not None


def test_message_reader_splits_and_rejects_oversize():
    r = MessageReader()
    data = pack(2, 1, 0, b"/a\0") + pack(1, 2, 0, b"/\0")
    assert r.feed(data[:5]) == []
    msgs = r.feed(data[5:])
    assert [(m.type, m.req_id, m.payload) for m in msgs] == [(2, 1, b"/a\0"), (1, 2, b"/\0")]
    with pytest.raises(ProtocolViolation):
        r.feed(b"\2\0\0\0" + b"\0" * 8 + (4097).to_bytes(4, "little"))


def test_transaction_start_does_not_copy_the_tree():
    """Issue 9 finding 8: opening a transaction is O(1) in the size of the tree (it used to
    copy the whole tree). Measured relative to a small tree in the same run."""
    import time

    def cost(n_nodes: int) -> float:
        live = core.Tree.initial()
        for i in range(n_nodes):
            core.write(live, Dom0(), f"/d{i % 100}/n{i}", b"v")
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for k in range(300):
                tx = transaction.start(live, k + 1)
                core.read(tx.tree, Dom0(), "/d1/n1")
            best = min(best, time.perf_counter() - t0)
        return best

    small, large = cost(200), cost(40_000)
    assert large < 3 * small, (small, large)


def test_commit_rechecks_the_node_quota():
    """Two transactions of one unprivileged domain, each within its node quota alone: the
    second commit is refused (ENOSPC), nothing of it applied."""
    from aiovmm.xenstore import Quotas
    from aiovmm.xenstore.domain import Connection
    live = core.Tree.initial()
    for parent in ("/x", "/y"):                   # dom0's, writable by dom5
        core.write(live, Dom0(), parent, b"")
        core.set_perms(live, Dom0(), parent, core.parse_perms(["n0", "b5"]))
    q = Quotas(max_nodes=3)
    who = Connection(5, lambda b: None)
    t1, t2 = transaction.start(live, 1), transaction.start(live, 2)
    core.write(t1.tree, who, "/x/a/b", b"", q)
    core.write(t2.tree, who, "/y/c/d", b"", q)
    assert live.count(5) == 0 and t1.tree.count(5) == 2 and t2.tree.count(5) == 2
    transaction.commit(live, t1, who, q)
    assert live.count(5) == 2
    # Alone each fits (2 <= 3); together 4 > 3. (Requests inside t2 from now on would be
    # refused already: a transaction's count is the live count plus its own delta.)
    assert err(transaction.commit, live, t2, who, q) == "ENOSPC"
    assert "/y/c" not in live.nodes and live.count(5) == 2
    assert err(core.write, t2.tree, who, "/y/c/e", b"", q) == "ENOSPC"
    transaction.commit(live, t2)                  # without a caller's quota: it applies
    assert "/y/c/d" in live.nodes


def test_transaction_holds_one_event_per_changed_node():
    """Held-back watch events are bounded by the nodes a transaction touched, not by how
    many requests it made; repeated removals keep every removed path."""
    from aiovmm.xenstore.store import Store
    st = Store()
    st.write("/a/b", "1")
    tx = transaction.start(st.tree, 1)
    for i in range(1000):
        st.changed(core.write(tx.tree, Dom0(), "/a/x", str(i).encode()), tx)
    assert len(tx.changes) == 1 and tx.changes[0].path == "/a/x"
    st.changed(core.rm(tx.tree, Dom0(), "/a"), tx)
    st.changed(core.write(tx.tree, Dom0(), "/a/c", b""), tx)
    st.changed(core.rm(tx.tree, Dom0(), "/a"), tx)
    rms = [c for c in tx.changes if c.removed is not None]
    assert len(rms) == 1 and {"/a", "/a/b", "/a/x", "/a/c"} <= set(rms[0].removed)
    assert len(tx.changes) == 3                      # /a/x, rm /a, /a/c
