"""Linux tap devices for vifs, created with /dev/net/tun (TUNSETIFF), and their bridge.

The tap is not persistent: it vanishes when its file descriptor closes, so nothing is left
behind if the hypervisor dies. It can be created inside a network namespace and is attached
to a bridge with pyroute2 (never by shelling out).

Namespaces are entered with setns(2) by the worker thread doing the work (`in_netns`), never
by the loop's thread and never by forking: pyroute2's own `IPRoute(netns=...)` forks a
helper child per socket, and a child forked from the hypervisor inherits the event loop's
signal wake-up fd and Python's SIGTERM handler; pyroute2 stops the child with SIGTERM, the
child writes that signal number into the loop's wake-up socket, and the loop runs its own
SIGTERM handler: `aiovmm run` destroyed its guest "on SIGTERM" nobody sent it (issue 9 #9,
seen with strace: the child's `write(<wakeup fd>, "\\17")` right after `kill(child, SIGTERM)`).
A namespace is only ever opened, never created: a vif naming a missing one is refused.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Iterator

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

log = logging.getLogger("aiovmm.backends.net")

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"          # where `ip netns add` (and pyroute2) keep named namespaces
RTMGRP_LINK = 1
RTM_NEWLINK, RTM_DELLINK = 16, 17

_libc = ctypes.CDLL(None, use_errno=True)


class TapError(Exception):
    """The tap could not be created or attached (one-line reason)."""


class TapBusy(TapError):
    """An interface of that name already exists (another process's vif)."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def netns_path(name: str) -> str:
    """The bind-mount of named namespace `name` (a plain name, as `ip netns` takes)."""
    if not name or "/" in name or name in (".", ".."):
        raise TapError(f"bad network namespace name {name!r}")
    return os.path.join(NETNS_RUN_DIR, name)


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread in network namespace `name` (None: stay).

    setns(CLONE_NEWNET) moves only the calling thread, so call this from a worker thread
    (asyncio.to_thread), never the loop's: sockets and taps made in the body belong to `name`.
    The thread's own namespace is restored on the way out. A missing namespace is a TapError,
    never created."""
    if not name:
        yield
        return
    path = netns_path(name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TapError(f"network namespace {name!r} does not exist") from None
    except OSError as e:
        raise TapError(f"network namespace {name!r}: {e.strerror}") from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(target)
        except OSError as e:
            raise TapError(f"cannot enter network namespace {name!r}: {e.strerror}") from None
        try:
            yield
        finally:
            _setns(own)           # cannot fail: we hold our own namespace's fd (CAP_SYS_ADMIN)
    finally:
        os.close(own)
        os.close(target)


def open_tap(name: str, netns: str | None = None, vnet_hdr: bool = False) -> int:
    """Create tap `name` (optionally inside namespace `netns`); returns a non-blocking fd.

    With `vnet_hdr` every frame read or written carries a 10-byte virtio_net_hdr (IFF_VNET_HDR): it says
    what the checksum and segmentation state of the frame is, which is how netback passes
    Xen's csum_blank/data_validated flags and GSO extras to the kernel and back. Offloads
    stay off (the kernel completes checksums and segments) until `set_offload`.
    Blocking (setns, ioctl): call from a worker thread."""
    if len(name.encode()) >= IFNAMSIZ:
        raise TapError(f"interface name {name!r} is longer than {IFNAMSIZ - 1} characters")
    with in_netns(netns):
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TapError("/dev/net/tun is missing (no tun/tap support)") from None
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(),
                                                 IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)))
        except OSError as e:
            os.close(fd)
            cls = TapBusy if e.errno == errno.EBUSY else TapError
            raise cls(f"cannot create tap {name}: {e.strerror}") from None
    return fd


class TunOffload(enum.IntFlag):
    """TUNSETOFFLOAD flags (linux/if_tun.h): what frames read from the tap may still need."""
    CSUM = 0x01          # partial checksums (virtio_net_hdr NEEDS_CSUM)
    TSO4 = 0x02          # TCP/IPv4 segmentation left to the reader
    TSO6 = 0x04
    TSO_ECN = 0x08


def set_offload(fd: int, flags: TunOffload) -> None:
    """What the reader of `fd` accepts: the kernel hands over partial checksums and GSO
    frames only when they are switched on here, and otherwise completes them itself."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, int(flags))


def _where(netns: str | None) -> str:
    return f" in network namespace {netns!r}" if netns else ""


def check_bridge(bridge: str | None, netns: str | None = None) -> None:
    """Refuse a vif whose namespace or bridge does not exist (or whose bridge is not a
    bridge), before the domain is built: the user gets the cause as one line instead of a
    guest whose network never comes up. Blocking: call from a worker thread."""
    with in_netns(netns):
        if not bridge:
            return
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=bridge)
            if not idx:
                raise TapError(f"bridge {bridge!r} does not exist{_where(netns)}")
            kind = ipr.get_links(idx[0])[0].get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
            if kind != "bridge":
                raise TapError(f"{bridge!r}{_where(netns)} is not a bridge (it is a {kind or 'plain'} link)")


