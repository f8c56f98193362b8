"""aiovmm: the Xen 2.0 para-virtualizing hypervisor rebuilt in Python on asyncio.

Public API: Hypervisor, Domain, BuildError, ShutdownReason.
"""
from .abi import ShutdownReason
from .domain import Domain
from .errors import BuildError
from .hypervisor import Hypervisor

__all__ = ["Hypervisor", "Domain", "BuildError", "ShutdownReason"]
__version__ = "0.1.0"
