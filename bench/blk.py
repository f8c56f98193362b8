"""Block I/O: Debian's Linux with fio on aiovmm's blkback against the same guest on QEMU
(TCG, virtio-blk), in one run; then the older pure-Python references.

Part 1 (issue 14): Debian's kernel (guests/build/linux/vmlinuz) with the test initramfs plus
guests/linux/tools.py's archive (Debian's fio with its libraries, the virtio modules) and a
script, 512 MiB, one vbd on a pre-filled image file (--image-mib, 1 GiB, random data, warm in
the host's page cache). fio in the guest, O_DIRECT, libaio, time based (--runtime s each):
  seqread / seqwrite    1 MiB blocks, iodepth 8   -> MB/s
  randread / randwrite  4 KiB blocks, iodepth 32  -> IOPS
then, on the last engine of --engines (kvm where it exists) and on QEMU, the issue's sized
run: --gib MiB (1 GiB) written once through and read back, O_DIRECT, 1 MiB, iodepth 8 -> s.
Systems, one after the other on the same image:
  aiovmm/<engine>            xen-blkfront with persistent grants, indirect descriptors and
                             one ring page, and xen_blkfront.max_indirect_segments=256 on the
                             kernel command line (Debian's default is 32: a 1 MiB request
                             became 8 blkif requests, ~5 exits each; with 256 it is one, as
                             QEMU's virtio-blk takes it whole with its 254 segments);
  aiovmm/<engine>/nopersist  the same with xen_blkfront.feature_persistent=0 (the frontend
                             grants its bio pages directly: no copy in the guest, one grant
                             map per segment in blkback);
  aiovmm/unicorn/pool        persistent grants, io_uring off (AIOVMM_BLK_URING=0): every
                             request through the thread pool, as before issue 14;
  qemu-tcg                   Debian's qemu-system-x86, `-accel tcg`, pc machine, the same kernel
                             and initramfs, `-drive if=virtio,format=raw` on the same image
                             (QEMU's default cache=writeback, as aiovmm's buffered host I/O).
Engines (--engines): every one available here by default, unicorn and kvm where /dev/kvm
works (a guest that does not reach fio within --kvm-timeout is reported and left out).
Per engine: its best system on each figure over QEMU's.

Part 2 (the earlier figures, kept as references): the project's C blkfront guest (blk.elf)
against the host doing the same I/O through blkback's pool (`Backing.run_batch`), for the
stores in --old-stores (file, loop, lv).

Last line: seq_read_ratio=<..> seq_write_ratio=<..> rand_read_ratio=<..>
rand_write_ratio=<..>: the faster engine's (the larger product of its four ratios) best
system on each figure / QEMU TCG.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import uvloop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from aiovmm import Hypervisor                       # noqa: E402
from aiovmm.abi import ShutdownReason               # noqa: E402
from aiovmm.backends.block import device as blkdev  # noqa: E402
from aiovmm.backends.block import io as bio         # noqa: E402

GUEST = os.path.join(ROOT, "guests/build/tests/blk.elf")
M64 = (1 << 64) - 1
SIZE_MIB = 64
SEQ_BS = 88 * 512                 # the largest blkif request (11 pages)
LVM_CONFIG = "global { activation = 0 }"


def _sh(*cmd: str, check: bool = True) -> str:
    env = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")
    r = subprocess.run(list(cmd), capture_output=True, text=True, env=env)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout.strip()


def offsets(kind: str, ops: int, bs: int, span: int, seed: int) -> list[int]:
    """Byte offsets of blk.c's bench pattern (same LCG)."""
    blocks = span // bs
    if kind.startswith("seq"):
        return [(i % blocks) * bs for i in range(ops)]
    out, st = [], seed
    for _ in range(ops):
        st = (st * 6364136223846793005 + 1442695040888963407) & M64
        out.append(((st >> 33) % blocks) * bs)
    return out


