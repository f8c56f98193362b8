"""The xenstore tree: nodes, paths, permissions, and the one errno -> wire-string map.

Everything here is a plain function over a `Tree`; nothing touches a socket or a ring, so the
rules are testable without a loop (the workers of Xen's tools/xenstored/core.c).

Tree representation
-------------------
A flat dict `absolute path -> Node`.  A `Node` is immutable: every change replaces it with a
new Node carrying a fresh generation number (`gen`).  A transaction (transaction.py) works on
a `TxTree`: an overlay of the nodes it changed over the live tree, with the generation of
every node it looked at, so opening one costs O(1), not a copy of the tree.  The
two special watch nodes `@introduceDomain` and `@releaseDomain` live in the same dict (they are
nobody's child) so they carry permissions like any other node.

Permissions (Xen's model)
-------------------------
`perms[0]` names the owner, and its letter is the access for every domain not listed later;
`perms[1:]` grant the listed domain exactly their letter.  Privileged callers (dom0) and the
owner have full access; a caller that is the device model of the owner (SET_TARGET) too.
A node created by an unprivileged domain inherits its parent's list with the owner replaced by
the creator (it owns, and is charged for, what it creates).
"""
from __future__ import annotations

import errno as _errno
import itertools
import re
from dataclasses import dataclass, replace
from typing import Iterable, Protocol

# --------------------------------------------------------------------------------------------
# Errors: errno -> protocol error string, in one place (xs_wire.h xsd_errors, in table order).

XSD_ERRORS: tuple[str, ...] = (
    "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
    "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM",
)
_ERRNO_TO_NAME: dict[int, str] = {getattr(_errno, n): n for n in XSD_ERRORS}


class XsError(Exception):
    """A request refused with an errno; sent to the client as XS_ERROR "<NAME>\\0"."""

    def __init__(self, errno: int, msg: str = "") -> None:
        super().__init__(msg or error_name(errno))
        self.errno = errno


def error_name(errno: int) -> str:
    """The wire string for an errno.  Anything outside xsd_errors becomes EINVAL, like Xen."""
    return _ERRNO_TO_NAME.get(errno, "EINVAL")


# --------------------------------------------------------------------------------------------
# Paths

ABS_PATH_MAX = 3072          # XENSTORE_ABS_PATH_MAX
REL_PATH_MAX = 2048          # XENSTORE_REL_PATH_MAX
INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"
SPECIAL_PATHS = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-/_@]+\Z")


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def canonical(domid: int, path: str, *, watch: bool = False, special: bool = False) -> str:
    """Validate `path` and make it absolute (relative = under /local/domain/<domid>).

    `watch`: any '@'-path is accepted (it only ever matches the special events).
    `special`: '@introduceDomain'/'@releaseDomain' are accepted (GET/SET_PERMS).
    Raises XsError(EINVAL) otherwise.
    """
    if path.startswith("@"):
        if (watch and _PATH_CHARS.match(path)) or (special and path in SPECIAL_PATHS):
            return path
        raise XsError(_errno.EINVAL, f"special path {path!r} not allowed here")
    if not path.startswith("/"):
        if not path or len(path) > REL_PATH_MAX:
            raise XsError(_errno.EINVAL, "bad relative path")
        path = f"{domain_path(domid)}/{path}"
    if (len(path) > ABS_PATH_MAX or not _PATH_CHARS.match(path) or "//" in path
            or (path.endswith("/") and path != "/")):
        raise XsError(_errno.EINVAL, f"bad path {path[:64]!r}")
    return path


def parent_of(path: str) -> str:
    head = path.rpartition("/")[0]
    return head or "/"


def basename(path: str) -> str:
    return path.rpartition("/")[2]


