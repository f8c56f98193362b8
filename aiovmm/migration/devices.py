"""A saved or migrated domain's devices, recreated on the new side (libxl's job on Xen: the
toolstack re-creates the backends from the domain's configuration, the guest's frontends
reconnect after the resume).

The configuration travels in the xl header (save.config_of): per vif its MAC, bridge, MTU,
tap name if one was given and the IPv4 addresses the guest used on it (for the announce);
per disk its xl disk spec. On the new side every value is parsed by the same code that
parses xl syntax (VifConfig.parse, DiskConfig.parse); the vif's network namespace is the
receiving hypervisor's (`Hypervisor.netns`: where this host's bridges are), never a name
from the stream. The receiver trusts the configuration as far as it trusts the sender (the
HMAC handshake, or a file under the daemon's save directory), as xl's receiver does.

Disks: the source releases its claim (the cross-process lock) when it hands the guest over
(live.py, just before GO); the destination claims after GO, waiting a little for that
release. Block requests in flight when the guest suspended are completed and answered
before the last pages are copied (`quiesce`).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from typing import TYPE_CHECKING

from ..errors import BuildError
from . import announce as _announce, stream as S      # scapy loads here, not mid-migration

if TYPE_CHECKING:
    from ..domain import Domain
    from ..hypervisor import Hypervisor

log = logging.getLogger("aiovmm.migration")

MAX_DEVICES = 16
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
CLAIM_WAIT_S = 5.0


def describe(dom: "Domain") -> dict:
    """The devices of `dom` for the xl header."""
    from ..backends.block import Blkback
    from ..backends.net import Netback
    vifs, disks = [], []
    for b in dom.backends:
        if isinstance(b, Netback):
            spec = f"mac={b.mac},mtu={b.cfg.mtu}"
            if b.cfg.bridge:
                spec += f",bridge={b.cfg.bridge}"
            if b.cfg.ifname:
                spec += f",vifname={b.cfg.ifname}"
            if b.cfg.ip:
                spec += ",ip=" + " ".join(str(n) for n in b.cfg.ip)
            vifs.append({"devid": b.devid, "spec": spec, "ipv4": list(b.ipv4), "ipv6": list(b.ipv6)})
        elif isinstance(b, Blkback):
            c = b.cfg
            prefix = f"{c.kind}:" if c.kind else ""
            disks.append({"index": b.index, "spec": f"vdev={b.vdev},access={c.access},"
                                                    f"devtype={c.devtype},target={prefix}{c.target}"})
    return {"vifs": vifs, "disks": disks}


def parse(hv: "Hypervisor", cfg: dict) -> tuple[list, list]:
    """([(devid, VifConfig, (ipv4, ipv6))], [(index, DiskConfig)]) from an xl header, validated.
    Raises StreamError."""
    from ..backends.block import DiskConfig
    from ..backends.net import VifConfig
    vifs, disks = cfg.get("vifs", []), cfg.get("disks", [])
    if not isinstance(vifs, list) or not isinstance(disks, list) or len(vifs) + len(disks) > MAX_DEVICES:
        raise S.StreamError("xl header: bad device lists")
    out_v, out_d = [], []
    try:
        for v in vifs:
            devid, spec, ips = int(v["devid"]), str(v["spec"]), v.get("ipv4", [])
            ip6s = v.get("ipv6", [])
            if not 0 <= devid < MAX_DEVICES or not isinstance(ips, list) or len(ips) > 8 or \
                    not isinstance(ip6s, list) or len(ip6s) > 8:
                raise ValueError(f"vif {devid}")
            if any(o.startswith("netns=") for o in spec.split(",")):
                raise ValueError("a vif names a network namespace")
            vc = VifConfig.parse(spec)
            if not vc.mac or (vc.bridge and not _IFNAME.fullmatch(vc.bridge)) or \
                    (vc.ifname and not _IFNAME.fullmatch(vc.ifname)):
                raise ValueError(f"vif {devid}: {spec!r}")
            vc.netns = hv.netns
            out_v.append((devid, vc, ([str(ipaddress.IPv4Address(str(a))) for a in ips],
                                      [str(ipaddress.IPv6Address(str(a))) for a in ip6s])))
        for d in disks:
            idx = int(d["index"])
            if not 0 <= idx < MAX_DEVICES:
                raise ValueError(f"disk index {idx}")
            out_d.append((idx, DiskConfig.parse(str(d["spec"]))))
    except (KeyError, TypeError, ValueError) as e:
        raise S.StreamError(f"xl header: bad device configuration: {e}") from None
    if len({d for d, _c, _i in out_v}) != len(out_v) or len({i for i, _c in out_d}) != len(out_d):
        raise S.StreamError("xl header: a device listed twice")
    return out_v, out_d


async def check(hv: "Hypervisor", vifs: list, disks: list) -> None:
    """Host-side checks before anything is built (bridges exist, disk sources resolve)."""
    from ..backends.net.tap import TapError, check_bridge
    for devid, vc, _ips in vifs:
        try:
            await asyncio.to_thread(check_bridge, vc.bridge, vc.netns)
        except TapError as e:
            raise BuildError(f"vif {devid}: {e}") from None
    for idx, dc in disks:
        try:
            dc.source = await asyncio.to_thread(dc.resolve)
        except ValueError as e:
            raise BuildError(f"disk {idx}: {e}") from None


def create(hv: "Hypervisor", dom: "Domain", vifs: list, disks: list, announce: bool = True) -> None:
    """Backends for a restored domain (xenstore directories written by `publish` once the
    domain is introduced): the guest's frontends find them when it resumes. `announce`:
    each vif announces the guest as soon as it runs (migration.announce, QEMU's
    schedule)."""
    from ..backends.block import Blkback
    from ..backends.net import Netback
    for devid, vc, ips in vifs:
        nb = Netback(dom, devid, vc, ifname_prefix=hv.vif_prefix)
        nb.adopt(*ips)                  # the same rule as addresses learnt here
        if announce:
            nb.announce_schedule = _announce.Schedule()
        dom.backends.append(nb)
    for idx, dc in disks:
        dom.backends.append(Blkback(dom, idx, dc))


def publish(dom: "Domain") -> None:
    """Write the devices' xenstore directories (states Initialising), as at creation."""
    for b in dom.backends:
        b.publish()


