"""aiovmm/abi.py against Xen's own public headers (Debian libxen-dev, /usr/include/xen).

A C program compiled against the headers prints every offset, size and constant; each is one
parametrized assertion against the value aiovmm uses.
"""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from aiovmm import abi, events, timers

XENIF = "0x00040e00"
HEADERS = ["xen/xen.h", "xen/errno.h", "xen/event_channel.h", "xen/sched.h", "xen/vcpu.h",
           "xen/callback.h", "xen/version.h", "xen/features.h", "xen/elfnote.h",
           "xen/arch-x86/xen-x86_64.h"]


def _struct_fields(st: struct.Struct, names: list[str | None]) -> list[tuple[str, int]]:
    """Offsets of a little-endian struct.Struct's non-pad items, in order, paired with names
    (None = skip). `6Q` counts as six items."""
    fmt = st.format
    assert fmt[0] == "<"
    items: list[int] = []
    prefix = "<"
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", fmt[1:]):
        n = int(count or 1)
        if code == "x":
            prefix += f"{n}x"
            continue
        if code == "s":
            items.append(struct.calcsize(prefix))
            prefix += f"{n}s"
            continue
        for _ in range(n):
            items.append(struct.calcsize(prefix))
            prefix += code
    assert len(items) == len(names), (fmt, items, names)
    return [(nm, off) for nm, off in zip(names, items) if nm is not None]


# Each item: (id, C expression, value in aiovmm)
ITEMS: list[tuple[str, str, int]] = []


def item(ident: str, c_expr: str, value: int) -> None:
    ITEMS.append((ident, c_expr, int(value)))


# -- hypercall numbers, errno, sub-op enums ------------------------------------------------------
for m in abi.Hypercall:
    item(f"hypercall.{m.name}", f"__HYPERVISOR_{m.name}", m)
for m in abi.Errno:
    item(f"errno.{m.name}", f"XEN_{m.name}", m)
_ENUMS = [(abi.SchedOp, "SCHEDOP_"), (abi.ShutdownReason, "SHUTDOWN_"), (abi.VcpuOp, "VCPUOP_"),
          (abi.CallbackOp, "CALLBACKOP_"), (abi.CallbackType, "CALLBACKTYPE_"),
          (abi.XenVer, "XENVER_"), (abi.EvtchnOp, "EVTCHNOP_"), (abi.EvtchnStat, "EVTCHNSTAT_"),
          (abi.Virq, "VIRQ_"), (abi.MmuExt, "MMUEXT_"), (abi.ElfNote, "XEN_ELFNOTE_")]
for enum_cls, prefix in _ENUMS:
    for m in enum_cls:
        item(f"{enum_cls.__name__}.{m.name}", prefix + m.name.rstrip("_"), m)

# -- plain constants -------------------------------------------------------------------------------
for name in ["FLAT_RING3_CS32", "FLAT_RING3_CS64", "FLAT_KERNEL_CS", "FLAT_KERNEL_SS",
             "FIRST_RESERVED_GDT_ENTRY", "FIRST_RESERVED_GDT_BYTE", "MACH2PHYS_VIRT_START",
             "MACH2PHYS_VIRT_END", "XEN_LEGACY_MAX_VCPUS", "NR_VIRQS", "EVTCHN_2L_NR_CHANNELS",
             "DOMID_SELF", "DOMID_XEN", "DOMID_INVALID", "MMU_NORMAL_PT_UPDATE",
             "MMU_MACHPHYS_UPDATE", "MMU_PT_UPDATE_PRESERVE_AD", "MMU_PT_UPDATE_NO_TRANSLATE",
             "UVMF_NONE", "UVMF_TLB_FLUSH", "UVMF_INVLPG", "UVMF_FLUSHTYPE_MASK", "UVMF_ALL",
             "SEGBASE_FS", "SEGBASE_GS_USER", "SEGBASE_GS_KERNEL", "SEGBASE_GS_USER_SEL",
             "CONSOLEIO_write", "CONSOLEIO_read", "XENFEAT_writable_page_tables",
             "XENFEAT_supervisor_mode_kernel", "VCPU_SSHOTTMR_future", "CALLBACKF_mask_events",
             "VGCF_in_syscall", "XEN_PVCLOCK_TSC_STABLE_BIT", "MAX_GUEST_CMDLINE"]:
    item(name, name, getattr(abi, name))
