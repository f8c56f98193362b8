"""Announcing a guest on its new host (after a live migration or restore), as QEMU's
qemu_announce_self does and more: for each vif, per round, a RARP with the guest's MAC
(QEMU's frame: EtherType 0x8035, opcode 3, sender = target = MAC, addresses 0), a
gratuitous ARP request for every IPv4 address the vif carries (sender = target IP,
broadcast), and an unsolicited IPv6 neighbour advertisement (override flag, target
link-layer address option) to all-nodes for every IPv6 address. Rounds follow QEMU's
announce schedule (announce-initial 50 ms, announce-max 550 ms, announce-rounds 5,
announce-step 100 ms): round 0 at once, then initial, initial+step, ... capped at max.

The frames go into the vif's tap from the host side, so the bridge (and every switch
behind it) learns the MAC on the new port and neighbours refresh their caches, whether or
not the guest's own frontend announces too. The addresses are the ones netback learnt
from the guest's own frames (IPv4: ARP sender and IPv4 source; IPv6: source address) or
the vif's configuration, carried in the xl header (devices.py); `announce()` takes any
frame sink.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

log = logging.getLogger("aiovmm.migration")

ETH_P_RARP = 0x8035
BROADCAST = "ff:ff:ff:ff:ff:ff"


@dataclass(frozen=True)
class Schedule:
    """QEMU's announce parameters (qapi AnnounceParameters), in milliseconds."""
    initial_ms: int = 50
    max_ms: int = 550
    rounds: int = 5
    step_ms: int = 100

    def delays_ms(self) -> list[int]:
        """Delay before each round after the first (which goes at once)."""
        return [min(self.initial_ms + i * self.step_ms, self.max_ms) for i in range(self.rounds - 1)]


def rarp(mac: str) -> bytes:
    """QEMU's announce frame (net/announce.c announce_self_create)."""
    m = bytes.fromhex(mac.replace(":", ""))
    payload = (b"\x00\x01" b"\x08\x00" b"\x06\x04" b"\x00\x03" + m + b"\0\0\0\0" + m + b"\0\0\0\0")
    frame = bytes.fromhex("ff" * 6) + m + ETH_P_RARP.to_bytes(2, "big") + payload
    return frame + b"\0" * (60 - len(frame))


def garp(mac: str, ip: str) -> bytes:
    return bytes(Ether(src=mac, dst=BROADCAST) /
                 ARP(op=1, hwsrc=mac, psrc=ip, hwdst="00:00:00:00:00:00", pdst=ip))


def unsolicited_na(mac: str, ip6: str) -> bytes:
    return bytes(Ether(src=mac, dst="33:33:00:00:00:01") /
                 IPv6(src=ip6, dst="ff02::1", hlim=255) /
                 ICMPv6ND_NA(tgt=ip6, R=0, S=0, O=1) / ICMPv6NDOptDstLLAddr(lladdr=mac))


def frames(mac: str, ipv4: list[str] = (), ipv6: list[str] = ()) -> list[bytes]:
    """One round's frames for one vif."""
    return [rarp(mac)] + [garp(mac, ip) for ip in ipv4] + [unsolicited_na(mac, ip) for ip in ipv6]


def send_round(send: Callable[[bytes], None], mac: str, ipv4: list[str] = (),
               ipv6: list[str] = (), *, tag: str = "", index: int = 0,
               round_frames: list[bytes] | None = None) -> int:
    """One round now; returns the frames sent. A frame the sink refuses (OSError: tap
    full or gone) is logged and skipped."""
    sent = 0
    for f in round_frames if round_frames is not None else frames(mac, list(ipv4), list(ipv6)):
        try:
            send(f)
            sent += 1
        except OSError as e:
            log.warning("%sannounce round %d for %s: %s", tag, index, mac, e)
    return sent


async def announce(send: Callable[[bytes], None], mac: str, ipv4: list[str] = (),
                   ipv6: list[str] = (), schedule: Schedule = Schedule(), *, tag: str = "",
                   first_sent: bool | float = False, round_frames: list[bytes] | None = None) -> int:
    """Send every round on the schedule (`first_sent`: round 0 went already, at that
    loop time if a float, else just now); returns the number of frames sent by this call.
    `round_frames`: the frames, built beforehand (else from mac/ipv4/ipv6)."""
    if round_frames is None:
        round_frames = frames(mac, list(ipv4), list(ipv6))
    sent = 0
    loop = asyncio.get_running_loop()
    last = first_sent if isinstance(first_sent, float) else loop.time()
    for i, delay in enumerate([0] + schedule.delays_ms()):
        if delay:                             # the gap counts from the previous round
            await asyncio.sleep(max(0.0, last + delay / 1000 - loop.time()))
            last = loop.time()
        if i == 0 and first_sent:
            continue
        sent += send_round(send, mac, tag=tag, index=i, round_frames=round_frames)
    log.info("%sannounced %s (%d IPv4, %d IPv6) in %d rounds", tag, mac, len(ipv4), len(ipv6),
             schedule.rounds)
    return sent
