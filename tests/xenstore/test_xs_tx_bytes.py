"""A transaction's byte quota (Quotas.max_tx_bytes): paths it recorded and values it wrote;
past it, only its end is taken. dom0 is not limited."""
from __future__ import annotations

from aiovmm.xenstore.domain import Quotas
from aiovmm.xenstore.protocol import Message, MessageReader, XsType
from aiovmm.xenstore.store import Store

HOME = "/local/domain/5"


class _Client:
    def __init__(self, store: Store, domid: int = 5) -> None:
        self.store, self.reader, self.got = store, MessageReader(), []
        self.conn = store.connect(domid, lambda b: self.got.extend(self.reader.feed(b)))

    def call(self, type_: int, payload: bytes, tx: int = 0) -> tuple[int, bytes]:
        self.store.process(self.conn, Message(type_, 1, tx, payload))
        m = self.got.pop()
        return m.type, m.payload


def test_paths_and_values_count_and_the_end_is_still_taken():
    store = Store(Quotas(max_tx_bytes=16 << 10))
    store.introduce(5)
    c = _Client(store)
    t, p = c.call(XsType.TRANSACTION_START, b"\0")
    tx = int(p.rstrip(b"\0"))
    long = HOME + "/" + "a" * 1000
    n = 0
    while True:
        t, p = c.call(XsType.READ, f"{long}{n}\0".encode(), tx)
        if p == b"ENOSPC\0":
            break
        assert p == b"ENOENT\0"
        n += 1
    assert 14 <= n <= 17                                   # ~16 KiB of 1 KiB paths
    assert c.call(XsType.TRANSACTION_END, b"F\0", tx) == (XsType.TRANSACTION_END, b"OK\0")
    # Values: rewriting one node keeps one value; new values add up.
    tx = int(c.call(XsType.TRANSACTION_START, b"\0")[1].rstrip(b"\0"))
    for _ in range(100):
        assert c.call(XsType.WRITE, f"{HOME}/v\0".encode() + b"x" * 2000, tx)[1] == b"OK\0"
    results = [c.call(XsType.WRITE, f"{HOME}/v{i}\0".encode() + b"x" * 2000, tx)[1] for i in range(12)]
    assert b"ENOSPC\0" in results and results[:6] == [b"OK\0"] * 6
    assert c.call(XsType.TRANSACTION_END, b"T\0", tx) == (XsType.TRANSACTION_END, b"OK\0")
    assert store.read(f"{HOME}/v") == b"x" * 2000
    # dom0 has no such quota.
    d0 = _Client(store, 0)
    tx = int(d0.call(XsType.TRANSACTION_START, b"\0")[1].rstrip(b"\0"))
    for i in range(40):
        assert d0.call(XsType.READ, f"{long}{i}\0".encode(), tx)[1] == b"ENOENT\0"
