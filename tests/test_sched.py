"""The credit scheduler (aiovmm/scheduler.py) on real guests.

CPU shares are measured from the hypervisor's own accounting over a window of a few seconds
after a warm-up, in thread CPU time (each slice's wall time minus the host steal in it, which
is what the scheduler charges): on a shared host a slice the host preempted lasts tens of ms
of wall time that no guest used. Weights are checked as the relative share of two guests, a
cap as guest CPU time over the window's wall time (the cap is a share of one CPU per period
of wall time), and latency for I/O as a count: how many CPU hogs' slices begin between the
I/O vCPU's wake-up and its own slice (a loaded host stretches every wall-time latency, not
the order in which the scheduler runs vCPUs).
"""
from __future__ import annotations

import asyncio
import collections
import re
import statistics
import time

import pytest

from aiovmm import Hypervisor
from aiovmm.scheduler import Pri
from aiovmm.testing import VirtualLan

from conftest import guest, kernel

HOG = guest("hog")
NET = guest("net")
WARMUP_S = 0.5
WINDOW_S = 2.5


async def start_hog(hv: Hypervisor, name: str):
    dom = await hv.create(HOG, memory_mib=4, name=name)
    await dom.wait_for_line(r"^hog: ready$", timeout=30)
    return dom


def used_ns(hv: Hypervisor, dom) -> int:
    """Thread CPU ns of the domain's slices (what the scheduler charged it)."""
    return sum(a["cpu_ns"] - a["host_steal_ns"] for a in map(hv.scheduler.accounting, dom.vcpus))


async def shares(hv: Hypervisor, doms: list, window: float = WINDOW_S) -> tuple[list[int], int, int]:
    """Thread CPU ns each domain used during the window, the window's wall ns and the loop
    thread's CPU ns over it.

    The window lasts `window` seconds and until this process has had 80 % of that in CPU
    time (30 s at most): on a host at load ~20 (this process gets ~10 % of a core) a 2.5 s
    window holds few slices; the longer window holds as many as on a quiet host."""
    before = [used_ns(hv, d) for d in doms]
    t0 = time.perf_counter_ns()
    c0 = time.thread_time_ns()
    p0 = time.process_time()
    await asyncio.sleep(window)
    while time.process_time() - p0 < 0.8 * window and time.perf_counter_ns() - t0 < 30e9:
        await asyncio.sleep(0.1)
    wall = time.perf_counter_ns() - t0
    return [used_ns(hv, d) - b for d, b in zip(doms, before)], wall, time.thread_time_ns() - c0


async def test_weights_256_and_512_share_the_cpu_1_to_2():
    async with Hypervisor(memory_mib=64) as hv:
        a = await start_hog(hv, "w256")
        b = await start_hog(hv, "w512")
        a.set_sched(weight=256)
        b.set_sched(weight=512)
        await asyncio.sleep(WARMUP_S)
        (ca, cb), _wall, _cpu = await shares(hv, [a, b])
        ratio = cb / ca
        assert abs(ratio / 2 - 1) <= 0.10, f"512:256 got {ratio:.3f}, want 2 +- 10%"
        # Equal weights again: back to 1:1 (the weights, not the order, made it 1:2).
        b.set_sched(weight=256)
        await asyncio.sleep(WARMUP_S)
        (ca, cb), _wall, _cpu = await shares(hv, [a, b], 1.5)
        assert abs(cb / ca - 1) <= 0.10, f"256:256 got {cb / ca:.3f}"


