"""Live migration of a networked guest with a disk between two "hosts" (aiovmm.testing.
TwoHostLan: two hypervisors, each with its own bridge uplinked to a learning switch in a
test-made namespace, a client namespace on the switch).

The guest (guests/tests/net.c with suspend=1 disk=N) serves ICMP and HTTP and writes
numbered records to its disk while a 10 ms ping and a TCP download from the client run
across the migration. After it: the switch's MAC table points at the destination's
uplink, the client's neighbour entry was refreshed by the destination's gratuitous ARP,
the announce frames that entered the switch from the destination are dissected with scapy
(RARP as QEMU sends it, gratuitous ARP for the guest's address; rounds on QEMU's
schedule), the download's checksum is right, and every write the guest saw acknowledged
is on the disk. Also: save -> restore on one host with the devices reconnected.
"""
from __future__ import annotations

import asyncio
import hashlib
import re
import time

import pytest
from scapy.layers.l2 import ARP, Ether

from aiovmm import Hypervisor
from aiovmm.migration import live
from aiovmm.migration.announce import ETH_P_RARP, Schedule
from aiovmm.testing import TwoHostLan
from aiovmm.xenbus import XenbusState, read_state
from conftest import HV_MEMORY_MIB, guest

SECRET = b"lan-test-secret-0123456789"
MAC = "00:16:3e:4d:01:02"
GUEST_IP = "198.18.0.2"
RECORDS = 4000
DOWNLOAD = 3_000_000
PING_LOSS_MAX = 2


def stream_body(n: int) -> bytes:
    """guests/kernel/net/tcp.c stream_byte()."""
    return bytes((((o ^ (o >> 8) ^ (o >> 16)) * 167 + 13) & 255) for o in range(n))


def record(k: int) -> bytes:
    head = f"rec {k}\n".encode()
    return head + bytes(((k * 131 + i) & 255) for i in range(len(head), 512))


def acked(*doms) -> int:
    best = 0
    for d in doms:
        for line in d.console_lines:
            m = re.fullmatch(r"disk: (?:acked|done) (\d+)", line)
            if m:
                best = max(best, int(m.group(1)))
    return best


@pytest.fixture
async def two_hosts():
    async with TwoHostLan("198.18.0.1/24") as lan:
        async with Hypervisor(memory_mib=HV_MEMORY_MIB, netns=lan.host_ns["a"]) as a, \
                Hypervisor(memory_mib=HV_MEMORY_MIB, netns=lan.host_ns["b"]) as b:
            arrived = []
            rx = await live.serve(b, "127.0.0.1", 0, SECRET, arrived.append)
            try:
                yield lan, a, b, rx, arrived
            finally:
                await rx.aclose()


async def _netguest(hv, lan, disk: str, records: int = RECORDS):
    dom = await hv.create(guest("net"), memory_mib=8,
                          cmdline=f"ip={GUEST_IP}/24 suspend=1 disk={records}",
                          vifs=[lan.vif("a", MAC)], disks=[f"target={disk},vdev=xvda,access=rw"])
    await dom.wait_for_line(r"net: serving", 30)
    return dom


def _check_disk(path: str, n: int) -> None:
    with open(path, "rb") as f:
        data = f.read(n * 512)
    bad = [k for k in range(n) if data[k * 512:(k + 1) * 512] != record(k)]
    assert not bad, f"{len(bad)} acknowledged records missing or wrong, first {bad[:5]}"



def _ping_summary(pout: str) -> tuple[int, int, list[int]]:
    """ping's output: packets sent, replies received, and the icmp_seq numbers never answered."""
    m = re.search(r"(\d+) packets transmitted, (\d+) received", pout)
    assert m, pout
    sent, got = int(m.group(1)), int(m.group(2))
    seqs = {int(x) for x in re.findall(r"icmp_seq=(\d+) ", pout)}
    return sent, got, sorted(set(range(1, sent + 1)) - seqs)

