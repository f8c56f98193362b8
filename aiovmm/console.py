"""Per-domain console output accounting: what a guest's output may cost the host.

Both output paths (the console_io hypercall and the xencons ring drained by
backends/console.py) end in `Domain.console_write`, which uses the two pieces here:

- `OutputRate`: a byte budget per domain (token bucket), as Xen's console daemon limits each
  domain (tools/console/daemon/io.c: at most RATE_LIMIT_ALLOWANCE ring reads per
  RATE_LIMIT_PERIOD; the hypervisor's own guest_printk is rate-limited too). The ring path
  asks how much it may take and leaves the rest in the ring (the guest waits for room, as
  with xenconsoled's masked event channel); console_io output beyond the budget is discarded
  and counted.
- `LineBuffer`: the unfinished line is bounded (Xen's guest_console_write keeps 256 bytes per
  domain and prints a full buffer as a line); a longer line is emitted in LINE_MAX pieces.
  Every byte is copied a bounded number of times, whatever the partial line's length.
"""
from __future__ import annotations

import asyncio
import codecs
import os
import re
import select
import time
from typing import Callable

LINE_MAX = 4096                  # longest line kept unfinished; then emitted as a line
RATE_BYTES_PER_S = 256 * 1024    # sustained console output per domain
BURST_BYTES = 1 << 20            # output allowed at once (a boot log fits)
_FILTER = bytes(b if (32 <= b < 127 or b in (9, 10)) else 0x3F for b in range(256))


def read_host_input(loop: asyncio.AbstractEventLoop, fd: int) -> bytes | None:
    """One read of host input (a non-blocking stdin on `loop.add_reader`) for a guest's
    console, as `aiovmm run` and `aiovmm console` both take it: the bytes read; None when
    nothing was there after all; b"" at end of input or a read error, with the reader
    removed, so a closed stdin is not polled again."""
    try:
        data = os.read(fd, 4096)
    except BlockingIOError:
        return None
    except OSError:
        data = b""
    if not data:
        loop.remove_reader(fd)
    return data


def watch_host_input(loop: asyncio.AbstractEventLoop, fd: int, feed: Callable[[bytes], bool]) -> None:
    """Give host input on `fd` (a non-blocking stdin) to `feed`, chunk by chunk, until its end
    or until `feed` answers False (Ctrl-]), as `aiovmm run` and `aiovmm console` both take it.
    A terminal or a pipe is watched with `loop.add_reader`; a regular file or /dev/null
    (`aiovmm console DOM < commands.txt`), which epoll refuses (EPERM) and which is always
    readable, is read to its end one chunk per turn of the loop. Raises OSError/ValueError
    for a descriptor that cannot be watched at all."""
    def readable() -> None:
        data = read_host_input(loop, fd)
        if data and not feed(data):
            loop.remove_reader(fd)
    try:
        loop.add_reader(fd, readable)
        return
    except PermissionError:
        pass

    def pump() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            data = None
        except OSError:
            return
        if data == b"":
            return
        if data is None or feed(data):
            loop.call_soon(pump)
    loop.call_soon(pump)


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to the user's stdout `fd`, as a blocking write would, also when the
    descriptor is non-blocking: a terminal's stdin and stdout are usually one open file, and
    stdin is made non-blocking for the loop's reader, so a terminal that is slow to take a
    boot log answers EAGAIN (waited out here, never taken for a closed output). Other
    errors (EPIPE, EIO after a hang-up) are raised."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


def printable(data: bytes) -> bytes:
    """Control bytes other than \\n and \\t replaced by '?', as Xen filters the output of
    unprivileged domains (is_console_printable). One C-level pass."""
    return data.translate(_FILTER)


def text(data: bytes) -> bytes:
    """Guest output as text for a file, a pipe or a record: the guest terminal's CR LF line
    ends as LF, then every other control byte replaced (`printable`). Nothing in the result
    can drive a terminal."""
    return printable(data.replace(b"\r\n", b"\n"))


# TerminalFilter states
_NORMAL, _ESC, _STRING, _STRING_ESC, _STRING_C2 = range(5)
STRING_MAX = 4096        # a control string longer than this is dropped up to here, then ended


