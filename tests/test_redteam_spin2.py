"""Red-team: two vCPUs that never leave guest code (guests/hostile/spin2.c): a counting loop,
or `rep movsq` of 1 MiB again and again, on both vCPUs for 3 s, on both engines.

Xen's credit scheduler preempts a vCPU that never yields at the end of its slice; a
neighbour blocked on its timer is woken and runs when its tick is due. Here: both vCPUs
make progress (slices end them), the host loop's 20 ms heartbeat is never held long, a
neighbour guest's periodic ticks keep arriving (no gap of 0.5 s), the bystander's frames
hash the same."""
from __future__ import annotations

import asyncio
import re

import pytest

from aiovmm import Hypervisor
from conftest import HV_MEMORY_MIB, kernel, results
from test_hostile import _p2m_hash, start_bystander

ALL_ENGINES = True
HOSTILE = "guests/build/hostile/{}.elf"
SECS = 3



async def _spin(engine: str, mode: int) -> dict:
    out: dict = {"gaps": []}
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        by, before = await start_bystander(hv)
        dom = await hv.create(HOSTILE.format("spin2"), memory_mib=8, vcpus=2,
                              cmdline=f"secs={SECS} mode={mode}")
        await dom.wait_for_line(r"^spin2: spinning$", timeout=30)
        nb = await hv.create(kernel(), memory_mib=8, name="ticker", cmdline="ticks=200")
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not dom.done.done():
            await asyncio.sleep(0.02)
            if any(l.startswith("result rounds") for l in dom.console_lines):
                break
            now = loop.time()
            out["gaps"].append(now - last)
            last = now
        await dom.wait()
        ticks_during = [int(m.group(1)) for l in nb.console_lines
                        if (m := re.match(r"timer: tick \d+ at (\d+)$", l))]
        out["ticks"] = ticks_during
        out["lines"], out["crash"] = list(dom.console_lines), dom.crash_reason
        out["bystander_same"] = _p2m_hash(hv, by) == before
        out["bystander_alive"] = not by.dying and by.domid in hv.domains
    return out


@pytest.fixture(scope="module", params=[0, 1], ids=["loop", "rep_movsq"])
def spin(request, engine):
    return asyncio.run(_spin(engine, request.param))


def test_both_vcpus_run_and_the_guest_ends(spin):
    res = results(spin["lines"])
    assert not spin["crash"], spin["lines"][-5:]
    assert (res["up"], res["ap_rounds_moved"], res["alive"]) == ("0", "1", "1"), res
    assert int(res["rounds"]) > 0


def test_loop_stays_responsive(spin):
    assert spin["gaps"] and max(spin["gaps"]) < 0.5, sorted(spin["gaps"])[-5:]


def test_neighbour_ticks_keep_arriving(spin):
    t = spin["ticks"]
    assert len(t) >= 20, len(t)
    gaps = [(b - a) / 1e9 for a, b in zip(t, t[1:])]
    assert max(gaps) < 0.5, sorted(gaps)[-5:]


def test_bystander_unaffected(spin):
    assert spin["bystander_same"] and spin["bystander_alive"]
