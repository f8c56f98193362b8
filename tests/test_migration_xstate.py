"""A vCPU's XSAVE state across save/restore (X86_PV_VCPU_XSAVE, Xen's migration stream v2).

On kvm-pvm the guest kernel is offered XSAVE with AVX (cpuid.xstate, kvm_engine.cpl3_xstate);
the emulated engine offers none. A save writes, per vCPU, XCR0, XCR0_ACCUMULATED and the
XSAVE area (Xen's getvcpuextstate format); a restore loads them, and refuses a record this
host's engine cannot give (Xen's setvcpuextstate/validate_xstate rules against the
destination's policy): a guest that enabled AVX must not wake up where its first XSAVE or
AVX instruction faults. guests/tests/suspend.c `ymm=1` enables XSAVE as Linux does and keeps
a pattern in both halves of ymm7.
"""
from __future__ import annotations

import asyncio
import json
import re
import struct

import pytest

from aiovmm.migration import stream as S
from aiovmm.migration.context import XSAVE_AREA_MIN, XSTATE_HDR_OFF
from conftest import ENGINE_PARAMS, guest
from test_migration import _records, _refused, verify_stream

MEM_MIB = 4


def ymm_uptime(dom) -> tuple[int, str, int]:
    """(ticks, checksum, ymm7 intact) of the last ymm=1 uptime line."""
    for line in reversed(dom.console_lines):
        m = re.fullmatch(r"uptime: ticks=(\d+) sum=(0x[0-9a-f]+) ymm=([01])", line)
        if m:
            return int(m.group(1)), m.group(2), int(m.group(3))
    raise AssertionError(f"no ymm uptime line in {dom.console_lines[-5:]}")


def xsave_records(data: bytes) -> list[tuple[int, int, int]]:
    """[(offset, vcpu, length of the content)] of the X86_PV_VCPU_XSAVE records."""
    return [(off, struct.unpack_from("<I", data, off + 8)[0], n - S.VCPU_HDR.size)
            for off, t, n in _records(data) if t == S.Rec.x86_pv_vcpu_xsave]


def with_xsave(data: bytes, off: int, content: bytes) -> bytes:
    """`data` with the XSAVE record at `off` replaced by one of vCPU 0 holding `content`."""
    n = S.RH.unpack_from(data, off)[1]
    end = off + 8 + n + (-n & 7)
    return data[:off] + S.vcpu_record(S.Rec.x86_pv_vcpu_xsave, 0, content) + data[end:]


def with_engine(data: bytes, engine: str) -> bytes:
    """`data` with the xl header's configuration naming another vCPU engine."""
    cfg_len = struct.unpack_from("<I", data, 44)[0]
    cfg = json.loads(data[48:48 + cfg_len].rstrip(b"\0"))
    cfg["engine"] = engine
    raw = json.dumps(cfg, sort_keys=True).encode() + b"\0"
    return data[:44] + struct.pack("<I", len(raw)) + raw + data[48 + cfg_len:]


def test_xcr0_rule_is_the_offer_and_xens_valid_xcr0():
    """cpuid.xcr0_within, the one rule XSETBV and a restored XSAVE record go through: with
    an offer of x87|SSE|AVX, components outside it (PKRU 0x200, MPX 0x18, AVX-512) are
    refused as Xen's valid_xcr0 under the policy refuses them (an IntFlag complement once
    let 0x207 through), AVX needs SSE, x87 is always there; no offer: nothing is valid."""
    from aiovmm.cpuid import Xstate, Xcr0, xcr0_within
    avx = Xstate(Xcr0.X87 | Xcr0.SSE | Xcr0.AVX, {2: (256, 576)})
    assert [v for v in range(0x400) if xcr0_within(avx, v)] == [0x1, 0x3, 0x7]
    assert not any(xcr0_within(None, v) for v in range(0x400))
    avx512 = Xstate(Xcr0.X87 | Xcr0.SSE | Xcr0.AVX | 0xE0, {2: (256, 576), 5: (64, 1088),
                                                           6: (512, 1152), 7: (1024, 1664)})
    assert [v for v in range(0x400) if xcr0_within(avx512, v)] == [0x1, 0x3, 0x7, 0xE7]
    assert avx512.size(0xE7) == 2688


async def test_emulated_engine_writes_no_xsave_record(tmp_path):
    """The emulated engine offers no XSAVE: like Xen on a CPU without it, the stream has no
    X86_PV_VCPU_XSAVE record, and the guest's request for XSAVE was declined."""
    from aiovmm import Hypervisor
    async with Hypervisor(memory_mib=64, engine="unicorn") as hv:
        dom = await hv.create(guest("suspend"), memory_mib=MEM_MIB, cmdline="pages=8 every=10 ymm=1")
        await dom.wait_for_line(r"uptime: ticks=10 ", 20)
        assert "ymm: not offered" in dom.console_lines
        path = str(tmp_path / "u.save")
        await dom.save(path)
        data = open(path, "rb").read()
        assert xsave_records(data) == []
        assert verify_stream(path).returncode == 0


