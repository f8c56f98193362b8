"""Host input to the guest console, end to end: kernel.elf with `echo=1` reads lines from the
xencons ring's in[] (console_read) and prints `echo: <line>` for each, until a line `quit`
or `echo_timeout` seconds without input.

Input reaches the ring through the domain's input queue: written before the console backend
has connected, or more than the 1 KiB ring holds, it is delivered as space frees
(test_cli_input_before_boot, test_cli_input_larger_than_the_ring).
"""
from __future__ import annotations

import asyncio
import os
import selectors
import subprocess
import time

import pytest

from aiovmm import Hypervisor
from aiovmm.backends.console import IN_CONS, IN_PROD
from conftest import HV_MEMORY_MIB, ROOT, _cli_command, kernel

INPUT = b"hello guest\nsecond line\nquit\n"


def _popen(cmdline: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    return subprocess.Popen(_cli_command() + ["run", kernel(), "--memory", "8", "--cmdline", cmdline],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT, env=env)


def _read_until(proc: subprocess.Popen, marker: bytes, timeout: float) -> bytes:
    """Read proc.stdout (unbuffered, non-blocking) until `marker` is seen, EOF or timeout."""
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    out = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while marker not in out:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out += chunk
    os.set_blocking(fd, True)
    return out


def _finish(proc: subprocess.Popen, head: bytes, timeout: float = 60.0) -> tuple[list[str], str, int]:
    try:
        rest, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, err = proc.communicate()
        pytest.fail(f"aiovmm run did not finish: stdout {head + rest!r} stderr {err!r}")
    return (head + rest).decode().splitlines(), err.decode(), proc.returncode


def test_cli_stdin_echo():
    proc = _popen("ticks=1 echo=1")
    head = _read_until(proc, b"echo: ready\n", 60)
    assert b"echo: ready\n" in head, head
    proc.stdin.write(INPUT)
    proc.stdin.flush()          # communicate() closes stdin (EOF)
    lines, err, rc = _finish(proc, head)
    assert rc == 0, err
    assert "Traceback" not in err
    assert lines[0] == "aiovmm guest kernel 0.1 booting"
    assert "echo: hello guest" in lines and "echo: second line" in lines
    i = lines.index("echo: ready")
    assert lines[i:] == ["echo: ready", "echo: hello guest", "echo: second line",
                         "echo: done lines=2 reason=quit", "poweroff"]


def test_cli_input_before_boot():
    """Input already in the pipe when aiovmm starts reaches the guest (queued until the
    console backend connects)."""
    proc = _popen("ticks=1 echo=1 echo_timeout=3")
    proc.stdin.write(INPUT)
    proc.stdin.flush()          # communicate() closes stdin (EOF)
    lines, err, rc = _finish(proc, b"")
    assert rc == 0, err
    assert lines[-4:] == ["echo: hello guest", "echo: second line",
                          "echo: done lines=2 reason=quit", "poweroff"]


async def _echo_domain(h: Hypervisor, cmdline: str):
    dom = await h.create(kernel(), memory_mib=8, cmdline=cmdline)
    await dom.wait_for_line(r"^echo: ready$", timeout=60)
    return dom


def _tail(dom) -> list[str]:
    lines = dom.console_lines
    return lines[lines.index("echo: ready"):]


@pytest.mark.parametrize("console", ["ring", "hypercall"])
async def test_write_input_echo(console):
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as h:
        dom = await _echo_domain(h, f"ticks=1 echo=1 console={console}")
        be = dom.console_backend
        assert be.write_input(b"abc\n") == 4
        await dom.wait_for_line(r"^echo: abc$", timeout=30)
        # The guest consumed what it echoed: in_cons caught up with in_prod.
        assert be._u32(IN_CONS) == be._u32(IN_PROD) == 4
        assert be.write_input(b"abc\nquit\n") == 9
        async with asyncio.timeout(30):
            reason = await dom.wait()
        assert reason.name == "poweroff"
        assert _tail(dom) == ["echo: ready", "echo: abc", "echo: abc",
                              "echo: done lines=2 reason=quit", "poweroff"]


async def test_write_input_library_one_shot():
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as h:
        dom = await _echo_domain(h, "ticks=1 echo=1")
        assert dom.console_backend.write_input(b"abc\nquit\n") == 9
        async with asyncio.timeout(30):
            await dom.wait()
        assert _tail(dom) == ["echo: ready", "echo: abc", "echo: done lines=1 reason=quit", "poweroff"]


async def test_crlf_and_text_after_quit():
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as h:
        dom = await _echo_domain(h, "ticks=1 echo=1")
        assert dom.console_backend.write_input(b"one\r\ntwo\r\n\nthree\rquit\r\nnever\n") == 29
        async with asyncio.timeout(30):
            await dom.wait()
        assert _tail(dom) == ["echo: ready", "echo: one", "echo: two", "echo: ", "echo: three",
                              "echo: done lines=4 reason=quit", "poweroff"]


async def test_more_than_the_ring_holds():
    """Input larger than in[] (1024 bytes): the free-running indices wrap the ring several
    times and the guest frees space as it consumes."""
    lines = [f"line {i:03d} " + "x" * 40 for i in range(100)]       # 4900 bytes
    data = ("\n".join(lines) + "\nquit\n").encode()
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as h:
        dom = await _echo_domain(h, "ticks=1 echo=1")
        be = dom.console_backend
        sent = 0
        async with asyncio.timeout(60):
            while sent < len(data):
                n = be.write_input(data[sent:])
                sent += n
                if not n:
                    await asyncio.sleep(0.005)
            await dom.wait()
        assert be.bytes_in == len(data)
        assert _tail(dom) == (["echo: ready"] + [f"echo: {l}" for l in lines]
                              + ["echo: done lines=100 reason=quit", "poweroff"])


async def test_echo_timeout():
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as h:
        dom = await _echo_domain(h, "ticks=1 echo=1 echo_timeout=1")
        t0 = time.monotonic()
        async with asyncio.timeout(30):
            reason = await dom.wait()
        assert reason.name == "poweroff"
        assert time.monotonic() - t0 >= 0.5
        assert _tail(dom) == ["echo: ready", "echo: done lines=0 reason=timeout", "poweroff"]


async def test_timeout_restarts_on_input_and_partial_line_echoed():
    """echo_timeout counts from the last input; an unterminated last line is echoed."""
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as h:
        dom = await _echo_domain(h, "ticks=1 echo=1 echo_timeout=1")
        be = dom.console_backend
        for word in (b"a\n", b"b\n", b"c\n"):
            await asyncio.sleep(0.6)                      # < 1 s each, > 1 s in total
            assert be.write_input(word) == 2
        assert be.write_input(b"tail") == 4
        async with asyncio.timeout(30):
            await dom.wait()
        assert _tail(dom) == ["echo: ready", "echo: a", "echo: b", "echo: c", "echo: tail",
                              "echo: done lines=4 reason=timeout", "poweroff"]


def test_no_echo_without_cmdline():
    """Without echo=1 the kernel does not wait for input: the contract is unchanged."""
    from conftest import boot
    b = boot(kernel(), cmdline="ticks=1")
    assert b.lines[-2:] == ["gp: handled", "poweroff"]
    assert not any(l.startswith("echo:") for l in b.lines)


def test_cli_input_larger_than_the_ring():
    """More input than the 1 KiB ring holds, written at once before boot: every line
    arrives (moved into the ring as the guest frees space)."""
    body = b"".join(b"line %03d %s\n" % (i, b"x" * 40) for i in range(100)) + b"quit\n"
    proc = _popen("ticks=1 echo=1 echo_timeout=5")
    proc.stdin.write(body)
    proc.stdin.flush()
    lines, err, rc = _finish(proc, b"")
    assert rc == 0, err
    echoed = [l for l in lines if l.startswith("echo: line ")]
    assert len(echoed) == 100, (len(echoed), lines[-5:])
    assert echoed[0].startswith("echo: line 000") and echoed[-1].startswith("echo: line 099")
