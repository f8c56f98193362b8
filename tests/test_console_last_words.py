"""Nothing a guest wrote to its console before it stopped is lost: by the time Domain.wait()
returns, every line is in console_lines and every byte in the domain's log file.

`last_words` (guests/tests/last_words.c) writes up to 100 short lines and maybe an unfinished
one with nothing in between, then shuts down (poweroff or crash) or faults (the hypervisor
crashes it) in the same slice: all of it
is still in the xencons ring when the guest stops. Before the fix the ring was read only once
the vCPUs had stopped, after `done` was resolved: a waiter running in the loop iteration
after the guest's last slice (a test polling dom.done, as tests/test_redteam_spin2.py does)
found the last lines missing (CI: `KeyError: 'ap_rounds_moved'`), the unfinished line never
became a line, and the log file lagged behind.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aiovmm import Hypervisor, ShutdownReason
from conftest import HV_MEMORY_MIB, guest

ALL_ENGINES = True
LAST_WORDS = guest("last_words")
TAIL = "tail-without-newline"


def _read(path: Path) -> bytes:
    """The log file (none if the guest wrote only through console_io)."""
    return path.read_bytes() if path.exists() else b""


async def _last_words(engine: str, log_dir: Path, cmdline: str) -> dict:
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine, log_dir=str(log_dir)) as hv:
        dom = await hv.create(LAST_WORDS, memory_mib=8, cmdline=cmdline)
        await dom.wait_for_line(r"^last_words: start$", timeout=30)
        # Poll as a test does: this task runs in the loop iteration right after the guest's
        # last slice, before the console backend's next turn.
        while not dom.done.done():
            await asyncio.sleep(0)
        reason = await dom.wait()
        out = {"reason": reason, "lines": list(dom.console_lines), "console": bytes(dom.console),
               "log": _read(Path(dom.log_path)),
               "crash_reason": dom.crash_reason}
        while dom.domid in hv.domains:           # the vCPUs stop, the backends go
            await asyncio.sleep(0.01)
        out["lines_after"] = list(dom.console_lines)
    return out


@pytest.mark.parametrize("path", ["ring", "hypercall"])
@pytest.mark.parametrize("end,tail", [("poweroff", 0), ("poweroff", 1), ("crash", 1), ("fault", 1)])
async def test_last_lines_before_the_end_are_there_when_wait_returns(engine, tmp_path, path, end, tail):
    n = 100
    out = await _last_words(engine, tmp_path, f"console={path} lines={n} tail={tail} end={end}")
    assert out["reason"] == (ShutdownReason.poweroff if end == "poweroff" else ShutdownReason.crash)
    assert bool(out["crash_reason"]) == (end == "fault"), out["crash_reason"]   # the hypervisor's
    want = [f"last_words {i}" for i in range(n)] + [TAIL] * tail
    lines = out["lines"]
    start = lines.index("last_words: start")
    assert lines[start + 1:] == want, lines[-3:]
    # Nothing of it came later (the vCPUs' stop and the backend's last read add nothing).
    assert out["lines_after"] == lines
    text = "".join(f"{l}\n" for l in want).encode()[:-1 if tail else None]
    assert out["console"].endswith(text)
    if path == "ring":                 # console_io output goes to the hypervisor's log instead
        assert out["log"].endswith(text), out["log"][-60:]
