"""aiovmm: the Xen 2.0 para-virtualizing hypervisor rebuilt in Python on asyncio.

Public API: Hypervisor, Domain, BuildError, ShutdownReason.
"""
from __future__ import annotations

import _signal
import sys as _sys

# `aiovmm` the command (the console script): a Ctrl-C from here until cli.main() runs (the
# imports, a few hundred ms on a loaded host) is noted, not raised as KeyboardInterrupt
# outside main() (a Python traceback instead of one line and exit 130); main() puts the
# default handler back and ends with its line. `_signal`: the C module, already loaded
# (`signal` imports enum, itself tens of ms). A program importing aiovmm keeps its handler.
early_sigint: list[int] = []


def _note_sigint(signum: int, _frame) -> None:
    early_sigint.append(signum)


def note_early_sigint() -> None:
    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
        _signal.signal(_signal.SIGINT, _note_sigint)


if _sys.argv and _sys.argv[0].rpartition("/")[2] == "aiovmm":
    note_early_sigint()

from typing import TYPE_CHECKING  # noqa: E402

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
