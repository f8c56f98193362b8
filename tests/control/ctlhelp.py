"""Helpers for the control-plane tests: a real `aiovmm serve` daemon process per test module, and the real CLI as a subprocess
against it (--socket). Nothing is mocked: guests boot, consoles echo, taps appear."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "guests" / "build"


def kernel() -> str:
    return str(BUILD / "kernel.elf")


def guest(name: str) -> str:
    return str(BUILD / "tests" / f"{name}.elf")


def _cli_command() -> list[str]:
    script = Path(sys.executable).parent / "aiovmm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "aiovmm.cli"]

ARTIFACTS = ROOT / "test-artifacts"


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class Daemon:
    """`aiovmm serve --socket <tmp>` as a child process."""

    def __init__(self, machine_memory: int = 256, extra: list[str] | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="avctl", dir="/tmp")
        self.socket = os.path.join(self.dir, "api.sock")
        self.xs_socket = os.path.join(self.dir, "xs.sock")
        self.log_path = os.path.join(self.dir, "serve.log")
        env = dict(os.environ)
        env.pop("AIOVMM_SOCKET", None)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            _cli_command() + ["serve", "--socket", self.socket, "--machine-memory", str(machine_memory),
                              "--xenstore-socket", self.xs_socket] + (extra or []),
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"aiovmm serve exited {self.proc.returncode}: {self.log()}")
            if os.path.exists(self.socket):
                try:
                    self.request("GET", "/api/v1/info")
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"aiovmm serve did not come up: {self.log()}")

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def request(self, method: str, path: str, body=None, timeout: float = 60) -> tuple[int, object]:
        c = UnixHTTP(self.socket, timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            c.request(method, path, body=data,
                      headers={"Content-Type": "application/json"} if data else {})
            r = c.getresponse()
            raw = r.read()
        finally:
            c.close()
        ctype = r.getheader("Content-Type", "")
        return r.status, (json.loads(raw) if "json" in ctype else raw.decode(errors="replace"))

    def api(self, method: str, path: str, body=None, ok: tuple = (200, 201)) -> object:
        status, data = self.request(method, path, body)
        assert status in ok, (method, path, status, data)
        return data

    def cli(self, *args: str, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env["AIOVMM_SOCKET"] = self.socket
        return subprocess.run(_cli_command() + [str(a) for a in args], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT, env=env, input=input)

    def ok(self, *args: str, timeout: float = 60) -> str:
        r = self.cli(*args, timeout=timeout)
        assert r.returncode == 0, (args, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        return r.stdout

    def console_text(self, dom: str) -> str:
        status, text = self.request("GET", f"/api/v1/domains/{dom}/console")
        assert status == 200, text
        return text

    def wait_console(self, dom: str, pattern: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            status, text = self.request("GET", f"/api/v1/domains/{dom}/console")
            if status == 404:           # not created yet (or gone: then the timeout tells)
                text = ""
            else:
                assert status == 200, text
            if re.search(pattern, text, re.M):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on d{dom}'s console: {text[-2000:]!r}")
            time.sleep(0.1)

    @contextlib.contextmanager
    def cli_process(self, *args: str) -> Iterator[subprocess.Popen]:
        """The real CLI against this daemon as a live process with pipes (interactive verbs:
        console, create -c); killed if still running when the block ends."""
        env = dict(os.environ, AIOVMM_SOCKET=self.socket)
        p = subprocess.Popen(_cli_command() + list(args), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        try:
            yield p
        finally:
            if p.poll() is None:
                p.kill()

    def console_session(self, dom: str, line: bytes, echoed: str, timeout: float = 30) -> str:
        """`aiovmm console DOM` as a user runs it: type `line`, wait until the console shows
        `echoed` (a regex), leave with Ctrl-]; returns what the verb printed (it exits 0)."""
        with self.cli_process("console", dom) as p:
            p.stdin.write(line)
            p.stdin.flush()
            self.wait_console(dom, echoed, timeout=timeout)
            time.sleep(0.3)
            p.stdin.write(b"\x1d")                 # Ctrl-] leaves
            p.stdin.flush()
            out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        return out.decode(errors="replace")

    def write_cfg(self, name: str, **kv) -> str:
        path = os.path.join(self.dir, f"{name}.cfg")
        lines = [f"name = {name!r}"] + [f"{k} = {v!r}" for k, v in kv.items()]
        Path(path).write_text("\n".join(lines) + "\n")
        return path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)


TICK_RE = re.compile(r"^timer: tick (\d+) at \d+$", re.M)


def ticks(text: str) -> int:
    found = TICK_RE.findall(text)
    return int(found[-1]) if found else 0


UPTIME_RE = re.compile(r"^uptime: ticks=(\d+) sum=(0x[0-9a-f]+)$", re.M)


def uptime(text: str) -> tuple[int, str]:
    """The last `uptime:` milestone of guests/tests/suspend.c in `text`: (ticks, checksum)."""
    found = UPTIME_RE.findall(text)
    assert found, text[-500:]
    return int(found[-1][0]), found[-1][1]


def wait_resumed(d: Daemon, dom: str, timeout: float = 20) -> tuple[int, str]:
    """Wait until a restored suspend.c guest has printed `suspend: resumed rc=0` and then an
    uptime milestone; return that milestone. A restored domain's console starts empty and
    the next milestone comes up to `every` ticks (100 ms) after the resume line: the console
    must not be read for a milestone as soon as the resume line is there."""
    text = d.wait_console(dom, r"^suspend: resumed rc=0$(?:\n.*)*?\n^uptime: ticks=\d+ ", timeout)
    return uptime(text[text.index("suspend: resumed rc=0"):])


__all__ = ["Daemon", "ARTIFACTS", "BUILD", "guest", "kernel", "ticks", "uptime", "wait_resumed"]