async def test_live_migration_on_a_switched_lan(two_hosts, tmp_path):
    lan, a, b, rx, arrived = two_hosts
    disk = str(tmp_path / "disk.img")
    with open(disk, "wb") as f:
        f.truncate(4 << 20)
    dom = await _netguest(a, lan, disk)
    rc, out = await lan.run("ping", "-c", "2", "-i", "0.2", "-W", "2", GUEST_IP)
    assert rc == 0, out
    assert await asyncio.to_thread(lan.fdb_port, MAC) == "up-a"
    # The client's entry made REACHABLE by hand: only an ARP it receives makes it STALE
    # (Linux arp_process: a gratuitous ARP overrides and leaves the entry STALE).
    rc, out = await lan.run("ip", "neigh", "replace", GUEST_IP, "lladdr", MAC, "dev", "eth0",
                            "nud", "reachable")
    assert rc == 0, out
    cap = await asyncio.to_thread(lan.capture, "up-b", (0x0806, ETH_P_RARP, 0x86DD))
    cap_a = await asyncio.to_thread(lan.capture, "up-a", (0x0800, 0x0806, 0x86DD))
    client_cap = await asyncio.to_thread(lan.capture_client, (0x0806,))
    rc, out = await lan.run("ip", "neigh", "show", GUEST_IP, "dev", "eth0")
    assert f"lladdr {MAC} REACHABLE" in out, out
    ping = asyncio.ensure_future(lan.run("ping", "-n", "-i", "0.01", "-c", "400", "-W", "2", GUEST_IP,
                                         timeout=15))
    download = asyncio.ensure_future(lan.run(
        "sh", "-c", f"curl -sS -m 30 http://{GUEST_IP}/stream/{DOWNLOAD} | sha256sum", timeout=40))
    try:
        await asyncio.sleep(1.0)
        st = await live.migrate(dom, "127.0.0.1", rx.port, SECRET, downtime_ms=30)
        t_done = time.time_ns()
        # The switch learnt the destination's port from the announce, which goes out as soon
        # as the destination has the whole stream (before it answers READY): it points there
        # when the migration returns.
        port = await asyncio.to_thread(lan.fdb_port, MAC)
        assert port == "up-b", port
        new = arrived[0]
        nb = new.backends[0]
        # The receiver closes the connection once the guest is back on its vif, and the
        # sender tears the source down only then (its teardown off the guest's reconnect).
        assert nb.connected.is_set() and st.marks["receiver_closed"] >= st.marks["done"]
        assert read_state(b.xenstore.store, nb.front) == XenbusState.Connected
        await new.wait_for_line(r"net: resumed rc=0", 10)
        (prc, pout), (drc, dout) = await asyncio.gather(ping, download)
        for _ in range(300):                   # every round of the announce has gone out
            if nb.announced >= 2 * Schedule().rounds:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
    finally:
        for t in (ping, download):
            if not t.done():
                t.cancel()
        await asyncio.gather(ping, download, return_exceptions=True)
    frames = cap.frames()
    cap.close()
    from_a = cap_a.frames()
    cap_a.close()
    client_arp = client_cap.frames()
    client_cap.close()

    # Announce frames entering the switch from the destination's uplink, dissected.
    mine = [(ts, Ether(raw)) for ts, raw in frames if Ether(raw).src == MAC]
    rarp = [(ts, e) for ts, e in mine if e.type == ETH_P_RARP]
    garp = [(ts, e) for ts, e in mine if ARP in e and e[ARP].op == 1 and e[ARP].psrc == e[ARP].pdst]
    sched = Schedule()
    assert len(rarp) == sched.rounds and len(garp) == sched.rounds, \
        ([(ts - t_done) / 1e6 for ts, _e in mine], [e.summary() for _t, e in mine])
    for _ts, e in rarp:
        raw = bytes(e)
        assert e.dst == "ff:ff:ff:ff:ff:ff" and raw[14:22] == bytes.fromhex("0001080006040003")
        assert raw[22:28] == raw[32:38] == bytes.fromhex(MAC.replace(":", ""))
    for _ts, e in garp:
        arp = e[ARP]
        assert e.dst == "ff:ff:ff:ff:ff:ff" and arp.hwsrc == MAC and arp.psrc == GUEST_IP
    gaps = [(rarp[i + 1][0] - rarp[i][0]) / 1e6 for i in range(len(rarp) - 1)]
    for want, got_ms in zip(sched.delays_ms(), gaps):
        assert want - 2 <= got_ms <= want + 150, (gaps, sched.delays_ms())
    assert rarp[0][0] <= t_done                    # announced before the migration returned
    # Every frame the guest sent on the source was on the wire before the destination
    # announced it: a later one turns the switch back to the source (the source's tap
    # writer, behind at normal priority, wrote the guest's last replies 40-50 ms after its
    # suspend, and the pings that followed went to the old host).
    mac = bytes.fromhex(MAC.replace(":", ""))
    late = [(ts - rarp[0][0]) / 1e6 for ts, raw in from_a if raw[6:12] == mac and ts > rarp[0][0]]
    assert not late, f"frames from the guest left the source this many ms after the announce: {late}"

    # Pings: at most PING_LOSS_MAX lost across the migration.
    sent, got, lost = _ping_summary(pout)
    print(f"\nmigration: downtime {st.downtime_ms:.1f} ms, {st.rounds} rounds; "
          f"pings {sent} sent {sent - got} lost; first announce frame "
          f"{(rarp[0][0] - t_done) / 1e6:.1f} ms after DONE; announce frames {nb.announced}; forwarded {st.forwarded}; "
          f"{ {k: round(v, 1) for k, v in st.phases_ms.items()} }; lost icmp_seq {lost}")
    assert sent == 400
    assert sent - got <= PING_LOSS_MAX, pout[-300:]

    # The download that ran across the migration.
    assert drc == 0, dout
    assert dout.split()[0] == hashlib.sha256(stream_body(DOWNLOAD)).hexdigest(), dout


    # The client received the destination's gratuitous ARPs (Linux updates a valid entry
    # with them; that they correct a wrong entry is checked in the save/restore test) and
    # its entry holds the guest's MAC.
    got_garp = [ts for ts, raw in client_arp
                if ARP in Ether(raw) and Ether(raw)[ARP].psrc == Ether(raw)[ARP].pdst == GUEST_IP
                and Ether(raw)[ARP].hwsrc == MAC]
    assert len(got_garp) == sched.rounds and got_garp[0] <= t_done, got_garp
    _rc, neigh = await lan.run("ip", "neigh", "show", GUEST_IP, "dev", "eth0")
    assert f"lladdr {MAC}" in neigh, neigh

    # Every write the guest saw acknowledged (on either host) is on the disk.
    await new.wait_for_line(r"disk: done", 60)
    n = acked(dom, new)
    assert n == RECORDS
    new.shutdown()
    await asyncio.wait([new.task])
    _check_disk(disk, n)


