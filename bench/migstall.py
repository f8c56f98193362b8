"""A TCP stream from the LAN's host into a Debian Linux guest across a live migration
between two hypervisors on one bridge: the longest gap between the sender's progress
(bytes acknowledged, TCP_INFO every 1 ms) and the sender's retransmissions.
Usage: .venv/bin/python bench/migstall.py [unicorn|kvm] [runs]
Also prints the taps' tx_dropped/tx_packets (sampled every 50 ms during the migration).

Measured 2026-12-02 (load 3-7 on 2 shared cores; 96 MiB Debian guest, 1 vCPU, 1 pre-copy
round, downtime 50-80 ms): longest gap of the sender's progress across the migration
KVM 131 ms; Unicorn 170, 315, 271 ms; no tap dropped a frame (tx_dropped 0 on both taps);
1-3 frames carried on the connection (HELD). Retransmissions run at one per 150-200 ms
all through the stream on Unicorn (also far from the migration: TLPs/RTOs of a bursty
receiver, not tap drops). bench/migstall_daemons.py (two `aiovmm serve` in one netns):
gaps 256-397 ms at the hand-over and 335-377 ms when the pre-copy starts.
Where the losses are (also printed: netback's NetStats, the guest's TcpExt and eth0 drops):
netback dropped nothing (rx_dropped/tx_dropped 0 on both sides); every sender
retransmission was spurious (guest TCPDSACKOldSent == DelayedACKLost: 7/7, 48/48, 38/38:
the original arrived; the receiver, `nc >/dev/null` on an emulated CPU, sits at a zero
window ~50 times a second, TCPToZeroWindowAdv 347-518 in 10 s). The frames lost at the
migration are the guest's own: its eth0 tx_dropped went 0 -> 2 (and 3 in another run)
across it: xen-netfront drops what its stack sends while the carrier is off, from
netfront_resume until the new backend connects (xennet_start_xmit; the same on Xen). If
one of them is the window update ending a zero window, the sender waits for its persist
timer (200, 400, 800 ms ... backoff): the likely source of the walkthrough's 1.5-1.9 s.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from aiovmm import Hypervisor                       # noqa: E402
from aiovmm.migration import live                   # noqa: E402
from aiovmm.testing import VirtualLan               # noqa: E402
from conftest import HV_MEMORY_MIB                  # noqa: E402
from test_linux import INITRD, KERNEL, Shell, wait_ready   # noqa: E402

GUEST_IP, HOST_IP = "198.18.19.2", "198.18.19.1"
MAC = "00:16:3e:13:19:02"
SECRET = b"migstall-secret-0123456789"
PORT = 5001

SENDER = r"""
import socket, struct, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.setblocking(False)
buf = b"x" * 65536
end = time.monotonic() + float(sys.argv[3])
last_acked, last_t, gaps = 0, time.monotonic(), []
t0 = last_t
last_r, rtimes = 0, []
while time.monotonic() < end:
    try:
        s.send(buf)
    except BlockingIOError:
        pass
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    acked = struct.unpack_from("Q", info, 120)[0]      # tcpi_bytes_acked
    now = time.monotonic()
    r = struct.unpack_from("I", info, 100)[0]
    if r != last_r:
        rtimes.append(f"{now - t0:.2f}+{r - last_r}")
        last_r = r
    if acked != last_acked:
        gaps.append((now - last_t, last_t - t0))
        last_acked, last_t = acked, now
    time.sleep(0.001)
info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
retrans = struct.unpack_from("I", info, 100)[0]        # tcpi_total_retrans
rto = struct.unpack_from("I", info, 8)[0]
gaps.sort(reverse=True)
print("acked", last_acked, "retrans", retrans, "rto_us", rto,
      "gaps", " ".join(f"{g*1000:.0f}ms@{t:.2f}" for g, t in gaps[:4]), "retrans at", " ".join(rtimes), flush=True)