item("FLAT_RING3_SS", "FLAT_RING3_SS64", abi.FLAT_RING3_SS)
item("HYPERVISOR_VIRT_START", "__HYPERVISOR_VIRT_START", abi.HYPERVISOR_VIRT_START)
item("HYPERVISOR_VIRT_END", "__HYPERVISOR_VIRT_END", abi.HYPERVISOR_VIRT_END)
item("TI_FLAG_MASK_EVENTS", "({ struct trap_info t = {0}; TI_SET_IF(&t, 1); t.flags; })",
     abi.TI_FLAG_MASK_EVENTS)

# -- start_info / shared_info / vcpu_info / vcpu_time_info ----------------------------------------
_START_INFO_C = {"console_mfn": "console.domU.mfn", "console_evtchn": "console.domU.evtchn"}
for m in abi.StartInfo:
    item(f"start_info.{m.name}", f"offsetof(start_info_t, {_START_INFO_C.get(m.name, m.name)})", m)
item("sizeof(start_info)", "sizeof(start_info_t)", abi.START_INFO_SIZE)
item("sizeof(start_info.cmd_line)", "sizeof(((start_info_t *)0)->cmd_line)", abi.MAX_GUEST_CMDLINE)
item("sizeof(start_info.magic)", "sizeof(((start_info_t *)0)->magic)", 32)
_VCPU_INFO_C = {"evtchn_upcall_pending": "evtchn_upcall_pending",
                "evtchn_upcall_mask": "evtchn_upcall_mask",
                "evtchn_pending_sel": "evtchn_pending_sel", "arch_cr2": "arch.cr2", "time": "time"}
for m in abi.VcpuInfo:
    item(f"vcpu_info.{m.name}", f"offsetof(struct vcpu_info, {_VCPU_INFO_C[m.name]})", m)
item("sizeof(vcpu_info)", "sizeof(struct vcpu_info)", abi.VCPU_INFO_SIZE)
for m in abi.VcpuTimeInfo:
    item(f"vcpu_time_info.{m.name}", f"offsetof(struct vcpu_time_info, {m.name})", m)
item("sizeof(vcpu_time_info)", "sizeof(struct vcpu_time_info)", timers._TIME_INFO.size)
for nm, off in _struct_fields(timers._TIME_INFO, ["version", "tsc_timestamp", "system_time",
                                                   "tsc_to_system_mul", "tsc_shift", "flags"]):
    item(f"timers._TIME_INFO.{nm}", f"offsetof(struct vcpu_time_info, {nm})", off)
for m in abi.SharedInfo:
    item(f"shared_info.{m.name}", f"offsetof(struct shared_info, {m.name})", m)
