"""Linux boot: Debian's unmodified kernel + the test initramfs, create -> first shell prompt.

Guest: guests/build/linux/vmlinuz (Debian's linux-image-*-amd64 bzImage) with
guests/build/linux/initramfs.cpio.gz, 256 MiB, "console=hvc0 quiet" (built by `make setup`;
this script runs guests/linux/build.py itself if they are missing). Per run, on the host's
perf_counter:
  - load_s:   `await hv.create()` (read + decompress the bzImage, parse the notes, build the
              domain, load the ramdisk); the parse cache is cleared first, so every run is
              a cold load as a new `aiovmm run` would do;
  - kernel_s: create() returning (vCPU starts at the kernel's entry) -> /init's first line
              "aiovmm-init: start" on the console;
  - init_s:   that line -> the shell prompt "aiovmm:/# " on hvc0.
  prompt_s is the whole: create() called -> prompt.
  cpu_s:      CPU seconds (user + system, all threads) this process used from create() to the
              prompt; QEMU's the same from /proc/<pid>/stat at its prompt (qemu_tcg_cpu_s). On a
              loaded host these compare the two where wall times mostly measure the scheduler.
Peer in the same run, interleaved: QEMU with TCG (Debian's qemu-system-x86, `-accel tcg`,
serial console, same kernel and initramfs, "console=ttyS0 quiet"), process spawn -> the same
prompt on ttyS0. qemu-system-x86 is installed with apt-get if missing.

If the aiovmm guest stops before the prompt (a crash, or no progress for --timeout seconds),
the script says where: the stage reached, the domain's end reason (the first unhandled
operation) and the last console lines, still measures QEMU, and exits 1.

Where /dev/kvm works, each run also boots the same guest on the KVM engine (interleaved, same
hypervisor settings), with its figures under kvm_* keys and, per run, what limited it (exits by
kind, shadow invalidations, full zaps).

`--slices hook,timer` boots the Unicorn guest once per listed slice mode in every run
(AIOVMM_UNICORN_SLICES, vcpu_engine.py), interleaved with the rest, to compare them under the
same load; each mode's medians get their own line, and the last line's unprefixed figures
are the first mode's.

Last line: prompt_s=<median> load_s=<..> kernel_s=<..> init_s=<..> cpu_s=<..>
qemu_tcg_prompt_s=<median> qemu_tcg_cpu_s=<..> load=<1-min load average at the end>
[kvm_prompt_s=<median> kvm_load_s kvm_kernel_s kvm_init_s]
(`-` for a figure the aiovmm guest did not reach).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import uvloop

from aiovmm import Hypervisor, ShutdownReason, builder
from aiovmm.errors import BuildError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX = os.path.join(ROOT, "guests/build/linux")
VMLINUZ = os.path.join(LINUX, "vmlinuz")
INITRAMFS = os.path.join(LINUX, "initramfs.cpio.gz")
MEMORY_MIB = 256
INIT_MARK = b"aiovmm-init: start"
PROMPT = re.compile(rb"aiovmm:[^\r\n]*# ")


def setup() -> str:
    """The assets and QEMU, fetched as `make setup` would (idempotent)."""
    if not (os.path.exists(VMLINUZ) and os.path.exists(INITRAMFS)):
        subprocess.run([sys.executable, os.path.join(ROOT, "guests/linux/build.py")], check=True)
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        print("installing qemu-system-x86 (apt-get)", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "qemu-system-x86"],
                       check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        qemu = shutil.which("qemu-system-x86_64")
        if qemu is None:
            raise SystemExit("qemu-system-x86_64 still missing after installing qemu-system-x86")
    return qemu


class Watch:
    """Console bytes -> the times the markers appeared (the prompt has no newline, so this
    reads the stream, not lines)."""

    def __init__(self, cpu=time.process_time) -> None:
        self.buf = bytearray()
        self.t_init: float | None = None
        self.t_prompt: float | None = None
        self.cpu = cpu                       # CPU seconds of the booting side, read at the prompt
        self.c_prompt: float | None = None
        self.changed = asyncio.Event()
        self.last_progress = time.perf_counter()

    def feed(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buf += data
        self.last_progress = now
        if self.t_init is None and INIT_MARK in self.buf:
            self.t_init = now
        if self.t_init is not None and self.t_prompt is None and PROMPT.search(self.buf, self.buf.index(INIT_MARK)):
            self.t_prompt = now
            self.c_prompt = self.cpu()
        self.changed.set()

    def tail(self, n: int = 6) -> list[str]:
        return [ln for ln in bytes(self.buf).decode("utf-8", "replace").splitlines() if ln.strip()][-n:]


def _insn_at_rip(end: str) -> str:
    """The kernel instruction at the crash's rip, from the kernel image itself (the domain's
    memory is gone by now): names the operation aiovmm did not handle."""
    m = re.search(r"rip (0x[0-9a-f]+)", end)
    if not m:
        return ""
    rip = int(m.group(1), 16)
    import capstone
    for va, data, _memsz in builder.parse_kernel(VMLINUZ).segments:
        if va <= rip < va + len(data):
            code = bytes(data[rip - va:rip - va + 16])
            ins = next(capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64).disasm(code, rip), None)
            if ins is not None:
                return f": `{(ins.mnemonic + ' ' + ins.op_str).strip()}`"
    return ""


async def aiovmm_run(hv: Hypervisor, timeout: float, vcpus: int = 1, then=None) -> dict:
    """One boot to the prompt; `then(dom, res)`, if given, is awaited at the prompt (it adds
    its own figures, or a failure's stage/why/tail, to res)."""
    w = Watch()
    builder.clear_cache()
    t0 = time.perf_counter()
    c0 = time.process_time()
    try:
        dom = await hv.create(VMLINUZ, memory_mib=MEMORY_MIB, cmdline="console=hvc0 quiet",
                              ramdisk=INITRAMFS, on_console=w.feed, vcpus=vcpus)
    except BuildError as e:
        return {"stage": "load", "why": f"refused: {e}", "tail": []}
    t1 = time.perf_counter()
    w.last_progress = t1
    while w.t_prompt is None and not dom.done.done():
        w.changed.clear()
        waiter = asyncio.ensure_future(w.changed.wait())
        try:
            await asyncio.wait({waiter, dom.done}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if time.perf_counter() - w.last_progress > timeout:
            break
    res = {"load_s": t1 - t0}
    if w.t_prompt is not None:
        res.update(prompt_s=w.t_prompt - t0, kernel_s=w.t_init - t1, init_s=w.t_prompt - w.t_init,
                   cpu_s=w.c_prompt - c0)
        if then is not None:
            await then(dom, res)
    else:
        res["stage"] = "kernel (before /init)" if w.t_init is None else "/init (before the prompt)"
        if w.t_init is not None:
            res["kernel_s"] = w.t_init - t1
        res["why"] = (dom.describe_end() + _insn_at_rip(dom.describe_end()) if dom.done.done()
                      else f"no console progress for {timeout:.0f} s (still running)")
        res["tail"] = w.tail()
        res["console"] = bytes(w.buf).decode("utf-8", "replace")     # the whole of it
    eng = dom.vcpus[0].engine
    if getattr(eng, "kind", "") == "kvm":
        kinds = ", ".join(f"{k} {n}" for k, n in eng.exit_kinds.most_common(5))
        in_c = eng.exits_in_c
        c_kinds = ", ".join(f"{k} {n}" for k, n in in_c.items() if n)
        res["engine_stats"] = (f"exits {eng.exits} ({kinds}); completed in C {sum(in_c.values())} "
                               f"({c_kinds}); invalidations {eng.invalidations} "
                               f"({eng.invalidated} entries/frames), full zaps {eng.zaps}")
    if not dom.done.done():
        dom.shutdown(ShutdownReason.poweroff)
    await dom.wait()
    return res


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a running process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def qemu_run(qemu: str, timeout: float) -> dict:
    pid = [0]
    w = Watch(cpu=lambda: _proc_cpu_s(pid[0]))
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        qemu, "-accel", "tcg", "-m", str(MEMORY_MIB), "-smp", "1", "-nographic", "-no-reboot",
        "-monitor", "none", "-serial", "stdio", "-kernel", VMLINUZ, "-initrd", INITRAMFS,
        "-append", "console=ttyS0 quiet", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    pid[0] = proc.pid
    try:
        async with asyncio.timeout(timeout):
            while w.t_prompt is None:
                data = await proc.stdout.read(4096)
                if not data:
                    break
                w.feed(data)
    except TimeoutError:
        pass
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    if w.t_prompt is None:
        return {"why": "QEMU did not reach the prompt", "tail": w.tail()}
    return {"prompt_s": w.t_prompt - t0, "kernel_s": w.t_init - t0, "init_s": w.t_prompt - w.t_init,
            "cpu_s": w.c_prompt}


def med(runs: list[dict], key: str) -> str:
    vals = [r[key] for r in runs if key in r]
    return f"{statistics.median(vals):.2f}" if vals else "-"


async def one_run(hv: Hypervisor, label: str, i: int, timeout: float, runs: list[dict]) -> dict | None:
    """One aiovmm boot; prints it; returns the result if it stopped before the prompt."""
    r = await aiovmm_run(hv, timeout)
    runs.append(r)
    if "prompt_s" in r:
        print(f"{label} run {i + 1}: prompt {r['prompt_s']:.2f} s (load {r['load_s']:.2f}, "
              f"kernel {r['kernel_s']:.2f}, init {r['init_s']:.2f}; CPU {r['cpu_s']:.2f} s)", flush=True)
    else:
        print(f"{label} run {i + 1}: STOPPED in {r['stage']} after load {r.get('load_s', 0):.2f} s: "
              f"{r['why']}", flush=True)
        for ln in r["tail"]:
            print(f"    | {ln}")
    if "engine_stats" in r:
        print(f"    {r['engine_stats']}", flush=True)
    return None if "prompt_s" in r else r


async def main(args: argparse.Namespace) -> int:
    from aiovmm.kvm_engine import unavailable_reason
    qemu = setup()
    kvm: list[dict] = []
    peer: list[dict] = []
    stopped: dict | None = None
    kvm_stopped: dict | None = None
    kvm_why = None if args.engine in ("both", "kvm") else "not asked for (--engine)"
    kvm_why = kvm_why or unavailable_reason()
    if kvm_why:
        print(f"KVM engine skipped: {kvm_why}")
    modes = [m for m in args.slices.split(",") if m] if args.slices else [None]
    by_mode: dict[str | None, list[dict]] = {m: [] for m in modes}
    async with Hypervisor(memory_mib=MEMORY_MIB + 256) as hv, \
            Hypervisor(memory_mib=MEMORY_MIB + 256, engine="unicorn" if kvm_why else "kvm") as hv_kvm:
        for i in range(args.runs):
            for mode in modes:
                if stopped is not None or args.engine == "kvm":
                    break
                if mode is not None:
                    os.environ["AIOVMM_UNICORN_SLICES"] = mode     # read when the vCPU is made
                stopped = await one_run(hv, f"aiovmm{'-' + mode if mode else '':8}", i, args.timeout,
                                        by_mode[mode])
            if kvm_stopped is None and not kvm_why:
                kvm_stopped = await one_run(hv_kvm, "aiovmm-kvm", i, args.timeout, kvm)
            q = await qemu_run(qemu, args.qemu_timeout)
            peer.append(q)
            if "prompt_s" in q:
                print(f"qemu-tcg run {i + 1}: prompt {q['prompt_s']:.2f} s (/init at {q['kernel_s']:.2f}, "
                      f"init {q['init_s']:.2f}; CPU {q['cpu_s']:.2f} s)", flush=True)
            else:
                print(f"qemu-tcg run {i + 1}: {q['why']}", flush=True)
                for ln in q["tail"]:
                    print(f"    | {ln}")
    ours = by_mode[modes[0]]
    if len(modes) > 1:
        for mode in modes:
            r = by_mode[mode]
            print(f"slices={mode}: prompt_s={med(r, 'prompt_s')} load_s={med(r, 'load_s')} "
                  f"kernel_s={med(r, 'kernel_s')} init_s={med(r, 'init_s')}")
    for name, st in (("aiovmm", stopped), ("aiovmm (KVM engine)", kvm_stopped)):
        if st is not None:
            print(f"{name}: Linux did not reach the shell prompt: stopped in {st['stage']}: {st['why']}")
    tail = ""
    if not kvm_why:
        tail = (f" kvm_prompt_s={med(kvm, 'prompt_s')} kvm_load_s={med(kvm, 'load_s')}"
                f" kvm_kernel_s={med(kvm, 'kernel_s')} kvm_init_s={med(kvm, 'init_s')}")
    print(f"prompt_s={med(ours, 'prompt_s')} load_s={med(ours, 'load_s')} kernel_s={med(ours, 'kernel_s')} "
          f"init_s={med(ours, 'init_s')} cpu_s={med(ours, 'cpu_s')} qemu_tcg_prompt_s={med(peer, 'prompt_s')} "
          f"qemu_tcg_cpu_s={med(peer, 'cpu_s')} load={os.getloadavg()[0]:.1f}{tail}")
    failed = stopped is not None or kvm_stopped is not None
    return 1 if failed or not any("prompt_s" in q for q in peer) else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Linux create -> shell prompt, aiovmm vs QEMU TCG")
    ap.add_argument("--runs", type=int, default=5, help="runs of each (median reported; default 5)")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="aiovmm: give up after this long without console output (s)")
    ap.add_argument("--qemu-timeout", type=float, default=120.0, help="QEMU: give up after (s)")
    ap.add_argument("--slices", default="",
                    help="Unicorn slice modes to boot in each run, e.g. hook,timer (default: the engine's)")
    ap.add_argument("--engine", choices=("both", "unicorn", "kvm"), default="both",
                    help="aiovmm engines to boot on (default both; KVM where /dev/kvm works)")
    sys.exit(uvloop.run(main(ap.parse_args())))
