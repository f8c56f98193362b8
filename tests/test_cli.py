"""The `aiovmm run` command line: console on stdout, exit status from the shutdown reason,
one-line errors on stderr (never a traceback)."""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path

import pytest

from aiovmm.testing import VirtualLan, unique_prefix

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


# ---- bad input: exit 64, one stderr line naming the problem, nothing left (issue 9 #10) ----------

def one_error_line(r: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 64, nothing on stdout, exactly one `aiovmm: ...` line on stderr naming `names`."""
    assert r.returncode == 64, (r.returncode, r.stderr)
    assert r.stdout == "", r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("aiovmm: "), r.stderr
    for n in names:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def link_names(ns: str) -> set[str]:
    out = subprocess.run(["ip", "-n", ns, "-o", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_config_with_non_utf8_bytes(tmp_path: Path):
    cfg = tmp_path / "bad.cfg"
    cfg.write_bytes(b'kernel = "%s"\nname = "caf\xe9"\n' % guest("hello").encode())
    line = one_error_line(run_cli("run", "-c", cfg), str(cfg))
    assert line == f"aiovmm: {cfg}:2: not UTF-8 text (byte 0xe9)", line
    assert sorted(os.listdir(tmp_path)) == ["bad.cfg"]


@pytest.mark.parametrize("how", ["kernel", "config"])
def test_dev_zero_is_refused_without_reading_it(how: str):
    args = ("run", "/dev/zero") if how == "kernel" else ("run", "-c", "/dev/zero")
    line = one_error_line(run_cli(*args, timeout=20), "/dev/zero", "not a regular file")
    assert "Traceback" not in line


def test_fifo_config_is_refused_without_waiting_for_a_writer(tmp_path: Path):
    fifo = tmp_path / "cfg.fifo"
    os.mkfifo(fifo)
    one_error_line(run_cli("run", "-c", fifo, timeout=20), str(fifo), "not a regular file")


def test_vif_in_a_missing_netns_is_refused_and_not_created():
    ns = unique_prefix("avnone")
    assert ns not in netns_names()
    r = run_cli("run", guest("net"), "--memory", "16", "--cmdline", "ip=198.18.0.2/24",
                "--vif", f"bridge=br0,netns={ns}")
    one_error_line(r, f"network namespace '{ns}' does not exist")
    assert ns not in netns_names()
    assert not os.path.exists(f"/run/netns/{ns}")


async def test_missing_bridge_is_refused_and_leaves_no_tap():
    async with VirtualLan("198.18.0.1/24") as lan:
        before = link_names(lan.lan_ns)
        r = await asyncio.to_thread(run_cli, "run", guest("net"), "--memory", "16",
                                    "--cmdline", "ip=198.18.0.2/24",
                                    "--vif", f"bridge=nobr0,netns={lan.lan_ns}")
        one_error_line(r, "bridge 'nobr0' does not exist", lan.lan_ns)
        # Not a bridge at all: the host side of the uplink is a veth.
        r = await asyncio.to_thread(run_cli, "run", guest("net"), "--memory", "16",
                                    "--cmdline", "ip=198.18.0.2/24",
                                    "--vif", f"bridge=uplink,netns={lan.lan_ns}")
        one_error_line(r, "'uplink'", "is not a bridge")
        assert link_names(lan.lan_ns) == before


@pytest.mark.parametrize("where", ["missing_dir", "is_a_directory"])
def test_unusable_xenstore_socket(tmp_path: Path, where: str):
    path = tmp_path / "nodir" / "xs" if where == "missing_dir" else tmp_path
    one_error_line(run_cli("run", guest("hello"), "--xenstore-socket", path), f"xenstore socket {path}")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["missing", "a_file"])
def test_unusable_log_dir(tmp_path: Path, where: str):
    path = tmp_path / "logs"
    if where == "a_file":
        path.write_text("")
    one_error_line(run_cli("run", guest("hello"), "--log-dir", path), f"log directory {path}")
    assert os.listdir(tmp_path) == ([] if where == "missing" else ["logs"])
    assert where == "missing" or path.read_text() == ""


def test_machine_memory_the_host_cannot_give():
    one_error_line(run_cli("run", guest("hello"), "--memory", "8", "--machine-memory", "100000000"),
                   "100000000 MiB of machine memory")


# ---- a vif in a network namespace, 50 runs in a row (issue 9 #9) -------------------------------------

async def test_fifty_runs_with_a_netns_vif_all_exit_with_the_guests_code():
    """pyroute2's namespace helper children, stopped with SIGTERM, used to write that signal
    into the CLI's event-loop wake-up fd: 1 run in 4 ended "destroyed on SIGTERM" (130)."""
    async with VirtualLan("198.18.0.1/24") as lan:
        before = link_names(lan.lan_ns)
        for i in range(50):
            r = await asyncio.to_thread(
                run_cli, "run", guest("net"), "--memory", "16",
                "--cmdline", "ip=198.18.0.2/24 blast=198.18.0.1:9 bytes=8 size=8",
                "--vif", f"mac=00:16:3e:00:00:02,bridge={lan.bridge},netns={lan.lan_ns}")
            assert (r.returncode, r.stderr) == (0, ""), (i, r.returncode, r.stderr)
            assert r.stdout.splitlines()[-1] == "poweroff", (i, r.stdout)
        assert link_names(lan.lan_ns) == before           # every tap went with its run


@pytest.mark.parametrize("dest", ["nohost", "host:", ":8002", "host:0", "host:65536", "host:８０"])
def test_migrate_bad_destination_exit_64(dest):
    """A destination that is not HOST:PORT is a usage error (64, one line), as the daemon's
    own check (client.split_host_port) would refuse it; no daemon is asked."""
    r = run_cli("migrate", "--socket", "/nonexistent/aiovmm.sock", "d1", dest)
    one_error_line(r, "HOST:PORT")