async def test_save_restore_reconnects_devices(two_hosts, tmp_path):
    """Save on host A, restore on host B: vif and vbd recreated, the guest's frontends
    reconnect, it answers pings and HTTP there and finishes its disk records."""
    lan, a, b, rx, arrived = two_hosts
    disk = str(tmp_path / "disk.img")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    dom = await _netguest(a, lan, disk, records=600)
    await dom.wait_for_line(r"disk: acked 100", 30)
    path = str(tmp_path / "guest.save")
    await dom.save(path)
    await asyncio.wait([dom.task])
    saved_at = acked(dom)
    # The client's entry made wrong (a MAC nobody has, STALE): the restored guest's
    # gratuitous ARP must correct it (arp_process overrides on a gratuitous ARP).
    rc, out = await lan.run("ip", "neigh", "replace", GUEST_IP, "lladdr", "00:16:3e:00:00:99",
                            "dev", "eth0", "nud", "stale")
    assert rc == 0, out
    new = await b.restore(path)
    await new.wait_for_line(r"net: resumed rc=0", 20)
    for _ in range(100):
        _rc, neigh = await lan.run("ip", "neigh", "show", GUEST_IP, "dev", "eth0")
        if f"lladdr {MAC}" in neigh:
            break
        await asyncio.sleep(0.01)
    assert f"lladdr {MAC}" in neigh, neigh
    rc, out = await lan.run("ping", "-c", "3", "-i", "0.2", "-W", "2", GUEST_IP)
    assert rc == 0, out
    assert await asyncio.to_thread(lan.fdb_port, MAC) == "up-b"
    rc, out = await lan.run("curl", "-sS", "-m", "10", f"http://{GUEST_IP}/")
    assert rc == 0 and "aiovmm guest" in out, out
    await new.wait_for_line(r"disk: done 600", 60)
    assert saved_at >= 100
    new.shutdown()
    await asyncio.wait([new.task])
    _check_disk(disk, 600)


