"""A frame-table auditor, like Xen's debug audit (audit_domains): recompute every frame's
owner, type, type count and reference count from first principles and compare them with
what the frame table records.

What holds a reference, by the contracts of mmu.py and grants.py:
- a present L1 entry of a validated L1 table: one general reference on its frame, plus one
  writable type reference if RW, on a frame the table's owner owns; except an entry that
  GNTTABOP_map_grant_ref wrote (PageTables.grant_ptes), which holds nothing itself;
- a present L2/L3/L4 entry of a validated table: one type reference on the next-level table
  (or on a same-level table for a read-only "linear" entry; a self entry holds nothing);
- a pin and each vCPU root (kernel and user L4): one type reference;
- a grantee's grant mapping (maptrack) and a host backend's mapping: one general reference
  on the active record's frame, plus a writable type reference if writable;
- Xen's shared frames of a domain (shared_info, grant-table frames): one writable type
  reference for the domain's lifetime;
- a dying domain's teardown in progress (mmu.Teardown): one type reference on each table
  it has yet to devalidate (`pending`); a table it devalidated by force while still
  referenced (`unvalidated`) is typed but its entries hold nothing.

A validated table is one the frame table says is (type L1-L4, count > 0): its recomputed
count must then be non-zero too, so a table nothing reaches any more is reported. Also
checked: grant records against maptracks and PTEs, frame ownership, orphans (frames of dead
granters still mapped) and that every frame is free, Xen's, a live or dying domain's or an
orphan. A dying domain (destroyed, its teardown under way in steps: Domain.destroy_preemptible)
holds what its tables, grants and frames still hold; it has no vCPUs left. So the audit may
run at any turn of the loop.

`audit(hv)` returns a list of human-readable discrepancies (empty = consistent). It reads
only hypervisor state and validated tables; it changes nothing. Cost: one pass over machine
memory's frame table plus 512 entries per validated table (tests and bench only).
"""
from __future__ import annotations

import struct
from collections import Counter
from itertools import compress
from typing import TYPE_CHECKING

from .abi import (DOMID_INVALID, DOMID_XEN, PAGE_SHIFT, PTE_FRAME_MASK, XEN_L4_FIRST, XEN_L4_LAST,
                  _PAGE_PRESENT, _PAGE_RW)
from .memory import PageType

if TYPE_CHECKING:
    from .hypervisor import Hypervisor

_Q512 = struct.Struct("<512Q")
_PT = {PageType.l1: 1, PageType.l2: 2, PageType.l3: 3, PageType.l4: 4}


