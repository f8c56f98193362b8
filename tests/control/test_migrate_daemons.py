"""`aiovmm migrate DOM HOST:PORT` between two real daemons (serve --migration-listen)."""
from __future__ import annotations

import os
import re
import socket
import signal
import tempfile
import time

import pytest

try:                                   # tests/control is a package on main
    from .ctlhelp import Daemon, guest, uptime, wait_resumed
except ImportError:
    from ctlhelp import Daemon, guest, uptime, wait_resumed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def daemons():
    d = tempfile.mkdtemp(prefix="avmig", dir="/tmp")
    secret = os.path.join(d, "secret")
    with open(secret, "w") as f:
        f.write("shared-secret-0123456789\n")
    wrong = os.path.join(d, "wrong")
    with open(wrong, "w") as f:
        f.write("another-secret-0123456789\n")
    port = _free_port()
    a = Daemon(extra=["--migration-secret-file", secret])
    b = Daemon(extra=["--migration-secret-file", secret, "--migration-listen", f"127.0.0.1:{port}"])
    c = Daemon(extra=["--migration-secret-file", wrong])
    try:
        yield a, b, c, port
    finally:
        for x in (a, b, c):
            x.stop()
        import shutil
        shutil.rmtree(d, ignore_errors=True)


def test_migrate_between_daemons(daemons):
    a, b, c, port = daemons
    # a daemon with the wrong secret is refused; its guest runs on
    dc = c.api("POST", "/api/v1/domains", {"kernel": guest("suspend"), "memory": 8, "name": "mig0",
                                           "cmdline": "pages=32 every=10"})
    c.wait_console(str(dc["id"]), r"^uptime: ticks=20 ", 30)
    r = c.cli("migrate", "mig0", f"127.0.0.1:{port}")
    assert r.returncode == 1 and "secret" in r.stderr, r.stderr
    assert b.api("GET", "/api/v1/domains") == []
    c.wait_console(str(dc["id"]), r"^uptime: ticks=40 ", 30)
    # the right secret: the guest moves and carries on
    d = a.api("POST", "/api/v1/domains", {"kernel": guest("suspend"), "memory": 8, "name": "mig1",
                                          "cmdline": "pages=32 every=10"})
    t_sent, s_sent = uptime(a.wait_console(str(d["id"]), r"^uptime: ticks=20 ", 30))
    r = a.cli("migrate", "mig1", f"127.0.0.1:{port}")
    assert r.returncode == 0, r.stderr
    m = re.search(r"as d(\d+): (\d+) rounds, (\d+) pages .* downtime ([\d.]+) ms", r.stderr)
    assert m, r.stderr
    remote = m.group(1)
    assert a.request("GET", "/api/v1/domains/mig1")[0] == 404
    t, s = wait_resumed(b, remote)
    assert t > t_sent and s == s_sent          # the uptime and the memory carried over
    text = b.wait_console(remote, rf"^uptime: ticks={t + 20} ", 20)
    assert uptime(text)[1] == s
    assert b.api("GET", "/api/v1/domains/mig1")["name"] == "mig1"
    b.ok("destroy", "mig1")
    c.ok("destroy", "mig0")


def test_interrupted_migrate_cancels_the_precopy(daemons):
    """Ctrl-C on `aiovmm migrate` during the pre-copy (xl migrate dies with its process): the
    daemon sees its client go and cancels; the guest runs on at the source, nothing arrives
    at the destination. It was "aiovmm: interrupted", exit 130, and the migration went on.
    Before it, the progress shows the first round going (it was "connect 0/N" until the
    first round had ended: the bulk of a migration)."""
    a, b, c, port = daemons
    d = a.api("POST", "/api/v1/domains", {"kernel": guest("suspend"), "memory": 32, "name": "mig2",
                                          "cmdline": "pages=256 every=10"})
    a.wait_console(str(d["id"]), r"^uptime: ticks=20 ", 30)
    # 64 KiB/s: the pre-copy of the guest's ~1.3 MiB of data takes ~20 s
    with a.cli_process("migrate", "mig2", f"127.0.0.1:{port}", "--bandwidth", "65536") as p:
        deadline = time.monotonic() + 20
        seen: list = []
        while time.monotonic() < deadline:
            status, prog = a.request("GET", "/api/v1/domains/mig2/progress")
            seen.append(prog)
            if status == 200 and prog["phase"] == "precopy" and prog["rounds"] == 0 \
                    and 0 < prog["round_done"] < prog["round_total"]:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"no progress within the first round: {seen[-3:]}")
        assert prog["done"] == prog["round_done"] and prog["round_total"] == 32 * 256
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert b"Traceback" not in err and b"cancelled" in err, err
    deadline = time.monotonic() + 30
    while "cancelled during pre-copy" not in a.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "cancelled during pre-copy" in a.log(), a.log()[-2000:]
    time.sleep(1)
    assert b.api("GET", "/api/v1/domains") == []
    t, _ = uptime(a.console_text(str(d["id"])))
    a.wait_console(str(d["id"]), rf"^uptime: ticks={t + 20} ", 30)   # still running here
    a.ok("destroy", "mig2")


def test_refused_migration_says_why(daemons):
    """A receiver that refuses the stream (here: too little machine memory for the guest)
    tells the sender why, in READY's place; the user saw "[Errno 104] Connection reset by
    peer" and had to find the reason in the receiver's log. The guest runs on here."""
    a, b, c, port = daemons
    secret = os.path.join(os.path.dirname(a.dir), "s19refuse-secret")
    with open(secret, "w") as f:
        f.write("shared-secret-0123456789\n")
    small_port = _free_port()
    small = Daemon(machine_memory=16, extra=["--migration-secret-file", secret,
                                             "--migration-listen", f"127.0.0.1:{small_port}"])
    a2 = Daemon(extra=["--migration-secret-file", secret])
    try:
        d = a2.api("POST", "/api/v1/domains", {"kernel": guest("suspend"), "memory": 32, "name": "big",
                                               "cmdline": "pages=32 every=10"})
        a2.wait_console(str(d["id"]), r"^uptime: ticks=20 ", 30)
        r = a2.cli("migrate", "big", f"127.0.0.1:{small_port}")
        assert r.returncode == 1, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert "the receiver refused the migration: " in r.stderr, r.stderr
        assert small.api("GET", "/api/v1/domains") == []
        t, _ = uptime(a2.console_text(str(d["id"])))
        a2.wait_console(str(d["id"]), rf"^uptime: ticks={t + 20} ", 30)   # runs on here
        a2.ok("destroy", "big")
    finally:
        small.stop()
        a2.stop()
        os.unlink(secret)
