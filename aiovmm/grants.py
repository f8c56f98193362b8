"""Grant tables, version 1 (Xen's grant_table.c semantics), for guests and host backends.

Each domain's table is an array of 8-byte grant_entry_v1 {flags u16, domid u16, frame u32}
in frames the domain may map writable (GNTTABOP_setup_table hands out their MFNs). A grantee
maps or copies a granted frame only if the entry says GTF_permit_access for exactly that
grantee, and not for writing if GTF_readonly; while mapped, Xen's GTF_reading/GTF_writing
bits are set in the entry, and the frame holds a general reference (cannot be freed) and, for
writable maps, a writable type reference (cannot become a page table), as in Xen.

The guest may rewrite its entries at any time, so they are read once, at the first pin, into
an ActiveGrant record (Xen's active_grant_entry); mappings, unmaps and the granter's death
use only the record. A grant mapping's L1 entry is registered by machine address in
PageTables.grant_ptes: page-table teardown recognises it there and never drops the grant's
references (they are the grant table's, dropped only by unmap).

Host backends (domid 0, the hypervisor itself) map grants as memoryviews of machine memory:
`GrantTables.host_map(dom, ref, readonly)`.

Every bad reference, domain or offset yields Xen's GNTST_* status in the entry's status field.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import struct
from typing import TYPE_CHECKING, Iterable, Sequence

from .abi import DOMID_SELF, DOMID_XEN, PAGE_SHIFT, PAGE_SIZE, PTE_FRAME_MASK, Errno, _PAGE_ACCESSED, \
    _PAGE_DIRTY, _PAGE_PRESENT, _PAGE_RW, _PAGE_USER, _PAGE_NX, HYPERVISOR_VIRT_END
from .errors import HypercallError
from .memory import NotWritable
from .mmu import MMUError

if TYPE_CHECKING:
    from .domain import Domain
    from .hypervisor import Hypervisor
    from .memory import MachineMemory
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
_U32 = struct.Struct("<I")


class GrantError(Exception):
    def __init__(self, status: GntSt, msg: str = "") -> None:
        super().__init__(msg or status.name)
        self.status = status


class ActiveGrant:
    """Xen's active_grant_entry: the hypervisor's own record of a grant entry in use.

    `frame` is read from the guest's entry ONCE, at the first pin, validated (a frame the
    granter owns) and kept: every later pin, every unmap and the granter's destruction use
    this record, never the guest-writable entry again (the guest may rewrite it at any
    time). One grantee per active entry, as in Xen. `readers`/`writers` count pins (maps and
    copies in progress); `maps` are the grantee's maptrack handles and `host` the host
    backends' mappings that hold the frame's references."""

    __slots__ = ("granter", "ref", "grantee", "frame", "readers", "writers", "maps", "host")

    def __init__(self, granter: int, ref: int, grantee: int, frame: int) -> None:
        self.granter, self.ref, self.grantee, self.frame = granter, ref, grantee, frame
        self.readers = 0
        self.writers = 0
        self.maps: set[int] = set()
        self.host: set["HostMapping"] = set()

    def __repr__(self) -> str:
        return (f"<ActiveGrant d{self.granter} ref {self.ref} -> d{self.grantee} frame {self.frame:#x} "
                f"r{self.readers} w{self.writers} maps {sorted(self.maps)} host {len(self.host)}>")


@dataclasses.dataclass(eq=False)
class Mapping:
    """One entry of a grantee's maptrack: what a handle refers to."""
    act: ActiveGrant
    readonly: bool
    host_addr: int = 0        # guest VA with a host_map mapping (0 = none)
    pte_addr: int = 0         # machine address of the L1 entry we wrote (0 = none/detached)
    device: bool = False

    @property
    def granter(self) -> int:
        return self.act.granter

    @property
    def ref(self) -> int:
        return self.act.ref

    @property
    def mfn(self) -> int:
        return self.act.frame


