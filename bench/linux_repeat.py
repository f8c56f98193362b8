"""Debian's Linux booted again and again on one engine, several boots at once: a crash hunt.

Each of --parallel child processes boots the guest of bench/linux.py (same kernel, initramfs,
256 MiB, "console=hvc0 quiet"; its aiovmm_run) --runs times in a row, so that the boots load
the host as the test suite's parallel workers do. A boot that stops before the shell prompt
prints the stage it reached, the domain's end reason (a bounce that could not be written
names the vCPU's mode, stack, kernel_sp and handler: traps.bounce_context), the instruction
at its RIP and the last console lines.

  .venv/bin/python bench/linux_repeat.py --engine kvm --runs 12 --parallel 2

`--workload` then types a short workload into the shell (busybox commands, a loop of forks,
/proc read through, a CPU loop; tests/test_linux.py's Shell) and `--checkpoints N` saves the
running guest N times as a checkpoint (Linux's suspend, SUSPEND_CANCEL, it carries on) with a
command typed after each; `--vcpus 2` boots the guest with two vCPUs. A run that fails after
the prompt says the step, the domain's end (or "running") and the console's last lines; every failed run's whole
console goes to a file in --log-dir (its path is printed).

Last line: boots=<n> ok=<n> failed=<n> prompt_s=<median> load=<1-min load average at the end>
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linux  # noqa: E402  (bench/linux.py: the guest and its boot)

STEP_SLOW, STEP_TIMEOUT = 300, 1200     # s: a workload step is slow, then hung

# The workload typed at the prompt: each command and what its output must contain.
WORKLOAD = [
    ("uname -r; cat /proc/cpuinfo /proc/meminfo /proc/interrupts /proc/stat >/dev/null && echo procs-ok",
     "procs-ok"),
    ("i=0; while [ $i -lt 300 ]; do /bin/true; i=$((i+1)); done; echo forks-$i", "forks-300"),
    ("find /proc/sys -type f 2>/dev/null | head -n 400 | while read f; do cat $f >/dev/null 2>&1; "
     "done; echo sys-ok", "sys-ok"),
    ("(sh -c 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo a-$i' & "
     "sh -c 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo b-$i' & wait)", "b-20000"),
    # The kernel said nothing of an Oops, BUG, WARNING or panic (the lines are shown).
    ("ls -lR /sys/devices/system/cpu >/dev/null; ps | wc -l; dmesg | grep -i -e oops -e bug: "
     "-e panic -e 'call trace' -e 'warning:'; echo dmesg-$(dmesg | grep -ci -e oops -e bug: "
     "-e panic -e 'call trace' -e 'warning:')", "dmesg-0"),
]


async def after_prompt(hv, dom, checkpoints: int, res: dict) -> None:
    """The workload and the checkpoint loop on a guest at its prompt; failures in res."""
    sys.path.insert(0, os.path.join(linux.ROOT, "tests"))
    from test_linux import Shell
    from aiovmm.testing import vcpu_state
    shell = Shell(dom)
    t0 = time.perf_counter()
    step = "workload"
    steps = res["steps_s"] = []
    try:
        for cmd, want in WORKLOAD:
            step = f"workload `{cmd[:40]}`"
            t = time.perf_counter()
            # A step that takes long is told apart from a hang: the vCPUs' state after
            # STEP_SLOW s, then up to STEP_TIMEOUT s in all (the shell gets ^C then).
            run = asyncio.ensure_future(shell.run(cmd, STEP_TIMEOUT))
            done, _ = await asyncio.wait({run}, timeout=STEP_SLOW)
            if not done:
                res["slow"] = f"{step} after {STEP_SLOW} s: {vcpu_state(dom)}"
            rc, out = await run
            steps.append(round(time.perf_counter() - t, 1))
            if rc != 0 or not any(ln.strip() == want for ln in out):
                raise RuntimeError(f"rc {rc}, output {out[-4:]}")
        with tempfile.TemporaryDirectory() as tmp:
            for k in range(checkpoints):
                step = f"checkpoint {k}"
                await asyncio.wait_for(dom.save(os.path.join(tmp, "ckpt"), checkpoint=True), 300)
                os.unlink(os.path.join(tmp, "ckpt"))
                rc, out = await shell.run(f"echo ck-{k}; cat /proc/uptime", 120)
                if rc != 0 or f"ck-{k}" not in out:
                    raise RuntimeError(f"after checkpoint: rc {rc}, output {out[-4:]}")
        res["work_s"] = time.perf_counter() - t0
    except Exception as e:          # noqa: BLE001  (a crash hunt: every failure is reported)
        res["stage"] = f"after the prompt: {step}"
        res["why"] = (f"{type(e).__name__}: {e}; domain {dom.describe_end()}; after "
                      f"{time.perf_counter() - t0:.0f} s; {vcpu_state(dom)}")
        res["tail"] = [ln for ln in dom.console_lines if ln.strip()][-25:]
        res["console"] = "\n".join(dom.console_lines)


def child(engine: str, runs: int, timeout: float, tag: int, workload: bool, vcpus: int,
          checkpoints: int, log_dir: str) -> None:
    from aiovmm import Hypervisor

    async def main() -> None:
        for i in range(runs):
            async with Hypervisor(memory_mib=linux.MEMORY_MIB + 256, engine=engine) as hv:
                then = (lambda dom, res: after_prompt(hv, dom, checkpoints, res)) if workload else None
                r = await linux.aiovmm_run(hv, timeout, vcpus=vcpus, then=then)
            r.update(worker=tag, run=i, load=os.getloadavg()[0])
            if "console" in r:              # a failure: its whole console to a file
                path = os.path.join(log_dir, f"linux_repeat-{os.getpid()}-{tag}-{i}.log")
                with open(path, "w") as f:
                    f.write(f"{r.get('stage')}: {r.get('why')}\n{r.get('engine_stats', '')}\n\n")
                    f.write(r.pop("console"))
                r["log"] = path
            print(json.dumps(r), flush=True)
    asyncio.run(main())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("kvm", "unicorn"), default="kvm")
    ap.add_argument("--runs", type=int, default=10, help="boots per child, one after another")
    ap.add_argument("--parallel", type=int, default=2, help="child processes booting at once")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="give up on a boot after this long without console output (s)")
    ap.add_argument("--workload", action="store_true", help="run the workload at the prompt")
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--checkpoints", type=int, default=0,
                    help="checkpoint saves after the workload (needs --workload)")
    ap.add_argument("--log-dir", default=tempfile.gettempdir(),
                    help="where a failed run's whole console is written")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.engine, args.runs, args.timeout, args.child, args.workload, args.vcpus,
              args.checkpoints, args.log_dir)
        return 0
    if not (os.path.exists(linux.VMLINUZ) and os.path.exists(linux.INITRAMFS)):
        subprocess.run([sys.executable, os.path.join(linux.ROOT, "guests/linux/build.py")], check=True)
    procs = [subprocess.Popen([sys.executable, __file__, "--engine", args.engine, "--runs",
                               str(args.runs), "--timeout", str(args.timeout), "--child", str(k),
                               "--vcpus", str(args.vcpus), "--checkpoints", str(args.checkpoints),
                               "--log-dir", args.log_dir]
                              + (["--workload"] if args.workload else []),
                              stdout=subprocess.PIPE, text=True) for k in range(args.parallel)]
    results = []
    for p in procs:
        for line in p.stdout:
            r = json.loads(line)
            results.append(r)
            head = f"worker {r['worker']} run {r['run']} load {r['load']:.1f}: "
            if "prompt_s" in r and "stage" not in r:
                work = f", workload {r['work_s']:.1f} s (steps {r['steps_s']})" if "work_s" in r else ""
                if "slow" in r:
                    work += f"; SLOW {r['slow']}"
                print(head + f"prompt in {r['prompt_s']:.1f} s{work}", flush=True)
            else:
                print(head + f"FAILED at {r['stage']}: {r['why']}", flush=True)
                for ln in r.get("tail", []):
                    print(f"    | {ln}", flush=True)
                if "log" in r:
                    print(f"    whole console: {r['log']}", flush=True)
        p.wait()
    ok = [r["prompt_s"] for r in results if "prompt_s" in r and "stage" not in r]
    print(f"boots={len(results)} ok={len(ok)} failed={len(results) - len(ok)} "
          f"prompt_s={statistics.median(ok) if ok else '-'} load={os.getloadavg()[0]:.1f}")
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
