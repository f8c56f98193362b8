"""memory_op (#12): the domain's memory reservation (balloon) and M2P information.

PV semantics (xen-pv-abi.md §8): frame lists hold MFNs (GFN == MFN for PV). A frame is freed
only when nothing uses it: a frame given back while still a typed page (page table, pinned)
or still mapped (an L1 entry, another domain's grant mapping) counts as done, as in Xen, but
stays the domain's (and counted in its reservation) until its last reference drops, so a
guest can never keep a mapping of a frame that has gone to another domain.
"""
from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

from .abi import DOMID_SELF, MACH2PHYS_VIRT_END, MACH2PHYS_VIRT_START, Errno
from .errors import HypercallError
from .memory import OutOfMemory
from .mmu import GuestFault

if TYPE_CHECKING:
    from .vcpu import VCPU

log = logging.getLogger("aiovmm.reservation")

XENMEM_increase_reservation = 0
XENMEM_decrease_reservation = 1
XENMEM_maximum_ram_page = 2
XENMEM_current_reservation = 3
XENMEM_maximum_reservation = 4
XENMEM_machphys_mfn_list = 5
XENMEM_populate_physmap = 6
XENMEM_memory_map = 9
XENMEM_machphys_mapping = 12
XENMEM_maximum_gpfn = 14
E820_RAM = 1

RESERVATION = struct.Struct("<QQIIH6x")       # extent_start, nr_extents, order, mem_flags, domid
MACHPHYS_MAPPING = struct.Struct("<QQQ")
MACHPHYS_MFN_LIST = struct.Struct("<I4xQI4x")   # max_extents, extent_start, nr_extents
MEMOP_EXTENT_SHIFT = 6                        # cmd = op | (start_extent << 6): Xen's continuation
# Xen refuses a list whose continuation could not be encoded (do_memory_op: nr_extents >
# UINT_MAX >> MEMOP_EXTENT_SHIFT returns start_extent).
MAX_EXTENTS = 0xFFFFFFFF >> MEMOP_EXTENT_SHIFT
CHUNK = 512                                   # extents per invocation before a continuation


def _self_domid(v: "VCPU", domid: int) -> None:
    if domid not in (DOMID_SELF, v.domain.domid):
        raise HypercallError(Errno.EPERM, "memory_op on another domain is privileged")


def do_memory_op(v: "VCPU", cmd: int, arg: int, *_) -> int | None:
    dom = v.domain
    mem = dom.mem
    op = cmd & 0x3F
    start_extent = cmd >> 6
    if op in (XENMEM_increase_reservation, XENMEM_decrease_reservation, XENMEM_populate_physmap):
        extents, nr, order, _flags, domid = v.read_struct(arg, RESERVATION)
        _self_domid(v, domid)
        if nr > MAX_EXTENTS or order != 0:
            # Only 4 KiB extents: larger orders would need contiguous machine frames.
            return start_extent
        done = start_extent
        for i in range(start_extent, nr):
            if i - start_extent == CHUNK:
                # Xen's hypercall_preempt_check + continuation: the SYSCALL is re-executed
                # with the extent to start from in cmd, so a list as long as the domain never
                # holds the loop (and the other guests) for more than CHUNK extents.
                eng = v.engine
                eng.write({"rip": eng.get("rip") - 2, "rdi": op | (i << MEMOP_EXTENT_SHIFT), "rsi": arg})
                eng.stop()
                return None
            slot = extents + 8 * i
            if op == XENMEM_decrease_reservation:
                try:
                    mfn = int.from_bytes(v.copy_from_guest(slot, 8), "little")
                except GuestFault:
                    break                       # Xen: the copy fails, goto out (count so far)
                if not mem.valid_mfn(mfn) or mem.owner[mfn] != dom.domid or mfn in dom.shared_frames:
                    break
                # Xen's guest_remove_page: the extent is done; a frame still referenced
                # (mapped, a page table, pinned, grant-mapped by another domain) is freed
                # only when its last reference drops, never reused before.
                dom.release_frame(mfn)
            else:
                if dom.tot_pages >= dom.max_pages:
                    break
                try:
                    pfn = int.from_bytes(v.copy_from_guest(slot, 8), "little") if op == XENMEM_populate_physmap else None
                    # Writable before a frame is taken: a slot the guest cannot be told
                    # the MFN through ends the batch with nothing allocated for it.
                    v.copy_to_guest(slot, v.copy_from_guest(slot, 8))
                except GuestFault:
                    break                       # Xen: the copy fails, goto out (count so far)
                try:
                    mfn = dom.add_frame()
                except OutOfMemory:
                    break
                if pfn is not None and pfn < (1 << 40):
                    mem.m2p[mfn] = pfn
                    if pfn < len(dom.p2m):
                        # The guest's P2M names the new frame for this pfn (Linux's
                        # balloon enters it): the hypervisor's copy, which save and
                        # migration go by, follows, so the pfn's data goes with it.
                        dom.p2m[pfn] = mfn
                v.copy_to_guest(slot, mfn.to_bytes(8, "little"))
            done = i + 1
        return done
    if op == XENMEM_maximum_ram_page:
        return mem.nr_frames - 1
    if op in (XENMEM_current_reservation, XENMEM_maximum_reservation, XENMEM_maximum_gpfn):
        (domid,) = struct.unpack("<H", v.copy_from_guest(arg, 2))
        target = dom if domid in (DOMID_SELF, dom.domid) else None
        if target is None:
            raise HypercallError(Errno.ESRCH if dom.hypervisor.domain(domid) is None else Errno.EPERM)
        if op == XENMEM_current_reservation:
            return target.tot_pages
        if op == XENMEM_maximum_reservation:
            return target.max_pages
        return target.nr_pages - 1
    if op == XENMEM_machphys_mfn_list:
        # MFNs of the M2P's 2 MiB chunks (512 frames each), up to max_extents.
        max_ext, handle, _n = v.read_struct(arg, MACHPHYS_MFN_LIST)
        chunks = list(range(mem.m2p_first, mem.m2p_first + mem.m2p_frames, 512))[:max_ext]
        if chunks:
            v.copy_to_guest(handle, struct.pack(f"<{len(chunks)}Q", *chunks))
        v.copy_to_guest(arg + 16, struct.pack("<I", len(chunks)))
        return 0
    if op == XENMEM_machphys_mapping:
        # An engine may place the M2P elsewhere (kvm-pvm reserves Xen's slot 256).
        start = getattr(v.engine, "m2p_va", MACH2PHYS_VIRT_START)
        v.write_struct(arg, MACHPHYS_MAPPING, start, start + MACH2PHYS_VIRT_END - MACH2PHYS_VIRT_START,
                       mem.nr_frames - 1)
        return 0
    if op == XENMEM_memory_map:
        # The map xl sets for every PV guest (xc_domain_set_memmap_limit): one RAM region
        # from 0 to the domain's maximum at build. struct e820entry is packed (20 bytes).
        nr, buf = struct.unpack("<I4xQ", v.copy_from_guest(arg, 16))
        entries = [(0, dom.memmap_pages << 12, E820_RAM)]
        n = min(nr, len(entries))
        v.copy_to_guest(buf, b"".join(struct.pack("<QQI", *e) for e in entries[:n]))
        v.copy_to_guest(arg, struct.pack("<I", n))
        return 0
    raise HypercallError(Errno.ENOSYS)
