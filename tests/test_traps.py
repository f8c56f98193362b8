"""tests/traps.elf, tests/trap_after_event.elf and tests/fault_storm.elf: each exception is
bounced to the guest's handler as itself, with the right RIP, error code and CR2, also when
slices end and events arrive around it (guests/README.md)."""
from __future__ import annotations

import asyncio
import fcntl
import re

import pytest

from aiovmm import Hypervisor, ShutdownReason
from conftest import ENGINES, HV_MEMORY_MIB, boot, guest, probe_sites, results, uncontended_time, within

pytestmark = ENGINES

TRAP_RE = re.compile(r"rip=0x([0-9a-f]+)(?: err=0x([0-9a-f]+))?(?: cr2=0x([0-9a-f]+))?")

# vector -> (probe routine, whether the reported RIP is the instruction after it)
TRAPS_ELF = {0: ("div0", False), 3: ("int3", True), 6: ("ud2", False), 13: ("hlt", False),
             14: ("read", False)}
AFTER_EVENT = {6: ("ud2", False), 13: ("cli", False), 14: ("read", False), 3: ("int3", True)}


def _parse(rest: str):
    m = TRAP_RE.fullmatch(rest)
    assert m, rest
    return (int(m[1], 16), None if m[2] is None else int(m[2], 16),
            None if m[3] is None else int(m[3], 16))


@pytest.fixture(scope="module")
def traps_run(engine):
    return boot(guest("traps"), memory_mib=8, engine=engine)


@pytest.fixture(scope="module")
def after_event_run(engine):
    return boot(guest("trap_after_event"), memory_mib=8, engine=engine)


def test_traps_powers_off(traps_run):
    assert traps_run.reason == ShutdownReason.poweroff, traps_run.end
    assert traps_run.lines[-2:] == ["result traps_handled 5", "poweroff"]


def test_traps_order(traps_run):
    keys = [l.split()[1] for l in traps_run.lines if l.startswith("result trap_")]
    assert keys == ["trap_0", "trap_3", "trap_6", "trap_13", "trap_14"]


@pytest.mark.parametrize("vector", list(TRAPS_ELF))
def test_trap_reported(traps_run, vector):
    res = results(traps_run.lines)
    assert f"trap_{vector}" in res, traps_run.lines
    rip, err, cr2 = _parse(res[f"trap_{vector}"])
    probe, after = TRAPS_ELF[vector]
    insn, nxt = probe_sites(guest("traps"))[probe]
    assert rip == (nxt if after else insn), f"trap {vector}: rip {rip:#x}, probe {insn:#x}/{nxt:#x}"
    assert err == 0
    if vector == 14:
        # A not-present kernel-mode read: error code 0 (no P, no W, no U), CR2 the address.
        assert cr2 == 0x1000
    else:
        assert cr2 is None


def test_after_event_powers_off(after_event_run):
    r = after_event_run
    assert r.reason == ShutdownReason.poweroff, r.end
    assert r.lines[0] == "result upcalls_ok 1"
    assert r.lines[-2:] == ["result traps_after_events 4", "poweroff"]
    keys = [l.split()[1] for l in r.lines if l.startswith("result trap_")]
    assert keys == ["trap_6", "trap_13", "trap_14", "trap_3"]


@pytest.mark.parametrize("vector", list(AFTER_EVENT))
def test_trap_after_event(after_event_run, vector):
    res = results(after_event_run.lines)
    assert f"trap_{vector}" in res, after_event_run.lines
    rip, _, _ = _parse(res[f"trap_{vector}"])
    probe, after = AFTER_EVENT[vector]
    insn, nxt = probe_sites(guest("trap_after_event"))[probe]
    assert rip == (nxt if after else insn), f"trap {vector}: rip {rip:#x}, probe {insn:#x}/{nxt:#x}"


# fault_storm: short slices, so that many end while the guest is raising an exception.
STORM_SLICE_NS = 200_000
STORM_MS = 1000
KVM_GET_VCPU_EVENTS = 0x8040AE9F        # struct kvm_vcpu_events (64 bytes)


def _kvm_mid_delivery(eng) -> bool:
    """Asked of KVM itself after a slice: does it still hold an exception for the next entry
    (exception.injected or .pending), or is the vCPU in the engine's ring-0 stub?"""
    ev = bytearray(64)
    fcntl.ioctl(eng.vcpu_fd, KVM_GET_VCPU_EVENTS, ev)
    return bool(ev[0] or ev[3]) or eng.get("cs") & 3 == 0


async def _fault_storm(engine: str):
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        hv.scheduler.slice_ns = STORM_SLICE_NS
        dom = await hv.create(guest("fault_storm"), memory_mib=8, cmdline=f"ms={STORM_MS}")
        eng = dom.vcpus[0].engine
        slices, mid = [0], []
        if engine == "kvm":
            run = eng.run                # observed around every slice, not replaced

            def observed(budget: int, max_ns: int = 0):
                reason = run(budget, max_ns)
                slices[0] += 1
                if _kvm_mid_delivery(eng):
                    mid.append((reason, hex(eng.get("rip"))))
                return reason
            eng.run = observed
        reason = await within(dom.wait(), 60)
        return list(dom.console_lines), reason, dom.describe_end(), slices[0], mid


def test_fault_storm_frames_and_upcalls_intact(engine):
    """Issue 11 (Linux on KVM: "BUG: unable to handle page fault for address 4352c0 / Oops:
    0010", a network that stopped answering): a slice ended while KVM held an exception it
    had not delivered yet; the event upcall was bounced at the next slice start and KVM then
    delivered the held exception at the event callback, or with the old context over the
    bounce (the upcall lost, events left masked). Every fault's frame must name its probe
    instruction and carry the upcall mask the loop runs with (0); on KVM, no slice may end
    with an exception still in KVM (measured without the fix: 4-66 of ~500 slices).
    The storm lasts STORM_MS of wall time, which on a loaded host holds few slices (85 at
    load ~14, the loop thread getting ~6 % of a core): it runs again, every run checked,
    until the slice ends, faults and events it is about were seen (at most 8 runs), each run
    within 15 s of the loop thread's uncontended time."""
    t0 = uncontended_time()
    slices = faults = upcalls = runs = 0
    while runs < 8 and (slices <= 100 and engine == "kvm" or faults < 10 or upcalls < 10):
        lines, reason, end, n, mid = asyncio.run(_fault_storm(engine))
        runs += 1
        assert reason == ShutdownReason.poweroff, end
        if engine == "kvm":
            assert mid == [], f"{len(mid)} of {n} slices ended mid-delivery: {mid[:5]}"
        res = {k: int(v) for k, v in results(lines).items()}
        assert res["stale"] == 0 and res["masked"] == 0, lines
        assert res["handled"] == res["faults"], lines
        slices, faults, upcalls = slices + n, faults + res["faults"], upcalls + res["upcalls"]
    if engine == "kvm":
        assert slices > 100, (slices, runs)            # the slice ends the test is about
    # Exercised: faults, and events meanwhile.
    assert faults >= 10 and upcalls >= 10, (faults, upcalls, runs)
    assert uncontended_time() - t0 < 15 * runs
