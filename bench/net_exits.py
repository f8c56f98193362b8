"""Exits per packet on the KVM engine, by kind and hypercall number, for netback's modes
(issue 14, network): one Linux guest, booted once, measured A/B in the same minutes.

One Debian Linux guest (the bench/net.py kernel and initramfs: iperf3 and udpecho) on the
KVM engine with a vif on a VirtualLan. For each netback mode in --modes (Netback.inline_kick
names, e.g. OFF,TX_ONLY), alternating for --reps rounds, so both see the same load:
  - UDP request/response W=1 for --duration s (bench/net.py's client),
  - iperf3 TCP host -> guest and guest -> host for --tcp-seconds s.
Per run the deltas of the engine's exits by kind, the domain's hypercalls by number
(event_channel_op split by sub-op is not counted by the hypervisor: the number is), and
netback's counters, divided per round trip (UDP) or per 64 KiB received (TCP). Prints one
table per run and the medians per mode; the load average with each.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import resource
import statistics
import sys

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import net as netbench                                   # noqa: E402  (bench/net.py)
from net_ab import GUEST_IP, boot_kvm_linux               # noqa: E402

from aiovmm import Hypervisor                              # noqa: E402
from aiovmm.backends.net.device import InlineKick           # noqa: E402
from aiovmm.testing import VirtualLan                       # noqa: E402

HC_NAMES = {1: "mmu_update", 3: "stack_switch", 5: "fpu_taskswitch", 13: "multicall",
            14: "update_va_mapping", 15: "set_timer_op", 20: "grant_table_op", 23: "iret",
            24: "vcpu_op", 25: "set_segment_base", 26: "mmuext_op", 29: "sched_op",
            32: "event_channel_op", 33: "physdev_op"}


def snapshot(dom, nb) -> dict[str, float]:
    eng = dom.vcpus[0].engine
    s: dict[str, float] = {}
    for k, n in eng.exit_kinds.items():
        s[f"exit:{k}"] = n
    s["exits"] = eng.exits
    for nr, n in dom.hypercall_counts.items():
        s[f"hc:{HC_NAMES.get(nr, nr)}"] = n
    st = nb.stats
    for k in ("tx_packets", "rx_packets", "rx_bytes", "tx_bytes", "events_sent", "rx_gso", "tx_gso",
              "rx_waits", "inline_passes"):
        s[f"nb:{k}"] = getattr(st, k)
    s["nb:guest_notifies"] = nb.port.notifications if nb.port is not None else 0
    s["kicks"] = getattr(eng, "kicks", 0)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    s["cpu_ms"] = (ru.ru_utime + ru.ru_stime) * 1e3
    s["ctx_invol"] = ru.ru_nivcsw
    s["ctx_vol"] = ru.ru_nvcsw
    sch = dom.hypervisor.scheduler.state(dom.vcpus[0])
    s["slices"] = sch.slices
    s["vcpu_ms"] = sch.cpu_ns / 1e6
    s["steal_ms"] = sch.host_steal_ns / 1e6
    return s


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b) if b.get(k, 0) != a.get(k, 0)}


def show(title: str, d: dict[str, float], per: float, unit: str) -> None:
    print(f"  {title}: per {unit} (n={per:.0f}), load {os.getloadavg()[0]:.1f}")
    for k in sorted(d, key=lambda k: -d[k]):
        if k.startswith(("exit", "hc:", "nb:events", "nb:guest", "nb:inline", "nb:yield", "kicks", "cpu", "ctx", "slices",
                         "vcpu_ms", "steal")) or k == "exits":
            print(f"    {k:<28}{d[k] / per:10.2f}")


async def main(args) -> None:
    # YIELD: netback's pass at the domain's slice ends, no notifications (Domain.yield_drains);
    # every other mode with notifications (set_drain_on_yield(False)) and that InlineKick.
    modes = args.modes.split(",")
    for m in modes:
        if m != "YIELD":
            InlineKick[m]
    res: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    async with VirtualLan(f"{netbench.HOST_IP}/24") as lan, Hypervisor(memory_mib=netbench.LX_MEMORY_MIB + 64) as hv:
        ip = GUEST_IP
        dom = await boot_kvm_linux(hv, lan, "kvm", args.boot_timeout)
        nb = dom.backends[0]
        for rep in range(args.reps):
            for m in modes:
                nb.set_drain_on_yield(m == "YIELD")
                nb.inline_kick = InlineKick.OFF if m == "YIELD" else InlineKick[m]
                row: dict[str, float] = {}
                print(f"[{rep}] mode {m}", flush=True)
                a = snapshot(dom, nb)
                rr = await netbench.client(lan, ip, 1, args.duration)
                b = snapshot(dom, nb)
                d = delta(a, b)
                show(f"UDP RR W=1 {rr['rps']:.0f}/s median {rr['median_us']:.0f} us", d, rr["n"], "round trip")
                row.update(rr1_rps=rr["rps"], rr1_med=rr["median_us"], rr_exits=d.get("exits", 0) / rr["n"],
                           rr_events=d.get("nb:events_sent", 0) / rr["n"])
                row["rr_cpu_ms"] = d.get("cpu_ms", 0) / rr["n"]
                a = snapshot(dom, nb)
                prof = cProfile.Profile() if args.profile and rep == 0 else None
                if prof:
                    prof.enable()
                rr32 = await netbench.client(lan, ip, 32, args.duration)
                if prof:
                    prof.disable()
                    print(f"  profile {m} UDP RR W=32:")
                    pstats.Stats(prof).sort_stats("tottime").print_stats(14)
                d = delta(a, snapshot(dom, nb))
                row["rr32_rps"] = rr32["rps"]
                row["rr32_exits"] = d.get("exits", 0) / rr32["n"]
                row["rr32_cpu_ms"] = d.get("cpu_ms", 0) / rr32["n"]
                show(f"UDP RR W=32 {rr32['rps']:.0f}/s", d, rr32["n"], "round trip")
                for name, rev in (("h2g", False), ("g2h", True)):
                    a = snapshot(dom, nb)
                    prof = cProfile.Profile() if args.profile and rep == 0 else None
                    if prof:
                        prof.enable()
                    r = await netbench.iperf(lan, ip, args.tcp_seconds, reverse=rev)
                    if prof:
                        prof.disable()
                        print(f"  profile {m} {name}:")
                        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
                    b = snapshot(dom, nb)
                    d = delta(a, b)
                    nbytes = d.get("nb:rx_bytes" if name == "h2g" else "nb:tx_bytes", 0)
                    show(f"TCP {name} {r['mbps']:.0f} Mbit/s retr {r['retransmits']}", d, max(nbytes / 65536, 1),
                         "64 KiB")
                    row[f"{name}_mbps"] = r["mbps"]
                    row[f"{name}_exits"] = d.get("exits", 0) / max(nbytes / 65536, 1)
                    row[f"{name}_events"] = d.get("nb:events_sent", 0) / max(nbytes / 65536, 1)
                    row[f"{name}_cpu_ms"] = d.get("cpu_ms", 0) / max(nbytes / 65536, 1)
                row["load"] = os.getloadavg()[0]
                print(f"  row {m}: " + " ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
                res[m].append(row)
        print(f"netback: {nb.stats}")
    print("medians per mode:")
    for m, rows in res.items():
        keys = rows[0].keys()
        print(f"  {m}: " + " ".join(f"{k}={statistics.median(r[k] for r in rows):.2f}" for k in keys))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="OFF,LONE,YIELD",
                    help="InlineKick names or YIELD (the drain at slice ends), comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per UDP RR run")
    ap.add_argument("--tcp-seconds", type=float, default=5.0)
    ap.add_argument("--profile", action="store_true", help="cProfile the loop during the first round's UDP RR W=32 and TCP runs")
    ap.add_argument("--boot-timeout", type=float, default=600)
    uvloop.run(main(ap.parse_args()))
