"""Where a UDP round trip's time goes on the KVM engine, step by step (issue 14, network).

One Debian Linux guest (bench/net.py's kernel and initramfs: udpecho, iperf3) on the KVM
engine with a vif on a VirtualLan, booted once. The script wraps a few methods of this
process's classes with timestamp probes (time.perf_counter_ns, the same CLOCK_MONOTONIC as
the client's time.perf_counter in its namespace): the tap becoming readable, netback's rx
and tx work, every event netback sends, every wake of a blocked vCPU, every KVM slice
(entry, exit, exits inside), the slice-end drain, the writer thread's tap write. A UDP
client at W=1 records its own send and receive times. Each round trip is then cut into:

  send -> tap readable (host kernel, loop wake-up) -> rx event sent (netback's rx pass) ->
  slice entered (the wake hop to the vCPU task) -> reply taken off the tx ring (the guest's
  work, its exits, the slice end's drain) -> reply written to the tap (writer thread) ->
  client has it; and what follows the reply: a tx-completion event, the slice it starts.

Prints medians per step, slices/exits/events per round trip; then TCP guest -> host per
64 KiB (exits, events, slices, process CPU) with a cProfile of the loop. --rounds repeats
the RR measurement. The probes cost a few us per step; compare steps, not totals.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import net as netbench                                   # noqa: E402  (bench/net.py)

from aiovmm import Hypervisor                              # noqa: E402
from aiovmm import events as ev_mod, kvm_engine, vcpu as vcpu_mod   # noqa: E402
from aiovmm.backends.net import device, writer             # noqa: E402
from aiovmm.testing import VirtualLan                       # noqa: E402

T: list[tuple[int, str, int]] = []          # (ns, kind, value)
_now = time.perf_counter_ns
ON = [False]
# (Netback.defer_tx_events, batch_tx)
MODES = {"before": (False, False), "after": (True, True), "defer": (True, False), "batch": (False, True)}
REASONS = {"BUDGET": 1, "PREEMPT": 2, "STOPPED": 3, "ERROR": 4}      # run1's reason code


def probe(cls, name: str, before=None, after=None) -> None:
    orig = getattr(cls, name)

    def wrapped(self, *a, **kw):
        if not ON[0]:
            return orig(self, *a, **kw)
        x = before(self) if before else None
        r = orig(self, *a, **kw)
        if after:
            after(self, x, r)
        return r
    setattr(cls, name, wrapped)


def install() -> None:
    probe(device.Netback, "_on_tap_readable", before=lambda s: T.append((_now(), "tapr", 0)))
    probe(device.Netback, "_on_yield", before=lambda s: T.append((_now(), "yield", 0)))
    probe(device.Netback, "_process_rx", before=lambda s: s.stats.rx_packets,
          after=lambda s, x, r: s.stats.rx_packets != x and T.append((_now(), "rxd", s.stats.rx_packets - x)))
    probe(device.Netback, "_process_tx", before=lambda s: s.stats.tx_packets,
          after=lambda s, x, r: s.stats.tx_packets != x and T.append((_now(), "txc", s.stats.tx_packets - x)))
    probe(ev_mod.HostPort, "notify", before=lambda s: T.append((_now(), "ev", 0)))
    probe(vcpu_mod.VCPU, "kick", before=lambda s: s.blocked and T.append((_now(), "kick", 0)))

    def run_before(s):
        T.append((_now(), "run0", s.exits))
        return s.exits
    probe(kvm_engine.KVMEngine, "run", before=run_before,
          after=lambda s, x, r: T.append((_now(), "run1", (s.exits - x) * 100 + REASONS.get(getattr(r, "name", ""), 0))))
    real_os = writer.os

    class _OsProbe:
        def __getattr__(self, k):
            return getattr(real_os, k)

        @staticmethod
        def write(fd, b):
            n = real_os.write(fd, b)
            if ON[0]:
                T.append((_now(), "tapw", len(b)))
            return n
    writer.os = _OsProbe()


RR_TRACE = r"""
import socket, sys, time
dst, dur, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((dst, 7))
s.settimeout(3)
s.send(bytes(64)); s.recv(65536)
s.settimeout(0.5)
now = time.perf_counter_ns
rows = []
end = now() + int(dur * 1e9)
seq = 0
while now() < end:
    seq += 1
    t0 = now()
    s.send(seq.to_bytes(8, "little") + bytes(56))
    try:
        while True:
            r = s.recv(65536)
            if int.from_bytes(r[:8], "little") == seq:
                break
    except socket.timeout:
        continue
    rows.append((t0, now()))
with open(out, "w") as f:
    for a, b in rows:
        f.write(f"{a} {b}\n")
