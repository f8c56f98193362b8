"""Token-bucket I/O limits (aiovmm/ratelimit.py) in netback and blkback, on real guests.

Rates are measured from the backends' own counters over a window (host side), or from the
guest's own timing of a transfer; limits are set and lifted at run time.
"""
from __future__ import annotations

import asyncio
import re
import time
import uuid

import pytest

from aiovmm import Hypervisor
from aiovmm.backends.block import DiskConfig
from aiovmm.ratelimit import Limit, Limiter, Throttle, TokenBucket, make_limit, parse_vif_rate
from aiovmm.testing import VirtualLan

from conftest import guest

NET = guest("net")
BLK = guest("blk")
PREFIX = f"aiovmm-lim-{uuid.uuid4().hex[:8]}"


def test_vif_rate_is_parsed_as_xl_does():
    assert parse_vif_rate("10Mb/s@20ms") == Limit(bytes_per_s=1_250_000, interval_us=20_000)
    assert parse_vif_rate("1MB/s") == Limit(bytes_per_s=1_000_000, interval_us=50_000)
    assert parse_vif_rate("100Kb/s@1s") == Limit(bytes_per_s=12_500, interval_us=1_000_000)
    assert parse_vif_rate("5GB/s@500us") == Limit(bytes_per_s=5_000_000_000, interval_us=500)
    assert parse_vif_rate("8b/s@2") == Limit(bytes_per_s=1, interval_us=2_000_000)
    for bad in ("", "@20ms", "10Mbit/s", "10Mb", "0Mb/s", "10Mb/s@0ms", "10Mb/s@20ns", "10mb/s"):
        with pytest.raises(ValueError):
            parse_vif_rate(bad)


def test_disk_limits_parse_and_validate():
    c = DiskConfig.parse("target=/tmp/x.img,vdev=xvda,iops=500,bps=10M,burst_ms=20")
    assert c.limit == Limit(bytes_per_s=10_000_000, ops_per_s=500, interval_us=20_000)
    assert c.target == "/tmp/x.img"
    assert DiskConfig.parse("/tmp/x.img,raw,xvdb,rw").limit is None
    for bad in ("target=/x,iops=0", "target=/x,iops=abc", "target=/x,bps=1T", "target=/x,iops=5,burst_ms=0"):
        with pytest.raises(ValueError):
            DiskConfig.parse(bad)
    with pytest.raises(ValueError):
        make_limit(0, None)


def test_token_bucket_long_run_rate_is_exact():
    """At most `rate` per second plus the burst over the whole run, whatever the load; at
    least `rate` per second of the time the caller was awake to take its turn. Time the
    caller was away beyond what it asked for (a sleep that overran, or the host taking the
    CPU between two calls: a loaded host) is lost for any bucket once the burst is full: it
    is not counted, and the run lasts 0.3 s of counted time. A gap banks at least
    burst - item = 3 tokens (3 ms) before it loses any, so only the part of a gap beyond
    that is counted as away (the bucket is credited at most its burst per gap)."""
    b = TokenBucket(rate=1000.0, burst=10.0)
    t0 = last = time.monotonic()
    n = 0
    away = 0.0
    asked = 0.0                  # what the previous turn slept for
    while last - t0 - away < 0.3 and last - t0 < 10:
        d = b.delay_s()
        now = time.monotonic()
        away += max(0.0, now - last - asked - 0.003)
        last, asked = now, d
        if d:
            time.sleep(d)
            continue
        b.charge(7)          # items bigger than what is left still pass, as debt
        n += 7
    wall = time.monotonic() - t0
    assert n / (wall - away) >= 900, (n, wall, away)
    assert n / wall <= 1100 + 10 / 0.3, (n, wall)


async def test_throttle_one_wakeup_when_the_debt_is_repaid():
    lim = Limiter(make_limit(None, 100, interval_us=10_000))     # 100 ops/s, 1 op of burst
    woken: list[float] = []
    th = Throttle(lambda: woken.append(time.monotonic()))
    assert not th.blocked(lim)
    lim.charge(0, ops=2)                            # one op of debt: 10 ms
    t0 = time.monotonic()
    assert th.blocked(lim) and th.blocked(lim)      # asked twice: still one timer
    await asyncio.sleep(0.1)
    # Woken once, after the debt's 10 ms and before this later-due sleep ended (measured on
    # the same loop, so a loop the host kept waiting delays both alike).
    t_sleep_end = time.monotonic()
    assert len(woken) == 1 and 0.009 <= woken[0] - t0 and woken[0] <= t_sleep_end, (woken, t0, t_sleep_end)
    assert not th.blocked(lim)                      # repaid
    lim.charge(0, ops=2)
    assert th.blocked(lim)
    th.cancel()                                     # a disconnect drops the wake-up
    await asyncio.sleep(0.05)
    assert len(woken) == 1


