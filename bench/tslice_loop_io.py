"""How late the event loop runs an fd's callback beside a lone CPU-bound guest
(tests/test_redteam_tslice_loop.py), per engine: a thread of this process writes one byte
into a socket the loop watches every 20-50 ms (random) and the callback takes the time since
the write. The mechanism alone, without netback, a guest's reply or the client's wake-up
(bench/tslice_bystander.py has those). Variants, interleaved in one process (order rotated
each round): idle (no guest: the reference figure), hog-2ms (slices never lengthened),
hog-off (lengthened, the loop's I/O not looked at: before s19), hog-on (as shipped:
scheduler._IoWatch and Scheduler.goes_on end a lengthened slice when I/O is ready);
storm-off/-on: the same beside timer_storm re-arming set_timer_op 1 ns ahead from its
handler, alone on the CPU (lengthened slices full of its own timer events, 50 us slop).

Last line: <engine>_<variant>_med_ms=<> <engine>_<variant>_p90_ms=<> ... load=<1 min>
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aiovmm import Hypervisor  # noqa: E402
from aiovmm.scheduler import SLICE_NS, TSLICE_NS  # noqa: E402
from cpu import torn_down  # noqa: E402
from tslice import cli, per_engine  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTACKERS = {"hog": (os.path.join(ROOT, "guests", "build", "tests", "hog.elf"), "", r"^hog: ready$"),
             "storm": (os.path.join(ROOT, "guests", "build", "hostile", "timer_storm.elf"),
                       "via=2 kind=0 delta=1", r"^timer_storm: ready")}
VARIANTS = ("idle", "hog-2ms", "hog-off", "hog-on", "storm-off", "storm-on")
SAMPLES = 60


@contextlib.asynccontextmanager
async def attacker(hv, variant: str):
    """The variant's attacker guest (None for idle) with the scheduler set as the variant
    says (-2ms: never lengthened; -off: the loop's I/O not looked at), put back after."""
    sched = hv.scheduler
    watch, dom = None, None
    try:
        if variant != "idle":
            path, cmdline, ready = ATTACKERS[variant.split("-")[0]]
            dom = await hv.create(path, memory_mib=4, name="attacker", cmdline=cmdline)
            await dom.wait_for_line(ready, timeout=60)
            if variant.endswith("-off"):
                watch, sched._io_watch = sched._io_watch, None
                sched.loop_waits = lambda: False
            if variant.endswith("-2ms"):
                sched.tslice_ns = SLICE_NS
        yield dom
    finally:
        sched.__dict__.pop("loop_waits", None)
        if watch is not None:
            sched._io_watch = watch
        sched.tslice_ns = TSLICE_NS
        if dom is not None:
            dom.shutdown()
            await torn_down(hv, dom)


async def one(hv, variant: str) -> list[int]:
    loop = asyncio.get_running_loop()
    r, w = socket.socketpair()
    sent: list[int] = []
    got: list[int] = []
    done = asyncio.Event()

    def on_readable() -> None:
        r.recv(64)
        got.append(time.perf_counter_ns() - sent[len(got)])
        if len(got) == SAMPLES:
            done.set()

    def sender() -> None:
        for _ in range(SAMPLES):
            time.sleep(random.uniform(0.02, 0.05))
            sent.append(time.perf_counter_ns())
            w.send(b"x")
            while len(got) < len(sent) and not done.is_set():
                time.sleep(0.001)
    try:
        async with attacker(hv, variant):
            loop.add_reader(r.fileno(), on_readable)
            t = threading.Thread(target=sender)
            t.start()
            try:
                await asyncio.wait_for(done.wait(), SAMPLES * 2)
            finally:
                done.set()
                await asyncio.to_thread(t.join)
                loop.remove_reader(r.fileno())
        return got
    finally:
        r.close()
        w.close()


async def engine_ab(engine: str, rounds: int) -> dict[str, float]:
    res: dict[str, list[int]] = {k: [] for k in VARIANTS}
    async with Hypervisor(memory_mib=256, engine=engine) as hv:
        for i in range(rounds):
            for k in VARIANTS[i % len(VARIANTS):] + VARIANTS[:i % len(VARIANTS)]:
                res[k] += await one(hv, k)
    out = {}
    print(f"{engine}: {rounds} rounds x {SAMPLES} writes")
    for k in VARIANTS:
        xs = sorted(res[k])
        med, p90 = statistics.median(xs) / 1e6, xs[int(0.9 * len(xs))] / 1e6
        print(f"  {k:8s} fd-to-callback median {med:.3f} ms p90 {p90:.3f} ms max {xs[-1] / 1e6:.3f} ms, "
              f"over 5 ms {sum(x > 5_000_000 for x in xs)}/{len(xs)}")
        out[f"{engine}_{k}_med_ms"], out[f"{engine}_{k}_p90_ms"] = med, p90
    return out


async def main(rounds: int, engines: list[str]) -> None:
    await per_engine(engines, lambda e: engine_ab(e, rounds))


if __name__ == "__main__":
    cli(__doc__, 3, "kvm,unicorn", main)
