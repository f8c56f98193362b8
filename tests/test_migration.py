"""Save/restore in Xen's migration stream v2 (aiovmm/migration/), with real guests.

guests/tests/suspend.c keeps an uptime counter (timer ticks) and a checksum over a memory
pattern; both must carry on across save -> restore. The stream is checked by Xen's own
verify-stream-v2 (Debian's xen-utils-4.17, unpacked by `make setup`), and the receiver is
fed truncated and hostile streams that must be refused with nothing left behind.
"""
from __future__ import annotations

import asyncio
import os
import re
import struct
import subprocess
import sys

import pytest

from aiovmm.migration import stream as S
from aiovmm.migration.stream import StreamError
from aiovmm.migration.suspend import SuspendError, suspend
from conftest import BUILD, ENGINES, ROOT, guest, kernel

pytestmark = ENGINES

XENUTILS = BUILD / "xen-utils" / "usr" / "lib" / "xen-4.17"
VERIFY = XENUTILS / "bin" / "verify-stream-v2"
MEM_MIB = 4


def verify_stream(path: str) -> subprocess.CompletedProcess:
    if not VERIFY.exists():
        subprocess.run(["make", "-C", str(ROOT), "xen-utils"], check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(XENUTILS / "lib" / "python"))
    return subprocess.run([sys.executable, str(VERIFY), "-v", "-f", "xl", "-i", path],
                          capture_output=True, text=True, env=env, timeout=60)


def uptime(dom) -> tuple[int, str]:
    for line in reversed(dom.console_lines):
        m = re.fullmatch(r"uptime: ticks=(\d+) sum=(0x[0-9a-f]+)", line)
        if m:
            return int(m.group(1)), m.group(2)
    raise AssertionError(f"no uptime line in {dom.console_lines[-5:]}")


async def running_guest(hv, cmdline: str = "pages=32 every=10"):
    dom = await hv.create(guest("suspend"), memory_mib=MEM_MIB, cmdline=cmdline)
    await dom.wait_for_line(r"uptime: ticks=20 ", 20)
    return dom


@pytest.fixture
async def saved(hv, tmp_path):
    """(hv, path of a save file, (ticks, checksum) at the save)."""
    dom = await running_guest(hv)
    path = str(tmp_path / "guest.save")
    await dom.save(path)
    assert dom.dying and dom.describe_end() == "suspend"
    return path, uptime(dom)


