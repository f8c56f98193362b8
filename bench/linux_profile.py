"""Profile one Linux boot to the shell prompt (what bench/linux.py times), for finding what
limits it. Wraps the engine and trap entry points of this process (no change to aiovmm) and
prints: the stage times; translated blocks executed; hypercall counts by number; exits by
kind (slice end reason, exception vector, port and direction of trapped I/O, TLB flushes,
timer events); and guest RIP samples at every slice end, per phase and per 5 s, which show
where guest time goes (Debian ships no System.map: look the addresses up with capstone in the
kernel image, as bench/linux.py's _insn_at_rip does).

  .venv/bin/python bench/linux_profile.py            # counters and RIP samples
  PROF=/tmp/boot.prof .venv/bin/python bench/linux_profile.py   # plus cProfile of the loop
  BUDGET=20000 ...                                   # another slice block budget

It also splits the loop thread's CPU time (time.thread_time) of the boot, create() returned ->
prompt: guest code inside Unicorn's TCG (emu_start minus the Python callbacks it ran: this
includes Unicorn's own work, translation, TLB refills, self-modifying-code checks), the
callbacks by kind (hypercall by number, exception by vector, #UD, port I/O, CPUID), and the
loop outside emu_start (scheduler, timers, backends, xenstore); then the guest's share by
the 256-byte page of the RIP its slice ended at (a hot loop holds its slices: its page names
it; a page right after a hypercall's `syscall` collects the slices that ended in Python).
"""
import asyncio, collections, cProfile, pstats, sys, time, re, os
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from aiovmm import Hypervisor, ShutdownReason, builder
from aiovmm import vcpu_engine, traps, emulate, timers, ptwr, vcpu as vcpumod
L = os.path.join(ROOT, "guests/build/linux/")
C = collections.Counter()
T = collections.Counter()
SAMPLES = []
def wrap(mod, name, key=None, timeit=False):
    f = getattr(mod, name)
    def w(*a, **k):
        C[key or name] += 1
        if timeit:
            t = time.perf_counter()
            try: return f(*a, **k)
            finally: T[key or name] += time.perf_counter() - t
        return f(*a, **k)
    setattr(mod, name, w)
E = vcpu_engine.UnicornEngine if hasattr(vcpu_engine, "UnicornEngine") else vcpu_engine.VCPUEngine
for n in ("flush_tlb", "flush_code", "step_to"):
    wrap(E, n)
tt = time.thread_time
CPU = collections.Counter()      # callback kind -> loop-thread CPU seconds (inside emu_start)
NCB = collections.Counter()
GUEST = collections.Counter()    # RIP page at slice end -> guest CPU seconds
EMU = [0.0, 0.0]                 # emu_start CPU, callbacks CPU
def cpu_wrap(name, keyf):
    f = getattr(E, name)
    def w(self, *a):
        k = keyf(self, *a)
        t = tt()
        try: return f(self, *a)
        finally:
            d = tt() - t
            CPU[k] += d; NCB[k] += 1; EMU[1] += d
    setattr(E, name, w)
# SYSCALL by RAX: a hypercall number in guest kernel mode, a bounced system call in user mode
cpu_wrap("_hook_syscall", lambda s: f"syscall rax={s._hc.args[0]}")
cpu_wrap("_hook_intr", lambda s, uc, vec, ud: f"exception {vec}")
cpu_wrap("_hook_invalid", lambda s, uc, ud: "invalid opcode")
cpu_wrap("_hook_in", lambda s, uc, p, sz, ud: "port in")
cpu_wrap("_hook_out", lambda s, uc, p, sz, v, ud: "port out")
cpu_wrap("_hook_cpuid", lambda s, uc, ud: "cpuid")
orig_emu = E._emu_start
def emu_start(self, rip, until):
    cb0, t = EMU[1], tt()
    r = orig_emu(self, rip, until)
    d = tt() - t
    EMU[0] += d
    GUEST[self.get("rip") >> 8 << 8] += d - (EMU[1] - cb0)
    return r
E._emu_start = emu_start
orig_run = E.run
def run(self, budget, max_ns=0):
    t = time.perf_counter()
    r = orig_run(self, budget, max_ns)
    T["engine.run"] += time.perf_counter() - t
    C["run:" + r.value] += 1
    SAMPLES.append((time.perf_counter(), self.get("rip"), r.value))
    return r
E.run = run
orig_exc = traps.exception
def exc(v, vec, err, cr2):
    C[f"exc{vec}"] += 1
    t = time.perf_counter()
    try: return orig_exc(v, vec, err, cr2)
    finally: T[f"exc{vec}"] += time.perf_counter() - t
