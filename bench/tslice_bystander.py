"""A bystander's UDP round trip beside a lone CPU-bound guest (tests/test_redteam_tslice_loop.py).

net.elf (UDP echo on port 7, blocked between requests) is the bystander; a client in the
LAN's host namespace sends one 64-byte request every --gap-ms (150 ms: longer than
scheduler.IO_ACTIVE_NS, so the hog's slices are lengthened again between two requests, as
with any sparse traffic: a ping, a DNS answer, a health check) and times each round trip.
Per round, interleaved in one process (order rotated each round), per engine:
  idle: the bystander alone (the reference figure of this run);
  hog-2ms: beside a CPU-bound hog whose slices are never lengthened (SLICE_NS, 2 ms): what
           the design promised before lengthened slices;
  hog-off: beside the hog, the loop's I/O not looked at inside a lengthened slice (as
           before: Scheduler.loop_waits answers False, no I/O watcher);
  hog-on: beside the hog, as shipped (a lengthened slice ends when the loop has I/O ready:
          Scheduler.goes_on, _IoWatch);
  storm-off, storm-on: the same beside timer_storm re-arming set_timer_op 1 ns ahead from
          its handler (its events come inside its own lengthened slices, at Xen's 50 us
          timer slop).
Reports the median and p90 round trip per variant, the hog's slices and lengthened slices,
and the lengthened slices cut for loop work.

Last line: <engine>_<variant>_med_ms=<> <engine>_<variant>_p90_ms=<> ... load=<1 min>
"""
from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aiovmm import Hypervisor  # noqa: E402
from aiovmm.testing import VirtualLan  # noqa: E402
from tslice import cli, per_engine  # noqa: E402
from tslice_loop_io import VARIANTS, attacker  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NET = os.path.join(ROOT, "guests", "build", "tests", "net.elf")

CLIENT = r"""
import socket, sys, time
dst, n, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
rtts = []
for i in range(n):
    t = time.perf_counter_ns()
    s.sendto(i.to_bytes(4, "little") * 16, (dst, 7))
    try:
        while int.from_bytes(s.recv(100)[:4], "little") != i:
            pass
        rtts.append(time.perf_counter_ns() - t)
    except socket.timeout:
        rtts.append(-1)
    time.sleep(gap)
print(" ".join(map(str, rtts)))
"""



async def one(hv, lan, variant: str, n: int, gap: float) -> tuple[list[int], dict]:
    sched = hv.scheduler
    async with attacker(hv, variant) as hog:
        st = sched.state(hog.vcpus[0]) if hog else None
        s0 = (st.slices, st.long_slices) if st else (0, 0)
        c0 = sched.loop_cuts + (sched._io_watch.kicks if sched._io_watch else 0)
        rc, out = await lan.run(sys.executable, "-c", CLIENT, "198.18.0.2", str(n), str(gap),
                                timeout=n * (gap + 1) + 30)
        if rc != 0:
            raise SystemExit(f"client: {out}")
        counts = {"slices": st.slices - s0[0] if st else 0,
                  "long": st.long_slices - s0[1] if st else 0,
                  "cuts": sched.loop_cuts + (sched._io_watch.kicks if sched._io_watch else 0) - c0}
        return [int(x) for x in out.split()], counts


def pct(xs: list[int], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def engine_ab(engine: str, rounds: int, n: int, gap: float) -> dict[str, float]:
    rtt: dict[str, list[int]] = {k: [] for k in VARIANTS}
    cnt: dict[str, list[dict]] = {k: [] for k in VARIANTS}
    async with VirtualLan("198.18.0.1/24") as lan, Hypervisor(memory_mib=256, engine=engine) as hv:
        net = await hv.create(NET, memory_mib=16, name="by", cmdline="ip=198.18.0.2/24",
                              vifs=[lan.vif("00:16:3e:00:00:02")])
        await net.wait_for_line(r"^net: up ", timeout=60)
        await one(hv, lan, "idle", 5, 0.01)                        # ARP, warm-up
        for r in range(rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
            for k in order:
                xs, c = await one(hv, lan, k, n, gap)
                rtt[k] += xs
                cnt[k].append(c)
    out = {}
    print(f"{engine}: {rounds} rounds x {n} requests, one per {gap * 1e3:g} ms")
    for k in VARIANTS:
        ok = [x for x in rtt[k] if x >= 0]
        med, p90 = statistics.median(ok) / 1e6, pct(ok, 0.9) / 1e6
        tot = {f: sum(c[f] for c in cnt[k]) for f in ("slices", "long", "cuts")}
        print(f"  {k:8s} round trip median {med:.3f} ms p75 {pct(ok, 0.75) / 1e6:.3f} ms p90 {p90:.3f} ms "
              f"max {max(ok) / 1e6:.3f} ms, over 10 ms {sum(x > 10_000_000 for x in ok)}/{len(ok)} "
              f"lost {len(rtt[k]) - len(ok)}; attacker slices {tot['slices']} (lengthened {tot['long']}, "
              f"ended for loop I/O, watcher kicks + goes_on {tot['cuts']})")
        out[f"{engine}_{k}_med_ms"], out[f"{engine}_{k}_p90_ms"] = med, p90
    return out


async def main(rounds: int, engines: list[str]) -> None:
    n, gap = int(os.environ.get("BYSTANDER_N", "30")), float(os.environ.get("BYSTANDER_GAP", "0.15"))
    await per_engine(engines, lambda e: engine_ab(e, rounds, n, gap))


if __name__ == "__main__":
    cli(__doc__, 3, "kvm,unicorn", main)
