"""Red-team: the addresses netback learns from a guest's frames for the migration announce
(at most 8 per family) and those a migration stream's header carries for a vif.

The announce (aiovmm/migration/announce.py) is sent by the host on the new host: every
address in it draws that address's traffic to the guest's MAC. So it must hold only
addresses the guest claims as its own, never those of packets it forwards or bridges for
others (their IPv4 source, frames from another MAC), never multicast, broadcast,
unspecified or loopback addresses, and with xl's `ip=` set (Xen's vif scripts let only
those source addresses out: vif-common.sh handle_iptable) only those. A migration
stream's header is the peer's word: the same rule applies to it.

The frames are what a guest puts on its tx ring, fed to the real Netback of a parked
domain; the header goes through the real receiver's device parsing (devices.parse/create).
"""
from __future__ import annotations

import asyncio

import pytest

from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6ND_RS, IPv6
from scapy.layers.l2 import ARP, Ether

from aiovmm import Hypervisor, lab
from aiovmm.backends.net import Netback, VifConfig
from aiovmm.migration import devices
from conftest import kernel

MAC = "00:16:3e:5a:01:02"
OTHER = "00:16:3e:77:77:77"


def _with_netback(spec: str, fn) -> None:
    async def main():
        async with Hypervisor(memory_mib=32) as hv:
            p = lab.park(hv, kernel(), 4, "vifowner")
            try:
                fn(hv, p.dom, Netback(p.dom, 0, VifConfig.parse(spec)))
            finally:
                lab.destroy(p)
    asyncio.run(main())


def arp(psrc: str, src: str = MAC, hwsrc: str = MAC, op: int = 1) -> bytes:
    return bytes(Ether(src=src, dst="ff:ff:ff:ff:ff:ff") /
                 ARP(op=op, hwsrc=hwsrc, psrc=psrc, pdst="198.18.0.1"))


def feed(nb: Netback, *frames: bytes) -> None:
    for f in frames:
        nb.learn_ipv4(f)
        nb.learn_ipv6(f)


def test_forwarded_and_spoofed_sources_not_learnt():
    def body(hv, dom, nb):
        feed(nb,
             # a router guest forwarding another host's packets (from its own MAC)
             bytes(Ether(src=MAC) / IP(src="198.18.0.99", dst="198.18.0.1") / ICMP()),
             bytes(Ether(src=MAC) / IPv6(src="2001:db8::99", dst="2001:db8::1") / ICMPv6EchoRequest()),
             # a bridge inside the guest: frames and ARPs of other MACs
             arp("198.18.0.77", src=OTHER, hwsrc=OTHER),
             arp("198.18.0.78", hwsrc=OTHER), arp("198.18.0.79", src=OTHER),
             bytes(Ether(src=OTHER) / IPv6(src="fe80::77", dst="ff02::2") / ICMPv6ND_RS()),
             # not addresses of anyone
             arp("0.0.0.0"), arp("0.1.2.3"), arp("127.0.0.1"), arp("224.0.0.1"), arp("255.255.255.255"),
             arp("240.0.0.1"),
             bytes(Ether(src=MAC) / IPv6(src="::", dst="ff02::1:ff00:42") / ICMPv6ND_NS(tgt="fe80::42")),
             bytes(Ether(src=MAC) / IPv6(src="::1", dst="ff02::2") / ICMPv6ND_RS()),
             bytes(Ether(src=MAC) / IPv6(src="fe80::1", dst="ff02::1") / ICMPv6ND_NA(tgt="ff02::1")),
             bytes(Ether(src=MAC) / IPv6(src="fe80::1", dst="ff02::1") / ICMPv6ND_NA(tgt="::ffff:198.18.0.5")),
             # NDP that was forwarded (hop limit below 255) is not neighbour discovery
             bytes(Ether(src=MAC) / IPv6(src="fe80::99", dst="ff02::2", hlim=254) / ICMPv6ND_RS()))
        # Frames shaped like a claim that are not one: a RARP request, an ARP for another
        # protocol, an IPv6 UDP datagram whose port bytes read as an RS type, a non-IPv6
        # EtherType or version carrying an RS.
        rs = bytes(Ether(src=MAC) / IPv6(src="2001:db8::61", dst="ff02::2") / ICMPv6ND_RS())
        not_ip = bytearray(arp("198.18.0.62"))
        not_ip[16:18] = b"\x86\xdd"
        feed(nb, arp("198.18.0.61", op=3), bytes(not_ip),
             bytes(Ether(src=MAC) / IPv6(src="2001:db8::63", dst="2001:db8::1", hlim=255) / UDP(sport=133 << 8)),
             rs[:12] + b"\x88\xb5" + rs[14:], rs[:14] + bytes([0x40 | rs[14] & 0xF]) + rs[15:],
             # ARP bytes under another EtherType; truncated: an ARP cut inside its sender
             # address, an RS inside its IPv6 header or its ICMPv6 body, an NA inside its target
             arp("198.18.0.65")[:12] + b"\x88\xb5" + arp("198.18.0.65")[14:], arp("198.18.0.66")[:30],
             rs[:40], rs[:61], bytes(Ether(src=MAC) / IPv6(src="fe80::1", dst="ff02::1") / ICMPv6ND_NA(tgt="2001:db8::64"))[:70])
        assert (nb.ipv4, nb.ipv6) == ([], [])
        # What the guest says of itself: its ARPs, its neighbour discovery.
        feed(nb, arp("198.18.0.42"), arp("198.18.0.42", op=2),
             bytes(Ether(src=MAC) / IPv6(src="fe80::216:3eff:fe5a:102", dst="ff02::2") / ICMPv6ND_RS()),
             bytes(Ether(src=MAC) / IPv6(src="fe80::216:3eff:fe5a:102", dst="fe80::1") /
                   ICMPv6ND_NA(tgt="2001:db8::42")),
             bytes(Ether(src=MAC) / IP(src="198.18.0.43", dst="198.18.0.1") / UDP()))
        assert nb.ipv4 == ["198.18.0.42"]
        assert nb.ipv6 == ["fe80::216:3eff:fe5a:102", "2001:db8::42"]
        # A flood: still at most 8, the first ones kept.
        feed(nb, *(arp(f"198.18.1.{i}") for i in range(50)))
        assert len(nb.ipv4) == 8 and nb.ipv4[0] == "198.18.0.42"
        feed(nb, *(bytes(Ether(src=MAC) / IPv6(src=f"2001:db8::1:{i:x}", dst="ff02::2") / ICMPv6ND_RS())
                   for i in range(50)))
        assert len(nb.ipv6) == 8 and nb.ipv6[0] == "fe80::216:3eff:fe5a:102"
    _with_netback(f"mac={MAC}", body)