def join(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def is_child(child: str, parent: str) -> bool:
    """xenstore.txt's rule: identical, or parent is '/', or parent + '/' prefixes child."""
    if child == parent:
        return True
    if parent == "/":
        return child.startswith("/")
    return child.startswith(parent + "/")


# --------------------------------------------------------------------------------------------
# Permissions

PERM_NONE, PERM_READ, PERM_WRITE, PERM_OWNER = 0, 1, 2, 4
PERM_ALL = PERM_READ | PERM_WRITE | PERM_OWNER
_LETTER_TO_MASK = {"n": PERM_NONE, "r": PERM_READ, "w": PERM_WRITE, "b": PERM_READ | PERM_WRITE}
_MASK_TO_LETTER = {v: k for k, v in _LETTER_TO_MASK.items()}
DOMID_MAX = 0xFFFF


@dataclass(frozen=True, slots=True)
class Perm:
    domid: int
    mask: int  # PERM_READ | PERM_WRITE subset

    def __str__(self) -> str:
        return f"{_MASK_TO_LETTER[self.mask]}{self.domid}"

    @classmethod
    def parse(cls, text: str) -> Perm:
        letter, digits = text[:1], text[1:]
        if letter not in _LETTER_TO_MASK or not digits.isdigit() or int(digits) > DOMID_MAX:
            raise XsError(_errno.EINVAL, f"bad permission {text!r}")
        return cls(int(digits), _LETTER_TO_MASK[letter])


Perms = tuple[Perm, ...]


def parse_perms(texts: Iterable[str]) -> Perms:
    perms = tuple(Perm.parse(t) for t in texts)
    if not perms:
        raise XsError(_errno.EINVAL, "empty permission list")
    return perms


def format_perms(perms: Perms) -> list[str]:
    return [str(p) for p in perms]


class Caller(Protocol):
    """Who is asking: a connection (domain.Connection) or the toolstack's Python API."""

    domid: int
    privileged: bool
    target: int | None


@dataclass(frozen=True)
class Dom0:
    """The toolstack calling the Store's Python API: dom0, privileged."""

    domid: int = 0
    privileged: bool = True
    target: int | None = None


def perm_for(who: Caller, perms: Perms) -> int:
    """The access mask `who` has on a node with `perms` (Xen's perm_for_conn)."""
    if who.privileged:
        return PERM_ALL
    owner = perms[0].domid
    if who.domid == owner or (who.target is not None and who.target == owner):
        return PERM_ALL
    mask = _lookup(perms, who.domid)
    if who.target is not None:
        mask |= _lookup(perms, who.target)
    return mask


def _lookup(perms: Perms, domid: int) -> int:
    for p in perms[1:]:
        if p.domid == domid:
            return p.mask
    return perms[0].mask


# --------------------------------------------------------------------------------------------
# Nodes and the tree

_generation = itertools.count(1)


def next_gen() -> int:
    """Store-wide, strictly increasing: a node's gen changes on every change to it."""
    return next(_generation)


@dataclass(frozen=True, slots=True)
class Node:
    value: bytes
    perms: Perms
    children: tuple[str, ...] = ()
    gen: int = 0

    @property
    def owner(self) -> int:
        return self.perms[0].domid


@dataclass(slots=True)
class Change:
    """One watch event to fire: the changed path and the perms it had (who may see it).

    `removed` (for RM) maps every removed path to its perms, so that watches below the removed
    node fire with their own path (xenstore.txt: "<epath> is just <wpath>").
    """

    path: str
    perms: Perms
    removed: dict[str, Perms] | None = None


def _stamped(node: Node) -> Node:
    """`node` with a new generation: dataclasses.replace(node, gen=next_gen()) without its
    field introspection (a third of the time; domain creation stores ~80 nodes). Tree.put
    stamps every node it stores, so the changes before a put build the Node directly too."""
    return Node(node.value, node.perms, node.children, next_gen())


class Tree:
    """The live tree: a flat path -> Node map with per-owner node counts (node quota).

    A transaction works on a `TxTree` over it (reads fall through, changes go to an overlay),
    so opening one costs O(1) whatever the size of the tree.
    """

    def __init__(self, nodes: dict[str, Node] | None = None,
                 counts: dict[int, int] | None = None) -> None:
        self.nodes: dict[str, Node] = nodes if nodes is not None else {}
        self.counts: dict[int, int] = counts if counts is not None else {}

    @classmethod
    def initial(cls) -> Tree:
        """The tree xenstored starts with: /, /local, /local/domain, /tool, specials (n0)."""
        t = cls()
        dom0 = (Perm(0, PERM_NONE),)
        t.put("/", Node(b"", dom0))
        for path in ("/local", "/local/domain", "/tool"):
            t.put(path, Node(b"", dom0))
            _link_child(t, path)
        for path in SPECIAL_PATHS:
            t.put(path, Node(b"", dom0))
        return t

    def get(self, path: str) -> Node | None:
        return self.nodes.get(path)

    def put(self, path: str, node: Node) -> Node:
        old = self.nodes.get(path)
        node = _stamped(node)
        self.nodes[path] = node
        if old is not None:
            self._uncount(old.owner)
        self.counts[node.owner] = self.counts.get(node.owner, 0) + 1
        return node

    def _uncount(self, owner: int) -> None:
        """One node fewer for `owner`; an owner with none left has no entry (dead domains'
        zero counts would otherwise stay forever)."""
        n = self.counts[owner] - 1
        if n:
            self.counts[owner] = n
        else:
            del self.counts[owner]

    def delete(self, path: str) -> None:
        old = self.nodes.pop(path, None)
        if old is not None:
            self._uncount(old.owner)

    def count(self, domid: int) -> int:
        return self.counts.get(domid, 0)

    def walk(self, path: str) -> Iterable[str]:
        """`path` and all its descendants, parents before children."""
        stack = [path]
        while stack:
            p = stack.pop()
            node = self.get(p)
            if node is None:
                continue
            yield p
            stack.extend(join(p, c) for c in reversed(node.children))


class TxTree(Tree):
    """A transaction's view of the live tree (`base`), in the manner of Xen's C xenstored:
    a path the transaction changed is read from its own overlay, any other from the live
    tree. Every path looked up or changed is recorded in `accessed` with the generation it
    had then (None = absent) and every change in `overlay`/`written`; transaction.commit()
    checks and applies exactly those. `delta` is the change of each owner's node count.

    `max_tracked` bounds the paths one transaction may record (ENOSPC beyond): what a
    transaction makes the host keep is bounded, even for one that reads without end.
    `bytes` is what it keeps in paths recorded and values written (protocol.process refuses
    a request of a transaction past its byte quota: paths are up to 3072 bytes, so the
    path count alone let a guest make the host keep 12 MB per transaction).
    """

    def __init__(self, base: Tree, max_tracked: int | None = None,
                 max_bytes: int | None = None) -> None:
        super().__init__()
        self.base = base
        self.overlay: dict[str, Node | None] = {}
        self.delta: dict[int, int] = {}
        self.accessed: dict[str, int | None] = {}
        self.max_tracked = max_tracked
        self.max_bytes = max_bytes
        self.bytes = 0

    @property
    def written(self) -> set[str]:
        return set(self.overlay)

    def get(self, path: str) -> Node | None:
        if path in self.overlay:
            return self.overlay[path]
        node = self.base.nodes.get(path)
        if path not in self.accessed:
            if self.max_tracked is not None and len(self.accessed) >= self.max_tracked:
                raise XsError(_errno.ENOSPC, f"transaction touches over {self.max_tracked} nodes")
            self.accessed[path] = node.gen if node else None
            self.bytes += len(path)
        return node

    @property
    def over_quota(self) -> bool:
        return self.max_bytes is not None and self.bytes >= self.max_bytes

    def _count(self, domid: int, by: int) -> None:
        self.delta[domid] = self.delta.get(domid, 0) + by

    def put(self, path: str, node: Node) -> Node:
        old = self.get(path)
        held = self.overlay.get(path)
        self.bytes += len(node.value) - (len(held.value) if held is not None else 0)
        node = _stamped(node)
        self.overlay[path] = node
        if old is not None:
            self._count(old.owner, -1)
        self._count(node.owner, 1)
        return node

    def delete(self, path: str) -> None:
        old = self.get(path)
        if old is None:
            return
        self.overlay[path] = None
        self._count(old.owner, -1)

    def count(self, domid: int) -> int:
        return self.base.count(domid) + self.delta.get(domid, 0)


def _link_child(tree: Tree, path: str) -> None:
    parent_path = parent_of(path)
    parent = tree.get(parent_path)
    assert parent is not None, "caller creates parents first"
    name = basename(path)
    if name not in parent.children:
        tree.put(parent_path, Node(parent.value, parent.perms, parent.children + (name,)))


def _unlink_child(tree: Tree, path: str) -> None:
    parent_path = parent_of(path)
    parent = tree.get(parent_path)
    if parent is not None:
        name = basename(path)
        tree.put(parent_path,
                 Node(parent.value, parent.perms, tuple(c for c in parent.children if c != name)))


# --------------------------------------------------------------------------------------------
# Workers: one per operation.  Identifiers (paths) are validated by the caller (protocol.py),
# these check existence, then permissions, then quotas, then change the tree.

class Limits(Protocol):
    """The quota fields core needs (domain.Quotas); applied to unprivileged callers only."""

    max_nodes: int
    max_value_size: int
    max_perms: int


def _nearest_ancestor(tree: Tree, path: str) -> Node:
    while path != "/":
        path = parent_of(path)
        node = tree.get(path)
        if node is not None:
            return node
    raise AssertionError("the root always exists")


def _missing(tree: Tree, who: Caller, path: str) -> XsError:
    """ENOENT, or EACCES when the caller could not even see that the node is missing."""
    anc = _nearest_ancestor(tree, path)
    if perm_for(who, anc.perms) & PERM_READ:
        return XsError(_errno.ENOENT, path)
    return XsError(_errno.EACCES, path)


def get_node(tree: Tree, who: Caller, path: str, need: int) -> Node:
    node = tree.get(path)
    if node is None:
        raise _missing(tree, who, path)
    if (perm_for(who, node.perms) & need) != need:
        raise XsError(_errno.EACCES, path)
    return node


def read(tree: Tree, who: Caller, path: str) -> bytes:
    return get_node(tree, who, path, PERM_READ).value


def directory(tree: Tree, who: Caller, path: str) -> tuple[int, tuple[str, ...]]:
    node = get_node(tree, who, path, PERM_READ)
    return node.gen, node.children


def get_perms(tree: Tree, who: Caller, path: str) -> Perms:
    return get_node(tree, who, path, PERM_READ).perms


def _create(tree: Tree, who: Caller, path: str, value: bytes, limits: Limits | None) -> None:
    """Create `path` and any missing parents (empty values)."""
    missing = [path]
    p = parent_of(path)
    while tree.get(p) is None:
        missing.append(p)
        p = parent_of(p)
    parent = tree.get(p)
    assert parent is not None
    if not perm_for(who, parent.perms) & PERM_WRITE:
        raise XsError(_errno.EACCES, path)
    if (not who.privileged and limits is not None
            and tree.count(who.domid) + len(missing) > limits.max_nodes):
        raise XsError(_errno.ENOSPC, f"node quota of domain {who.domid}")
    perms = parent.perms
    if not who.privileged:
        perms = (Perm(who.domid, perms[0].mask),) + perms[1:]
    for p in reversed(missing):
        tree.put(p, Node(value if p == path else b"", perms))
        _link_child(tree, p)


def write(tree: Tree, who: Caller, path: str, value: bytes,
          limits: Limits | None = None) -> list[Change]:
    if not who.privileged and limits is not None and len(value) > limits.max_value_size:
        raise XsError(_errno.ENOSPC, f"value of {len(value)} bytes over quota")
    node = tree.get(path)
    if node is None:
        _create(tree, who, path, value, limits)
        node = tree.get(path)
        assert node is not None
    else:
        if not perm_for(who, node.perms) & PERM_WRITE:
            raise XsError(_errno.EACCES, path)
        node = tree.put(path, Node(value, node.perms, node.children))
    return [Change(path, node.perms)]


def mkdir(tree: Tree, who: Caller, path: str, limits: Limits | None = None) -> list[Change]:
    node = tree.get(path)
    if node is not None:
        if not perm_for(who, node.perms) & PERM_WRITE:
            raise XsError(_errno.EACCES, path)
        return []  # already there: no change, no event (as xenstored)
    _create(tree, who, path, b"", limits)
    node = tree.get(path)
    assert node is not None
    return [Change(path, node.perms)]


def rm(tree: Tree, who: Caller, path: str) -> list[Change]:
    if path == "/":
        raise XsError(_errno.EINVAL, "cannot remove /")
    node = tree.get(path)
    if node is None:
        if tree.get(parent_of(path)) is None:
            raise _missing(tree, who, parent_of(path))
        return []  # not an error when only the node itself is missing
    if not perm_for(who, node.perms) & PERM_WRITE:
        raise XsError(_errno.EACCES, path)
    removed: dict[str, Perms] = {}
    for p in list(tree.walk(path)):
        node_p = tree.get(p)
        assert node_p is not None
        removed[p] = node_p.perms
    for p in reversed(list(removed)):
        tree.delete(p)
    _unlink_child(tree, path)
    return [Change(path, node.perms, removed)]


def set_perms(tree: Tree, who: Caller, path: str, perms: Perms,
              limits: Limits | None = None) -> list[Change]:
    node = get_node(tree, who, path, PERM_OWNER)
    if not who.privileged:
        if perms[0].domid != node.owner:
            raise XsError(_errno.EPERM, "only a privileged domain may change the owner")
        if limits is not None and len(perms) - 1 > limits.max_perms:
            raise XsError(_errno.ENOSPC, "too many permission entries")
    node = tree.put(path, Node(node.value, perms, node.children))
    return [Change(path, node.perms)]


def chown_all(tree: Tree, old: int, new: int) -> None:
    """Give every node owned by `old` to `new` (a released domain's nodes go to dom0)."""
    for path, node in list(tree.nodes.items()):
        if node.owner == old:
            tree.put(path, replace(node, perms=(replace(node.perms[0], domid=new),)
                                   + node.perms[1:]))


__all__ = [
    "XSD_ERRORS", "XsError", "error_name", "ABS_PATH_MAX", "REL_PATH_MAX", "INTRODUCE_DOMAIN",
    "RELEASE_DOMAIN", "SPECIAL_PATHS", "domain_path", "canonical", "is_child", "parent_of",
    "Perm", "Perms", "parse_perms", "format_perms", "perm_for", "Caller", "Dom0", "Node",
    "Change", "Tree", "TxTree", "PERM_NONE", "PERM_READ", "PERM_WRITE", "PERM_OWNER",
]
