"""Exits per block request on the KVM engine, by kind and hypercall number (issue 14,
block): one Linux guest, booted once, fio's four jobs repeated in the same boot.

One Debian Linux guest (bench/blk.py's kernel and fio initramfs, blkfront with 256 indirect
segments) on the KVM engine with one vbd on a pre-filled image. The guest runs --reps
rounds of fio's four jobs (seqread / seqwrite 1 MiB iodepth 8, randread / randwrite 4 KiB
iodepth 32, O_DIRECT libaio, --runtime s each). For each job (`FIO-BEGIN <job>.<rep>` on
the guest's console) the host counts from 1 s and --warm-requests requests after the job's
first request (fio's process start, ~40-60k exits, is not I/O; under load it runs on past
the first request) to its end: the engine's
exits by kind, the domain's hypercalls by number, the guest's notifies on the vbd's port,
blkback's drains and events, the process CPU; all per request. Prints what
blkfront negotiated (xenstore and the guest's sysfs), one table per job and the medians
per job with the load average, and per job kind a least-squares fit of exits/s against
requests/s over the rounds: the slope is the marginal exits per request, the intercept the
guest's exits per second that do not scale with its I/O (per-request figures include a
share of those, larger the slower the run: they vary 2-4x with the host's load alone).

The census (Census, installed once fio's disk is up): hypercall sub-operations (sub:), user
system calls by number (usys all: every one, KVMEngine.census; usys py: Python's), upcalls,
why an iret went to Python (iret py: the first of fast_iret's tests that fails), blkback's
thread CPU per request in its entries (blk _pass / _after_reap / _answer us; uring enter us
is io_uring_enter with the reap it runs inline) and io_uring's submit-to-completion time.

--scheds mq-deadline,none alternates the guest's elevator for xvda per round in the same
boot (rows per job and elevator); --ctx has the guest list every thread's context switches
from /proc before and after each job and prints them per request by thread name (fio's own
threads have exited by then and are not in it; each listing takes the guest seconds).

(This bench once took --modes: blkback's inline drain in the guest's notify, InlineKick
DRAIN / DRAIN_ARM, and response coalescing C<us> were measured with it against the default
in the same boot and removed: backends/block/README.md.)
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import collections
import pstats
import gzip
import os
import resource
import statistics
import sys
import tempfile
import time

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blk as blkbench                                    # noqa: E402  (bench/blk.py)

from aiovmm import Hypervisor                               # noqa: E402
from aiovmm import abi, emulate, hypercall as hcmod, traps  # noqa: E402
from aiovmm.backends.block import device as blkdev          # noqa: E402
from aiovmm.xenbus import read_str                          # noqa: E402

HC_NAMES = {1: "mmu_update", 3: "stack_switch", 13: "multicall", 14: "update_va_mapping",
            15: "set_timer_op", 17: "xen_version", 20: "grant_table_op", 23: "iret", 24: "vcpu_op",
            25: "set_segment_base", 26: "mmuext_op", 29: "sched_op", 32: "event_channel_op"}

# Sub-operations worth naming in the census (the rest print as numbers).
SUB_NAMES = {32: {int(x): x.name for x in abi.EvtchnOp}, 24: {int(x): x.name for x in abi.VcpuOp},
             29: {int(x): x.name for x in abi.SchedOp}}
SYS_NAMES = {0: "read", 1: "write", 3: "close", 7: "poll", 9: "mmap", 11: "munmap", 13: "rt_sigaction",
             14: "rt_sigprocmask", 15: "rt_sigreturn", 24: "sched_yield", 35: "nanosleep", 39: "getpid",
             56: "clone", 60: "exit", 61: "wait4", 96: "gettimeofday", 202: "futex", 206: "io_setup",
             208: "io_getevents", 209: "io_submit", 228: "clock_gettime", 230: "clock_nanosleep",
             231: "exit_group", 232: "epoll_wait", 270: "pselect6", 271: "ppoll", 281: "epoll_pwait",
             333: "io_pgetevents", 17: "pread64", 18: "pwrite64", 5: "fstat", 8: "lseek"}


class Census:
    """What the KVM engine's counters do not split, counted by wrapping the dispatch targets
    (the hypercall TABLE's handlers, traps.user_syscall, traps.deliver_event) and blkback's
    entry points on the loop: hypercall sub-operations (Python's; C's are "in C:"), user
    system calls by number (C's bounces from csrc/kvm.c's histogram, Python's here), event
    upcalls, and blkback's own thread CPU per entry and io_uring submit-to-completion time."""

    def __init__(self) -> None:
        self.c: collections.Counter[str] = collections.Counter()
        self.lat: list[float] = []

    def install(self, bb: blkdev.Blkback) -> None:
        c = self.c
        for nr in (20, 24, 29, 32, 12, 33):
            fn = hcmod.TABLE.get(nr)
            if fn is None:
                continue
            names = SUB_NAMES.get(nr, {})
            hname = HC_NAMES.get(nr, str(nr))

            def wrap(v, a1, a2, a3, a4, a5, fn=fn, names=names, hname=hname):
                c[f"sub:{hname}.{names.get(a1 & 0xFFFF, a1 & 0xFFFF)}"] += 1
                return fn(v, a1, a2, a3, a4, a5)
            hcmod.TABLE[nr] = wrap
        do_iret = hcmod.TABLE[23]

        def iret(v, *a):
            # Why C's fast_iret left this one to Python (csrc/kvm.c): the first test that fails.
            eng, pv = v.engine, v.pv
            ctx = getattr(eng, "_ctx", None)
            rsp = eng.get("rsp")
            try:
                _ax, _r11, _cx, flags, rip, cs, rflags, _sp, ss = v.read_struct(rsp, traps.IRET_CONTEXT)
            except Exception:
                flags = rip = cs = rflags = ss = 0
            sysret = bool(flags & 0x100) and (rip < 1 << 47 or rip >= 0xFFFF800000000000)
            if ctx is None:
                why = "no C"
            elif not ctx.fast_hc:
                why = "fast_hc off"
            elif pv.kernel_root != ctx.ready_kroot:
                why = "kernel root not ready"
            elif cs & 3 == 3 and pv.user_root != ctx.ready_uroot:
                why = "user root not ready"
            elif (rsp & 0xFFF) > 4096 - 72:
                why = "context crosses a page"
            elif not sysret and (cs & 0xFFFF) | 3 != 0xE033 and not _cs64_ok(v, cs):
                why = f"cs {cs:#x}: {_cs64_ok(v, cs, True)}"
            elif sysret and (cs & 0xFFFF) | 3 == 0xE023:
                why = "sysret to 32-bit"
            elif eng.get("ss") & 0xFFFF != 0xE02B:
                why = f"current ss {eng.get('ss'):#x}"
            elif not sysret and (ss & 0xFFFF) | 3 != 0xE02B:
                why = f"frame ss {ss:#x}"
            elif (rflags >> 12) & 3 != pv.iopl and emulate.architectural_iopl(v):
                why = "iopl"
            else:
                why = f"other (sysret {sysret})"
            c[f"iret py {'user' if cs & 3 == 3 else 'kernel'}: {why}"] += 1
            return do_iret(v, *a)
        hcmod.TABLE[23] = iret
        us = traps.user_syscall

        def user_syscall(v):
            nr = v.engine.regs[0]
            c[f"usys py:{SYS_NAMES.get(nr, nr)}"] += 1
            return us(v)
        traps.user_syscall = user_syscall
        de = traps.deliver_event

        def deliver_event(v):
            c["upcall py"] += 1
            return de(v)
        traps.deliver_event = deliver_event
        tt = time.thread_time_ns
        for name in ("_pass", "_after_reap", "_answer"):
            orig = getattr(bb, name)

            def timed(orig=orig, name=name):
                t = tt()
                try:
                    return orig()
                finally:
                    c[f"blk {name} us"] += (tt() - t) / 1e3
                    c[f"blk {name} calls"] += 1
            setattr(bb, name, timed)
        u = bb.uring
        if u is not None:
            u.after_reap = bb._after_reap
        if u is not None:
            sub = u.submit
            pc = time.perf_counter

            def submit(write, fd, offset, iov, on_done=None, offload=False):
                t = pc()

                def done(f, on_done=on_done):
                    self.lat.append(pc() - t)
                    if on_done is not None:
                        on_done(f)
                return sub(write, fd, offset, iov, done, offload)
            u.submit = submit
            fl = u.flush

            def flush():
                t = tt()
                try:
                    return fl()
                finally:
                    c["uring enter us"] += (tt() - t) / 1e3
                    c["uring enters"] += 1
            u.flush = flush


CENSUS = Census()


def _cs64_ok(v, cs: int, why: bool = False):
    """csrc/kvm.c iret_cs64's test of a frame's CS against the guest's first GDT page."""
    import struct
    sel = (cs & 0xFFFF) | 3
    off = sel & ~7
    pv = v.pv
    if (sel & 4) or off == 0 or off + 8 > 4096 or not pv.gdt_frames_nr:
        return f"sel/off/frames_nr {pv.gdt_frames_nr}" if why else False
    desc = struct.unpack_from("<Q", v.engine.mem.map, (pv.gdt_frame0 << 12) + off)[0]
    hi = desc >> 32
    ok = (hi & 0x1000) and (hi & 0x800) and (hi & 0x8000) and ((hi & 0x400) or (hi & 0x6000) == 0x6000) \
        and (hi & 0x200000) and not (hi & 0x400000)
    return (f"desc {desc:#018x} frame0 {pv.gdt_frame0:#x}" if why else bool(ok))

SCRIPT = """#!/bin/sh
DEV=/dev/xvda
i=0
while [ ! -b $DEV ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "FIO-DEV $DEV $(cat /sys/block/xvda/size)"
for f in /sys/block/xvda/queue/max_hw_sectors_kb /sys/block/xvda/queue/max_sectors_kb \\
         /sys/block/xvda/queue/max_segments /sys/block/xvda/queue/nr_requests \\
         /sys/block/xvda/mq/*/nr_tags /sys/module/xen_blkfront/parameters/*; do
    echo "SYSFS $f $(cat $f 2>/dev/null)"
done
ctx() {
    for t in /proc/[0-9]*/task/[0-9]*; do
        echo "CTX $(basename $t) $(cat $t/comm 2>/dev/null | tr ' ' _) $(grep ctxt_switches $t/status 2>/dev/null | awk '{printf "%s ", $2}')"
    done
    echo "$1"
}
rep=0
while [ $rep -lt @REPS@ ]; do
    for job in @JOBS@; do
        set -- $(echo "$job" | tr : ' ')
@SCHEDLINE@        echo "SCHED $1.$rep $(cat /sys/block/xvda/queue/scheduler)"
        [ @CTX@ = 1 ] && ctx "CTX-BEGIN $1.$rep"
        echo "FIO-BEGIN $1.$rep"
        fio --name="$1" --filename=$DEV --direct=1 --ioengine=libaio --rw="$2" --bs="$3" \\
            --iodepth="$4" --runtime=@RUNTIME@ --ramp_time=1 --time_based --thread --norandommap \\
            --randrepeat=0 --size=@SIZE@M --output-format=json
        echo "FIO-END $1.$rep"
        [ @CTX@ = 1 ] && ctx "CTX-END $1.$rep"
    done
    rep=$((rep + 1))
done
"""

FRONT_KEYS = ("ring-page-order", "num-ring-pages", "multi-queue-num-queues", "feature-persistent",
              "protocol", "event-channel")
BACK_KEYS = ("feature-persistent", "feature-max-indirect-segments", "max-ring-page-order",
             "multi-queue-max-queues", "feature-flush-cache", "feature-discard")


def initrd(td: str, reps: int, runtime: int, size_mib: int, ctx: bool = False,
           scheds: tuple[str, ...] = ()) -> str:
    sys.path.insert(0, os.path.join(blkbench.ROOT, "guests/linux"))
    import build as linux_build                    # its Cpio writer
    script = (SCRIPT.replace("@JOBS@", " ".join(f"{n}:{rw}:{bs}:{d}" for n, rw, bs, d in blkbench.FIO_JOBS))
              .replace("@REPS@", str(reps))
              .replace("@RUNTIME@", str(runtime)).replace("@SIZE@", str(size_mib))
              .replace("@CTX@", "1" if ctx else "0")
              .replace("@SCHEDLINE@", "" if not scheds else
                       f"        set -- {' '.join(scheds)}; shift $((rep % {len(scheds)}))\n"
                       "        echo \"$1\" > /sys/block/xvda/queue/scheduler\n"
                       "        set -- $(echo \"$job\" | tr : ' ')\n"))
    c = linux_build.Cpio()
    c.file("bench.sh", script.encode(), 0o755)
    path = os.path.join(td, "initramfs-blk-exits.cpio.gz")
    with open(blkbench.TOOLS_INITRD, "rb") as f, open(path, "wb") as out:
        out.write(f.read())
        out.write(gzip.compress(c.finish(), mtime=0))
    return path


def snapshot(dom, bb: blkdev.Blkback) -> dict[str, float]:
    eng = dom.vcpus[0].engine
    st = bb.stats
    ru = resource.getrusage(resource.RUSAGE_SELF)
    s: dict[str, float] = {f"exit:{k}": n for k, n in getattr(eng, "exit_kinds", {}).items()}
    s.update(exits=getattr(eng, "exits", 0), kicks=getattr(eng, "kicks", 0),
             cpu_ms=(ru.ru_utime + ru.ru_stime) * 1e3, ctx_invol=ru.ru_nivcsw,
             requests=st.rd_reqs + st.wr_reqs, sectors=st.rd_sectors + st.wr_sectors,
             drains=st.batches, events=st.events_sent,
             notifies=bb.port.notifications if bb.port is not None else 0, t=time.perf_counter())
    for nr, n in dom.hypercall_counts.items():
        s[f"hc:{HC_NAMES.get(nr, nr)}"] = n
    sch = dom.hypervisor.scheduler.state(dom.vcpus[0])
    s["slices"] = sch.slices
    s["vcpu_ms"] = sch.cpu_ns / 1e6                 # wall time in the vCPU's slices
    s["runq_wait_ms"] = sch.wait_ns / 1e6           # runnable, waiting for the loop
    s["host_steal_ms"] = sch.host_steal_ns / 1e6    # slice wall time the host gave others
    s["blk_io_ms"] = st.io_ns / 1e6
    s["thread_cpu_ms"] = time.thread_time() * 1e3      # the loop thread: vCPU and backends
    s["guest_cpu_ms"] = blkbench.guest_ms()                    # of it, the guest itself (in KVM_RUN)
    for k, n in getattr(eng, "exits_in_c", {}).items():
        s[f"in C:{k}"] = n
    for key, n in (eng.census().items() if hasattr(eng, "census") else ()):
        if key[0] == "user syscall":         # every exit, C's and Python's (KVMEngine.census)
            s[f"usys all:{SYS_NAMES.get(key[1], key[1])}"] = n
    s.update(CENSUS.c)
    s["uring lat n"] = len(CENSUS.lat)
    s["uring lat sum us"] = sum(CENSUS.lat) * 1e6
    return s


def show(title: str, d: dict[str, float], n: float) -> None:
    print(f"  {title}: per request (n={n:.0f}), load {os.getloadavg()[0]:.1f}", flush=True)
    if d.get("uring lat n"):
        print(f"    io_uring submit->completion seen: mean {d['uring lat sum us'] / d['uring lat n']:.0f} us "
              f"over {d['uring lat n']:.0f}", flush=True)
    for k in sorted(d, key=lambda k: -d[k]):
        if k in ("t", "requests", "sectors", "uring lat n", "uring lat sum us") or not d[k]:
            continue
        if (k.startswith("hc:") and d[k] / n < 0.05) or d[k] / n < 0.005:
            continue
        print(f"    {k:<28}{d[k] / n:10.2f}")


def profile_report(prof: cProfile.Profile, n: float, wall: float) -> None:
    """The loop thread's CPU time in the window by function (cProfile, time.thread_time):
    own time per request of the top entries. KVM_RUN is the ctypes call into csrc/kvm.c (the
    guest running, the C-completed exits, and the world switches); epoll is the loop idle."""
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])     # tottime
    total = sum(v[2] for _k, v in rows)
    print(f"    profile: {total:.2f} s thread CPU in {wall:.2f} s wall; own CPU per request (us), calls per request:")
    for (fn, line, name), (_cc, nc, tt, _ct, _callers) in rows[:args_top]:
        print(f"      {tt / n * 1e6:9.0f} us {nc / n:8.2f}  {os.path.basename(fn)}:{line}({name})")


