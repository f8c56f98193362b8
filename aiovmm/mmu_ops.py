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
    MMU_PT_UPDATE_PRESERVE_AD, MMU_UPDATE, MMUEXT_OP, PAGE_SHIFT, PAGE_SIZE, UVMF_FLUSHTYPE_MASK,
    Errno, MmuExt,
)
from .errors import HypercallError
from .memory import PageType
from .mmu import GuestFault, MMUError

if TYPE_CHECKING:
    from .vcpu import VCPU

log = logging.getLogger("aiovmm.mmu")
MAX_BATCH = 1 << 20


def _flush_all(v: "VCPU") -> None:
    for other in v.domain.vcpus:
        other.engine.flush_tlb()


def _set_done(v: "VCPU", done_out: int, n: int) -> None:
    """*done_out = entries processed by this call (Xen writes the count and ignores a
    fault on that pointer)."""
    if done_out:
        try:
            v.copy_to_guest(done_out, (n & 0xFFFFFFFF).to_bytes(4, "little"))
        except GuestFault:
            pass


def _entries(v: "VCPU", va: int, count: int, size: int):
    """Yield the guest's request entries, copied a page at a time as they are consumed,
    so a batch running into an unmapped page processes everything before it (then the
    caller answers -EFAULT)."""
    done = 0
    while done < count:
        start = va + done * size
        room = max(1, (PAGE_SIZE - (start & (PAGE_SIZE - 1))) // size)
        n = min(count - done, room)
        raw = v.copy_from_guest(start, n * size)       # GuestFault propagates
        for i in range(n):
            yield raw[i * size:(i + 1) * size]
        done += n


def _check_foreign(v: "VCPU", foreigndom: int) -> None:
    fd = foreigndom & 0xFFFF
    pfd = (foreigndom >> 16) & 0xFFFF
    if fd not in (DOMID_SELF, v.domain.domid) or pfd not in (0, v.domain.domid + 1):
        raise HypercallError(Errno.ESRCH if fd not in (DOMID_SELF,) else Errno.EPERM,
                             "foreign page tables are privileged")


def do_mmu_update(v: "VCPU", reqs: int, count: int, done_out: int, foreigndom: int, *_) -> int:
    count &= 0xFFFFFFFF
    if count > MAX_BATCH:
        raise HypercallError(Errno.EINVAL)
    _check_foreign(v, foreigndom)
    pt = v.domain.hypervisor.pagetables
    dom = v.domain.domid
    mem = v.domain.mem
    done = 0
    err = 0
    flush = False
    entries = _entries(v, reqs, count, MMU_UPDATE.size)
    while True:
        try:
            entry = next(entries, None)
        except GuestFault:
            err = -Errno.EFAULT
            break
        if entry is None:
            break
        ptr, val = MMU_UPDATE.unpack(entry)
        cmd = ptr & 7
        try:
            if cmd in (MMU_NORMAL_PT_UPDATE, MMU_PT_UPDATE_PRESERVE_AD, MMU_PT_UPDATE_NO_TRANSLATE):
                flush |= pt.update_entry(dom, ptr & ~7, val, preserve_ad=cmd == MMU_PT_UPDATE_PRESERVE_AD)
            elif cmd == MMU_MACHPHYS_UPDATE:
                mfn = ptr >> PAGE_SHIFT
                if not mem.valid_mfn(mfn) or mem.owner[mfn] != dom:
                    raise MMUError(Errno.EINVAL, f"M2P update of foreign frame {mfn:#x}")
                mem.m2p[mfn] = val & 0xFFFFFFFFFFFFFFFF
            else:
                raise MMUError(Errno.ENOSYS)
        except MMUError as e:
            log.debug("d%d mmu_update #%d refused: %s", dom, done, e)
            err = -e.errno
            break
        done += 1
    if done:
        _flush_all(v)
    _set_done(v, done_out, done)
    return err


def do_mmuext_op(v: "VCPU", ops: int, count: int, done_out: int, foreigndom: int, *_) -> int:
    count &= 0xFFFFFFFF
    if count > MAX_BATCH:
        raise HypercallError(Errno.EINVAL)
    if (foreigndom & 0xFFFF) not in (DOMID_SELF, v.domain.domid):
        raise HypercallError(Errno.EPERM)
    done = 0
    err = 0
    entries = _entries(v, ops, count, MMUEXT_OP.size)
    while True:
        try:
            entry = next(entries, None)
        except GuestFault:
            err = -Errno.EFAULT
            break
        if entry is None:
            break
        cmd, arg1, arg2 = MMUEXT_OP.unpack(entry)
        try:
            _mmuext_one(v, cmd, arg1, arg2)
        except MMUError as e:
            log.debug("d%d mmuext_op #%d (cmd %d) refused: %s", v.domain.domid, done, cmd, e)
            err = -e.errno
            break
        done += 1
    _set_done(v, done_out, done)
    return err


_PIN_LEVEL = {MmuExt.PIN_L1_TABLE: PageType.l1, MmuExt.PIN_L2_TABLE: PageType.l2,
              MmuExt.PIN_L3_TABLE: PageType.l3, MmuExt.PIN_L4_TABLE: PageType.l4}


def _mmuext_one(v: "VCPU", cmd: int, arg1: int, arg2: int) -> None:
    pt = v.domain.hypervisor.pagetables
    mem = v.domain.mem
    dom = v.domain.domid
    if cmd in _PIN_LEVEL:
        mfn = arg1
        if not mem.valid_mfn(mfn) or mem.owner[mfn] != dom:
            raise MMUError(Errno.EINVAL, f"pin of foreign frame {mfn:#x}")
        if mem.pinned[mfn]:
            raise MMUError(Errno.EINVAL, "already pinned")
        pt.get_type(mfn, _PIN_LEVEL[cmd], dom)
        mem.pinned[mfn] = 1
    elif cmd == MmuExt.UNPIN_TABLE:
        mfn = arg1
        if not mem.valid_mfn(mfn) or mem.owner[mfn] != dom or not mem.pinned[mfn]:
            raise MMUError(Errno.EINVAL, "not pinned")
        mem.pinned[mfn] = 0
        pt.put_type(mfn)
        _flush_all(v)
    elif cmd == MmuExt.NEW_BASEPTR:
        mfn = arg1
        pt.get_type(mfn, PageType.l4, dom)
        old = v.kernel_root
        v.kernel_root = mfn
        if old:
            pt.put_type(old)
        if v.kernel_mode:
            v.load_root()
    elif cmd == MmuExt.NEW_USER_BASEPTR:
        mfn = arg1
        if mfn:
            pt.get_type(mfn, PageType.l4, dom)
        old = v.user_root
        v.user_root = mfn
        if old:
            pt.put_type(old)
        if not v.kernel_mode:
            v.load_root()
    elif cmd in (MmuExt.TLB_FLUSH_LOCAL, MmuExt.INVLPG_LOCAL):
        v.engine.flush_tlb()
    elif cmd in (MmuExt.TLB_FLUSH_MULTI, MmuExt.INVLPG_MULTI, MmuExt.TLB_FLUSH_ALL, MmuExt.INVLPG_ALL):
        _flush_all(v)
    elif cmd in (MmuExt.FLUSH_CACHE, MmuExt.FLUSH_CACHE_GLOBAL):
        raise MMUError(Errno.EACCES, "cache flush needs privilege")
    elif cmd == MmuExt.SET_LDT:
        if arg1 & (PAGE_SIZE - 1) or (arg2 & 0xFFFFFFFF) > 8192:
            raise MMUError(Errno.EINVAL)
        v.domain.ldt = (arg1, arg2 & 0xFFFFFFFF)
    elif cmd in (MmuExt.CLEAR_PAGE, MmuExt.COPY_PAGE):
        dst = arg1
        pt.get_type(dst, PageType.writable, dom)
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
    if not v.kernel_root:
        raise HypercallError(Errno.EINVAL)
    pt = v.domain.hypervisor.pagetables
    ptr = pt.l1_entry_address(v.kernel_root, va)
    pt.update_entry(v.domain.domid, ptr, val)
    # Flushed whatever `flags` ask (UVMF_NONE included): Unicorn has no per-page flush, and
    # a stale writable translation of a frame that has since become a page table would
    # bypass validation. Cheap: the soft TLB refills in ~0.3 us per page.
    _flush_all(v)
    return 0