async def rate_over(get, window: float, clock=time.perf_counter) -> float:
    """Count per second of `clock` over `window` s of wall time: per wall second by default,
    per second of this (the loop's) thread's CPU with time.thread_time, which a busy host
    taking the CPU away does not change."""
    a, t = get(), clock()
    await asyncio.sleep(window)
    return (get() - a) / max(clock() - t, 1e-6)


async def rates_over(get, window: float) -> tuple[float, float]:
    """Count per wall second and per second of the loop thread's CPU, over one window."""
    a, t, c = get(), time.perf_counter(), time.thread_time()
    await asyncio.sleep(window)
    n = get() - a
    return n / max(time.perf_counter() - t, 1e-6), n / max(time.thread_time() - c, 1e-6)


async def test_vbd_500_iops_holds_and_full_speed_returns_when_lifted(tmp_path):
    img = tmp_path / f"{PREFIX}.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    async with Hypervisor(memory_mib=128) as hv:
        dom = await hv.create(BLK, memory_mib=16, disks=[f"target={img},vdev=xvda"],
                              cmdline="mode=bench bench=randread ops=10000000 bs=1 depth=8 span=16000")
        await dom.wait_for_line(r"^blk: sectors=", timeout=30)
        b = dom.backends[0]
        ops = lambda: b.stats.rd_reqs           # noqa: E731
        await asyncio.sleep(0.3)
        full = await rate_over(ops, 0.8)
        full_cpu = await rate_over(ops, 0.8, time.thread_time)
        # 500 IOPS, or a third of what the guest did unlimited when a loaded host made that
        # less than 1500 (a limit above what it can do would test nothing).
        iops = 500 if full > 1500 else round(full / 3)
        assert iops >= 30, f"unlimited the disk only did {full:.0f} IOPS: cannot test a limit"
        # A 50 ms interval: the bucket saves up to 50 ms of tokens, so a throttled vbd whose
        # wake-up a loaded host delayed by less than that still reaches the rate (with 20 ms
        # it did 86-90 % of it at load 22).
        dom.set_io_limit("xvda", make_limit(None, iops, 50_000))
        await asyncio.sleep(0.3)
        # A window in which the loaded host descheduled the guest or this loop does fewer:
        # the limit holds in every window and is reached in the best one (as the vif test).
        windows = [await rate_over(ops, 1.0) for _ in range(3)]
        limited = max(windows)
        assert limited <= 1.10 * iops, f"limited to {iops} IOPS it did {windows}"
        assert limited >= 0.90 * iops, f"limited to {iops} IOPS it did {windows}"
        dom.set_io_limit("xvda", None)
        await asyncio.sleep(0.2)
        # Full speed back: per second of the loop thread's CPU (the guest and blkback run
        # on it), as before the limit. Per wall second, a window in which the other test
        # worker held the CPU did 22 % of the unlimited rate (CI run at the end of stop 11):
        # both rates are the best of three windows. Per wall second it must be well over the
        # limit, which holds every window to 1.10x when still in force: 1.5x, as the limit
        # is a third of the unlimited rate or less and a loaded host slows the rest.
        lifted_windows = [await rates_over(ops, 0.5) for _ in range(3)]
        lifted = max(w for w, _c in lifted_windows)
        lifted_cpu = max(c for _w, c in lifted_windows)
        print(f"vbd IOPS: unlimited {full:.0f} ({full_cpu:.0f} per CPU s), limited to {iops}: "
              f"{limited:.0f}, lifted {lifted:.0f} ({lifted_cpu:.0f} per CPU s)")
        assert lifted_cpu > 0.6 * full_cpu and lifted > 1.5 * iops, (full_cpu, lifted_windows)
        assert not dom.dying


FLOOD = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
end = time.monotonic() + float(sys.argv[1])
data = b"x" * 1400
while time.monotonic() < end:
    for _ in range(64):
        try:
            s.sendto(data, ("198.18.0.2", 9000))
        except OSError:
            pass