async def test_save_verified_by_xen(hv, saved):
    path, _ = saved
    r = verify_stream(path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    for what in ("x86 PV info", "x86 PV P2M frames", "x86 PV vcpu basic", "Shared info", "TSC info"):
        assert what in out, out


async def test_round_trip_carries_on(hv, saved):
    path, (ticks, checksum) = saved
    dom = await hv.restore(path)
    await dom.wait_for_line(r"suspend: resumed rc=0", 10)
    await dom.wait_for_line(rf"uptime: ticks={ticks + 20} ", 10)
    t2, sum2 = uptime(dom)
    assert t2 > ticks and sum2 == checksum
    # xenstore works on the new side: a second save of the restored guest round-trips too.
    path2 = path + ".2"
    await dom.save(path2)
    dom3 = await hv.restore(path2)
    await dom3.wait_for_line(rf"uptime: ticks={t2 + 20} ", 10)
    assert uptime(dom3)[1] == checksum
    dom3.shutdown()


async def test_checkpoint_resumes_with_cancel(hv, tmp_path):
    dom = await running_guest(hv)
    await dom.save(str(tmp_path / "ckpt.save"), checkpoint=True)
    await dom.wait_for_line(r"suspend: resumed rc=1", 10)
    t, s = uptime(dom)
    await dom.wait_for_line(rf"uptime: ticks={t + 20} ", 10)
    assert not dom.dying and uptime(dom)[1] == s
    assert verify_stream(str(tmp_path / "ckpt.save")).returncode == 0
    dom.shutdown()


async def test_interrupted_save_resumes_the_guest(hv, tmp_path):
    """`abort` set while the pages are written (the daemon's client gone: Ctrl-C on
    `aiovmm save`): the save fails at its next write, no file (nor .part) is left and the
    guest resumes (a cancelled suspend) with its memory; without the check the save ran to
    its end and destroyed the guest."""
    from aiovmm.migration.save import SaveError
    dom = await running_guest(hv)
    abort = asyncio.Event()
    path = tmp_path / "cut.save"
    with pytest.raises(SaveError, match="interrupted"):
        await dom.save(str(path), progress=lambda done, total: abort.set(), abort=abort)
    assert not path.exists() and not (tmp_path / "cut.save.part").exists()
    await dom.wait_for_line(r"suspend: resumed rc=1", 10)
    t, s = uptime(dom)
    await dom.wait_for_line(rf"uptime: ticks={t + 20} ", 10)
    assert not dom.dying and uptime(dom)[1] == s
    dom.shutdown()


async def test_suspend_timeout_when_guest_ignores(hv):
    """A kernel that does not watch control/shutdown: the request times out, is withdrawn,
    and the guest runs on."""
    dom = await hv.create(kernel(), memory_mib=MEM_MIB, cmdline="ticks=1 spin=100000")
    await dom.wait_for_line(r"^spin 1$", 20)
    with pytest.raises(SuspendError, match="did not suspend"):
        await suspend(dom, timeout=0.3)
    assert hv.xenstore.store.read(f"/local/domain/{dom.domid}/control/shutdown") == b""
    n = len(dom.console_lines)
    await dom.wait_for_line(rf"^spin {int(dom.console_lines[-1].split()[1]) + 3}$", 10)
    assert not dom.dying and len(dom.console_lines) > n
    dom.shutdown()


async def test_suspend_acknowledged_but_not_done(hv):
    """A kernel that takes the request (clears control/shutdown) and then does not suspend,
    as Linux does when its freezer gives up ("do_suspend: freeze processes failed"): libxl's
    second wait runs out and the error says the guest acknowledged, not that it ignores
    control/shutdown; the guest runs on and a later request is answered again."""
    dom = await hv.create(guest("suspend"), memory_mib=MEM_MIB, cmdline="pages=8 every=10 refuse=1")
    await dom.wait_for_line(r"uptime: ticks=10 ", 20)
    with pytest.raises(SuspendError, match="of acknowledging the request") as e:
        await suspend(dom, timeout=0.5)
    assert "watch control/shutdown" not in str(e.value)
    assert "suspend: acknowledged, refused" in dom.console_lines
    t, _ = uptime(dom)
    await dom.wait_for_line(rf"uptime: ticks={t + 10} ", 10)
    assert dom.suspended is None and not dom.dying
    n = dom.console_lines.count("suspend: acknowledged, refused")
    with pytest.raises(SuspendError, match="of acknowledging the request"):
        await suspend(dom, timeout=0.5)
    assert dom.console_lines.count("suspend: acknowledged, refused") == n + 1
    dom.shutdown()


# --- the receiver and untrusted streams -------------------------------------------------------
def _records(data: bytes) -> list[tuple[int, int, int]]:
    """[(offset, type, length)] of the libxc records in a save file."""
    optlen = struct.unpack_from("<I", data, 32 + 12)[0]
    off = 32 + 16 + optlen + S.LIBXL_HDR.size + 8 + S.IHDR.size + S.DHDR.size
    out = []
    while True:
        t, n = S.RH.unpack_from(data, off)
        out.append((off, t, n))
        off += 8 + n + (-n & 7)
        if t == S.Rec.end:
            return out


def _l1_and_free_pfn(data: bytes | bytearray) -> tuple[int, int, int]:
    """(x, p, p_at) in a save file: the pfn X of the guest's first L1 table, the pfn P of
    its first free (XALLOC) page and the file offset of P's PFN entry: what the hostile
    early-L1 streams are made from."""
    x = p = p_at = None
    for off, t, _n in _records(bytes(data)):
        if t != S.Rec.page_data:
            continue
        count = struct.unpack_from("<I", data, off + 8)[0]
        for i, e in enumerate(struct.unpack_from(f"<{count}Q", data, off + 16)):
            if x is None and (e >> 60) & 7 == 1:
                x = e & S.PFN_MASK
            if p is None and e >> 60 == S.PfnType.xalloc:
                p, p_at = e & S.PFN_MASK, off + 16 + 8 * i
    assert x is not None and p is not None
    return x, p, p_at


def _early_l1_stream(path: str, out: str, l1_type: int, xtab_later: bool) -> tuple[str, int]:
    """Write to `out` the save file at `path` with an extra PAGE_DATA record before its
    page data: the free page P sent as an L1 table (stream type `l1_type`) mapping the
    guest's first L1 table X writable; with `xtab_later`, P's own later entry made an
    XTAB (no page), so the early copy stands to the end. Returns (out, P)."""
    data = bytearray(open(path, "rb").read())
    recs = _records(bytes(data))
    x, p, p_at = _l1_and_free_pfn(data)
    if xtab_later:
        struct.pack_into("<Q", data, p_at, p | (S.PfnType.xtab << 60))
    page = bytearray(4096)
    struct.pack_into("<Q", page, 0, (x << 12) | 0x3)              # present, writable
    extra = S.page_data_header([p | (l1_type << 60)], 1) + bytes(page)
    first_pd = next(off for off, t, _n in recs if t == S.Rec.page_data)
    with open(out, "wb") as f:
        f.write(bytes(data[:first_pd]) + extra + bytes(data[first_pd:]))
    return out, p


def _patch(data: bytes, off: int, new: bytes) -> bytes:
    return data[:off] + new + data[off + len(new):]


async def _refused(hv, path: str, data: bytes, match: str) -> None:
    before = (hv.mem.free_frames, set(hv.domains))
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(StreamError, match=match):
        await hv.restore(path)
    assert (hv.mem.free_frames, set(hv.domains)) == before


async def test_hostile_streams_refused(hv, saved, tmp_path):
    path, _ = saved
    data = open(path, "rb").read()
    neighbour = await running_guest(hv)
    recs = _records(data)
    by_type = {}
    for off, t, n in recs:
        by_type.setdefault(t, []).append((off, n))
    bad = str(tmp_path / "bad.save")
    # truncated anywhere: header, a record header, inside page data, before END
    for cut in (10, 60, recs[2][0] + 4, recs[3][0] + 5000, len(data) - 9):
        await _refused(hv, bad, data[:cut], "truncated")
    # a page-table entry naming a frame the stream does not own
    nr_pages = MEM_MIB << 8
    for off, n in by_type[S.Rec.page_data]:
        count = struct.unpack_from("<I", data, off + 8)[0]
        pfns = struct.unpack_from(f"<{count}Q", data, off + 16)
        with_data = [p for p in pfns if p >> 60 not in (0xD, 0xE, 0xF)]   # XALLOC etc.: no page
        tables = [i for i, p in enumerate(with_data) if (p >> 60) & 7]
        if tables:
            page_off = off + 16 + 8 * count + 4096 * tables[0]
            present = next(i for i in range(512) if struct.unpack_from("<Q", data, page_off + 8 * i)[0] & 1)
            pte = struct.unpack_from("<Q", data, page_off + 8 * present)[0]
            evil = (pte & ~0x000FFFFFFFFFF000) | ((nr_pages + 5) << 12)
            await _refused(hv, bad, _patch(data, page_off + 8 * present, struct.pack("<Q", evil)),
                           "not one of the stream's")
            break
    else:
        pytest.fail("no page-table page in the stream")
    # a count past what the record holds
    off, n = by_type[S.Rec.page_data][0]
    await _refused(hv, bad, _patch(data, off + 8, struct.pack("<I", 1024 + 1)), "pfns")
    await _refused(hv, bad, _patch(data, off + 8, struct.pack("<I", 3)), "bytes after|fewer")
    # a pfn beyond the domain
    await _refused(hv, bad, _patch(data, off + 16, struct.pack("<Q", nr_pages)), "beyond")
    # an oversized record
    off, n = by_type[S.Rec.shared_info][0]
    await _refused(hv, bad, _patch(data, off + 4, struct.pack("<I", 1 << 30)), "at most")
    # records out of order: P2M_FRAMES (24 bytes here) retyped as TSC_INFO (24 bytes)
    off, n = by_type[S.Rec.x86_pv_p2m_frames][0]
    assert n == S.TSC_INFO.size
    await _refused(hv, bad, _patch(data, off, struct.pack("<I", S.Rec.x86_tsc_info)), "before the page data")
    # ... and the P2M frames record twice
    p2m_rec = data[off:off + 8 + n]
    await _refused(hv, bad, data[:off] + p2m_rec + data[off:], "out of order")
    # page data after the vCPU state (END moved: drop the record before END)
    off_basic, _ = by_type[S.Rec.x86_pv_vcpu_basic][0]
    pd_off, pd_n = by_type[S.Rec.page_data][0]
    pd = data[pd_off:pd_off + 8 + pd_n]
    await _refused(hv, bad, data[:recs[-1][0]] + pd + data[recs[-1][0]:], "out of order")
    # an unknown record type, a domain size the header cannot have
    await _refused(hv, bad, _patch(data, off, struct.pack("<I", 0x7777)), "not supported")
    cfg_len = struct.unpack_from("<I", data, 44)[0]
    cfg = data[48:48 + cfg_len]
    huge = cfg.replace(b'"nr_pages": %d' % nr_pages, b'"nr_pages": %d' % (1 << 40))
    assert huge != cfg
    await _refused(hv, bad, data[:44] + struct.pack("<I", len(huge)) + huge + data[48 + cfg_len:],
                   "pages")
    # vCPU state: CR3 naming a data page
    c_off = off_basic + 8 + 8 + 4984 + 3 * 8
    await _refused(hv, bad, _patch(data, c_off, struct.pack("<Q", 1 << 12)), "CR3")
    # the neighbour never noticed
    t, s = uptime(neighbour)
    await neighbour.wait_for_line(rf"uptime: ticks={t + 10} ", 10)
    assert uptime(neighbour)[1] == s and not neighbour.dying


async def test_optional_records_skipped_as_libxc_does(hv, saved, tmp_path):
    """Record types with bit 31 set are optional (libxc's restore ignores one it does not
    know): one of an unknown type and aiovmm's STOP_AND_COPY (a live sender's, meaningless
    in a file), between the page data and the tail, change nothing; an unknown optional
    record over MAX_OPTIONAL_LEN and an unknown mandatory one are refused."""
    path, (ticks, checksum) = saved
    data = open(path, "rb").read()
    recs = _records(data)
    tail = next(off for off, t, _n in recs if t == S.Rec.x86_tsc_info)
    extra = S.record(0x80001234, b"whatever a newer sender says") + S.record(S.Rec.stop_and_copy)
    ok = str(tmp_path / "optional.save")
    with open(ok, "wb") as f:
        f.write(data[:tail] + extra + data[tail:])
    dom = await hv.restore(ok)
    await dom.wait_for_line(rf"uptime: ticks={ticks + 10} ", 10)
    assert uptime(dom)[1] == checksum
    dom.shutdown()
    await asyncio.wait([dom.task])
    bad = str(tmp_path / "bad.save")
    big = S.RH.pack(0x80001234, S.MAX_OPTIONAL_LEN + 8) + bytes(S.MAX_OPTIONAL_LEN + 8)
    await _refused(hv, bad, data[:tail] + big + data[tail:], "not supported")
    await _refused(hv, bad, data[:tail] + S.record(0x1234, b"x") + data[tail:], "not supported")


async def test_suspend_with_foreign_start_info_refused(hv):
    """SCHEDOP_shutdown(suspend) naming a frame the guest does not own (another guest's,
    Xen's, beyond memory): -EINVAL, the save fails clearly, the guest runs on."""
    other = await running_guest(hv)
    for bad in (other.p2m[3], hv.mem.nr_frames - 1, 1 << 40):
        dom = await hv.create(guest("suspend"), memory_mib=MEM_MIB, cmdline=f"pages=8 every=10 bad_si={bad}")
        await dom.wait_for_line(r"uptime: ticks=10 ", 20)
        with pytest.raises(SuspendError, match="does not own"):
            await suspend(dom, timeout=5)
        await dom.wait_for_line(rf"suspend: bad start_info {bad:#x} rc=-22", 5)
        t, _ = uptime(dom)
        await dom.wait_for_line(rf"uptime: ticks={t + 10} ", 10)
        assert dom.suspended is None and not dom.dying
        dom.shutdown()
    assert not other.dying


async def test_refused_stream_drops_its_arrival_validations(hv, saved, tmp_path, caplog):
    """L1 tables validated as their pages arrived (restore._hold_l1) hold a type reference
    each until the end; a stream refused after its page data (here its last byte is
    missing) must drop them before the domain is torn down. Found by the 10,000-case
    fuzzer: the teardown met them held by no one and logged "tables [...] still referenced
    after teardown" (it devalidated them by force)."""
    import logging
    path, _ = saved
    data = open(path, "rb").read()
    from aiovmm.audit import audit
    cut = tmp_path / "cut.save"
    cut.write_bytes(data[:-1])
    with caplog.at_level(logging.ERROR, logger="aiovmm"):
        with pytest.raises(StreamError):
            await hv.restore(str(cut))
        for _ in range(200):                 # the teardowns are preemptible: let them finish
            if not hv.pagetables.teardowns:
                break
            await asyncio.sleep(0.01)
    assert not hv.pagetables.teardowns
    assert not [r.getMessage() for r in caplog.records if "still referenced" in r.getMessage()]
    assert audit(hv) == []


@pytest.mark.parametrize("variant", ["resent", "stale"])
async def test_early_l1_copy_released(hv, saved, tmp_path, variant):
    """L1 tables are validated as they arrive (off a live migration's downtime). A copy
    that arrived early and is not what the guest ends with must not cost the guest
    anything: here an extra PAGE_DATA record, before the real page data, sends a free
    page P as an L1 table that maps one of the guest's real L1 tables (X) writable.
    'resent': P comes again later (as the free page it is): its early validation is
    dropped then. 'stale': P's later entry is an XTAB (no page), so the early copy stands
    to the end: the final pinning meets X held writable by it, starts over without the
    early validations, and succeeds, as Xen (which validates only at the end) would.
    Either way the guest carries on and the frame table audits clean (no reference left)."""
    from aiovmm.audit import audit
    path, (ticks, checksum) = saved
    bad, p = _early_l1_stream(path, str(tmp_path / f"{variant}.save"), S.PfnType.l1,
                              xtab_later=variant == "stale")
    dom = await hv.restore(bad)
    await dom.wait_for_line(r"suspend: resumed rc=0", 10)
    await dom.wait_for_line(rf"uptime: ticks={ticks + 20} ", 10)
    assert uptime(dom)[1] == checksum
    assert audit(hv) == []
    assert hv.mem.type_count[dom.p2m[p]] == 0
    dom.shutdown()


def smp_uptime(dom) -> tuple[int, str, int, int]:
    """(ticks, checksum, vCPU 1's count, vCPU 1's bad count) of the last smp=1 uptime line."""
    for line in reversed(dom.console_lines):
        m = re.fullmatch(r"uptime: ticks=(\d+) sum=(0x[0-9a-f]+) ap=(\d+) bad=(\d+)", line)
        if m:
            return int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    raise AssertionError(f"no smp uptime line in {dom.console_lines[-5:]}")


@pytest.mark.parametrize("mode", ["kernel", "user"])
async def test_multi_vcpu_save_restore_both_carry_on(hv, tmp_path, mode):
    """A three-vCPU domain whose kernel brought up vCPU 1 (counting in r12 and xmm3 at
    once; in kernel mode, or in user mode on page tables of its own: no VGCF_in_kernel,
    a user root in ctrlreg[1]) and left vCPU 2 down: the stream has BASIC/EXTENDED records for vCPUs 0 and 1
    only (Xen's write_all_vcpu_information skips a vCPU that is down), verify-stream-v2
    accepts it, and the restored domain has vCPU 1 online where it was, registers and
    SSE state intact (its count goes on from the one in memory, never back), vCPU 2 down
    and uninitialised, and vCPU 0's uptime and memory checksum carrying on."""
    smp = 1 if mode == "kernel" else 2
    dom = await hv.create(guest("suspend"), memory_mib=MEM_MIB, cmdline=f"pages=32 every=10 smp={smp}",
                          vcpus=3)
    await dom.wait_for_line(r"uptime: ticks=20 .* ap=[1-9]", 30)
    path = str(tmp_path / "smp.save")
    await dom.save(path)
    assert dom.describe_end() == "suspend"
    await asyncio.wait([dom.task])                 # gone, its frames freed
    ticks, checksum, ap, bad = smp_uptime(dom)
    basic1 = [off for off, t, _n in _records(open(path, "rb").read()) if t == S.Rec.x86_pv_vcpu_basic][1]
    with open(path, "rb") as f:
        f.seek(basic1 + 16)
        from aiovmm.migration.context import VGCF, VcpuContext
        c1 = VcpuContext.unpack(f.read(5168))
    assert bool(c1.flags & VGCF.in_kernel) == (mode == "kernel") and bool(c1.ctrlreg[1]) == (mode == "user")
    # The data selectors of vCPU 1's VCPUOP_initialise context (suspend.c start_ap), which
    # the vCPU kept (arch_set_info_guest / load_segments), are in its record ...
    segs = {"ds": 0xE02B, "es": 0xE023, "fs": 0xE033, "gs": 0xE02B}
    assert {n: c1.regs[n] for n in segs} == segs, c1.regs
    assert ap > 0 and bad == 0
    r = verify_stream(path)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(path, "rb") as f:
        data = f.read()
    for rt in (S.Rec.x86_pv_vcpu_basic, S.Rec.x86_pv_vcpu_extended):
        ids = [struct.unpack_from("<I", data, off + 8)[0] for off, t, _n in _records(data) if t == rt]
        assert ids == [0, 1], (rt, ids)
    # vCPU 1's record is checked as vCPU 0's: CR3 naming a data page, a non-canonical rip
    # (arch_set_info_guest's rule), a vCPU id past the domain's: refused, nothing left.
    basic1 = [off for off, t, _n in _records(data) if t == S.Rec.x86_pv_vcpu_basic][1]
    bad = str(tmp_path / "bad.save")
    await _refused(hv, bad, _patch(data, basic1 + 16 + 4984 + 3 * 8, struct.pack("<Q", 1 << 12)),
                   "vcpu 1: CR3")
    await _refused(hv, bad, _patch(data, basic1 + 16 + 648, struct.pack("<Q", 1 << 63)),
                   "vcpu 1: context refused")
    await _refused(hv, bad, _patch(data, basic1 + 8, struct.pack("<I", 3)), "vcpu 3")
    dom2 = await hv.restore(path)
    assert [(v.online, v.initialised) for v in dom2.vcpus] == [(True, True), (True, True), (False, False)]
    # ... and loaded again by the restore.
    assert dict(zip(segs, dom2.vcpus[1].engine.read(tuple(segs)))) == segs
    await dom2.wait_for_line(r"suspend: resumed rc=0", 10)
    await dom2.wait_for_line(rf"uptime: ticks={ticks + 20} ", 20)
    t2, sum2, ap2, bad2 = smp_uptime(dom2)
    assert sum2 == checksum and bad2 == 0 and ap2 > ap, (ap, ap2, bad2)
    await dom2.wait_for_line(rf"uptime: ticks={t2 + 10} ", 20)
    assert smp_uptime(dom2)[2] > ap2 and smp_uptime(dom2)[3] == 0
    dom2.shutdown()


async def test_compat_mode_vcpu_save_restore_stays_in_compat_mode(hv, tmp_path):
    """vCPU 1 started in compatibility mode (suspend.c smp=3: VCPUOP_initialise with
    user_regs.cs FLAT_USER_CS32, a 32-bit process's code segment) counts in a loop whose
    48 ff c0 is `dec %eax; inc %eax` there and `inc %rax` in 64-bit mode; the difference
    goes to its bad count. Xen (arch_set_info_guest) keeps user_regs.cs/ss with RPL 3 and
    restore_all_guest's IRETQ loads them: the vCPU enters, is saved and restored in
    compatibility mode (its BASIC record's cs 0xe023), bad stays 0 throughout. A record
    whose CS the IRETQ would refuse (a data segment, or beyond the GDT) is refused
    with nothing left behind."""
    dom = await hv.create(guest("suspend"), memory_mib=MEM_MIB, cmdline="pages=8 every=10 smp=3",
                          vcpus=2)
    await dom.wait_for_line(r"uptime: ticks=20 .* ap=[1-9]", 30)
    path = str(tmp_path / "compat.save")
    await dom.save(path)
    await asyncio.wait([dom.task])
    ticks, _sum, ap, bad = smp_uptime(dom)
    assert ap > 0 and bad == 0, "vCPU 1 did not start in compatibility mode"
    with open(path, "rb") as f:
        data = f.read()
    basic1 = [off for off, t, _n in _records(data) if t == S.Rec.x86_pv_vcpu_basic][1]
    from aiovmm.migration.context import VcpuContext
    c1 = VcpuContext.unpack(data[basic1 + 16:basic1 + 16 + 5168])
    assert (c1.regs["cs"], c1.regs["ss"]) == (0xE023, 0xE02B), (hex(c1.regs["cs"]), hex(c1.regs["ss"]))
    bad_path = str(tmp_path / "bad.save")
    for cs in (0xE02B, 0x1233):                   # a data segment; index 0x246, beyond the GDT
        await _refused(hv, bad_path, _patch(data, basic1 + 16 + 656, struct.pack("<H", cs)),
                       "vcpu 1: context refused.*IRETQ")
    dom2 = await hv.restore(path)
    await dom2.wait_for_line(r"suspend: resumed rc=0", 10)
    await dom2.wait_for_line(rf"uptime: ticks={ticks + 20} ", 20)
    _t2, _s2, ap2, bad2 = smp_uptime(dom2)
    assert bad2 == 0 and ap2 > ap, (ap, ap2, bad2)
    dom2.shutdown()
