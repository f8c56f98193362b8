"""Debian's xen-netfront on netback's fast path (issue 14, network): the features it
negotiates, TCP each way with GSO on, checksummed at both ends, and host -> guest at the
rate TCP gets with nothing dropped at the tap.

One Linux guest (Unicorn; the module boots it once) with a vif on a VirtualLan. Transfer
size: TRANSFER_MIB each way (default 32 MiB, env AIOVMM_NET_TRANSFER_MIB). The issue asks
for 1 GiB; on this machine the emulated guest hashes ~4 MB/s and moves 50-75 Mbit/s, so
1 GiB would take ~5 minutes per direction: 32 MiB keeps each direction near 10-20 s.

Both ends checksum: guest -> host sends a 4 MiB random block of the guest's, N times; the
guest prints its md5 and the host hashes every 4 MiB it receives, each must match. Host ->
guest sends N fresh random 4 MiB blocks; the host hashes the whole stream as it sends it,
the guest hashes what it received (busybox md5sum); the two must match.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time

import pytest

from aiovmm import Hypervisor
from aiovmm.backends.net import tap as taplib
from aiovmm.testing import VirtualLan
from test_linux import BOOT_TIMEOUT, INITRD, KERNEL, Lab, Shell, wait_ready

GUEST_IP, HOST_IP = "198.18.12.2", "198.18.12.1"
BLOCK = 4 << 20
TRANSFER_MIB = int(os.environ.get("AIOVMM_NET_TRANSFER_MIB", "32"))
NBLOCKS = max(1, TRANSFER_MIB * (1 << 20) // BLOCK)

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun")

# Host side, guest -> host: accept one connection; the total, the digest (argv[3], md5 by
# default) of the whole stream and of every 4 MiB block.
RECV = r"""
import hashlib, socket, sys
n, block, algo = int(sys.argv[1]), int(sys.argv[2]), (sys.argv[3:] or ["md5"])[0]
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", 5001)); ls.listen(1)
print("ready", flush=True)
ls.settimeout(600)                  # the guest makes its data first (minutes under load)
c, _ = ls.accept(); c.settimeout(60)
sums, total, h, left, whole = [], 0, hashlib.new(algo), block, hashlib.new(algo)
buf = bytearray(1 << 20)
while len(sums) < n:
    k = c.recv_into(buf, min(len(buf), left))
    if not k:
        break
    h.update(memoryview(buf)[:k]); whole.update(memoryview(buf)[:k]); total += k; left -= k
    if left == 0:
        sums.append(h.hexdigest()); h, left = hashlib.new(algo), block
c.close()
print(" ".join(["total=%d" % total, whole.hexdigest()] + sums))
"""

# Host side, host -> guest: connect (the guest's nc may not listen yet), send n fresh random
# blocks as fast as TCP takes them, hashing them; close the sending side and read back the
# digest the guest's md5sum (or gibio sum) computed over what it received (nc -e md5sum:
# the socket is its stdin and stdout); argv[4] the hash, md5 by default.
SEND = r"""
import hashlib, os, socket, sys, time
dst, n, block = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
algo = (sys.argv[4:] or ["md5"])[0]
for _ in range(100):
    try:
        s = socket.create_connection((dst, 5002), timeout=5); break
    except OSError:
        time.sleep(0.2)
s.settimeout(300)
h = hashlib.new(algo)
t0 = time.perf_counter()
for _ in range(n):
    b = os.urandom(block); h.update(b); s.sendall(b)
s.shutdown(socket.SHUT_WR)
reply = b""
while True:
    k = s.recv(4096)
    if not k:
        break
    reply += k
