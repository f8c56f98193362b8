"""Idle guests give their translator memory back (issue 15, bench/density.py): a Unicorn vCPU
asleep for vcpu.IDLE_RELEASE_S flushes its translated code and MADV_DONTNEEDs the code buffer
and the all-zero pages of the TB hash table (aiovmm/tcg_memory.py). Checked on the real
mappings in /proc/self/smaps, and the guest must go on working after each release."""
from __future__ import annotations

import asyncio
import ctypes
import struct

import pytest

from aiovmm import Hypervisor
from aiovmm import vcpu as vcpu_mod
from aiovmm.tcg_memory import _KEEP_PROLOGUE, _TCG_HTABLE_MAP, PAGE
from conftest import HV_MEMORY_MIB, kernel

_libc = ctypes.CDLL(None, use_errno=True)


def _rss_kib(lo: int, hi: int) -> int:
    """Resident KiB of the pages of [lo, hi) (mincore(2))."""
    lo &= ~(PAGE - 1)
    n = (hi - lo + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * n)()
    assert _libc.mincore(ctypes.c_void_p(lo), ctypes.c_size_t(n * PAGE), vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec) * PAGE // 1024


async def _released(v, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not v.idle_released:
            await asyncio.sleep(0.05)


async def test_idle_vcpu_releases_translator_memory_and_runs_on(monkeypatch):
    monkeypatch.setattr(vcpu_mod, "IDLE_RELEASE_S", 0.5)
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine="unicorn") as h:
        dom = await h.create(kernel(), memory_mib=8, cmdline="echo=1 echo_timeout=0")
        await dom.wait_for_line(r"^echo: ready$", timeout=30)
        v = dom.vcpus[0]
        tcg = v.engine._tcg
        assert tcg.code, "Unicorn layout not recognised (tcg_memory.py): nothing is released"
        code = (tcg.code, tcg.code + tcg.code_size)
        keep_kib = _KEEP_PROLOGUE // 1024 + PAGE // 1024      # prologue area kept
        assert _rss_kib(*code) > 4 * keep_kib                 # booting translated a lot
        for i in range(3):
            await _released(v)
            assert _rss_kib(*code) <= keep_kib
            assert dom.console_backend.write_input(f"line{i}\n".encode()) == 6
            await dom.wait_for_line(rf"^echo: line{i}$", timeout=30)
            assert not v.idle_released
        assert dom.console_backend.write_input(b"quit\n") == 5
        async with asyncio.timeout(30):
            reason = await dom.wait()
        assert reason.name == "poweroff"


async def test_fresh_vcpu_hash_table_not_resident():
    """The 512 KiB TB hash table is zeros until code is translated: a vCPU that never ran
    (vCPU 1, down) keeps none of it resident."""
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine="unicorn") as h:
        dom = await h.create(kernel(), memory_mib=8, vcpus=2, cmdline="echo=1 echo_timeout=0")
        await dom.wait_for_line(r"^echo: ready$", timeout=30)
        buckets_kib = _rss_kib(*_bucket_range(dom.vcpus[1].engine._tcg))
        assert buckets_kib <= 8                           # the partial pages at the ends
        # vCPU 0 ran: its table is resident (the check above can see pages).
        assert _rss_kib(*_bucket_range(dom.vcpus[0].engine._tcg)) > 64


def _bucket_range(tcg) -> tuple[int, int]:
    mp = ctypes.c_uint64.from_address(tcg.tcg + _TCG_HTABLE_MAP).value
    buckets, n = struct.unpack("<2Q", ctypes.string_at(mp, 16))
    return buckets, buckets + n * 64


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