"""

BLAST = re.compile(r"^net: blast 198\.18\.0\.1:9 sent=(\d+) bytes=(\d+) us=(\d+)$")


def vif_limit(unlimited_bps: float) -> tuple[float, Limit]:
    """10 Mbit/s, or a third of what the path did unlimited when a loaded host made that less
    than 30 Mbit/s (as the vbd test: a limit above what the guest and this loop can carry
    tests nothing; at load 11-18 they carried 3-4.5 Mbit/s, and a 10 Mbit/s limit failed its
    lower bound in 3 of 3 runs). In bytes per second, and as a vif rate of 20 ms."""
    bps = min(10_000_000 / 8, unlimited_bps / 3)
    assert bps * 8 >= 200_000, f"unlimited the vif only did {unlimited_bps * 8 / 1e6:.2f} Mbit/s"
    kbit = int(bps * 8 / 1000)
    return kbit * 1000 / 8, parse_vif_rate(f"{kbit}Kb/s@20ms")


async def flowing(get) -> None:
    """Until the count grows by 100 kB (a blast or flood under way; 10 s at most)."""
    start = get()
    async with asyncio.timeout(10):
        while get() - start < 100_000:
            await asyncio.sleep(0.02)


async def test_vif_10mbit_holds_both_ways_and_full_speed_returns_when_lifted():
    async with VirtualLan("198.18.0.1/24") as lan, Hypervisor(memory_mib=128) as hv:
        # Guest -> host: a blast through the vif, counted by netback's tx: unlimited for a
        # window, then limited. The guest and this loop share a loaded 2-core host: a window
        # in which either was descheduled carries less than offered. The limit must hold in
        # every window (upper bound) and be reached in the best one (lower bound), both
        # directions alike.
        vif = lan.vif("00:16:3e:00:00:03")
        tx = await hv.create(NET, memory_mib=16, name="tx", vifs=[vif],
                             cmdline="ip=198.18.0.3/24 name=tx blast=198.18.0.1:9 bytes=4000000000 size=1472")
        await tx.wait_for_line(r"^net: up ", timeout=30)
        nb = tx.backends[0]
        await flowing(lambda: nb.stats.tx_bytes)    # ARP, ping, the blast under way
        limit_bps, rate = vif_limit(await rate_over(lambda: nb.stats.tx_bytes, 0.5))
        tx.set_io_limit(0, rate)
        await asyncio.sleep(0.4)                 # the initial burst
        tx_windows = [await rate_over(lambda: nb.stats.tx_bytes, 0.7) for _ in range(3)]
        # 4 GB: longer than any run of this test, at any engine's speed (the patched Unicorn
        # sends ~155 Mbit/s unlimited; 40 MB once ended before a descheduled loop set the
        # limit, and its blast line was not the last console line, so no check saw it).
        assert not any(BLAST.match(line) for line in tx.console_lines), \
            "the blast ended inside the windows"
        tx_rate = max(tx_windows)
        assert tx_rate <= 1.10 * limit_bps, [w * 8 / 1e6 for w in tx_windows]
        assert tx_rate >= 0.90 * limit_bps, [w * 8 / 1e6 for w in tx_windows]
        tx.shutdown()
        # Host -> guest: a flood at the sink port, counted by netback's rx, unlimited for a
        # window, then limited.
        vif = lan.vif("00:16:3e:00:00:02")
        rx = await hv.create(NET, memory_mib=16, name="rx", vifs=[vif],
                             cmdline="ip=198.18.0.2/24 name=rx sink=9000")
        await rx.wait_for_line(r"^net: up ", timeout=30)
        rc, out = await lan.run("ping", "-c", "2", "-i", "0.2", "-W", "2", "198.18.0.2")
        assert rc == 0, out
        b = rx.backends[0]
        got = lambda: b.stats.rx_bytes          # noqa: E731
        flood = asyncio.ensure_future(lan.run("python3", "-c", FLOOD, "8", timeout=20))
        try:
            await flowing(got)
            limit_bps, rate = vif_limit(await rate_over(got, 0.5))
            rx.set_io_limit(0, rate)
            await asyncio.sleep(0.3)
            # The flood and this loop share a loaded 2-core host: a window in which either was
            # descheduled delivers less than offered. The limit must hold in every window
            # (upper bound) and be reached in the best one (lower bound).
            windows = [await rate_over(got, 1.0) for _ in range(3)]
            rx.set_io_limit(0, None)
            await asyncio.sleep(0.2)
            # Lifted: the best of three windows as well (one window in which the flood or
            # this loop was descheduled says nothing about the limit), well over the limit
            # that holds every window to 1.10x while in force.
            lifted = max([await rate_over(got, 0.4) for _ in range(3)])
        finally:
            await flood
        print(f"vif: tx limited {tx_rate * 8 / 1e6:.2f} Mbit/s, rx limited "
              f"{' '.join(f'{w * 8 / 1e6:.2f}' for w in windows)} Mbit/s, lifted {lifted * 8 / 1e6:.2f} Mbit/s")
        assert max(windows) <= 1.10 * limit_bps, [w * 8 / 1e6 for w in windows]
        assert max(windows) >= 0.90 * limit_bps, [w * 8 / 1e6 for w in windows]
        assert lifted > 1.5 * limit_bps, f"lifted rx only {lifted * 8 / 1e6:.2f} Mbit/s"
