"""Red team on the control plane: a hostile guest against the toolstack's xenstore writes,
and clients against the daemon's API. A real `aiovmm serve`, real guests, real HTTP."""
from __future__ import annotations

import os
import re

import pytest

from .ctlhelp import BUILD, Daemon


def hostile(name: str) -> str:
    return str(BUILD / "hostile" / f"{name}.elf")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(scope="module")
def daemon():
    d = Daemon()
    try:
        yield d
    finally:
        d.stop()


@pytest.mark.parametrize("utf8", [0, 1])
def test_long_token_watch_cannot_block_toolstack_writes(daemon, utf8):
    """A guest watches its home with the longest token a WATCH allows: every event for a
    node below it is longer than a xenstore message. Xen does not send such an event; here
    the event failed the write that fired it (AssertionError in pack; a non-UTF-8 token:
    UnicodeEncodeError), so `mem-set` and `shutdown` answered 500 and the guest could not
    be shut down (only destroyed)."""
    d = daemon
    name = f"xslong{utf8}"
    d.api("POST", "/api/v1/domains", {"kernel": hostile("xs_long_token"), "name": name,
                                      "cmdline": f"utf8={utf8}"})
    text = d.wait_console(name, r"^ready$")
    assert re.search(r"^result watch 0$", text, re.M), text
    assert re.search(r"^result initial 0$", text, re.M), text
    status, body = d.request("PUT", f"/api/v1/domains/{name}/memory/target", {"mib": 16})
    assert status == 200, body
    d.wait_console(name, r"^result target 16384$")
    status, body = d.request("POST", f"/api/v1/domains/{name}/shutdown", {"wait": True, "timeout": 30})
    assert status == 200, body
    assert "Traceback" not in d.log()