el = time.perf_counter() - t0
print("sum=%s s=%.3f guest=%s" % (h.hexdigest(), el, reply.decode().split()[0] if reply.strip() else "-"))
"""


@pytest.fixture(scope="module")
def lx():
    if not KERNEL.exists() or not INITRD.exists():
        pytest.skip("Debian kernel and initramfs not built (make setup)")
    lab = Lab()
    try:
        async def start():
            lab.hv = Hypervisor(memory_mib=512)
            await lab.hv.__aenter__()
            lab.lan = VirtualLan(f"{HOST_IP}/24")
            await lab.lan.__aenter__()
            lab.dom = await lab.hv.create(str(KERNEL), memory_mib=256, ramdisk=str(INITRD), name="lxnet",
                                          cmdline=f"console=hvc0 quiet aiovmm.ip={GUEST_IP}/24",
                                          vifs=[lab.lan.vif("00:16:3e:12:00:02")])
            await wait_ready(lab.dom, stall=None)     # quiet: no stall bound
            lab.sh = Shell(lab.dom)
            lab.nb = lab.dom.backends[0]

        lab.call(start(), BOOT_TIMEOUT + 120)
        yield lab
    finally:
        async def stop():
            for attr in ("hv", "lan"):
                obj = getattr(lab, attr, None)
                if obj is not None:
                    await obj.__aexit__(None, None, None)
        try:
            lab.call(stop(), 120)
        finally:
            lab.loop.call_soon_threadsafe(lab.loop.stop)
            lab.thread.join(10)


def tap_counters(lab) -> dict[str, int]:
    """The tap's kernel counters (its TX is towards the guest)."""
    out = subprocess.run(["ip", "netns", "exec", lab.lan.lan_ns, "ip", "-s", "-j", "link", "show",
                          lab.nb.ifname], capture_output=True, text=True, check=True).stdout
    st = json.loads(out)[0]["stats64"]
    return {"tx_packets": st["tx"]["packets"], "tx_dropped": st["tx"]["dropped"],
            "rx_packets": st["rx"]["packets"]}


