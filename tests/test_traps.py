"""tests/traps.elf and tests/trap_after_event.elf: each exception is bounced to the guest's
handler as itself, with the right RIP, error code and CR2 (guests/README.md)."""
from __future__ import annotations

import re

import pytest

from aiovmm import ShutdownReason
from conftest import ENGINES, boot, guest, probe_sites, results

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