def test_ip_setting_is_the_authority():
    """xl `ip=198.18.0.42 2001:db8::/64`: the guest's ARP for another guest's address
    (198.18.0.50) is not learnt; its own and those in the configured network are."""
    def body(hv, dom, nb):
        feed(nb, arp("198.18.0.50"), arp("198.18.0.42"),
             bytes(Ether(src=MAC) / IPv6(src="2001:db9::1", dst="ff02::2") / ICMPv6ND_RS()),
             bytes(Ether(src=MAC) / IPv6(src="2001:db8::7", dst="ff02::2") / ICMPv6ND_RS()))
        assert (nb.ipv4, nb.ipv6) == (["198.18.0.42"], ["2001:db8::7"])
    _with_netback(f"mac={MAC},ip=198.18.0.42 2001:db8::/64", body)


def test_ip_setting_is_bounded():
    """Every frame netback learns from is checked against each `ip=` entry: at most 8
    (a stream's header could otherwise carry a megabyte of them)."""
    spec = f"mac={MAC},ip=" + " ".join(f"198.18.0.{i}" for i in range(8))
    assert len(VifConfig.parse(spec).ip) == 8
    with pytest.raises(ValueError, match="at most 8"):
        VifConfig.parse(spec + " 198.18.0.9")


def test_stream_header_addresses_pass_the_same_rule():
    """A hostile peer's xl header lists broadcast, multicast, unspecified, loopback and, for
    a vif with `ip=`, an address outside it: the new vif announces none of them."""
    def body(hv, dom, nb):
        bad4 = ["255.255.255.255", "224.0.0.1", "0.0.0.0", "127.0.0.1", "198.18.0.9"]
        bad6 = ["ff02::1", "::", "::1", "::ffff:198.18.0.9"]
        cfg = {"vifs": [
            {"devid": 0, "spec": f"mac={MAC}", "ipv4": bad4 + ["198.18.0.9"], "ipv6": bad6 + ["fe80::9"]},
            {"devid": 1, "spec": f"mac={OTHER},ip=198.18.0.42", "ipv4": ["198.18.0.9", "198.18.0.42"],
             "ipv6": ["fe80::9"]}]}
        vifs, _disks = devices.parse(hv, cfg)
        devices.create(hv, dom, vifs, [], announce=False)
        a, b = dom.backends[-2:]
        assert (a.ipv4, a.ipv6) == (["198.18.0.9"], ["fe80::9"])
        assert (b.ipv4, b.ipv6) == (["198.18.0.42"], [])
        # and the setting goes into the next save's header
        described = devices.describe(dom)["vifs"]
        assert described[1]["spec"].endswith(",ip=198.18.0.42/32")
        again, _ = devices.parse(hv, {"vifs": described})
        assert again[1][1].ip == b.cfg.ip
        dom.backends[-2:] = []
    _with_netback(f"mac={MAC}", body)