class GrantTable:
    """The grant table of one domain (granter side, with its active records) and its
    maptrack (grantee side)."""

    def __init__(self, dom: "Domain", max_frames: int = DEFAULT_MAX_FRAMES) -> None:
        self.dom = dom
        self.max_frames = max_frames
        self.frames: list[int] = []
        self.maptrack: dict[int, Mapping] = {}
        self._next_handle = 1
        self.active: dict[int, ActiveGrant] = {}
        # Set when the domain is destroyed: its entry frames are freed, never touched again;
        # the active records live on in the grantees' mappings until they unmap.
        self.dead = False
        self.grow(INITIAL_FRAMES)

    @property
    def in_use(self) -> dict[int, ActiveGrant]:
        """Active entries by reference (compatibility name)."""
        return self.active

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
        """The guest's entry as it is now: for display and tests, never for a decision."""
        return _ENTRY.unpack_from(self.dom.mem.map, self._entry_addr(ref))

    def write_entry(self, ref: int, flags: int, domid: int, frame: int) -> None:
        """Toolstack use (reserved console/xenstore entries)."""
        _ENTRY.pack_into(self.dom.mem.map, self._entry_addr(ref), flags, domid, frame)

    # -- granter side: pin / unpin an entry (Xen's _set_status + active entry) ---------------
    def acquire(self, ref: int, grantee: int, write: bool, recheck_frame: bool = False) -> ActiveGrant:
        """Pin entry `ref` for `grantee` (for writing if `write`) and return its active record.

        First pin: _set_status checks and sets GTF_reading (and GTF_writing) atomically
        (not GTF_permit_access for exactly `grantee`, or GTF_readonly for a write:
        general_error); then the frame is read once and must be one the granter owns
        (bad_page, the flags cleared again) and is recorded. Later pins by the same grantee
        use the record; only the first write pin goes through _set_status again
        (GTF_readonly), as Xen's does. `recheck_frame` (grant copy): that re-read also compares the frame
        with the record (Xen's acquire_grant_for_copy), a mismatch is general_error.

        On every backend data path (one call per packet or segment), hence written flat."""
        if self.dead:
            raise GrantError(GntSt.bad_domain, f"d{self.dom.domid} is destroyed")
        if not 0 <= ref < len(self.frames) * ENTRIES_PER_FRAME:
            raise GrantError(GntSt.bad_gntref, f"grant ref {ref} out of range")
        dom = self.dom
        mem = dom.mem
        addr = (self.frames[ref >> 9] << PAGE_SHIFT) + ((ref & 511) << 3)
        act = self.active.get(ref)
        if act is not None:
            if act.grantee != grantee:
                raise GrantError(GntSt.general_error, f"d{dom.domid} ref {ref} is in use by d{act.grantee}")
            if write and not act.writers:
                self._set_status(addr, ref, grantee, True, True)
                if recheck_frame and _U32.unpack_from(mem.map, addr + 4)[0] != act.frame:
                    self._clear_flags(addr, GTF_writing)
                    raise GrantError(GntSt.general_error, f"d{dom.domid} ref {ref}: frame changed while in use")
        else:
            self._set_status(addr, ref, grantee, write, False)
            # The frame is read once, after the pin, as Xen's map_grant_ref does: an entry
            # rewritten before the pin failed the compare-exchange, one rewritten after it
            # is the guest's own business (it cannot revoke a pinned entry).
            frame = _U32.unpack_from(mem.map, addr + 4)[0]
            if frame >= mem.nr_frames or mem.owner[frame] != dom.domid:
                self._clear_flags(addr, GTF_reading | GTF_writing)
                raise GrantError(GntSt.bad_page, f"granted frame {frame:#x} is not d{dom.domid}'s")
            act = self.active[ref] = ActiveGrant(dom.domid, ref, grantee, frame)
        if write:
            act.writers += 1
        else:
            act.readers += 1
        return act

    def _set_status(self, addr: int, ref: int, grantee: int, write: bool, pinned: bool) -> None:
        """Set GTF_reading (and GTF_writing) in entry `ref` at `addr` by compare-exchange on
        its flags+domid word (Xen's _set_status_v1): an entry not yet `pinned` must be
        GTF_permit_access for exactly `grantee`, a write pin must not find GTF_readonly, and
        both are checked on the very value the exchange replaces, so a guest rewriting or
        revoking the entry between the check and the flag write makes the exchange fail and
        is checked again. Five failed exchanges: the entry is unstable (general_error)."""
        mem = self.dom.mem
        cur = _U32.unpack_from(mem.map, addr)[0]
        for _ in range(5):
            flags = cur & 0xFFFF
            if not pinned and (flags & GTF_type_mask != GTF_permit_access or cur >> 16 != grantee):
                # Xen: an in-range entry that grants nothing to this grantee is general_error;
                # bad_gntref is only for references past the end of the table.
                raise GrantError(GntSt.general_error, f"d{self.dom.domid} ref {ref} is not granted to d{grantee}")
            new = flags | GTF_reading
            if write:
                if flags & GTF_readonly:
                    raise GrantError(GntSt.general_error, f"d{self.dom.domid} ref {ref} is read-only")
                new |= GTF_writing
            prev = mem.cmpxchg32(addr, cur, (cur & 0xFFFF0000) | new)
            if prev == cur:
                return
            cur = prev
        raise GrantError(GntSt.general_error, f"d{self.dom.domid} ref {ref}: shared grant entry is unstable")

    def release(self, act: ActiveGrant, write: bool) -> None:
        """Unpin: the last write pin clears GTF_writing, the last pin GTF_reading and ends
        the record (Xen's unmap_common_complete)."""
        if write:
            act.writers -= 1
        else:
            act.readers -= 1
        if act.writers:
            return
        clear = GTF_writing
        if not act.readers:
            clear |= GTF_reading
            if self.active.get(act.ref) is act:
                del self.active[act.ref]
        if self.dead:                      # its entry frames are freed: the record only
            return
        self._clear_flags((self.frames[act.ref >> 9] << PAGE_SHIFT) + ((act.ref & 511) << 3), clear)

    def _clear_flags(self, addr: int, clear: int) -> None:
        """Xen's gnttab_clear_flags: a locked `and`, so the guest's concurrent update of the
        entry's other flags is kept."""
        self.dom.mem.atomic_and16(addr, ~clear & 0xFFFF)

    # -- grantee side ------------------------------------------------------------------------------
    def new_handle(self, m: Mapping) -> int:
        """A maptrack handle for `m`. The maptrack bound is map_grant's check, made before
        anything is pinned (one place, so a full maptrack leaves no pin behind)."""
        h = self._next_handle
        self._next_handle += 1
        self.maptrack[h] = m
        return h