print(f"n={len(rows)}")
"""


def first(kind: str, lo: int, hi: int, idx: dict[str, list[int]]) -> int | None:
    import bisect
    lst = idx.get(kind, [])
    i = bisect.bisect_left(lst, lo)
    return lst[i] if i < len(lst) and lst[i] < hi else None


def analyse(rts: list[tuple[int, int]], trace: list[tuple[int, str, int]], dump: bool = True) -> dict[str, float]:
    import bisect
    idx: dict[str, list[int]] = {}
    vals: dict[tuple[str, int], int] = {}
    for t, k, v in trace:
        idx.setdefault(k, []).append(t)
        vals[(k, t)] = v
    steps: dict[str, list[float]] = {}
    counts: dict[str, list[float]] = {}

    def add(name, a, b):
        if a is not None and b is not None and b >= a:
            steps.setdefault(name, []).append((b - a) / 1e3)

    for i, (s, r) in enumerate(rts[:-1]):
        nxt = rts[i + 1][0]
        a = first("tapr", s, r, idx)
        b = first("ev", a, r, idx) if a else None
        c = first("run0", b, r, idx) if b else None
        d = first("txc", c, r, idx) if c else None
        e = first("tapw", d, r + 1, idx) if d else None
        add("1 client send -> tap readable", s, a)
        add("2 tap readable -> rx event sent", a, b)
        add("3 event sent -> slice entered (wake hop)", b, c)
        add("4 slice entered -> reply taken from tx ring", c, d)
        add("5 reply taken -> written to tap (thread)", d, e)
        add("6 tap write -> client has it", e, r)
        add("  round trip (client)", s, r)
        add("  client: reply -> next send", r, nxt)
        # slices, exits, events in the whole cycle [s, next send)
        for kind in ("run0", "ev", "kick", "yield", "tapr"):
            lst = idx.get(kind, [])
            counts.setdefault(kind, []).append(bisect.bisect_left(lst, nxt) - bisect.bisect_left(lst, s))
        ex = 0
        lst = idx.get("run1", [])
        for j in range(bisect.bisect_left(lst, s), bisect.bisect_left(lst, nxt)):
            ex += vals[("run1", lst[j])] // 100
        counts.setdefault("exits", []).append(ex)
        if c and d:
            ex = 0
            lst1 = idx.get("run1", [])
            for j in range(bisect.bisect_left(lst1, c), bisect.bisect_left(lst1, d)):
                ex += vals[("run1", lst1[j])] // 100
            counts.setdefault("exits before reply taken", []).append(ex)
        # time in slices while the request is outstanding vs. after the reply
        lst0, lst1 = idx.get("run0", []), idx.get("run1", [])
        busy = 0
        for j in range(bisect.bisect_left(lst0, s), bisect.bisect_left(lst0, nxt)):
            t0 = lst0[j]
            k = bisect.bisect_left(lst1, t0)
            if k < len(lst1):
                busy += lst1[k] - t0
        steps.setdefault("  time in KVM slices per cycle", []).append(busy / 1e3)
        if d:
            f = first("ev", d, nxt, idx)
            if f:
                add("7 reply taken -> tx-completion event", d, f)
                g = first("run0", f, nxt, idx)
                add("8 tx-completion event -> its slice", f, g)
    if dump:
        for i in (len(rts) // 3, len(rts) // 2):
            s0, nxt = rts[i][0], rts[i + 1][0]
            print(f"    cycle {i}: client send at 0, reply at {(rts[i][1] - s0) / 1e3:.0f} us")
            j = bisect.bisect_left(trace, (s0 - 200_000,))
            while j < len(trace) and trace[j][0] < nxt:
                t, k, v = trace[j]
                extra = f" exits={v // 100} reason={[k for k, c in REASONS.items() if c == v % 100]}" if k == "run1" else (f" {v}" if v else "")
                print(f"      {(t - s0) / 1e3:9.1f} us  {k}{extra}")
                j += 1
    out = {}
    for k in sorted(steps):
        v = steps[k]
        out[k] = statistics.median(v)
        print(f"    {k:<48} median {statistics.median(v):8.1f} us  p90 "
              f"{sorted(v)[int(len(v) * 0.9)]:8.1f}  n={len(v)}")
    for k in ("exits", "exits before reply taken", "run0", "ev", "kick", "yield", "tapr"):
        v = counts.get(k, [0])
        out[f"per_rt_{k}"] = statistics.mean(v)
        print(f"    per round trip: {k:<28} mean {statistics.mean(v):6.2f}  median {statistics.median(v):5.1f}")
    return out


def counters(dom, nb) -> dict[str, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    v = dom.vcpus[0]
    return {"exits": v.engine.exits, "events": nb.stats.events_sent,
            "slices": dom.hypervisor.scheduler.state(v).slices,
            "cpu_us": (ru.ru_utime + ru.ru_stime) * 1e6}


async def rr_trace(lan, ip: str, dur: float) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("r", suffix=".rt", delete=True) as f:
        os.chmod(f.name, 0o666)
        T.clear()
        ON[0] = True
        rc, out = await lan.run(sys.executable, "-c", RR_TRACE, ip, str(dur), f.name, timeout=dur + 30)
        ON[0] = False
        if rc != 0:
            netbench.fail(f"trace client: {out}")
        rts = [tuple(map(int, line.split())) for line in open(f.name)]
    trace = sorted(T)
    rts = rts[20:]                                 # skip warm-up
    print(f"  UDP RR W=1 traced: {len(rts)} round trips in {dur:.0f} s "
          f"({len(rts) / dur:.0f}/s), load {os.getloadavg()[0]:.1f}")
    return analyse(rts, trace)


async def main(args) -> None:
    install()
    async with VirtualLan(f"{netbench.HOST_IP}/24") as lan, \
            Hypervisor(memory_mib=netbench.LX_MEMORY_MIB + 64) as hv:
        ip = "198.18.0.20"
        dom = await hv.create(netbench.LX_KERNEL, memory_mib=netbench.LX_MEMORY_MIB, ramdisk=netbench.LX_INITRD,
                              name="lx-kvm", engine="kvm",
                              cmdline="console=hvc0 " + netbench.LX_ARGS.format(ip=ip),
                              vifs=[lan.vif("00:16:3e:00:0e:20")])
        t0 = time.monotonic()
        await dom.wait_for_line(r"^aiovmm-init: ready", timeout=args.boot_timeout)
        print(f"kvm: shell after {time.monotonic() - t0:.0f} s", flush=True)
        nb = dom.backends[0]
        eng = dom.vcpus[0].engine
        results: dict[str, list[dict[str, float]]] = {}
        for rnd in range(args.rounds):
            for mode in args.modes.split(","):
                flags = MODES[mode]
                nb.defer_tx_events, nb.batch_tx = flags
                print(f"[{rnd}] mode {mode}: defer_tx_events, batch_tx = {flags}",
                      flush=True)
                if args.traced:
                    await rr_trace(lan, ip, args.duration)
                row = {}
                for w in (1, 32):
                    a = counters(dom, nb)
                    prof = cProfile.Profile() if args.rr_profile and w == 1 and rnd == 0 else None
                    if prof:
                        prof.enable()
                    rr = await netbench.client(lan, ip, w, args.duration)
                    if prof:
                        prof.disable()
                    d = {k: v - a[k] for k, v in counters(dom, nb).items()}
                    n = max(rr["n"], 1)
                    row[f"w{w}_rps"] = rr["rps"]
                    row[f"w{w}_med_us"] = rr["median_us"]
                    for k in ("exits", "events", "slices", "cpu_us"):
                        row[f"w{w}_{k}"] = d[k] / n
                    if prof:
                        print(f"  profile of the loop, UDP RR W=1, mode {mode}:")
                        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
                print("  untraced, per round trip: " + " ".join(f"{k}={v:.2f}" for k, v in row.items())
                      + f" (load {os.getloadavg()[0]:.1f})", flush=True)
                results.setdefault(mode, []).append(row)
        for mode, rows in results.items():
            print(f"median {mode}: " + " ".join(f"{k}={statistics.median(r[k] for r in rows):.2f}"
                                                for k in rows[0]))
        for rnd in range(args.rounds if args.tcp_seconds else 0):
            for mode in args.modes.split(","):
                nb.defer_tx_events, nb.batch_tx = MODES[mode]
                for rev, name in ((True, "g2h"), (False, "h2g")):
                    a = counters(dom, nb)
                    a_tx, a_rx = nb.stats.tx_bytes, nb.stats.rx_bytes
                    prof = cProfile.Profile() if args.profile and rnd == 0 else None
                    if prof:
                        prof.enable()
                    r = await netbench.iperf(lan, ip, args.tcp_seconds, reverse=rev)
                    if prof:
                        prof.disable()
                    d = {k: v - a[k] for k, v in counters(dom, nb).items()}
                    nbytes = (nb.stats.tx_bytes - a_tx) if rev else (nb.stats.rx_bytes - a_rx)
                    per = max(nbytes / 65536, 1)
                    print(f"  [{rnd}] {mode} TCP {name} {r['mbps']:.0f} Mbit/s; per 64 KiB: "
                          + " ".join(f"{k} {d[k] / per:.2f}" for k in ("exits", "events", "slices", "cpu_us"))
                          + f" (load {os.getloadavg()[0]:.1f})", flush=True)
                    results.setdefault(f"tcp {mode}", []).append(
                        {f"{name}_mbps": r["mbps"], f"{name}_cpu_us": d["cpu_us"] / per})
                    if prof:
                        pstats.Stats(prof).sort_stats("tottime").print_stats(16)
        for mode, rows in results.items():
            if mode.startswith("tcp "):
                keys = sorted({k for r in rows for k in r})
                print(f"median {mode}: " + " ".join(
                    f"{k}={statistics.median(r[k] for r in rows if k in r):.1f}" for k in keys))
        print(f"netback: {nb.stats}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--tcp-seconds", type=float, default=5.0)
    ap.add_argument("--profile", action="store_true", help="cProfile the TCP runs")
    ap.add_argument("--rr-profile", action="store_true", help="cProfile each mode's first W=1 run")
    ap.add_argument("--traced", type=int, default=1, help="0: skip the traced run (counters only)")
    ap.add_argument("--modes", default="before,after",
                    help="netback's switches per run, alternated: " + ", ".join(MODES))
    ap.add_argument("--boot-timeout", type=float, default=600)
    uvloop.run(main(ap.parse_args()))