args_top = 22


def _ctx_dump(lines: list[str], tag: str) -> dict[str, tuple[str, int]]:
    """tid -> (comm, voluntary + involuntary switches) from the guest's dump ending in `tag`."""
    end = max(i for i, ln in enumerate(lines) if ln.strip() == tag)
    cur: dict[str, tuple[str, int]] = {}
    for ln in reversed(lines[:end]):
        f = ln.split()
        if not f or f[0] != "CTX":
            break
        if len(f) >= 5:
            cur[f[1]] = (f[2], int(f[3]) + int(f[4]))
    return cur


def ctx_report(lines: list[str], tag: str, n: float) -> None:
    """The guest's context switches from just before fio started to just after it ended, per
    thread name (fio's own threads are gone by then: not counted), per request in the window."""
    a, b = _ctx_dump(lines, f"CTX-BEGIN {tag}"), _ctx_dump(lines, f"CTX-END {tag}")
    per: dict[str, int] = collections.Counter()
    for tid, (comm, c) in b.items():
        per[comm] += c - a.get(tid, (comm, 0))[1]
    top = [(k, v) for k, v in per.most_common(8) if v > 0]
    print("    guest switches per request by thread: "
          + ", ".join(f"{k} {v / n:.2f}" for k, v in top) + f" (all {sum(per.values()) / n:.2f})", flush=True)


