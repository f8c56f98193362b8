"""Issue 12: network-attach / block-attach into a running guest whose frontend then connects
(the test guests' hotplug= mode waits for device/<type>/<id> on a xenbus watch), traffic and
I/O over the hot-plugged devices, then detach. Real taps in a namespace this test made, a
real sparse image file."""
from __future__ import annotations

import asyncio
import os
import re
import subprocess

import pytest

from aiovmm.testing import VirtualLan
from .ctlhelp import guest

XVDB = (202 << 8) | 16          # devid of xvdb


@pytest.fixture
def lan():
    v = VirtualLan()
    asyncio.run(v.__aenter__())
    try:
        yield v
    finally:
        asyncio.run(v.aclose())


def _xs_exists(daemon, path: str) -> bool:
    r = subprocess.run(["xenstore-exists", path], capture_output=True, text=True,
                       env=dict(os.environ, XENSTORED_PATH=daemon.xs_socket))
    return r.returncode == 0


def _nodes(daemon) -> int:
    return daemon.api("GET", "/api/v1/info")["xenstore_nodes"]


def _links(ns: str) -> str:
    return subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True).stdout


def test_network_attach_detach(daemon, lan):
    start = _nodes(daemon)
    cfg = daemon.write_cfg("hpnet", kernel=guest("net"), memory=8, extra="ip=198.18.0.2/24 hotplug=60")
    daemon.ok("create", cfg)
    daemon.wait_console("hpnet", r"^net: waiting for device/vif/0$")
    domid = daemon.api("GET", "/api/v1/domains/hpnet")["id"]
    daemon.ok("network-attach", "hpnet", "mac=00:16:3e:12:00:01", "bridge=br0", f"netns={lan.lan_ns}")
    daemon.wait_console("hpnet", r"^net: up mac=00:16:3e:12:00:01 ip=198.18.0.2$", timeout=30)
    out = daemon.ok("network-list", "hpnet").splitlines()
    assert out[0] == "Idx BE Mac Addr.         handle state evt-ch   tx-/rx-ring-ref BE-path"
    assert re.match(rf"^0\s+0\s+00:16:3e:12:00:01\s+0\s+4\s+\d+\s+\d+/\d+\s+/local/domain/0/backend/vif/{domid}/0$",
                    out[1]), out
    assert f"vif{domid}.0" in _links(lan.lan_ns)
    ping = subprocess.run(["ip", "netns", "exec", lan.host_ns, "ping", "-c", "2", "-W", "3", "198.18.0.2"],
                          capture_output=True, text=True, timeout=30)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    vif = daemon.api("GET", "/api/v1/domains/hpnet/vifs")[0]
    assert vif["state"] == 4 and vif["frontend_state"] == 4
    assert vif["rx_packets"] >= 2 and vif["tx_packets"] >= 2       # the pings, both ways
    status, metrics = daemon.request("GET", "/metrics")
    assert re.search(rf'aiovmm_vif_rx_packets_total{{devid="0",domid="{domid}",name="hpnet"}} [1-9]', metrics)
    daemon.ok("network-detach", "hpnet", "0")
    assert daemon.ok("network-list", "hpnet").splitlines()[1:] == []
    assert f"vif{domid}.0" not in _links(lan.lan_ns)
    assert not _xs_exists(daemon, f"/local/domain/{domid}/device/vif/0")
    assert not _xs_exists(daemon, f"/local/domain/0/backend/vif/{domid}/0")
    r = daemon.cli("network-detach", "hpnet", "0")
    assert r.returncode == 1 and r.stderr.strip() == f"aiovmm: d{domid} has no vif '0'"
    daemon.ok("destroy", "hpnet")
    assert _nodes(daemon) == start


def test_block_attach_detach(daemon, tmp_path):
    img = tmp_path / "hp.img"
    with open(img, "wb") as f:
        f.truncate(4 << 20)
    start = _nodes(daemon)
    cfg = daemon.write_cfg("hpblk", kernel=guest("blk"), memory=8,
                           extra=f"mode=rw sectors=64 hold=1 hotplug=60 vdev={XVDB}")
    daemon.ok("create", cfg)
    daemon.wait_console("hpblk", rf"^blk: waiting for device/vbd/{XVDB}$")
    domid = daemon.api("GET", "/api/v1/domains/hpblk")["id"]
    daemon.ok("block-attach", "hpblk", f"target={img},vdev=xvdb,access=rw")
    text = daemon.wait_console("hpblk", r"^result hold 1$", timeout=60)
    assert "blk: sectors=8192 size=512 ro=0" in text
    assert "result write 64" in text and "result flush 0" in text
    out = daemon.ok("block-list", "hpblk").splitlines()
    assert out[0] == "Vdev  BE  handle state evt-ch ring-ref BE-path"
    assert re.match(rf"^{XVDB}\s+0\s+{XVDB}\s+4\s+\d+\s+\d+\s+/local/domain/0/backend/vbd/{domid}/{XVDB}$", out[1]), out
    vbd = daemon.api("GET", "/api/v1/domains/hpblk/vbds")[0]
    assert vbd["wr_sectors"] >= 64
    # The data reached the image: the guest's pattern is not all zeroes.
    with open(img, "rb") as f:
        assert f.read(64 * 512).count(0) < 64 * 512
    # The same image cannot be attached twice writable.
    r = daemon.cli("block-attach", "hpblk", f"target={img},vdev=xvdc,access=rw")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    daemon.ok("block-detach", "hpblk", "xvdb")
    assert daemon.ok("block-list", "hpblk").splitlines()[1:] == []
    assert not _xs_exists(daemon, f"/local/domain/{domid}/device/vbd/{XVDB}")
    assert not _xs_exists(daemon, f"/local/domain/0/backend/vbd/{domid}/{XVDB}")
    # Released: it can be attached again (and detached) while the guest still runs.
    daemon.ok("block-attach", "hpblk", f"target={img},vdev=xvdb,access=r")
    daemon.ok("block-detach", "hpblk", str(XVDB))
    daemon.ok("destroy", "hpblk")
    assert _nodes(daemon) == start
