"""`aiovmm run` at a terminal: the guest's terminal controls reach the user's terminal (busybox's
line editing works: arrow keys, its cursor-position query), the control strings that act
beyond the screen (titles, clipboard, queries) do not; the terminal is in raw mode while
attached (Ctrl-C goes to the guest), Ctrl-] leaves, and the terminal's settings are back
afterwards on every way out. Output to a file or a pipe stays text (`--console-output`).

The terminal is a real pseudo-terminal (os.openpty) whose slave is aiovmm's controlling
terminal and stdin/stdout/stderr; the test plays the terminal on the master side.
"""
from __future__ import annotations

import os
import selectors
import signal
import subprocess
import termios
import time

import pytest

from aiovmm.console import STRING_MAX, TerminalFilter, text
from conftest import BUILD, ROOT, _cli_command, kernel

LINUX = BUILD / "linux"


# ------------------------------------------------------------------------------ the filter
def _filter(*chunks: bytes) -> bytes:
    f = TerminalFilter()
    return b"".join(f.feed(c) for c in chunks)


def test_terminal_filter_passes_screen_controls():
    data = b"\x1b[6n\x1b[1;31mred\x1b[0m\r\n\x08\x07\x1b7\x1b8\x1b[?25l" + "é—✓".encode()
    assert _filter(data) == data


@pytest.mark.parametrize("seq", [b"\x1b]0;title\x07", b"\x1b]52;c;cHduZWQ=\x1b\\",
                                 b"\x1bP$qm\x1b\\", b"\x1b_apc\x1b\\", b"\x1b^pm\x1b\\",
                                 b"\x1bXsos\x1b\\", "\u009d2;t\u009c".encode(),
                                 "\u0090$q\u009c".encode(), b"\x1b]2;a\x18"])
def test_terminal_filter_drops_control_strings(seq):
    assert _filter(b"a" + seq + b"b") == b"ab"
    # the same split at every byte: state carries across writes
    for i in range(1, len(seq)):
        assert _filter(b"a" + seq[:i], seq[i:] + b"b") == b"ab", i


def test_terminal_filter_c1_and_bound():
    assert _filter("x\u009b31my".encode()) == b"x31my"          # C1 CSI as UTF-8: removed
    assert _filter(b"\xc2", b"\xa0z") == b"\xc2\xa0z"             # U+00A0 split: kept
    # an unterminated string is dropped up to STRING_MAX bytes, then output resumes
    f = TerminalFilter()
    assert f.feed(b"\x1b]0;" + b"A" * (STRING_MAX + 10)) == b""
    assert f.feed(b"after") == b"after"
    # ESC inside a string ends it and starts a sequence of its own
    assert _filter(b"\x1b]0;t\x1b[1mX") == b"\x1b[1mX"


def _lone_c1(out: bytes) -> bytes:
    """The bytes 0x80-0x9f of `out` outside well-formed UTF-8: C1 controls to an 8-bit
    terminal (0x9b CSI, 0x9d OSC, 0x90 DCS, ...)."""
    return bytes(ord(c) - 0xDC00 for c in out.decode("utf-8", "surrogateescape")
                 if 0xDC80 <= ord(c) <= 0xDC9F)


@pytest.mark.parametrize("seq", [b"\x9b", b"\x9d", b"\x90", b"\x9f", b"\x85",
                                 b"\xe2\x9b", b"\xe2\x82", b"\xc0\x9b", b"\xc1\x9d", b"\xe0\x9b\x80",
                                 b"\xed\xa0\x9b", b"\xf4\x90\x9b\x80", b"\xf0\x9f\x98", b"\xff\x9b",
                                 b"\x9b\x9d\x90\x9c", b"\xa9\x9b"])
def test_terminal_filter_drops_lone_c1_bytes(seq):
    """A byte 0x80-0x9f that is no part of a well-formed UTF-8 sequence never reaches the
    terminal (an 8-bit one starts CSI/OSC/DCS on it), split or not; what follows it does."""
    data = b"a" + seq + b"]0;t\x07[31mb"
    assert _lone_c1(_filter(data)) == b"", _filter(data)
    assert _filter(data).endswith(b"]0;t\x07[31mb")
    for i in range(1, len(data)):
        assert _lone_c1(_filter(data[:i], data[i:])) == b"", i
    assert _lone_c1(_filter(*[data[i:i + 1] for i in range(len(data))])) == b""


def test_terminal_filter_utf8_intact_across_writes():
    """Well-formed UTF-8 whose continuation bytes are 0x80-0x9f (U+20AC, U+2713, U+1F600,
    U+00E9...) passes byte for byte, however the writes split it."""
    data = "x€✓😀日本é°\u07ff\uffff\U0010ffffy".encode()
    assert _filter(data) == data
    for i in range(1, len(data)):
        assert _filter(data[:i], data[i:]) == data, i
    assert _filter(*[data[i:i + 1] for i in range(len(data))]) == data


