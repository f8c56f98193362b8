"""netback: Xen's netif protocol (xen-pv-abi.md §11) between a guest's rings and a tap.

Handshake: the toolstack writes both xenstore directories (frontend device/vif/<n>, backend
/local/domain/0/backend/vif/<domid>/<n>); the backend publishes feature-rx-copy and moves to
InitWait; once the frontend has written tx-ring-ref, rx-ring-ref and event-channel and moved
to Initialised/Connected, the backend maps the two ring grants, binds the event channel,
creates the tap, attaches it to the bridge and moves to Connected.

Data path, batched as the research showed necessary: every wake-up drains the tx ring
(guest -> tap, grant copy out of the guest's pages) and then as many tap frames as there are
posted rx buffers (tap -> guest, copied into the granted pages), and pushes responses with one
event per batch under the event-index rules. Everything the guest writes is untrusted: a bad
grant, an offset+size beyond the page, an oversized packet or insane ring indices get an error
response and a counter (or disconnect the vif), never an exception into the loop.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import struct
import sys
import time
from typing import TYPE_CHECKING

from aiovmm import grants
from aiovmm.ratelimit import Limit, Limiter, Throttle, parse_vif_rate
from aiovmm.ring import BackRing
from aiovmm.xenbus import Watch, is_online, XenbusState, read_state, read_str, write_keys
from aiovmm.xenstore.core import XsError

from . import tap as taplib

if TYPE_CHECKING:
    from aiovmm.domain import Domain

log = logging.getLogger("aiovmm.backends.net")

RING_SIZE = 256
TX_SLOT, RX_SLOT = 12, 8
NETTXF_csum_blank, NETTXF_data_validated, NETTXF_more_data, NETTXF_extra_info = 1, 1 << 1, 1 << 2, 1 << 3
NETIF_RSP_DROPPED, NETIF_RSP_ERROR, NETIF_RSP_OKAY, NETIF_RSP_NULL = -2, -1, 0, 1
XEN_NETIF_EXTRA_FLAG_MORE = 1
MAX_PACKET = 0xFFFF
MAX_SLOTS = 18                 # XEN_NETIF_NR_SLOTS_MIN: the most slots a packet may use here
MAX_FRAME = 1514 + 4
RX_BATCH = 64
_TXREQ = struct.Struct("<IHHHH")       # gref offset flags id size
_TXRSP = struct.Struct("<Hh")          # id status
_RXREQ = struct.Struct("<H2xI")        # id gref
_RXRSP = struct.Struct("<HHHh")        # id offset flags status


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


def complete_checksum(frame: bytearray) -> bool:
    """Fill in the TCP or UDP checksum of an IPv4 frame sent with NETTXF_csum_blank.

    IPv4 TCP/UDP checksum offload is always on in the netif protocol (netif.h: a backend
    cannot refuse it; Linux netfront always sets NETIF_F_IP_CSUM and sends partial
    checksums with csum_blank), and Linux netback completes such checksums
    (skb_checksum_setup) before the packet leaves. The tap has no offload either, so it is
    done here: the field is computed over the pseudo-header and the whole L4 segment.
    Returns False for a frame whose checksum cannot be completed (not IPv4 TCP/UDP,
    truncated, a fragment): Linux netback drops those (checksum_setup fails)."""
    off = 14
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == 0x8100 and len(frame) >= 18:          # one 802.1Q tag
        ethertype, off = int.from_bytes(frame[16:18], "big"), 18
    if ethertype != 0x0800 or len(frame) < off + 20:
        return False
    ihl = (frame[off] & 0x0F) * 4
    total = int.from_bytes(frame[off + 2:off + 4], "big")
    proto = frame[off + 9]
    frag = int.from_bytes(frame[off + 6:off + 8], "big") & 0x3FFF
    if frame[off] >> 4 != 4 or ihl < 20 or total < ihl or off + total > len(frame) or frag:
        return False
    l4 = off + ihl
    seg_len = total - ihl
    field = {6: 16, 17: 6}.get(proto)
    if field is None or seg_len < field + 2:
        return False
    frame[l4 + field:l4 + field + 2] = b"\0\0"
    pseudo = frame[off + 12:off + 20] + bytes((0, proto)) + seg_len.to_bytes(2, "big")
    s = _csum16(frame[l4:l4 + seg_len], _csum16(pseudo))
    c = (~s) & 0xFFFF
    if sys.byteorder == "little":
        c = ((c & 0xFF) << 8) | (c >> 8)      # the sum was of little-endian words
    if c == 0 and proto == 17:
        c = 0xFFFF                             # UDP: 0 means "no checksum"
    frame[l4 + field:l4 + field + 2] = c.to_bytes(2, "big")
    return True


def random_mac() -> str:
    """A locally administered address in Xen's OUI (00:16:3e), as xl generates."""
    return "00:16:3e:%02x:%02x:%02x" % (random.randint(0, 0x7F), random.randint(0, 255), random.randint(0, 255))


