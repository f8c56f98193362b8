"""Grant tables, version 1 (Xen's grant_table.c semantics), for guests and host backends.

Each domain's table is an array of 8-byte grant_entry_v1 {flags u16, domid u16, frame u32}
in frames the domain may map writable (GNTTABOP_setup_table hands out their MFNs). A grantee
maps or copies a granted frame only if the entry says GTF_permit_access for exactly that
grantee, and not for writing if GTF_readonly; while mapped, Xen's GTF_reading/GTF_writing
bits are set in the entry, and the frame holds a general reference (cannot be freed) and, for
writable maps, a writable type reference (cannot become a page table), as in Xen.

Host backends (domid 0, the hypervisor itself) map grants as memoryviews of machine memory:
`GrantTables.host_map(dom, ref, readonly)`.

Every bad reference, domain or offset yields Xen's GNTST_* status in the entry's status field.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import struct
from typing import TYPE_CHECKING

from .abi import DOMID_SELF, DOMID_XEN, PAGE_SHIFT, PAGE_SIZE, PTE_FRAME_MASK, Errno, _PAGE_ACCESSED, \
    _PAGE_DIRTY, _PAGE_PRESENT, _PAGE_RW, _PAGE_USER, _PAGE_NX, HYPERVISOR_VIRT_END
from .errors import HypercallError
from .memory import PageType
from .mmu import MMUError

if TYPE_CHECKING:
    from .domain import Domain
    from .vcpu import VCPU

log = logging.getLogger("aiovmm.grants")

HOST_DOMID = 0
ENTRIES_PER_FRAME = PAGE_SIZE // 8
DEFAULT_MAX_FRAMES = 64
INITIAL_FRAMES = 4
GNTTAB_NR_RESERVED_ENTRIES = 8
GNTTAB_RESERVED_CONSOLE, GNTTAB_RESERVED_XENSTORE = 0, 1


class GntSt(enum.IntEnum):
    okay = 0
    general_error = -1
    bad_domain = -2
    bad_gntref = -3
    bad_handle = -4
    bad_virt_addr = -5
    bad_dev_addr = -6
    no_device_space = -7
    permission_denied = -8
    bad_page = -9
    bad_copy_arg = -10
    address_too_big = -11
    eagain = -12
    no_space = -13


class GnttabOp(enum.IntEnum):
    map_grant_ref = 0
    unmap_grant_ref = 1
    setup_table = 2
    dump_table = 3
    transfer = 4
    copy = 5
    query_size = 6
    unmap_and_replace = 7
    set_version = 8
    get_status_frames = 9
    get_version = 10
    swap_grant_ref = 11
    cache_flush = 12


GTF_permit_access, GTF_type_mask = 1, 3
GTF_readonly, GTF_reading, GTF_writing = 4, 8, 16
GNTMAP_device_map, GNTMAP_host_map, GNTMAP_readonly, GNTMAP_application_map, GNTMAP_contains_pte = 1, 2, 4, 8, 16
GNTCOPY_source_gref, GNTCOPY_dest_gref = 1, 2

MAP_GRANT_REF = struct.Struct("<QIIHhIQ")       # host_addr flags ref dom status handle dev_bus_addr (32)
UNMAP_GRANT_REF = struct.Struct("<QQIh2x")       # host_addr dev_bus_addr handle status (24)
SETUP_TABLE = struct.Struct("<H2xIh6xQ")         # dom nr_frames status frame_list (24)
QUERY_SIZE = struct.Struct("<H2xIIh2x")          # dom nr_frames max_nr_frames status (16)
COPY = struct.Struct("<QHH4xQHH4xHHh2x")         # src.u src.dom src.off _ dst.u dst.dom dst.off _ len flags status (40)
GET_VERSION = struct.Struct("<HHI")
_ENTRY = struct.Struct("<HHI")
_U16 = struct.Struct("<H")


class GrantError(Exception):
    def __init__(self, status: GntSt, msg: str = "") -> None:
        super().__init__(msg or status.name)
        self.status = status


@dataclasses.dataclass
class Mapping:
    """One entry of a grantee's maptrack: what a handle refers to."""
    granter: int
    ref: int
    mfn: int
    readonly: bool
    host_addr: int = 0        # guest VA with a host_map mapping (0 = none)
    pte_addr: int = 0         # machine address of the L1 entry we wrote
    device: bool = False


