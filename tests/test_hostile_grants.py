"""Issue 9 findings 1 and 2 as hostile guests making the real hypercalls (guests/hostile/
grant_copy_pt.c, grant_pte_teardown.c), next to a bystander whose frames are hashed before
and after, in one Hypervisor; afterwards the frame-table auditor finds nothing and every
frame the attackers had is free again.

Expected values are Xen's: a grant copy whose destination is a page table cannot take
PGT_writable_page (gnttab_copy_claim_buf) -> GNTST_general_error (-1) for the self-grant and
for the frame-number form; a page-table teardown that meets a grant PTE of a live domain is
"Attempt to implicitly unmap a granted PTE" and the domain is crashed (here: at once, as the
issue asks), while a dying domain's grant table is torn down first (no crash). A frame mapped
writable by a grantee cannot be pinned as a page table (-EINVAL) until that mapping is gone.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from aiovmm import Hypervisor, ShutdownReason
from aiovmm.audit import audit
from conftest import HV_MEMORY_MIB, results
from test_hostile import _p2m_hash, _torn_down, hostile

TIMEOUT = 40.0
HOWS = ("unpin", "l2", "baseptr", "destroy")

COPY_EXPECTED = {
    "self_domid_found": "1",
    **{k: v for lvl in ("l1", "l2", "l3", "l4") for k, v in {
        f"copy_gref_{lvl}": "-1", f"copy_gref_{lvl}_unchanged": "1", f"copy_gref_{lvl}_flags": "0",
        f"copy_gmfn_{lvl}": "-1", f"copy_gmfn_{lvl}_unchanged": "1"}.items()},
    "copy_gref_data": "0", "copy_gref_data_arrived": "1", "copy_gref_data_flags": "0",
    "hole_read_trap": "14",
}
# l1_self_rw (found by the fuzzer): promote_l1_table fails on the RW self entry -> -EBUSY.
SELF_EXPECTED = {
    "pin_self_rw": "-16", "pin_self_rw_done": "0", "hook_self_rw": "-16", "hook_self_rw_done": "0",
    "still_plain_page": "1", "self_ro_store": "0", "self_ro_store_done": "1",
    "hook_self_ro": "0", "hook_self_ro_done": "1", "self_ro_readable": "1",
    # A legal store (0) into the read-only mapped L1: emulated (writable page tables).
    "self_ro_store_trap": "none", "unhook": "0",
}
MAPPER_EXPECTED = {
    "hook_t": "0", "map": "0", "mapped_reads_pattern": "1",
    "overwrite_grant_pte": "-22", "overwrite_grant_pte_done": "0",
}
MAPPER_ONLY = {"unpin": {"pin_t": "0", "unhook_t": "0"}, "destroy": {"pin_t": "0"},
               "baseptr": {"unpin_l4": "0"}, "l2": {}}
# Printed only if the teardown did not crash the domain (i.e. the bug).
MAPPER_NEVER = ("teardown_rc", "still_running")
GRANTER_EXPECTED = {
    "peer_mapped": "1", "pin_while_mapped": "-22", "pin_while_mapped_done": "0",
    "pinned_while_peer_maps": "0", "peer_unmapped": "1", "peer_wrote": "1",
    "pin_after_unmap": "0", "pin_after_unmap_done": "1", "unpin_after_unmap": "0",
    "end_access": "1",
}


@dataclass
class Pair:
    granter: list[str]
    granter_end: str
    mapper: list[str]
    mapper_end: str
    mapper_reason: ShutdownReason | None


@dataclass
class Hold:
    """Finding 3 as guests: the granter rewrites its in-use entry and dies."""
    granter: list[str] = field(default_factory=list)
    granter_end: str = ""
    mapper: list[str] = field(default_factory=list)
    mapper_end: str = ""
    orphans_while_held: dict = field(default_factory=dict)
    orphan_owner_xen: bool = False
    new_domain_got_orphan: bool = True
    audit_while_held: list[str] = field(default_factory=list)


@dataclass
class Campaign:
    copy: list[str] = field(default_factory=list)
    copy_end: str = ""
    self_rw: list[str] = field(default_factory=list)
    pairs: dict[str, Pair] = field(default_factory=dict)
    hash_before: str = ""
    hash_after: str = ""
    bystander_alive: bool = False
    recheck: str = ""
    free_before: int = 0
    free_after: int = 0
    orphans: int = -1
    audit: list[str] = field(default_factory=list)
    hold: Hold = field(default_factory=Hold)


async def _hold(hv: Hypervisor) -> Hold:
    from aiovmm.abi import DOMID_XEN
    from conftest import guest
    h = Hold()
    elf = hostile("grant_pte_teardown")
    b = await hv.create(elf, memory_mib=8, name="granter-dies",
                        cmdline=f"role=granter die=1 peer={hv._next_domid + 1}")
    line = await b.wait_for_line(r"^result offer ref=\d+$", timeout=TIMEOUT)
    ref = int(line.rsplit("=", 1)[1])
    a = await hv.create(elf, memory_mib=8, name="mapper-hold",
                        cmdline=f"role=mapper peer={b.domid} ref={ref} how=hold")
    async with asyncio.timeout(TIMEOUT):
        await b.wait()
    await _torn_down(hv, b)
    h.orphans_while_held = dict(hv.orphan_frames)
    h.orphan_owner_xen = all(hv.mem.owner[f] == DOMID_XEN for f in hv.orphan_frames)
    h.audit_while_held = audit(hv)
    c = await hv.create(guest("hello"), memory_mib=8, name="after-granter")
    h.new_domain_got_orphan = bool(set(hv.orphan_frames) & c.frames)
    async with asyncio.timeout(TIMEOUT):
        await c.wait()
        await a.wait()
    await _torn_down(hv, a)
    await _torn_down(hv, c)
    h.granter, h.granter_end = list(b.console_lines), b.describe_end()
    h.mapper, h.mapper_end = list(a.console_lines), a.describe_end()
    return h


async def _pair(hv: Hypervisor, how: str) -> Pair:
    elf = hostile("grant_pte_teardown")
    # The granter must name its grantee: the mapper is the next domain created.
    b = await hv.create(elf, memory_mib=8, name=f"granter-{how}",
                        cmdline=f"role=granter peer={hv._next_domid + 1}")
    line = await b.wait_for_line(r"^result offer ref=\d+$", timeout=TIMEOUT)
    ref = int(line.rsplit("=", 1)[1])
    a = await hv.create(elf, memory_mib=8, name=f"mapper-{how}",
                        cmdline=f"role=mapper peer={b.domid} ref={ref} how={how}")
    async with asyncio.timeout(TIMEOUT):
        reason = await a.wait()
        await b.wait()
    await _torn_down(hv, a)
    await _torn_down(hv, b)
    return Pair(list(b.console_lines), b.describe_end(), list(a.console_lines), a.describe_end(), reason)


async def _campaign() -> Campaign:
    c = Campaign()
    async with Hypervisor(memory_mib=HV_MEMORY_MIB) as hv:
        by = await hv.create(hostile("bystander"), memory_mib=8, name="bystander")
        await by.wait_for_line(r"^bystander: ready checksum=0x[0-9a-f]+$", timeout=30)
        c.hash_before = _p2m_hash(hv, by)
        c.free_before = hv.mem.free_frames
        d = await hv.create(hostile("grant_copy_pt"), memory_mib=8, name="grant_copy_pt")
        async with asyncio.timeout(TIMEOUT):
            await d.wait()
        await _torn_down(hv, d)
        c.copy, c.copy_end = list(d.console_lines), d.describe_end()
        d = await hv.create(hostile("l1_self_rw"), memory_mib=8, name="l1_self_rw")
        async with asyncio.timeout(TIMEOUT):
            await d.wait()
        await _torn_down(hv, d)
        c.self_rw = list(d.console_lines)
        for how in HOWS:
            c.pairs[how] = await _pair(hv, how)
        c.hold = await _hold(hv)
        c.hash_after = _p2m_hash(hv, by)
        c.bystander_alive = not by.dying
        c.free_after = hv.mem.free_frames
        c.orphans = len(hv.orphan_frames)
        c.audit = audit(hv)
        by.evtchn.set_pending(by.store_port)
        c.recheck = await by.wait_for_line(r"^bystander: (ok|CORRUPTED)", timeout=10)
    return c


@pytest.fixture(scope="module")
def campaign() -> Campaign:
    return asyncio.run(_campaign())


@pytest.mark.parametrize("key", list(COPY_EXPECTED))
def test_copy_into_page_table(campaign, key):
    got = results(campaign.copy).get(key)
    assert got == COPY_EXPECTED[key], f"result {key} = {got}, Xen gives {COPY_EXPECTED[key]}: {campaign.copy}"


@pytest.mark.parametrize("key", list(SELF_EXPECTED))
def test_l1_mapping_itself_writable(campaign, key):
    got = results(campaign.self_rw).get(key)
    assert got == SELF_EXPECTED[key], f"result {key} = {got}, Xen gives {SELF_EXPECTED[key]}: {campaign.self_rw}"
    assert "self_map_writable" not in results(campaign.self_rw)
    assert campaign.self_rw[-1] == "poweroff"


def test_copy_guest_ends(campaign):
    assert campaign.copy_end == "poweroff" and campaign.copy[-1] == "poweroff", campaign.copy


@pytest.mark.parametrize("how", HOWS)
def test_mapper(campaign, how):
    p = campaign.pairs[how]
    res = results(p.mapper)
    for key, want in {**MAPPER_EXPECTED, **MAPPER_ONLY[how]}.items():
        assert res.get(key) == want, f"{how}: result {key} = {res.get(key)}, expected {want}: {p.mapper}"
    for key in MAPPER_NEVER:
        assert key not in res, f"{how}: the teardown returned to the guest: {p.mapper}"
    if how == "destroy":
        assert p.mapper_reason == ShutdownReason.poweroff and p.mapper[-1] == "poweroff", p.mapper
    else:
        assert p.mapper_reason == ShutdownReason.crash, p.mapper_end
        assert "implicitly unmap a granted PTE" in p.mapper_end, p.mapper_end
        assert p.mapper[-1].startswith("about to "), p.mapper


@pytest.mark.parametrize("how", HOWS)
def test_granter(campaign, how):
    p = campaign.pairs[how]
    res = results(p.granter)
    for key, want in GRANTER_EXPECTED.items():
        assert res.get(key) == want, f"{how}: result {key} = {res.get(key)}, expected {want}: {p.granter}"
    assert p.granter_end == "poweroff" and p.granter[-1] == "poweroff", p.granter


def test_bystander_untouched(campaign):
    assert campaign.hash_after == campaign.hash_before
    assert campaign.bystander_alive
    assert campaign.recheck == "bystander: ok"


def test_frames_all_returned(campaign):
    assert campaign.free_after == campaign.free_before
    assert campaign.orphans == 0


def test_audit_clean(campaign):
    assert campaign.audit == [], campaign.audit[:20]


def test_granter_dies_with_rewritten_entry(campaign):
    """Finding 3: the dead granter's frame stays allocated (owned by Xen) for exactly as long
    as the mapper maps it, whatever the granter wrote into the entry; the next domain never
    gets it; the mapping keeps working and its unmap frees it (test_frames_all_returned)."""
    h = campaign.hold
    g, m = results(h.granter), results(h.mapper)
    assert g.get("peer_mapped") == "1" and g.get("rewrote_entry") == "1", h.granter
    assert h.granter_end == "poweroff", h.granter
    assert len(h.orphans_while_held) == 1, h.orphans_while_held
    assert h.orphan_owner_xen and not h.new_domain_got_orphan
    assert h.audit_while_held == [], h.audit_while_held[:10]
    assert m.get("map") == "0" and m.get("hold_mapping_intact") == "1", h.mapper
    assert m.get("hold_unmap") == "0", h.mapper
    assert h.mapper_end == "poweroff", h.mapper
