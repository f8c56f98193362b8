"""Xen system time: nanoseconds of the host's CLOCK_MONOTONIC since the hypervisor started.

One object holds the definition, so an engine that answers RDTSC without Python (the
Unicorn engine's C hook, csrc/preempt.c) computes the same value from `origin_ns`."""
from __future__ import annotations

import time


class SystemClock:
    """Callable: time.monotonic_ns() (CLOCK_MONOTONIC) - origin_ns."""

    __slots__ = ("origin_ns",)

    def __init__(self, origin_ns: int) -> None:
        self.origin_ns = origin_ns

    def __call__(self) -> int:
        return time.monotonic_ns() - self.origin_ns
