"""Real host networking (issue: netfront, netback, tap devices and bridges).

Each test builds its own namespaces (aiovmm.testing.VirtualLan: unique names, removed on
exit) with a bridge, boots net.elf guests whose vifs are taps on that bridge, and talks to
them from the "host" namespace with the real ping, curl and a UDP socket.
"""
from __future__ import annotations

import asyncio
import subprocess

import pytest

from aiovmm import Hypervisor, ShutdownReason
from aiovmm.testing import VirtualLan

from conftest import guest, run_cli

NET = guest("net")
pytestmark = pytest.mark.skipif(not __import__("os").path.exists("/dev/net/tun"), reason="no /dev/net/tun")


def links(ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "ip", "-br", "link"],
                          capture_output=True, text=True).stdout


async def boot_net(hv, lan, n: int, extra: str = ""):
    dom = await hv.create(NET, memory_mib=16, name=f"g{n}", cmdline=f"ip=198.18.0.{n}/24 name=g{n} {extra}",
                          vifs=[lan.vif(f"00:16:3e:00:00:{n:02x}")])
    await dom.wait_for_line(r"^net: up mac=00:16:3e:00:00:%02x ip=198\.18\.0\.%d$" % (n, n), timeout=30)
    return dom


async def test_ping_udp_and_http_from_the_host():
    async with VirtualLan("198.18.0.1/24") as lan, Hypervisor(memory_mib=256) as hv:
        g = await boot_net(hv, lan, 2)
        rc, out = await lan.run("ping", "-c", "5", "-i", "0.2", "-W", "2", "198.18.0.2")
        assert rc == 0 and " 0% packet loss" in out, out
        rc, out = await lan.run("python3", "-c",
                                "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                                "s.settimeout(3); s.sendto(b'aiovmm-udp-1234', ('198.18.0.2', 7)); "
                                "print(s.recv(100).decode())")
        assert rc == 0 and out.strip() == "aiovmm-udp-1234", out
        rc, out = await lan.run("curl", "-s", "-m", "5", "http://198.18.0.2/")
        assert rc == 0, out
        assert "aiovmm guest g2" in out and "198.18.0.2" in out
        # A closed port is refused by the guest's TCP (RST), not left hanging.
        rc, out = await lan.run("curl", "-s", "-m", "5", "http://198.18.0.2:81/")
        assert rc == 7, (rc, out)          # curl: could not connect
        assert not g.dying


async def test_two_guests_ping_each_other():
    async with VirtualLan("198.18.0.1/24") as lan, Hypervisor(memory_mib=256) as hv:
        await boot_net(hv, lan, 2)
        g3 = await boot_net(hv, lan, 3, "ping=198.18.0.2 count=5 serve=2")
        line = await g3.wait_for_line(r"^net: ping done", timeout=30)
        assert line == "net: ping done 5/5", g3.console_lines


async def test_many_pings_and_requests_lose_nothing():
    async with VirtualLan("198.18.0.1/24") as lan, Hypervisor(memory_mib=256) as hv:
        g = await boot_net(hv, lan, 2)
        rc, out = await lan.run("ping", "-c", "200", "-i", "0.005", "-s", "1400", "-W", "2", "198.18.0.2", timeout=60)
        assert rc == 0 and " 0% packet loss" in out, out
        for _ in range(10):
            rc, out = await lan.run("curl", "-s", "-m", "5", "http://198.18.0.2/")
            assert rc == 0 and "aiovmm guest g2" in out
        nb = g.backends[0]
        assert nb.stats.tx_errors == 0 and nb.stats.bad_indices == 0


async def test_tap_named_after_domain_is_removed_on_shutdown_and_crash():
    async with VirtualLan("198.18.0.1/24") as lan, Hypervisor(memory_mib=256) as hv:
        g2 = await boot_net(hv, lan, 2)
        g3 = await boot_net(hv, lan, 3)
        names = links(lan.lan_ns)
        assert f"vif{g2.domid}.0" in names and f"vif{g3.domid}.0" in names
        # The tap is on the bridge.
        master = subprocess.run(["ip", "netns", "exec", lan.lan_ns, "ip", "-o", "link", "show", f"vif{g2.domid}.0"],
                                capture_output=True, text=True).stdout
        assert "master br0" in master
        g2.shutdown(ShutdownReason.poweroff)
        g3.crash("crashed by the test")
        await g2.wait()
        await g3.wait()
        for _ in range(50):
            names = links(lan.lan_ns)
            if "vif" not in names:
                break
            await asyncio.sleep(0.05)
        assert "vif" not in names, names


def test_cli_rejects_a_bad_vif():
    r = run_cli("run", NET, "--vif", "mac=zz:16:3e:00:00:01")
    assert r.returncode == 64 and "Traceback" not in r.stderr
    assert r.stderr.startswith("aiovmm: vif") and len(r.stderr.splitlines()) == 1, r.stderr
    r = run_cli("run", NET, "--vif", "mac=01:16:3e:00:00:01")        # multicast
    assert r.returncode == 64 and "multicast" in r.stderr
