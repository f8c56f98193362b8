"""Give an idle Unicorn instance's translator memory back to the kernel (issue 15, density).

Why: a Unicorn instance costs ~0.9 MiB before it runs anything and 1-3 MiB once it has
translated a guest's boot code (bench/density.py). Two parts of that are memory the instance
no longer needs while its guest sleeps, but Unicorn's API cannot release it:

- the TB hash table's bucket array (QEMU's qht, 8,192 buckets of 64 bytes = 512 KiB), which
  qht_map_create zeroes at creation and tb_flush empties again (every entry NULL);
- the translated code and TB descriptors in the code_gen_buffer (an rwx mmap of the size set
  by ctl_set_tcg_buffer_size), dead once tb_flush reset the region allocator.

MADV_DONTNEED on private anonymous memory makes pages read back as zeros and frees them.
So: on a page of the bucket array every byte of which is zero, MADV_DONTNEED changes nothing
the instance can observe (a bucket's `next` chain pointer survives tb_flush, so pages with
one are kept); in the code buffer, after tb_flush, everything past the TCG prologue is dead
(the next translation starts over at the region start and writes before it executes). The
first 16 KiB of the buffer (prologue/epilogue, under 1 KiB on x86_64) are never dropped.

Unicorn does not expose where these are. The offsets below are those of Unicorn 2.1.4
(uc_struct.tcg_ctx; TCGContext.tb_ctx.htable.map and .code_gen_prologue), found by scanning
fresh instances for the qht_map signature (buckets, 8192, 0, 1024) and the rwx mapping's
start; `Layout.check()` verifies them on the first instance against /proc/self/maps and the
signature, and with any mismatch (another Unicorn build) reclaiming is off (logged once).
Everything runs on the loop thread while the instance is not running.
"""
from __future__ import annotations

import ctypes
import logging
import struct

log = logging.getLogger("aiovmm.tcg_memory")

PAGE = 4096
_UC_TCG_CTX = 768            # offsetof(struct uc_struct, tcg_ctx)
_TCG_HTABLE_MAP = 39096      # offsetof(TCGContext, tb_ctx.htable.map)
_TCG_PROLOGUE = 144          # offsetof(TCGContext, code_gen_prologue)
_TCG_INVALIDATIONS = 216     # offsetof(TCGContext, tb_phys_invalidate_count)
_QHT_BUCKET = 64             # QHT_BUCKET_ALIGN; `next` is the word at offset 56
_QHT_INITIAL_BUCKETS = 8192  # CODE_GEN_HTABLE_SIZE / QHT_BUCKET_ENTRIES
_KEEP_PROLOGUE = 16 << 10      # TCG's x86_64 prologue+epilogue: < 1 KiB at the start
_MADV_DONTNEED = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.malloc_trim.argtypes = [ctypes.c_size_t]
_ZERO_PAGE = bytes(PAGE)
_NEXT = struct.Struct("<Q")

_usable: bool | None = None        # decided on the first instance


def _word(addr: int) -> int:
    return ctypes.c_uint64.from_address(addr).value


def _rwx_mapping_at(start: int) -> int:
    """Length of the rwx private mapping starting at `start` (0 if there is none)."""
    with open("/proc/self/maps") as f:
        for line in f:
            rng, perms = line.split(None, 2)[:2]
            lo, hi = (int(x, 16) for x in rng.split("-"))
            if lo == start and perms == "rwxp":
                return hi - lo
    return 0


class TcgMemory:
    """Where one Unicorn instance keeps its TB hash table and translated code."""

    def __init__(self, uc_handle: int, buffer_size: int) -> None:
        self.tcg = 0
        self.code = 0
        self.code_size = buffer_size
        global _usable
        if _usable is False:
            return
        tcg = _word(uc_handle + _UC_TCG_CTX)
        code = _word(tcg + _TCG_PROLOGUE) if tcg else 0
        if _usable is None:
            _usable = self._check(tcg, code, buffer_size)
            if not _usable:
                return
        self.tcg, self.code = tcg, code

    @staticmethod
    def _check(tcg: int, code: int, buffer_size: int) -> bool:
        ok = False
        if tcg and code and code % PAGE == 0:
            mp = _word(tcg + _TCG_HTABLE_MAP)
            if mp and mp % 8 == 0:
                buckets, n, added, threshold = struct.unpack("<4Q", ctypes.string_at(mp, 32))
                length = _rwx_mapping_at(code)
                ok = (buckets % _QHT_BUCKET == 0 and n == _QHT_INITIAL_BUCKETS and added == 0
                      and threshold == n // 8 and buffer_size - PAGE <= length <= buffer_size + PAGE
                      and _word(tcg + _TCG_INVALIDATIONS) == 0)
                if ok:
                    return True
        log.warning("unicorn layout not recognised: idle vCPUs keep their translator memory")
        return False

    def invalidations(self) -> int:
        """How many translated blocks this instance has invalidated: it counts every block
        dropped because a store of this instance hit its code (QEMU's self-modifying-code
        detection) and every ctl_remove_cache; tb_flush does not count. 0 when the layout
        is not recognised. (Offset found as the only TCGContext word that grows by one
        per removed block and on a guest store into its own translated code.)"""
        return _word(self.tcg + _TCG_INVALIDATIONS) if self.tcg else 0

    def drop_zero_buckets(self) -> int:
        """MADV_DONTNEED every bucket-array page that is all zero; returns pages dropped."""
        if not self.tcg:
            return 0
        mp = _word(self.tcg + _TCG_HTABLE_MAP)
        buckets, n = struct.unpack("<2Q", ctypes.string_at(mp, 16))
        lo = (buckets + PAGE - 1) & ~(PAGE - 1)
        hi = (buckets + n * _QHT_BUCKET) & ~(PAGE - 1)
        if hi <= lo:
            return 0
        raw = ctypes.string_at(lo, hi - lo)
        dropped = 0
        run_start = -1
        for off in range(0, hi - lo + PAGE, PAGE):
            zero = off < hi - lo and raw[off:off + PAGE] == _ZERO_PAGE
            if zero and run_start < 0:
                run_start = off
            elif not zero and run_start >= 0:
                _libc.madvise(lo + run_start, off - run_start, _MADV_DONTNEED)
                dropped += (off - run_start) // PAGE
                run_start = -1
        return dropped

    def drop_code(self) -> int:
        """After tb_flush: MADV_DONTNEED the code buffer past the prologue; returns bytes."""
        if not self.code or _word(self.tcg + _TCG_PROLOGUE) != self.code:
            return 0
        lo = self.code + _KEEP_PROLOGUE
        n = (self.code_size - _KEEP_PROLOGUE - PAGE) & ~(PAGE - 1)
        if _libc.madvise(lo, n, _MADV_DONTNEED) != 0:
            return 0
        return n


def trim_heap() -> None:
    """Return free pages inside malloc's heap (freed TB trees, page descriptors) to the
    kernel: tb_flush frees them into the heap, where they stay resident otherwise."""
    _libc.malloc_trim(0)


_trim_pending = False


def _trim_now() -> None:
    global _trim_pending
    _trim_pending = False
    trim_heap()


def trim_heap_soon(loop) -> None:
    """One malloc_trim for a burst of releases (1,000 guests going idle together), 0.2 s
    after the first: a trim walks the whole heap."""
    global _trim_pending
    if not _trim_pending:
        _trim_pending = True
        loop.call_later(0.2, _trim_now)
