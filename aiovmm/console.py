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
import os
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


def printable(data: bytes) -> bytes:
    """Control bytes other than \\n and \\t replaced by '?', as Xen filters the output of
    unprivileged domains (is_console_printable). One C-level pass."""
    return data.translate(_FILTER)


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
