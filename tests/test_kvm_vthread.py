"""The KVM engine's opt-in vCPU thread (AIOVMM_KVM_VCPU_THREAD=1, kvm_engine._VcpuThread):
every KVM_RUN of a vCPU on a thread of its own, so that the event loop runs while the guest
does. What it must keep: the loop's callbacks run while a CPU-bound guest runs (the point
of it), a paused domain's guest is out of KVM_RUN when pause() returns (nothing of it runs
while the toolstack looks at it), a destroyed domain's thread stops with the guest, and a
switch between the two modes inside a running slice neither loses the exit in flight nor
leaves the slice without its deadline. Counted, never timed (the 1 ms sleeps only spread
the loop turns that look)."""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor, grants

from conftest import HV_MEMORY_MIB, _kvm_skip_reason, guest

pytestmark = pytest.mark.skipif(_kvm_skip_reason() is not None, reason=str(_kvm_skip_reason()))

HOG = guest("hog")


async def _hog(hv, name: str = "hog"):
    dom = await hv.create(HOG, memory_mib=4, name=name, engine="kvm")
    await dom.wait_for_line(r"^hog: ready$", timeout=60)
    return dom


async def _loop_turns_in_flight(eng, n: int = 200) -> int:
    """Of `n` loop turns (1 ms apart), how many found the guest's run in flight."""
    seen = 0
    for _ in range(n):
        await asyncio.sleep(0.001)
        seen += eng.in_flight
    return seen


@pytest.fixture
def vthread(monkeypatch):
    monkeypatch.setenv("AIOVMM_KVM_VCPU_THREAD", "1")


async def test_the_loop_runs_while_the_guest_computes(vthread):
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
        dom = await _hog(hv)
        eng = dom.vcpus[0].engine
        assert eng.threaded
        # The hog never blocks: on the loop thread no callback ever runs inside its run.
        assert await _loop_turns_in_flight(eng) > 0
        eng.use_vcpu_thread(False)
        assert not eng.threaded
        assert await _loop_turns_in_flight(eng, 50) == 0
        eng.use_vcpu_thread(True)
        assert await _loop_turns_in_flight(eng) > 0
        dom.shutdown()


async def test_pause_returns_with_the_guest_out(vthread):
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
        dom = await _hog(hv)
        eng = dom.vcpus[0].engine
        lib, t = eng._lib, eng._thread
        paused_in_flight = 0
        for _ in range(20):
            while not eng.in_flight:
                await asyncio.sleep(0.001)
            dom.pause()
            # quiesce() answers 1 if a run was still going on (it kicks it and waits).
            paused_in_flight += lib.aiovmm_kvm_thread_quiesce(t.ptr)
            await asyncio.sleep(0.005)
            rip = eng.get("rip")
            await asyncio.sleep(0.02)
            assert eng.get("rip") == rip and not eng.in_flight
            dom.unpause()
        assert paused_in_flight == 0
        dom.shutdown()


async def test_destroy_while_the_guest_runs_stops_its_thread(vthread):
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
        dom = await _hog(hv)
        eng = dom.vcpus[0].engine
        while not eng.in_flight:
            await asyncio.sleep(0.001)
        dom.shutdown()
        dom.destroy()
        assert eng._thread is None and eng.vcpu_fd < 0
        other = await _hog(hv, "hog-2")         # the host goes on
        assert await _loop_turns_in_flight(other.vcpus[0].engine) > 0
        other.shutdown()


async def test_mode_switches_inside_slices_lose_nothing(vthread):
    """Switch modes every few ms while the hog computes and its 10 ms periodic timer
    keeps raising events: each switch inside a slice hands the run in flight over (its
    deadline armed on the new mode's timer, its exit handled); the guest keeps running
    and the loop with it. (Fails if a switch raises, hangs the loop or stops the guest;
    the hog makes too few exits that need Python for a dropped one to show here.)"""
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
        dom = await _hog(hv)
        v = dom.vcpus[0]
        eng = v.engine
        ev0 = v.domain.hypervisor.scheduler.state(v).slices
        for i in range(60):
            await asyncio.sleep(0.003)
            eng.use_vcpu_thread(i % 2 == 0)
        eng.use_vcpu_thread(True)
        assert await _loop_turns_in_flight(eng) > 0
        assert hv.scheduler.state(v).slices > ev0
        assert not dom.dying, dom.describe_end()
        dom.shutdown()


async def test_host_event_bits_never_undo_the_guests_locked_updates(vthread):
    """Event-channel pending bits are set by the loop with a locked `or` (Xen's
    guest_test_and_set_bit): with the guest on another core toggling its own bit of the
    same byte with locked instructions (guests/tests/bithammer.c), no set or clear of the
    guest's is ever undone. A plain byte read-modify-write loses them by the thousand."""
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
        dom = await hv.create(guest("bithammer"), memory_mib=4, name="bithammer", engine="kvm",
                              cmdline="secs=3")
        await dom.wait_for_line(r"^bithammer: ready$", timeout=60)
        assert dom.vcpus[0].engine.threaded
        ch = dom.evtchn
        done = dom.wait_for_line(r"^bithammer: done .*", timeout=60)
        task = asyncio.ensure_future(done)
        sets = 0
        try:
            while not task.done():
                for _ in range(200):
                    for port in range(81, 88):        # masked by the guest: pending bits only
                        ch.set_pending(port)
                sets += 1400
                await asyncio.sleep(0)
            line = task.result()
        finally:
            task.cancel()
        counts = dict(kv.split("=") for kv in str(line).split()[2:])
        # The race ran: the guest saw the host's bits, both sides were busy together.
        assert int(counts["host_bits"]) > 0 and sets > 10000, (counts, sets)
        assert counts["lost_clear"] == "0" and counts["lost_set"] == "0", counts
        dom.shutdown()


async def test_a_revoked_grant_is_never_pinned_back(vthread):
    """A first pin sets GTF_reading by compare-exchange on the entry's flags+domid (Xen's
    _set_status_v1): with the guest on another core revoking and re-granting the entry
    (guests/tests/granthammer.c: gnttab_end_access's cmpxchg to 0), a revoke that
    succeeded is never overwritten by the host's pin. A check-then-store pin brings
    revoked entries back (17 in one 3 s run; none here)."""
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
        dom = await hv.create(guest("granthammer"), memory_mib=4, name="granthammer",
                              engine="kvm", cmdline="secs=3")
        line = await dom.wait_for_line(r"^granthammer: ready ref=\d+$", timeout=60)
        ref = int(line.rsplit("=", 1)[1])
        assert dom.vcpus[0].engine.threaded
        gt = dom.grants
        task = asyncio.ensure_future(dom.wait_for_line(r"^granthammer: done .*", timeout=60))
        pins = 0
        try:
            while not task.done():
                for _ in range(20):                   # short turns: the loop stays responsive
                    try:
                        act = gt.acquire(ref, 0, False)
                    except grants.GrantError:
                        continue
                    pins += 1
                    gt.release(act, False)
                await asyncio.sleep(0)
            line = task.result()
        finally:
            task.cancel()
        counts = dict(kv.split("=") for kv in str(line).split()[2:])
        # The race ran: the host pinned it and the guest found it pinned, and revoked it.
        assert pins > 1000 and int(counts["busy"]) > 0 and int(counts["revoked"]) > 1000, (counts, pins)
        assert counts["resurrected"] == "0", counts
        dom.shutdown()
