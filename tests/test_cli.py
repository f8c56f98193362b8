"""The `aiovmm run` command line: console on stdout, exit status from the shutdown reason,
one-line errors on stderr (never a traceback)."""
from __future__ import annotations

import re

import pytest

from conftest import guest, kernel, run_cli

# Hypervisor bug: Domain.crash() logs `ERROR aiovmm.domain: d1 (dom1) crashed: ...` and the
# CLI's logging level (WARNING) lets it through, so stderr has that line AND the CLI's own
# `aiovmm: d1 (dom1) crashed: ...` line: two lines for one crash.
# Hypervisor bug: argparse rejects a non-integer --memory itself: exit 2 and a 3-line usage
# message instead of exit 64 and one `aiovmm: ...` line.


def test_hello_poweroff():
    r = run_cli("run", guest("hello"), "--memory", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["hello", "poweroff"]
    assert "Traceback" not in r.stderr


def test_kernel_cmdline_streamed():
    r = run_cli("run", kernel(), "--memory", "8", "--cmdline", "ticks=2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["aiovmm guest kernel 0.1 booting", "cmdline: ticks=2"]
    assert lines[-1] == "poweroff"


def test_unhandled_pf_exits_1():
    r = run_cli("run", guest("unhandled_pf"), "--memory", "8")
    assert r.returncode == 1
    assert r.stdout.splitlines() == ["about to fault"]
    assert "Traceback" not in r.stderr
    reason = [l for l in r.stderr.splitlines() if l.startswith("aiovmm: ")]
    assert len(reason) == 1, r.stderr
    assert re.fullmatch(r"aiovmm: d1 \(dom1\) crashed: .*#PF.*cr2 0x1000.*", reason[0]), reason


def test_unhandled_pf_exits_1_with_one_line():
    r = run_cli("run", guest("unhandled_pf"), "--memory", "8")
    assert r.returncode == 1
    assert r.stdout.splitlines() == ["about to fault"]
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got: {r.stderr!r}"
    assert re.fullmatch(r"aiovmm: d1 \(dom1\) crashed: .*#PF.*cr2 0x1000.*", lines[0]), lines[0]


def test_crash_name_in_reason():
    r = run_cli("run", guest("fault_in_handler"), "--memory", "8", "--name", "nested")
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("aiovmm: d1 (nested) crashed: "), r.stderr


@pytest.mark.parametrize("memory", ["0", "-5", "999999",
                                    "abc", "1.5"])
def test_bad_memory_exit_64(memory):
    r = run_cli("run", guest("hello"), "--memory", memory)
    assert "Traceback" not in r.stderr
    assert r.returncode == 64, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("aiovmm: "), r.stderr
    assert "memory" in lines[0]
    assert r.stdout == ""


def test_memory_too_small_for_kernel():
    r = run_cli("run", kernel(), "--memory", "1")
    assert r.returncode == 64, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("aiovmm: ") and "MiB" in lines[0], r.stderr


def test_missing_kernel():
    r = run_cli("run", "/nonexistent/kernel.elf")
    assert r.returncode == 64
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "/nonexistent/kernel.elf" in lines[0], r.stderr