def test_terminal_filter_random_bytes_never_pass_a_lone_c1():
    """Random guest output, random writes: no lone C1 byte out, and text (well-formed UTF-8
    without controls) out as it went in."""
    import random
    rnd = random.Random(19)
    pieces = [b"\x9b", b"\x9d", b"\x80", b"\xe2", b"\xc2", b"\xf0\x9f", b"\x1b", b"\x1b[", b"\x07",
              "€".encode(), "😀".encode(), "é".encode(), b"ab", b"\xa0", b"\xff"]
    for _ in range(3000):
        data = b"".join(rnd.choice(pieces) for _ in range(rnd.randrange(1, 12)))
        cuts = sorted(rnd.sample(range(1, len(data)), min(len(data) - 1, rnd.randrange(0, 4)))) \
            if len(data) > 1 else []
        chunks = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        f = TerminalFilter()
        out = b"".join(f.feed(c) for c in chunks) + f.feed(b"z")
        assert _lone_c1(out) == b"", (data, chunks, out)
    text = "".join(rnd.choice("a€😀é✓日\u0100") for _ in range(2000)).encode()
    f = TerminalFilter()
    out, i = b"", 0
    while i < len(text):
        n = rnd.randrange(1, 9)
        out += f.feed(text[i:i + n])
        i += n
    assert out == text


def _terminal_sees_string(out: bytes) -> bool:
    """A terminal's view (VT500 parser, xterm, Linux's vt): C0 controls other than CAN/SUB
    are executed inside an escape sequence without ending it, DEL is ignored there; so a
    string starts where ESC and ]PX^_ meet once those are taken out."""
    seen = bytes(c for c in out if not ((c < 0x20 and c not in (0x18, 0x1a, 0x1b)) or c == 0x7f))
    return any(b"\x1b" + bytes((c,)) in seen for c in b"]PX^_")


@pytest.mark.parametrize("seq", [b"\x1b\n]52;c;cHduZWQ=\x07", b"\x1b\x00]0;t\x07",
                                 b"\x1b\x7fP$qm\x1b\\", b"\x1b\r\x08_apc\x07",
                                 "\x1b\u0085]52;c;eA==\x07".encode(),
                                 "\x1b\x1b\u0085]0;t\x07".encode(),
                                 "\x1b\u009dx\x07]0;t\x07".encode()])
def test_terminal_filter_no_string_through_esc_state(seq):
    # a control executed inside ESC, or a removed C1 control, must not join ESC to ]PX^_
    assert not _terminal_sees_string(_filter(b"a" + seq + b"b"))
    for i in range(1, len(seq)):
        assert not _terminal_sees_string(_filter(b"a" + seq[:i], seq[i:] + b"b")), i


def test_text_output():
    assert text(b"a\r\nb\x1b[6n\x07\tc\n") == b"a\nb?[6n?\tc\n"


# ------------------------------------------------------------------------------ pipes
def _run_piped(mode: str, line: bytes) -> bytes:
    """The project's kernel echoes a console line back (echo=1): `line` is what it prints."""
    cmd = _cli_command() + ["run", kernel(), "--memory", "8", "--cmdline", "ticks=1 echo=1 echo_timeout=3"]
    if mode:
        cmd += ["--console-output", mode]
    r = subprocess.run(cmd, input=line + b"\nquit\n", capture_output=True, timeout=90, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_pipe_output_modes():
    osc = b"A\x1b]0;pwned\x07B\x1b[1mC"
    assert b"echo: A?]0;pwned?B?[1mC\n" in _run_piped("", osc)             # auto: a pipe is text
    assert b"echo: AB\x1b[1mC" in _run_piped("terminal", osc)
    assert b"echo: " + osc in _run_piped("raw", osc)


# ------------------------------------------------------------------------------ a terminal
class Pty:
    """aiovmm on a pseudo-terminal of its own (controlling terminal, new session)."""

    def __init__(self, args: list[str], env_add: dict[str, str] | None = None) -> None:
        self.master, self.slave = os.openpty()
        termios.tcsetattr(self.slave, termios.TCSANOW, self._cooked())
        self.before = termios.tcgetattr(self.slave)
        env = dict(os.environ)
        env.pop("PYTHONWARNINGS", None)
        env.update(env_add or {})
        self.proc = subprocess.Popen(_cli_command() + args, stdin=self.slave, stdout=self.slave,
                                     stderr=self.slave, cwd=ROOT, env=env, start_new_session=True,
                                     preexec_fn=lambda: __import__("fcntl").ioctl(0, termios.TIOCSCTTY, 0))
        self.out = b""
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.master, selectors.EVENT_READ)

    def _cooked(self) -> list:
        a = termios.tcgetattr(self.slave)
        a[0] |= termios.ICRNL
        a[1] |= termios.OPOST | termios.ONLCR
        a[3] |= termios.ICANON | termios.ECHO | termios.ISIG
        return a

    def read_until(self, marker: bytes, timeout: float) -> bool:
        """Read what aiovmm writes, answering cursor-position queries as a terminal does."""
        deadline = time.monotonic() + timeout
        while marker not in self.out:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not self.sel.select(min(left, 0.5)):
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:                        # EIO: every slave descriptor closed
                return marker in self.out
            if self.out[-3:] + data and b"\x1b[6n" in (self.out[-3:] + data):
                os.write(self.master, b"\x1b[24;12R")
            self.out += data
        return True

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def raw_now(self) -> bool:
        lflag = termios.tcgetattr(self.slave)[3]
        return not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)

    def finish(self, timeout: float = 60) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"aiovmm did not finish; terminal shows {self.out[-2000:]!r}")
        self.read_until(b"\x00never", 0.5)
        return rc

    def restored(self) -> bool:
        return termios.tcgetattr(self.slave) == self.before

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.sel.close()
        if self.master is not None:
            os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def pty_run():
    made: list[Pty] = []

    def start(*args: str, env_add: dict[str, str] | None = None) -> Pty:
        made.append(Pty(list(args), env_add))
        return made[-1]
    yield start
    for p in made:
        p.close()


