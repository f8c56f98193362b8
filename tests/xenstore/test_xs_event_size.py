"""Watch events are sent only if they fit one message (Xen's send_event drops longer ones),
whatever the token's bytes: the write that fires them succeeds either way."""
from __future__ import annotations

import pytest

from aiovmm.xenstore.protocol import PAYLOAD_MAX, Message, MessageReader, XsType
from aiovmm.xenstore.store import Store

HOME = "/local/domain/5"


def _watching(token: bytes) -> tuple[Store, list[Message], object]:
    store = Store()
    store.introduce(5)
    reader, got = MessageReader(), []
    conn = store.connect(5, lambda b: got.extend(reader.feed(b)))
    store.process(conn, Message(XsType.WATCH, 1, 0, HOME.encode() + b"\0" + token + b"\0"))
    assert [m.type for m in got] == [XsType.WATCH, XsType.WATCH_EVENT]
    return store, got, conn


@pytest.mark.parametrize("byte", [b"t", b"\xff"])
def test_event_longer_than_a_message_is_not_sent(byte):
    token = byte * (PAYLOAD_MAX - len(f"{HOME}/x") - 2)
    store, got, conn = _watching(token)
    store.write(f"{HOME}/x", "fits")                    # path + token + 2 NULs = 4096
    assert got[-1].type == XsType.WATCH_EVENT and len(got[-1].payload) == PAYLOAD_MAX
    assert got[-1].payload == f"{HOME}/x".encode() + b"\0" + token + b"\0"
    store.write(f"{HOME}/xy", "one byte too long")      # dropped, the write succeeds
    assert len(got) == 3 and conn.stats["events_too_long"] == 1
    assert store.read(f"{HOME}/xy") == b"one byte too long"