traps.exception = exc
orig_pio = vcpumod.VCPU._on_port_io
def pio(self, port, size, write, value):
    C[f"pio{'w' if write else 'r'}{port:#x}"] += 1
    return orig_pio(self, port, size, write, value)
vcpumod.VCPU._on_port_io = pio
orig_fire = timers._fire
def fire(v):
    C["timer_fire"] += 1; return orig_fire(v)
timers._fire = fire
orig_gp = emulate.gp_fault
def gp(v, e):
    t=time.perf_counter(); r = orig_gp(v, e); T["gp_fault"] += time.perf_counter()-t; return r
emulate.gp_fault = gp
orig_ud = emulate.ud_fault
def ud(v):
    C["ud"] += 1; return orig_ud(v)
emulate.ud_fault = ud

async def main():
    marks = {}
    buf = bytearray()
    def feed(d):
        nonlocal buf
        buf += d
        if b"aiovmm-init: start" in buf and "init" not in marks: marks["init"] = time.perf_counter()
        if re.search(rb"aiovmm:[^\r\n]*# ", buf) and "prompt" not in marks: marks["prompt"] = time.perf_counter()
    async with Hypervisor(memory_mib=512) as hv:
        if os.environ.get("BUDGET"): hv.scheduler.budget_blocks = int(os.environ["BUDGET"])
        builder.clear_cache()
        t0 = time.perf_counter()
        dom = await hv.create(L + "vmlinuz", memory_mib=256, cmdline="console=hvc0 quiet",
                              ramdisk=L + "initramfs.cpio.gz", on_console=feed)
        t1 = time.perf_counter()
        c1 = tt()
        CPU.clear(); NCB.clear(); GUEST.clear(); EMU[:] = [0.0, 0.0]
        while "prompt" not in marks and not dom.done.done():
            await asyncio.sleep(0.05)
            if time.perf_counter() - t1 > 400: break
        t2 = time.perf_counter()
        c2 = tt()
        split = (c2 - c1, EMU[0], EMU[1])
        hc = dict(dom.hypercall_counts)
        v0 = dom.vcpus[0]
        info = dict(blocks=v0.engine.blocks_executed, ptwr=v0.ptwr_updates, emulated=v0.emulated, hypercalls=v0.hypercalls)
        dom.shutdown(ShutdownReason.poweroff); await dom.wait()
    print(f"load {t1-t0:.2f} kernel {marks.get('init',t2)-t1:.2f} init {t2-marks.get('init',t2):.2f} total {t2-t0:.2f}")
    print("info", info)
    print("hypercalls", sorted(hc.items(), key=lambda x: -x[1]))
    print("counts", C.most_common(40))
    print("times", {k: round(v, 2) for k, v in T.most_common(20)})
    run_cpu, emu, cbs = split
    print(f"loop-thread CPU create->prompt {run_cpu:.2f} s: guest in TCG {emu - cbs:.2f}, "
          f"callbacks {cbs:.2f}, outside emu_start {run_cpu - emu:.2f}")
    for k, v in CPU.most_common(15):
        print(f"   {k:16s} {v:6.2f} s {NCB[k]:7d} x {1e6 * v / NCB[k]:6.1f} us")
    print("guest CPU by slice-end RIP page:")
    for k, v in GUEST.most_common(12):
        print(f"   {k:#x} {v:6.2f} s")
    def sym(rip):
        return hex(rip)
    def phase(lo, hi, name):
        c = collections.Counter(sym(r) for t, r, k in SAMPLES if lo <= t < hi and k == "budget")
        n = sum(c.values())
        print(f"== {name}: {n} slices ended by budget/time")
        for s_, k in c.most_common(25): print(f"   {k:6d} {100*k/max(n,1):5.1f}% {s_}")
    phase(t1, marks.get("init", t2), "kernel")
    phase(marks.get("init", t2), t2, "init")
    # timeline: samples per 5 s bucket, top symbol
    b = collections.defaultdict(collections.Counter)
    for t, r, k in SAMPLES:
        b[int((t - t1) // 5)][sym(r)] += 1
    for k in sorted(b): print("t+%3ds" % (5*k), b[k].most_common(4))
prof = os.environ.get("PROF")
if prof:
    cProfile.run("asyncio.run(main())", prof)
    pstats.Stats(prof).sort_stats("tottime").print_stats(35)
else:
    asyncio.run(main())
