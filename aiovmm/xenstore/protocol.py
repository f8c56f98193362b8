"""The xenstore wire protocol: framing, message types, the dispatch table, replies.

Each message = `struct xsd_sockmsg` {type, req_id, tx_id, len: u32 little-endian} + `len`
payload bytes, len <= 4096 (XENSTORE_PAYLOAD_MAX) both ways; a longer request is a protocol
violation that closes the connection (MessageReader raises ProtocolViolation).  Replies echo
type, req_id and tx_id; errors are XS_ERROR with payload "<ERRNAME>\\0".

`process()` is the one dispatcher: unknown types (ENOSYS), unprivileged callers of privileged
requests (EACCES), unknown transaction ids (ENOENT) and requests of a transaction past its
byte quota (ENOSPC; its end is still taken) are rejected before any handler runs,
and XsError -> XS_ERROR happens only here.  Handlers parse their payload, call the workers of
core/transaction/watch/domain through the Store, and return the reply payload.
"""
from __future__ import annotations

import enum
import errno
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

from . import core, transaction, watch
from .core import XsError

if TYPE_CHECKING:
    from .domain import Connection
    from .store import Store
    from .transaction import Transaction

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size            # 16
PAYLOAD_MAX = 4096                   # XENSTORE_PAYLOAD_MAX


class XsType(enum.IntEnum):
    """enum xsd_sockmsg_type (xen/include/public/io/xs_wire.h, Xen 4.17)."""

    CONTROL = 0          # alias XS_DEBUG
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT, removed
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    TYPE_COUNT = 23
    INVALID = 0xFFFF


XS_DEBUG = XsType.CONTROL


class ProtocolViolation(Exception):
    """The peer broke framing (e.g. len > 4096): close that connection, and only it."""


@dataclass(frozen=True, slots=True)
class Message:
    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        return pack(self.type, self.req_id, self.tx_id, self.payload)