class GrantTable:
    """The grant table of one domain (granter side) and its maptrack (grantee side)."""

    def __init__(self, dom: "Domain", max_frames: int = DEFAULT_MAX_FRAMES) -> None:
        self.dom = dom
        self.max_frames = max_frames
        self.frames: list[int] = []
        self.maptrack: dict[int, Mapping] = {}
        self._next_handle = 1
        self.in_use: dict[int, list[int]] = {}        # ref -> [readers, writers]
        self.grow(INITIAL_FRAMES)

    def grow(self, nr: int) -> None:
        while len(self.frames) < nr:
            mfn = self.dom.add_shared_frame()
            self.frames.append(mfn)

    @property
    def nr_entries(self) -> int:
        return len(self.frames) * ENTRIES_PER_FRAME

    def _entry_addr(self, ref: int) -> int:
        if not 0 <= ref < self.nr_entries:
            raise GrantError(GntSt.bad_gntref, f"grant ref {ref} out of range")
        return (self.frames[ref // ENTRIES_PER_FRAME] << PAGE_SHIFT) + 8 * (ref % ENTRIES_PER_FRAME)

    def read_entry(self, ref: int) -> tuple[int, int, int]:
        return _ENTRY.unpack_from(self.dom.mem.map, self._entry_addr(ref))

    def write_entry(self, ref: int, flags: int, domid: int, frame: int) -> None:
        """Toolstack use (reserved console/xenstore entries)."""
        _ENTRY.pack_into(self.dom.mem.map, self._entry_addr(ref), flags, domid, frame)

    def _set_flags(self, ref: int, set_: int = 0, clear: int = 0) -> None:
        a = self._entry_addr(ref)
        m = self.dom.mem.map
        f = struct.unpack_from("<H", m, a)[0]
        struct.pack_into("<H", m, a, (f | set_) & ~clear & 0xFFFF)

    # -- granter side: acquire / release a use of an entry --------------------------------
    def acquire(self, ref: int, grantee: int, write: bool) -> int:
        """Check entry `ref` permits `grantee` (for writing if `write`); mark it in use
        (GTF_reading, and GTF_writing for a write). Returns the granted MFN.

        On every backend data path (one call per packet or segment), hence written flat."""
        if not 0 <= ref < len(self.frames) * ENTRIES_PER_FRAME:
            raise GrantError(GntSt.bad_gntref, f"grant ref {ref} out of range")
        dom = self.dom
        mem = dom.mem
        addr = (self.frames[ref >> 9] << PAGE_SHIFT) + ((ref & 511) << 3)
        flags, domid, frame = _ENTRY.unpack_from(mem.map, addr)
        if flags & GTF_type_mask != GTF_permit_access or domid != grantee:
            # Xen: an in-range entry that grants nothing to this grantee is general_error;
            # bad_gntref is only for references past the end of the table.
            raise GrantError(GntSt.general_error, f"d{dom.domid} ref {ref} is not granted to d{grantee}")
        if write and flags & GTF_readonly:
            raise GrantError(GntSt.general_error, f"d{dom.domid} ref {ref} is read-only")
        if frame >= mem.nr_frames or mem.owner[frame] != dom.domid:
            raise GrantError(GntSt.bad_page, f"granted frame {frame:#x} is not d{dom.domid}'s")
        use = self.in_use.get(ref)
        if use is None:
            use = self.in_use[ref] = [0, 0]
        use[write] += 1
        new = flags | (GTF_reading | GTF_writing if write else GTF_reading)
        if new != flags:
            _U16.pack_into(mem.map, addr, new)
        return frame

    def release(self, ref: int, write: bool) -> None:
        use = self.in_use.get(ref)
        if not use:
            return
        use[write] -= 1
        clear = 0
        if use[1] == 0:
            clear = GTF_writing
            if use[0] == 0:
                clear |= GTF_reading
                del self.in_use[ref]
        if clear:
            addr = (self.frames[ref >> 9] << PAGE_SHIFT) + ((ref & 511) << 3)
            m = self.dom.mem.map
            f = _U16.unpack_from(m, addr)[0]
            if f & clear:
                _U16.pack_into(m, addr, f & ~clear)

    # -- grantee side ------------------------------------------------------------------------------
    def new_handle(self, m: Mapping) -> int:
        if len(self.maptrack) >= 1 << 16:
            raise GrantError(GntSt.no_space, "maptrack full")
        h = self._next_handle
        self._next_handle += 1
        self.maptrack[h] = m
        return h


def _take_frame(dom: "Domain", mfn: int, readonly: bool) -> None:
    """References a mapped granted frame holds (general ref; writable type if RW)."""
    mem = dom.mem
    if not readonly:
        if mem.type_count[mfn] and mem.type[mfn] != PageType.writable:
            raise GrantError(GntSt.general_error, f"frame {mfn:#x} is a {PageType(mem.type[mfn]).name} page")
        if not mem.type_count[mfn]:
            mem.type[mfn] = PageType.writable
        mem.type_count[mfn] += 1
    mem.refs[mfn] += 1


def _drop_frame(dom: "Domain", mfn: int, readonly: bool) -> None:
    mem = dom.mem
    mem.refs[mfn] -= 1
    if not readonly:
        dom.hypervisor.pagetables.put_type(mfn)
    hv = dom.hypervisor
    if mfn in hv.orphan_frames and mem.refs[mfn] == 0:
        hv.orphan_frames.discard(mfn)
        mem.free([mfn], force=True)


ORPHAN_OWNER = DOMID_XEN


def frames_mapped_by_others(dom: "Domain") -> set[int]:
    """Frames of `dom` that some grantee still maps."""
    held = set()
    for ref in dom.grants.in_use if dom.grants else ():
        _f, _d, frame = dom.grants.read_entry(ref)
        held.add(frame)
    return held


def release_all(dom: "Domain") -> None:
    """A dying grantee drops every mapping it holds (maptrack)."""
    if dom.grants is None:
        return
    for handle in list(dom.grants.maptrack):
        try:
            unmap_grant(dom, handle, 0)
        except GrantError:
            pass


def _granter(caller: "Domain", domid: int) -> "Domain":
    d = caller.hypervisor.domain(domid) if domid != DOMID_SELF else caller
    if d is None or getattr(d, "grants", None) is None:
        raise GrantError(GntSt.bad_domain, f"no domain {domid}")
    return d


GNTMAP_guest_avail0 = 16


def map_grant(v: "VCPU", host_addr: int, flags: int, ref: int, domid: int) -> tuple[int, int]:
    """GNTTABOP_map_grant_ref for a guest grantee. Returns (handle, dev_bus_addr)."""
    caller = v.domain
    if not flags & (GNTMAP_host_map | GNTMAP_device_map):
        raise GrantError(GntSt.bad_gntref, "neither host_map nor device_map")
    if flags & GNTMAP_contains_pte:
        raise GrantError(GntSt.bad_virt_addr, "GNTMAP_contains_pte is not supported")
    granter = _granter(caller, domid)
    if granter is caller:
        raise GrantError(GntSt.bad_domain, "mapping one's own grant")
    readonly = bool(flags & GNTMAP_readonly)
    pte_addr = 0
    pt = caller.hypervisor.pagetables
    if flags & GNTMAP_host_map:
        try:
            pte_addr = pt.l1_entry_address(v.kernel_root, host_addr)
        except MMUError:
            raise GrantError(GntSt.bad_virt_addr, f"no L1 table maps {host_addr:#x}") from None
        if caller.mem.read_u64(pte_addr) & _PAGE_PRESENT:
            raise GrantError(GntSt.bad_virt_addr, f"{host_addr:#x} is already mapped")
    mfn = granter.grants.acquire(ref, caller.domid, not readonly)
    try:
        _take_frame(caller, mfn, readonly)
    except GrantError:
        granter.grants.release(ref, not readonly)
        raise
    if pte_addr:
        pte = (mfn << PAGE_SHIFT) | _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED | _PAGE_NX
        if not readonly:
            pte |= _PAGE_RW | _PAGE_DIRTY
        # XENFEAT_gnttab_map_avail_bits: the guest's GNTMAP_guest_avail bits (16+) go into
        # the PTE's available bits 9-11, as Xen's grant_to_pte_flags does.
        pte |= ((flags >> GNTMAP_guest_avail0) & 7) << 9
        caller.mem.write_u64(pte_addr, pte)
        for other in caller.vcpus:
            other.engine.flush_tlb()
    m = Mapping(granter.domid, ref, mfn, readonly, host_addr if pte_addr else 0, pte_addr,
                bool(flags & GNTMAP_device_map))
    return caller.grants.new_handle(m), mfn << PAGE_SHIFT


def unmap_grant(caller: "Domain", handle: int, host_addr: int) -> None:
    m = caller.grants.maptrack.get(handle)
    if m is None:
        raise GrantError(GntSt.bad_handle, f"unknown grant handle {handle}")
    if host_addr and m.host_addr and host_addr != m.host_addr:
        raise GrantError(GntSt.bad_virt_addr, "host_addr does not match the mapping")
    del caller.grants.maptrack[handle]
    if m.pte_addr:
        cur = caller.mem.read_u64(m.pte_addr)
        if (cur & PTE_FRAME_MASK) >> PAGE_SHIFT == m.mfn and cur & _PAGE_PRESENT:
            caller.mem.write_u64(m.pte_addr, 0)
        for other in caller.vcpus:
            other.engine.flush_tlb()
    _drop_frame(caller, m.mfn, m.readonly)
    granter = caller.hypervisor.domain(m.granter)
    if granter is not None and hasattr(granter, "grants"):
        granter.grants.release(m.ref, not m.readonly)


class HostMapping:
    """A host backend's mapping of a granted frame: `view` is the page (memoryview)."""

    def __init__(self, dom: "Domain", ref: int, mfn: int, readonly: bool) -> None:
        self.dom, self.ref, self.mfn, self.readonly = dom, ref, mfn, readonly
        v = dom.mem.frame(mfn)
        self.view = v.toreadonly() if readonly else v
        self.closed = False

    def close(self) -> None:
        """Unmap (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.view.release()
        mem = self.dom.mem
        if self.dom.grants is not None and not self.dom.destroyed:
            mem.refs[self.mfn] -= 1
            if not self.readonly:
                self.dom.hypervisor.pagetables.put_type(self.mfn)
            self.dom.grants.release(self.ref, not self.readonly)
        self.dom.host_mappings.discard(self)


def host_map(dom: "Domain", ref: int, readonly: bool = False) -> HostMapping:
    """Map grant `ref` of `dom` for a host backend (grantee domid 0). Raises GrantError."""
    mfn = dom.grants.acquire(ref, HOST_DOMID, not readonly)
    try:
        _take_frame(dom, mfn, readonly)
    except GrantError:
        dom.grants.release(ref, not readonly)
        raise
    hm = HostMapping(dom, ref, mfn, readonly)
    dom.host_mappings.add(hm)
    return hm


def host_copy_from(dom: "Domain", ref: int, offset: int, length: int) -> bytes:
    """A host backend reads `length` bytes at `offset` of grant `ref` (like GNTTABOP_copy
    from a gref: the entry must permit domid 0; the range must stay inside the page)."""
    if offset < 0 or length < 0 or offset + length > PAGE_SIZE:
        raise GrantError(GntSt.bad_copy_arg, f"offset {offset} + length {length} crosses the page")
    g = dom.grants
    mfn = g.acquire(ref, HOST_DOMID, False)
    a = (mfn << PAGE_SHIFT) + offset
    data = bytes(dom.mem.view[a:a + length])
    g.release(ref, False)
    return data


def host_copy_to(dom: "Domain", ref: int, offset: int, data: bytes | memoryview) -> None:
    """A host backend writes `data` into grant `ref` at `offset` (the entry must permit
    domid 0 writing)."""
    n = len(data)
    if offset < 0 or offset + n > PAGE_SIZE:
        raise GrantError(GntSt.bad_copy_arg, f"offset {offset} + length {n} crosses the page")
    g = dom.grants
    mfn = g.acquire(ref, HOST_DOMID, True)
    mem = dom.mem
    if mem.type_count[mfn] and mem.type[mfn] != PageType.writable:
        g.release(ref, True)
        raise GrantError(GntSt.bad_page, f"granted frame {mfn:#x} is a {PageType(mem.type[mfn]).name} page")
    a = (mfn << PAGE_SHIFT) + offset
    mem.view[a:a + n] = data
    g.release(ref, True)


def _copy_side(caller: "Domain", u: int, domid: int, off: int, length: int, is_gref: bool,
               write: bool) -> tuple["Domain", int, int | None]:
    """Resolve one side of a grant copy to (domain, machine address, ref-if-acquired)."""
    if off + length > PAGE_SIZE:
        raise GrantError(GntSt.bad_copy_arg, "copy crosses a page boundary")
    if is_gref:
        d = _granter(caller, domid)
        mfn = d.grants.acquire(u & 0xFFFFFFFF, caller.domid, write)
        return d, (mfn << PAGE_SHIFT) + off, u & 0xFFFFFFFF
    if domid not in (DOMID_SELF, caller.domid):
        raise GrantError(GntSt.permission_denied, "copy by frame number from another domain")
    mem = caller.mem
    if not mem.valid_mfn(u) or mem.owner[u] != caller.domid:
        raise GrantError(GntSt.bad_page, f"frame {u:#x} is not the caller's")
    if write and mem.type_count[u] and mem.type[u] != PageType.writable:
        raise GrantError(GntSt.bad_page, f"frame {u:#x} is a {PageType(mem.type[u]).name} page")
    return caller, (u << PAGE_SHIFT) + off, None


def grant_copy(caller: "Domain", src: tuple, dst: tuple, length: int, flags: int) -> None:
    s_u, s_dom, s_off = src
    d_u, d_dom, d_off = dst
    sd, sa, sref = _copy_side(caller, s_u, s_dom, s_off, length, bool(flags & GNTCOPY_source_gref), False)
    try:
        dd, da, dref = _copy_side(caller, d_u, d_dom, d_off, length, bool(flags & GNTCOPY_dest_gref), True)
    except GrantError:
        if sref is not None:
            sd.grants.release(sref, False)
        raise
    mem = caller.mem
    mem.view[da:da + length] = mem.view[sa:sa + length]
    if sref is not None:
        sd.grants.release(sref, False)
    if dref is not None:
        dd.grants.release(dref, True)


# ------------------------------------------------------------------- the hypercall (#20)
def do_grant_table_op(v: "VCPU", cmd: int, ops: int, count: int, *_) -> int:
    dom = v.domain
    count &= 0xFFFFFFFF
    if count > 4096:
        raise HypercallError(Errno.EINVAL)
    if cmd in (GnttabOp.setup_table, GnttabOp.query_size) and count != 1:
        raise HypercallError(Errno.EINVAL)
    if cmd == GnttabOp.map_grant_ref:
        for i in range(count):
            va = ops + MAP_GRANT_REF.size * i
            host_addr, flags, ref, gdom, _st, _h, _dev = v.read_struct(va, MAP_GRANT_REF)
            try:
                handle, dev = map_grant(v, host_addr, flags, ref, gdom)
                v.copy_to_guest(va + 18, struct.pack("<hIQ", GntSt.okay, handle, dev))
            except GrantError as e:
                v.copy_to_guest(va + 18, struct.pack("<h", e.status))
        return 0
    if cmd == GnttabOp.unmap_grant_ref:
        for i in range(count):
            va = ops + UNMAP_GRANT_REF.size * i
            host_addr, _dev, handle, _st = v.read_struct(va, UNMAP_GRANT_REF)
            try:
                unmap_grant(dom, handle, host_addr)
                st = GntSt.okay
            except GrantError as e:
                st = e.status
            v.copy_to_guest(va + 20, struct.pack("<h", st))
        return 0
    if cmd == GnttabOp.setup_table:
        gdom, nr, _st, frame_list = v.read_struct(ops, SETUP_TABLE)
        if gdom not in (DOMID_SELF, dom.domid):
            st = GntSt.bad_domain if dom.hypervisor.domain(gdom) is None else GntSt.permission_denied
        elif nr > dom.grants.max_frames:
            st = GntSt.general_error
        else:
            dom.grants.grow(nr)
            v.copy_to_guest(frame_list, struct.pack(f"<{nr}Q", *dom.grants.frames[:nr])) if nr else None
            st = GntSt.okay
        v.copy_to_guest(ops + 8, struct.pack("<h", st))
        return 0
    if cmd == GnttabOp.query_size:
        gdom, *_ = v.read_struct(ops, QUERY_SIZE)
        if gdom not in (DOMID_SELF, dom.domid):
            v.copy_to_guest(ops + 12, struct.pack("<h", GntSt.bad_domain if dom.hypervisor.domain(gdom) is None
                                                  else GntSt.permission_denied))
            return 0
        v.copy_to_guest(ops + 4, struct.pack("<IIh", len(dom.grants.frames), dom.grants.max_frames, GntSt.okay))
        return 0
    if cmd == GnttabOp.copy:
        for i in range(count):
            va = ops + COPY.size * i
            s_u, s_dom, s_off, d_u, d_dom, d_off, length, flags, _st = v.read_struct(va, COPY)
            try:
                grant_copy(dom, (s_u, s_dom, s_off), (d_u, d_dom, d_off), length, flags)
                st = GntSt.okay
            except GrantError as e:
                st = e.status
            v.copy_to_guest(va + 36, struct.pack("<h", st))
        return 0
    if cmd == GnttabOp.set_version:
        # Xen with grant v2 disabled (max_version 1): 1 is a no-op, 2 is -ENOSYS ("behave as
        # before set_version was introduced"), others -EINVAL; the version in force is
        # written back in every case.
        version = int.from_bytes(v.copy_from_guest(ops, 4), "little")
        rc = 0 if version == 1 else -Errno.ENOSYS if version == 2 else -Errno.EINVAL
        v.copy_to_guest(ops, (1).to_bytes(4, "little"))
        return rc
    if cmd == GnttabOp.get_status_frames:
        if count != 1:
            raise HypercallError(Errno.EINVAL)
        nr_frames, gdom, _st, frame_list = struct.unpack("<IHhQ", v.copy_from_guest(ops, 16))
        end = frame_list + 8 * nr_frames
        if not (end <= 1 << 47 or frame_list >= HYPERVISOR_VIRT_END) or end > 1 << 64:
            raise HypercallError(Errno.EFAULT)
        if gdom != DOMID_SELF and dom.hypervisor.domain(gdom) is None:
            st = GntSt.bad_domain
        elif gdom not in (DOMID_SELF, dom.domid):
            st = GntSt.permission_denied
        else:
            # A v1 table has no status frames: any request for one is a general error.
            st = GntSt.okay if nr_frames == 0 else GntSt.general_error
        v.copy_to_guest(ops + 6, struct.pack("<h", st))
        return 0
    if cmd == GnttabOp.get_version:
        gdom = int.from_bytes(v.copy_from_guest(ops, 2), "little")
        if gdom not in (DOMID_SELF, dom.domid):
            raise HypercallError(Errno.EPERM)
        v.copy_to_guest(ops + 4, (1).to_bytes(4, "little"))
        return 0
    raise HypercallError(Errno.ENOSYS)