async def test_destination_without_the_bridge_refuses(tmp_path):
    """The destination has no bridge of the vif's name: it refuses the stream (the device
    check runs before anything is built), the source guest runs on and answers, and the
    destination is left without a domain or a tap."""
    async with TwoHostLan("198.18.0.1/24") as lan:
        async with Hypervisor(memory_mib=HV_MEMORY_MIB, netns=lan.host_ns["a"]) as a, \
                Hypervisor(memory_mib=HV_MEMORY_MIB, netns=lan.client_ns) as b:
            rx = await live.serve(b, "127.0.0.1", 0, SECRET)
            try:
                disk = str(tmp_path / "disk.img")
                with open(disk, "wb") as f:
                    f.truncate(1 << 20)
                dom = await _netguest(a, lan, disk, records=50)
                free = b.mem.free_frames
                with pytest.raises(live.MigrationError):
                    await live.migrate(dom, "127.0.0.1", rx.port, SECRET)
                assert not dom.dying and not b.domains and b.mem.free_frames == free
                rc, out = await lan.run("ping", "-c", "2", "-i", "0.2", "-W", "2", GUEST_IP)
                assert rc == 0, out
                await dom.wait_for_line(r"disk: done 50", 30)
                rc, out = await lan.run("ip", "-o", "link", "show")
                assert "vif" not in out, out
            finally:
                await rx.aclose()


async def test_frames_left_on_the_rx_ring_at_the_suspend_reach_the_new_host(two_hosts):
    """Frames netback put on the rx ring after the guest last read it are not lost: here the
    guest waits 100 ms between acknowledging the suspend request and suspending (as Linux's
    freezer and device suspend take time), its rings unread, while a 10 ms ping runs. A guest
    resumed in a new domain starts with empty rings, so the source's netback takes back the
    frames past the rsp_event the guest left and sends them on with the ones held in the
    tap. Without that six pings were lost here (the 1-2 the switched-LAN test lost at
    random were the same: the last frame put on the ring before the guest's SCHEDOP_shutdown,
    0.4-4.5 ms before it, in 6 of 6 instrumented runs).
    They travel to the new host on the migration connection: written back into the old
    host's bridge they reached the guest too, but taught the switch the client's MAC on
    the old host's port, and the guest's answers to them went there and were lost (as many
    pings lost as frames sent on, in 5 of 7 runs). No frame of the client's may enter the
    switch from the old host."""
    lan, a, b, rx, arrived = two_hosts
    dom = await a.create(guest("net"), memory_mib=8,
                         cmdline=f"ip={GUEST_IP}/24 suspend=1 suspend_delay=100",
                         vifs=[lan.vif("a", MAC)])
    await dom.wait_for_line(r"net: serving", 30)
    rc, out = await lan.run("ping", "-c", "2", "-i", "0.2", "-W", "2", GUEST_IP)
    assert rc == 0, out
    rc, out = await lan.run("ip", "-o", "link", "show", "eth0")
    client_mac = bytes.fromhex(re.search(r"link/ether ([0-9a-f:]{17})", out).group(1).replace(":", ""))
    cap_a = await asyncio.to_thread(lan.capture, "up-a", (0x0800,))
    ping = asyncio.ensure_future(lan.run("ping", "-n", "-i", "0.01", "-c", "150", "-W", "3",
                                         GUEST_IP, timeout=20))
    try:
        await asyncio.sleep(0.5)
        st = await live.migrate(dom, "127.0.0.1", rx.port, SECRET, downtime_ms=30)
        new = arrived[0]
        await new.wait_for_line(r"net: resumed rc=0", 10)
        prc, pout = await ping
    finally:
        if not ping.done():
            ping.cancel()
        await asyncio.gather(ping, return_exceptions=True)
    from_a = cap_a.frames()
    cap_a.close()
    sent, got, lost = _ping_summary(pout)
    print(f"\nsuspend_delay=100: downtime {st.downtime_ms:.1f} ms, forwarded {st.forwarded}, "
          f"lost icmp_seq {lost}")
    assert sent == 150
    assert st.forwarded >= 1, st.forwarded     # the frames left on the ring went on
    assert not [raw for _ts, raw in from_a if raw[6:12] == client_mac]
    assert not lost, pout[-300:]
    new.shutdown()
    await asyncio.wait([new.task])
