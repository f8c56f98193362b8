"""`aiovmm save DOM FILE` / `aiovmm restore FILE` against a real daemon (REST + CLI)."""
from __future__ import annotations

import os
import re
import tempfile

import pytest

try:                                   # tests/control is a package on main
    from .ctlhelp import Daemon, guest, uptime, wait_resumed
except ImportError:
    from ctlhelp import Daemon, guest, uptime, wait_resumed


@pytest.fixture(scope="module")
def daemon():
    save_dir = tempfile.mkdtemp(prefix="avsave", dir="/tmp")
    d = Daemon(extra=["--save-dir", save_dir])
    d.save_dir = save_dir
    try:
        yield d
    finally:
        d.stop()
        import shutil
        shutil.rmtree(save_dir, ignore_errors=True)


def test_save_restore_verbs(daemon):
    d = daemon.api("POST", "/api/v1/domains", {"kernel": guest("suspend"), "memory": 4,
                                               "name": "sr1", "cmdline": "pages=16 every=10"})
    dom = str(d["id"])
    t_saved, s_saved = uptime(daemon.wait_console(dom, r"^uptime: ticks=20 ", 30))
    path = os.path.join(daemon.save_dir, "sr1.save")
    r = daemon.cli("save", "sr1", path)
    assert r.returncode == 0 and "Saved d" in r.stderr, r.stderr
    status, _ = daemon.request("GET", "/api/v1/domains/sr1")
    assert status == 404                       # saved: gone, as after xl save
    with open(path, "rb") as f:
        assert f.read(32) == b"Xen saved domain, xl format\n \0 \r"
    r = daemon.cli("restore", path)
    assert r.returncode == 0, r.stderr
    new = re.search(r"as d(\d+) \(sr1\)", r.stderr).group(1)
    t0, s0 = wait_resumed(daemon, new)
    assert t0 > t_saved and s0 == s_saved      # the uptime and the memory carried over
    text = daemon.wait_console(new, rf"^uptime: ticks={t0 + 20} ", 20)
    assert uptime(text)[1] == s0
    # a checkpoint leaves it running
    r = daemon.cli("save", "-c", "sr1", path + ".2")
    assert r.returncode == 0 and "still running" in r.stderr, r.stderr
    daemon.wait_console(new, r"^suspend: resumed rc=1$", 20)
    daemon.ok("destroy", "sr1")


def test_save_restore_refusals(daemon):
    status, body = daemon.request("GET", "/api/v1/domains/nosuch/progress")
    assert status == 404
    r = daemon.cli("save", "nosuch", os.path.join(daemon.save_dir, "x.save"))
    assert r.returncode == 1 and "nosuch" in r.stderr
    status, body = daemon.request("POST", "/api/v1/restore", {"file": "/etc/passwd"})
    assert status == 400 and "outside the daemon's save directory" in body["error"]
    status, body = daemon.request("POST", "/api/v1/restore", {"file": "relative.save"})
    assert status == 400 and "absolute" in body["error"]
    bad = os.path.join(daemon.save_dir, "bad.save")
    with open(bad, "wb") as f:
        f.write(b"Xen saved domain, xl format\n \0 \r" + b"\0" * 40)
    before = daemon.api("GET", "/api/v1/info")["free_frames"]
    r = daemon.cli("restore", bad)
    assert r.returncode == 1 and "refused" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert daemon.api("GET", "/api/v1/info")["free_frames"] == before
    assert daemon.api("GET", "/api/v1/domains") == []


def test_restore_of_a_file_saved_by_another_daemon(daemon):
    """A save file is the guest, whoever wrote it: a second daemon (another host seeing the
    same path, as a shared save directory) restores what the first one saved, and the guest
    carries on there with its uptime and memory."""
    d = daemon.api("POST", "/api/v1/domains", {"kernel": guest("suspend"), "memory": 4,
                                               "name": "sr2", "cmdline": "pages=16 every=10"})
    t_saved, s_saved = uptime(daemon.wait_console(str(d["id"]), r"^uptime: ticks=20 ", 30))
    path = os.path.join(daemon.save_dir, "sr2.save")
    r = daemon.cli("save", "sr2", path)
    assert r.returncode == 0, r.stderr
    other = Daemon(machine_memory=64, extra=["--save-dir", daemon.save_dir])
    try:
        r = other.cli("restore", path)
        assert r.returncode == 0, r.stderr
        new = re.search(r"as d(\d+) \(sr2\)", r.stderr).group(1)
        t0, s0 = wait_resumed(other, new)
        assert t0 > t_saved and s0 == s_saved
        other.wait_console(new, rf"^uptime: ticks={t0 + 10} ", 20)
        other.ok("destroy", "sr2")
    finally:
        other.stop()
    assert daemon.api("GET", "/api/v1/domains") == []
