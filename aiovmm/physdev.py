"""physdev_op, platform_op and xenpmu_op as Xen answers an unprivileged PV guest.

A domU has no physical devices, interrupts or I/O ports of its own, but Xen still serves it a
few physdev operations Linux relies on: the virtual IOPL (PHYSDEVOP_set_iopl, checked by the
privileged-operation emulator on cli/sti and port I/O), an I/O bitmap, the PIRQ-EOI map frame
and the status of PIRQs (none bound). Everything touching real hardware is refused by XSM's
dummy policy with -EPERM, as on Xen (xen/arch/x86/physdev.c, platform_hypercall.c,
cpu/vpmu.c).
"""
from __future__ import annotations

import enum
import logging
import struct
from typing import TYPE_CHECKING

from .abi import HYPERVISOR_VIRT_END, HYPERVISOR_VIRT_START, Errno
from .errors import HypercallError
from .memory import PageType
from .mmu import MMUError

if TYPE_CHECKING:
    from .domain import Domain
    from .vcpu import VCPU

log = logging.getLogger("aiovmm.physdev")


class PhysdevOp(enum.IntEnum):
    irq_status_query = 5
    set_iopl = 6
    set_iobitmap = 7
    apic_read = 8
    apic_write = 9
    alloc_irq_vector = 10
    free_irq_vector = 11
    eoi = 12
    map_pirq = 13
    unmap_pirq = 14
    manage_pci_add = 15
    manage_pci_remove = 16
    pirq_eoi_gmfn_v1 = 17
    restore_msi = 19
    manage_pci_add_ext = 20
    setup_gsi = 21
    get_free_pirq = 23
    pci_mmcfg_reserved = 24
    pci_device_add = 25
    pci_device_remove = 26
    restore_msi_ext = 27
    pirq_eoi_gmfn_v2 = 28
    dbgp_op = 29
    prepare_msix = 30
    release_msix = 31


# Operations on real hardware: the dummy XSM policy (XSM_PRIV / XSM_DM_PRIV) refuses them
# for an unprivileged domain.
_PRIVILEGED = frozenset({
    PhysdevOp.apic_read, PhysdevOp.apic_write, PhysdevOp.alloc_irq_vector,
    PhysdevOp.free_irq_vector, PhysdevOp.map_pirq, PhysdevOp.unmap_pirq,
    PhysdevOp.manage_pci_add, PhysdevOp.manage_pci_remove, PhysdevOp.restore_msi,
    PhysdevOp.manage_pci_add_ext, PhysdevOp.setup_gsi, PhysdevOp.get_free_pirq,
    PhysdevOp.pci_mmcfg_reserved, PhysdevOp.pci_device_add, PhysdevOp.pci_device_remove,
    PhysdevOp.restore_msi_ext, PhysdevOp.dbgp_op, PhysdevOp.prepare_msix,
    PhysdevOp.release_msix,
})
XENIRQSTAT_needs_eoi = 1
# A PV domU's d->nr_pirqs: the machine's static IRQs (16 legacy ISA + 8 more IO-APIC GSIs
# on a typical host) + extra_domU_pirqs (32).
NR_PIRQS = 24 + 32
IOBMP_BYTES = 8192


def do_physdev_op(v: "VCPU", cmd: int, arg: int, *_) -> int:
    cmd &= 0xFFFFFFFF
    if cmd == PhysdevOp.set_iopl:
        iopl = int.from_bytes(v.copy_from_guest(arg, 4), "little")
        if iopl > 3:
            raise HypercallError(Errno.EINVAL, "iopl > 3")
        v.iopl = iopl
        log.debug("d%d: vcpu %d iopl %d", v.domain.domid, v.id, iopl)
        return 0
    if cmd == PhysdevOp.set_iobitmap:
        bitmap, nr_ports = struct.unpack("<QI4x", v.copy_from_guest(arg, 16))
        end = bitmap + IOBMP_BYTES
        in_xen = bitmap < HYPERVISOR_VIRT_END and end > HYPERVISOR_VIRT_START
        if in_xen or end > 1 << 64 or nr_ports > 65536 or (bitmap < 1 << 47 < end):
            raise HypercallError(Errno.EINVAL, "bad I/O bitmap")
        v.iobmp = (bitmap, nr_ports)
        return 0
    if cmd == PhysdevOp.irq_status_query:
        irq = struct.unpack("<i", v.copy_from_guest(arg, 4))[0]
        if irq < 0 or irq >= NR_PIRQS:
            raise HypercallError(Errno.EINVAL)
        v.copy_to_guest(arg + 4, XENIRQSTAT_needs_eoi.to_bytes(4, "little"))
        return 0
    if cmd == PhysdevOp.eoi:
        irq = int.from_bytes(v.copy_from_guest(arg, 4), "little")
        # No PIRQ is ever bound to a domU here: pirq_info() is NULL -> -EINVAL.
        raise HypercallError(Errno.EINVAL, f"no pirq {irq}")
    if cmd in (PhysdevOp.pirq_eoi_gmfn_v1, PhysdevOp.pirq_eoi_gmfn_v2):
        gmfn = int.from_bytes(v.copy_from_guest(arg, 8), "little")
        mem, dom = v.domain.mem, v.domain
        if not mem.valid_mfn(gmfn) or mem.owner[gmfn] != dom.domid:
            raise HypercallError(Errno.EINVAL, "pirq eoi frame not owned")
        # Xen keeps a writable type reference on the frame for the domain's lifetime
        # (get_page_type(PGT_writable_page), -EINVAL for a page table or descriptor page):
        # the frame can then be neither a page table nor given back while it is the map.
        pt = dom.hypervisor.pagetables
        try:
            pt.get_type(gmfn, PageType.writable, dom.domid)
        except MMUError:
            raise HypercallError(Errno.EINVAL, f"pirq eoi frame {gmfn:#x} cannot be writable") from None
        if getattr(dom, "pirq_eoi_mfn", 0):
            pt.put_type(gmfn)
            raise HypercallError(Errno.EBUSY)
        # No PIRQ is ever bound here, so nothing is ever written into it.
        dom.pirq_eoi_mfn = gmfn
        return 0
    if cmd in _PRIVILEGED:
        raise HypercallError(Errno.EPERM, f"physdev op {cmd} needs privilege")
    raise HypercallError(Errno.ENOSYS)


def release(dom: "Domain") -> None:
    """Domain teardown (domain_relinquish_resources): drop the EOI map's writable reference."""
    mfn = getattr(dom, "pirq_eoi_mfn", 0)
    if mfn:
        dom.hypervisor.pagetables.put_type(mfn)
        dom.pirq_eoi_mfn = 0


XENPF_INTERFACE_VERSION = 0x03000001


def do_platform_op(v: "VCPU", arg: int, *_) -> int:
    """Xen copies the op (-EFAULT), checks the interface version (-EACCES), then XSM refuses
    every platform op to an unprivileged domain (-EPERM)."""
    cmd, version = struct.unpack("<II", v.copy_from_guest(arg, 8))
    v.copy_from_guest(arg, 128)                      # the whole xen_platform_op_t
    if version != XENPF_INTERFACE_VERSION:
        raise HypercallError(Errno.EACCES)
    raise HypercallError(Errno.EPERM, f"platform op {cmd}")


def do_xenpmu_op(v: "VCPU", op: int, arg: int, *_) -> int:
    """vPMU is off by default (opt_vpmu_enabled): every op is -EOPNOTSUPP."""
    raise HypercallError(Errno.EOPNOTSUPP)