def _take_frame(mem: "MachineMemory", mfn: int, readonly: bool) -> None:
    """References a mapped granted frame holds: a general reference (the frame cannot be
    freed) and, if writable, a writable type reference (it cannot become a page table)."""
    if not readonly:
        try:
            mem.get_writable(mfn)
        except NotWritable as e:
            raise GrantError(GntSt.general_error, str(e)) from None
    mem.refs[mfn] += 1


def _drop_frame(hv: "Hypervisor", mfn: int, readonly: bool) -> None:
    """Drop what _take_frame took; the last reference on an orphaned frame (its granter
    died while it was mapped) frees it."""
    mem = hv.mem
    if not readonly:
        mem.put_writable(mfn)
    mem.put_ref(mfn)
    if mfn in hv.orphan_frames and not mem.refs[mfn] and not mem.type_count[mfn]:
        del hv.orphan_frames[mfn]
        mem.free([mfn], force=True)


ORPHAN_OWNER = DOMID_XEN


def held_by_others(dom: "Domain") -> set[int]:
    """Frames of dying `dom` that another domain still maps through a grant, from the active
    records (never from the guest's entries); its table is dead since release_all, so the
    set cannot grow. Every Domain has a grant table (Domain.__init__); only the host's
    event table has none, and it never dies."""
    g = dom.grants
    g.dead = True
    return {act.frame for act in g.active.values() if act.maps or act.host}


def release_all(dom: "Domain") -> None:
    """A dying grantee drops every mapping it holds (maptrack), and its table is marked
    dead before the teardown's first pause: no new pin of its grants (map, copy, host
    mapping) from then on, while its tables are taken apart in steps (mmu.py
    teardown_domain_steps; hostile grant_dying_l1). The grantees' unmaps only update the
    records from then on."""
    dom.grants.dead = True
    for handle in list(dom.grants.maptrack):
        try:
            unmap_grant(dom, handle, 0)
        except GrantError as e:
            log.warning("d%d: unmapping handle %d at destroy: %s", dom.domid, handle, e)


def _granter(caller: "Domain", domid: int) -> "Domain":
    d = caller.hypervisor.domain(domid) if domid != DOMID_SELF else caller
    if getattr(d, "grants", None) is None:       # no such domain, or the host (no table)
        raise GrantError(GntSt.bad_domain, f"no domain {domid}")
    return d


