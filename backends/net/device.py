"""netback: Xen's netif protocol (xen-pv-abi.md §11) between a guest's rings and a tap.

Handshake: the toolstack writes both xenstore directories (frontend device/vif/<n>, backend
/local/domain/0/backend/vif/<domid>/<n>); the backend publishes its features (rx-copy,
sg, gso-tcpv4/tcpv6, ipv6-csum-offload) and moves to InitWait; once the frontend has written
tx-ring-ref, rx-ring-ref and event-channel and moved to Initialised/Connected, the backend
reads what the frontend takes, maps the two ring grants, binds the event channel, creates
the tap (with a virtio_net_hdr on every frame, offloads set to what the frontend takes),
attaches it to the bridge and moves to Connected.

Data path, batched and driven by callbacks (a guest event schedules one pass, a readable tap
runs one): every pass drains the tx ring (guest -> tap, grant copy out of the guest's pages,
checksum and GSO state handed to the kernel in the virtio_net_hdr, the write itself done by
the vif's TapWriter thread so the host's receive path does not stop the loop) and then up to RX_BATCH
tap frames into posted rx buffers (several per GSO frame, as Linux netback lays them out),
and pushes responses with one event per pass under the event-index rules. A frame finding too
few rx requests waits and the tap is not read meanwhile (flow control). Everything the guest
writes is untrusted: a bad grant, an offset+size beyond the page, an oversized packet, a bad
GSO extra or insane ring indices get an error response and a counter (or disconnect the
vif), never an exception into the loop.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import ipaddress
import logging
import os
import random
import select
import struct
import sys
import time
from typing import TYPE_CHECKING

from aiovmm import grants
from aiovmm.memory import mb
from aiovmm.ratelimit import Limit, Limiter, Throttle, parse_vif_rate
from aiovmm.ring import DRAIN_ON_YIELD, BackRing, YieldDrained, hook_yield_drain
from aiovmm.xenbus import Watch, is_online, XenbusState, read_state, read_str, serve_until, write_keys
from aiovmm.xenstore.core import XsError

from . import tap as taplib
from .writer import TapWriter

if TYPE_CHECKING:
    from aiovmm.domain import Domain

log = logging.getLogger("aiovmm.backends.net")

RING_SIZE = 256
TX_SLOT, RX_SLOT = 12, 8
PAGE = 4096
NETTXF_csum_blank, NETTXF_data_validated, NETTXF_more_data, NETTXF_extra_info = 1, 1 << 1, 1 << 2, 1 << 3
NETRXF_data_validated, NETRXF_csum_blank, NETRXF_more_data, NETRXF_extra_info = 1, 1 << 1, 1 << 2, 1 << 3
NETIF_RSP_DROPPED, NETIF_RSP_ERROR, NETIF_RSP_OKAY, NETIF_RSP_NULL = -2, -1, 0, 1
XEN_NETIF_EXTRA_FLAG_MORE = 1
XEN_NETIF_EXTRA_TYPE_GSO = 1
XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6 = 1, 2
# The smallest GSO size taken on tx: Linux's TCP never sends an MSS below 48 (the clamp in
# tcp_mtu_to_mss, tcp_min_snd_mss since 5.2). Linux netback refuses only 0; but the host
# kernel segments a GSO frame in software for every port without TSO on its way (a tap whose
# frontend takes no GSO, a NIC, the route out), and 64 KiB at gso_size 1 is 64,000 segments:
# bench/net_gso_size.py measured 180-290 ms of host CPU per such frame (5,000-12,000x a
# 1448 one; 0.6 ms, 26x, at 48), inside the tap write.
GSO_MIN_SIZE = 48
MAX_PACKET = 0xFFFF
MAX_SLOTS = 18                 # XEN_NETIF_NR_SLOTS_MIN: the most slots a packet may use here
MAX_FRAME = 1514 + 4
RX_BATCH = 64
# A frame that has waited this long for rx requests (a frontend that posts none, or too few)
# ends the waiting: from then on, until the frontend takes a frame again, what the tap holds
# for it is read and dropped rather than left queued in the host kernel (up to the tap's
# qlen of 64 KiB GSO frames, ~65 MB, for as long as the guest likes). Linux netback's
# rx_drain_timeout_msecs (10 s): packets for a guest ring that stays full are dropped.
RX_DRAIN_S = 10.0
_TXREQ = struct.Struct("<IHHHH")       # gref offset flags id size
_TXRSP = struct.Struct("<Hh")          # id status
_RXREQ = struct.Struct("<H2xI")        # id gref
_RXRSP = struct.Struct("<HHHh")        # id offset flags status
_S16 = struct.Struct("<h")
_EXTRA_GSO = struct.Struct("<BBHB")             # netif_extra_info: type flags gso.size gso.type
_EXTRA_GSO_RSP = struct.Struct("<BBHBBH")       # ... gso.pad gso.features (an 8-byte rx slot)

# The tap's virtio_net_hdr (linux/virtio_net.h), in front of every frame both ways.
_VNET = struct.Struct("<BBHHHH")       # flags gso_type hdr_len gso_size csum_start csum_offset
VNET_HDR_LEN = _VNET.size
VNET_F_NEEDS_CSUM, VNET_F_DATA_VALID = 1, 2
VNET_GSO_TCPV4, VNET_GSO_TCPV6, VNET_GSO_ECN = 1, 4, 0x80
_GSO_TO_VNET = {XEN_NETIF_GSO_TYPE_TCPV4: VNET_GSO_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6: VNET_GSO_TCPV6}
_VNET_TO_GSO = {v: k for k, v in _GSO_TO_VNET.items()}
_GSO_FAMILY = {XEN_NETIF_GSO_TYPE_TCPV4: 4, XEN_NETIF_GSO_TYPE_TCPV6: 6}
_CSUM_FIELD = {6: 16, 17: 6}           # offset of the checksum in a TCP / UDP header
RX_BUF = VNET_HDR_LEN + 14 + 4 + 65535  # the largest frame a tap hands over (GSO, one VLAN tag)
HELD_MAX = 4096          # migration: frames for the guest carried to its new host, per vif,
HELD_BYTES = 4 << 20     # and their bytes (bulk TCP beyond that is the peers' to resend)
# Copies kept of the frames put on the rx ring that the frontend may not have read yet (its
# rsp_event says which), for a migration to take back (Netback._unread_rx): at most this
# many bytes, the oldest dropped first (a frontend that never reads costs no more).
RX_UNREAD_BYTES = 256 << 10
# AIOVMM_NET_RX_KEEP=0: no copies of unread rx frames (bench/net.py's A/B of their cost only;
# a migration then forwards none of them).
RX_KEEP = os.environ.get("AIOVMM_NET_RX_KEEP", "1") != "0"
# The most rx requests a frame can take, one per page and one for a GSO extra, is within
# what a packet may use: _rx_slots_needed relies on it (a static fact of these constants).
assert (RX_BUF - VNET_HDR_LEN + 4095) // 4096 + 1 <= MAX_SLOTS


def _csum16(data: bytes | bytearray, initial: int = 0) -> int:
    """The Internet checksum's folded one's-complement sum (RFC 1071), not inverted. Summed
    as native 16-bit words: the one's-complement sum is byte-order independent up to one
    final swap."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    total = sum(memoryview(data).cast("H")) + initial
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def l4_header(frame: bytes | bytearray, base: int = 0) -> tuple[int, int, int] | None:
    """(IP version, offset of the TCP/UDP header, protocol) of the Ethernet frame at `base`
    (one optional 802.1Q tag), or None when it is no unfragmented IPv4 or IPv6 TCP/UDP
    packet whose headers are all there: what a partial checksum or GSO needs to be found
    (Linux netback's skb_checksum_setup; IPv6 extension headers are not followed)."""
    size = len(frame)
    off = base + 14
    if size < off:
        return None
    ethertype = (frame[base + 12] << 8) | frame[base + 13]
    if ethertype == 0x8100 and size >= base + 18:
        ethertype, off = (frame[base + 16] << 8) | frame[base + 17], base + 18
    if ethertype == 0x0800:
        if size < off + 20 or frame[off] >> 4 != 4:
            return None
        ihl = (frame[off] & 0x0F) * 4
        total = (frame[off + 2] << 8) | frame[off + 3]
        if ihl < 20 or total < ihl or off + total > size or ((frame[off + 6] << 8) | frame[off + 7]) & 0x3FFF:
            return None
        family, l4, proto = 4, off + ihl, frame[off + 9]
    elif ethertype == 0x86DD:
        if size < off + 40 or frame[off] >> 4 != 6:
            return None
        family, l4, proto = 6, off + 40, frame[off + 6]
    else:
        return None
    if proto == 6:
        if size < l4 + 20 or size < l4 + ((frame[l4 + 12] >> 4) << 2):
            return None
    elif proto != 17 or size < l4 + 8:
        return None
    return family, l4, proto


def _is_tcp(frame: bytes | bytearray, base: int) -> bool:
    """A TCP segment (IPv4 or IPv6, one optional VLAN tag)?"""
    h = l4_header(frame, base)
    return h is not None and h[2] == 6