item("sizeof(shared_info)", "sizeof(struct shared_info)", abi.SHARED_INFO_SIZE)
item("sizeof(shared_info.evtchn_pending)", "sizeof(((struct shared_info *)0)->evtchn_pending)",
     abi.EVTCHN_2L_NR_CHANNELS // 8)

# -- hypercall argument structs ------------------------------------------------------------------
_STRUCTS = [
    ("trap_info", "struct trap_info", abi.TRAP_INFO, ["vector", "flags", "cs", "address"]),
    ("multicall_entry", "multicall_entry_t", abi.MULTICALL_ENTRY,
     ["op", "result"] + [f"args[{i}]" for i in range(6)]),
    ("mmu_update", "struct mmu_update", abi.MMU_UPDATE, ["ptr", "val"]),
    ("mmuext_op", "struct mmuext_op", abi.MMUEXT_OP, ["cmd", "arg1", "arg2"]),
    ("iret_context", "struct iret_context", abi.IRET_CONTEXT,
     ["rax", "r11", "rcx", "flags", "rip", "cs", "rflags", "rsp", "ss"]),
    ("callback_register", "struct callback_register", abi.CALLBACK_REGISTER,
     ["type", "flags", "address"]),
    ("sched_poll", "struct sched_poll", abi.SCHED_POLL, ["ports", "nr_ports", "timeout"]),
    ("vcpu_set_singleshot_timer", "struct vcpu_set_singleshot_timer",
     abi.VCPU_SET_SINGLESHOT_TIMER, ["timeout_abs_ns", "flags"]),
    ("evtchn_status", "struct evtchn_status", abi.EVTCHN_STATUS,
     ["dom", "port", "status", "vcpu", "u.interdomain.dom", None, "u.interdomain.port"]),
    ("evtchn_alloc_unbound", "struct evtchn_alloc_unbound", events._ST_U16_U16_U32,
     ["dom", "remote_dom", "port"]),
    ("evtchn_bind_interdomain", "struct evtchn_bind_interdomain", events._ST_U16_2_U32_U32,
     ["remote_dom", "remote_port", "local_port"]),
    ("evtchn_bind_virq", "struct evtchn_bind_virq", events._ST_U32_U32_U32,
     ["virq", "vcpu", "port"]),
    ("evtchn_bind_vcpu", "struct evtchn_bind_vcpu", events._ST_U32_U32, ["port", "vcpu"]),
]
for label, ctype, st, names in _STRUCTS:
    item(f"sizeof({label})", f"sizeof({ctype})", st.size)
    for nm, off in _struct_fields(st, names):
        item(f"{label}.{nm}", f"offsetof({ctype}, {nm})", off)
item("sizeof(iret_context)==IRET_CONTEXT_SIZE", "sizeof(struct iret_context)", abi.IRET_CONTEXT_SIZE)
item("evtchn_status.u.virq", "offsetof(struct evtchn_status, u.virq)", 16)
item("evtchn_status.u.unbound.dom", "offsetof(struct evtchn_status, u.unbound.dom)", 16)


def _c_source() -> str:
    out = [f"#define __XEN_INTERFACE_VERSION__ {XENIF}", "#include <stddef.h>",
           "#include <stdint.h>", "#include <stdio.h>"]
    out += [f"#include <{h}>" for h in HEADERS]
    out.append("int main(void) {")
    for ident, expr, _ in ITEMS:
        out.append(f'    printf("%s %llu\\n", "{ident}", (unsigned long long)({expr}));')
    out.append("    return 0;\n}")
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def xen_values(tmp_path_factory) -> dict[str, int]:
    if not Path("/usr/include/xen/xen.h").exists():
        pytest.fail("Xen public headers missing: apt-get install libxen-dev")
    if not shutil.which("gcc"):
        pytest.fail("gcc missing")
    d = tmp_path_factory.mktemp("abi")
    (d / "abi.c").write_text(_c_source())
    r = subprocess.run(["gcc", "-std=gnu11", "-O0", "-w", "abi.c", "-o", "abi"], cwd=d,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    run = subprocess.run([str(d / "abi")], capture_output=True, text=True, check=True)
    vals = {}
    for line in run.stdout.splitlines():
        k, v = line.rsplit(" ", 1)
        vals[k] = int(v)
    return vals


def test_items_unique():
    ids = [i for i, _, _ in ITEMS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("ident,expr,value", ITEMS, ids=[i for i, _, _ in ITEMS])
def test_abi(xen_values, ident, expr, value):
    assert ident in xen_values
    assert value == xen_values[ident], f"{ident}: aiovmm {value:#x}, Xen ({expr}) {xen_values[ident]:#x}"