def _flush(dom: "Domain") -> None:
    for other in dom.vcpus:
        other.engine.flush_tlb()


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
    if len(caller.grants.maptrack) >= 1 << 16:
        raise GrantError(GntSt.no_space, "maptrack full")
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
    act = granter.grants.acquire(ref, caller.domid, not readonly)
    mfn = act.frame
    try:
        _take_frame(caller.mem, mfn, readonly)
    except GrantError:
        granter.grants.release(act, not readonly)
        raise
    m = Mapping(act, readonly, host_addr if pte_addr else 0, pte_addr, bool(flags & GNTMAP_device_map))
    handle = caller.grants.new_handle(m)
    act.maps.add(handle)
    if pte_addr:
        pte = (mfn << PAGE_SHIFT) | _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED | _PAGE_NX
        if not readonly:
            pte |= _PAGE_RW | _PAGE_DIRTY
        # XENFEAT_gnttab_map_avail_bits: the guest's GNTMAP_guest_avail bits (16+) go into
        # the PTE's available bits 9-11, as Xen's grant_to_pte_flags does.
        pte |= ((flags >> GNTMAP_guest_avail0) & 7) << 9
        caller.mem.write_pte(pte_addr, pte)
        pt.grant_ptes[pte_addr] = (caller.domid, handle)
        _flush(caller)
    return handle, mfn << PAGE_SHIFT


def unmap_grant(caller: "Domain", handle: int, host_addr: int) -> None:
    """GNTTABOP_unmap_grant_ref: the only way a grant mapping's references are dropped."""
    m = caller.grants.maptrack.get(handle)
    if m is None:
        raise GrantError(GntSt.bad_handle, f"unknown grant handle {handle}")
    if host_addr and m.host_addr and host_addr != m.host_addr:
        raise GrantError(GntSt.bad_virt_addr, "host_addr does not match the mapping")
    del caller.grants.maptrack[handle]
    hv = caller.hypervisor
    if m.pte_addr and hv.pagetables.grant_ptes.get(m.pte_addr) == (caller.domid, handle):
        del hv.pagetables.grant_ptes[m.pte_addr]
        caller.mem.write_pte(m.pte_addr, 0)
        _flush(caller)
    act = m.act
    act.maps.discard(handle)
    _drop_frame(hv, act.frame, m.readonly)
    granter = hv.domains.get(act.granter)
    table = granter.grants if granter is not None and granter.grants is not None else None
    if table is not None:                  # dead or alive: release decides what it may touch
        table.release(act, not m.readonly)
    else:
        _release_orphaned(act, not m.readonly)


def _release_orphaned(act: ActiveGrant, write: bool) -> None:
    """Unpin a record whose granter is gone (nothing in guest memory to update)."""
    if write:
        act.writers -= 1
    else:
        act.readers -= 1