async def attach(name: str, bridge: str | None, netns: str | None = None, mtu: int = 1500) -> None:
    """Bring the tap up, and enslave it to `bridge` if given.

    pyroute2's AsyncIPRoute cannot open its netlink socket on uvloop (AF_NETLINK datagram
    endpoints are refused), so the synchronous IPRoute runs in a worker thread (~1 ms)."""
    await asyncio.to_thread(_attach_sync, name, bridge, netns, mtu)


def _attach_sync(name: str, bridge: str | None, netns: str | None, mtu: int) -> None:
    with in_netns(netns), IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            raise TapError(f"tap {name} vanished")
        kw = {"index": idx[0], "state": "up", "mtu": mtu}
        if bridge:
            br = ipr.link_lookup(ifname=bridge)
            if not br:
                raise TapError(f"bridge {bridge!r} does not exist{_where(netns)}")
            kw["master"] = br[0]
        ipr.link("set", **kw)


def _reattach_sync(name: str, bridge: str, netns: str | None) -> bool:
    """Enslave tap `name` to `bridge` again if the bridge exists and is not already its
    master. Returns True if it did. Blocking: call from a worker thread."""
    with in_netns(netns), IPRoute() as ipr:
        tap = ipr.link_lookup(ifname=name)
        br = ipr.link_lookup(ifname=bridge)
        if not tap or not br:
            return False
        if ipr.get_links(tap[0])[0].get_attr("IFLA_MASTER") == br[0]:
            return False
        try:
            ipr.link("set", index=tap[0], master=br[0], state="up")
        except NetlinkError as e:
            if e.code == errno.ENODEV:      # the bridge went away again meanwhile
                return False
            raise
        return True


def _link_monitor_socket(netns: str | None) -> socket.socket:
    with in_netns(netns):
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                          socket.NETLINK_ROUTE)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((0, RTMGRP_LINK))
    except OSError:
        s.close()
        raise
    return s


class BridgeWatch:
    """Keeps tap `name` enslaved to `bridge` in `netns`: a bridge deleted and created again
    (by the admin, `ip link del br0; ip link add br0 type bridge`) gets the tap back.

    Link changes come from an rtnetlink multicast socket (RTMGRP_LINK) read on the loop
    (uvloop takes any fd in add_reader, unlike AsyncIPRoute's endpoint); the re-attach
    itself runs in a worker thread. `run` is a task in the vif's TaskGroup, cancelled with it.
    `on_down`/`on_up` are called on the loop when the bridge goes away / the tap is back."""

    def __init__(self, name: str, bridge: str, netns: str | None, on_down, on_up) -> None:
        self.name, self.bridge, self.netns = name, bridge, netns
        self.on_down, self.on_up = on_down, on_up
        self.sock: socket.socket | None = None
        self._marshal = MarshalRtnl()

    async def open(self) -> None:
        """Subscribe before the tap is first attached, so no change is missed in between."""
        self.sock = await asyncio.to_thread(_link_monitor_socket, self.netns)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        try:
            while True:
                try:
                    data = await loop.sock_recv(self.sock, 1 << 16)
                except OSError as e:
                    if e.errno != errno.ENOBUFS:
                        raise
                    data = b""                  # events were lost: reconcile below anyway
                gone = back = not data
                for msg in self._marshal.parse(data):
                    if msg.get_attr("IFLA_IFNAME") != self.bridge:
                        continue
                    if msg["header"]["type"] == RTM_DELLINK:
                        gone, back = True, False
                    elif msg["header"]["type"] == RTM_NEWLINK:
                        back = True
                if gone and not back:
                    self.on_down()
                if back:
                    if await asyncio.to_thread(_reattach_sync, self.name, self.bridge, self.netns):
                        self.on_up()
        finally:
            self.close()