def announce_now(dom: "Domain") -> None:
    """The first announce round of every prepared vif, at once; the vif's own task sends
    the later rounds when the domain runs. Live migration calls this as soon as the whole
    stream is in: the guest is suspended on the source then and no longer takes frames
    there, so the switch is turned to this host before the domain is finished and
    started; frames for the guest wait in its tap (the tap's queue) instead of being lost
    on the source, and its frontend receives them after it reconnects."""
    from ..backends.net import Netback
    for b in dom.backends:
        if isinstance(b, Netback):
            b.announce_first()


async def claim(hv: "Hypervisor", dom: "Domain", wait_s: float = CLAIM_WAIT_S) -> None:
    """Claim every disk of a restored domain; a disk still held by the guest's previous
    home (it lets go when it hands the guest over) is retried for up to `wait_s`."""
    from ..backends.block import Blkback
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    for b in dom.backends:
        if not isinstance(b, Blkback):
            continue
        while True:
            try:
                await b.claim(hv.disks_in_use)
                break
            except BuildError:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.002)


async def prepare(dom: "Domain") -> None:
    """Create the vifs' taps and put them on their bridges now (before the guest is handed
    over), so the announce goes out the moment the guest starts. A tap that cannot be made
    is a BuildError (the migration is refused, the source runs on)."""
    from ..backends.net import Netback
    from ..backends.net.tap import TapError
    for b in dom.backends:
        if isinstance(b, Netback):
            try:
                await b.open_and_attach()
            except TapError as e:
                raise BuildError(f"vif {b.devid}: {e}") from None
            b.announce_frames()
            b.start_writer()


