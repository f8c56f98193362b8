"""Token buckets for device I/O limits (per vif and per vbd), and xl's rate syntax.

A backend asks `delay_s()` before it takes the next packet or request from a ring: 0 means go
on, otherwise it stops consuming, arms one loop timer for that many seconds and waits for it
(nothing spins; the guest's requests simply stay on the ring, which is the back-pressure Xen's
netback applies with its credit timer). After the work it `charge()`s what it used.

The bucket refills continuously at `rate` units/s up to `burst` units. One packet or request
may take it below zero (a frame bigger than what is left still passes, as Linux netback lets
one over-sized packet through), and nothing more passes until the debt is repaid, so the
long-run rate is exact whatever the item sizes.

vif `rate=` is xl's (docs/man/xl-network-configuration.5, tools/libs/util/libxlu_vif.c):
`RATE/s[@INTERVAL]`, RATE a number with an optional G/M/K (powers of 1000) then B (bytes) or
b (bits); INTERVAL a number with s (or nothing), ms or us, default 50 ms. Xen replenishes
rate*interval bytes every interval; here that amount is the burst, but at least 128 KiB as
Linux netback's tx_add_credit allows (max_burst = max(131072, credit_bytes)): a short
interval would otherwise lose credit to any loop latency longer than it.

vbd limits (no xl equivalent; our disk spec keys): `iops=<ops/s>`, `bps=<bytes/s>` (same
suffixes as RATE without `/s`), `burst_ms=<ms>` (bucket depth in time, default 50). Every
request is one op; bytes are a read's or write's length and a discard's range, a flush
none (QEMU's throttle filter; blkback's _charged_bytes).
"""
from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from typing import Callable

DEFAULT_INTERVAL_US = 50_000
_RATE = re.compile(r"^([0-9]+)([GMK]?)([Bb])/s$")
_INTERVAL = re.compile(r"^([0-9]+)([mu]?)s?$")
_SIZE = re.compile(r"^([0-9]+)([GMK]?)([Bb]?)$")
_MULT = {"": 1, "K": 1000, "M": 1000 ** 2, "G": 1000 ** 3}


class TokenBucket:
    """`rate` units per second, at most `burst` units saved up (see the module docstring)."""

    __slots__ = ("rate", "burst", "tokens", "_t")

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = self.burst
        self._t = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self._t) * self.rate)
        self._t = now

    def delay_s(self) -> float:
        """0 if the next item may go now, else the seconds until the debt is repaid."""
        self._refill()
        return 0.0 if self.tokens > 0 else (-self.tokens + 1e-9) / self.rate

    def charge(self, n: float) -> None:
        self._refill()
        self.tokens -= n


@dataclasses.dataclass(frozen=True, slots=True)
class Limit:
    """What the user set (None: unlimited), kept for display and re-application."""
    bytes_per_s: int | None = None
    ops_per_s: int | None = None
    interval_us: int = DEFAULT_INTERVAL_US

    def describe(self) -> dict:
        return {"bytes_per_s": self.bytes_per_s, "ops_per_s": self.ops_per_s,
                "interval_us": self.interval_us}


class Limiter:
    """A device's buckets (bytes and/or operations); `limit` None or empty = unlimited."""

    __slots__ = ("limit", "min_burst_bytes", "_bytes", "_ops")

    def __init__(self, limit: Limit | None = None, min_burst_bytes: int = 0) -> None:
        self.min_burst_bytes = min_burst_bytes
        self.set(limit)

    def set(self, limit: Limit | None) -> None:
        self.limit = limit or Limit()
        lim = self.limit
        depth = lim.interval_us / 1e6
        self._bytes = (TokenBucket(lim.bytes_per_s, max(1.0, self.min_burst_bytes, lim.bytes_per_s * depth))
                       if lim.bytes_per_s else None)
        self._ops = TokenBucket(lim.ops_per_s, max(1.0, lim.ops_per_s * depth)) if lim.ops_per_s else None

    @property
    def active(self) -> bool:
        return self._bytes is not None or self._ops is not None

    def delay_s(self) -> float:
        d = 0.0
        if self._bytes is not None:
            d = self._bytes.delay_s()
        if self._ops is not None:
            d = max(d, self._ops.delay_s())
        return d

    def charge(self, nbytes: int, ops: int = 1) -> None:
        if self._bytes is not None:
            self._bytes.charge(nbytes)
        if self._ops is not None:
            self._ops.charge(ops)


class Throttle:
    """A device's one wake-up timer while one of its limiters is in debt: `blocked()` says
    whether the next item must wait and, if so, arms a single loop timer (never two) that
    calls `wake` (the backend's kick) when the debt is repaid. The backend then stops
    consuming and sleeps on its kick: nothing spins while throttled."""

    __slots__ = ("_wake", "_handle")

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._handle: asyncio.TimerHandle | None = None

    def blocked(self, limiter: Limiter) -> bool:
        """True (and the timer armed) when `limiter` has no tokens for the next item."""
        d = limiter.delay_s()
        if not d:
            return False
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(d, self._expired)
        return True

    def _expired(self) -> None:
        self._handle = None
        self._wake()

    def cancel(self) -> None:
        """Drop a pending wake-up (the device disconnects)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def parse_vif_rate(spec: str) -> Limit:
    """xl's vif `rate=` value -> Limit (ValueError with xl's reasons)."""
    rate, _, interval = spec.partition("@")
    if not rate:
        raise ValueError(f"no rate specified in {spec!r}")
    m = _RATE.match(rate)
    if not m:
        raise ValueError(f"invalid rate {rate!r}")
    n = int(m.group(1))
    if n == 0 or n > 0xFFFFFFFF:
        raise ValueError(f"rate overflow {rate!r}")
    bps = n * _MULT[m.group(2)]
    if m.group(3) == "b":
        bps //= 8
    us = DEFAULT_INTERVAL_US
    if interval:
        m = _INTERVAL.match(interval)
        if not m:
            raise ValueError(f"invalid replenishment interval {interval!r}")
        us = int(m.group(1))
        if us == 0 or us > 0xFFFFFFFF:
            raise ValueError(f"replenishment interval overflow {interval!r}")
        us *= {"": 1_000_000, "m": 1000, "u": 1}[m.group(2)]
        if us > 0xFFFFFFFF:
            raise ValueError(f"replenishment interval overflow {interval!r}")
    if bps == 0:
        raise ValueError(f"rate {rate!r} is below one byte per second")
    return Limit(bytes_per_s=bps, interval_us=us)


def parse_size_rate(value: str) -> int:
    """`500`, `10M`, `10MB`, `80Mb` (per second) -> bytes or operations per second."""
    m = _SIZE.match(value)
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"invalid rate {value!r}")
    n = int(m.group(1)) * _MULT[m.group(2)]
    return n // 8 if m.group(3) == "b" else n


def make_limit(bytes_per_s: int | None, ops_per_s: int | None, interval_us: int = DEFAULT_INTERVAL_US) -> Limit:
    """The one validation of a limit, whatever it came from (config, library, daemon)."""
    for what, v in (("bytes_per_s", bytes_per_s), ("ops_per_s", ops_per_s)):
        if v is not None and not 1 <= v <= 1 << 40:
            raise ValueError(f"{what} must be 1..{1 << 40} or unset")
    if not 100 <= interval_us <= 10_000_000:
        raise ValueError("interval must be 100 us .. 10 s")
    return Limit(bytes_per_s, ops_per_s, interval_us)