"""


async def one(engine: str) -> None:
    async with VirtualLan(f"{HOST_IP}/24") as lan:
        async with Hypervisor(memory_mib=HV_MEMORY_MIB + 112, netns=lan.lan_ns, engine=engine) as a, \
                Hypervisor(memory_mib=HV_MEMORY_MIB + 112, netns=lan.lan_ns, engine=engine) as b:
            arrived = []
            rx = await live.serve(b, "127.0.0.1", 0, SECRET, arrived.append)
            try:
                dom = await a.create(str(KERNEL), memory_mib=96, ramdisk=str(INITRD), name="stall",
                                     cmdline=f"console=hvc0 aiovmm.ip={GUEST_IP}/24",
                                     vifs=[lan.vif(MAC)], vcpus=1)
                t = time.monotonic()
                await wait_ready(dom)
                print(f"boot {time.monotonic() - t:.0f} s", flush=True)
                sh = Shell(dom)
                rc, out = await sh.run(f"(nc -l -p {PORT} >/dev/null 2>&1 &)", 60)
                rc, out = await sh.run("echo eth0 tx_dropped $(cat /sys/class/net/eth0/statistics/tx_dropped)", 60)
                print("before:", [l for l in out if l.startswith("eth0 ")], flush=True)
                await asyncio.sleep(1)
                proc = await asyncio.create_subprocess_exec(
                    "ip", "netns", "exec", lan.host_ns, sys.executable, "-c", SENDER, GUEST_IP,
                    str(PORT), "10")
                t_send = time.monotonic()
                await asyncio.sleep(3)
                print(f"migrate at {time.monotonic() - t_send:.2f}", flush=True)
                print("source netback before:", dom.backends[0].stats, flush=True)
                src_if = dom.backends[0].ifname
                last = {}

                async def tapstats():
                    while True:
                        for name in [src_if] + [d.backends[0].ifname for d in arrived if d.backends]:
                            try:
                                p = await asyncio.create_subprocess_exec(
                                    "ip", "netns", "exec", lan.lan_ns, "cat",
                                    f"/sys/class/net/{name}/statistics/tx_dropped",
                                    f"/sys/class/net/{name}/statistics/tx_packets",
                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
                                out, _ = await p.communicate()
                                if p.returncode == 0:
                                    last[name] = out.decode().split()
                            except Exception:
                                pass
                        await asyncio.sleep(0.05)
                ts = asyncio.ensure_future(tapstats())
                lags = []

                async def lag():
                    while True:
                        t1 = time.monotonic()
                        await asyncio.sleep(0.005)
                        lags.append((time.monotonic() - t1 - 0.005, t1 - t_send))
                lg = asyncio.ensure_future(lag())
                st = await live.migrate(dom, "127.0.0.1", rx.port, SECRET)
                print(f"migrate returned at {time.monotonic() - t_send:.2f}", flush=True)
                print(f"migrated: rounds {st.rounds} downtime {st.downtime_ms:.1f} ms "
                      f"forwarded {st.forwarded} marks {sorted((k, round((v - st.marks['suspended']) * 1000, 1)) for k, v in st.marks.items() if isinstance(v, float))}",
                      flush=True)
                await asyncio.sleep(1)
                ts.cancel()
                lg.cancel()
                lags.sort(reverse=True)
                print("loop lag:", " ".join(f"{l * 1000:.0f}ms@{t:.2f}" for l, t in lags[:6]), flush=True)
                print("tap (tx_dropped, tx_packets):", last, flush=True)
                await proc.wait()
                for d in arrived:
                    print("destination netback:", d.backends[0].stats, flush=True)
                    rc, out = await Shell(d).run("cat /proc/net/netstat /proc/net/snmp; echo eth0 tx_dropped $(cat /sys/class/net/eth0/statistics/tx_dropped) rx_dropped $(cat /sys/class/net/eth0/statistics/rx_dropped)", 60)
                    print([l for l in out if l.startswith("eth0 ")], flush=True)
                    rows = [l.split() for l in out if l.startswith(("TcpExt:", "Tcp:", "Udp:"))]
                    for i in range(0, len(rows) - 1, 2):
                        nz = {k: v for k, v in zip(rows[i][1:], rows[i + 1][1:]) if v not in ("0",)}
                        print("guest", rows[i][0], nz, flush=True)
                for d in arrived:
                    d.destroy()
            finally:
                await rx.aclose()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f %(name)s %(message)s")
    engine = sys.argv[1] if len(sys.argv) > 1 else "kvm"
    print(f"load {os.getloadavg()}", flush=True)
    for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 1):
        asyncio.run(one(engine))


if __name__ == "__main__":
    main()
