"""Red-team: the KVM engine's C answer to a repeated one-byte IN (csrc/kvm.c fast_in,
kvm_engine._remember_in) against a guest that rewrites the IN between reads, puts it across
a page boundary, unmaps the page holding its second byte, and drops its IOPL
(guests/hostile/pit_fastpath.c), on both engines, next to a bystander.

Xen: a domU with IOPL 3 reads all ones from any port (guest_io_read); a rewritten
instruction is what runs next; an instruction fetch from an unmapped page is #PF at that
instruction with CR2 the page; after set_iopl 0 the next IN is #GP(0) at its RIP."""
from __future__ import annotations

import pytest

from test_redteam_portio import (attack_fixture, res,  # noqa: F401 (fixture, shared test)
                                 test_host_and_bystander_unaffected)

ALL_ENGINES = True


attack = attack_fixture("pit_fastpath")


def test_repeated_and_rewritten_ins_read_all_ones(res):
    assert (res["set_iopl_3"], res["fast_and"], res["port_rewritten_and"], res["restored_and"],
            res["remapped_and"]) == ("0", "255", "255", "255", "255"), res


def test_rewritten_into_another_instruction_runs_it(res):
    assert res["smc_and"] == "17", res


def test_in_page_in_rewritten_without_an_exit(res):
    """Answered in C after the first on KVM: the port byte rewritten, the IN made a `mov`
    and back, each by a plain store with no exit in between."""
    assert (res["inpage_and"], res["inpage_port_rewritten_and"], res["inpage_smc_and"],
            res["inpage_smc_back_and"]) == ("255", "255", "17", "255"), res


def test_in_whose_second_byte_is_unmapped_is_pf(request, res, engine):
    assert (res["unmap"], res["unmapped_pf"], res["unmapped_pf_cr2_ok"]) == ("0", "1", "1"), res
    if engine == "unicorn":
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "unicorn: an instruction fetch that faults on the second page of a translation "
            "block is reported at the block's first instruction (the `mov` before the IN), "
            "not at the instruction that crosses the page")))
    assert res["unmapped_pf_rip_ok"] == "1", res


def test_after_dropping_iopl_the_next_in_is_gp(res):
    assert (res["set_iopl_0"], res["noiopl_gp"], res["noiopl_gp_rip_ok"]) == ("0", "1", "1"), res
