"""The MMU hypercalls: mmu_update, mmuext_op, update_va_mapping (the "queued update
interface"). They copy the guest's request batch, hand each entry to mmu.PageTables, and
report per Xen: stop at the first failure, return its -errno, add the count done to
*done_out. Validation itself lives in mmu.py.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .abi import (
    DOMID_SELF, MMU_MACHPHYS_UPDATE, MMU_NORMAL_PT_UPDATE, MMU_PT_UPDATE_NO_TRANSLATE,
    MMU_PT_UPDATE_PRESERVE_AD, MMU_UPDATE, MMUEXT_OP, PAGE_SHIFT, PAGE_SIZE, UVMF_ALL,
    UVMF_FLUSHTYPE_MASK, UVMF_INVLPG, UVMF_TLB_FLUSH, Errno, MmuExt,
)
from .errors import HypercallError
from .memory import PageType
from .mmu import GuestFault, MMUError

if TYPE_CHECKING:
    from .vcpu import VCPU

log = logging.getLogger("aiovmm.mmu")
CHUNK = 1024                       # entries per invocation before a continuation
PREEMPTED = 1 << 31                # Xen's MMU_UPDATE_PREEMPTED marker in `count`


def _flush_all(v: "VCPU") -> None:
    for other in v.domain.vcpus:
        other.engine.flush_tlb()


def written_all(v: "VCPU") -> None:
    """The hypervisor replaced present page-table entries where Xen does not flush the TLB
    (the guest flushes when it needs to): each engine's `pt_written` (KVM: its shadow
    guard defers what it may until the guest's flush; Unicorn: nothing, its soft TLB keeps
    the old translation as the real TLB would). A stale translation of a frame that is
    freed or becomes a page table is dropped where that happens, whatever the guest asked
    (MachineMemory._stale_translations_unsafe)."""
    for other in v.domain.vcpus:
        other.engine.pt_written()


def vcpumask(v: "VCPU", ptr: int) -> list["VCPU"]:
    """The vCPUs named by a guest vcpumask (a bitmap of unsigned longs at `ptr`), read once
    as Xen's vcpumask_to_pcpumask reads it: one word per 64 vCPUs of the domain; bits past
    the last vCPU are ignored. A bitmap the guest cannot read raises GuestFault: mmuext_op
    answers EINVAL, update_va_mapping EFAULT (as Xen)."""
    vcpus = v.domain.vcpus
    words = (len(vcpus) + 63) // 64
    raw = v.copy_from_guest(ptr, 8 * words)
    mask = int.from_bytes(raw, "little")
    return [o for o in vcpus if mask >> o.id & 1]


def _set_done(v: "VCPU", done_out: int, n: int) -> None:
    """*done_out = entries processed by this call (Xen writes the count and ignores a
    fault on that pointer)."""
    if done_out:
        try:
            v.copy_to_guest(done_out, (n & 0xFFFFFFFF).to_bytes(4, "little"))
        except GuestFault:
            pass


def _batch(v: "VCPU", va: int, count: int, done_out: int, st, one, what: str) -> int:
    """A batch hypercall as Xen runs one: `one(*fields)` for each entry in order, the first
    refused entry (MMUError) stopping the batch with its -errno. Entries are copied a page at
    a time as they are consumed (a batch running into an unmapped page does everything
    before it, then -EFAULT); each page's entries are copied once, then unpacked from the
    copy, so what the guest writes meanwhile is not seen.

    Xen's continuation: at most CHUNK entries per invocation; if more remain, the SYSCALL is
    re-executed (RIP rewound) with the request pointer advanced and the count marked
    PREEMPTED, so the vCPU yields to the loop between chunks and a huge batch never blocks
    other guests. *done_out accumulates across the continuations.
    Hot (Linux: ~78,000 batches per boot, nearly all of one entry): one function, no
    builtins."""
    base = 0
    if count & PREEMPTED:
        count &= ~PREEMPTED
        if done_out:
            try:
                base = int.from_bytes(v.copy_from_guest(done_out, 4), "little")
            except GuestFault:
                base = 0
    n_max = count if count <= CHUNK else CHUNK
    size = st.size
    done = err = 0
    while done < n_max:
        start = va + done * size
        n = n_max - done
        room = (PAGE_SIZE - (start & (PAGE_SIZE - 1))) // size or 1
        if n > room:
            n = room
        try:
            raw = v.copy_from_guest(start, n * size)
        except GuestFault:
            err = -Errno.EFAULT
            break
        try:
            for fields in st.iter_unpack(raw):
                one(*fields)
                done += 1
        except MMUError as e:
            log.debug("d%d %s #%d refused: %s", v.domain.domid, what, done, e)
            err = -e.errno
            break
    if not err and done < count:
        eng = v.engine
        _set_done(v, done_out, base + done)
        rip = eng.get("rip")                          # the instruction after SYSCALL
        eng.write({"rip": rip - 2, "rdi": va + done * size, "rsi": (count - done) | PREEMPTED})
        eng.stop()
        return None
    if done_out:
        _set_done(v, done_out, base + done)
    return err


def _check_foreign(v: "VCPU", foreigndom: int) -> None:
    fd = foreigndom & 0xFFFF
    pfd = (foreigndom >> 16) & 0xFFFF
    if fd not in (DOMID_SELF, v.domain.domid) or pfd not in (0, v.domain.domid + 1):
        raise HypercallError(Errno.ESRCH if fd not in (DOMID_SELF,) else Errno.EPERM,
                             "foreign page tables are privileged")


def do_mmu_update(v: "VCPU", reqs: int, count: int, done_out: int, foreigndom: int, *_) -> int:
    count &= 0xFFFFFFFF
    if foreigndom != DOMID_SELF:                 # DOMID_SELF exactly passes every test there
        _check_foreign(v, foreigndom)
    d = v.domain
    update_entry = d.hypervisor.pagetables.update_entry
    dom = d.domid
    mem = d.mem
    flush = False

    def one(ptr: int, val: int) -> None:
        nonlocal flush
        cmd = ptr & 7
        if cmd == MMU_NORMAL_PT_UPDATE or cmd == MMU_PT_UPDATE_NO_TRANSLATE:
            if update_entry(dom, ptr & ~7, val):
                flush = True
        elif cmd == MMU_PT_UPDATE_PRESERVE_AD:
            if update_entry(dom, ptr & ~7, val, True):
                flush = True
        elif cmd == MMU_MACHPHYS_UPDATE:
            mfn = ptr >> PAGE_SHIFT
            if not mem.valid_mfn(mfn) or mem.owner[mfn] != dom:
                raise MMUError(Errno.EINVAL, f"M2P update of foreign frame {mfn:#x}")
            mem.m2p[mfn] = val & 0xFFFFFFFFFFFFFFFF
        else:
            raise MMUError(Errno.ENOSYS)

    try:
        return _batch(v, reqs, count, done_out, MMU_UPDATE, one, "mmu_update")
    finally:
        if flush:                  # once per batch, and only if a present entry changed
            written_all(v)


def do_mmuext_op(v: "VCPU", ops: int, count: int, done_out: int, foreigndom: int, *_) -> int:
    count &= 0xFFFFFFFF
    d = v.domain
    dom = d.domid
    if (foreigndom & 0xFFFF) not in (DOMID_SELF, dom):
        raise HypercallError(Errno.EPERM)
    pt, mem, pv = d.hypervisor.pagetables, d.mem, v.pv
    return _batch(v, ops, count, done_out, MMUEXT_OP,
                  lambda cmd, a1, a2: _mmuext(v, pt, mem, dom, pv, cmd, a1, a2), "mmuext_op")


# The sub-ops as plain ints, the PIN levels as the PageType members themselves: an enum
# attribute lookup per test costs more than the test (Linux: ~36,000 sub-ops per boot,
# nearly all NEW_BASEPTR / NEW_USER_BASEPTR at a context switch, PIN / UNPIN at fork/exit).
_PIN_LEVEL = {int(MmuExt.PIN_L1_TABLE): PageType.l1, int(MmuExt.PIN_L2_TABLE): PageType.l2,
              int(MmuExt.PIN_L3_TABLE): PageType.l3, int(MmuExt.PIN_L4_TABLE): PageType.l4}
_L4, _WRITABLE = PageType.l4, PageType.writable
_NEW_BASEPTR, _NEW_USER_BASEPTR = int(MmuExt.NEW_BASEPTR), int(MmuExt.NEW_USER_BASEPTR)
_UNPIN_TABLE = int(MmuExt.UNPIN_TABLE)


def _mmuext_one(v: "VCPU", cmd: int, arg1: int, arg2: int) -> None:
    """One MMUEXT_* sub-op of vCPU `v` (emulate.py: a guest's mov to CR3)."""
    d = v.domain
    _mmuext(v, d.hypervisor.pagetables, d.mem, d.domid, v.pv, cmd, arg1, arg2)


def _mmuext(v: "VCPU", pt, mem, dom: int, pv, cmd: int, arg1: int, arg2: int) -> None:
    """One MMUEXT_* sub-op; `pt`, `mem`, `dom` and `pv` are v's page tables, memory, domid
    and PV state (looked up once per batch)."""
    if cmd == _NEW_BASEPTR:
        mfn = arg1
        pt.get_type(mfn, _L4, dom)
        old = pv.kernel_root
        pv.kernel_root = mfn                     # get_type admitted it: a frame number
        if old:
            pt.put_type(old)
        if pv.kernel_mode:
            v.load_root()
    elif cmd == _NEW_USER_BASEPTR:
        mfn = arg1
        if mfn:
            pt.get_type(mfn, _L4, dom)
        old = pv.user_root
        pv.user_root = mfn
        if old:
            pt.put_type(old)
        if not pv.kernel_mode:
            v.load_root()
    elif cmd in _PIN_LEVEL:
        mfn = arg1
        # Xen's order: the type reference first (get_type is where a frame's range and
        # owner are checked: -EINVAL), then the pin bit; already pinned gives it back.
        pt.get_type(mfn, _PIN_LEVEL[cmd], dom)
        if mem.pinned[mfn]:
            pt.put_type(mfn)
            raise MMUError(Errno.EINVAL, "already pinned")
        mem.pinned[mfn] = 1
    elif cmd == _UNPIN_TABLE:
        mfn = arg1
        if not 0 <= mfn < mem.nr_frames or mem.owner[mfn] != dom or not mem.pinned[mfn]:
            raise MMUError(Errno.EINVAL, "not pinned")
        mem.pinned[mfn] = 0
        pt.put_type(mfn)
        written_all(v)
    elif cmd in (MmuExt.TLB_FLUSH_LOCAL, MmuExt.INVLPG_LOCAL):
        v.engine.flush_tlb()
    elif cmd in (MmuExt.TLB_FLUSH_MULTI, MmuExt.INVLPG_MULTI):
        try:
            targets = vcpumask(v, arg2)
        except GuestFault:
            raise MMUError(Errno.EINVAL, f"vcpumask at {arg2:#x} unreadable") from None
        for other in targets:
            other.engine.flush_tlb()
    elif cmd in (MmuExt.TLB_FLUSH_ALL, MmuExt.INVLPG_ALL):
        _flush_all(v)
    elif cmd in (MmuExt.FLUSH_CACHE, MmuExt.FLUSH_CACHE_GLOBAL):
        raise MMUError(Errno.EACCES, "cache flush needs privilege")
    elif cmd == MmuExt.SET_LDT:
        from . import descriptors
        descriptors.set_ldt(v, arg1, arg2)
    elif cmd in (MmuExt.CLEAR_PAGE, MmuExt.COPY_PAGE):
        dst = arg1
        pt.get_type(dst, _WRITABLE, dom)
        try:
            if cmd == MmuExt.CLEAR_PAGE:
                mem.zero(dst)
            else:
                src = arg2
                if not mem.valid_mfn(src) or mem.owner[src] != dom:
                    raise MMUError(Errno.EINVAL, f"copy from foreign frame {src:#x}")
                mem.write(dst << PAGE_SHIFT, mem.read(src << PAGE_SHIFT, PAGE_SIZE))
        finally:
            pt.put_type(dst)
    elif cmd in (MmuExt.MARK_SUPER, MmuExt.UNMARK_SUPER):
        raise MMUError(Errno.EOPNOTSUPP)
    else:
        raise MMUError(Errno.ENOSYS)


def do_update_va_mapping(v: "VCPU", va: int, val: int, flags: int, *_) -> int:
    # A vCPU that makes a hypercall runs, so it has a kernel root: its context took a type
    # reference on a validated L4 before it ever ran (builder, VCPUOP_initialise, restore).
    pt = v.domain.hypervisor.pagetables
    ptr = pt.l1_entry_address(v.kernel_root, va)
    # A replaced present entry is reported to the engines (written_all), which flush only
    # what Xen would whatever `flags` ask; the guest's flush follows from `flags`.
    if pt.update_entry(v.domain.domid, ptr, val):
        written_all(v)
    # UVMF_TLB_FLUSH / UVMF_INVLPG: the local vCPU (UVMF_LOCAL), all (UVMF_ALL) or a
    # vcpumask pointer, which Xen reads after the update; unreadable is -EFAULT.
    bmap = flags & ~UVMF_FLUSHTYPE_MASK & 0xFFFFFFFFFFFFFFFF
    if flags & UVMF_FLUSHTYPE_MASK in (UVMF_TLB_FLUSH, UVMF_INVLPG):
        if bmap == 0:                              # UVMF_LOCAL
            v.engine.flush_tlb()
        elif bmap == UVMF_ALL:
            _flush_all(v)
        else:
            for other in vcpumask(v, bmap):        # GuestFault: -EFAULT
                other.engine.flush_tlb()
    return 0
