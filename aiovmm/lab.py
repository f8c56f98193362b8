"""Drive the real hypercall handlers from Python, for multi-domain security tests and the
stateful fuzzer (tests/test_grants_security.py, tests/test_audit_fuzz.py, bench/audit_fuzz.py).

A *parked* domain is built exactly as `Hypervisor.create` builds one (builder, vCPU 0 with
its CR3 reference) but its vCPU never runs, so nothing but the test touches its memory. The
test then does only what the guest itself could do: write its own RW-mapped frames and
grant entries, and make hypercalls. Hypercall arguments are written into the domain's boot
stack page (mapped RW at a known VA, unused since the guest never runs) and the handlers
(mmu_ops.do_mmu_update, do_mmuext_op, grants.do_grant_table_op, reservation.do_memory_op)
read them back through the guest's page tables, as for a SYSCALL from the guest.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from . import builder, grants, mmu_ops, reservation
from .abi import DOMID_SELF, MMU_UPDATE, MMUEXT_OP, PAGE_SHIFT, PAGE_SIZE, _PAGE_PRESENT, _PAGE_RW
from .domain import Domain
from .errors import HypercallError
from .mmu import MMUError

if TYPE_CHECKING:
    from .hypervisor import Hypervisor
    from .vcpu import VCPU


class Parked:
    """One parked domain: `dom`, its vCPU `v`, its build layout, and the frames the builder
    left unmapped (`spare`: neither page tables nor mapped by the bootstrap region)."""

    def __init__(self, hv: "Hypervisor", dom: Domain, lay: builder.Layout) -> None:
        self.hv, self.dom, self.lay = hv, dom, lay
        self.v: "VCPU" = dom.vcpus[0]
        self.args_va = lay.va(lay.stack_pfn)            # hypercall argument page
        mapped = (lay.v_end - lay.virt_base) >> PAGE_SHIFT
        self.spare: list[int] = list(dom.p2m[mapped:])

    @property
    def domid(self) -> int:
        return self.dom.domid

    # -- what the guest can write ---------------------------------------------------------------
    def write_grant(self, ref: int, flags: int, domid: int, frame: int) -> None:
        """The guest writes entry `ref` of its own grant table (any value)."""
        self.dom.grants.write_entry(ref, flags, domid, frame & 0xFFFFFFFF)

    def grant_flags(self, ref: int) -> int:
        return self.dom.grants.read_entry(ref)[0]

    # -- hypercalls ---------------------------------------------------------------------------------
    def _args(self, data: bytes, off: int = 0) -> int:
        assert off + len(data) <= PAGE_SIZE
        self.v.copy_to_guest(self.args_va + off, data)
        return self.args_va + off

    def mmu_update(self, *reqs: tuple[int, int]) -> tuple[int, int]:
        """Returns (rc, done)."""
        va = self._args(b"".join(MMU_UPDATE.pack(p, v) for p, v in reqs), 64)
        done_va = self._args(bytes(4), 0)
        rc = _call(mmu_ops.do_mmu_update, self.v, va, len(reqs), done_va, DOMID_SELF)
        return rc, int.from_bytes(self.v.copy_from_guest(done_va, 4), "little")

    def mmuext(self, cmd: int, arg1: int = 0, arg2: int = 0) -> int:
        va = self._args(MMUEXT_OP.pack(cmd, arg1, arg2), 64)
        return _call(mmu_ops.do_mmuext_op, self.v, va, 1, 0, DOMID_SELF)

    def map_grant(self, granter: int, ref: int, host_addr: int, readonly: bool = False,
                  flags: int | None = None) -> tuple[int, int]:
        """GNTTABOP_map_grant_ref; returns (status, handle)."""
        if flags is None:
            flags = grants.GNTMAP_host_map | (grants.GNTMAP_readonly if readonly else 0)
        va = self._args(grants.MAP_GRANT_REF.pack(host_addr, flags, ref, granter, 0, 0, 0), 64)
        rc = _call(grants.do_grant_table_op, self.v, grants.GnttabOp.map_grant_ref, va, 1)
        assert rc == 0, rc
        _ha, _f, _r, _d, status, handle, _dev = grants.MAP_GRANT_REF.unpack(self.v.copy_from_guest(va, 32))
        return status, handle

    def unmap_grant(self, handle: int, host_addr: int = 0) -> int:
        va = self._args(grants.UNMAP_GRANT_REF.pack(host_addr, 0, handle, 0), 64)
        rc = _call(grants.do_grant_table_op, self.v, grants.GnttabOp.unmap_grant_ref, va, 1)
        assert rc == 0, rc
        return grants.UNMAP_GRANT_REF.unpack(self.v.copy_from_guest(va, 24))[3]

    def grant_copy(self, src: tuple[int, int, int], dst: tuple[int, int, int], length: int,
                   flags: int) -> int:
        """GNTTABOP_copy of (u, domid, offset) -> (u, domid, offset); returns the status."""
        va = self._args(grants.COPY.pack(src[0], src[1], src[2], dst[0], dst[1], dst[2],
                                         length, flags, 0), 64)
        rc = _call(grants.do_grant_table_op, self.v, grants.GnttabOp.copy, va, 1)
        assert rc == 0, rc
        return grants.COPY.unpack(self.v.copy_from_guest(va, 40))[-1]

    def decrease_reservation(self, *mfns: int) -> int:
        """XENMEM_decrease_reservation; returns extents done."""
        ext = self._args(struct.pack(f"<{len(mfns)}Q", *mfns), 1024)
        arg = self._args(reservation.RESERVATION.pack(ext, len(mfns), 0, 0, DOMID_SELF), 64)
        return _call(reservation.do_memory_op, self.v, reservation.XENMEM_decrease_reservation, arg)

    # -- helpers ----------------------------------------------------------------------------------------
    def l1_of(self, va: int) -> int:
        """Machine address of the L1 entry for `va` in the current kernel tables."""
        return self.hv.pagetables.l1_entry_address(self.v.kernel_root, va)

    def l2_entry(self, va: int) -> int:
        """Machine address of the L2 entry for `va` (walks the validated tables)."""
        mem = self.dom.mem
        table = self.v.kernel_root
        for shift in (39, 30):
            e = mem.read_u64((table << PAGE_SHIFT) + 8 * ((va >> shift) & 0x1FF))
            assert e & _PAGE_PRESENT
            table = (e >> PAGE_SHIFT) & ((1 << 40) - 1)
        return (table << PAGE_SHIFT) + 8 * ((va >> 21) & 0x1FF)

    def free_l2_va(self) -> int:
        """A 2 MiB-aligned VA in the bootstrap L2 whose L2 slot is empty."""
        base = self.lay.virt_base & ~((1 << 21) - 1)
        for i in range(511, 0, -1):
            va = (base & ~((1 << 30) - 1)) + (i << 21)
            if va < self.lay.v_end:
                break
            if not self.dom.mem.read_u64(self.l2_entry(va)) & _PAGE_PRESENT:
                return va
        raise LookupError("no free L2 slot")


def _call(fn, *args) -> int:
    """A handler's return value as the guest sees it (-errno for a refused call)."""
    try:
        rc = fn(*args)
    except HypercallError as e:
        return -int(e.errno)
    except MMUError as e:
        return -int(e.errno)
    return 0 if rc is None else rc


def park(hv: "Hypervisor", kernel: str, memory_mib: int = 4, name: str | None = None) -> Parked:
    """Build a domain whose vCPU never runs (see the module docstring)."""
    img = builder.parse_kernel(kernel)
    domid = hv._next_domid
    hv._next_domid += 1
    dom = Domain(hv, domid, name or f"parked{domid}", memory_mib << 20 >> PAGE_SHIFT)
    hv.domains[domid] = dom
    try:
        lay = builder.build(dom, img, "")
        hv._create_vcpu0(dom, img, lay)
    except BaseException:
        dom.destroy()
        del hv.domains[domid]
        raise
    return Parked(hv, dom, lay)


def destroy(p: Parked) -> None:
    """What the hypervisor does when a domain ends (Hypervisor._run_domain's teardown)."""
    p.dom.shutdown()
    try:
        p.dom.destroy()
    finally:
        p.hv.domains.pop(p.domid, None)


def rw(e: int) -> bool:
    return bool(e & _PAGE_RW)