class HostMapping:
    """A host backend's mapping of a granted frame: `view` is the page (memoryview)."""

    def __init__(self, dom: "Domain", act: ActiveGrant, readonly: bool) -> None:
        self.dom, self.act, self.readonly = dom, act, readonly
        self.ref, self.mfn = act.ref, act.frame
        v = dom.mem.frame(self.mfn)
        self.view = v.toreadonly() if readonly else v
        self.closed = False

    def close(self) -> None:
        """Unmap (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.view.release()
        self.act.host.discard(self)
        hv = self.dom.hypervisor
        _drop_frame(hv, self.mfn, self.readonly)
        # The granter's table, dead or alive (a dead one updates only the record: release).
        self.dom.grants.release(self.act, not self.readonly)
        self.dom.host_mappings.discard(self)
        hv.orphan_host_maps.discard(self)


def host_map(dom: "Domain", ref: int, readonly: bool = False) -> HostMapping:
    """Map grant `ref` of `dom` for a host backend (grantee domid 0). Raises GrantError."""
    act = dom.grants.acquire(ref, HOST_DOMID, not readonly)
    try:
        _take_frame(dom.mem, act.frame, readonly)
    except GrantError:
        dom.grants.release(act, not readonly)
        raise
    hm = HostMapping(dom, act, readonly)
    act.host.add(hm)
    dom.host_mappings.add(hm)
    return hm


def frame_written(dom: "Domain", addr: int, length: int) -> None:
    """The hypervisor wrote `length` bytes at machine address `addr` of a frame of `dom`:
    its vCPUs drop their translations of those bytes, so code the guest ran from the frame
    before runs as the new bytes next time, as on Xen (an emulated vCPU otherwise keeps
    running the old ones: it sees only its own stores). Every host write into a guest frame
    through a grant or by frame number (host_copy_to, grant_copy) calls this (or
    ranges_written / frames_written); engines that run the bytes in memory (KVM) have
    nothing to drop."""
    ranges_written(dom, ((addr, length),))


def ranges_written(dom: "Domain", written: "Iterable[tuple[int, int]]") -> None:
    """frame_written for each (addr, length) of a batch (one packet's grant copies), the
    engines looked up once; `written` is consumed only if some vCPU's engine keeps
    translations."""
    drops = _code_droppers(dom)
    if not drops:
        return
    for addr, length in written:
        for drop in drops:
            drop(addr, addr + length)


def frames_written(dom: "Domain", mfns: Iterable[int]) -> None:
    """frame_written for whole frames (a block READ's pages), each once. `mfns` is consumed
    only if some vCPU's engine keeps translations: on KVM nothing is done per frame (a 1 MiB
    read is 256 of them; ~2 us each in Python was a tenth of blkback's CPU per request)."""
    drops = _code_droppers(dom)
    if not drops:
        return
    for mfn in set(mfns):
        a = mfn << PAGE_SHIFT
        for drop in drops:
            drop(a, a + PAGE_SIZE)


def _code_droppers(dom: "Domain") -> list:
    """The vCPU engines' code_written methods (translating engines: Unicorn), or []."""
    return [d for v in dom.vcpus if (d := getattr(v.engine, "code_written", None)) is not None]


def host_copy_from(dom: "Domain", ref: int, offset: int, length: int) -> bytes:
    """A host backend reads `length` bytes at `offset` of grant `ref` (like GNTTABOP_copy
    from a gref: the entry must permit domid 0; the range must stay inside the page)."""
    out = bytearray()
    host_copy_from_many(dom, ((ref, offset, length),), out)
    return bytes(out)


def host_copy_from_many(dom: "Domain", segs: "Sequence[tuple[int, int, int]]", out: bytearray) -> None:
    """A host backend reads a batch of (ref, offset, length) pieces of `dom`'s grants and
    appends them to `out` in order (netback's tx: one packet's slots). All or nothing: every
    piece's range is checked and its grant pinned (GrantTable.acquire, the one check of an
    entry, with the frame re-check of a grant copy) before a byte is copied; the first
    refusal unpins what the batch had pinned and raises its GrantError with `out`
    unchanged. Then each piece is copied once, straight from the frame its pin recorded
    (what the guest writes into its entries meanwhile is not read again), into `out`, and
    the pins are dropped."""
    g = dom.grants
    acquire = g.acquire
    acts = []
    try:
        for ref, offset, length in segs:
            if offset < 0 or length < 0 or offset + length > PAGE_SIZE:
                raise GrantError(GntSt.bad_copy_arg, f"offset {offset} + length {length} crosses the page")
            acts.append(acquire(ref, HOST_DOMID, False, True))    # recheck_frame
    except GrantError:
        for act in acts:
            g.release(act, False)
        raise
    view = dom.mem.view
    for act, (_ref, offset, length) in zip(acts, segs):
        a = (act.frame << PAGE_SHIFT) + offset
        out += view[a:a + length]
    for act in acts:
        g.release(act, False)


def host_copy_to(dom: "Domain", ref: int, offset: int, data: bytes | memoryview) -> None:
    """A host backend writes `data` into grant `ref` at `offset` (the entry must permit
    domid 0 writing; the frame takes a writable type for the copy, as GNTTABOP_copy)."""
    err = host_copy_to_many(dom, ((ref, offset, data),))[0]
    if err is not None:
        raise err


def host_copy_to_many(dom: "Domain", segs: "Sequence[tuple[int, int, bytes | memoryview]]") -> "list[GrantError | None]":
    """A host backend writes a batch of (ref, offset, data) pieces into `dom`'s grants
    (netback's rx: one frame's slots), each piece as Xen's GNTTABOP_copy takes the ops of a
    batch, one by one and answered on its own (None, or the GrantError refusing it): its
    range checked, its grant pinned for writing by GrantTable.acquire (the one check of an
    entry, with the frame re-check of a grant copy) and the frame its pin recorded given a
    writable type reference (a page table or other typed frame refuses: general_error),
    then the bytes copied into that frame once and the references dropped. A refused piece
    writes nothing; the others are written. The vCPUs are told of the writes at the end
    (ranges_written)."""
    g = dom.grants
    mem = dom.mem
    acquire, release = g.acquire, g.release
    view = mem.view
    errs: "list[GrantError | None]" = [None] * len(segs)
    written = []
    for k, (ref, offset, data) in enumerate(segs):
        n = len(data)
        if offset < 0 or offset + n > PAGE_SIZE:
            errs[k] = GrantError(GntSt.bad_copy_arg, f"offset {offset} + length {n} crosses the page")
            continue
        try:
            act = acquire(ref, HOST_DOMID, True, True)            # recheck_frame
        except GrantError as e:
            errs[k] = e
            continue
        mfn = act.frame
        try:
            mem.get_writable(mfn)
        except NotWritable as e:
            release(act, True)
            errs[k] = GrantError(GntSt.general_error, str(e))
            continue
        a = (mfn << PAGE_SHIFT) + offset
        view[a:a + n] = data
        written.append((a, n))
        mem.put_writable(mfn)
        release(act, True)
    ranges_written(dom, written)
    return errs


class _CopyBuf:
    """One claimed side of a grant copy (Xen's gnttab_copy_buf): what must be released."""
    __slots__ = ("table", "act", "mfn", "write")

    def __init__(self, table: "GrantTable | None", act: ActiveGrant | None, mfn: int, write: bool) -> None:
        self.table, self.act, self.mfn, self.write = table, act, mfn, write


def _claim(caller: "Domain", u: int, domid: int, is_gref: bool, write: bool) -> _CopyBuf:
    """Resolve one side of a grant copy (Xen's gnttab_copy_claim_buf): pin the grant or
    check the frame, and for the destination take a writable type reference (a page table
    or any other typed frame refuses: general_error)."""
    mem = caller.mem
    if is_gref:
        d = _granter(caller, domid)
        act = d.grants.acquire(u & 0xFFFFFFFF, caller.domid, write, recheck_frame=True)
        buf = _CopyBuf(d.grants, act, act.frame, write)
    else:
        if domid not in (DOMID_SELF, caller.domid):
            raise GrantError(GntSt.permission_denied, "copy by frame number from another domain")
        if not mem.valid_mfn(u) or mem.owner[u] != caller.domid:
            raise GrantError(GntSt.bad_page, f"frame {u:#x} is not the caller's")
        buf = _CopyBuf(None, None, u, write)
    if write:
        try:
            mem.get_writable(buf.mfn)
        except NotWritable as e:
            _unclaim(buf)
            raise GrantError(GntSt.general_error, str(e)) from None
    return buf


def _unclaim(buf: _CopyBuf) -> None:
    """Unpin the grant of a claimed side (the writable type is the caller's to drop)."""
    if buf.act is not None:
        buf.table.release(buf.act, buf.write)


def grant_copy(caller: "Domain", src: tuple, dst: tuple, length: int, flags: int) -> None:
    s_u, s_dom, s_off = src
    d_u, d_dom, d_off = dst
    if s_off + length > PAGE_SIZE or d_off + length > PAGE_SIZE:
        raise GrantError(GntSt.bad_copy_arg, "copy crosses a page boundary")
    mem = caller.mem
    sb = _claim(caller, s_u, s_dom, bool(flags & GNTCOPY_source_gref), False)
    try:
        db = _claim(caller, d_u, d_dom, bool(flags & GNTCOPY_dest_gref), True)
    except GrantError:
        _unclaim(sb)
        raise
    sa = (sb.mfn << PAGE_SHIFT) + s_off
    da = (db.mfn << PAGE_SHIFT) + d_off
    mem.view[da:da + length] = bytes(mem.view[sa:sa + length])
    owner = caller.hypervisor.domain(mem.owner[db.mfn])
    if owner is not None:
        frame_written(owner, da, length)
    mem.put_writable(db.mfn)
    _unclaim(db)
    _unclaim(sb)


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
