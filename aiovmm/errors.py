"""Exceptions that cross module boundaries, and the one place errno values are mapped."""
from __future__ import annotations

from .abi import Errno


class HypercallError(Exception):
    """A hypercall refused with Xen's errno (returned to the guest as -errno)."""

    def __init__(self, errno: Errno, msg: str = "") -> None:
        super().__init__(msg or errno.name)
        self.errno = errno


class DomainCrash(Exception):
    """The guest did something Xen answers by crashing the domain."""


class BuildError(Exception):
    """The guest image or its configuration cannot be built into a domain (user-facing)."""
