"""The hang diagnostics the Linux fixtures use (aiovmm.testing): a guest that never prints
its line fails fast with the console's tail and every vCPU's state (wait_for_boot), and an
event loop stuck in one call is reported with its thread's stack (LoopWatchdog). A CI run
once spent 600 s in a KVM Linux boot and said only "TimeoutError"."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from aiovmm.testing import BootTimeout, LoopWatchdog, vcpu_state, wait_for_boot
from conftest import guest

ALL_ENGINES = True


async def test_a_quiet_guest_fails_on_the_stall_bound_with_its_vcpus(hv):
    """The hog prints "hog: ready" and then computes forever without printing: waiting for
    a line it never prints ends after the stall bound (not the overall timeout) with the
    console's tail and vCPU 0's state (runnable, its RIP, its engine's counters)."""
    dom = await hv.create(guest("hog"), memory_mib=8)
    await dom.wait_for_line(r"^hog: ready", timeout=60)
    t0 = time.monotonic()
    with pytest.raises(BootTimeout) as ei:
        await wait_for_boot(dom, r"^never printed$", timeout=120, stall=3)
    took = time.monotonic() - t0
    msg = str(ei.value)
    assert 3 <= took < 30, took
    assert "no console output for" in msg, msg
    assert "hog: ready" in msg.split("--- console tail ---", 1)[1], msg
    vcpu0 = next(l for l in msg.splitlines() if l.strip().startswith("vcpu0:"))
    assert "blocked=False" in vcpu0 and "rip=0x" in vcpu0 and "upcall_pending=" in vcpu0, vcpu0
    assert isinstance(ei.value, TimeoutError)           # what callers catching timeouts expect


async def test_the_line_still_returns_when_it_comes(hv):
    dom = await hv.create(guest("hog"), memory_mib=8)
    line = await wait_for_boot(dom, r"^hog: ready", timeout=60, stall=30)
    assert line == "hog: ready"
    assert "vcpu0:" in vcpu_state(dom)


def test_watchdog_reports_a_stuck_loop_with_its_stack():
    """A loop callback that does not return for 3 s (as a KVM_RUN nobody kicks): the
    watchdog's report names the stuck function; a loop that runs is never reported."""
    loop = asyncio.new_event_loop()
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    wd = LoopWatchdog(loop, th, stall=1.0, period=0.2, describe=lambda: "described")
    try:
        time.sleep(1.5)
        assert wd.reports == []

        def stuck_in_kvm_run():
            time.sleep(3)
        loop.call_soon_threadsafe(stuck_in_kvm_run)
        deadline = time.monotonic() + 10
        while not wd.reports and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(wd.reports) == 1, wd.reports
        assert "stuck_in_kvm_run" in wd.reports[0] and "described" in wd.reports[0], wd.reports[0]
    finally:
        wd.close()
        loop.call_soon_threadsafe(loop.stop)
        th.join(10)
        loop.close()


def test_lab_call_gives_up_on_a_stuck_loop(monkeypatch):
    """Lab.call (the Linux fixtures' way into their loop) does not wait out its whole timeout
    for a loop that does not run at all: after LOOP_GIVE_UP s it fails with the loop
    thread's stack (here a callback stuck for 8 s, the bound lowered to 2 s)."""
    import test_linux
    monkeypatch.setattr(test_linux, "LOOP_GIVE_UP", 2.0)
    lab = test_linux.Lab()
    try:
        async def stuck_loop():
            time.sleep(8)                      # blocks the loop thread, as a KVM_RUN would

        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as ei:
            lab.call(stuck_loop(), timeout=60)
        assert time.monotonic() - t0 < 8, time.monotonic() - t0
        assert "the event loop has not run for" in str(ei.value) and "stuck_loop" in str(ei.value)
    finally:
        lab.stop()
