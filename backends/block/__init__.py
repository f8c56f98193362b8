"""Block backend (blkback): a guest's vbd ring <-> a file, a block device or an LVM volume."""
from .device import Blkback, DiskConfig

__all__ = ["Blkback", "DiskConfig"]