async def test_cap_25_holds_and_lifting_it_is_work_conserving():
    async with Hypervisor(memory_mib=64) as hv:
        a = await start_hog(hv, "cap")
        a.set_sched(cap=25)
        await asyncio.sleep(WARMUP_S)
        # At most 25 % in every window; at least 22 % and parked a good part of the time in
        # the best of three (a window in which the host gave this process less than 25 % of
        # a CPU cannot show a lower bound).
        seen = []
        for _ in range(3):
            w0 = hv.scheduler.accounting(a.vcpus[0])["wait_ns"]
            (c,), wall, cpu = await shares(hv, [a])
            waited = hv.scheduler.accounting(a.vcpus[0])["wait_ns"] - w0
            seen.append((round(100 * c / wall, 1), round(100 * waited / wall, 1), round(100 * cpu / wall, 1)))
            assert 100 * c / wall <= 28, f"capped at 25 % it ran (pct, waited pct, loop pct) {seen}"
            if 100 * c / wall >= 22:
                break
        pct, waited_pct, loop_pct = max(seen)
        # Held by the cap, not by the host: 22 % or more and parked a good part of the time;
        # or, when the host gave this loop less than the cap in every window (load ~14 left
        # it ~9 % of a CPU), never parked and using most of what the loop got.
        held = pct >= 22 and waited_pct > 20
        host_bound = all(l < 25 and w < 2 and p > 0.7 * l for p, w, l in seen)
        assert held or host_bound, f"capped at 25 % it ran (pct, waited pct, loop pct) {seen}"
        # Lifted: alone and uncapped it uses most of what the loop thread gets, and it is no
        # longer held back (runnable, not running: only when parked, it is alone).
        a.set_sched(cap=0)
        await asyncio.sleep(0.2)
        w0 = hv.scheduler.accounting(a.vcpus[0])["wait_ns"]
        (c,), wall, cpu = await shares(hv, [a], 1.0)
        waited = hv.scheduler.accounting(a.vcpus[0])["wait_ns"] - w0
        assert c > 0.5 * cpu and waited < 0.1 * wall, \
            f"uncapped and alone it used {100 * c / cpu:.1f} % of the loop's CPU, waited {100 * waited / wall:.1f} %"


async def test_a_blocked_vcpu_costs_nothing_and_its_weight_is_not_reserved():
    """A ticking-but-idle guest with the largest weight takes almost nothing from a hog
    (work-conserving: its unused share goes to whoever wants the CPU)."""
    async with Hypervisor(memory_mib=64) as hv:
        idle = await hv.create(kernel(), memory_mib=4, name="idle", cmdline="ticks=100000 period_ms=200")
        await idle.wait_for_line(r"^timer: tick 1 ", timeout=30)
        idle.set_sched(weight=65535)
        hog = await start_hog(hv, "hog")
        await asyncio.sleep(WARMUP_S)
        (ci, ch), wall, cpu = await shares(hv, [idle, hog])
        s = hv.scheduler.accounting(idle.vcpus[0])
        # Its own cost per wall second (a tick's CPU does not depend on what the host gives
        # the loop), the hog's against what the loop got.
        assert ci < 0.02 * wall, f"idle guest used {100 * ci / wall:.1f} % of a CPU {s}"
        assert ch > 10 * ci and ch > 0.5 * cpu, (ch, ci, cpu, wall)
        assert hv.scheduler.state(idle.vcpus[0]).pri in (Pri.BOOST, Pri.UNDER)


def test_sched_params_are_validated():
    from aiovmm.scheduler import validate_params
    for w, c in ((0, None), (65536, None), (None, -1), (None, 101)):
        with pytest.raises(ValueError):
            validate_params(w, c)
    validate_params(1, 100)


RTT = re.compile(r"time=([\d.]+) ms")


async def ping_rtts(lan: VirtualLan, n: int = 30, interval: float = 0.02) -> list[float]:
    rc, out = await lan.run("ping", "-c", str(n), "-i", str(interval), "-W", "2", "198.18.0.2", timeout=30)
    assert rc == 0, out
    return [float(x) for x in RTT.findall(out)]