async def main(args) -> None:
    rows: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="aiovmm-bench-blkx-") as td:
        if not os.path.exists(blkbench.TOOLS_INITRD):
            blkbench.linux_assets()
        image = os.path.join(td, "linux.img")
        blkbench.prefill(image, args.image_mib)
        scheds = tuple(x for x in args.scheds.split(",") if x)
        rd = initrd(td, args.reps, args.runtime, args.image_mib, args.ctx, scheds)
        cmdline = (f"console=hvc0 quiet {blkbench.BLKFRONT_ARGS} {args.extra} "
                   f"aiovmm.run=/bin/sh,/bench.sh aiovmm.exit=1").replace("  ", " ")
        async with Hypervisor(memory_mib=blkbench.GUEST_MIB + 128) as hv:
            t0 = time.perf_counter()
            dom = await hv.create(blkbench.VMLINUZ, memory_mib=blkbench.GUEST_MIB, ramdisk=rd, cmdline=cmdline,
                                  disks=[f"target={image},vdev=xvda,access=rw"], engine=args.engine)
            bb = next(b for b in dom.backends if isinstance(b, blkdev.Blkback))
            await dom.wait_for_line(r"^FIO-DEV ", timeout=args.boot_timeout)
            CENSUS.install(bb)
            print(f"{args.engine}: fio device after {time.perf_counter() - t0:.0f} s", flush=True)
            st = hv.xenstore.store
            print("negotiated (xenstore): front "
                  + " ".join(f"{k}={read_str(st, f'{bb.front}/{k}', '-')}" for k in FRONT_KEYS)
                  + "; back " + " ".join(f"{k}={read_str(st, f'{bb.back}/{k}', '-')}" for k in BACK_KEYS)
                  + f"; ring entries {bb.ring.nr_ents if bb.ring else '-'}", flush=True)
            for rep in range(args.reps):
                for job, *_ in blkbench.FIO_JOBS:
                    tag = f"{job}.{rep}"
                    mode = ""
                    await dom.wait_for_line(rf"^FIO-BEGIN {tag}$", timeout=3600)
                    if rep == 0 and job == blkbench.FIO_JOBS[0][0]:
                        print("the guest's blkfront (sysfs): " + "; ".join(
                            ln.rstrip()[6:] for ln in dom.console_lines if ln.startswith("SYSFS ")), flush=True)
                    # The window opens 1 s after the job's first request and after
                    # --warm-requests more: under load fio's start (its libraries faulted
                    # in: #PF, mmu_update) ran on past its first request.
                    end = asyncio.ensure_future(dom.wait_for_line(rf"^FIO-END {tag}$", timeout=3600))
                    first = bb.stats.rd_reqs + bb.stats.wr_reqs
                    while bb.stats.rd_reqs + bb.stats.wr_reqs == first and not end.done():
                        await asyncio.sleep(0.02)
                    await asyncio.wait([end], timeout=1.0)
                    while bb.stats.rd_reqs + bb.stats.wr_reqs - first < args.warm_requests and not end.done():
                        await asyncio.sleep(0.02)
                    if end.done():
                        await end
                        print(f"  [{rep}] {job}: fewer than {args.warm_requests} requests before its end "
                              f"(load {os.getloadavg()[0]:.1f}); left out", flush=True)
                        continue
                    # Thread CPU time, not wall time: on a loaded host wall time mostly
                    # measures preemption (KVM_RUN's includes the guest's own CPU).
                    prof = cProfile.Profile(time.thread_time) if args.profile else None
                    a = snapshot(dom, bb)
                    if prof is not None:
                        prof.enable()
                    await end
                    if prof is not None:
                        prof.disable()
                    b = snapshot(dom, bb)
                    d = {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b)}
                    n = max(1.0, d["requests"])
                    res = blkbench.parse_fio(list(dom.console_lines)).get(tag)
                    unit = "MB/s" if job.startswith("seq") else "IOPS"
                    if scheds:                      # what the guest's sysfs said before the job
                        print("  " + next((ln.strip() for ln in dom.console_lines
                                           if ln.startswith(f"SCHED {tag} ")), f"SCHED {tag} ?"), flush=True)
                    show(f"[{rep}] {job}{'/' + scheds[rep % len(scheds)] if scheds else ''}{'/' + mode if mode else ''} {res if res is not None else float('nan'):.1f} {unit}"
                         f" ({d['requests'] / d['t']:.0f} requests/s, {d['sectors'] / n / 2:.0f} KiB each)", d, n)
                    if prof is not None:
                        profile_report(prof, n, d["t"])
                    if args.ctx:
                        await dom.wait_for_line(rf"^CTX-END {tag}$", timeout=600)
                        ctx_report(list(dom.console_lines), tag, n)
                    sched = scheds[rep % len(scheds)] if scheds else mode
                    rows[f"{job}/{sched}" if sched else job].append({
                        "fio": res or 0.0, "req_s": d["requests"] / d["t"], "exits_s": d["exits"] / d["t"],
                        "exits": d["exits"] / n, "notifies": d["notifies"] / n, "drains": d["drains"] / n,
                        "events": d["events"] / n, "cpu_ms": d["cpu_ms"] / n,
                        "xen_version": d.get("hc:xen_version", 0) / n, "iret": d.get("hc:iret", 0) / n,
                        "stack_switch": d.get("hc:stack_switch", 0) / n, "slices": d["slices"] / n,
                        "iret_user_C": d.get("in C:iret to user", 0) / n,
                        "iret_py": sum(v for k, v in d.items() if k.startswith("iret py")) / n,
                        "blk_us": d.get("blk _pass us", 0) / n + d.get("blk _after_reap us", 0) / n,
                        "guest_ms": d["guest_cpu_ms"] / n,
                        "thread_ms": d["thread_cpu_ms"] / n, "load": os.getloadavg()[0]})
            await dom.wait()
            print(f"blkback: {bb.stats}")
    print("medians per job:")
    for job, rs in rows.items():
        print(f"  {job:9s} " + " ".join(f"{k}={statistics.median(r[k] for r in rs):.2f}" for k in rs[0]))
    print("exits/s = intercept + slope x requests/s, least squares over the rounds:")
    for job, rs in rows.items():
        if len(rs) >= 2 and len({r["req_s"] for r in rs}) >= 2:
            slope, icpt = statistics.linear_regression([r["req_s"] for r in rs], [r["exits_s"] for r in rs])
            print(f"  {job:9s} marginal exits per request {slope:.1f}, exits/s not from I/O {icpt:.0f} "
                  f"(n={len(rs)})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    ap.add_argument("--warm-requests", type=int, default=16,
                    help="requests a job makes before its window opens (and at least 1 s)")
    ap.add_argument("--image-mib", type=int, default=256)
    ap.add_argument("--engine", default="kvm")
    ap.add_argument("--scheds", default="",
                    help="the guest's I/O schedulers for xvda alternated per round in the same boot "
                         "(e.g. mq-deadline,none: Linux's default for a one-queue device, and none)")
    ap.add_argument("--ctx", action="store_true",
                    help="after each job the guest lists every thread's context switches: print "
                         "the threads' voluntary + involuntary switches per request in the job")
    ap.add_argument("--extra", default="", help="more kernel command line (e.g. xen_blkfront.max_ring_page_order=2)")
    ap.add_argument("--boot-timeout", type=float, default=900)
    ap.add_argument("--profile", action="store_true",
                    help="cProfile the loop thread (its CPU time) in each job's window")
    ap.add_argument("--jobs", default="",
                    help="fio jobs name:rw:bs:depth,... (default bench/blk.py's four; e.g. "
                         "randread1:randread:4k:1,seqread1:read:1M:1)")
    a = ap.parse_args()
    if a.jobs:
        blkbench.FIO_JOBS = [(n, rw, bs, int(d)) for n, rw, bs, d in (j.split(":") for j in a.jobs.split(","))]
    uvloop.run(main(a))
