"""Issue 15: vcpus= through the daemon: xl.cfg `vcpus`, the REST create field, `list` and
`vcpu-list` showing every vCPU (the real CLI against a real `aiovmm serve`)."""
from __future__ import annotations

import re

from .ctlhelp import Daemon, kernel


def test_cfg_vcpus_listed(daemon: Daemon):
    cfg = daemon.write_cfg("smp2", kernel=kernel(), memory=8, vcpus=2, extra="ticks=100000 period_ms=50")
    r = daemon.cli("create", cfg)
    assert r.returncode == 0, r.stderr
    daemon.wait_console("smp2", r"timer: tick 2 ")
    row = [l for l in daemon.ok("list").splitlines() if l.startswith("smp2 ")]
    assert row and int(row[0].split()[3]) == 2, row
    vl = [l for l in daemon.ok("vcpu-list", "smp2").splitlines()[1:] if l.strip()]
    assert [int(l.split()[2]) for l in vl] == [0, 1], vl
    daemon.ok("destroy", "smp2")


def test_rest_create_vcpus(daemon: Daemon):
    from .ctlhelp import guest
    rec = daemon.api("POST", "/api/v1/domains", {"kernel": guest("smp"), "memory": 8, "name": "smpr",
                                                 "vcpus": 2, "cmdline": "vcpus=2 hold=1"})
    text = daemon.wait_console("smpr", r"^smp: done$", timeout=120)
    assert re.search(r"^result ap_pongs 50$", text, re.M), text[-1500:]
    daemon.ok("destroy", "smpr")
    status, _ = daemon.request("POST", "/api/v1/domains", {"kernel": guest("smp"), "vcpus": 33})
    assert status == 400
    assert rec