def test_terminal_raw_while_attached_and_restored(pty_run):
    """The project's kernel echoes lines: Enter (CR in raw mode) ends one; Ctrl-C is a byte
    for the guest, not a signal; at its poweroff the terminal is as it was."""
    t = pty_run("run", kernel(), "--memory", "8", "--cmdline", "ticks=1 echo=1 echo_timeout=20")
    assert t.read_until(b"echo: ready", 60), t.out
    assert t.raw_now()
    t.send(b"one\x03two\r")
    assert t.read_until(b"echo: one", 30), t.out
    t.send(b"quit\r")
    assert t.finish() == 0, t.out
    assert t.proc.returncode == 0
    assert t.restored()
    assert b"Traceback" not in t.out


@pytest.mark.parametrize("how", ["ctrl-]", "SIGTERM", "SIGHUP"])
def test_terminal_leave(pty_run, how):
    """Ctrl-] leaves (the guest is destroyed: `aiovmm run` owns it), as do SIGTERM and a
    hang-up; each path puts the terminal back and says why on one line."""
    t = pty_run("run", kernel(), "--memory", "8", "--cmdline", "ticks=1 echo=1 echo_timeout=60")
    assert t.read_until(b"echo: ready", 60), t.out
    if how == "ctrl-]":
        t.send(b"\x1d")
    else:
        t.proc.send_signal(getattr(signal, how))
    assert t.finish() == 130, t.out
    assert t.restored()
    why = "Ctrl-]" if how == "ctrl-]" else how
    assert t.out.endswith(f"aiovmm: d1 (dom1) destroyed on {why}\r\n".encode()), t.out[-200:]


@pytest.mark.skipif(not (LINUX / "vmlinuz").exists(), reason="make setup fetches Debian's kernel")
def test_busybox_line_editing(pty_run):
    """Debian's Linux with busybox's shell on hvc0: its cursor-position query reaches the
    terminal (and the answer the guest), the left arrow moves the cursor so typed text is
    inserted, Ctrl-C interrupts the guest's own line, a window-title escape the guest prints
    never reaches the terminal, and Ctrl-] leaves with the terminal restored."""
    t = pty_run("run", str(LINUX / "vmlinuz"), "--ramdisk", str(LINUX / "initramfs.cpio.gz"),
                "--memory", "128", "--cmdline", "console=hvc0 quiet")
    assert t.read_until(b"aiovmm:/# ", 180), t.out[-2000:]
    assert t.raw_now()
    assert b"\x1b[6n" in t.out and b"?[6n" not in t.out
    t.send(b"echo abcd")
    assert t.read_until(b"echo abcd", 20)
    t.send(b"\x1b[D\x1b[DXY\r")                        # two left arrows, insert, Enter
    assert t.read_until(b"abXYcd\r", 20), t.out[-500:]
    t.send(b"sleep 100\r")
    time.sleep(1)
    t.send(b"\x03")                                     # the guest's shell gets SIGINT
    t.send(b"printf 'T\\033]0;pwned\\007U\\n'\r")
    assert t.read_until(b"TU\r", 30), t.out[-500:]
    assert b"pwned" not in t.out.split(b"printf")[-1].split(b"\n", 1)[-1]
    assert t.proc.poll() is None
    t.send(b"\x1d")
    assert t.finish() == 130, t.out[-500:]
    assert t.restored()


