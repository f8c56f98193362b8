"""A stateful fuzzer (hypothesis RuleBasedStateMachine) over grants and the PV MMU, with the
frame-table auditor (aiovmm.audit) run after every step.

Two or three parked domains (aiovmm.lab) in one Hypervisor do what guests can do: write
their own grant entries (any value, also while in use), map and unmap grants, copy by
reference and by frame, pin and unpin tables, hook tables into their L2, write L1 entries,
switch base pointers, free frames and be destroyed (a new domain takes the place). A domain
the hypervisor crashes (e.g. an implicit unmap of a granted PTE) is torn down as the
hypervisor would. Every step must leave the frame table exactly as the auditor recomputes
it; at the end all domains are destroyed and every frame must be free again.

Used by tests/test_audit_fuzz.py (bounded) and bench/audit_fuzz.py (long runs).
"""
from __future__ import annotations

import asyncio
from collections import Counter

from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

from . import lab
from .abi import DOMID_SELF, PAGE_SHIFT, XEN_L4_FIRST, XEN_L4_LAST, MmuExt, _PAGE_ACCESSED, _PAGE_PRESENT, _PAGE_RW, _PAGE_USER
from .audit import audit
from .grants import GNTCOPY_dest_gref, GNTCOPY_source_gref, GTF_permit_access, GTF_readonly, GntSt
from .hypervisor import Hypervisor
from .memory import PageType

POOL = 6                      # spare frames per domain the fuzzer plays with
REFS = 4                      # grant refs 8..11
ENTRY = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED
HV_MIB = 24
DOM_MIB = 5

i_dom = st.integers(0, 2)
i_frame = st.integers(0, POOL - 1)
i_ref = st.integers(0, REFS - 1)
i_slot = st.integers(0, 7)


