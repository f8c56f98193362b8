"""aiovmm.testing: fixtures for tests and scripts that put guests on real Linux networking.

`VirtualLan` builds, in network namespaces it owns (unique names, removed on exit even on
failure), a bridge for guest taps and a "host" namespace wired to it by a veth pair:

    async with VirtualLan("198.18.0.1/24") as lan:
        dom = await hv.create(kernel, vifs=[lan.vif("00:16:3e:00:00:02")], cmdline="ip=198.18.0.2/24")
        await lan.run("ping", "-c", "1", "198.18.0.2")      # from the host namespace

Traffic stays inside the namespaces it creates (the project's network rule).
"""
from __future__ import annotations

import asyncio
import itertools
import os

from pyroute2 import IPRoute, netns

from .backends.net import VifConfig
from .backends.net.tap import in_netns

_counter = itertools.count()


def unique_prefix(tag: str = "av") -> str:
    """A short name unique to this process and call (fits interface-name limits)."""
    return f"{tag}{os.getpid() % 100000}x{next(_counter)}"


class VirtualLan:
    def __init__(self, host_cidr: str = "198.18.0.1/24", prefix: str | None = None) -> None:
        self.prefix = prefix or unique_prefix()
        self.lan_ns = f"{self.prefix}-lan"      # holds the bridge and the guests' taps
        self.host_ns = f"{self.prefix}-host"    # the "host" the user pings from
        self.bridge = "br0"
        self.host_if = "eth0"
        addr, _, plen = host_cidr.partition("/")
        self.host_ip, self.prefixlen = addr, int(plen or 24)

    def vif(self, mac: str = "", ifname: str | None = None, mtu: int = 1500) -> VifConfig:
        return VifConfig(mac=mac, bridge=self.bridge, netns=self.lan_ns, ifname=ifname, mtu=mtu)

    async def __aenter__(self) -> "VirtualLan":
        try:
            await asyncio.to_thread(self._setup)
        except BaseException:
            await self.aclose()
            raise
        return self

    def _setup(self) -> None:
        # Synchronous pyroute2 in a worker thread that enters the namespace itself (setns):
        # AsyncIPRoute does not run on uvloop, and IPRoute(netns=...) forks a helper child.
        netns.create(self.lan_ns)
        netns.create(self.host_ns)
        with in_netns(self.lan_ns), IPRoute() as ipr:
            ipr.link("add", ifname="uplink", kind="veth",
                     peer={"ifname": self.host_if, "net_ns_fd": self.host_ns})
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
        self._create_bridge()
        with in_netns(self.host_ns), IPRoute() as ipr:
            eth = ipr.link_lookup(ifname=self.host_if)[0]
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.addr("add", index=eth, address=self.host_ip, prefixlen=self.prefixlen)
            ipr.link("set", index=eth, state="up")
            ipr.link("set", index=lo, state="up")

    def _create_bridge(self) -> None:
        with in_netns(self.lan_ns), IPRoute() as ipr:
            ipr.link("add", ifname=self.bridge, kind="bridge")
            br = ipr.link_lookup(ifname=self.bridge)[0]
            up = ipr.link_lookup(ifname="uplink")[0]
            ipr.link("set", index=up, master=br, state="up")
            ipr.link("set", index=br, state="up")

    def _delete_bridge(self) -> None:
        with in_netns(self.lan_ns), IPRoute() as ipr:
            ipr.link("del", index=ipr.link_lookup(ifname=self.bridge)[0])

    async def create_bridge(self) -> None:
        """(Re)create the bridge and put the host's uplink on it (guest taps are not touched:
        re-attaching them is the hypervisor's job)."""
        await asyncio.to_thread(self._create_bridge)

    async def delete_bridge(self) -> None:
        """Delete the bridge, as an admin's `ip link del br0` would (its ports are released)."""
        await asyncio.to_thread(self._delete_bridge)

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Remove both namespaces (and every interface in them). Idempotent."""
        for ns in (self.host_ns, self.lan_ns):
            try:
                netns.remove(ns)
            except OSError:
                pass

    async def run(self, *argv: str, timeout: float = 30) -> tuple[int, str]:
        """Run a command in the host namespace; returns (exit status, stdout+stderr)."""
        ns = self.host_ns
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            preexec_fn=lambda: netns.setns(ns))       # enter the namespace in the child
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            out, _ = await proc.communicate()
            return -1, out.decode(errors="replace") + "\n(timeout)"
        return proc.returncode, out.decode(errors="replace")


# ------------------------------------------------------------------------------ pytest plugin
# Registered as a pytest11 entry point (pyproject.toml): a suite that has aiovmm installed
# gets these fixtures without a conftest. Async fixtures need pytest-asyncio.
try:
    import pytest as _pytest
    import pytest_asyncio as _pytest_asyncio
except ImportError:                    # used as a library without pytest: no fixtures
    _pytest = None

if _pytest is not None:
    @_pytest_asyncio.fixture
    async def aiovmm_hypervisor():
        """A Hypervisor with 256 MiB of machine memory; every guest is destroyed after
        the test."""
        from .hypervisor import Hypervisor
        async with Hypervisor(memory_mib=256) as hv:
            yield hv

    @_pytest_asyncio.fixture
    async def aiovmm_lan():
        """A VirtualLan (bridge + "host" namespace, 198.18.0.1/24), removed after the test."""
        async with VirtualLan("198.18.0.1/24") as lan:
            yield lan