async def host_proc(lan: VirtualLan, *argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec("ip", "netns", "exec", lan.host_ns, *argv,
                                                stdout=asyncio.subprocess.PIPE)


def net_features_negotiated(hv, nb) -> None:
    """What netback offered and Debian's netfront took, as xenstore shows it, and what
    netback set up from it (shared with test_linux_gib)."""
    st = hv.xenstore.store
    for key in ("feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6", "feature-ipv6-csum-offload",
                "feature-rx-copy"):
        assert st.read(f"{nb.back}/{key}") == b"1", key
    # Debian's netfront took them and says what it takes on rx.
    for key in ("feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6", "feature-ipv6-csum-offload",
                "request-rx-copy", "feature-rx-notify"):
        assert st.read(f"{nb.front}/{key}") == b"1", key
    assert nb.sg_rx and nb.csum_rx and nb.gso_rx == {1, 2}
    assert nb._offload == taplib.TunOffload.CSUM | taplib.TunOffload.TSO4 | taplib.TunOffload.TSO6


def test_features_negotiated_in_xenstore(lx):
    net_features_negotiated(lx.hv, lx.nb)


def g2h_checksummed(lab, nblocks: int, fresh: bool = False) -> float:
    """Guest -> host over TCP: the guest's 4 MiB random block `nblocks` times, the host's md5
    of every block must be the guest's; or, `fresh`, nblocks * 4 MiB of new random data from
    gibio (1 MiB writes, SHA-256 in the guest and on the host of the whole stream: shared
    with test_linux_gib, 1 GiB on KVM). Netback must have seen TSO packets. Returns the
    seconds it took."""
    if fresh:
        gen = (f"printf '#!/bin/sh\\nexec gibio gen {nblocks * BLOCK >> 20} 2>/tmp/g2h.sum\\n' > /tmp/g2h.sh && "
               f"chmod +x /tmp/g2h.sh && nc {HOST_IP} 5001 -e /tmp/g2h.sh; cat /tmp/g2h.sum; rm /tmp/g2h.sh")
    else:
        gen = (f"head -c {BLOCK} /dev/urandom > /tmp/g2h && md5sum /tmp/g2h && "
               f"printf '#!/bin/sh\\nfor i in $(seq {nblocks}); do dd if=/tmp/g2h bs=1M 2>/dev/null; done\\n'"
               f" > /tmp/g2h.sh && chmod +x /tmp/g2h.sh && nc {HOST_IP} 5001 -e /tmp/g2h.sh; "
               f"rm /tmp/g2h /tmp/g2h.sh")

    async def go():
        recv = await host_proc(lab.lan, "python3", "-c", RECV, str(nblocks), str(BLOCK),
                               "sha256" if fresh else "md5")
        try:
            assert (await recv.stdout.readline()).strip() == b"ready"
            before = lab.nb.stats.tx_gso
            t0 = time.monotonic()
            rc, out = await lab.sh.run(gen, timeout=600)
            got = (await asyncio.wait_for(recv.stdout.read(), 120)).decode().split()
            took = time.monotonic() - t0
        finally:
            if recv.returncode is None:
                recv.kill()
            await recv.wait()
        return rc, out, got, lab.nb.stats.tx_gso - before, took

    rc, out, got, gso, took = lab.call(go(), 900)
    guest_sum = out[-1 if fresh else 0].split()[0]
    assert re.fullmatch(r"[0-9a-f]{64}" if fresh else r"[0-9a-f]{32}", guest_sum), out
    assert got[0] == f"total={nblocks * BLOCK}", got[:1]
    if fresh:
        assert got[1] == guest_sum and out[-1].split()[1] == str(nblocks * BLOCK), (out, got[:2])
    else:
        assert got[2:] == [guest_sum] * nblocks, (guest_sum, got)
    assert gso > 0, "no TSO packet from the guest"
    assert lab.nb.stats.tx_errors == 0 and lab.nb.stats.bad_indices == 0, lab.nb.stats
    print(f"g2h {nblocks * BLOCK >> 20} MiB ({'fresh, SHA-256' if fresh else 'one 4 MiB block'}) in {took:.1f} s")
    return took


def test_tcp_guest_to_host_gso_checksummed(lx):
    g2h_checksummed(lx, NBLOCKS)


def h2g_checksummed(lab, nblocks: int, tool: str = "md5sum") -> float:
    """Host -> guest over TCP as fast as it goes: `nblocks` fresh random 4 MiB blocks, hashed
    by the host as it sends and by the guest's md5sum (or `tool` "gibio sum": SHA-256, 1 MiB
    reads; test_linux_gib's 1 GiB on KVM) as it receives; nothing dropped at the tap (its
    kernel counters) nor in netback, GSO packets to the guest. Returns the sender's seconds."""
    async def go():
        tap0 = tap_counters(lab)
        st0 = (lab.nb.stats.rx_dropped, lab.nb.stats.rx_gso)
        rc, out = await lab.sh.run(f"printf '#!/bin/sh\\nexec {tool}\\n' > /tmp/h2g.sh && chmod +x /tmp/h2g.sh && "
                                   f"{{ nc -l -p 5002 -e /tmp/h2g.sh & }}")
        assert rc == 0, out
        send = await host_proc(lab.lan, "python3", "-c", SEND, GUEST_IP, str(nblocks), str(BLOCK),
                               "md5" if tool == "md5sum" else "sha256")
        sent = (await asyncio.wait_for(send.stdout.read(), 900)).decode()
        await send.wait()
        tap1 = tap_counters(lab)
        return sent, tap0, tap1, st0

    sent, tap0, tap1, (dropped0, gso0) = lab.call(go(), 1000)
    m = re.search(r"sum=([0-9a-f]+) s=([\d.]+) guest=(\S+)", sent)
    assert m, sent
    assert m.group(3) == m.group(1), sent                # the guest hashed what the host sent
    # Flow control: the tap was never read faster than the guest posted buffers, and the
    # kernel's queue in front of it dropped nothing; netback dropped nothing either.
    assert tap1["tx_dropped"] == tap0["tx_dropped"], (tap0, tap1)
    assert lab.nb.stats.rx_dropped == dropped0, lab.nb.stats
    assert lab.nb.stats.rx_gso > gso0, "no GSO packet to the guest"
    print(f"h2g {nblocks * BLOCK >> 20} MiB in {m.group(2)} s "
          f"({nblocks * BLOCK * 8 / float(m.group(2)) / 1e6:.1f} Mbit/s, the guest hashing), "
          f"tap {tap0} -> {tap1}, netback {lab.nb.stats}")
    return float(m.group(2))


def test_tcp_host_to_guest_gso_checksummed_nothing_dropped(lx):
    h2g_checksummed(lx, NBLOCKS)


def test_h2g_tcp_line_rate_with_a_pause_nothing_dropped(lx):
    """iperf3 host -> guest as fast as it goes (the guest's iperf3 reads fast), and mid-run
    the guest is paused for 2 s: neither the tap's queue nor netback drops anything (the
    guest's window and the ring absorb what is in flight). The sender's retransmission
    timer does fire during the pause (no ACK for 2 s), so retransmits are reported, not
    asserted."""
    async def go():
        rc, out = await lx.sh.run("{ iperf3 -s -1 > /dev/null 2>&1 & }")
        assert rc == 0, out
        tap0 = tap_counters(lx)
        st0 = (lx.nb.stats.rx_dropped, lx.nb.stats.rx_waits, lx.nb.stats.rx_bytes)
        for _ in range(50):
            p = await host_proc(lx.lan, "iperf3", "-c", GUEST_IP, "-t", "10", "-J")
            await asyncio.sleep(3)
            if p.returncode is None:
                break
            await p.wait()                           # the guest's server was not up yet
            await asyncio.sleep(0.5)
        lx.dom.pause()
        await asyncio.sleep(2)
        lx.dom.unpause()
        out = (await asyncio.wait_for(p.stdout.read(), 120)).decode()
        await p.wait()
        return out, tap0, tap_counters(lx), st0

    out, tap0, tap1, (dropped0, waits0, bytes0) = lx.call(go(), 300)
    res = json.loads(out)
    sent = res["end"]["sum_sent"]
    assert tap1["tx_dropped"] == tap0["tx_dropped"], (tap0, tap1)
    assert lx.nb.stats.rx_dropped == dropped0, lx.nb.stats
    assert lx.nb.stats.rx_bytes - bytes0 >= res["end"]["sum_received"]["bytes"] > 0, (lx.nb.stats, sent)
    print(f"h2g iperf3 {sent['bits_per_second'] / 1e6:.1f} Mbit/s with a 2 s pause, "
          f"{sent['retransmits']} retransmits, "
          f"{lx.nb.stats.rx_waits - waits0} waits, tap {tap0} -> {tap1}")


# Host side: n datagrams of `size` bytes to dst:9 (discard: the guest's kernel counts them)
# as fast as the socket takes them.
BURST = r"""
import socket, sys
dst, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
for i in range(n):
    s.sendto(i.to_bytes(4, "little") + bytes(size - 4), (dst, 9))
print("sent", n)
"""


def test_h2g_burst_while_paused_waits_instead_of_dropping(lx):
    """Receive flow control itself: with the guest paused its rx ring runs dry (256
    buffers); a burst of 600 datagrams must then wait, the one netback already read in
    netback and the rest in the tap's queue (500 frames), not be read and dropped. After
    the guest resumes every one of them reaches it."""
    n = 600
    mac = lx.nb.mac

    async def go():
        # A permanent neighbour entry: no ARP needed while the guest is paused.
        rc, out = await lx.lan.run("ip", "neigh", "replace", GUEST_IP, "lladdr", mac, "dev",
                                   lx.lan.host_if, "nud", "permanent")
        assert rc == 0, out
        rc, before = await lx.sh.run("cat /proc/net/dev | grep eth0")
        tap0 = tap_counters(lx)
        st0 = (lx.nb.stats.rx_packets, lx.nb.stats.rx_waits, lx.nb.stats.rx_dropped)
        lx.dom.pause()
        try:
            rc, out = await lx.lan.run("python3", "-c", BURST, GUEST_IP, str(n), "1000")
            assert rc == 0, out
            await asyncio.sleep(1)
            held = (lx.nb._rx_len != 0, lx.nb._reader_on)
        finally:
            lx.dom.unpause()
        for _ in range(300):
            if lx.nb.stats.rx_packets - st0[0] >= n:
                break
            await asyncio.sleep(0.1)
        rc, after = await lx.sh.run("cat /proc/net/dev | grep eth0")
        return held, tap0, tap_counters(lx), st0, before, after

    held, tap0, tap1, (pk0, waits0, dropped0), before, after = lx.call(go(), 300)
    assert held == (True, False), "while the ring was dry, a frame waited and the tap was not read"
    assert lx.nb.stats.rx_waits > waits0
    assert tap1["tx_dropped"] == tap0["tx_dropped"], (tap0, tap1)
    assert lx.nb.stats.rx_dropped == dropped0
    assert lx.nb.stats.rx_packets - pk0 >= n, lx.nb.stats
    # The guest's netfront counted them all in (and dropped none).
    f0, f1 = before[0].split(":")[1].split(), after[0].split(":")[1].split()
    assert int(f1[1]) - int(f0[1]) >= n and f1[3] == f0[3], (before, after)
