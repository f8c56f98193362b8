"""A/B of two source trees (or of switches in one tree) on the KVM engine, interleaved in the
same minutes (issue 14, network): one Linux guest per process, turns taken through a file.

Run one process per tree, each with its own .venv (so each imports its own aiovmm):
    A/.venv/bin/python bench/net_ab.py --turns /tmp/ab --slot 0 --slots 2 --tag old &
    B/.venv/bin/python bench/net_ab.py --turns /tmp/ab --slot 0 --slots 2 ... --slot 1 --tag new
Each boots bench/net.py's Debian guest (its own tree's kernel and initramfs) on KVM with a vif
on its own VirtualLan, then waits for its turn: the file holds a counter, the process whose
slot is counter % slots runs one round (its guest unpaused; the others' guests are paused, so
only the measured guest runs) and adds one. A process can hold several slots with --variants
(switches of netback or the engine set before its round, e.g. nodefer: tx-event deferral off;
noc: the engine's C hypercall paths off; unbatched: the tap writer woken per frame; nodrain:
netback notified instead of draining at slice ends; nogdtc: C's irets to a CS of the guest's GDT
(Linux's __USER_CS) left to Python, as before they were done in C; vthread: the KVM_RUNs on a
vCPU thread, kvm_engine.py VCPU_THREAD_ENV; vthreadspin: that thread polls 50 us for its next
run before it sleeps; base then runs them on the loop thread).
A round: iperf3 TCP host -> guest and guest -> host for --tcp-seconds, UDP RR W=1 and W=32
for --duration; per round the load average, exits and process CPU per 64 KiB / round trip,
and netback's own share of it (nb_us: thread CPU time inside its passes, the tx copy-out,
the tap reads and the rx copy-in; the writer thread's tap writes not included).
At the end every process prints its rows and the medians per variant. --profile N: cProfile of
each variant's first TCP host -> guest and UDP RR W=1 run on the loop thread's CPU time (top N
functions by own time; a wait for the GIL or the host scheduler is not counted).
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import fcntl
import glob
import os
import pstats
import resource
import statistics
import sys
import time

import uvloop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import net as netbench                                   # noqa: E402  (this tree's bench/net.py)

from aiovmm import Hypervisor                              # noqa: E402
from aiovmm.testing import VirtualLan                       # noqa: E402


GUEST_IP = "198.18.0.20"


async def boot_kvm_linux(hv: Hypervisor, lan: VirtualLan, tag: str, boot_timeout: float):
    """bench/net.py's Linux guest (iperf3 and udpecho) on KVM at GUEST_IP with a vif on
    `lan`, once its shell is up (also bench/net_exits.py's)."""
    dom = await hv.create(netbench.LX_KERNEL, memory_mib=netbench.LX_MEMORY_MIB, ramdisk=netbench.LX_INITRD,
                          name=f"lx-{tag}", engine="kvm",
                          cmdline="console=hvc0 " + netbench.LX_ARGS.format(ip=GUEST_IP),
                          vifs=[lan.vif("00:16:3e:00:0e:20")])
    t0 = asyncio.get_running_loop().time()
    await dom.wait_for_line(r"^aiovmm-init: ready", timeout=boot_timeout)
    print(f"{tag}: shell after {asyncio.get_running_loop().time() - t0:.0f} s", flush=True)
    return dom


def read_turn(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except FileNotFoundError:
        return 0


def bump_turn(path: str) -> None:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = int(f.read().strip() or 0)
        f.seek(0)
        f.truncate()
        f.write(str(n + 1))


def time_passes(nb) -> list[int]:
    """Count the thread CPU time of netback's passes (every pass goes through _pass, on the
    loop or inline in a hypercall) into the returned one-element list, in ns."""
    spent = [0]
    inner = nb._pass

    def timed_pass(inline: bool = False) -> None:
        t0 = time.thread_time_ns()
        try:
            inner(inline)
        finally:
            spent[0] += time.thread_time_ns() - t0
    nb._pass = timed_pass
    return spent


def snap(dom, nb) -> dict[str, float]:
    eng = dom.vcpus[0].engine
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"exits": getattr(eng, "exits", 0), "cpu_ms": (ru.ru_utime + ru.ru_stime) * 1e3,
            "nb_us": nb.pass_ns[0] / 1e3,
            "rx_bytes": nb.stats.rx_bytes, "tx_bytes": nb.stats.tx_bytes,
            "events": nb.stats.events_sent,
            "notifies": nb.port.notifications if getattr(nb, "port", None) is not None else 0}


def apply_variant(dom, nb, name: str, saved: dict) -> None:
    eng = dom.vcpus[0].engine
    if not saved:
        saved["defer"] = getattr(nb, "defer_tx_events", None)
        saved["fast"] = getattr(eng, "fast_hypercalls_ok", None)
        saved["batch"] = getattr(nb, "batch_tx", None)
        saved["drain"] = getattr(nb, "drain_on_yield", None)
    if saved["defer"] is not None:
        nb.defer_tx_events = saved["defer"] and "nodefer" not in name
    if saved["fast"] is not None:
        eng.fast_hypercalls_ok = (lambda: False) if "noc" in name else saved["fast"]
    if saved["batch"] is not None:
        nb.batch_tx = saved["batch"] and "unbatched" not in name
    if saved["drain"] is not None:
        nb.set_drain_on_yield(saved["drain"] and "nodrain" not in name)
    for v in dom.vcpus:
        if hasattr(v.engine, "use_vcpu_thread"):
            v.engine.use_vcpu_thread("vthread" in name, 50_000 if "spin" in name else 0)
        if hasattr(v.pv, "gdt_frames_nr"):
            v.pv.gdt_frames_nr = 0 if "nogdtc" in name else len(v.gdt_frames)


async def main(args) -> None:
    variants = args.variants.split(",")
    slots = [args.slot + k for k in range(len(variants))]
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    async with VirtualLan(f"{netbench.HOST_IP}/24") as lan, \
            Hypervisor(memory_mib=netbench.LX_MEMORY_MIB + 64) as hv:
        ip = GUEST_IP
        dom = await boot_kvm_linux(hv, lan, args.tag, args.boot_timeout)
        nb = dom.backends[0]
        nb.pass_ns = time_passes(nb)
        saved: dict = {}
        # Warm up once (ARP, the iperf3 server) before taking turns.
        await netbench.client(lan, ip, 1, 1.0)
        dom.pause()
        open(args.turns + f".ready{args.slot}", "w").close()
        while len(glob.glob(args.turns + ".ready*")) < args.procs:
            await asyncio.sleep(0.5)           # every guest booted before the first turn
        rounds_done = 0
        while rounds_done < args.rounds * len(variants):
            t = read_turn(args.turns)
            if t >= args.rounds * args.slots:
                break
            if t % args.slots not in slots:
                await asyncio.sleep(0.2)
                continue
            v = variants[t % args.slots - args.slot]
            apply_variant(dom, nb, v, saved)
            dom.unpause()
            row: dict[str, float] = {"load": os.getloadavg()[0]}
            prof = cProfile.Profile(time.thread_time) if args.profile and not rows[v] else None
            for name, rev in (("h2g", False), ("g2h", True)):
                a = snap(dom, nb)
                if prof and name == "h2g":
                    prof.enable()
                r = await netbench.iperf(lan, ip, args.tcp_seconds, reverse=rev)
                if prof and name == "h2g":
                    prof.disable()
                    print(f"profile {args.tag}/{v} TCP h2g {r['mbps']:.0f} Mbit/s:")
                    pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
                    prof = cProfile.Profile(time.thread_time)
                b = snap(dom, nb)
                k = max((b["rx_bytes" if name == "h2g" else "tx_bytes"]
                         - a["rx_bytes" if name == "h2g" else "tx_bytes"]) / 65536, 1)
                row[f"{name}_mbps"] = r["mbps"]
                row[f"{name}_exits"] = (b["exits"] - a["exits"]) / k
                row[f"{name}_cpu_ms"] = (b["cpu_ms"] - a["cpu_ms"]) / k
                row[f"{name}_nb_us"] = (b["nb_us"] - a["nb_us"]) / k
                row[f"{name}_events"] = (b["events"] - a["events"]) / k
                row[f"{name}_notifies"] = (b["notifies"] - a["notifies"]) / k
            for w in (1, 32):
                a = snap(dom, nb)
                if prof and w == 1:
                    prof.enable()
                rr = await netbench.client(lan, ip, w, args.duration)
                if prof and w == 1:
                    prof.disable()
                    print(f"profile {args.tag}/{v} UDP RR W=1 {rr['rps']:.0f}/s:")
                    pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
                b = snap(dom, nb)
                n = max(rr["n"], 1)
                row[f"rr{w}_rps"] = rr["rps"]
                row[f"rr{w}_exits"] = (b["exits"] - a["exits"]) / n
                row[f"rr{w}_events"] = (b["events"] - a["events"]) / n
                row[f"rr{w}_cpu_ms"] = (b["cpu_ms"] - a["cpu_ms"]) / n
                row[f"rr{w}_nb_us"] = (b["nb_us"] - a["nb_us"]) / n
            dom.pause()
            rows[v].append(row)
            print(f"turn {t} {args.tag}/{v}: " + " ".join(f"{k}={x:.2f}" for k, x in row.items()), flush=True)
            rounds_done += 1
            bump_turn(args.turns)
        dom.unpause()
        print(f"{args.tag} netback: {nb.stats}")
    for v, rs in rows.items():
        if rs:
            print(f"median {args.tag}/{v} (n={len(rs)}): "
                  + " ".join(f"{k}={statistics.median(r[k] for r in rs):.2f}" for k in rs[0]), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", required=True, help="the shared turn file")
    ap.add_argument("--slot", type=int, required=True, help="this process's first slot")
    ap.add_argument("--slots", type=int, required=True, help="slots over all processes")
    ap.add_argument("--procs", type=int, default=1, help="processes taking part (each waits for all to boot)")
    ap.add_argument("--variants", default="base", help="this process's variants, one slot each")
    ap.add_argument("--tag", default="tree")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tcp-seconds", type=float, default=8)
    ap.add_argument("--duration", type=float, default=3)
    ap.add_argument("--profile", type=int, default=0,
                    help="cProfile each variant's first h2g and UDP RR W=1 run: print this many functions")
    ap.add_argument("--boot-timeout", type=float, default=600)
    uvloop.run(main(ap.parse_args()))
