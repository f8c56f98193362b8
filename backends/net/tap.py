"""Linux tap devices for vifs, created with /dev/net/tun (TUNSETIFF).

The tap is not persistent: it vanishes when its file descriptor closes, so nothing is left
behind if the hypervisor dies. It can be created inside a network namespace (pushns/popns,
0.4 ms, hostio/NOTES.md) and is attached to a bridge with pyroute2 (never by shelling out).
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

import asyncio

from pyroute2 import IPRoute, netns as pr_netns

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16


class TapError(Exception):
    """The tap could not be created or attached (one-line reason)."""


class TapBusy(TapError):
    """An interface of that name already exists (another process's vif)."""


def open_tap(name: str, netns: str | None = None) -> int:
    """Create tap `name` (optionally inside namespace `netns`); returns a non-blocking fd."""
    if len(name.encode()) >= IFNAMSIZ:
        raise TapError(f"interface name {name!r} is longer than {IFNAMSIZ - 1} characters")
    if netns:
        pr_netns.pushns(netns)
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        except OSError as e:
            os.close(fd)
            cls = TapBusy if e.errno == errno.EBUSY else TapError
            raise cls(f"cannot create tap {name}: {e.strerror}") from None
    except FileNotFoundError:
        raise TapError("/dev/net/tun is missing (no tun/tap support)") from None
    finally:
        if netns:
            pr_netns.popns()
    return fd


async def attach(name: str, bridge: str | None, netns: str | None = None, mtu: int = 1500) -> None:
    """Bring the tap up, and enslave it to `bridge` if given.

    pyroute2's AsyncIPRoute cannot open its netlink socket on uvloop (AF_NETLINK datagram
    endpoints are refused), so the synchronous IPRoute runs in a worker thread (~1 ms)."""
    await asyncio.to_thread(_attach_sync, name, bridge, netns, mtu)


def _attach_sync(name: str, bridge: str | None, netns: str | None, mtu: int) -> None:
    with (IPRoute(netns=netns) if netns else IPRoute()) as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            raise TapError(f"tap {name} vanished")
        kw = {"index": idx[0], "state": "up", "mtu": mtu}
        if bridge:
            br = ipr.link_lookup(ifname=bridge)
            if not br:
                raise TapError(f"bridge {bridge!r} does not exist" + (f" in netns {netns}" if netns else ""))
            kw["master"] = br[0]
        ipr.link("set", **kw)