def set_pseudo_sum(frame: bytearray, base: int, family: int, l4: int, proto: int) -> None:
    """Store the pseudo-header sum (not inverted) in the L4 checksum field, as a partial
    checksum expects it (Linux's skb_checksum_setup with recalculation)."""
    ip = base + 14 if frame[base + 12:base + 14] != b"\x81\x00" else base + 18
    seg_len = len(frame) - l4
    if family == 4:
        addrs = frame[ip + 12:ip + 20]
    else:
        addrs = frame[ip + 8:ip + 40]
    s = _csum16(bytes(addrs) + bytes((0, proto)) + seg_len.to_bytes(2, "big"))
    if sys.byteorder == "little":
        s = ((s & 0xFF) << 8) | (s >> 8)
    field = l4 + _CSUM_FIELD[proto]
    frame[field:field + 2] = s.to_bytes(2, "big")


def random_mac() -> str:
    """A locally administered address in Xen's OUI (00:16:3e), as xl generates."""
    return "00:16:3e:%02x:%02x:%02x" % (random.randint(0, 0x7F), random.randint(0, 255), random.randint(0, 255))


MAX_VIF_IPS = 8      # xl `ip=` entries per vif: the announce holds 8 addresses per family


@dataclasses.dataclass
class VifConfig:
    """One vif, in xl's terms: `vif = ['mac=...,bridge=...']`."""
    mac: str = ""
    bridge: str | None = None
    netns: str | None = None        # namespace of the bridge (the tap is created there)
    ifname: str | None = None       # default: vif<domid>.<devid>
    mtu: int = 1500
    rate: Limit | None = None       # xl `rate=10Mb/s@20ms`: token bucket on tx and rx
    # xl `ip=`: the guest's addresses (space-separated; a prefix covers a network). Xen's
    # vif scripts let only these source addresses out (vif-common.sh handle_iptable);
    # here they bound what the migration announce may claim for the guest.
    ip: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> "VifConfig":
        """Parse xl syntax: 'mac=00:16:3e:01:02:03,bridge=br0[,mtu=1500][,netns=ns][,vifname=tap0][,rate=10Mb/s@20ms][,ip=198.18.0.2 2001:db8::2]'."""
        cfg = cls()
        for item in filter(None, (x.strip() for x in spec.split(","))):
            key, _, val = item.partition("=")
            if key == "mac":
                parts = val.split(":")
                if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
                    raise ValueError(f"bad mac {val!r}")
                if int(parts[0], 16) & 1:
                    raise ValueError(f"mac {val} is a multicast address")
                cfg.mac = val.lower()
            elif key == "bridge":
                cfg.bridge = val
            elif key == "netns":
                cfg.netns = val
            elif key == "vifname":
                cfg.ifname = val
            elif key == "rate":
                cfg.rate = parse_vif_rate(val)
            elif key == "ip":
                try:
                    cfg.ip = tuple(ipaddress.ip_network(a, strict=False) for a in val.split())
                except ValueError:
                    raise ValueError(f"bad ip {val!r}") from None
                if len(cfg.ip) > MAX_VIF_IPS:
                    # every frame netback learns from is checked against each of them
                    raise ValueError(f"ip: {len(cfg.ip)} addresses (at most {MAX_VIF_IPS})")
            elif key == "mtu":
                try:
                    cfg.mtu = int(val)
                except ValueError:
                    raise ValueError(f"bad mtu {val!r}") from None
                if not 68 <= cfg.mtu <= 4096 - 18:
                    raise ValueError(f"mtu {cfg.mtu} outside 68..4078 (a frame must fit one page)")
            else:
                raise ValueError(f"unknown vif option {key!r}")
        return cfg


class _Kick:
    """What HostPort.link calls `set()` on: here a plain callback instead of an asyncio
    Event, so a guest notification schedules netback's pass without waking a task."""
    __slots__ = ("set",)

    def __init__(self, fn) -> None:
        self.set = fn


class InlineKick(enum.IntEnum):
    """What netback does inside the guest's notify hypercall (Netback.inline_kick; issue 14,
    measured on the KVM engine with bench/net_exits.py, docs/design.md). OFF: schedule one
    pass on the loop. FULL: the whole pass there. DEFER_TX_EVENT: the whole
    pass, but an event that only announces tx completions waits for the next pass on the
    loop, which asks the ring again (Netback._tx_event_owed). TX_ONLY: only the guest's tx
    reaches the tap there (its event deferred the same way, req_event not re-armed); rx and
    every event on the loop. PREEMPT: the pass on the loop, and the notifying vCPU's slice
    ends at once. LONE, the default: TX_ONLY for a lone small packet (a request/response
    with nothing else in flight), OFF otherwise. Inline rx (FULL, DEFER_TX_EVENT) made TCP a
    per-segment ping-pong; TX_ONLY and LONE halve the events and cut a third of the exits
    per UDP round trip (W=1) but lose the loop's batching with 32 requests in flight.
    All of them act on notifications: with the drain at slice ends (drain_on_yield, the
    default) netfront does not notify, so they apply only with it off."""
    OFF = 0
    FULL = 1
    DEFER_TX_EVENT = 2
    TX_ONLY = 3
    PREEMPT = 4
    LONE = 5


LONE_MAX = 256           # the largest tx request LONE sends from inside the notify (bytes)
# A tx-only event for small packets waits (Netback._defer_tx_event) at most this long for an
# rx event to ride on, and only while at most TX_DEFER_MAX responses are unreaped.
TX_EVENT_DEFER_S = 0.004
TX_DEFER_MAX = 32
TX_EVENT_DEFER = os.environ.get("AIOVMM_NET_TX_DEFER", "1") != "0"


VIF_MIN_BURST = 131072            # Linux netback's smallest credit burst (bytes)


class VifDisconnect(Exception):
    """This vif stops (frontend closed or misbehaved); the domain carries on."""


class FrontendClosed(VifDisconnect):
    """The frontend closed: the vif may be reconnected."""


@dataclasses.dataclass
class NetStats:
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_errors: int = 0            # malformed tx requests answered with NETIF_RSP_ERROR
    tx_dropped: int = 0           # tap would block or refused the frame
    rx_dropped: int = 0           # no rx buffer posted / bad rx grant
    events_sent: int = 0
    bad_indices: int = 0
    tx_gso: int = 0               # guest -> tap packets handed over as GSO (TSO) frames
    rx_gso: int = 0               # tap -> guest GSO packets (with a GSO extra)
    rx_waits: int = 0             # a frame waited for rx requests (flow control, not a drop)
    inline_passes: int = 0        # passes run inside the guest's notify (InlineKick)
    tx_events_deferred: int = 0   # tx-only events held for an rx event (_defer_tx_event)
    yield_passes: int = 0         # passes run at the domain's slice ends (Domain.yield_drains)


async def _close_off_loop(fd: int) -> None:
    """Close `fd` in a worker thread (a tap's close waits an RCU grace period, 15-20 ms),
    exactly once even if the wait is cancelled: the job takes the fd from a box, and the
    loop closes it itself only if the job never took it (a queued job the cancel dropped)."""
    box = [fd]

    def close_once() -> None:
        try:
            f = box.pop()
        except IndexError:
            return
        os.close(f)
    try:
        await asyncio.to_thread(close_once)
    except asyncio.CancelledError:
        close_once()
        raise


