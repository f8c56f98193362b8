"""aiovmm: the Xen 2.0 para-virtualizing hypervisor rebuilt in Python on asyncio.

Public API: Hypervisor, Domain, BuildError, ShutdownReason.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["Hypervisor", "Domain", "BuildError", "ShutdownReason"]
__version__ = "0.1.0"

# Imported on first use (PEP 562), so `aiovmm <verb>` against the daemon starts without
# loading the hypervisor (Unicorn, the vCPU engine) it does not need.
_LAZY = {"Hypervisor": ".hypervisor", "Domain": ".domain", "BuildError": ".errors",
         "ShutdownReason": ".abi"}

if TYPE_CHECKING:
    from .abi import ShutdownReason
    from .domain import Domain
    from .errors import BuildError
    from .hypervisor import Hypervisor


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aiovmm' has no attribute {name!r}")