def pack(type_: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    assert len(payload) <= PAYLOAD_MAX, "replies are checked before packing"
    return HEADER.pack(type_, req_id, tx_id, len(payload)) + payload


class MessageReader:
    """Incremental framer: feed() bytes as they arrive, get whole messages back."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER_SIZE:
            type_, req_id, tx_id, length = HEADER.unpack_from(self._buf)
            if length > PAYLOAD_MAX:
                raise ProtocolViolation(f"payload length {length} > {PAYLOAD_MAX}")
            end = HEADER_SIZE + length
            if len(self._buf) < end:
                break
            out.append(Message(type_, req_id, tx_id, bytes(self._buf[HEADER_SIZE:end])))
            del self._buf[:end]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


# --------------------------------------------------------------------------------------------
# Payload parsing

def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def strings(payload: bytes, minimum: int = 1) -> list[str]:
    """NUL-terminated strings; EINVAL if the payload does not end in NUL or has too few."""
    if not payload.endswith(b"\0"):
        raise XsError(errno.EINVAL, "payload not NUL-terminated")
    parts = payload[:-1].split(b"\0")
    if len(parts) < minimum:
        raise XsError(errno.EINVAL, "too few arguments")
    return [_text(p) for p in parts]


def one_string(payload: bytes) -> str:
    parts = strings(payload)
    if len(parts) != 1:
        raise XsError(errno.EINVAL, "expected exactly one argument")
    return parts[0]


def ok() -> bytes:
    return b"OK\0"


def nul_list(items: list[str] | tuple[str, ...]) -> bytes:
    return b"".join(_bytes(i) + b"\0" for i in items)


def _int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise XsError(errno.EINVAL, f"bad number {text!r}") from None


# --------------------------------------------------------------------------------------------
# Handlers.  Signature: (store, conn, tx, payload) -> reply payload, or (reply, after) where
# `after()` runs once the reply is queued (WATCH's initial event follows its OK).

Reply = Union[bytes, tuple[bytes, Callable[[], None]]]
Handler = Callable[["Store", "Connection", "Transaction | None", bytes], Reply]


def _tree(store: Store, tx: Transaction | None) -> core.Tree:
    return tx.tree if tx is not None else store.tree


def do_control(store: Store, conn: Connection, tx: Transaction | None, p: bytes) -> Reply:
    args = strings(p)
    cmd = args[0]
    if cmd == "print":
        log.info("xenstore control print: %s", " ".join(args[1:]))
        return ok()
    if cmd == "check":
        return ok()
    if cmd == "help":
        return b"check\nhelp\nprint\n\0"
    raise XsError(errno.EINVAL, f"unknown control command {cmd!r}")


def do_directory(store: Store, conn: Connection, tx: Transaction | None, p: bytes) -> Reply:
    path = core.canonical(conn.domid, one_string(p))
    _, children = core.directory(_tree(store, tx), conn, path)
    return nul_list(children)


def do_directory_part(store: Store, conn: Connection, tx: Transaction | None,
                      p: bytes) -> Reply:
    if not p.endswith(b"\0"):
        p += b"\0"  # the offset may come with or without its NUL
    args = strings(p, 2)
    path = core.canonical(conn.domid, args[0])
    offset = _int(args[1])
    gen, children = core.directory(_tree(store, tx), conn, path)
    head = f"{gen}\0".encode()
    listing = nul_list(children)
    if offset < 0 or offset > len(listing):
        raise XsError(errno.EINVAL, "offset beyond the children list")
    room = PAYLOAD_MAX - len(head) - 1
    chunk = listing[offset:]
    if len(chunk) <= room:
        return head + chunk + b"\0"  # whole remainder + the empty string that ends the list
    cut = chunk.rfind(b"\0", 0, room) + 1
    return head + chunk[:cut]


def do_read(store: Store, conn: Connection, tx: Transaction | None, p: bytes) -> Reply:
    path = core.canonical(conn.domid, one_string(p))
    return core.read(_tree(store, tx), conn, path)


def do_get_perms(store: Store, conn: Connection, tx: Transaction | None, p: bytes) -> Reply:
    path = core.canonical(conn.domid, one_string(p), special=True)
    return nul_list(core.format_perms(core.get_perms(_tree(store, tx), conn, path)))


def do_watch(store: Store, conn: Connection, tx: Transaction | None, p: bytes) -> Reply:
    args = strings(p, 2)
    raw, token = args[0], args[1]
    path = core.canonical(conn.domid, raw, watch=True)
    rel = "" if raw.startswith(("/", "@")) else core.domain_path(conn.domid) + "/"
    w = watch.Watch(path, token, rel)
    watch.add(conn, w, store.quotas)
    return ok(), lambda: conn.send_event(w.wire_path, w.token)


def do_unwatch(store: Store, conn: Connection, tx: Transaction | None, p: bytes) -> Reply:
    args = strings(p, 2)
    watch.remove(conn, core.canonical(conn.domid, args[0], watch=True), args[1])
    return ok()


def do_transaction_start(store: Store, conn: Connection, tx: Transaction | None,
                         p: bytes) -> Reply:
    if tx is not None:
        raise XsError(errno.EBUSY, "TRANSACTION_START inside a transaction")
    if not conn.privileged and len(conn.transactions) >= store.quotas.max_transactions:
        raise XsError(errno.ENOSPC, "transaction quota")
    q = store.quotas
    t = transaction.start(store.tree, conn.new_tx_id(), *((None, None) if conn.privileged
                                                          else (q.max_tx_nodes, q.max_tx_bytes)))
    conn.transactions[t.id] = t
    return f"{t.id}\0".encode()


def do_transaction_end(store: Store, conn: Connection, tx: Transaction | None,
                       p: bytes) -> Reply:
    if tx is None:
        raise XsError(errno.EINVAL, "TRANSACTION_END without a transaction")
    arg = one_string(p)
    if arg not in ("T", "F"):
        raise XsError(errno.EINVAL, "TRANSACTION_END wants T or F")
    del conn.transactions[tx.id]
    if arg == "T":
        store.commit(tx, conn)
    return ok()


def do_introduce(store: Store, conn: Connection, tx: Transaction | None, p: bytes) -> Reply:
    args = strings(p, 3)
    domid = _int(args[0])
    store.introduce(domid, mfn=_int(args[1]), evtchn=_int(args[2]), create_home=False)
    return ok()


def do_release(store: Store, conn: Connection, tx: Transaction | None, p: bytes) -> Reply:
    store.release(_int(one_string(p)), remove_home=False)
    return ok()


def do_get_domain_path(store: Store, conn: Connection, tx: Transaction | None,
                       p: bytes) -> Reply:
    return core.domain_path(_int(one_string(p))).encode() + b"\0"


def do_is_domain_introduced(store: Store, conn: Connection, tx: Transaction | None,
                            p: bytes) -> Reply:
    domid = _int(one_string(p))
    return b"T\0" if (domid == 0 or domid in store.domains) else b"F\0"


def do_resume(store: Store, conn: Connection, tx: Transaction | None, p: bytes) -> Reply:
    if _int(one_string(p)) not in store.domains:
        raise XsError(errno.ENOENT, "domain not introduced")
    return ok()


def do_set_target(store: Store, conn: Connection, tx: Transaction | None, p: bytes) -> Reply:
    args = strings(p, 2)
    store.set_target(_int(args[0]), _int(args[1]))
    return ok()


def do_write(store: Store, conn: Connection, tx: Transaction | None, p: bytes) -> Reply:
    raw, sep, value = p.partition(b"\0")
    if not sep:
        raise XsError(errno.EINVAL, "WRITE without NUL after the path")
    path = core.canonical(conn.domid, _text(raw))
    store.changed(core.write(_tree(store, tx), conn, path, value, store.quotas), tx)
    return ok()


def do_mkdir(store: Store, conn: Connection, tx: Transaction | None, p: bytes) -> Reply:
    path = core.canonical(conn.domid, one_string(p))
    store.changed(core.mkdir(_tree(store, tx), conn, path, store.quotas), tx)
    return ok()


def do_rm(store: Store, conn: Connection, tx: Transaction | None, p: bytes) -> Reply:
    path = core.canonical(conn.domid, one_string(p))
    store.changed(core.rm(_tree(store, tx), conn, path), tx)
    return ok()


def do_set_perms(store: Store, conn: Connection, tx: Transaction | None, p: bytes) -> Reply:
    args = strings(p, 2)
    path = core.canonical(conn.domid, args[0], special=True)
    perms = core.parse_perms(a for a in args[1:] if a)  # a trailing reserved "" is allowed
    store.changed(core.set_perms(_tree(store, tx), conn, path, perms, store.quotas), tx)
    return ok()


def do_reset_watches(store: Store, conn: Connection, tx: Transaction | None,
                     p: bytes) -> Reply:
    conn.reset()
    return ok()


# --------------------------------------------------------------------------------------------
# Dispatch table: (name, handler, flags), indexed by type.

FLAG_PRIV = 1     # privileged callers only (EACCES otherwise)
FLAG_NOTX = 2     # tx_id in the header is ignored


@dataclass(frozen=True, slots=True)
class Op:
    name: str
    handler: Handler
    flags: int = 0


DISPATCH: dict[int, Op] = {
    XsType.CONTROL: Op("CONTROL", do_control, FLAG_PRIV | FLAG_NOTX),
    XsType.DIRECTORY: Op("DIRECTORY", do_directory),
    XsType.READ: Op("READ", do_read),
    XsType.GET_PERMS: Op("GET_PERMS", do_get_perms),
    XsType.WATCH: Op("WATCH", do_watch, FLAG_NOTX),
    XsType.UNWATCH: Op("UNWATCH", do_unwatch, FLAG_NOTX),
    XsType.TRANSACTION_START: Op("TRANSACTION_START", do_transaction_start),
    XsType.TRANSACTION_END: Op("TRANSACTION_END", do_transaction_end),
    XsType.INTRODUCE: Op("INTRODUCE", do_introduce, FLAG_PRIV | FLAG_NOTX),
    XsType.RELEASE: Op("RELEASE", do_release, FLAG_PRIV | FLAG_NOTX),
    XsType.GET_DOMAIN_PATH: Op("GET_DOMAIN_PATH", do_get_domain_path, FLAG_NOTX),
    XsType.WRITE: Op("WRITE", do_write),
    XsType.MKDIR: Op("MKDIR", do_mkdir),
    XsType.RM: Op("RM", do_rm),
    XsType.SET_PERMS: Op("SET_PERMS", do_set_perms),
    XsType.IS_DOMAIN_INTRODUCED: Op("IS_DOMAIN_INTRODUCED", do_is_domain_introduced,
                                    FLAG_PRIV | FLAG_NOTX),
    XsType.RESUME: Op("RESUME", do_resume, FLAG_PRIV | FLAG_NOTX),
    XsType.SET_TARGET: Op("SET_TARGET", do_set_target, FLAG_PRIV | FLAG_NOTX),
    XsType.RESET_WATCHES: Op("RESET_WATCHES", do_reset_watches, FLAG_NOTX),
    XsType.DIRECTORY_PART: Op("DIRECTORY_PART", do_directory_part),
}


def process(store: Store, conn: Connection, msg: Message) -> None:
    """Run one request and queue its reply (and any follow-up) on `conn`."""
    op = DISPATCH.get(msg.type)
    after = None
    try:
        if op is None:
            raise XsError(errno.ENOSYS, f"unknown message type {msg.type}")
        if op.flags & FLAG_PRIV and not conn.privileged:
            raise XsError(errno.EACCES, f"{op.name} needs a privileged caller")
        tx = None
        if not op.flags & FLAG_NOTX and msg.tx_id != 0:
            tx = conn.transactions.get(msg.tx_id)
            if tx is None:
                raise XsError(errno.ENOENT, f"unknown transaction {msg.tx_id}")
            if tx.tree.over_quota and msg.type != XsType.TRANSACTION_END:
                raise XsError(errno.ENOSPC, f"transaction {tx.id} holds {tx.tree.bytes} bytes")
        reply = op.handler(store, conn, tx, msg.payload)
        if isinstance(reply, tuple):
            reply, after = reply
        if len(reply) > PAYLOAD_MAX:
            raise XsError(errno.E2BIG, "reply longer than the payload limit")
    except XsError as e:
        conn.stats["errors"] += 1
        log.debug("%r %s: %s", conn, op.name if op else msg.type, e)
        conn.send(XsType.ERROR, msg.req_id, msg.tx_id, core.error_name(e.errno).encode() + b"\0")
        return
    conn.stats["requests"] += 1
    conn.send(msg.type, msg.req_id, msg.tx_id, reply)
    if after is not None:
        after()
