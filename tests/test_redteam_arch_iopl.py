"""Red-team: the virtual IOPL under VMASST_TYPE_architectural_iopl (guests/hostile/arch_iopl.c,
both engines, next to a bystander). HYPERVISOR_iret is completed in C on the KVM engine
(csrc/kvm.c fast_iret) and in Python on the emulated one (traps.do_iret): the two must agree
with Xen.

Xen (xen/include/public/xen.h: "virtual iopl updated from do_iret() hypercalls, virtual iopl
reported in bounce frames, guest kernels assumed to be level 0"; pv/iret.c do_iret;
x86_64/entry.S create_bounce_frame; emul-priv-op.c iopl_ok): with the assist an iret's
RFLAGS.IOPL becomes the vCPU's virtual IOPL and every bounce frame's RFLAGS carries it;
without it iret never changes the IOPL and bounce frames show 0. The kernel counts as ring 0
with the assist (always I/O privilege), ring 1 without: the IOPL an iret left is seen as the
I/O privilege once the assist is off again."""
from __future__ import annotations

from test_redteam_portio import (attack_fixture, res,  # noqa: F401 (fixture, shared test)
                                 test_host_and_bystander_unaffected)

ALL_ENGINES = True

attack = attack_fixture("arch_iopl")


def test_without_the_assist_iret_leaves_the_iopl(res):
    assert (res["in_start"], res["in_plain_iret3"], res["bounce_iopl_plain"]) == ("13", "13", "0"), res


def test_with_the_assist_the_kernel_is_ring_0(res):
    assert (res["vm_assist"], res["in_assist"]) == ("0", "none"), res


def test_with_the_assist_iret_sets_the_virtual_iopl(res):
    """1000 irets with IOPL 3 (on KVM completed in C), assist off: the kernel at ring 1 has
    I/O privilege; an iret with IOPL 0 without the assist keeps it; 1000 with IOPL 0 under
    the assist drop it."""
    assert (res["vm_assist_off3"], res["in_off_after_iret3"], res["in_off_iret0"]) == ("0", "none", "none"), res
    assert (res["vm_assist_on2"], res["vm_assist_off0"], res["in_off_after_iret0"]) == ("0", "0", "13"), res


def test_with_the_assist_bounce_frames_report_the_iopl(res):
    assert (res["bounce_iopl_iret3"], res["bounce_iopl_iret0"]) == ("3", "0"), res


def test_set_iopl_and_iret_share_one_virtual_iopl(res):
    assert (res["vm_assist_on3"], res["set_iopl_3"]) == ("0", "0"), res
    assert (res["bounce_iopl_set3"], res["bounce_iopl_set3_iret0"]) == ("3", "0"), res