class TerminalFilter:
    """Guest output for the user's own terminal (`aiovmm run`/`aiovmm console` attached to
    one): the guest's bytes as they are, so its programs drive the terminal as on a serial
    line (xl console, QEMU's -nographic): cursor movement and colours (ESC and CSI
    sequences), CR, BS, BEL, and CSI reports such as the cursor position busybox's line
    editing asks for (ESC [ 6 n), all pass. Removed: the terminal's control *strings*,
    OSC, DCS, SOS, PM and APC (ESC ] ... ST, ESC P ..., ESC X ..., ESC ^ ..., ESC _ ..., and
    their C1 forms as UTF-8, U+0090/U+0098/U+009D/U+009E/U+009F), with their contents: those
    set window titles, write the clipboard (OSC 52), define keys or query and answer
    terminal state (DECRQSS), the known ways for a program's output to act on the host
    beyond its own screen. Other C1 controls as UTF-8 (U+0080-U+009F) are removed too.
    Bytes 0x80-0xff pass where they make well-formed UTF-8; a byte 0x80-0x9f outside one
    (a lone 0x9b, 0x9d, ...) is removed, since an 8-bit terminal takes it as a C1 control
    (CSI, OSC: the string's start without ESC); 0xa0-0xff outside one pass (printable
    there, a replacement character on a UTF-8 terminal). A string ends at ST (ESC \\ or
    U+009C), BEL, CAN or SUB as in xterm, or after STRING_MAX bytes. Inside ESC a terminal executes C0
    controls and ignores DEL without leaving ESC, so those pass and ESC stays pending; ESC is
    written only with the byte after it, never alone before a removed C1 control.

    State is kept across calls, so a sequence split between two writes is handled the
    same (an incomplete UTF-8 sequence at a write's end waits for the next write); each
    call copies its bytes a bounded number of times (match and slice)."""

    def __init__(self) -> None:
        self._state = _NORMAL
        self._string_len = 0
        self._pending = b""           # the start of a UTF-8 sequence that a write split

    def feed(self, data: bytes) -> bytes:
        if self._pending:
            data, self._pending = self._pending + data, b""
        out = bytearray()
        view = memoryview(data)
        i, n = 0, len(data)
        j = k = -1                     # the next ESC, and C2 before it (NORMAL)
        st = self._state
        while i < n:
            if st == _NORMAL:
                if j < i:
                    j = data.find(b"\x1b", i)
                    j = n if j < 0 else j
                if k < i:
                    k = data.find(b"\xc2", i, j)  # C2: the lead of U+0080-U+00BF, C1 among them
                    k = j if k < 0 else k
                if k > i:                          # text up to there: passes where well-formed
                    seg, final = view[i:k], k < n  # UTF-8 (final: a sequence cut by the end
                    try:                           # of the write waits for the next one)
                        used = _utf8_decode(seg, "strict", final)[1]
                        out += view[i:i + used]
                    except UnicodeDecodeError:
                        # Bytes outside a well-formed sequence: a lone C1 byte would be a
                        # control on an 8-bit terminal (0x9b CSI, 0x9d OSC: a string without
                        # ESC) and is dropped; 0xa0-0xff are printable there and pass.
                        txt, used = _utf8_decode(seg, "surrogateescape", final)
                        out += txt.translate(_LONE_C1).encode("utf-8", "surrogateescape")
                    i += used
                    if i < k:                      # (final False: i.e. k == n)
                        self._pending = bytes(view[i:n])
                        break
                if i == n:
                    break
                if i == j:                         # ESC
                    i += 1
                    st = _ESC
                elif i + 1 == n:                   # C2 at the end: with the next write
                    self._pending = b"\xc2"
                    break
                elif data[i + 1] <= 0x9f and data[i + 1] >= 0x80:     # a C1 control as UTF-8
                    if data[i + 1] in (0x90, 0x98, 0x9d, 0x9e, 0x9f):
                        st, self._string_len = _STRING, 0
                    i += 2
                elif 0xa0 <= data[i + 1] <= 0xbf:  # U+00A0-U+00BF
                    out += data[i:i + 2]
                    i += 2
                else:                              # C2 leading nothing: printable on its own
                    out.append(0xc2)
                    i += 1
            elif st == _ESC:
                b = data[i]
                if b in b"]PX^_":
                    st, self._string_len = _STRING, 0
                    i += 1
                elif b == 0x1b:              # ESC ESC: the terminal restarts at the second
                    i += 1
                elif (b < 0x20 and b not in (0x18, 0x1a)) or b == 0x7f:
                    out.append(b)            # executed (DEL ignored) inside ESC by a terminal,
                    i += 1                   # which stays in ESC: so do we
                elif b >= 0x80:              # ESC then UTF-8: the lone ESC dropped (never
                    st = _NORMAL             # glued to what follows a removed C1 control)
                else:                        # ESC and its next byte, together
                    out += bytes((0x1b, b))
                    i += 1
                    st = _NORMAL
            elif st == _STRING:
                m = _STRING_END.search(data, i)
                e = m.start() if m else n
                self._string_len += e - i
                i = e
                if self._string_len > STRING_MAX:
                    st = _NORMAL              # what follows is output again
                elif m:
                    i += 1
                    b = data[e]
                    st = _STRING_ESC if b == 0x1b else _STRING_C2 if b == 0xc2 else _NORMAL
            elif st == _STRING_C2:
                if data[i] == 0x9c:           # U+009C: ST
                    i += 1
                    st = _NORMAL
                else:                         # U+00xx text inside the string
                    st = _STRING
            else:                             # _STRING_ESC
                if data[i] == 0x5c:           # ESC \\ : ST
                    i += 1
                    st = _NORMAL
                else:                         # ESC ends the string and starts a sequence
                    st = _ESC
        self._state = st
        return bytes(out)