def test_terminal_slow_to_read(pty_run):
    """The terminal's stdin and stdout are one open file, made non-blocking for the loop's
    reader: a terminal that stops reading for a while (a slow link, a paused pager) makes
    writes answer EAGAIN. The output waits for it; nothing is lost and the guest lives
    (before: the guest was destroyed as if the output had been closed)."""
    import threading
    t = pty_run("run", kernel(), "--memory", "8", "--cmdline", "ticks=1 echo=1 echo_timeout=60")
    assert t.read_until(b"echo: ready", 60), t.out
    lines = [b"line%03d-" % i + b"x" * 150 for i in range(150)]       # ~23 KB of echoes
    writer = threading.Thread(target=lambda: [t.send(l + b"\r") for l in lines])
    writer.start()
    time.sleep(3)                                      # not reading: the pty fills up
    assert t.read_until(b"echo: " + lines[-1], 60), t.out[-300:]
    writer.join(30)
    for l in lines:
        assert b"echo: " + l + b"\r\n" in t.out, l[:10]
    t.send(b"quit\r")
    assert t.finish() == 0, t.out[-300:]
    assert t.restored()


def test_terminal_hang_up(pty_run):
    """The terminal goes away (its emulator closed, an ssh link dropped): the guest is
    destroyed and aiovmm exits 130, its last line lost with the terminal (before: that line's
    EIO became a traceback and exit 1)."""
    t = pty_run("run", kernel(), "--memory", "8", "--cmdline", "ticks=1 echo=1 echo_timeout=60")
    assert t.read_until(b"echo: ready", 60), t.out
    t.sel.unregister(t.master)
    os.close(t.master)
    t.master = None
    try:
        rc = t.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail("aiovmm kept running after its terminal hung up")
    assert rc == 130


# A Ctrl-C while `aiovmm` is still importing: sitecustomize (run by Python's start-up, before
# the console script) raises SIGINT the moment the named module is first imported.
_SIGINT_AT_IMPORT = """
import _signal, sys
class _At:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            _signal.raise_signal(_signal.SIGINT)
        return None
sys.meta_path.insert(0, _At())
"""


@pytest.mark.parametrize("module", ["asyncio", "aiovmm.abi", "aiovmm.console", "aiovmm.hypervisor"])
def test_ctrl_c_while_importing(pty_run, tmp_path, module):
    """Ctrl-C while the command imports (the console script's `from aiovmm.cli import main`,
    before main() runs; aiovmm.hypervisor: inside main): one line, exit 130, the terminal
    as it was (before: a KeyboardInterrupt traceback from the import and SIGINT's status)."""
    (tmp_path / "sitecustomize.py").write_text(_SIGINT_AT_IMPORT.format(module=module))
    t = pty_run("run", kernel(), "--memory", "8", "--cmdline", "ticks=1 echo=1 echo_timeout=60",
                env_add={"PYTHONPATH": str(tmp_path)})
    assert t.finish() == 130, t.out
    assert t.out == b"aiovmm: interrupted\r\n", t.out
    assert t.restored()


@pytest.mark.parametrize("delay_ms", [0, 10, 50, 100, 200])
def test_ctrl_c_early(pty_run, delay_ms):
    """The user's Ctrl-C (SIGINT from the terminal's driver to the foreground group) soon
    after the start. Before Python's own handler is in place the default action ends the
    process (killed by SIGINT: the shell's 130, nothing printed); from the first line of
    aiovmm's code on, one line and exit 130, never a traceback of aiovmm's. What is left is
    Python's own start-up (site and the editable install's finder: CPython prints its own
    'Fatal Python error: init_import_site' there), before any of aiovmm runs."""
    t = pty_run("run", kernel(), "--memory", "8", "--cmdline", "ticks=1 echo=1 echo_timeout=60")
    time.sleep(delay_ms / 1000)
    os.killpg(t.proc.pid, signal.SIGINT)
    rc = t.finish()
    if rc == -signal.SIGINT and b"Traceback" not in t.out:
        assert t.out == b"", t.out
    elif rc in (1, -signal.SIGINT) and b"aiovmm: interrupted" not in t.out:
        # Python's own start-up (a 'Fatal Python error: init_import_site' or
        # 'init_sys_streams') or the console script's `from aiovmm.cli import main` still
        # finding the package: CPython's report, and not one frame of aiovmm's code.
        assert b"KeyboardInterrupt" in t.out or b"Fatal Python error" in t.out, t.out
        assert b"/aiovmm/" not in t.out, t.out
    else:
        assert (rc, t.out[-40:]) == (130, b"aiovmm: interrupted\r\n") or \
            (rc == 130 and t.out.endswith(b"destroyed on SIGINT\r\n")), (rc, t.out)
        assert b"Traceback" not in t.out, t.out
    assert t.restored()
