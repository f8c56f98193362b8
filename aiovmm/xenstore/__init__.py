"""aiovmm's xenstore daemon: a Python xenstored (tree, transactions, watches, domains).

Modules, one mechanism each (Xen's tools/xenstored split):
    core         the tree, paths, permissions, errno -> wire string
    transaction  optimistic transactions (design comment and worked examples inside)
    watch        watches and event delivery
    domain       connections, quotas, introduce/release
    protocol     xsd_sockmsg framing, message types, the dispatch table
    store        the composition root and the toolstack's Python API
    server       the asyncio unix-socket server
    ring         serving a guest's xenstore ring page
"""
from .core import XsError
from .domain import Connection, Quotas
from .protocol import Message, MessageReader, XsType
from .ring import RingError, RingTransport, XenstoreRing
from .server import XenstoreServer
from .store import Store

__all__ = ["XsError", "Connection", "Quotas", "Message", "MessageReader", "XsType",
           "RingError", "RingTransport", "XenstoreRing", "XenstoreServer", "Store"]