_STRING_END = re.compile(rb"[\x07\x18\x1a\x1b\xc2]")
_utf8_decode = codecs.utf_8_decode
_LONE_C1 = dict.fromkeys(range(0xDC80, 0xDCA0))     # bytes 0x80-0x9f as surrogateescape'd


DETACH_KEY = 0x1D        # Ctrl-]: leave the console (xl console's escape, and telnet's)


class HostTerminal:
    """The user's terminal (a tty on `fd`) in raw mode while a guest's console is attached,
    with QEMU's settings for a stdio serial line (chardev/char-stdio.c): no echo, no line
    editing, no signal keys (Ctrl-C, Ctrl-Z and Ctrl-\\ go to the guest as bytes), no input
    translation (Enter is CR, as a serial terminal sends it), 8-bit input; output
    post-processing kept, so a guest's bare LF still starts a new line. `restore()` puts
    back the settings found, once; safe to call again and on any path out."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list | None = None

    def __enter__(self) -> "HostTerminal":
        import termios
        saved = termios.tcgetattr(self.fd)
        iflag, oflag, cflag, lflag, ispeed, ospeed, cc = saved
        iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                   | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
        oflag |= termios.OPOST
        lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
        cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
        cc = list(cc)
        cc[termios.VMIN], cc[termios.VTIME] = 1, 0
        termios.tcsetattr(self.fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])
        self._saved = saved
        return self

    def restore(self) -> None:
        if self._saved is not None:
            import termios
            saved, self._saved = self._saved, None
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
            except termios.error:        # the terminal went away (hang-up): nothing to restore
                pass

    def __exit__(self, *exc: object) -> None:
        self.restore()


class OutputRate:
    """Token bucket: `rate` bytes per second, at most `burst` saved up."""

    def __init__(self, rate: int = RATE_BYTES_PER_S, burst: int = BURST_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self.dropped = 0             # bytes discarded (console_io beyond the budget)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now

    def available(self) -> int:
        """Bytes that may be written now."""
        self._refill()
        return int(self._tokens)

    def take(self, n: int, *, force: bool = False) -> int:
        """Charge up to `n` bytes; returns how many were allowed (the rest is dropped).
        `force` charges all `n` (the budget goes into debt): for the one last ring's worth
        a stopped guest left behind."""
        allowed = n if force else min(n, self.available())
        self._tokens -= allowed
        self.dropped += n - allowed
        return allowed

    def wait_s(self, need: int = 1) -> float:
        """Seconds until `need` bytes may be written (0.0 if now)."""
        short = min(need, self.burst) - self.available()
        return max(0.0, short / self.rate)


class LineBuffer:
    """Splits a byte stream into lines; the unfinished line is at most `limit` bytes."""

    def __init__(self, limit: int = LINE_MAX) -> None:
        self.limit = limit
        self._partial = bytearray()

    @property
    def pending(self) -> int:
        return len(self._partial)

    def feed(self, data: bytes) -> list[bytes]:
        """Complete lines (without the newline); lines longer than `limit` come in pieces."""
        out: list[bytes] = []
        limit = self.limit
        partial = self._partial
        view = memoryview(data)
        start = 0
        end = len(data)
        while start < end:
            nl = data.find(b"\n", start)
            stop = end if nl < 0 else nl
            while start < stop:                       # append, cutting at `limit`
                if len(partial) >= limit:
                    out.append(bytes(partial))
                    partial.clear()
                take = min(stop - start, limit - len(partial))
                partial += view[start:start + take]
                start += take
            if nl >= 0:
                out.append(bytes(partial))
                partial.clear()
                start = nl + 1
        return out

    def flush(self) -> bytes | None:
        """The unfinished line, taken out (None if there is none): at the writer's end, so
        its last bytes become a line too instead of waiting for a newline that never comes."""
        if not self._partial:
            return None
        line = bytes(self._partial)
        self._partial.clear()
        return line
