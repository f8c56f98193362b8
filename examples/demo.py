"""`make demo`: Xen PV guests on emulated x86_64 vCPUs, scheduled by one asyncio loop, on
real Linux networking.

1. aiovmm's own PV kernel boots: timer ticks, a user-mode syscall round trip, a privileged
   instruction trapped into the guest's #GP handler, poweroff.
2. A private network namespace with a bridge; two guests whose vifs are tap devices on it;
   pings between the guests and from the namespace, and a curl of each guest's web page.
Everything is created in namespaces of its own and removed at the end.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time

import uvloop
from rich.console import Console
from rich.markup import escape

from aiovmm import Hypervisor, ShutdownReason
from aiovmm.testing import VirtualLan

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.join(HERE, "..", "guests", "build")
KERNEL = os.path.join(BUILD, "kernel.elf")
NET = os.path.join(BUILD, "tests", "net.elf")
con = Console(highlight=False)
COLORS = {"kernel": "cyan", "web1": "magenta", "web2": "green", "pinger": "yellow"}


def printer(name: str):
    buf = b""

    def on_console(data: bytes) -> None:
        nonlocal buf
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            con.print(f"[{COLORS.get(name, 'white')}]{name:>7}[/] | {escape(line.decode(errors='replace'))}")
    return on_console


async def host(lan: VirtualLan, *argv: str) -> bool:
    con.print(f"[bold]   host[/] $ {escape(' '.join(argv))}")
    rc, out = await lan.run(*argv)
    for line in out.rstrip().splitlines():
        con.print(f"[bold]   host[/] | {escape(line)}")
    return rc == 0


async def main() -> int:
    t0 = time.perf_counter()
    ok = True
    async with Hypervisor(memory_mib=512) as hv:
        con.rule("1. a Xen PV kernel on an emulated vCPU")
        k = await hv.create(KERNEL, memory_mib=16, name="kernel", cmdline="ticks=3 period_ms=20",
                            on_console=printer("kernel"))
        ok &= await k.wait() == ShutdownReason.poweroff

        con.rule("2. two guests on a bridge in a private network namespace")
        if not os.path.exists("/dev/net/tun"):
            con.print("no /dev/net/tun on this machine: skipping the network part")
            return 0 if ok else 1
        async with VirtualLan("198.18.0.1/24") as lan:
            con.print(f"namespace {lan.lan_ns}: bridge {lan.bridge}; host namespace {lan.host_ns}: "
                      f"{lan.host_if} 198.18.0.1/24")
            guests = []
            for n, name in ((2, "web1"), (3, "web2")):
                d = await hv.create(NET, memory_mib=16, name=name, on_console=printer(name),
                                    cmdline=f"ip=198.18.0.{n}/24 name={name}",
                                    vifs=[lan.vif(f"00:16:3e:00:00:{n:02x}")])
                guests.append(d)
            for d in guests:
                await d.wait_for_line(r"^net: up", timeout=30)
            pinger = await hv.create(NET, memory_mib=16, name="pinger", on_console=printer("pinger"),
                                     cmdline="ip=198.18.0.4/24 name=pinger ping=198.18.0.2 count=3",
                                     vifs=[lan.vif("00:16:3e:00:00:04")])
            ok &= (await pinger.wait_for_line(r"^net: ping done", timeout=30)).endswith(" 3/3")
            ok &= await host(lan, "ping", "-c", "3", "-i", "0.2", "198.18.0.2")
            ok &= await host(lan, "ping", "-c", "3", "-i", "0.2", "198.18.0.3")
            for ip in ("198.18.0.2", "198.18.0.3"):
                ok &= await host(lan, "curl", "-s", "-m", "5", f"http://{ip}/")
            for d in guests:
                d.shutdown()
                await d.wait()
    con.rule()
    con.print(f"{'all good' if ok else 'SOMETHING FAILED'} in {time.perf_counter() - t0:.2f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