class Netback(YieldDrained):
    def __init__(self, dom: "Domain", devid: int, cfg: VifConfig, ifname_prefix: str = "vif") -> None:
        self.dom = dom
        self.devid = devid
        self.cfg = cfg
        self.mac = cfg.mac or random_mac()
        self.ifname = cfg.ifname or f"{ifname_prefix}{dom.domid}.{devid}"
        self.front = f"/local/domain/{dom.domid}/device/vif/{devid}"
        self.back = f"/local/domain/0/backend/vif/{dom.domid}/{devid}"
        self.stats = NetStats()
        self.fd: int | None = None
        self.tx: BackRing | None = None
        self.rx: BackRing | None = None
        self.port = None
        self._maps: list = []
        self._tap_ready = False
        self._reader_on = False
        self._handle: asyncio.Handle | None = None      # a scheduled _poll
        self.inline_kick = InlineKick.LONE               # _on_guest_event
        # Take tx (and rx buffers a waiting frame needs) at the domain's slice ends
        # (Domain.yield_drains) instead of asking for a notification (ring.more_requests).
        self.drain_on_yield = DRAIN_ON_YIELD
        self._yield_fn = self._on_yield                 # the one bound method registered
        self.defer_tx_events = TX_EVENT_DEFER               # _defer_tx_event on/off
        self.batch_tx = True                # frames to the writer once per pass (A/B: False)
        self._tx_no_defer = False           # a packet above LONE_MAX, GSO or TCP answered
                                            # since the last event (_defer_tx_event)
        self._tx_timer: asyncio.TimerHandle | None = None   # a deferred tx event's bound
        self._tx_owed_from: int | None = None           # rsp_prod before tx responses whose
                                                        # event an inline pass deferred
        self._stop: asyncio.Future | None = None        # the data path failed (VifDisconnect)
        self._stalled = 0
        self._rx_buf = bytearray(RX_BUF)                # a tap frame waiting for rx requests
        self._rx_view = memoryview(self._rx_buf)
        self._rx_len = 0                                # its length with the header, 0: none
        self._rx_throttled = False
        self._rx_drain_timer: asyncio.TimerHandle | None = None   # RX_DRAIN_S since a frame waits
        self._rx_draining = False                       # the frontend let a frame wait that long
        self._last_rx_frames = 0                        # frames the last rx pass delivered
        self._tap_poll = select.poll()                  # LONE: is a frame queued in the tap?
        # What the frontend said it takes (read at connect): multi-slot rx packets, GSO
        # types on rx, partial checksums on rx.
        self.sg_rx = False
        self.gso_rx: frozenset[int] = frozenset()
        self.csum_rx = False
        self._offload = taplib.TunOffload(0)
        self._bridge_watch: taplib.BridgeWatch | None = None
        self.connected = asyncio.Event()
        # Token buckets (aiovmm/ratelimit.py): one per direction, both at the vif's rate.
        self.tx_limit = Limiter(cfg.rate, VIF_MIN_BURST)
        self.rx_limit = Limiter(cfg.rate, VIF_MIN_BURST)
        self._tx_throttled = False
        self._writer: TapWriter | None = None       # guest -> tap writes (while serving)
        self._spare: tuple[int, TapWriter] | None = None   # (fd, writer) made ahead (start_writer)
        self._tx_backlogged = False                 # the writer's backlog is full
        self.throttle = Throttle(self._schedule)   # one wake-up for both directions
        # IPv4 addresses the guest claimed as its own on this vif (ARP sender), for the
        # announce on a new host (aiovmm/migration/devices.py); bounded (learn_ipv4).
        self.ipv4: list[str] = []
        self.ipv6: list[str] = []              # the same for IPv6 (neighbour discovery)
        self._mac_bytes = bytes.fromhex(self.mac.replace(":", ""))
        self.announce_schedule = None          # set on a migrated-in vif: announce at start
        self.announced = 0                     # frames of that announce sent
        self.announce_t0: float | None = None  # perf_counter of its first frame
        self._round0: float | bool = False     # loop time announce_first() sent round 0
        self._frames: list[bytes] | None = None
        self.held = False                      # migration: frames stay in the tap (hold)
        # (first rx response index, frame) of the frames put on the rx ring that the
        # frontend may not have read (RX_UNREAD_BYTES at most); at the hold those it never
        # read (`_unread_rx`), which `forward` sends on.
        self._rx_recent: collections.deque[tuple[int, bytes]] = collections.deque()
        self._rx_recent_bytes = 0
        self._reclaimed: list[bytes] = []
        # Migration, destination: frames that waited for the guest on its old host (put_rx),
        # delivered before anything in the tap.
        self._rx_carried: collections.deque[bytes] = collections.deque()
        self._attach_lock = asyncio.Lock()

    # -- toolstack ------------------------------------------------------------------------------
    def publish(self) -> None:
        """Write both device directories (libxl's part), states Initialising."""
        st = self.dom.hypervisor.xenstore.store
        d = self.dom.domid
        write_keys(st, self.front, {
            "backend": self.back, "backend-id": "0", "state": str(int(XenbusState.Initialising)),
            "handle": str(self.devid), "mac": self.mac, "mtu": str(self.cfg.mtu),
        }, [f"n{d}", "r0"])
        write_keys(st, self.back, {
            "frontend": self.front, "frontend-id": str(d), "online": "1",
            "state": str(int(XenbusState.Initialising)), "handle": str(self.devid), "mac": self.mac,
            "bridge": self.cfg.bridge or "", "type": "vif", "script": "",
        }, ["n0", f"r{d}"])

    def _set_state(self, s: XenbusState) -> None:
        self.dom.hypervisor.xenstore.store.write(f"{self.back}/state", str(int(s)))

    # -- lifecycle --------------------------------------------------------------------------------
    async def run(self) -> None:
        """The vif's whole life (`_run`); a vif that arrived with a migrated or restored
        guest first announces the guest on this host (tap attached before the frontend
        reconnects: the announce does not depend on the guest)."""
        if self.announce_schedule is None:
            return await self._run()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._announce())
            await self._run()

    def _announce_send(self, frame: bytes) -> None:
        if self.fd is None:
            raise OSError("tap closed")
        if self.announce_t0 is None:
            self.announce_t0 = time.perf_counter()
            log.debug("d%d: vif %d: first announce frame", self.dom.domid, self.devid)
        os.write(self.fd, bytes(VNET_HDR_LEN) + frame)   # the tap takes a virtio_net_hdr first
        self.announced += 1

    def announce_frames(self) -> list[bytes]:
        """One round's frames (built once, with scapy: not in the middle of a hand-over)."""
        if self._frames is None:
            from aiovmm.migration.announce import frames
            self._frames = frames(self.mac, list(self.ipv4), list(self.ipv6))
        return self._frames

    def announce_first(self) -> None:
        """Round 0 of the announce now, from the caller (the tap must be open: the
        migration receiver prepared it); `_announce` sends the rest on the schedule."""
        from aiovmm.migration.announce import send_round
        if self.fd is not None and self.announce_schedule is not None and not self._round0:
            self._round0 = asyncio.get_running_loop().time()
            send_round(self._announce_send, self.mac, tag=f"d{self.dom.domid}: vif {self.devid}: ",
                       round_frames=self.announce_frames())

    async def _announce(self) -> None:
        from aiovmm.migration.announce import announce
        try:
            await self.open_and_attach()
        except taplib.TapError as e:
            log.warning("d%d: vif %d: no announce: %s", self.dom.domid, self.devid, e)
            return
        await announce(self._announce_send, self.mac, list(self.ipv4), list(self.ipv6), schedule=self.announce_schedule,
                       tag=f"d{self.dom.domid}: vif {self.devid}: ", first_sent=self._round0,
                       round_frames=self.announce_frames())

    async def open_and_attach(self) -> None:
        """Create the tap and put it on the bridge (once; the bridge watch with it)."""
        async with self._attach_lock:
            if self.fd is not None:
                return
            await self._open_tap()
            if self.cfg.bridge:
                # Subscribed before the first attach: a bridge recreated in between is seen.
                self._bridge_watch = taplib.BridgeWatch(self.ifname, self.cfg.bridge, self.cfg.netns,
                                                        self._bridge_down, self._bridge_up)
                await self._bridge_watch.open()
            await taplib.attach(self.ifname, self.cfg.bridge, self.cfg.netns, mtu=self.cfg.mtu)

    def hold(self, on: bool) -> None:
        """Migration: while the guest is suspended, frames for it stay in the tap's queue
        instead of going into rx buffers the new side will not see (`forward` sends them
        on after the hand-over); released again if the migration is called off."""
        self.held = on
        self._reclaimed = self._unread_rx() if on else []
        if not on:
            self._tap_ready = True
            self._schedule()

    def _unread_rx(self) -> list[bytes]:
        """The frames on the rx ring the suspended guest has not read: they were put there
        after its last poll (between it and the SCHEDOP_shutdown, e.g. while its freezer
        ran), and a guest resumed in a new domain starts with empty rings (netfront_resume),
        so on Xen they are lost. The frontend's rsp_event, set by its final check
        (RING_FINAL_CHECK_FOR_RESPONSES) to one past the last response it read, is read
        once; a value no frontend could have left (more than a ring behind netback's
        responses) reclaims nothing."""
        rx, recent = self.rx, self._rx_recent
        self._rx_recent = collections.deque()
        self._rx_recent_bytes = 0
        if rx is None or not recent:
            return []
        seen = (rx.get(12) - 1) & 0xFFFFFFFF
        behind = (rx.rsp_prod_pvt - seen) & 0xFFFFFFFF
        if behind > rx.nr_ents:
            log.debug("d%d: vif %d: rx rsp_event %#x not within a ring of %#x: nothing reclaimed",
                      self.dom.domid, self.devid, seen + 1, rx.rsp_prod_pvt)
            return []
        unread = [f for idx, f in recent if ((idx - seen) & 0xFFFFFFFF) < behind]
        if unread:
            log.info("d%d: vif %d: %d frames on the rx ring not read before the suspend: kept",
                     self.dom.domid, self.devid, len(unread))
        return unread

    def take_held(self) -> list[bytes]:
        """After the hand-over: the unicast frames for the guest that waited here, oldest
        first, each with its virtio_net_hdr (IFF_VNET_HDR) as the tap gave it: those the
        guest left unread on its rx ring, one already read and waiting for rx requests,
        then the tap's queue (at most HELD_MAX frames and HELD_BYTES in all, the tap read
        at most HELD_MAX times). Broadcasts are dropped (already flooded everywhere)."""
        if self.fd is None:
            return []
        mac = bytes.fromhex(self.mac.replace(":", ""))
        waiting = collections.deque(self._reclaimed)
        self._reclaimed = []
        if self._rx_len:
            waiting.append(bytes(self._rx_buf[:self._rx_len]))
        self._rx_len = 0
        out: list[bytes] = []
        size = 0
        for _ in range(HELD_MAX + len(waiting)):
            if waiting:
                frame = waiting.popleft()
            else:
                try:
                    frame = os.read(self.fd, RX_BUF)
                except OSError:                  # BlockingIOError: the queue is empty
                    break
            if frame[VNET_HDR_LEN:VNET_HDR_LEN + 6] == mac:
                if len(out) >= HELD_MAX or size + len(frame) > HELD_BYTES:
                    break
                out.append(frame)
                size += len(frame)
        return out

    def forward(self) -> int:
        """The held frames (take_held) written back into the bridge, which by now has
        learnt the guest's MAC behind its uplink (the destination's announce reached it
        through the switch), so they reach the guest on its new host. For frames that
        reach the tap after the migration connection is gone: the others travel on it
        (live.py), because a frame written back here teaches the switches the sender's
        MAC on this host until that sender's next frame. Returns the frames sent on."""
        n = 0
        for frame in self.take_held():
            try:
                os.write(self.fd, frame)
                n += 1
            except OSError:
                break
        if n:
            log.info("d%d: vif %d: %d frames sent on to the guest's new host", self.dom.domid,
                     self.devid, n)
        return n

    def put_rx(self, frames: list[bytes]) -> int:
        """Migration, destination: frames that waited for the guest on its old host
        (the source's take_held, carried on the migration connection), given to the guest
        before anything its tap holds (they are older) once its frontend is connected.
        Each is checked once: a virtio_net_hdr and an Ethernet frame for this vif's MAC
        within RX_BUF bytes (its GSO type is checked at delivery, as a tap frame's); at
        most HELD_MAX frames and HELD_BYTES are kept. Returns the number kept."""
        mac = bytes.fromhex(self.mac.replace(":", ""))
        n = 0
        size = sum(len(f) for f in self._rx_carried)
        for f in frames:
            f = bytes(f)
            if len(self._rx_carried) >= HELD_MAX or size + len(f) > HELD_BYTES:
                break
            if VNET_HDR_LEN + 14 <= len(f) <= RX_BUF and f[VNET_HDR_LEN:VNET_HDR_LEN + 6] == mac:
                self._rx_carried.append(f)
                size += len(f)
                n += 1
        if n:
            self._schedule()
        return n

    def learn_ipv4(self, frame: bytes | bytearray) -> None:
        """Note an IPv4 address the guest claims as its own: the sender of an ARP (request
        or reply) it sends from the vif's MAC. Not an IPv4 packet's source: a guest that
        routes or bridges for others sends their packets (from its MAC or theirs), and an
        announce of those would draw their traffic to this guest on the new host."""
        if len(frame) < 42 or frame[12:14] != b"\x08\x06":
            return
        if frame[14:20] != b"\x00\x01\x08\x00\x06\x04" or frame[20:22] not in (b"\x00\x01", b"\x00\x02"):
            return
        if frame[6:12] != self._mac_bytes or frame[22:28] != self._mac_bytes:
            return
        self._learn(self.ipv4, ipaddress.IPv4Address(bytes(frame[28:32])))

    def learn_ipv6(self, frame: bytes | bytearray) -> None:
        """Note an IPv6 address the guest claims as its own: the source of a neighbour
        discovery message (router/neighbour solicitation, router advertisement) or the
        target of a neighbour advertisement, sent from the vif's MAC with hop limit 255
        (RFC 4861: never forwarded, so never another host's). DAD's unspecified source
        is not an address."""
        if len(frame) < 62 or frame[12:14] != b"\x86\xdd" or frame[14] >> 4 != 6:   # RS: 8 bytes of ICMPv6
            return
        if frame[6:12] != self._mac_bytes or frame[20] != 58 or frame[21] != 255:
            return
        icmp = frame[54]
        if icmp == 136 and len(frame) >= 78:                     # NA: its target
            a = bytes(frame[62:78])
        elif icmp in (133, 134, 135):                            # RS, RA, NS: the source
            a = bytes(frame[22:38])
        else:
            return
        self._learn(self.ipv6, ipaddress.IPv6Address(a))

    def _learn(self, known: list[str], ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        """The one rule for an address the announce may claim for this guest: a unicast
        address (not unspecified, loopback, multicast, broadcast/reserved, 0.0.0.0/8,
        IPv4-mapped) and, when xl's `ip=` is set, one of those; at most 8 per family (the
        tx path stops calling the learners then). Learnt from the guest's frames and taken
        from a migration stream's header alike (adopt)."""
        if ip.is_loopback or ip.is_multicast or ip.is_reserved:     # IPv6 :: and ::ffff:0:0/96
            return                                                   # are in ::/8, reserved
        if ip.version == 4 and ip.packed[0] == 0:                    # 0.0.0.0/8
            return
        if self.cfg.ip and not any(ip in net for net in self.cfg.ip if net.version == ip.version):
            return
        a = str(ip)
        if a not in known and len(known) < 8:
            known.append(a)

    def adopt(self, ipv4: list[str], ipv6: list[str]) -> None:
        """The addresses a migration stream's header carries for this vif, through the
        same rule as learnt ones (the stream comes from a peer the host does not trust)."""
        for a in ipv4:
            self._learn(self.ipv4, ipaddress.IPv4Address(a))
        for a in ipv6:
            self._learn(self.ipv6, ipaddress.IPv6Address(a))

    async def _run(self) -> None:
        """The vif's whole life; runs in the domain's TaskGroup until cancelled.

        As Linux netback (xenbus.c frontend_changed / set_backend_state): the backend waits
        in InitWait; the frontend's Initialised or Connected connects it; the frontend's
        Closing disconnects the data path (backend Closing), its Closed is answered Closed,
        and a frontend starting over (Initialising, e.g. xen-netfront reloaded) finds the
        backend in InitWait again. The tap lives as long as the vif (Linux keeps the vif
        netdev across reconnects); a frontend that breaks the protocol is disconnected for
        good."""
        st = self.dom.hypervisor.xenstore.store
        # What Linux netback offers (xenbus.c netback_probe), less multicast control, hashing,
        # split event channels and several queues: packets of several slots and TSO both
        # ways, checksum offload for IPv6 too (IPv4's is implied by the protocol).
        for key, val in (("feature-rx-copy", "1"), ("feature-rx-flip", "0"), ("feature-sg", "1"),
                         ("feature-gso-tcpv4", "1"), ("feature-gso-tcpv6", "1"),
                         ("feature-ipv6-csum-offload", "1")):
            st.write(f"{self.back}/{key}", val)
        watch = Watch(st, f"{self.front}/state", token=f"vif{self.dom.domid}.{self.devid}")
        try:
            while True:
                self._set_state(XenbusState.InitWait)
                while read_state(st, self.front) not in (XenbusState.Initialised, XenbusState.Connected):
                    await watch.next()
                self._connect()
                if self._bridge_watch is not None and self._bridge_watch.sock is None:
                    # Reconnecting: the watch's socket went with the last connection's task;
                    # subscribe again, then attach (a bridge recreated meanwhile is seen).
                    await self._bridge_watch.open()
                    await taplib.attach(self.ifname, self.cfg.bridge, self.cfg.netns, mtu=self.cfg.mtu)
                await self.open_and_attach()
                self._set_state(XenbusState.Connected)
                self.connected.set()
                log.info("d%d: vif %d connected: %s mac %s%s", self.dom.domid, self.devid, self.ifname,
                         self.mac, f" on bridge {self.cfg.bridge}" if self.cfg.bridge else "")
                phase = [self._serve(), self._watch_front(watch)]
                if self._bridge_watch is not None:
                    phase.append(self._bridge_watch.run())
                why = await serve_until(VifDisconnect, *phase)
                gone: VifDisconnect | None = why[0] if why else None
                self._disconnect()
                if not isinstance(gone, FrontendClosed):
                    log.info("d%d: vif %d disconnected: %s", self.dom.domid, self.devid, gone)
                    return
                log.info("d%d: vif %d: frontend closed; waiting for it to reconnect", self.dom.domid, self.devid)
                while read_state(st, self.front) not in (XenbusState.Closed, XenbusState.Unknown,
                                                         XenbusState.Initialising, XenbusState.InitWait):
                    await watch.next()
                self._set_state(XenbusState.Closed)
                if not is_online(st, self.back):
                    return                       # being detached: no reconnect (Linux netback)
                while read_state(st, self.front) not in (XenbusState.Initialising, XenbusState.InitWait):
                    await watch.next()
        finally:
            watch.close()
            if self._bridge_watch is not None:
                self._bridge_watch.close()
            spare = self._spare
            fd = self._release_tap()
            try:
                if spare is not None:
                    await spare[1].aclose()     # its fd too is closed before the tap's
            finally:
                # The tap's fd is no one else's now: closed whatever cancels this task
                # meanwhile (a second cancel here left it, and the tap's netdev, open).
                if fd is not None:
                    await _close_off_loop(fd)

    def _bridge_down(self) -> None:
        log.warning("d%d: vif %d down: bridge %s%s is gone; %s is re-attached when it is back",
                    self.dom.domid, self.devid, self.cfg.bridge,
                    f" (netns {self.cfg.netns})" if self.cfg.netns else "", self.ifname)

    def _bridge_up(self) -> None:
        log.warning("d%d: vif %d up: %s re-attached to bridge %s", self.dom.domid, self.devid,
                    self.ifname, self.cfg.bridge)

    async def _open_tap(self) -> None:
        """Create the tap (in a worker thread: it may enter the vif's network namespace)."""
        try:
            self.fd = await asyncio.to_thread(taplib.open_tap, self.ifname, self.cfg.netns, True)
        except taplib.TapBusy:
            if self.cfg.ifname:
                raise
            # Another hypervisor process on this host has its own d<domid>: Xen's name is
            # taken, so add this process's id (still within IFNAMSIZ).
            self.ifname = f"{self.ifname}-{os.getpid() % 100000}"[:15]
            self.fd = await asyncio.to_thread(taplib.open_tap, self.ifname, self.cfg.netns, True)
        taplib.set_offload(self.fd, self._offload)
        self._tap_poll.register(self.fd, select.POLLIN)
        self.dom.hypervisor.xenstore.store.write(f"{self.back}/vifname", self.ifname)

    async def _watch_front(self, watch: Watch) -> None:
        st = self.dom.hypervisor.xenstore.store
        while True:
            await watch.next()
            if read_state(st, self.front) in (XenbusState.Closing, XenbusState.Closed, XenbusState.Unknown):
                self._set_state(XenbusState.Closing)
                raise FrontendClosed("frontend closed")

    def _connect(self) -> None:
        st = self.dom.hypervisor.xenstore.store
        try:
            tx_ref = int(read_str(st, f"{self.front}/tx-ring-ref", ""))
            rx_ref = int(read_str(st, f"{self.front}/rx-ring-ref", ""))
            evtchn = int(read_str(st, f"{self.front}/event-channel", ""))
        except ValueError:
            raise taplib.TapError(f"d{self.dom.domid}: vif {self.devid}: frontend keys missing or malformed") from None
        if read_str(st, f"{self.front}/request-rx-copy", "0") != "1":
            raise taplib.TapError(f"d{self.dom.domid}: vif {self.devid}: frontend does not request rx-copy")
        txm = grants.host_map(self.dom, tx_ref)
        self._maps.append(txm)
        rxm = grants.host_map(self.dom, rx_ref)
        self._maps.append(rxm)
        self.tx, self.rx = BackRing(txm.view, RING_SIZE, TX_SLOT), BackRing(rxm.view, RING_SIZE, RX_SLOT)
        self._frontend_features()
        self.port = self.dom.hypervisor.host.endpoint_bind(self.dom.domid, evtchn)
        self.port.link(_Kick(self._on_guest_event))
        self._rx_len = 0
        self._tx_owed_from = None
        self._tx_no_defer = False
        hook_yield_drain(self.dom.yield_drains, self._yield_fn, self.drain_on_yield)

    def _frontend_features(self) -> None:
        """Read what the frontend takes on rx and tell the tap (TUNSETOFFLOAD): the kernel
        then hands over partial checksums and TSO frames only if the guest accepts them,
        and completes or segments everything else itself. As Linux netback
        (read_xenbus_vif_flags, xenvif_fix_features): GSO needs scatter-gather; checksum
        offload is on unless feature-no-csum-offload; here it also needs IPv6's
        (feature-ipv6-csum-offload), since the tap's switch covers both."""
        st = self.dom.hypervisor.xenstore.store

        def flag(key: str) -> bool:
            return read_str(st, f"{self.front}/{key}", "0").strip() == "1"

        self.sg_rx = flag("feature-sg")
        self.csum_rx = not flag("feature-no-csum-offload") and flag("feature-ipv6-csum-offload")
        gso = set()
        if self.sg_rx and self.csum_rx:
            if flag("feature-gso-tcpv4"):
                gso.add(XEN_NETIF_GSO_TYPE_TCPV4)
            if flag("feature-gso-tcpv6"):
                gso.add(XEN_NETIF_GSO_TYPE_TCPV6)
        self.gso_rx = frozenset(gso)
        self._offload = taplib.TunOffload(0)
        if self.csum_rx:
            self._offload |= taplib.TunOffload.CSUM
        if XEN_NETIF_GSO_TYPE_TCPV4 in gso:
            self._offload |= taplib.TunOffload.TSO4
        if XEN_NETIF_GSO_TYPE_TCPV6 in gso:
            self._offload |= taplib.TunOffload.TSO6
        if self.fd is not None:
            taplib.set_offload(self.fd, self._offload)
        log.info("d%d: vif %d: frontend takes sg=%d csum=%d gso=%s", self.dom.domid, self.devid,
                 self.sg_rx, self.csum_rx, sorted(gso))

    def _disconnect(self) -> None:
        """Stop the data path (rings, event channel, tap reader); the tap itself stays."""
        hook_yield_drain(self.dom.yield_drains, self._yield_fn, False)
        self.throttle.cancel()                     # a rate limit's pending wake-up
        if self.fd is not None and self._reader_on:
            asyncio.get_event_loop().remove_reader(self.fd)
            self._reader_on = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._cancel_tx_timer()
        self._rx_len = 0                        # a frame read for the old rings is dropped
        self._rx_stall_end()
        self._rx_recent.clear()
        self._rx_recent_bytes = 0
        self.connected.clear()
        if self.port is not None:
            self.port.close()
            self.port = None
        for m in self._maps:
            try:
                m.close()
            except (BufferError, grants.GrantError) as e:   # a view of the page still held
                log.warning("d%d: vif %d: unmapping a ring: %s", self.dom.domid, self.devid, e)
        self._maps.clear()
        self.tx = self.rx = None

    def close(self) -> None:
        fd = self._release_tap()
        if fd is not None:
            os.close(fd)                    # the tap vanishes with its fd

    def _release_tap(self) -> int | None:
        """close() but for the close of the tap's fd, which is returned: the kernel
        unregisters the tap's netdev in it (15-20 ms measured, mostly an RCU grace period),
        which `_run` waits for in a worker thread and not on the loop, where a migrated
        guest's reconnect on the same loop would wait for it."""
        self._disconnect()
        fd, self.fd = self.fd, None
        if self._spare is not None:
            self._spare[1].close()
            self._spare = None
        if fd is not None:
            try:
                self._tap_poll.unregister(fd)
            except KeyError:
                pass
        try:
            self._set_state(XenbusState.Closed)
        except XsError as e:                 # the backend directory went with the domain
            log.debug("d%d: vif %d: state Closed not written: %s", self.dom.domid, self.devid, e)
        return fd

    # -- the data path -----------------------------------------------------------------------------
    # Callbacks, not a task, on the hot path: a guest event schedules one `_poll` with
    # call_soon (deduplicated), a readable tap calls it directly from the loop's reader; the
    # `_serve` task only waits for the vif to stop. Every pass drains the tx ring, delivers
    # up to RX_BATCH tap frames, pushes responses and sends at most one event.
    def _schedule(self) -> None:
        if self._handle is None and self.tx is not None:
            self._handle = asyncio.get_running_loop().call_soon(self._poll)

    def _on_guest_event(self) -> None:
        """The guest notified netback's port. This runs inside the guest's event_channel_op
        send, its vCPU stopped in the hypercall. With `inline_kick` on (InlineKick) the pass
        runs right here: the tx ring reaches the tap (and rx buffers just posted are filled)
        before the vCPU resumes, and an event is delivered on the hypercall's return, instead
        of waiting for the end of the vCPU's slice (on KVM up to 2 ms with the loop blocked
        in KVM_RUN). The pass is bounded (a ring's worth of tx, RX_BATCH frames) as on the
        loop. The default, LONE, runs the tx pass here only for a lone request/response
        (`_lone`): the other modes trade stream throughput for latency."""
        if self.inline_kick in (InlineKick.OFF, InlineKick.PREEMPT) or self._stop is None or self._stop.done() \
                or (self.inline_kick == InlineKick.LONE and not self._lone()):
            self._schedule()                 # (not serving yet: as before, one pass later)
            if self.inline_kick == InlineKick.PREEMPT:
                v = self.dom.hypervisor.scheduler.current
                if v is not None and v.domain is self.dom:
                    v.engine.preempt()
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.stats.inline_passes += 1
        self._poll(inline=True)

    def _rings_connected(self) -> bool:
        return self.tx is not None

    def _pass_soon(self) -> None:
        self._schedule()

    def _on_yield(self) -> None:
        """A vCPU of the domain ended a slice: run the pass now if it published tx requests,
        or rx requests a waiting frame needs (the same pass as a notification's, so the
        same copy-once validation; a pass already scheduled is folded into this one)."""
        tx, rx = self.tx, self.rx
        if tx is None or self._stop is None or self._stop.done():
            return
        if ((tx.get(0) - tx.req_cons) & 0xFFFFFFFF) == 0 and not (
                self._rx_len and ((rx.get(0) - rx.req_cons) & 0xFFFFFFFF) != 0):
            return
        if self._handle is not None:
            self._handle.cancel()
        self.stats.yield_passes += 1
        self._poll()

    def _lone(self) -> bool:
        """LONE's test: one small request on the tx ring and at most one frame delivered by
        the last pass, i.e. a request/response exchange, not a stream or a burst (sending
        those from inside the notify trades the loop's batching for latency: more passes,
        events and exits per packet, measured in docs/design.md). Reads the ring only for
        this guess; the pass copies and validates the request as always."""
        r = self.tx
        if r is None or self.fd is None or self._last_rx_frames > 1 or r.unconsumed() != 1 or self._rx_len:
            return False
        _gref, _off, flags, _id, size = _TXREQ.unpack_from(r.v, r.slot_off(r.req_cons))
        if size > LONE_MAX or flags & (NETTXF_more_data | NETTXF_extra_info):
            return False
        # The guest has taken every rx response (its rsp_event is past them: netfront's
        # final check after its poll) and the tap holds no frame for it: nothing else is
        # in flight towards it.
        rx = self.rx
        if not 0 < ((rx.get(12) - rx.rsp_prod_pvt) & 0xFFFFFFFF) < 0x80000000:
            return False
        return not self._tap_poll.poll(0)

    def _on_tap_readable(self) -> None:
        self._tap_ready = True
        self._poll()

    def _poll(self, inline: bool = False) -> None:
        self._handle = None
        if self.tx is None or self._stop is None or self._stop.done():
            return                           # not serving: _serve's first pass takes it
        try:
            self._pass(inline)
        except VifDisconnect as e:
            self._set_reader(False)
            if not self._stop.done():
                self._stop.set_exception(e)

    def _pass(self, inline: bool = False) -> None:
        tx = self.tx
        before = tx.req_cons
        mode = self.inline_kick if inline else InlineKick.OFF
        if mode == InlineKick.LONE:
            mode = InlineKick.TX_ONLY
        tx_from = tx.rsp_prod_pvt                # netback's own: what it last published
        tx_notify = self._process_tx()
        rx_notify = False if mode == InlineKick.TX_ONLY else self._process_rx()
        if mode == InlineKick.TX_ONLY or (mode == InlineKick.DEFER_TX_EVENT and not rx_notify):
            # Inside the guest's notify, with only tx completions to announce: the event
            # waits for the next pass on the loop, which asks the ring again (_tx_event_owed).
            # Netfront reaps its tx ring right after notifying (xennet_start_xmit calls
            # xennet_tx_buf_gc) and moves rsp_event past what it saw, so a completion it
            # already took costs no event, upcall and iret; one it did not take still gets
            # its event. TX_ONLY also leaves rx to that pass (rx in the hypercall made
            # TCP a per-segment ping-pong, docs/design.md).
            if tx_notify and self._tx_owed_from is None:
                self._tx_owed_from = tx_from
            # Nor is req_event re-armed here: the frontend's next requests stay silent until
            # that pass (final_check) asks again, so a guest streaming tx notifies once per
            # loop pass, as without the inline pass, not once per packet.
            self._schedule()
            if mode == InlineKick.TX_ONLY:
                return
        elif rx_notify:
            self._send_event()
        elif tx_notify or self._tx_owed_from is not None:
            if self._tx_owed_from is None:
                self._tx_owed_from = tx_from
            if tx_notify or self.tx.responses_need_event(self._tx_owed_from):
                if not self._defer_tx_event():
                    self._send_event()
            else:                                # the frontend took them: no event wanted
                self._tx_owed_from = None
                self._tx_no_defer = False
        # The tap is read while no frame waits for rx slots and the rate allows; a frame
        # waiting keeps the rest in the kernel's queue (flow control, nothing dropped here).
        self._set_reader(self._rx_len == 0 and not self._rx_throttled and not self.held)
        if not self._tx_throttled and not self._tx_backlogged and tx.more_requests(self._armed()):
            # Requests published meanwhile are consumed by the next pass; two passes in a
            # row that consume nothing would be a spin on guest state: refuse it.
            self._stalled = self._stalled + 1 if tx.req_cons == before else 0
            if self._stalled > 1:
                self._bad_frontend("requests published but never consumable")
            self._schedule()                 # let others run first
        else:
            self._stalled = 0

    def _send_event(self) -> None:
        """One event for both rings: it announces every response published so far, so
        nothing is owed after it."""
        self._tx_owed_from = None
        self._tx_no_defer = False
        self._cancel_tx_timer()
        self.port.notify()
        self.stats.events_sent += 1

    def _defer_tx_event(self) -> bool:
        """Hold back an event that would announce only tx completions of small non-TCP
        packets (every one since the last event <= LONE_MAX bytes, no GSO, no TCP: TCP
        small queues hold a socket's next segments until its last ones are freed, so a
        stream of small segments would wait for the bound) while few responses are
        unreaped: it rides on the next rx event, or goes when TX_EVENT_DEFER_S has passed
        and the frontend still wants it (_tx_event_due). Netfront needs a tx completion only
        to free the packet (its socket's memory) and to restart a queue it stopped with its
        ring nearly full (NET_TX_RING_SIZE - XEN_NETIF_NR_SLOTS_MIN - 1 slots outstanding,
        far above TX_DEFER_MAX), and it reaps the ring itself on every transmit
        (xennet_start_xmit calls xennet_tx_buf_gc). At W=1 request/response the reply's
        completion otherwise wakes the blocked guest a second time per round trip (upcall,
        iret, block, timer: ~3-4 exits on KVM). rsp_event is the guest's (untrusted): a
        wrong value only moves the event within the bound."""
        r = self.tx
        if self._tx_no_defer or not self.defer_tx_events:
            return False
        unreaped = (r.rsp_prod_pvt - r.get(12) + 1) & 0xFFFFFFFF
        if unreaped > TX_DEFER_MAX:
            return False
        if self._tx_timer is None:
            self._tx_timer = asyncio.get_running_loop().call_later(TX_EVENT_DEFER_S, self._tx_event_due)
        self.stats.tx_events_deferred += 1
        return True

    def _tx_event_due(self) -> None:
        """A deferred tx event's bound passed with no rx event to carry it: send it if the
        frontend has not reaped those responses meanwhile (it then asks again itself)."""
        self._tx_timer = None
        if self.port is None or self.tx is None:
            return
        if self._tx_event_owed():
            self._send_event()
        else:
            self._tx_no_defer = False

    def _cancel_tx_timer(self) -> None:
        if self._tx_timer is not None:
            self._tx_timer.cancel()
            self._tx_timer = None

    def _tx_event_owed(self) -> bool:
        """Do the tx responses published since `_tx_owed_from` still need an event? Xen's
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY test over that whole range, against the
        frontend's rsp_event as it is now: a frontend that consumed them all has moved
        rsp_event beyond and wants none (it asks again on its next final check)."""
        old = self._tx_owed_from
        if old is None:
            return False
        self._tx_owed_from = None
        return self.tx.responses_need_event(old)

    def _set_reader(self, on: bool) -> None:
        if on == self._reader_on or self.fd is None:
            return
        loop = asyncio.get_running_loop()
        if on:
            loop.add_reader(self.fd, self._on_tap_readable)
        else:
            loop.remove_reader(self.fd)
        self._reader_on = on

    async def _serve(self) -> None:
        """Start the callbacks and wait until the data path fails (VifDisconnect) or the
        vif's TaskGroup is cancelled."""
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        self._tap_ready = True
        self._stalled = 0
        self._tx_backlogged = False
        spare, self._spare = self._spare, None
        if spare is not None and spare[0] != self.fd:
            spare[1].close()                      # made for a tap since replaced (idle: ends at once)
            spare = None
        self._writer = spare[1] if spare is not None else \
            TapWriter(self.fd, self.ifname, loop, self._tx_room, self._tx_write_failed)
        try:
            self._poll()
            await self._stop
        finally:
            if not self._stop.done():
                self._stop.cancel()             # no pass from here on (_poll): none writes
            self._set_reader(False)             # past the frames the writer still has queued
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
            w, self._writer = self._writer, None
            await w.aclose()                    # every frame queued is written; the loop runs on

    def start_writer(self) -> None:
        """Make the tap's writer thread now (the tap must be open), for the connection to
        come: a migrated-in vif does this while the stream arrives, because starting a
        thread waits until the new thread has run once, and at the connect, in the
        guest's downtime, that wait was a wait for a core (12 ms measured at load ~10,
        with the loop at real-time priority and the new thread not)."""
        if self.fd is not None and self._spare is None:
            self._spare = (self.fd, TapWriter(self.fd, self.ifname, asyncio.get_running_loop(),
                                              self._tx_room, self._tx_write_failed))

    def writer_threads(self) -> list[int]:
        """The host thread ids of this vif's tap writers (the serving one, one made ahead)."""
        ws = [self._writer, self._spare[1] if self._spare is not None else None]
        return [w.native_id for w in ws if w is not None and w.native_id is not None]

    def take_tx(self) -> None:
        """Migration, the guest suspended: take what it left on the tx ring now (a pass;
        rx is held), before the last copy of its pages."""
        if self.tx is not None and self._stop is not None and not self._stop.done():
            if self._handle is not None:
                self._handle.cancel()
            self._poll()

    async def tx_written(self, timeout: float) -> bool:
        """Wait (at most `timeout`) until the writer has put every frame taken from the
        guest into the tap; False if it has not. The migration source does this before the
        destination announces the guest: a frame of the guest's written after the announce
        teaches the switches its MAC on the old host again (measured at load ~10: the
        guest's last replies went out 40-50 ms after its suspend, the pings that followed
        went to the old host and one was lost in the hand-over)."""
        w = self._writer
        if w is None:
            return True
        try:
            async with asyncio.timeout(timeout):
                await w.written()               # blocked, not polling (TapWriter.written)
        except TimeoutError:
            return False
        return True

    def _tx_room(self) -> None:
        """The writer's backlog drained (TapWriter.full): take tx requests again."""
        self._tx_backlogged = False
        self._schedule()

    def _tx_write_failed(self, refused: bool) -> None:
        """The writer could not hand a frame to the tap (its request was answered OKAY
        already, as Linux netback's for a packet the stack drops later)."""
        self.stats.tx_dropped += 1
        if refused:
            log.debug("d%d: vif %d: the tap refused a frame", self.dom.domid, self.devid)

    # -- rate limit ---------------------------------------------------------------------------------
    def set_rate(self, limit: Limit | None) -> None:
        """Set or lift (None) the vif's limit at run time; the next packet sees it."""
        self.cfg.rate = limit
        self.tx_limit.set(limit)
        self.rx_limit.set(limit)
        log.info("d%d: vif %d: rate %s", self.dom.domid, self.devid,
                 f"{limit.bytes_per_s} B/s per {limit.interval_us} us" if limit else "unlimited")
        self._schedule()

    # -- guest -> tap ---------------------------------------------------------------------------
    def _tx_response(self, rid: int | None, status: int) -> None:
        """One response in the next slot. An extra-info slot (rid None) gets only its status
        NULL, as Linux netback writes it: the id field stays as the slot holds it."""
        r = self.tx
        off = r.next_response_off()
        if rid is None:
            _S16.pack_into(r.v, off + 2, status)
        else:
            _TXRSP.pack_into(r.v, off, rid, status)
        r.respond_done()

    def _process_tx(self) -> bool:
        """Guest -> tap: every complete packet on the tx ring, at most a ring's worth; the
        frames staged for the writer go to its thread together at the end."""
        try:
            return self._process_tx_ring()
        finally:
            if self._writer is not None:
                self._writer.flush()

    def _process_tx_ring(self) -> bool:
        r = self.tx
        n = r.unconsumed()
        if n < 0:
            self._bad_frontend("tx ring indices")
            return False
        done = 0
        self._tx_throttled = self._tx_backlogged = False
        limited = self.tx_limit.active
        writer = self._writer
        while n > 0:
            if limited and self.throttle.blocked(self.tx_limit):
                self._tx_throttled = True        # the rest waits on the ring for the timer
                break
            if writer is not None and writer.full():
                self._tx_backlogged = True       # the rest waits on the ring for the writer
                break
            base = r.req_cons
            first = _TXREQ.unpack_from(r.v, r.slot_off(base))
            # Gather the slots of one packet, each copied out of the ring once: more_data
            # chains data slots; extra-info slots (chained by XEN_NETIF_EXTRA_FLAG_MORE)
            # follow the slot that announced them.
            slots = [first]
            ids: list[int | None] = [first[3]]
            extras: list[bytes] = []
            i = 1
            flags = first[2]
            want_extra = bool(flags & NETTXF_extra_info)
            ok = True
            while want_extra or flags & NETTXF_more_data:
                if i >= n:
                    # A frontend publishes a packet's slots together (one req_prod update):
                    # a chain running past req_prod is fatal, as in Linux netback's
                    # xenvif_count_requests. Waiting for the rest would leave the request
                    # unconsumed and the loop re-polling it.
                    self._bad_frontend("a packet's slot chain runs past req_prod")
                off = r.slot_off(base + i)
                if want_extra:
                    ex = bytes(r.v[off:off + 8])
                    extras.append(ex)
                    ids.append(None)
                    want_extra = bool(ex[1] & XEN_NETIF_EXTRA_FLAG_MORE)
                else:
                    req = _TXREQ.unpack_from(r.v, off)
                    slots.append(req)
                    ids.append(req[3])
                    flags = req[2]
                    if flags & NETTXF_extra_info:
                        ok = False             # only a packet's first slot may announce extras
                        want_extra = True
                i += 1
            if len(slots) > MAX_SLOTS or len(extras) > 1:
                ok = False                     # consumed whole, answered ERROR slot by slot
            status = self._tx_packet(first, slots, extras) if ok else NETIF_RSP_ERROR
            if status == NETIF_RSP_ERROR:
                self.stats.tx_errors += 1
            elif status == NETIF_RSP_DROPPED:
                self.stats.tx_dropped += 1
            # One response per consumed slot, in order; extra-info slots are answered NULL.
            for rid in ids:
                self._tx_response(rid, status if rid is not None else NETIF_RSP_NULL)
            r.req_cons = (base + i) & 0xFFFFFFFF
            n -= i
            done += i
            if n == 0 and done < RING_SIZE:        # at most a ring's worth per pass
                n = max(r.unconsumed(), 0)
        return r.push_responses() if r.rsp_prod_pvt != r.get(8) else False

    def _tx_packet(self, first: tuple, slots: list[tuple], extras: list[bytes]) -> int:
        """Copy one validated chain out of the guest's grants and queue it for the tap with
        its virtio_net_hdr (TapWriter; written here when not serving); the status for its
        data slots."""
        gso: tuple[int, int] | None = None
        for ex in extras:
            etype, _eflags, size, gtype = _EXTRA_GSO.unpack_from(ex)
            # Only a GSO extra is known here (no multicast control or hash is advertised);
            # its type must be one we advertised and its size non-zero (Linux netback's
            # xenvif_set_skb_gso: anything else is a bad packet), here at least TCP's
            # smallest MSS (GSO_MIN_SIZE: the host's software segmentation is not the
            # guest's to multiply).
            if etype != XEN_NETIF_EXTRA_TYPE_GSO or size < GSO_MIN_SIZE or gtype not in _GSO_TO_VNET:
                return NETIF_RSP_ERROR
            gso = (gtype, size)
        total = first[4]                   # a u16: never above MAX_PACKET (64 KiB - 1)
        rest = sum(s[4] for s in slots[1:])
        first_len = total - rest
        # A runt frame is an error (Linux netback: < ETH_HLEN). A negative first part
        # (later slots adding up to more than the total) is host_copy_from's refusal of a
        # negative length, the one check of a copy's range: bad_copy_arg, an error below.
        if total < 14:
            return NETIF_RSP_ERROR
        dom = self.dom
        buf = bytearray(VNET_HDR_LEN)
        try:                                # all slots checked and pinned, then copied once
            grants.host_copy_from_many(dom, [(gref, off, first_len if k == 0 else size)
                                             for k, (gref, off, _fl, _id, size) in enumerate(slots)], buf)
        except grants.GrantError as e:
            log.debug("d%d: vif %d: bad tx request: %s", dom.domid, self.devid, e)
            return NETIF_RSP_ERROR
        flags = first[2]
        if gso is not None or flags & NETTXF_csum_blank:
            h = l4_header(buf, VNET_HDR_LEN)
            if h is None:
                return NETIF_RSP_ERROR         # Linux netback: checksum_setup fails, dropped
            family, l4, proto = h
            field = _CSUM_FIELD[proto]
            if gso is not None:
                gtype, size = gso
                if proto != 6 or family != _GSO_FAMILY[gtype]:
                    return NETIF_RSP_ERROR
                if not flags & NETTXF_csum_blank:
                    # A GSO packet is always a partial checksum (Linux netback recalculates
                    # the pseudo-header sum for a frontend that did not say so).
                    set_pseudo_sum(buf, VNET_HDR_LEN, family, l4, proto)
                hdr_len = l4 + ((buf[l4 + 12] >> 4) << 2) - VNET_HDR_LEN
                _VNET.pack_into(buf, 0, VNET_F_NEEDS_CSUM, _GSO_TO_VNET[gtype], hdr_len, size,
                                l4 - VNET_HDR_LEN, field)
                self.stats.tx_gso += 1
            else:
                _VNET.pack_into(buf, 0, VNET_F_NEEDS_CSUM, 0, l4 - VNET_HDR_LEN + field + 2, 0,
                                l4 - VNET_HDR_LEN, field)
        elif flags & NETTXF_data_validated:
            buf[0] = VNET_F_DATA_VALID
        if self._writer is not None:
            self._writer.stage(buf)             # to its thread at the pass's end (writer.py)
            if not self.batch_tx:
                self._writer.flush()
        else:                                   # not serving (tests drive passes by hand)
            try:
                os.write(self.fd, buf)
            except BlockingIOError:
                return NETIF_RSP_DROPPED
            except OSError as e:                # the kernel refused the header (EINVAL)
                log.debug("d%d: vif %d: tap refused a frame: %s", dom.domid, self.devid, e)
                return NETIF_RSP_ERROR
        n = len(buf) - VNET_HDR_LEN
        if n > LONE_MAX or gso is not None or _is_tcp(buf, VNET_HDR_LEN):
            self._tx_no_defer = True            # its completion is not held (_defer_tx_event)
        if len(self.ipv4) < 8:
            self.learn_ipv4(memoryview(buf)[VNET_HDR_LEN:])
        if len(self.ipv6) < 8 and buf[VNET_HDR_LEN + 12] == 0x86:     # EtherType 0x86dd
            self.learn_ipv6(memoryview(buf)[VNET_HDR_LEN:])
        self.stats.tx_packets += 1
        self.stats.tx_bytes += n
        if self.tx_limit.active:
            self.tx_limit.charge(n)
        return NETIF_RSP_OKAY

    # -- tap -> guest ---------------------------------------------------------------------------
    def _process_rx(self) -> bool:
        """Tap -> guest: up to RX_BATCH frames, each into as many posted rx buffers as it
        needs (one per page; one more for a GSO extra), copied once, one response per
        request consumed. A frame that finds too few requests waits in `_rx_buf` and the tap
        is not read until the guest posts more (flow control: the kernel keeps queueing)."""
        if self.held:
            return False                         # migration: frames stay in the tap
        r = self.rx
        delivered = False
        frames = 0
        limited = self.rx_limit.active
        self._rx_throttled = False
        for _ in range(RX_BATCH):
            if self._rx_len == 0 and self._rx_carried:
                frame = self._rx_carried.popleft()
                self._rx_buf[:len(frame)] = frame
                self._rx_len = len(frame)
            if self._rx_len == 0:
                if not self._tap_ready:
                    break
                if limited and self.throttle.blocked(self.rx_limit):
                    self._rx_throttled = True      # frames wait in the tap's queue
                    break
                try:
                    self._rx_len = os.readv(self.fd, [self._rx_buf])
                except (BlockingIOError, InterruptedError):
                    self._tap_ready = False
                    break
                except OSError as e:
                    log.debug("d%d: vif %d: tap read: %s", self.dom.domid, self.devid, e)
                    self._tap_ready = False
                    break
                if self._rx_len <= VNET_HDR_LEN:
                    self._rx_len = 0
                    continue
            avail = r.unconsumed()
            if avail < 0:
                self._bad_frontend("rx ring indices")
            need = self._rx_slots_needed()
            if need == 0:                            # undeliverable to this frontend
                self._rx_len = 0
                self.stats.rx_dropped += 1
                continue
            if avail < need:
                if self._rx_draining:            # no room for RX_DRAIN_S: dropped, not queued
                    self._rx_len = 0
                    self.stats.rx_dropped += 1
                    continue
                self.stats.rx_waits += 1
                self._rx_wait(need)
                break
            self._rx_deliver()
            if self._rx_drain_timer is not None or self._rx_draining:
                self._rx_stall_end()
            frames += 1
            delivered = True
        else:
            self._schedule()                 # more may be waiting: come back after others ran
        if frames:
            self._last_rx_frames = frames
        return r.push_responses() if delivered else False

    def _rx_slots_needed(self) -> int:
        """Requests the waiting frame takes, or 0 if this frontend cannot take it."""
        n = self._rx_len - VNET_HDR_LEN
        need = (n + PAGE - 1) // PAGE
        gtype = self._rx_buf[1] & ~VNET_GSO_ECN
        if gtype:
            if _VNET_TO_GSO.get(gtype) not in self.gso_rx:
                return 0
            need += 1
        if need > 1 and not self.sg_rx:
            return 0
        return need                              # <= MAX_SLOTS: RX_BUF bounds the frame

    def _rx_wait(self, need: int) -> None:
        """Ask for an event when the guest posts its next rx request (req_event =
        req_prod + 1, as Linux netback's xenvif_rx_ring_slots_available; not while the
        domain's slice ends run the pass, _on_yield), and come back at once if it posted in
        between."""
        r = self.rx
        prod = r.req_prod
        if self._armed():
            r.put(4, prod + 1)
            mb()                                   # RING_FINAL_CHECK_FOR_REQUESTS's
        if self._rx_drain_timer is None:
            self._rx_drain_timer = asyncio.get_running_loop().call_later(RX_DRAIN_S, self._rx_drain_due)
        if r.req_prod != prod:
            self._schedule()

    def _rx_drain_due(self) -> None:
        """A frame has waited RX_DRAIN_S for rx requests: frames for this frontend are
        dropped while it has no room for them (`_process_rx`), the tap's queue with them,
        until it takes one again. Not while a migration holds the frames in the tap."""
        self._rx_drain_timer = None
        if self.rx is None or not self._rx_len or self.held:
            return
        self._rx_draining = True
        log.info("d%d: vif %d: no rx requests for %.0f s: frames for it are dropped until it posts some",
                 self.dom.domid, self.devid, RX_DRAIN_S)
        self._schedule()

    def _rx_stall_end(self) -> None:
        if self._rx_drain_timer is not None:
            self._rx_drain_timer.cancel()
            self._rx_drain_timer = None
        self._rx_draining = False

    def _rx_deliver(self) -> None:
        r = self.rx
        dom = self.dom
        buf = self._rx_buf
        # A copy until the frontend has read it (a migration takes back unread ones, hold):
        # those before its rsp_event are read, and the copies stay within RX_UNREAD_BYTES.
        if RX_KEEP:
            recent = self._rx_recent
            recent.append((r.rsp_prod_pvt, bytes(self._rx_view[:self._rx_len])))   # one copy
            self._rx_recent_bytes += self._rx_len
            seen = (r.get(12) - 1) & 0xFFFFFFFF
            while recent and (((recent[0][0] - seen) & 0xFFFFFFFF) >= 0x80000000
                              or self._rx_recent_bytes > RX_UNREAD_BYTES or len(recent) > r.nr_ents):
                self._rx_recent_bytes -= len(recent.popleft()[1])
        mv = self._rx_view
        n = self._rx_len - VNET_HDR_LEN
        vflags, gtype, _hl, gso_size, _cs, _co = _VNET.unpack_from(buf, 0)
        gtype &= ~VNET_GSO_ECN
        first_flags = 0
        if vflags & VNET_F_NEEDS_CSUM:
            first_flags = NETRXF_csum_blank | NETRXF_data_validated
        elif vflags & VNET_F_DATA_VALID:
            first_flags = NETRXF_data_validated
        extra = _VNET_TO_GSO[gtype] if gtype else 0
        if extra:
            first_flags |= NETRXF_extra_info
            self.stats.rx_gso += 1
        # The frame's requests, each read out of the ring once, then its pieces (a page per
        # data slot; slot 1 is the GSO extra) copied into their grants as one batch, then a
        # response per request with each piece's own status (as the ops of Linux netback's
        # grant-copy batch).
        pos, end = VNET_HDR_LEN, self._rx_len
        reqs = []
        pieces = []
        while pos < end or extra:
            rid, gref = _RXREQ.unpack_from(r.v, r.slot_off(r.req_cons))   # copied once
            r.req_cons = (r.req_cons + 1) & 0xFFFFFFFF
            if len(reqs) == 1 and extra:
                reqs.append((rid, -1))
                extra, gso_type = 0, extra
                continue
            ln = min(PAGE, end - pos)
            reqs.append((rid, len(pieces)))
            pieces.append((gref, 0, mv[pos:pos + ln]))
            pos += ln
        errs = grants.host_copy_to_many(dom, pieces)
        failed = False
        last = len(pieces) - 1
        for slot, (rid, k) in enumerate(reqs):
            off = r.next_response_off()
            if k < 0:
                _EXTRA_GSO_RSP.pack_into(r.v, off, XEN_NETIF_EXTRA_TYPE_GSO, 0, gso_size, gso_type, 0, 0)
            else:
                if errs[k] is None:
                    status = len(pieces[k][2])
                else:
                    status = NETIF_RSP_ERROR
                    failed = True
                fl = NETRXF_more_data if k < last else 0
                if slot == 0:
                    fl |= first_flags
                _RXRSP.pack_into(r.v, off, rid, 0, fl, status)
            r.respond_done()
        self._rx_len = 0
        if failed:
            self.stats.rx_dropped += 1
        else:
            self.stats.rx_packets += 1
            self.stats.rx_bytes += n
        if self.rx_limit.active:
            self.rx_limit.charge(n)

    def _bad_frontend(self, what: str) -> None:
        self.stats.bad_indices += 1
        log.warning("d%d: vif %d: frontend broke the protocol (%s): disconnecting", self.dom.domid, self.devid, what)
        raise VifDisconnect(f"frontend broke the protocol ({what})")