kvm_only = pytest.mark.parametrize("engine", ENGINE_PARAMS[1:], indirect=True, scope="module")


@pytest.fixture
async def kvm_ymm_saved(hv, tmp_path):
    """(path, ticks, checksum) of a KVM guest saved with XCR0 = the offer (AVX at least)
    and its pattern in ymm7."""
    from aiovmm import kvm_engine
    offer = kvm_engine.cpl3_xstate()
    if offer is None:
        pytest.skip("this host's KVM offers the guest no XSAVE (hardware KVM loads the guest's XCR0)")
    dom = await hv.create(guest("suspend"), memory_mib=MEM_MIB, cmdline="pages=16 every=10 ymm=1")
    await dom.wait_for_line(r"uptime: ticks=20 ", 30)
    assert f"ymm: xcr0={offer.xcr0:#x}" in dom.console_lines
    assert ymm_uptime(dom)[2] == 1
    path = str(tmp_path / "ymm.save")
    await dom.save(path)
    await asyncio.wait([dom.task])                 # gone, its frames freed
    ticks, checksum, _ = ymm_uptime(dom)
    return path, ticks, checksum, offer


@kvm_only
async def test_kvm_round_trip_keeps_ymm(hv, kvm_ymm_saved):
    """KVM save -> KVM restore: the record holds XCR0 = XCR0_ACCUMULATED = the offer and an
    area of its size with the AVX component in use, Xen's verify-stream-v2 accepts it, and
    the restored guest's ymm7 (upper half included) is what it was; its XCR0 carries on."""
    path, ticks, checksum, offer = kvm_ymm_saved
    data = open(path, "rb").read()
    recs = xsave_records(data)
    assert [vid for _o, vid, _n in recs] == [0]
    off, _vid, n = recs[0]
    xcr0, accum = struct.unpack_from("<QQ", data, off + 16)
    assert xcr0 == accum == offer.xcr0 and n == 16 + offer.size(offer.xcr0)
    xstate_bv = struct.unpack_from("<Q", data, off + 32 + XSTATE_HDR_OFF)[0]
    assert xstate_bv & 4, hex(xstate_bv)              # ymm upper halves in use
    r = verify_stream(path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "x86 PV vcpu xsave" in r.stdout + r.stderr, r.stdout + r.stderr
    dom = await hv.restore(path)
    await dom.wait_for_line(r"suspend: resumed rc=0", 10)
    await dom.wait_for_line(rf"uptime: ticks={ticks + 20} ", 20)
    t2, sum2, ymm2 = ymm_uptime(dom)
    assert sum2 == checksum and ymm2 == 1, dom.console_lines[-5:]
    v = dom.vcpus[0]
    assert (v.xcr0, v.xcr0_accum) == (offer.xcr0, offer.xcr0) and v.cr4 & (1 << 18)
    dom.shutdown()


@kvm_only
async def test_kvm_stream_with_avx_refused_by_emulated_engine(hv, kvm_ymm_saved, tmp_path):
    """The same stream restored where the vCPU engine offers no XSAVE (the xl header naming
    the emulated engine; a hardware-KVM destination offers none either): refused, naming
    the XCR0 and the offer, with no domain and no frame left behind."""
    path, *_ = kvm_ymm_saved
    data = with_engine(open(path, "rb").read(), "unicorn")
    await _refused(hv, str(tmp_path / "u.save"), data, r"vcpu 0: the guest's XCR0 0x[0-9a-f]*7 .*offers no XSAVE")


@kvm_only
async def test_hostile_xsave_records_refused(hv, kvm_ymm_saved, tmp_path):
    """Records Xen's setvcpuextstate refuses are refused before the domain exists, nothing
    left: too large, XCR0 invalid (AVX without SSE; x87 missing), components outside the
    offer (PKRU, MPX), XCR0 beyond XCR0_ACCUMULATED, XSTATE_BV beyond it, a compressed
    area, reserved header bytes, an area of the wrong size, XCR0_ACCUMULATED without an
    area, one shorter than its header, a record past the stream's limit, a second record for one vCPU."""
    path, *_ = kvm_ymm_saved
    data = open(path, "rb").read()
    off, _vid, n = xsave_records(data)[0]
    content = data[off + 16:off + 16 + n]
    xcr0, accum = struct.unpack_from("<QQ", content)
    area = content[16:]
    bad = str(tmp_path / "bad.save")

    def hdr(x: int, a: int) -> bytes:
        return struct.pack("<QQ", x, a)

    def area_with(at: int, val: int) -> bytes:
        return area[:at] + struct.pack("<Q", val) + area[at + 8:]
    cases = [
        (content + bytes(64), "bytes for XCR0_ACCUMULATED|at most"),
        (hdr(0x5, accum) + area, "XCR0 0x5 is not one"),
        (hdr(0x6, accum) + area, "XCR0 0x6 is not one"),
        (hdr(xcr0 | 0x200, accum | 0x200) + area, "0x2.. is not one"),       # PKRU
        (hdr(xcr0 | 0x18, accum | 0x18) + area, "is not one"),                # MPX
        (hdr(0x7, 0x3) + area[:XSAVE_AREA_MIN], "outside XCR0_ACCUMULATED"),
        (hdr(0x3, 0x0), "outside XCR0_ACCUMULATED"),
        (hdr(xcr0, accum) + area_with(XSTATE_HDR_OFF, accum | 0x200), "XSTATE_BV"),
        (hdr(xcr0, accum) + area_with(XSTATE_HDR_OFF + 8, 1 << 63 | accum), "compressed"),
        (hdr(xcr0, accum) + area_with(XSTATE_HDR_OFF + 40, 1), "reserved"),
        (hdr(xcr0, accum) + area[:XSAVE_AREA_MIN], "want"),
        (hdr(xcr0, accum), "without an XSAVE area"),
        (hdr(xcr0, accum) + area[:100], "area of 100 bytes .at least 576"),
        (hdr(xcr0, accum)[:8], "record of 8 bytes .at least 16"),
    ]
    for c, match in cases:
        await _refused(hv, bad, with_xsave(data, off, c), match)
    await _refused(hv, bad, with_xsave(data, off, content + bytes(4096)), "at most")
    rec = data[off:off + 8 + S.RH.unpack_from(data, off)[1]]
    await _refused(hv, bad, data[:off] + rec + data[off:], "repeated")
    # the legacy region is the guest's own business: MXCSR with reserved bits set is cut to
    # its defined bits (as fpu_ctxt's is), the guest restores and runs
    odd = with_xsave(data, off, hdr(xcr0, accum) + area[:24] + b"\xff" * 4 + area[28:])
    with open(bad, "wb") as f:
        f.write(odd)
    dom = await hv.restore(bad)
    await dom.wait_for_line(r"suspend: resumed rc=0", 10)
    await dom.wait_for_line(r"uptime: ticks=\d+ sum=0x[0-9a-f]+ ymm=1", 10)
    dom.shutdown()
    # the untouched stream still restores (the cases above did not leave anything in the way)
    dom = await hv.restore(path)
    await dom.wait_for_line(r"suspend: resumed rc=0", 10)
    dom.shutdown()


@kvm_only
async def test_kvm_secondary_vcpu_xsave_carried(hv, tmp_path):
    """Each vCPU has its own XSAVE state: vCPU 1 enables XSAVE itself (suspend.c smp=1
    ymm=1) and keeps a pattern in ymm6 while counting. The stream has an XSAVE record per
    vCPU, both with the offer's XCR0, and after the restore both vCPUs' ymm patterns and
    XCR0 are what they were, vCPU 1 counting on."""
    from aiovmm import kvm_engine
    offer = kvm_engine.cpl3_xstate()
    if offer is None:
        pytest.skip("this host's KVM offers the guest no XSAVE (hardware KVM loads the guest's XCR0)")
    line = r"uptime: ticks=(\d+) sum=(0x[0-9a-f]+) ymm=([01]) ap=(\d+) bad=(\d+) ap_ymm=([01])"

    def last(dom) -> tuple[int, ...]:
        for text in reversed(dom.console_lines):
            m = re.fullmatch(line, text)
            if m:
                return (int(m.group(1)), m.group(2), *(int(g) for g in m.groups()[2:]))
        raise AssertionError(dom.console_lines[-5:])
    dom = await hv.create(guest("suspend"), memory_mib=MEM_MIB, vcpus=2,
                          cmdline="pages=16 every=10 smp=1 ymm=1")
    await dom.wait_for_line(r"uptime: ticks=20 .* ap=[1-9]", 30)
    assert last(dom)[2] == 1 and last(dom)[5] == 1, last(dom)
    path = str(tmp_path / "smp-ymm.save")
    await dom.save(path)
    await asyncio.wait([dom.task])
    ticks, checksum, _y, ap, bad, _ay = last(dom)
    data = open(path, "rb").read()
    recs = xsave_records(data)
    assert [vid for _o, vid, _n in recs] == [0, 1]
    for off, _vid, _n in recs:
        assert struct.unpack_from("<QQ", data, off + 16) == (offer.xcr0, offer.xcr0)
    r = verify_stream(path)
    assert r.returncode == 0, r.stdout + r.stderr
    dom2 = await hv.restore(path)
    await dom2.wait_for_line(r"suspend: resumed rc=0", 10)
    await dom2.wait_for_line(rf"uptime: ticks={ticks + 20} ", 20)
    t2, sum2, ymm2, ap2, bad2, ap_ymm2 = last(dom2)
    assert (sum2, ymm2, ap_ymm2, bad2) == (checksum, 1, 1, 0) and ap2 > ap, last(dom2)
    assert [(v.xcr0, v.xcr0_accum) for v in dom2.vcpus] == [(offer.xcr0, offer.xcr0)] * 2
    dom2.shutdown()