def slices_before_run(hv: Hypervisor, v) -> list[tuple[int, Pri]]:
    """Record, for every wake-up of vCPU `v` from block or poll, how many other vCPUs' slices
    began before v's own next slice, and v's priority then (a list the caller reads after
    the traffic). The scheduler's begin() and v's wake-up paths are observed, not replaced:
    each still does its work."""
    sch = hv.scheduler
    counts: list[tuple[int, Pri]] = []
    pending: list[int] = []                    # [slices so far] while v is woken, not run
    begin = sch.begin

    def observed_begin(w) -> None:
        if pending:
            if w is v:
                counts.append((pending.pop(), sch.state(v).pri))
            else:
                pending[0] += 1
        begin(w)

    def observe(wake):
        def observed(*args) -> None:
            was = v.blocked
            wake(*args)
            if was and not v.blocked and not pending:
                pending.append(0)
        return observed

    sch.begin = observed_begin
    for name in ("kick", "poll_kick", "end_poll"):
        setattr(v, name, observe(getattr(v, name)))
    return counts


async def test_io_guest_runs_before_cpu_hogs_when_woken():
    """A ping to an I/O guest next to four CPU hogs: the I/O vCPU, woken by the frame, is
    boosted and runs before the hogs (BOOST, and the settle turns that let its wake-up
    arrive before a hog's slice begins). Measured as the number of hog slices that begin
    between its wake-up and its own slice: wall-time RTTs on a loaded host measure the host
    (a median of 38-63 ms at load ~14, 1.4 ms quiet, whatever the scheduler does). Xen
    boosts a vCPU only while it is UNDER; the guest's CPU per ping stays about the same on
    a loaded host while the CPU the host gives the loop (and so the I/O guest's fair share)
    does not: at 20 pings/s and load ~16 (~9 % of a core for the loop) 22 of 29 wake-ups
    found it OVER. So pings every 100 ms, and the order is checked on the wake-ups that were
    boosted, which must be many."""
    async with VirtualLan("198.18.0.1/24") as lan, Hypervisor(memory_mib=128) as hv:
        g = await hv.create(NET, memory_mib=16, name="io", cmdline="ip=198.18.0.2/24 name=io",
                            vifs=[lan.vif("00:16:3e:00:00:02")])
        await g.wait_for_line(r"^net: up ", timeout=30)
        await ping_rtts(lan, 5)                      # ARP and warm caches
        quiet = statistics.median(await ping_rtts(lan))
        hogs = [await start_hog(hv, f"hog{i}") for i in range(4)]
        await asyncio.sleep(WARMUP_S)
        (cg, *ch), _wall, _cpu = await shares(hv, [g, *hogs], 0.1)
        assert all(c > 0 for c in ch)                # the hogs do run
        counts = slices_before_run(hv, g.vcpus[0])
        loaded = await ping_rtts(lan, 40, 0.1)
        med = statistics.median(loaded)
        boosted = sorted(n for n, pri in counts if pri == Pri.BOOST)
        print(f"ping median quiet {quiet:.3f} ms, with 4 hogs {med:.3f} ms, max {max(loaded):.3f} ms; "
              f"hog slices before the woken I/O vCPU ran (count, boosted): "
              f"{sorted(collections.Counter((n, pri == Pri.BOOST) for n, pri in counts).items())}")
        # Woken (at least) every other ping, and boosted on many wake-ups.
        assert len(counts) >= len(loaded) // 2 >= 15, (len(counts), len(loaded))
        assert len(boosted) >= 10, counts
        # Boosted: mostly no hog slice first, never more than two (the one a hog began
        # before the boosted vCPU queued, when the loop stalled past the settle window);
        # without BOOST or the settle turns it waits for one or more on most wake-ups.
        assert boosted[len(boosted) // 2] == 0 and boosted[-1] <= 2, boosted


def test_xl_cfg_weight_and_cap():
    from aiovmm.config import ConfigError, parse
    c = parse('kernel = "/k"\nweight = 512\ncap = 25\n')
    assert (c.weight, c.cap) == (512, 25)
    assert (parse('kernel = "/k"\n').weight, parse('kernel = "/k"\n').cap) == (None, None)
    for bad in ("weight = 0", "weight = 70000", "cap = -1", "cap = 101", 'weight = "x"'):
        with pytest.raises(ConfigError):
            parse(f'kernel = "/k"\n{bad}\n')
