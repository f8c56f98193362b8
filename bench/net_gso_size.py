"""What a tx GSO size costs the host kernel (the reason for netback's GSO_MIN_SIZE).

Two taps on a bridge in a private network namespace (prefix rdbg<pid>, removed at the end):
tap A as netback opens it (virtio_net_hdr, checksum and TSO offload on), tap B as for a
frontend that takes no GSO (offloads off). A 64 KiB TCP/IPv4 frame written into A with a
GSO size in its virtio_net_hdr is flooded to B, which needs it segmented in software, inside
the write. The figure is the median time of one write, per GSO size, in rounds interleaved
with the reference (1448, a 1500-byte MTU's MSS), and its ratio to the reference; B's queue
is emptied between writes. Needs root (netns, /dev/net/tun).

    .venv/bin/python bench/net_gso_size.py [--rounds 5] [--frames 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from backends.net import tap as taplib  # noqa: E402
from backends.net.device import _VNET, VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, _csum16, set_pseudo_sum  # noqa: E402

SIZES = (1448, 536, 48, 8, 1)


def frame(gso: int, payload: int = 65000 - 54) -> bytes:
    eth = bytes.fromhex("02aabbccddee02ffeeddccbb0800")
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + payload, 1, 0, 64, 6, 0, bytes((10, 9, 0, 1)), bytes((10, 9, 0, 2)))
    c = _csum16(ip)
    if sys.byteorder == "little":
        c = ((c & 0xFF) << 8) | (c >> 8)
    ip = ip[:10] + (0xFFFF ^ c).to_bytes(2, "big") + ip[12:]        # a bridge's netfilter checks it
    tcp = struct.pack("!HHIIBBHHH", 1000, 2000, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
    f = bytearray(bytes(10) + eth + ip + tcp + b"x" * payload)
    set_pseudo_sum(f, 10, 4, 10 + 34, 6)
    _VNET.pack_into(f, 0, VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 54, gso, 34, 16)
    return bytes(f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--frames", type=int, default=10)
    args = ap.parse_args()
    ns = f"rdbg{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    fds: list[int] = []
    try:
        def ip(*a: str) -> None:
            subprocess.run(["ip", "-n", ns, *a], check=True)
        ip("link", "add", "rdbgbr", "type", "bridge")
        ip("link", "set", "rdbgbr", "up")
        for name, off in (("rdbgA", taplib.TunOffload.CSUM | taplib.TunOffload.TSO4), ("rdbgB", taplib.TunOffload(0))):
            fd = taplib.open_tap(name, ns, True)
            fds.append(fd)
            taplib.set_offload(fd, off)
            ip("link", "set", name, "master", "rdbgbr", "up")
        a, b = fds
        time.sleep(1)
        frames = {g: frame(g) for g in SIZES}
        times: dict[int, list[float]] = {g: [] for g in SIZES}
        for _ in range(args.rounds):
            for g in SIZES:
                for _ in range(args.frames):
                    t0 = time.perf_counter()
                    os.write(a, frames[g])
                    times[g].append(time.perf_counter() - t0)
                    while True:
                        try:
                            os.read(b, 70000)
                        except BlockingIOError:
                            break
        ref = statistics.median(times[1448])
        print(f"load average {os.getloadavg()[0]:.1f}; {args.rounds} rounds x {args.frames} frames of 65,000 bytes")
        for g in SIZES:
            m = statistics.median(times[g])
            print(f"gso_size {g:5d}: median {m * 1e3:8.3f} ms per frame written  {m / ref:8.1f}x of gso_size 1448")
    finally:
        for fd in fds:
            os.close(fd)
        subprocess.run(["ip", "netns", "del", ns])


if __name__ == "__main__":
    main()