def audit(hv: "Hypervisor") -> list[str]:
    mem = hv.mem
    pt = hv.pagetables
    out: list[str] = []
    refs: Counter[int] = Counter()           # recomputed general references
    writable: Counter[int] = Counter()       # recomputed writable type references
    seg: Counter[int] = Counter()            # recomputed seg_desc type references
    table_refs: Counter[int] = Counter()     # recomputed type references as a table
    table_level: dict[int, int] = {}         # level a reference expects the frame to be

    def want_table(mfn: int, level: int, why: str) -> None:
        table_refs[mfn] += 1
        prev = table_level.setdefault(mfn, level)
        if prev != level:
            out.append(f"frame {mfn:#x} referenced as L{prev} and as L{level} ({why})")

    live = {d.domid: d for d in hv.domains.values() if not d.destroyed}
    # Live and dying (destroyed, teardown under way: what is not yet released is still held).
    holders = dict(hv.domains)
    teardowns = pt.teardowns
    for td in teardowns.values():
        for mfn in td.pending:
            t = mem.type[mfn]
            if t not in _PT or mem.type_count[mfn] != 1:
                out.append(f"frame {mfn:#x} pending devalidation but {PageType(t).name} "
                           f"count {mem.type_count[mfn]}")
                continue
            want_table(mfn, _PT[PageType(t)], "teardown")
    unvalidated = set().union(*(td.unvalidated for td in teardowns.values()))

    # Roots and pins.
    for d in live.values():
        for v in d.vcpus:
            for name, root in (("kernel", v.kernel_root), ("user", v.user_root)):
                if root:
                    want_table(root, 4, f"d{d.domid}v{v.id} {name} root")
        for mfn in d.shared_frames:
            writable[mfn] += 1
        # Frames the hypervisor writes on the domain's behalf hold a writable type for as
        # long as they are registered; installed GDT/LDT frames hold a seg_desc type.
        for v in d.vcpus:
            if v.info_frame:
                writable[v.info_frame] += 1
            for mfn in list(v.gdt_frames) + list(v.ldt_shadow.values()):
                seg[mfn] += 1
        if getattr(d, "pirq_eoi_mfn", 0):
            writable[d.pirq_eoi_mfn] += 1
    frames = range(mem.nr_frames)
    for mfn in compress(frames, mem.pinned):
        if True:
            t = mem.type[mfn]
            if t not in _PT or not mem.type_count[mfn]:
                out.append(f"frame {mfn:#x} pinned but {PageType(t).name} count {mem.type_count[mfn]}")
                continue
            want_table(mfn, _PT[PageType(t)], "pin")

    # Entries of every validated table.
    grant_ptes = pt.grant_ptes
    owners, types, nr = mem.owner, mem.type, mem.nr_frames
    for mfn in compress(frames, mem.type_count):
        t = types[mfn]
        if t not in _PT:
            continue
        level = _PT[PageType(t)]
        owner = owners[mfn]
        if mfn in unvalidated:
            continue                          # devalidated by its teardown: entries hold nothing
        if owner not in holders:
            out.append(f"validated L{level} table {mfn:#x} owned by d{owner}, not a live or dying domain")
        base = mfn << PAGE_SHIFT
        for i, e in enumerate(_Q512.unpack_from(mem.map, base)):
            if not e & _PAGE_PRESENT:
                continue
            if level == 4 and XEN_L4_FIRST <= i <= XEN_L4_LAST:
                continue
            target = (e & PTE_FRAME_MASK) >> PAGE_SHIFT
            if target >= nr:
                out.append(f"L{level} {mfn:#x}[{i}] maps non-RAM frame {target:#x}")
                continue
            if level == 1:
                if base + 8 * i in grant_ptes:
                    continue                  # checked with the grant mappings below
                if owners[target] != owner:
                    out.append(f"L1 {mfn:#x}[{i}] (d{owner}) maps frame {target:#x} owned by d{owners[target]}")
                refs[target] += 1
                if e & _PAGE_RW:
                    writable[target] += 1
                continue
            where = f"L{level} {mfn:#x}[{i}]"
            if target == mfn:
                if e & _PAGE_RW:
                    out.append(f"{where} is a writable self entry")
                continue
            if owners[target] != owner:
                out.append(f"{where} (d{owner}) points at table {target:#x} owned by d{owners[target]}")
            same = types[target] == t
            want_table(target, level if same else level - 1, where)

    # Grant mappings (guest maptracks and host backends) and the active records.
    pins: Counter[int] = Counter()            # id(act) -> pins the mappings account for
    acts: dict[int, object] = {}

    def count_mapping(act, readonly: bool) -> None:
        """One mapping through an active grant (a guest's or a host backend's): it pins the
        record and holds a reference on the frame, and a writable one a writable type."""
        acts[id(act)] = act
        pins[id(act)] += 1
        refs[act.frame] += 1
        if not readonly:
            writable[act.frame] += 1
    for d in list(holders.values()):
        g = d.grants
        if g is None:
            continue
        for h, m in g.maptrack.items():
            act = m.act
            count_mapping(act, m.readonly)
            if h not in act.maps or act.grantee != d.domid:
                out.append(f"d{d.domid} handle {h}: not recorded in {act!r}")
            if m.pte_addr:
                reg = grant_ptes.get(m.pte_addr)
                if reg is None:
                    # Detached by an implicit unmap, which crashes the grantee.
                    if not d.dying:
                        out.append(f"d{d.domid} handle {h}: PTE {m.pte_addr:#x} detached, domain alive")
                elif reg != (d.domid, h):
                    out.append(f"d{d.domid} handle {h}: PTE {m.pte_addr:#x} registered to {reg}")
                else:
                    e = mem.read_u64(m.pte_addr)
                    if (e & PTE_FRAME_MASK) >> PAGE_SHIFT != act.frame or not e & _PAGE_PRESENT \
                            or bool(e & _PAGE_RW) == m.readonly:
                        out.append(f"d{d.domid} handle {h}: PTE {e:#x} does not map {act.frame:#x} "
                                   f"{'ro' if m.readonly else 'rw'}")
                    table = m.pte_addr >> PAGE_SHIFT
                    if mem.type[table] != PageType.l1 or not mem.type_count[table] or mem.owner[table] != d.domid:
                        out.append(f"d{d.domid} handle {h}: grant PTE in {table:#x}, not a validated L1 of its own")
        for ref, act in g.active.items():
            acts[id(act)] = act
            if act.ref != ref or act.granter != d.domid:
                out.append(f"d{d.domid} active[{ref}] is {act!r}")
            if mem.owner[act.frame] != d.domid and hv.orphan_frames.get(act.frame) != d.domid:
                out.append(f"{act!r}: frame owned by d{mem.owner[act.frame]}")
    # Host backends' mappings: of live and dying granters, and of dead ones (their orphaned
    # frames; a dying granter's are both its own and orphans at its teardown's end).
    host_maps = {id(hm): hm for d in holders.values() for hm in d.host_mappings}
    host_maps.update((id(hm), hm) for hm in hv.orphan_host_maps)
    for hm in host_maps.values():
        act = hm.act
        count_mapping(act, hm.readonly)
        if hm not in act.host:
            out.append(f"d{hm.dom.domid} host mapping of ref {act.ref}: not recorded in {act!r}")
    for ptr, (domid, h) in grant_ptes.items():
        d = holders.get(domid)
        m = d.grants.maptrack.get(h) if d is not None and d.grants is not None else None
        if m is None or m.pte_addr != ptr:
            out.append(f"grant PTE {ptr:#x} registered for d{domid} handle {h}, which has no such mapping")
    for key, act in acts.items():
        if act.readers + act.writers != pins[key]:
            out.append(f"{act!r}: {act.readers + act.writers} pins, {pins[key]} mappings")
        if len(act.maps) + len(act.host) != pins[key]:
            out.append(f"{act!r}: records {len(act.maps) + len(act.host)} users, {pins[key]} found")
        if act.readers < 0 or act.writers < 0:
            out.append(f"{act!r}: negative pin count")
        if act.granter not in holders and hv.orphan_frames.get(act.frame) != act.granter:
            out.append(f"{act!r}: granter gone but frame {act.frame:#x} is not its orphan")

    # Compare with the frame table.
    own_frames: dict[int, int] = {}
    for d in holders.values():
        for mfn in d.frames:
            if mfn in own_frames:
                out.append(f"frame {mfn:#x} in d{own_frames[mfn]} and d{d.domid}")
            own_frames[mfn] = d.domid
            if mem.owner[mfn] != d.domid:
                out.append(f"d{d.domid} lists frame {mfn:#x} owned by d{mem.owner[mfn]}")
    # Every frame something refers to, or the frame table says is referenced or typed.
    cand = set(compress(frames, mem.refs)) | set(compress(frames, mem.type_count))
    cand |= set(compress(frames, mem.type)) | set(compress(frames, mem.pinned))
    cand |= set(refs) | set(writable) | set(table_refs) | set(seg) | set(hv.orphan_frames)
    for mfn, owner in enumerate(mem.owner):
        if owner != DOMID_INVALID and owner != DOMID_XEN and mfn not in own_frames:
            out.append(f"frame {mfn:#x} owned by d{owner}, which is not a live or dying domain: leaked")
    rec_refs, rec_tc, pinned = mem.refs, mem.type_count, mem.pinned
    for mfn in sorted(cand):
        owner = owners[mfn]
        t = types[mfn]
        tc = rec_tc[mfn]
        r = rec_refs[mfn]
        w, tr, sd = writable.get(mfn, 0), table_refs.get(mfn, 0), seg.get(mfn, 0)
        if refs.get(mfn, 0) != r:
            out.append(f"frame {mfn:#x} (d{owner}): {r} references recorded, {refs.get(mfn, 0)} found")
        if w and tr:
            out.append(f"frame {mfn:#x} (d{owner}): {w} writable and {tr} table references")
        if (w > 0) + (tr > 0) + (sd > 0) > 1:
            out.append(f"frame {mfn:#x} (d{owner}): {w} writable, {tr} table and {sd} seg_desc references")
        if w + tr + sd != tc:
            out.append(f"frame {mfn:#x} (d{owner}): {PageType(t).name} count {tc} recorded, {w + tr + sd} found "
                       f"({w} writable, {tr} table, {sd} seg_desc)")
        if tc:
            if w and t != PageType.writable:
                out.append(f"frame {mfn:#x}: writable references but type {PageType(t).name}")
            if sd and t != PageType.seg_desc:
                out.append(f"frame {mfn:#x}: seg_desc references but type {PageType(t).name}")
            if tr and _PT.get(t) != table_level.get(mfn):
                out.append(f"frame {mfn:#x}: table references as L{table_level.get(mfn)} "
                           f"but type {PageType(t).name}")
        elif t != PageType.none:
            out.append(f"frame {mfn:#x}: type {PageType(t).name} with count 0")
        if owner == DOMID_INVALID:
            if tc or r or pinned[mfn]:
                out.append(f"free frame {mfn:#x} still referenced ({r} refs, {PageType(t).name} {tc})")
        elif mfn in hv.orphan_frames:
            if owner != DOMID_XEN:
                out.append(f"orphan {mfn:#x} owned by d{owner}")
            if not r:
                out.append(f"orphan {mfn:#x} (of dead d{hv.orphan_frames[mfn]}) has no reference left: leaked")
    for mfn, frames in mem.released.items():
        d = live.get(mem.owner[mfn])
        if d is None or frames is not d.frames or mfn not in frames:
            out.append(f"released frame {mfn:#x} not among its owner d{mem.owner[mfn]}'s frames")
        if not mem.in_use(mfn):
            out.append(f"released frame {mfn:#x} (d{mem.owner[mfn]}) has no reference left: leaked")
    return out