@dataclasses.dataclass
class VifConfig:
    """One vif, in xl's terms: `vif = ['mac=...,bridge=...']`."""
    mac: str = ""
    bridge: str | None = None
    netns: str | None = None        # namespace of the bridge (the tap is created there)
    ifname: str | None = None       # default: vif<domid>.<devid>
    mtu: int = 1500
    rate: Limit | None = None       # xl `rate=10Mb/s@20ms`: token bucket on tx and rx

    @classmethod
    def parse(cls, spec: str) -> "VifConfig":
        """Parse xl syntax: 'mac=00:16:3e:01:02:03,bridge=br0[,mtu=1500][,netns=ns][,vifname=tap0][,rate=10Mb/s@20ms]'."""
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
    tx_dropped: int = 0           # tap would block
    rx_dropped: int = 0           # no rx buffer posted / bad rx grant
    events_sent: int = 0
    bad_indices: int = 0


class Netback:
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
        self._kick = asyncio.Event()
        self._tap_ready = False
        self._reader_on = False
        self._bridge_watch: taplib.BridgeWatch | None = None
        self.connected = asyncio.Event()
        # Token buckets (aiovmm/ratelimit.py): one per direction, both at the vif's rate.
        self.tx_limit = Limiter(cfg.rate, VIF_MIN_BURST)
        self.rx_limit = Limiter(cfg.rate, VIF_MIN_BURST)
        self._tx_throttled = False
        self.throttle = Throttle(self._kick.set)   # one wake-up for both directions
        # IPv4 addresses the guest used as its own on this vif (ARP sender, IPv4 source),
        # for the announce on a new host (aiovmm/migration/devices.py); bounded.
        self.ipv4: list[str] = []
        self.announce_schedule = None          # set on a migrated-in vif: announce at start
        self.announced = 0                     # frames of that announce sent
        self.announce_t0: float | None = None  # perf_counter of its first frame
        self._round0: float | bool = False     # loop time announce_first() sent round 0
        self._frames: list[bytes] | None = None
        self.held = False                      # migration: frames stay in the tap (hold)
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
        os.write(self.fd, frame)
        self.announced += 1

    def announce_frames(self) -> list[bytes]:
        """One round's frames (built once, with scapy: not in the middle of a hand-over)."""
        if self._frames is None:
            from aiovmm.migration.announce import frames
            self._frames = frames(self.mac, list(self.ipv4))
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
        await announce(self._announce_send, self.mac, list(self.ipv4), schedule=self.announce_schedule,
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
        if not on:
            self._kick.set()

    def forward(self) -> int:
        """After the hand-over: the unicast frames for the guest waiting in the tap go back
        into the bridge, which by now has learnt the guest's MAC behind its uplink (the
        destination's announce reached it through the switch), so they reach the guest on
        its new host (queued there in the new tap until its frontend reconnects).
        Broadcasts are dropped (already flooded everywhere). Returns the frames sent on."""
        if self.fd is None:
            return 0
        mac = bytes.fromhex(self.mac.replace(":", ""))
        n = 0
        for _ in range(4096):
            try:
                frame = os.read(self.fd, 65536)
            except OSError:                      # BlockingIOError: the queue is empty
                break
            if frame[:6] != mac:
                continue
            try:
                os.write(self.fd, frame)
                n += 1
            except OSError:
                break
        if n:
            log.info("d%d: vif %d: %d frames sent on to the guest's new host", self.dom.domid,
                     self.devid, n)
        return n

    def learn_ipv4(self, frame: bytes | bytearray) -> None:
        """Note the guest's own IPv4 address from an ARP it sends (sender = its MAC) or an
        IPv4 packet's source (at most 8 addresses; 0.0.0.0 and multicast ignored)."""
        if len(self.ipv4) >= 8 or len(frame) < 34:
            return
        et = frame[12:14]
        if et == b"\x08\x06" and len(frame) >= 42 and frame[22:28] == frame[6:12]:
            a = bytes(frame[28:32])
        elif et == b"\x08\x00" and frame[14] >> 4 == 4:
            a = bytes(frame[26:30])
        else:
            return
        if a[0] == 0 or a[0] >= 224:
            return
        ip = ".".join(map(str, a))
        if ip not in self.ipv4:
            self.ipv4.append(ip)

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
        st.write(f"{self.back}/feature-rx-copy", "1")
        st.write(f"{self.back}/feature-rx-flip", "0")
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
                gone: VifDisconnect | None = None
                try:
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._serve())
                        tg.create_task(self._watch_front(watch))
                        if self._bridge_watch is not None:
                            tg.create_task(self._bridge_watch.run())
                except* VifDisconnect as eg:
                    gone = eg.exceptions[0]
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
            self.close()

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
            self.fd = await asyncio.to_thread(taplib.open_tap, self.ifname, self.cfg.netns)
        except taplib.TapBusy:
            if self.cfg.ifname:
                raise
            # Another hypervisor process on this host has its own d<domid>: Xen's name is
            # taken, so add this process's id (still within IFNAMSIZ).
            self.ifname = f"{self.ifname}-{os.getpid() % 100000}"[:15]
            self.fd = await asyncio.to_thread(taplib.open_tap, self.ifname, self.cfg.netns)
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
        self.port = self.dom.hypervisor.host.endpoint_bind(self.dom.domid, evtchn)
        self.port.link(self._kick)             # guest events wake _serve directly

    def _disconnect(self) -> None:
        """Stop the data path (rings, event channel, tap reader); the tap itself stays."""
        self.throttle.cancel()                     # a rate limit's pending wake-up
        if self.fd is not None and self._reader_on:
            asyncio.get_event_loop().remove_reader(self.fd)
            self._reader_on = False
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
        self._disconnect()
        if self.fd is not None:
            os.close(self.fd)               # the tap vanishes with its fd
            self.fd = None
        try:
            self._set_state(XenbusState.Closed)
        except XsError as e:                 # the backend directory went with the domain
            log.debug("d%d: vif %d: state Closed not written: %s", self.dom.domid, self.devid, e)

    # -- the data path -----------------------------------------------------------------------------
    def _on_tap_readable(self) -> None:
        self._tap_ready = True
        asyncio.get_running_loop().remove_reader(self.fd)
        self._reader_on = False
        self._kick.set()

    async def _serve(self) -> None:
        """Serve both rings. It goes round again without waiting only after a pass that
        consumed requests (every pass either consumes what is published or disconnects the
        vif), and otherwise sleeps on the event channel or the tap: it never spins on state
        the guest left unfinished."""
        self._tap_ready = True
        tx, rx = self.tx, self.rx
        stalled = 0
        while True:
            before = (tx.req_cons, rx.req_cons)
            notify = self._process_tx()
            notify |= self._process_rx()
            if notify:
                self.port.notify()
                self.stats.events_sent += 1
            again = not self._tx_throttled and tx.final_check()
            if self._tap_ready and rx.unconsumed() == 0:
                again |= rx.final_check()
            if again:
                # Requests published meanwhile are consumed by the next pass; two passes in
                # a row that consume nothing would be a spin on guest state: refuse it.
                stalled = stalled + 1 if (tx.req_cons, rx.req_cons) == before else 0
                if stalled > 1:
                    self._bad_frontend("requests published but never consumable")
                await asyncio.sleep(0)           # more work published: let others run first
                continue
            stalled = 0
            if not self._tap_ready and not self._reader_on:
                asyncio.get_running_loop().add_reader(self.fd, self._on_tap_readable)
                self._reader_on = True
            await self._kick.wait()
            self._kick.clear()

    # -- rate limit ---------------------------------------------------------------------------------
    def set_rate(self, limit: Limit | None) -> None:
        """Set or lift (None) the vif's limit at run time; the next packet sees it."""
        self.cfg.rate = limit
        self.tx_limit.set(limit)
        self.rx_limit.set(limit)
        log.info("d%d: vif %d: rate %s", self.dom.domid, self.devid,
                 f"{limit.bytes_per_s} B/s per {limit.interval_us} us" if limit else "unlimited")
        self._kick.set()

    def _tx_response(self, rid: int, status: int) -> None:
        r = self.tx
        _TXRSP.pack_into(r.v, r.next_response_off(), rid, status)
        r.respond_done()

    def _process_tx(self) -> bool:
        """Guest -> tap: every complete packet on the tx ring."""
        r = self.tx
        dom = self.dom
        n = r.unconsumed()
        if n < 0:
            self._bad_frontend("tx ring indices")
            return False
        done = 0
        self._tx_throttled = False
        limited = self.tx_limit.active
        while n > 0:
            if limited and self.throttle.blocked(self.tx_limit):
                self._tx_throttled = True        # the rest waits on the ring for the timer
                break
            first = _TXREQ.unpack_from(r.v, r.slot_off(r.req_cons))
            # Gather the slots of one packet: more_data chains data slots; extra-info slots
            # (chained by XEN_NETIF_EXTRA_FLAG_MORE) follow the slot that announced them.
            slots = [first]
            kinds = ["data"]
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
                off = r.slot_off(r.req_cons + i)
                if want_extra:
                    kinds.append("extra")
                    # No extra-info type is negotiated (no GSO, multicast or hash features
                    # are advertised): any extra makes the packet an error, as in Linux.
                    ok = False
                    want_extra = bool(r.v[off + 1] & XEN_NETIF_EXTRA_FLAG_MORE)
                else:
                    req = _TXREQ.unpack_from(r.v, off)
                    slots.append(req)
                    kinds.append("data")
                    flags = req[2]
                    if flags & NETTXF_extra_info:
                        ok = False             # only a packet's first slot may announce extras
                        want_extra = True
                i += 1
            if len(slots) > MAX_SLOTS:
                ok = False                     # consumed whole, answered ERROR slot by slot
            frame = bytearray()
            total = first[4]
            if ok:
                try:
                    rest = sum(s[4] for s in slots[1:])
                    first_len = total - rest
                    if first_len < 0 or total > MAX_PACKET:
                        raise grants.GrantError(grants.GntSt.bad_copy_arg, "bad sizes")
                    for k, (gref, off, _fl, _id, size) in enumerate(slots):
                        ln = first_len if k == 0 else size
                        frame += grants.host_copy_from(dom, gref, off, ln)
                except grants.GrantError as e:
                    ok = False
                    log.debug("d%d: vif %d: bad tx request: %s", dom.domid, self.devid, e)
            status = NETIF_RSP_OKAY
            if ok and first[2] & NETTXF_csum_blank and len(frame) >= 14:
                ok = complete_checksum(frame)
            if not ok or len(frame) < 14:
                status = NETIF_RSP_ERROR
                self.stats.tx_errors += 1
            else:
                try:
                    os.write(self.fd, frame)
                    if len(self.ipv4) < 8:
                        self.learn_ipv4(frame)
                    self.stats.tx_packets += 1
                    self.stats.tx_bytes += len(frame)
                    if limited:
                        self.tx_limit.charge(len(frame))
                except BlockingIOError:
                    status = NETIF_RSP_DROPPED
                    self.stats.tx_dropped += 1
                except OSError:
                    status = NETIF_RSP_ERROR
                    self.stats.tx_errors += 1
            # One response per consumed slot, in order; extra-info slots are answered NULL.
            for idx, kind in enumerate(kinds):
                rid = _TXREQ.unpack_from(r.v, r.slot_off(r.req_cons + idx))[3]
                self._tx_response(rid, status if kind == "data" else NETIF_RSP_NULL)
            r.req_cons = (r.req_cons + i) & 0xFFFFFFFF
            n -= i
            done += i
            if n == 0 and done < RING_SIZE:        # at most a ring's worth per pass
                n = max(r.unconsumed(), 0)
        return r.push_responses() if r.rsp_prod_pvt != r.get(8) else False

    def _process_rx(self) -> bool:
        """Tap -> guest: one frame per posted rx buffer, up to RX_BATCH per wake-up."""
        if not self._tap_ready or self.held:
            return False
        r = self.rx
        dom = self.dom
        avail = r.unconsumed()
        if avail < 0:
            self._bad_frontend("rx ring indices")
            return False
        done = 0
        limited = self.rx_limit.active
        while done < RX_BATCH and avail > 0:
            if limited and self.throttle.blocked(self.rx_limit):
                break                            # frames wait in the tap's queue
            try:
                frame = os.read(self.fd, 65536)
            except BlockingIOError:
                self._tap_ready = False
                break
            except OSError:
                self._tap_ready = False
                break
            rid, gref = _RXREQ.unpack_from(r.v, r.slot_off(r.req_cons))
            r.req_cons = (r.req_cons + 1) & 0xFFFFFFFF
            avail -= 1
            status = len(frame)
            if len(frame) > 4096:
                status = NETIF_RSP_ERROR
                self.stats.rx_dropped += 1
            else:
                try:
                    grants.host_copy_to(dom, gref, 0, frame)
                    self.stats.rx_packets += 1
                    self.stats.rx_bytes += len(frame)
                    if limited:
                        self.rx_limit.charge(len(frame))
                except grants.GrantError:
                    status = NETIF_RSP_ERROR
                    self.stats.rx_dropped += 1
            _RXRSP.pack_into(r.v, r.next_response_off(), rid, 0, 0, status)
            r.respond_done()
            done += 1
        if done == RX_BATCH:
            self._kick.set()                 # more may be waiting: come back after others ran
        return r.push_responses() if done else False

    def _bad_frontend(self, what: str) -> None:
        self.stats.bad_indices += 1
        log.warning("d%d: vif %d: frontend broke the protocol (%s): disconnecting", self.dom.domid, self.devid, what)
        raise VifDisconnect(f"frontend broke the protocol ({what})")
