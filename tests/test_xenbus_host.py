"""Host-side xenbus helpers read guest-written nodes: anything may be there."""
from __future__ import annotations

import pytest

from aiovmm.xenbus import XenbusState, read_state, read_str
from aiovmm.xenstore.store import Store


@pytest.mark.parametrize("value", [b"4", b"", b"abc", b"99", b"-1", b"\xff\xfe", b"4\x00"])
def test_read_state_of_guest_garbage(value: bytes):
    st = Store()
    st.write("/dev/x/state", value)
    want = {b"4": XenbusState.Connected, b"": XenbusState.Unknown}.get(value, XenbusState.Unknown)
    assert read_state(st, "/dev/x") is want


def test_missing_nodes_and_non_utf8_text():
    st = Store()
    assert read_state(st, "/nowhere") is XenbusState.Unknown
    assert read_str(st, "/nowhere", "d") == "d"
    st.write("/dev/y", b"\xc3\x28")
    assert read_str(st, "/dev/y", "d") == "d"
    st.write("/dev/y", "caf\u00e9")
    assert read_str(st, "/dev/y") == "caf\u00e9"

