"""Exits per packet on the KVM engine, by kind and hypercall number, for netback's modes
(issue 14, network): one Linux guest, booted once, measured A/B in the same minutes.

One Debian Linux guest (the bench/net.py kernel and initramfs: iperf3 and udpecho) on the
KVM engine with a vif on a VirtualLan. For each netback mode in --modes (Netback.inline_kick
names, e.g. OFF,TX_ONLY), alternating for --reps rounds, so both see the same load:
  - UDP request/response W=1 for --duration s (bench/net.py's client),
  - iperf3 TCP host -> guest and guest -> host for --tcp-seconds s.
Per run the deltas of the engine's exits by kind, the domain's hypercalls by number
(event_channel_op split by sub-op is not counted by the hypervisor: the number is), and
netback's counters, divided per round trip (UDP) or per MiB received (TCP). Prints one
table per run and the medians per mode; the load average with each.

--census: the exit census of each phase (KVMEngine.census: every KVM_RUN's outcome counted
in C before it is handled, so C's fast paths included): hypercalls by number and command,
the guest's user system calls by number (RAX at its `syscall`), exceptions by vector (#PF
includes ptwr), event upcalls (C's and Python's; not exits of their own: an upcall is
delivered on the way back from one), port I/O, slice ends (the timer's kick), grouped in
classes, per round trip / per MiB, and the medians per mode of each class.
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

from aiovmm import Hypervisor, traps                       # noqa: E402
from aiovmm.backends.net.device import InlineKick           # noqa: E402
from aiovmm.kvm_engine import CENSUS_VIA_PAGE               # noqa: E402
from aiovmm.testing import VirtualLan                       # noqa: E402

# Commands of the hypercalls the census splits (xen/include/public/*.h).
SUB_NAMES = {
    "event_channel_op": {0: "bind_interdomain", 1: "bind_virq", 3: "close", 4: "send", 5: "status",
                         6: "alloc_unbound", 7: "bind_ipi", 8: "bind_vcpu", 9: "unmask"},
    "sched_op": {0: "yield", 1: "block", 2: "shutdown", 3: "poll"},
    "grant_table_op": {0: "map", 1: "unmap", 2: "setup_table", 5: "copy", 6: "query_size",
                       7: "unmap_and_replace", 8: "set_version", 9: "get_status_frames"},
    "vcpu_op": {1: "up", 2: "down", 3: "is_up", 6: "set_periodic", 7: "stop_periodic", 8: "set_singleshot",
                9: "stop_singleshot",
                10: "register_vcpu_info", 13: "register_vcpu_time_memory_area"},
    "set_segment_base": {0: "fs", 1: "gs_user", 2: "gs_kernel", 3: "gs_user_sel"},
    "fpu_taskswitch": {0: "clear", 1: "set"},
    "xen_version": {0: "version"},      # Linux's xen_force_evtchn_callback
}
# x86_64 system call numbers a network benchmark's processes make (arch/x86/entry/syscalls).
SYSCALL_NAMES = {0: "read", 1: "write", 3: "close", 7: "poll", 9: "mmap", 11: "munmap", 13: "rt_sigaction",
                 14: "rt_sigprocmask", 15: "rt_sigreturn", 16: "ioctl", 19: "readv", 20: "writev", 23: "select",
                 24: "sched_yield", 35: "nanosleep", 39: "getpid", 44: "sendto", 45: "recvfrom", 46: "sendmsg",
                 47: "recvmsg", 54: "setsockopt", 55: "getsockopt", 61: "wait4", 72: "fcntl", 96: "gettimeofday",
                 201: "time", 202: "futex", 228: "clock_gettime", 229: "clock_getres", 230: "clock_nanosleep",
                 232: "epoll_wait", 270: "pselect6", 271: "ppoll", 281: "epoll_pwait", 288: "accept4",
                 299: "recvmmsg", 307: "sendmmsg", 318: "getrandom", 441: "epoll_pwait2"}
HC_NAMES = {17: "xen_version", 1: "mmu_update", 3: "stack_switch", 5: "fpu_taskswitch", 13: "multicall",
            14: "update_va_mapping", 15: "set_timer_op", 20: "grant_table_op", 23: "iret",
            24: "vcpu_op", 25: "set_segment_base", 26: "mmuext_op", 29: "sched_op",
            32: "event_channel_op", 33: "physdev_op"}


def census_name(key: tuple) -> tuple[str, str]:
    """(class, name) of a census key (aiovmm.kvm_engine.census_key)."""
    kind = key[0]
    if kind == "hypercall":
        nr, sub = key[1], key[2]
        name = HC_NAMES.get(nr, f"hc{nr}")
        subs = SUB_NAMES.get(name)
        full = f"{name}.{subs.get(sub, sub)}" if subs is not None else name
        if full == "sched_op.block":
            return "idle block", full
        if name == "iret":
            return "iret", full
        if name in ("mmu_update", "mmuext_op", "update_va_mapping", "multicall"):
            return "hc: mmu", full
        if name in ("event_channel_op", "grant_table_op"):
            return "hc: events/grants", full
        if name in ("vcpu_op", "set_timer_op"):
            return "hc: timer", full
        return "hc: other", full
    if kind == "user syscall":
        nm = SYSCALL_NAMES.get(key[1], str(key[1]))
        if nm in ("clock_gettime", "gettimeofday", "time"):
            return "user: clock", f"sys {nm}"
        return "user: syscall", f"sys {nm}"
    if kind == "vector":
        return ("page fault" if key[1] == 14 else "exception"), f"vector {key[1]}"
    if kind == "slice end":
        return "slice end", "slice end (timer)"
    return kind, " ".join(map(str, key))


_py_upcalls = [0]
_deliver_event = traps.deliver_event


def _counting_deliver_event(v) -> None:
    _py_upcalls[0] += 1
    _deliver_event(v)


def snapshot(dom, nb, census: bool = False) -> dict[str, float]:
    eng = dom.vcpus[0].engine
    s: dict[str, float] = {}
    if census:
        for key, n in eng.census().items():
            if key == CENSUS_VIA_PAGE:
                s["via_page"] = n
                continue
            cls, name = census_name(key)
            s[f"cx:{cls}|{name}"] = n
        s["upcalls"] = eng._ctx.fast_upcalls + _py_upcalls[0]
        s["ptwr"] = dom.vcpus[0].ptwr_updates
        s["in_c"] = sum(n for k, n in eng.exits_in_c.items() if k != "event upcall")
        for k, n in eng.exits_in_c.items():
            s[f"inc:{k}"] = n
        for k, n in eng.kvm_stats().items():
            s[f"kvm:{k}"] = n
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


def classes(d: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = collections.Counter()
    for k, n in d.items():
        if k.startswith("cx:"):
            out[k[3:].split("|")[0]] += n
    return out


def show(title: str, d: dict[str, float], per: float, unit: str) -> None:
    print(f"  {title}: per {unit} (n={per:.0f}), load {os.getloadavg()[0]:.1f}")
    if any(k.startswith("cx:") for k in d):
        tot = sum(n for k, n in d.items() if k.startswith("cx:"))
        print(f"    census: {tot / per:.1f} exits, upcalls {d.get('upcalls', 0) / per:.2f}, "
              f"ptwr {d.get('ptwr', 0) / per:.2f}, completed in C {d.get('in_c', 0) / per:.1f}, hypercalls through the page {d.get('via_page', 0) / per:.2f}")
        for cls, n in sorted(classes(d).items(), key=lambda kv: -kv[1]):
            print(f"      {cls:<22}{n / per:9.2f}  {100 * n / tot:5.1f} %")
        for k in sorted((k for k in d if k.startswith("cx:")), key=lambda k: -d[k])[:18]:
            print(f"        {k[3:].split('|')[1]:<34}{d[k] / per:9.2f}")
        print("    completed in C: " + " ".join(f"{k[4:]}={n / per:.2f}" for k, n in sorted(d.items())
                                                 if k.startswith("inc:") and n / per >= 0.01))
        kvm = {k: n for k, n in d.items() if k.startswith("kvm:") and n / per >= 0.05}
        print("    KVM's own counts (in-kernel exits included): "
              + " ".join(f"{k[4:]}={n / per:.1f}" for k, n in sorted(kvm.items(), key=lambda kv: -kv[1])))
        print("    " + " ".join(f"{k}={d.get(k, 0) / per:.3f}" for k in ("cpu_ms", "vcpu_ms", "steal_ms", "slices",
                                                                       "nb:events_sent", "nb:rx_gso", "nb:tx_gso",
                                                                       "nb:rx_packets", "nb:tx_packets")))
        return
    for k in sorted(d, key=lambda k: -d[k]):
        if k.startswith(("exit", "hc:", "nb:events", "nb:guest", "nb:inline", "nb:yield", "kicks", "cpu", "ctx", "slices",
                         "vcpu_ms", "steal")) or k == "exits":
            print(f"    {k:<28}{d[k] / per:10.2f}")


async def guest_sh(dom, cmd: str, timeout: float = 60) -> list[str]:
    """`cmd`'s output lines on the guest's shell (tests/test_linux.py Shell, the same protocol)."""
    tag = os.urandom(3).hex()
    line = f'echo BEG""{tag}; {cmd}; echo EN""D{tag}\n'
    dom.console_backend.queue_input(line.encode())
    await dom.wait_for_line(rf"^END{tag}$", timeout=timeout)
    lines = list(dom.console_lines)
    i = max(k for k, ln in enumerate(lines) if ln == f"BEG{tag}")
    j = max(k for k, ln in enumerate(lines) if ln == f"END{tag}")
    return lines[i + 1:j]


# What the guest's Linux chose: clocksource and its vDSO mode (xen_setup_vsyscall_time_info:
# "xen: ... vclock" messages), netfront's features and offloads as the stack uses them.
GUEST_FACTS = ("cat /sys/devices/system/clocksource/clocksource0/current_clocksource; "
               "dmesg | grep -iE 'clocksource|vclock|vsyscall|tsc|netfront|xen_netfront|vdso' | head -20; "
               "for f in /sys/class/net/eth0/gso_max_size /sys/class/net/eth0/mtu; do echo $f $(cat $f); done; "
               "ls /sys/class/net/eth0/queues/")


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
        if args.census:
            for ln in await guest_sh(dom, GUEST_FACTS):
                print(f"  guest: {ln}")
        for rep in range(args.reps):
            for m in modes:
                nb.set_drain_on_yield(m == "YIELD")
                nb.inline_kick = InlineKick.OFF if m == "YIELD" else InlineKick[m]
                row: dict[str, float] = {}
                print(f"[{rep}] mode {m}", flush=True)
                a = snapshot(dom, nb, args.census)
                rr = await netbench.client(lan, ip, 1, args.duration)
                b = snapshot(dom, nb, args.census)
                d = delta(a, b)
                show(f"UDP RR W=1 {rr['rps']:.0f}/s median {rr['median_us']:.0f} us", d, rr["n"], "round trip")
                row.update(rr1_rps=rr["rps"], rr1_med=rr["median_us"], rr_exits=d.get("exits", 0) / rr["n"],
                           rr_events=d.get("nb:events_sent", 0) / rr["n"])
                row["rr_cpu_ms"] = d.get("cpu_ms", 0) / rr["n"]
                row.update({f"rr:{c}": n / rr["n"] for c, n in classes(d).items()})
                a = snapshot(dom, nb, args.census)
                prof = cProfile.Profile() if args.profile and rep == 0 else None
                if prof:
                    prof.enable()
                rr32 = await netbench.client(lan, ip, 32, args.duration)
                if prof:
                    prof.disable()
                    print(f"  profile {m} UDP RR W=32:")
                    pstats.Stats(prof).sort_stats("tottime").print_stats(14)
                d = delta(a, snapshot(dom, nb, args.census))
                row["rr32_rps"] = rr32["rps"]
                row["rr32_exits"] = d.get("exits", 0) / rr32["n"]
                row["rr32_cpu_ms"] = d.get("cpu_ms", 0) / rr32["n"]
                row.update({f"rr32:{c}": n / rr32["n"] for c, n in classes(d).items()})
                show(f"UDP RR W=32 {rr32['rps']:.0f}/s", d, rr32["n"], "round trip")
                for name, rev in (("h2g", False), ("g2h", True)):
                    a = snapshot(dom, nb, args.census)
                    prof = cProfile.Profile() if args.profile and rep == 0 else None
                    if prof:
                        prof.enable()
                    r = await netbench.iperf(lan, ip, args.tcp_seconds, reverse=rev)
                    if prof:
                        prof.disable()
                        print(f"  profile {m} {name}:")
                        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
                    b = snapshot(dom, nb, args.census)
                    d = delta(a, b)
                    nbytes = d.get("nb:rx_bytes" if name == "h2g" else "nb:tx_bytes", 0)
                    mib = max(nbytes / 2**20, 1)
                    show(f"TCP {name} {r['mbps']:.0f} Mbit/s retr {r['retransmits']}", d, mib, "MiB")
                    row[f"{name}_mbps"] = r["mbps"]
                    row[f"{name}_exits"] = d.get("exits", 0) / mib
                    row[f"{name}_events"] = d.get("nb:events_sent", 0) / mib
                    row[f"{name}_cpu_ms"] = d.get("cpu_ms", 0) / mib
                    row.update({f"{name}:{c}": n / mib for c, n in classes(d).items()})
                row["load"] = os.getloadavg()[0]
                print(f"  row {m}: " + " ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
                res[m].append(row)
        print(f"netback: {nb.stats}")
    print("medians per mode:")
    for m, rows in res.items():
        keys = sorted(set().union(*(r.keys() for r in rows)), key=lambda k: (":" in k, k))
        print(f"  {m}: " + " ".join(f"{k}={statistics.median(r.get(k, 0) for r in rows):.2f}" for k in keys))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="OFF,LONE,YIELD",
                    help="InlineKick names or YIELD (the drain at slice ends), comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per UDP RR run")
    ap.add_argument("--tcp-seconds", type=float, default=5.0)
    ap.add_argument("--profile", action="store_true", help="cProfile the loop during the first round's UDP RR W=32 and TCP runs")
    ap.add_argument("--boot-timeout", type=float, default=600)
    ap.add_argument("--census", action="store_true", help="the exit census per phase (KVMEngine.census)")
    traps.deliver_event = _counting_deliver_event       # the census's Python upcalls
    uvloop.run(main(ap.parse_args()))
