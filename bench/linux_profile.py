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
        while "prompt" not in marks and not dom.done.done():
            await asyncio.sleep(0.05)
            if time.perf_counter() - t1 > 400: break
        t2 = time.perf_counter()
        hc = dict(dom.hypercall_counts)
        v0 = dom.vcpus[0]
        info = dict(blocks=v0.engine.blocks_executed, ptwr=v0.ptwr_updates, emulated=v0.emulated, hypercalls=v0.hypercalls)
        dom.shutdown(ShutdownReason.poweroff); await dom.wait()
    print(f"load {t1-t0:.2f} kernel {marks.get('init',t2)-t1:.2f} init {t2-marks.get('init',t2):.2f} total {t2-t0:.2f}")
    print("info", info)
    print("hypercalls", sorted(hc.items(), key=lambda x: -x[1]))
    print("counts", C.most_common(40))
    print("times", {k: round(v, 2) for k, v in T.most_common(20)})
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
