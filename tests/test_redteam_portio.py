"""Red-team: string port I/O (INS/OUTS, with and without REP) on the ports the KVM engine
opens in its hardware I/O bitmap (PIT 0x40-0x43 and 0x61 for Linux's polling, the engine's
own hypercall and SYSCALL ports 0x5a/0x5b) and on a closed one (0x80), without I/O privilege,
then with IOPL 3 (guests/hostile/port_strio.c).

Xen (x86/pv/emul-priv-op.c): without I/O privilege guest_io_okay() fails before any access,
so the guest gets #GP(0) at the instruction with its registers and memory as they were; with
IOPL 3 `rep insb` reads all ones into the destination (guest_io_read of a port the domain
has not been given) and completes. Per probe the guest prints the vector, where the fault
was reported relative to the instruction (`_at 0`), whether RCX/RSI/RDI are unchanged and
whether the destination still holds its pattern. A bystander guest's frames are hashed before
and after, and the host boots another guest afterwards.
"""
from __future__ import annotations

import asyncio

import pytest

from aiovmm import Hypervisor
from conftest import HV_MEMORY_MIB, results
from test_hostile import bystander_after, start_bystander

ALL_ENGINES = True
HOSTILE = "guests/build/hostile/{}.elf"
OPEN_PORTS = ("pit", "p61", "hcall", "syscall")        # no I/O privilege: each refused with #GP
CLOSED_PORTS = ("p80",)
KINDS = ("rep_outsb", "outsb", "rep_insb", "insb", "rep_insb1", "rep_outsw", "std_rep_insb",
         "std_rep_outsb")



async def attack_next_to_bystander(engine: str, name: str, cmdline: str = "") -> dict:
    """Runs hostile guest `name` to its end next to a bystander: its console, how it ended,
    whether the bystander's frames hash the same and it still runs, and a later guest's
    console (the host keeps working)."""
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        by, before = await start_bystander(hv)
        dom = await hv.create(HOSTILE.format(name), memory_mib=8, cmdline=cmdline)
        async with asyncio.timeout(120):
            await dom.wait()
        same, alive, hello = await bystander_after(hv, by, before)
        return {"lines": list(dom.console_lines), "crash": dom.crash_reason,
                "bystander_same": same, "bystander_alive": alive, "hello": hello}


def attack_fixture(name: str, cmdline: str = ""):
    """A module's `attack` fixture: hostile guest `name` run once per engine next to a
    bystander (attack_next_to_bystander). Modules that import it with `res` and
    test_host_and_bystander_unaffected get the shared checks too."""
    @pytest.fixture(scope="module")
    def attack(engine):
        return asyncio.run(attack_next_to_bystander(engine, name, cmdline))
    return attack


attack = attack_fixture("port_strio")


@pytest.fixture(scope="module")
def res(attack):
    return results(attack["lines"])


def test_host_and_bystander_unaffected(attack, res):
    assert attack["bystander_same"] and attack["bystander_alive"]
    assert any("Hello" in l or "hello" in l for l in attack["hello"]), attack["hello"]
    assert not attack["crash"], attack["lines"][-5:]
    assert res.get("alive") == "1", attack["lines"][-5:]


KVM_HCALL_OUTS = ("kvm: an OUTS of one byte to the engine's hypercall port in kernel mode is "
                  "taken for a hypercall by aiovmm_kvm_run_ex (it looks at port, size and count "
                  "only); the kernel may make hypercalls anyway, so nothing is gained, but Xen "
                  "gives #GP")
UNICORN_INS = ("unicorn: TCG's INS stores a dummy 0 at ES:RDI (to stay restartable) before the "
               "IN hook refuses the port (into a read-only page: #PF instead of #GP)")


def _xfail_if(request, cond: bool, reason: str) -> None:
    if cond:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


@pytest.mark.parametrize("port", OPEN_PORTS + CLOSED_PORTS)
@pytest.mark.parametrize("kind", KINDS)
def test_string_io_without_privilege_is_gp_at_the_instruction(request, attack, engine, kind, port):
    _xfail_if(request, engine == "kvm" and port == "hcall" and kind.endswith("outsb"), KVM_HCALL_OUTS)
    res = results(attack["lines"])
    key = f"{port}_{kind}"
    got = (res.get(key), res.get(key + "_at"), res.get(key + "_regs"))
    assert got == ("13", "0", "1"), attack["lines"]


@pytest.mark.parametrize("port", OPEN_PORTS + CLOSED_PORTS)
@pytest.mark.parametrize("kind", [k for k in KINDS if "ins" in k])
def test_refused_ins_leaves_the_destination_alone(request, attack, engine, kind, port):
    _xfail_if(request, engine == "unicorn", UNICORN_INS)
    res = results(attack["lines"])
    assert res.get(f"{port}_{kind}_intact") == "1", attack["lines"]


def test_rep_insb_with_iopl_reads_all_ones(attack):
    res = results(attack["lines"])
    got = (res.get("iopl_rep_insb"), res.get("iopl_rep_insb_ff"), res.get("iopl_rep_insb_kept"),
           res.get("iopl_rep_insb_rcx"))
    assert got == ("none", "64", "192", "0"), attack["lines"]


def test_rep_outsb_with_iopl_completes(attack):
    res = results(attack["lines"])
    assert (res.get("iopl_rep_outsb"), res.get("iopl_rep_outsb_done")) == ("none", "1"), attack["lines"]


def test_rep_insb_with_iopl_into_a_read_only_page_is_pf(attack):
    res = results(attack["lines"])
    got = tuple(res.get("iopl_rep_insb_ro" + k) for k in ("", "_at", "_cr2", "_intact"))
    assert got == ("14", "0", "1", "1"), attack["lines"]


def test_refused_rep_insb_into_a_read_only_page_is_gp(request, attack, engine):
    _xfail_if(request, engine == "unicorn", UNICORN_INS)
    res = results(attack["lines"])
    got = tuple(res.get("noiopl_rep_insb_ro" + k) for k in ("", "_at", "_intact"))
    assert got == ("13", "0", "1"), attack["lines"]
