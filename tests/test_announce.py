"""The announce frames (aiovmm/migration/announce.py) written into a tap on a bridge in a
private namespace and captured by the "host" behind the bridge's uplink (VirtualLan):
dissected with scapy (opcode, addresses, count, spacing on QEMU's schedule), and the
bridge's forwarding table has learnt the MAC on the tap's port."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time

from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from aiovmm.backends.net import tap as taplib
from aiovmm.migration import announce as A
from aiovmm.testing import VirtualLan

MAC = "00:16:3e:5a:01:02"
IPV4 = ["198.18.0.42", "198.18.0.43"]
IPV6 = ["2001:db8::42"]


def _capture_socket(ns: str, ifname: str) -> socket.socket:
    with taplib.in_netns(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        s.bind((ifname, 0))
    s.settimeout(0.2)
    return s


def _collect(s: socket.socket, until: float) -> list[tuple[float, bytes]]:
    out = []
    while time.monotonic() < until:
        try:
            data = s.recv(2048)
        except TimeoutError:
            continue
        if data[6:12] == bytes.fromhex(MAC.replace(":", "")):
            out.append((time.monotonic(), data))
    return out


async def _loop_lateness(late: list[float], until: float) -> None:
    """How late this loop's 20 ms timers fire until `until` (s each): the reference for the
    spacing of the announce rounds, which are timers on the same loop."""
    while time.monotonic() < until:
        t = time.monotonic()
        await asyncio.sleep(0.02)
        late.append(time.monotonic() - t - 0.02)


async def test_announce_frames_on_the_wire():
    async with VirtualLan("198.18.0.1/24") as lan:
        name = f"{lan.prefix[-8:]}an"
        fd = await asyncio.to_thread(taplib.open_tap, name, lan.lan_ns)
        try:
            await taplib.attach(name, lan.bridge, lan.lan_ns)
            cap = await asyncio.to_thread(_capture_socket, lan.host_ns, lan.host_if)
            await asyncio.sleep(0.2)                  # the bridge port forwards
            sched = A.Schedule()
            t0 = time.monotonic()
            grab = asyncio.create_task(asyncio.to_thread(_collect, cap, t0 + 1.5))
            late: list[float] = []
            beat = asyncio.create_task(_loop_lateness(late, t0 + 1.3))
            n = await A.announce(lambda f: os.write(fd, f), MAC, IPV4, IPV6, sched)
            got = await grab
            await beat
            cap.close()
            assert n == sched.rounds * (1 + len(IPV4) + len(IPV6))
            rarps = [(t, f) for t, f in got if f[12:14] == b"\x80\x35"]
            arps = [(t, Ether(f)) for t, f in got if Ether(f).haslayer(ARP)]
            nas = [(t, Ether(f)) for t, f in got if Ether(f).haslayer(ICMPv6ND_NA)]
            assert len(rarps) == sched.rounds, [Ether(f).summary() for _, f in got]
            assert len(arps) == sched.rounds * len(IPV4) and len(nas) == sched.rounds * len(IPV6)
            for _, f in rarps:       # QEMU's frame: broadcast, opcode 3, sender = target = MAC
                assert f[:6] == b"\xff" * 6 and f[20:22] == b"\x00\x03"
                assert f[22:28] == f[32:38] == bytes.fromhex(MAC.replace(":", ""))
            for _, e in arps:        # gratuitous: who-has its own address, broadcast
                a = e[ARP]
                assert e.dst == "ff:ff:ff:ff:ff:ff" and a.op == 1 and a.psrc == a.pdst and a.psrc in IPV4
                assert a.hwsrc == MAC
            for _, e in nas:
                na = e[ICMPv6ND_NA]
                assert e[IPv6].dst == "ff02::1" and e[IPv6].hlim == 255 and na.O == 1 and na.S == 0
                assert na.tgt in IPV6 and e[ICMPv6NDOptDstLLAddr].lladdr == MAC
            # spacing between rounds follows the schedule (a generous margin: shared machine)
            times = [t for t, _ in rarps]
            gaps = [(b - a) * 1000 for a, b in zip(times, times[1:])]
            # (capture times are taken after recv in a thread: a few ms of jitter each; a
            # round goes out late by what this loop's timers were late, measured alongside)
            slack = 2000 * max(late)
            for gap, want in zip(gaps, sched.delays_ms()):
                assert want - 25 <= gap <= want + 80 + slack, (gaps, sched.delays_ms(), slack)
            span = (times[-1] - times[0]) * 1000
            assert sum(sched.delays_ms()) - 25 <= span <= sum(sched.delays_ms()) + 150 + slack, (span, gaps, slack)
            # the bridge learnt the MAC on the tap's port
            fdb = subprocess.run(["ip", "netns", "exec", lan.lan_ns, "bridge", "fdb", "show", "br", lan.bridge],
                                 capture_output=True, text=True).stdout
            assert any(MAC in line and f"dev {name}" in line for line in fdb.splitlines()), fdb
        finally:
            os.close(fd)


def test_netback_learns_guest_ipv6_addresses():
    """What the announce's NAs are for: the IPv6 addresses a guest claims in its neighbour
    discovery (a solicitation's source, an advertisement's target: its link-local and
    global ones), not DAD's unspecified source nor multicast, at most 8; IPv4 frames
    leave the list alone (tests/test_redteam_announce.py: what else is not learnt)."""
    from types import SimpleNamespace

    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS

    from aiovmm.backends.net import Netback, VifConfig
    nb = SimpleNamespace(ipv6=[], cfg=VifConfig.parse(f"mac={MAC}"), _mac_bytes=bytes.fromhex(MAC.replace(":", "")))
    nb._learn = lambda known, ip: Netback._learn(nb, known, ip)
    learn = Netback.learn_ipv6

    def ns(src: str) -> bytes:
        return bytes(Ether(src=MAC, dst="33:33:00:00:00:01") / IPv6(src=src, dst="ff02::1:ff00:1") /
                     ICMPv6ND_NS(tgt="fe80::1"))
    learn(nb, bytes(Ether(src=MAC) / IPv6(src="::", dst="ff02::1:ff00:42") / ICMPv6ND_NS(tgt="fe80::42")))
    learn(nb, bytes(Ether(src=MAC) / IP(src="198.18.0.42", dst="198.18.0.1") / UDP()))
    assert nb.ipv6 == []
    learn(nb, ns("fe80::216:3eff:fe5a:102"))
    learn(nb, bytes(Ether(src=MAC) / IPv6(src="fe80::216:3eff:fe5a:102", dst="fe80::1") /
                    ICMPv6ND_NA(tgt="2001:db8::42")))
    learn(nb, ns("2001:db8::42"))
    assert nb.ipv6 == ["fe80::216:3eff:fe5a:102", "2001:db8::42"]
    for i in range(20):
        learn(nb, ns(f"2001:db8::1:{i:x}"))
    assert len(nb.ipv6) == 8