async def reference(backing: bio.Backing, kind: str, bs: int, ops: int, depth: int, span: int,
                    seed: int) -> float:
    """Seconds for the host to do the pattern through blkback's pool and run_batch."""
    loop = asyncio.get_running_loop()
    buf = mmap.mmap(-1, bs * depth)
    views = [memoryview(buf)[i * bs:(i + 1) * bs] for i in range(depth)]
    free = list(range(depth))
    offs = offsets(kind, ops, bs, span, seed)
    op = "write" if kind.endswith("write") else "read"
    pending: set[asyncio.Future] = set()
    issued = 0
    t0 = time.perf_counter()
    while issued < ops or pending:
        batch = []
        while issued < ops and free:
            slot = free.pop()
            batch.append((slot, bio.IORequest(op, offs[issued], [views[slot]], bs)))
            issued += 1
        if batch:
            k = max(1, min(blkdev.JOBS_PER_BATCH, -(-len(batch) // blkdev.REQS_PER_JOB)))
            size = -(-len(batch) // k)
            for i in range(0, len(batch), size):
                chunk = batch[i:i + size]
                fut = loop.run_in_executor(bio.pool(), backing.run_batch, [r for _, r in chunk])
                fut.slots = [s for s, _ in chunk]
                pending.add(fut)
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for f in done:
            for r in f.result():
                if r.error:
                    raise SystemExit(f"reference I/O error {r.error}")
            free.extend(f.slots)
    sec = time.perf_counter() - t0
    for v in views:
        v.release()
    buf.close()
    return sec


async def guest_run(target: str, kind: str, bs: int, ops: int, depth: int, span: int, seed: int):
    async with Hypervisor(memory_mib=256) as hv:
        dom = await hv.create(GUEST, memory_mib=16, disks=[f"target={target},vdev=xvda,access=rw"],
                              cmdline=f"mode=bench bench={kind} ops={ops} depth={depth} "
                                      f"span={span // 512} bs={bs // 512} pattern={seed}")
        reason = await asyncio.wait_for(dom.wait(), 300)
        res = {}
        for line in dom.console_lines:
            m = re.fullmatch(r"result (\S+) (\S+)", line)
            if m:
                res[m.group(1)] = m.group(2)
        if reason != ShutdownReason.poweroff or res.get("errors") != "0" or int(res.get("bench_ops", 0)) != ops:
            raise SystemExit(f"guest failed on {target}: {reason} {dom.console_lines[-5:]}")
        return int(res["io_ns"]) / 1e9, dom.backends[0].stats


def prefill(path: str, size_mib: int) -> None:
    with open(path, "r+b" if path.startswith("/dev/") else "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size_mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


class Stores:
    """file, loop device, LV (on a second loop device); removed on exit, even on failure."""

    def __init__(self, td: str) -> None:
        self.td = td
        self.loops: list[str] = []
        self.vg: str | None = None
        self.pv: str | None = None
        self.targets: dict[str, str] = {}
        self.notes: list[str] = []

    def __enter__(self) -> "Stores":
        f = os.path.join(self.td, "disk.img")
        prefill(f, SIZE_MIB)
        self.targets["file"] = f
        if os.geteuid() != 0 or shutil.which("losetup") is None:
            self.notes.append("loop/lv skipped (needs root and losetup)")
            return self
        lb = os.path.join(self.td, "loop.img")
        prefill(lb, SIZE_MIB)
        dev = _sh("losetup", "--find", "--show", lb)
        self.loops.append(dev)
        self.targets["loop"] = dev
        if shutil.which("lvm") is None:
            self.notes.append("lv skipped (no lvm2)")
            return self
        pb = os.path.join(self.td, "pv.img")
        with open(pb, "wb") as fh:
            fh.truncate((SIZE_MIB + 16) << 20)
        pv = _sh("losetup", "--find", "--show", pb)
        self.loops.append(pv)
        cfg = ["--config", LVM_CONFIG]
        vg = f"aiovmmbench{uuid.uuid4().hex[:8]}"
        _sh("pvcreate", "-q", *cfg, pv)
        self.pv = pv
        _sh("vgcreate", "-q", *cfg, "-s", "4M", vg, pv)
        self.vg = vg
        _sh("lvcreate", "-q", *cfg, "-an", "-Zn", "-L", f"{SIZE_MIB}M", "-n", "lv0", vg)
        pe_start = int(_sh("pvs", *cfg, "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", pv))
        with open(pv, "r+b") as fh:                   # lv0 = the first extents of the PV
            fh.seek(pe_start)
            chunk = os.urandom(1 << 20)
            for _ in range(SIZE_MIB):
                fh.write(chunk)
            os.fsync(fh.fileno())
        self.targets["lv"] = f"lvm:{vg}/lv0"
        return self

    def __exit__(self, *exc) -> None:
        cfg = ["--config", LVM_CONFIG]
        if self.vg:
            _sh("vgremove", "-q", "-f", *cfg, self.vg, check=False)
        if self.pv:
            _sh("pvremove", "-q", "-ff", "-y", *cfg, self.pv, check=False)
        for d in self.loops:
            _sh("losetup", "-d", d, check=False)


async def open_backing(target: str) -> bio.Backing:
    cfg = blkdev.DiskConfig.parse(f"{target},xvda,w")
    bb = blkdev.Blkback.__new__(blkdev.Blkback)       # only for its open_backing()
    bb.cfg, bb.readonly = cfg, False
    return await bb.open_backing()


PATTERNS = [("seqread", SEQ_BS, 32, 1 << 20, 4), ("seqwrite", SEQ_BS, 32, 1 << 20, 4),
            ("randread", 4096, 32, 4096, 32), ("randwrite", 4096, 32, 4096, 32)]


# ------------------------------------------------------------------ part 1: Linux + fio
LINUX = os.path.join(ROOT, "guests/build/linux")
VMLINUZ = os.path.join(LINUX, "vmlinuz")
TOOLS_INITRD = os.path.join(LINUX, "initramfs-tools.cpio.gz")
GUEST_MIB = 512
# Every aiovmm system's guest: blkfront asks for blkback's 256 indirect segments (1 MiB).
BLKFRONT_ARGS = "xen_blkfront.max_indirect_segments=256"
# name, fio --rw, block size, iodepth
FIO_JOBS = [("seqread", "read", "1M", 8), ("seqwrite", "write", "1M", 8),
            ("randread", "randread", "4k", 32), ("randwrite", "randwrite", "4k", 32)]
FIO_SCRIPT = """#!/bin/sh
# bench/blk.py: fio on the one disk, on Xen (xen-blkfront, /dev/xvda) or QEMU (virtio, /dev/vda).
if [ "$(cat /sys/hypervisor/type 2>/dev/null)" = xen ]; then
    DEV=/dev/xvda
else
    while read -r m; do insmod "/lib/modules/$(uname -r)/$m"; done < /etc/aiovmm-virtio-modules
    DEV=/dev/vda
fi
i=0
while [ ! -b $DEV ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "FIO-DEV $DEV $(cat /sys/block/${DEV#/dev/}/size)"
# --io-scheduler: the same elevator on both systems' disk (empty: the kernel's default,
# mq-deadline for a one-queue device such as blkfront's or virtio-blk's with one vCPU).
[ -z "@IOSCHED@" ] || echo "@IOSCHED@" > /sys/block/${DEV#/dev/}/queue/scheduler
echo "FIO-SCHED $(cat /sys/block/${DEV#/dev/}/queue/scheduler)"
for job in @JOBS@; do
    set -- $(echo "$job" | tr : ' ')
    echo "FIO-BEGIN $1"
    fio --name="$1" --filename=$DEV --direct=1 --ioengine=libaio --rw="$2" --bs="$3" \\
        --iodepth="$4" --runtime=@RUNTIME@ --ramp_time=1 --time_based --thread --norandommap --randrepeat=0 \\
        --size=@SIZE@M --output-format=json
    echo "FIO-END $1"
done
# The issue's 1 GiB: written then read once through, O_DIRECT, 1 MiB requests (bench.gib=<MiB>).
GIB=$(sed -n 's/.*bench\\.gib=\\([0-9]*\\).*/\\1/p' /proc/cmdline)
if [ -n "$GIB" ]; then
    for rw in write read; do
        echo "FIO-BEGIN ${rw}gib"
        fio --name="${rw}gib" --filename=$DEV --direct=1 --ioengine=libaio --rw=$rw --bs=1M \\
            --iodepth=8 --thread --size=${GIB}M --output-format=json
        echo "FIO-END ${rw}gib"
    done
fi
"""


def linux_assets() -> str:
    """The kernel, the tools initramfs (guests/linux/tools.py: fetched and built if missing)
    and QEMU (installed with apt-get if missing, as bench/linux.py)."""
    if not os.path.exists(TOOLS_INITRD):
        subprocess.run([sys.executable, os.path.join(ROOT, "guests/linux/tools.py")], check=True)
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "qemu-system-x86"],
                       check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        qemu = shutil.which("qemu-system-x86_64")
    return qemu


def bench_initrd(td: str, image_mib: int, runtime: int, io_scheduler: str = "") -> str:
    """The tools initramfs plus one more archive holding /bench.sh (the kernel unpacks
    concatenated archives in order)."""
    sys.path.insert(0, os.path.join(ROOT, "guests/linux"))
    import gzip

    import build as linux_build                    # its Cpio writer
    script = (FIO_SCRIPT.replace("@JOBS@", " ".join(f"{n}:{rw}:{bs}:{d}" for n, rw, bs, d in FIO_JOBS))
              .replace("@RUNTIME@", str(runtime)).replace("@SIZE@", str(image_mib))
              .replace("@IOSCHED@", io_scheduler))
    c = linux_build.Cpio()
    c.file("bench.sh", script.encode(), 0o755)
    path = os.path.join(td, "initramfs-bench.cpio.gz")
    with open(TOOLS_INITRD, "rb") as f, open(path, "wb") as out:
        out.write(f.read())
        out.write(gzip.compress(c.finish(), mtime=0))
    return path


def parse_fio(lines: list[str]) -> dict[str, float]:
    """{job: MB/s (seq) or IOPS (rand)} from the FIO-BEGIN/FIO-END blocks of the console."""
    out: dict[str, float] = {}
    cur: list[str] | None = None
    name = ""
    for ln in lines:
        ln = ln.rstrip("\r")
        if ln.startswith("FIO-BEGIN "):
            name, cur = ln.split()[1], []
        elif ln.startswith("FIO-END ") and cur is not None:
            text = "\n".join(cur)
            try:
                job = json.loads(text[text.index("{"):text.rindex("}") + 1])["jobs"][0]
            except (ValueError, KeyError, IndexError):
                cur = None
                continue
            d = job["write" if "write" in name else "read"]
            if name.endswith("gib"):
                out[name] = d["runtime"] / 1e3          # seconds for the whole sized job
                out[name + "_mb"] = d["io_bytes"] / 1e6
            else:
                out[name] = d["bw_bytes"] / 1e6 if name.startswith("seq") else d["iops"]
            cur = None
        elif cur is not None:
            cur.append(ln)
    return out


HC_NAMES = {1: "mmu_update", 3: "stack_switch", 13: "multicall", 14: "update_va_mapping",
            23: "iret", 24: "vcpu_op", 25: "set_segment_base", 26: "mmuext_op", 29: "sched_op",
            32: "event_channel_op"}


def guest_ms() -> float:
    """The calling thread's guest time (/proc/.../stat field 43, clock ticks): CPU the kernel
    accounted to the guest while KVM_RUN ran it on this thread (the loop thread); the rest
    of its CPU is the host's (world switches, exits in C and Python, the backends)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[40]) * 1e3 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _costs(dom, bb) -> dict[str, float]:
    """Counters read at a fio job's start and end: the vCPU's exits (KVM engine), the
    domain's hypercalls, blkback's counters and the process's CPU time."""
    import resource
    eng = dom.vcpus[0].engine
    st = bb.stats
    ru = resource.getrusage(resource.RUSAGE_SELF)
    c = {"exits": getattr(eng, "exits", 0), "cpu_ms": (ru.ru_utime + ru.ru_stime) * 1e3,
         "requests": st.rd_reqs + st.wr_reqs, "drains": st.batches, "events": st.events_sent,
         "notifies": bb.port.notifications if bb.port is not None else 0,
         "io_ms": st.io_ns / 1e6, "t": time.perf_counter(), "guest_ms": guest_ms(),
         "in_c": sum(getattr(eng, "exits_in_c", {}).values())}
    for nr, n in dom.hypercall_counts.items():
        c[f"hc:{HC_NAMES.get(nr, nr)}"] = n
    return c


async def job_costs(dom, bb) -> list[str]:
    """Per fio job, per request: exits, hypercalls, guest notifications, blkback drains and
    events, process CPU (where the time goes on both sides). The window starts 1 s after
    the job's first request (fio's ramp): each job is a new fio process whose start (62
    libraries mapped, its buffers faulted in: ~40-60k exits) is not I/O."""
    out = []
    try:
        for name, *_ in FIO_JOBS:
            await dom.wait_for_line(rf"^FIO-BEGIN {name}", timeout=3600)
            first = bb.stats.rd_reqs + bb.stats.wr_reqs
            while bb.stats.rd_reqs + bb.stats.wr_reqs == first:
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.0)
            a = _costs(dom, bb)
            await dom.wait_for_line(rf"^FIO-END {name}", timeout=3600)
            b = _costs(dom, bb)
            d = {k: b.get(k, 0) - a.get(k, 0) for k in b}
            n = max(1, d["requests"])
            hcs = sorted(((k[3:], v) for k, v in d.items() if k.startswith("hc:") and v), key=lambda kv: -kv[1])
            out.append(f"  {name:9s} {d['requests']:6.0f} requests in {d['t']:.1f} s, per request: "
                       f"exits {d['exits'] / n:.1f} ({d['in_c'] / n:.1f} completed in C), "
                       f"CPU {d['cpu_ms'] / n:.2f} ms (guest {d['guest_ms'] / n:.2f}; process {d['cpu_ms'] / d['t'] / 10:.0f} % "
                       f"of a core), guest notifies {d['notifies'] / n:.2f}, drains {d['drains'] / n:.2f}, "
                       f"events {d['events'] / n:.2f}; hypercalls " + ", ".join(f"{k} {v / n:.1f}" for k, v in hcs[:6]))
    except (LookupError, TimeoutError):
        pass
    return out


async def aiovmm_fio(engine: str, extra: str, image: str, initrd: str, timeout: float) -> tuple[dict, str]:
    cmdline = f"console=hvc0 quiet {extra} aiovmm.run=/bin/sh,/bench.sh aiovmm.exit=1".replace("  ", " ")
    async with Hypervisor(memory_mib=GUEST_MIB + 128) as hv:
        t0 = time.perf_counter()
        dom = await hv.create(VMLINUZ, memory_mib=GUEST_MIB, ramdisk=initrd, cmdline=cmdline,
                              disks=[f"target={image},vdev=xvda,access=rw"], engine=engine)
        note = ""
        bb = next(b for b in dom.backends if isinstance(b, blkdev.Blkback))
        costs: asyncio.Task | None = None
        try:
            await asyncio.wait_for(dom.wait_for_line(r"^FIO-DEV ", timeout=timeout), timeout + 5)
            costs = asyncio.ensure_future(job_costs(dom, bb))
            await asyncio.wait_for(dom.wait(), 600)
        except TimeoutError:
            note = f"no fio within {timeout:.0f} s (console: {list(dom.console_lines)[-2:]})"
            dom.shutdown(ShutdownReason.poweroff)
            await dom.wait()
        except LookupError:                         # the guest ended before fio started
            note = f"guest ended: {dom.describe_end()} (console: {list(dom.console_lines)[-3:]})"
        if costs is not None:
            costs.cancel()
            per_job = await asyncio.gather(costs, return_exceptions=True)
            if isinstance(per_job[0], list) and per_job[0]:
                print("\n".join(per_job[0]), flush=True)
        st = bb.stats
        res = parse_fio(list(dom.console_lines))
        if not note:
            note = (f"{time.perf_counter() - t0:.0f} s; blkback: indirect {st.indirect_reqs}, "
                    f"persistent hits {st.persistent_hits}, io_uring {st.uring_reqs}, pool jobs {st.jobs}, "
                    f"max_inflight {st.max_inflight}, requests {st.rd_reqs + st.wr_reqs}, "
                    f"drains {st.batches}, events {st.events_sent}; {fio_sched(list(dom.console_lines))}")
        return res, note


async def qemu_fio(qemu: str, image: str, initrd: str, timeout: float, extra: str = "") -> tuple[dict, str]:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        qemu, "-accel", "tcg", "-m", str(GUEST_MIB), "-smp", "1", "-nographic", "-no-reboot",
        "-monitor", "none", "-serial", "stdio", "-kernel", VMLINUZ, "-initrd", initrd,
        "-append", f"console=ttyS0 quiet {extra} aiovmm.run=/bin/sh,/bench.sh aiovmm.exit=1".replace("  ", " "),
        "-drive", f"file={image},format=raw,if=virtio",
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    buf = b""
    try:
        async with asyncio.timeout(timeout + 600):
            while True:
                data = await proc.stdout.read(65536)
                if not data:
                    break
                buf += data
    except TimeoutError:
        pass
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    lines = buf.decode(errors="replace").splitlines()
    res = parse_fio(lines)
    return res, (f"{time.perf_counter() - t0:.0f} s; {fio_sched(lines)}"
                 + ("" if res else f" (console: {lines[-3:]})"))


def fio_sched(lines: list[str]) -> str:
    """The guest's elevator line for the fio disk (FIO-SCHED, the chosen one in brackets)."""
    return next((ln.strip()[4:].lower() for ln in lines if ln.startswith("FIO-SCHED ")), "sched ?")


def linux_part(args: argparse.Namespace) -> dict[str, dict]:
    qemu = linux_assets()
    engines = [e for e in args.engines.split(",") if e]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="aiovmm-bench-blk-") as td:
        image = os.path.join(td, "linux.img")
        prefill(image, args.image_mib)
        initrd = bench_initrd(td, args.image_mib, args.runtime, args.io_scheduler)
        systems = []
        ab = dict(kv.split("=", 1) for kv in args.ab_env.split(",") if kv)
        for eng in engines:
            systems.append((f"aiovmm/{eng}", eng, BLKFRONT_ARGS, "1", {}))
            if ab:
                # The A/B variant: the same system with these environment variables (not a
                # candidate for the engine's best figures below).
                systems.append((f"ab:aiovmm/{eng}/{args.ab_env}", eng, BLKFRONT_ARGS, "1", ab))
            if args.nopersist:
                systems.append((f"aiovmm/{eng}/nopersist", eng,
                                f"{BLKFRONT_ARGS} xen_blkfront.feature_persistent=0", "1", {}))
                if ab:
                    systems.append((f"ab:aiovmm/{eng}/nopersist/{args.ab_env}", eng,
                                    f"{BLKFRONT_ARGS} xen_blkfront.feature_persistent=0", "1", ab))
            if args.pool and eng == "unicorn":
                systems.append((f"aiovmm/{eng}/pool", eng, BLKFRONT_ARGS, "0", {}))
        failed: set[str] = set()
        # The sized 1 GiB jobs run on the last engine (kvm where it exists: the faster one)
        # and QEMU; on the emulated engine they would take many minutes.
        gib = f"bench.gib={min(args.gib, args.image_mib)}" if args.gib else ""
        runs: dict[str, list[dict]] = {}
        for rnd in range(args.rounds):
            for name, eng, extra, uring, env in systems:
                if gib and eng == engines[-1] and name == f"aiovmm/{eng}" and rnd == 0:
                    extra = f"{extra} {gib}"
                if eng in failed:
                    print(f"{name:26s} skipped: the engine did not run fio above", flush=True)
                    continue
                os.environ["AIOVMM_BLK_URING"] = uring
                os.environ.update(env)
                try:
                    res, note = asyncio.run(aiovmm_fio(eng, extra, image, initrd,
                                                       args.kvm_timeout if eng == "kvm" else args.boot_timeout))
                finally:
                    os.environ.pop("AIOVMM_BLK_URING", None)
                    for k in env:
                        os.environ.pop(k, None)
                if not res and rnd == 0:
                    failed.add(eng)
                if res:
                    runs.setdefault(name, []).append(res)
                print(f"{name:26s} " + fio_line(res) + f"   [{note}; round {rnd + 1}, load "
                      f"{os.getloadavg()[0]:.1f}]", flush=True)
        for name, rs in runs.items():
            # Each figure's median over the rounds (--rounds; one round: that round's).
            results[name] = {k: statistics.median(r[k] for r in rs if k in r)
                             for k in set().union(*rs) if isinstance(rs[0].get(k), (int, float))}
            if len(rs) > 1:
                print(f"{name:26s} " + fio_line(results[name]) + f"   [median of {len(rs)} rounds]", flush=True)
        res, note = asyncio.run(qemu_fio(qemu, image, initrd, args.boot_timeout, gib))
        results["qemu-tcg"] = res
        print(f"{'qemu-tcg':26s} " + fio_line(res) + f"   [{note}]", flush=True)
    return results


def fio_line(res: dict) -> str:
    def f(k: str, unit: str) -> str:
        return f"{k} {res[k]:8.1f} {unit}" if k in res else f"{k} {'-':>8s} {unit}"
    line = "  ".join((f("seqread", "MB/s"), f("seqwrite", "MB/s"), f("randread", "IOPS"), f("randwrite", "IOPS")))
    if "writegib" in res and "readgib" in res:
        line += (f"  sized O_DIRECT: {res['writegib_mb'] / 1e3:.2f} GB written in {res['writegib']:.1f} s, "
                 f"read in {res['readgib']:.1f} s")
    return line


def old_part(args: argparse.Namespace) -> None:
    """The earlier figures: blk.elf (the project's blkfront) against the host pool."""
    span = SIZE_MIB << 20
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="aiovmm-bench-blk-") as td, Stores(td) as stores:
        for note in stores.notes:
            print("note:", note)
        for store, target in stores.targets.items():
            if store not in args.old_stores.split(","):
                continue
            for kind, gbs, gdepth, rbs, rdepth in PATTERNS:
                seq = kind.startswith("seq")
                total = args.seq_mib << 20 if seq else args.rand_ops * 4096
                gops, rops = total // gbs, total // rbs
                g, r = [], []
                for rep in range(args.reps):
                    sec, stats = asyncio.run(guest_run(target, kind, gbs, gops, gdepth, span, 12345 + rep))
                    g.append(sec)

                    async def ref():
                        b = await open_backing(target)
                        try:
                            return await reference(b, kind, rbs, rops, rdepth, span, 12345 + rep)
                        finally:
                            b.close()
                    r.append(asyncio.run(ref()))
                gs, rs = statistics.median(g), statistics.median(r)
                if seq:
                    gv, rv, unit = total / gs / 1e6, total / rs / 1e6, "MB/s"
                else:
                    gv, rv, unit = gops / gs, rops / rs, "IOPS"
                ratio = gv / rv
                print(f"{store:4s} {kind:9s} blk.elf {gv:9.0f} {unit:4s}  host pool {rv:9.0f} {unit:4s}  "
                      f"ratio {ratio:5.2f}  (runs {[round(total / x / 1e6 if seq else gops / x) for x in g]};"
                      f" last: batches={stats.batches} jobs={stats.jobs} events={stats.events_sent}"
                      f" max_inflight={stats.max_inflight})", flush=True)
                key = f"{store}_{kind}"
                out[f"{key}_ratio"] = round(ratio, 2)
    if out:
        print("old: " + " ".join(f"{k}={v}" for k, v in out.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-mib", type=int, default=1024, help="the Linux guests' disk image")
    ap.add_argument("--gib", type=int, default=1024,
                    help="MiB of the sized O_DIRECT write+read (the issue's 1 GiB) on the last engine "
                         "and QEMU; at most the image (0 skips it)")
    ap.add_argument("--runtime", type=int, default=8, help="seconds per fio job")
    ap.add_argument("--io-scheduler", default="", choices=("", "none", "mq-deadline"),
                    help="the guests' elevator for the fio disk, the same on every system (default: "
                         "the kernel's, mq-deadline here; none saves the kblockd switch per io_submit, "
                         "bench/blk_exits.py --scheds)")
    ap.add_argument("--boot-timeout", type=float, default=400, help="boot -> fio start, at most (s)")
    ap.add_argument("--kvm-timeout", type=float, default=600,
                    help="the same on the kvm engine (its Linux boot took 94-344 s at load 10-15)")
    ap.add_argument("--engines", default=None,
                    help="aiovmm vCPU engines, e.g. unicorn,kvm (default: every one available here)")
    ap.add_argument("--no-kvm", action="store_true", help="skip the kvm engine (as --engines unicorn)")
    ap.add_argument("--no-nopersist", dest="nopersist", action="store_false",
                    help="skip the runs with feature_persistent=0")
    ap.add_argument("--no-pool", dest="pool", action="store_false",
                    help="skip the run with io_uring off (every request through the thread pool)")
    ap.add_argument("--ab-env", default="",
                    help="also run each engine's default system (and its nopersist one) with these "
                         "environment variables (VAR=VALUE,...; e.g. AIOVMM_KVM_IRET_GDT_SS=0), right "
                         "after it in each round")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the aiovmm systems this many times, interleaved; figures are medians")
    ap.add_argument("--old-stores", default="file", help="part 2 stores: file,loop,lv ('' skips it)")
    ap.add_argument("--seq-mib", type=int, default=32, help="part 2: MiB per sequential run")
    ap.add_argument("--rand-ops", type=int, default=2000, help="part 2: 4 KiB requests per random run")
    ap.add_argument("--reps", type=int, default=1, help="part 2: runs (median)")
    args = ap.parse_args()
    if args.engines is None:
        from aiovmm.kvm_engine import unavailable_reason
        args.engines = "unicorn" if unavailable_reason() or args.no_kvm else "unicorn,kvm"
    print(f"part 1: Linux + fio (O_DIRECT, libaio, {args.runtime} s per job, {args.image_mib} MiB image)")
    res = linux_part(args)
    if args.old_stores:
        print("part 2: the project's blkfront (blk.elf) vs the host pool (the earlier references)")
        old_part(args)
    q = res.get("qemu-tcg", {})
    keys = (("seq_read", "seqread"), ("seq_write", "seqwrite"), ("rand_read", "randread"),
            ("rand_write", "randwrite"))
    per_engine: dict[str, dict[str, float]] = {}
    for eng in args.engines.split(","):
        # Each engine's best system (default, nopersist, pool) on each figure, over QEMU's.
        ours = {k: v for k, v in res.items() if k == f"aiovmm/{eng}" or k.startswith(f"aiovmm/{eng}/")}
        ratios: dict[str, float] = {}
        for key, job in keys:
            best = max((r[job] for r in ours.values() if job in r), default=None)
            if best is not None and q.get(job):
                ratios[key] = best / q[job]
                who = next(k for k, r in ours.items() if r.get(job) == best)
                print(f"{job:9s} {eng:8s} best {best:9.1f} ({who})  qemu-tcg {q[job]:9.1f}  "
                      f"ratio {ratios[key]:.2f}")
        if ratios:
            per_engine[eng] = ratios
            print(f"aiovmm {eng} / qemu-tcg: " + " ".join(f"{k}_ratio={v:.2f}" for k, v in ratios.items()))
    for name, r in res.items():
        if name.startswith("ab:"):
            base = res.get(name[3:].rsplit("/", 1)[0], {})
            print(f"A/B {name[3:]}: default / variant " + " ".join(
                f"{job} {base[job]:.1f}/{r[job]:.1f}={base[job] / r[job]:.2f}" for _k, job in keys
                if base.get(job) and r.get(job)))
    # The faster engine: the larger product of its ratios (every figure counts alike).
    fast = max(per_engine, key=lambda e: (len(per_engine[e]), _product(per_engine[e].values())), default=None)
    if fast is not None:
        print(f"faster engine: {fast}")
    final = per_engine.get(fast, {})
    print(" ".join(f"{k}_ratio={final[k]:.2f}" if k in final else f"{k}_ratio=-" for k, _ in keys))


def _product(xs) -> float:
    p = 1.0
    for x in xs:
        p *= x
    return p


if __name__ == "__main__":
    uvloop.install()
    main()
