"""Network backend (netback): a guest's vif rings <-> a Linux tap device on a bridge."""
from .device import Netback, VifConfig

__all__ = ["Netback", "VifConfig"]