class GrantMachine(RuleBasedStateMachine):
    """See the module docstring. `kernel` is set by the user (a built PV kernel ELF)."""

    kernel: str = ""
    # Outcomes over all examples (bench/audit_fuzz.py prints them: is the fuzzer reaching
    # the interesting states?).
    stats: Counter = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.hv = Hypervisor(memory_mib=HV_MIB)
        self._do(self.hv.__aenter__())
        self.start_free = self.hv.mem.free_frames
        self.doms: list[lab.Parked | None] = [None, None, None]
        self.handles: list[tuple[int, int, int]] = []        # (grantee domid, handle, va)
        self.alt_l4: dict[int, int] = {}                      # domid -> prepared other L4
        for i in range(2):
            self._new(i)

    # -- plumbing ---------------------------------------------------------------------------------
    def _do(self, coro):
        return self.loop.run_until_complete(coro)

    def _sync(self, fn, *args):
        async def step():
            return fn(*args)
        return self._do(step())

    def _new(self, i: int) -> None:
        def make() -> None:
            p = lab.park(self.hv, self.kernel, DOM_MIB)
            # The map area: an L1 (pool[0]) hooked into a free L2 slot; grants go at slot*4K.
            p.map_va = p.free_l2_va()
            assert p.mmu_update((p.l2_entry(p.map_va), (p.spare[0] << PAGE_SHIFT) | ENTRY | _PAGE_RW))[0] == 0
            self.doms[i] = p
        self._sync(make)

    def _dom(self, i: int) -> lab.Parked | None:
        """The i-th live domain (modulo how many are alive)."""
        live = [p for p in self.doms if p is not None and not p.dom.destroyed]
        return live[i % len(live)] if live else None

    def _reap(self) -> None:
        """Destroy domains the hypervisor crashed, as _run_domain's teardown would."""
        for i, p in enumerate(self.doms):
            if p is not None and p.dom.dying and not p.dom.destroyed:
                self.stats[f"crashed: {p.dom.crash_reason.split(' at ')[0]}"] += 1
                lab.destroy(p)
                self.handles = [h for h in self.handles if h[0] != p.domid]
                self.doms[i] = None

    def _frame(self, p: lab.Parked, k: int) -> int:
        return p.spare[k]

    # -- rules -----------------------------------------------------------------------------------------
    grants = Bundle("grants")

    @rule(target=grants, g=i_dom, grantee=i_dom, r=i_ref, k=i_frame, ro=st.booleans())
    def grant(self, g, grantee, r, k, ro):
        """A well-formed grant of a pool frame to another live domain (or to itself, which
        only copies may use). Returns (granter domid, ref, grantee domid)."""
        p, q = self._dom(g), self._dom(g + grantee)    # grantee: 0 = itself, else another
        if grantee and q is p:
            q = self._dom(g + 1)
        if p is None or q is None:
            return (0, 8 + r, 0)
        p.write_grant(8 + r, GTF_permit_access | (GTF_readonly if ro else 0), q.domid, self._frame(p, k))
        return (p.domid, 8 + r, q.domid)

    def _by_domid(self, domid: int) -> lab.Parked | None:
        return next((d for d in self.doms if d is not None and d.domid == domid and not d.dom.destroyed), None)

    @rule(target=grants, g=i_dom, grantee=st.integers(1, 2), r=i_ref, k=i_frame, ro=st.booleans(),
          slot=i_slot, map_ro=st.booleans())
    def grant_and_map(self, g, grantee, r, k, ro, slot, map_ro):
        """A grant, mapped at once by its grantee (the common way to reach mapped states)."""
        gr = self.grant(g, grantee, r, k, ro)
        self.map_granted(gr, slot, map_ro)
        return gr

    @rule(gr=grants, slot=i_slot, ro=st.booleans())
    def map_granted(self, gr, slot, ro):
        gd, ref, ge = gr
        p, q = self._by_domid(ge), self._by_domid(gd)
        if p is None or q is None:
            return
        va = p.map_va + slot * 4096

        def go():
            st_, h = p.map_grant(q.domid, ref, va, ro)
            self.stats[f"map granted {GntSt(st_).name}"] += 1
            if st_ == GntSt.okay:
                self.handles.append((p.domid, h, va))
        self._sync(go)

    @rule(gr=grants, k=i_frame, to_gref=st.booleans(), off=st.sampled_from([0, 8, 4088]))
    def copy_granted(self, gr, k, to_gref, off):
        """The grantee copies between the grant and a pool frame of its own."""
        gd, ref, ge = gr
        p, q = self._by_domid(ge), self._by_domid(gd)
        if p is None or q is None:
            return
        own = (self._frame(p, k), DOMID_SELF, off)
        g = (ref, q.domid, off)
        src, dst, fl = (own, g, GNTCOPY_dest_gref) if to_gref else (g, own, GNTCOPY_source_gref)
        st_ = self._sync(p.grant_copy, src, dst, 8, fl)
        self.stats[f"copy granted {GntSt(st_).name}"] += 1

    @rule(gr=grants, field=st.sampled_from(["frame", "flags", "domid", "all"]), k=i_frame,
          junk=st.sampled_from([None, 0, 0xFFFFFFFF]))
    def rewrite(self, gr, field, k, junk):
        """The granter rewrites a (maybe in-use) entry, one field or all."""
        gd, ref, _ge = gr
        p = self._by_domid(gd)
        if p is None:
            return
        fl, dm, fr = p.dom.grants.read_entry(ref)
        new = self._frame(p, k) if junk is None else junk
        if field == "frame":
            fr = new
        elif field == "flags":
            fl = (new ^ fl) & 0xFFFF
        elif field == "domid":
            dm = new & 0xFFFF
        else:
            fl, dm, fr = 0xFFFF, 0xFFFF, 0xFFFFFFFF
        p.write_grant(ref, fl, dm, fr)

    @rule(gr=grants, field=st.sampled_from(["frame", "flags", "domid", "all", "none"]), k=i_frame,
          junk=st.sampled_from([None, 0, 0xFFFFFFFF]))
    def granter_dies(self, gr, field, k, junk):
        """The granter rewrites a grant (maybe in use) and dies (findings 3 and 7)."""
        gd = gr[0]
        p = self._by_domid(gd)
        if p is None:
            return
        if field != "none":
            self.rewrite(gr, field, k, junk)
        self._destroy(p)

    @rule(a=i_dom, level=st.integers(1, 4), r=i_ref, slot=st.integers(0, 511), k=i_frame)
    def copy_into_own_table(self, a, level, r, slot, k):
        """Finding 1: self-grant of a live page table of its own, copy a PTE into it."""
        p = self._dom(a)
        if p is None:
            return
        mem = self.hv.mem
        table, va = p.v.kernel_root, p.map_va
        for shift in (39, 30, 21)[:4 - level]:
            e = mem.read_u64((table << PAGE_SHIFT) + 8 * ((va >> shift) & 0x1FF))
            if not e & _PAGE_PRESENT:
                return
            table = (e >> PAGE_SHIFT) & ((1 << 40) - 1)
        data = self._frame(p, k)
        if mem.type[data] not in (PageType.none, PageType.writable):
            return                    # the guest can write only its untyped or writable frames
        p.write_grant(8 + r, GTF_permit_access, p.domid, table)
        mem.write_u64(data << PAGE_SHIFT, (data << PAGE_SHIFT) | ENTRY | _PAGE_RW)
        st_ = self._sync(p.grant_copy, (data, DOMID_SELF, 0), (8 + r, DOMID_SELF, 8 * slot), 8,
                         GNTCOPY_dest_gref)
        self.stats[f"copy into own L{level} {GntSt(st_).name}"] += 1

    @rule(g=i_dom, r=i_ref, flags=st.integers(0, 0xFFFF))
    def scribble_flags(self, g, r, flags):
        p = self._dom(g)
        if p is not None:
            e = p.dom.grants.read_entry(8 + r)
            p.write_grant(8 + r, flags, e[1], e[2])

    @rule(n=st.integers(0, 31), with_va=st.booleans())
    def unmap(self, n, with_va):
        if not self.handles:
            return
        domid, h, va = self.handles[n % len(self.handles)]
        p = next((d for d in self.doms if d is not None and d.domid == domid), None)
        if p is None or p.dom.destroyed:
            return
        st_ = self._sync(p.unmap_grant, h, va if with_va else 0)
        self.stats[f"unmap {GntSt(st_).name}"] += 1
        if st_ == GntSt.okay:
            self.handles.remove((domid, h, va))

    @rule(a=i_dom, sg=st.booleans(), dg=st.booleans(), sdom=i_dom, ddom=i_dom, sref=i_ref,
          dref=i_ref, sk=i_frame, dk=i_frame, off=st.sampled_from([0, 8, 4088, 4090]),
          length=st.sampled_from([0, 8, 64]))
    def copy(self, a, sg, dg, sdom, ddom, sref, dref, sk, dk, off, length):
        p = self._dom(a)
        if p is None:
            return
        sp, dp = self._dom(sdom) or p, self._dom(ddom) or p
        src = (8 + sref, sp.domid, off) if sg else (self._frame(p, sk), DOMID_SELF, off)
        dst = (8 + dref, dp.domid, 0) if dg else (self._frame(p, dk), DOMID_SELF, 0)
        st_ = self._sync(p.grant_copy, src, dst, length,
                         (GNTCOPY_source_gref if sg else 0) | (GNTCOPY_dest_gref if dg else 0))
        self.stats[f"copy {GntSt(st_).name}"] += 1

    @rule(a=i_dom, k=i_frame, level=st.integers(1, 4))
    def pin(self, a, k, level):
        p = self._dom(a)
        if p is not None:
            rc = self._sync(p.mmuext, MmuExt.PIN_L1_TABLE + level - 1, self._frame(p, k))
            self.stats[f"pin L{level} {rc}"] += 1

    @rule(a=i_dom, k=i_frame)
    def unpin(self, a, k):
        p = self._dom(a)
        if p is not None:
            self._sync(p.mmuext, MmuExt.UNPIN_TABLE, self._frame(p, k))

    @rule(a=i_dom, k=i_frame, slot=i_slot, to=i_frame, rw=st.booleans(), present=st.booleans())
    def write_pte(self, a, k, slot, to, rw, present):
        """mmu_update of entry `slot` of pool frame k (whatever it is now) -> pool frame."""
        p = self._dom(a)
        if p is None:
            return
        val = ((self._frame(p, to) << PAGE_SHIFT) | ENTRY | (_PAGE_RW if rw else 0)) if present else 0
        self._sync(p.mmu_update, ((self._frame(p, k) << PAGE_SHIFT) + 8 * slot, val))

    @rule(a=i_dom, k=st.one_of(st.none(), i_frame))
    def hook_l2(self, a, k):
        """Point the map area's L2 slot at pool frame k (None: unhook)."""
        p = self._dom(a)
        if p is None:
            return
        val = 0 if k is None else (self._frame(p, k) << PAGE_SHIFT) | ENTRY | _PAGE_RW
        self._sync(p.mmu_update, (p.l2_entry(p.map_va), val))

    @rule(a=i_dom, back=st.booleans())
    def baseptr(self, a, back):
        """Switch to a copy of the boot L4 in pool frame 5 (prepared on first use) or back."""
        p = self._dom(a)
        if p is None:
            return

        def go():
            mem = self.hv.mem
            boot = p.dom.boot_l4
            alt = self._frame(p, 5)
            if back:
                p.mmuext(MmuExt.NEW_BASEPTR, boot)
                return
            if p.domid not in self.alt_l4:
                reqs = []
                for i in range(512):
                    e = mem.read_u64((boot << PAGE_SHIFT) + 8 * i)
                    if e & _PAGE_PRESENT and not XEN_L4_FIRST <= i <= XEN_L4_LAST:
                        reqs.append(((alt << PAGE_SHIFT) + 8 * i, e))
                if p.mmu_update(*reqs)[0] != 0:
                    return
                self.alt_l4[p.domid] = alt
            if mem.pinned[boot]:
                p.mmuext(MmuExt.UNPIN_TABLE, boot)
            p.mmuext(MmuExt.NEW_BASEPTR, alt)
        self._sync(go)

    @rule(a=i_dom, k=i_frame)
    def free_frame(self, a, k):
        p = self._dom(a)
        if p is not None and k != 0:
            self._sync(p.decrease_reservation, self._frame(p, k))

    @precondition(lambda self: bool(self.handles))
    @rule(a=i_dom)
    def destroy(self, a):
        """Destroy a domain; a new one takes its place (create/destroy cycles)."""
        p = self._dom(a)
        if p is not None:
            self._destroy(p)

    def _destroy(self, p: lab.Parked) -> None:
        orphans = len(self.hv.orphan_frames)
        lab.destroy(p)
        self.stats["destroy"] += 1
        self.stats["frames orphaned"] += len(self.hv.orphan_frames) - orphans
        self.handles = [h for h in self.handles if h[0] != p.domid]
        i = self.doms.index(p)
        self.doms[i] = None
        self._new(i)

    @precondition(lambda self: any(d is None for d in self.doms))
    @rule()
    def create(self):
        self._new(self.doms.index(None))

    # -- checks ----------------------------------------------------------------------------------------
    @invariant()
    def frame_table_consistent(self):
        self._reap()
        problems = audit(self.hv)
        assert not problems, "\n".join(problems[:20])

    def teardown(self):
        try:
            for i, p in enumerate(self.doms):
                if p is not None and not p.dom.destroyed:
                    lab.destroy(p)
                    self.doms[i] = None
            problems = audit(self.hv)
            assert not problems, "\n".join(problems[:20])
            assert not self.hv.orphan_frames, self.hv.orphan_frames
            assert self.hv.mem.free_frames == self.start_free, \
                f"{self.start_free - self.hv.mem.free_frames} frames leaked"
        finally:
            self._do(self.hv.__aexit__(None, None, None))
            self.loop.close()