def close(dom: "Domain") -> None:
    """Close the taps of a restored domain that never ran (a migration called off)."""
    from ..backends.net import Netback
    for b in dom.backends:
        if isinstance(b, Netback):
            b.close()


def hold(dom: "Domain", on: bool) -> None:
    """The source's vifs keep frames for the suspended guest in their taps (Netback.hold)."""
    from ..backends.net import Netback
    for b in dom.backends:
        if isinstance(b, Netback):
            b.hold(on)


def take_held(dom: "Domain") -> list[tuple[int, bytes]]:
    """After the hand-over: the frames for the guest its vifs held, as (devid, frame)
    (Netback.take_held), for its new host (put_rx there)."""
    from ..backends.net import Netback
    return [(b.devid, f) for b in dom.backends if isinstance(b, Netback) for f in b.take_held()]


def put_rx(dom: "Domain", held: list[tuple[int, bytes]]) -> int:
    """The migrated-in guest's frames held on its old host, each to the vif of its devid
    (Netback.put_rx: checked there; a devid the guest has no vif for is dropped).
    Returns the frames kept."""
    from ..backends.net import Netback
    vifs = {b.devid: b for b in dom.backends if isinstance(b, Netback)}
    by: dict[int, list[bytes]] = {}
    for devid, f in held:
        if devid in vifs:
            by.setdefault(devid, []).append(f)
    return sum(vifs[d].put_rx(fs) for d, fs in by.items())


def forward(dom: "Domain") -> int:
    """After the hand-over: the held frames go on to the guest's new host (Netback.forward)."""
    from ..backends.net import Netback
    return sum(b.forward() for b in dom.backends if isinstance(b, Netback))


def reannounce(dom: "Domain") -> None:
    """A migration called off after the receiver may have announced the guest: one
    announce round from the source's own taps turns the switch back."""
    from ..backends.net import Netback
    for b in dom.backends:
        if isinstance(b, Netback) and b.fd is not None:
            _announce.send_round(b._announce_send, b.mac, tag=f"d{dom.domid}: vif {b.devid}: ",
                                 round_frames=b.announce_frames())


def writer_threads(dom: "Domain") -> list[int]:
    """Host thread ids of the domain's tap writers (boosted with the loop in a downtime)."""
    from ..backends.net import Netback
    return [t for b in dom.backends if isinstance(b, Netback) for t in b.writer_threads()]


def take_tx(dom: "Domain") -> None:
    """The suspended guest's last tx requests taken (before its pages' last copy)."""
    from ..backends.net import Netback
    for b in dom.backends:
        if isinstance(b, Netback):
            b.take_tx()


TX_WRITTEN_WAIT_S = 0.1


async def tx_written(dom: "Domain", timeout: float = TX_WRITTEN_WAIT_S) -> None:
    """Wait until every frame the suspended guest sent is in its taps (Netback.tx_written),
    at most `timeout` (then logged: a late frame may point the switches back here)."""
    from ..backends.net import Netback
    for b in dom.backends:
        if isinstance(b, Netback) and not await b.tx_written(timeout):
            log.warning("d%d: vif %d: the guest's last frames not written within %.0f ms",
                        dom.domid, b.devid, timeout * 1e3)


def release(hv: "Hypervisor", dom: "Domain") -> None:
    """Give up the disks' claims (the source, handing the guest over)."""
    from ..backends.block import Blkback
    for b in dom.backends:
        if isinstance(b, Blkback):
            b.release(hv.disks_in_use)


async def quiesce(dom: "Domain") -> None:
    """Wait until no block request of the (suspended) domain is in flight and every
    completed one is answered in its ring, so the last copy carries them."""
    from ..backends.block import Blkback
    for b in dom.backends:
        if isinstance(b, Blkback):
            await b.quiesce()
