"""Save/restore in Xen's migration stream v2 (aiovmm/migration/), per engine and guest size.

For each vCPU engine available and each guest size (64 and 256 MiB of guests/tests/suspend.elf,
idle and with its memory pattern), it measures:
  suspend_ms    control/shutdown=suspend written -> the guest's SCHEDOP_shutdown(suspend)
  save_ms       the stream written to a file (aiofiles), suspend excluded
  restore_ms    file -> new domain built and running (aiofiles)
  plain_ms      the same restore with blocking reads on the loop (the reference)
  resume_ms     restore call -> the guest's first console line on the new side
  stall_ms      the loop's longest stretch of CPU time between two wake-ups of a 1 ms
                ticker during the restore: how long every other guest on the loop stood
                still (CPU time, so the machine's load does not count)
and, with --fuzz N, N cases of the receiver fuzzer (aiovmm/migration/fuzz.py).
Files go to /dev/shm (tmpfs), so the figures are the hypervisor's, not the disk's.
Live migration between two hypervisors in this process over loopback TCP, idle and busy
(the guest rewrites `dirty` pages of 4 KiB every 10 ms tick): total time, pre-copy rounds,
pages sent per guest page, downtime (guest suspended -> running at the destination, as the
sender sees it). On a switched LAN (aiovmm.testing.TwoHostLan, the 64 MiB network guest
guests/tests/net.c, idle): downtime as a client's 1 ms pings see it (the gap between two
replies around the guest's suspend; the source holds frames for the suspended guest and
sends them on, so late replies count), the longest gap anywhere in the run (on a busy host
a pre-copy loop stall can be longer), pings lost, and announce_ms: the time from the guest's
suspend on the source (the start of its downtime: from then on frames the switch forwards to
the old host wait there) to the first announce frame (RARP) entering the switch from the
destination host, both on CLOCK_REALTIME (the source's perf_counter mark converted; the
frame's kernel receive stamp). It was measured from the guest's start on the destination
until the destination's call (on_domain) and always came out negative (-2.5 to -3 ms): the
destination announces as soon as it has the whole stream (live.py receive: on_end), before
it says READY, the sender's GO and the disk claims; it starts the guest only after those,
so that reference measured the hand-over's round trip, not the announce. The announce's
lead on the guest's start is printed beside it. --procs 1,2:
both hypervisors in this process (one loop), and the destination in a process of its own
(two daemons, as users run it); --timeline then lists, on one clock, each xenstore request
of the resuming guest, the vifs' states, first frames, tap closes, teardown steps and loop
stalls of both hosts between the last reply before the gap and the first after it.
--timeline prints each live run's stop-and-copy steps on both sides in ms from the suspend
(one process, one clock: where the downtime goes) and the CPU time in the downtime;
--no-realtime runs the stop-and-copy and the restore at normal priority (migration/priority.py);
--parts/--engines/--runs choose what runs (A/B on a shared machine).
Last line: key=value (64 MiB unicorn guest; kvm_ keys beside).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from aiovmm import Hypervisor                              # noqa: E402
from aiovmm.kvm_engine import unavailable_reason          # noqa: E402
from aiovmm.migration import files, fuzz                   # noqa: E402
from aiovmm.migration.suspend import suspend               # noqa: E402
from aiovmm.testing import loop_cpu_ticker                  # noqa: E402

GUEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "guests", "build", "tests", "suspend.elf")
NETGUEST = os.path.join(os.path.dirname(GUEST), "net.elf")


async def one(engine: str, mib: int, d: str) -> dict[str, float]:
    out: dict[str, float] = {}
    async with Hypervisor(memory_mib=2 * mib + 64, engine=engine) as hv:
        dom = await hv.create(GUEST, memory_mib=mib, cmdline="pages=256 every=10")
        await dom.wait_for_line(r"uptime: ticks=10 ", 30)
        path = os.path.join(d, f"{engine}-{mib}.save")
        t0 = time.perf_counter()
        susp = await suspend(dom)
        t1 = time.perf_counter()
        st = await files.save_file(dom, path)
        t2 = time.perf_counter()
        out["suspend_ms"] = (t1 - t0) * 1e3
        out["save_ms"] = (t2 - t1) * 1e3
        out["file_mib"] = st.bytes / (1 << 20)
        await asyncio.wait([dom.task])
        for plain in (False, True, False, True):
            gaps: list[float] = []
            stop = asyncio.Event()
            tick = asyncio.ensure_future(loop_cpu_ticker(gaps, stop))
            await asyncio.sleep(0.01)
            gaps.clear()
            t0 = time.perf_counter()
            try:
                d2, _ = await files.restore_file(hv, path, plain=plain, realtime=REALTIME)
            finally:
                stop.set()
                await tick
            t1 = time.perf_counter()
            if not plain:
                out.setdefault("stall_ms_all", []).append(max(gaps) * 1e3)
            n = len(d2.console_lines)
            await d2.wait_for_line(r"suspend: resumed rc=0", 10)
            t2 = time.perf_counter()
            key = "plain_ms" if plain else "restore_ms"
            out.setdefault(key + "_all", []).append((t1 - t0) * 1e3)
            out.setdefault("resume_ms_all", []).append((t2 - t0) * 1e3)
            d2.shutdown()
            await asyncio.wait([d2.task])
        for k in ("plain_ms", "restore_ms", "resume_ms", "stall_ms"):
            out[k] = statistics.median(out.pop(k + "_all"))
        del susp
    return out


TICK_S = 0.001                   # Trace.stalls' ticker


class Trace:
    """--timeline on the switched LAN: where the ping gap goes, on one clock
    (time.perf_counter is CLOCK_MONOTONIC, the same in both processes of --procs 2).
    Instrumentation only: thin wrappers around the xenstore server, netback and the
    domain teardown that note (time, d<N>, what) while a run is traced; --timeline alone
    installs them, the plain figures are taken without."""
    on = False
    ev: list[tuple[float, str]] = []
    firsts: set[str] = set()
    hosts: dict[int, str] = {}          # id(hypervisor or its store) -> host label
    here = ""                           # this process's host label (--dst-child: "B")

    @classmethod
    def host(cls, obj: object) -> str:
        return cls.hosts.get(id(obj), cls.here)

    @classmethod
    def name(cls, hv: "Hypervisor", label: str) -> None:
        cls.hosts[id(hv)] = cls.hosts[id(hv.xenstore.store)] = label

    @classmethod
    def note(cls, what: str, once: bool = False) -> None:
        if cls.on and not (once and what in cls.firsts):
            cls.firsts.add(what)
            cls.ev.append((time.perf_counter(), what))

    @classmethod
    def install(cls) -> None:
        from aiovmm.xenstore.protocol import XsType
        from aiovmm.xenstore.server import XenstoreServer
        from aiovmm.xenstore.store import Store
        from aiovmm.hypervisor import Hypervisor as H
        from aiovmm.domain import Domain
        from aiovmm.backends.net import Netback

        def wrap(owner, name, before=None, after=None):
            orig = getattr(owner, name)

            def f(*a, **k):
                if before:
                    before(*a, **k)
                r = orig(*a, **k)
                if after:
                    after(*a, **k)
                return r
            setattr(owner, name, f)

        def xs_req(store, conn, msg):
            if conn.domid:
                path = msg.payload.split(b"\0")[0].decode(errors="replace")
                try:
                    t = XsType(msg.type).name
                except ValueError:
                    t = str(msg.type)
                cls.note(f"{cls.host(store)}:d{conn.domid}:xs:{t}:{path}")
        wrap(Store, "process", before=xs_req)

        def serve_ring(orig):
            def f(self, domid, page, notify):
                tr = orig(self, domid, page, notify)
                k = tr.kick
                h = cls.host(self.store)
                tr.kick = lambda: (cls.note(f"{h}:d{domid}:xs-kick"), k())[1]
                return tr
            return f
        XenstoreServer.serve_ring = serve_ring(XenstoreServer.serve_ring)
        def dn(d) -> str:
            return f"{cls.host(d.hypervisor)}:d{d.domid}"
        wrap(Netback, "_set_state", before=lambda nb, s: cls.note(f"{dn(nb.dom)}:vif:{s.name}"))
        wrap(Netback, "close", before=lambda nb: cls.note(f"{dn(nb.dom)}:tap-close"),
             after=lambda nb: cls.note(f"{dn(nb.dom)}:tap-closed"))
        def first_packet(name, counter, what):
            """Netback.<name> noting `what` the first time a call moves a packet (its
            stats.<counter> grows)."""
            orig = getattr(Netback, name)

            def f(nb):
                n = getattr(nb.stats, counter)
                r = orig(nb)
                if getattr(nb.stats, counter) > n:
                    cls.note(f"{dn(nb.dom)}:{what}", once=True)
                return r
            setattr(Netback, name, f)
        first_packet("_process_tx", "tx_packets", "first-tx")
        first_packet("_rx_deliver", "rx_packets", "first-rx")
        wrap(H, "start_domain", before=lambda _h, d: cls.note(f"{dn(d)}:start"))
        wrap(Domain, "shutdown", before=lambda d, *a: cls.note(f"{dn(d)}:shutdown"))
        wrap(Domain, "_console_line_out",
             before=lambda d, raw: cls.note(f"{dn(d)}:console:{bytes(raw[:40]).decode(errors='replace').strip()}"))
        td, rg = H._teardown, Domain._release_gen

        async def teardown(h, d):
            cls.note(f"{dn(d)}:teardown")
            await td(h, d)
            cls.note(f"{dn(d)}:teardown-done")
        H._teardown = teardown

        def release_gen(d):
            t = time.perf_counter()
            for _ in rg(d):
                n = time.perf_counter()
                if n - t > 0.003:
                    cls.ev.append((t, f"{dn(d)}:destroy step {(n - t) * 1e3:.1f} ms"))
                yield
                t = time.perf_counter()
        Domain._release_gen = release_gen

    @staticmethod
    async def stalls(out: list[tuple], stop: asyncio.Event, over: float = 0.003) -> None:
        """The loop's wall-clock stalls longer than `over`: (start, length, thread CPU time
        in it, time the thread waited in the host's run queue, where the loop thread was
        when a sampler thread looked during the stall). CPU ~ length: turns of other work
        (a teardown step, a vCPU slice) every callback on the loop waited for; run-queue
        wait: the thread waiting for a core; neither: the thread blocked (a lock, the GIL,
        a syscall), which `where` names. The sampler runs at real-time priority when it
        may, so it sees a boosted loop's stalls too."""
        import sys as _sys
        import threading
        tid = threading.get_ident()
        seen: dict[float, str] = {}
        last = [time.perf_counter()]

        def sched() -> tuple[float, float]:
            with open("/proc/thread-self/schedstat") as f:
                run, wait, _ = f.read().split()
            return int(run) / 1e9, int(wait) / 1e9

        def sample() -> None:
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(2))
            except OSError:
                pass
            while not stop.is_set():
                time.sleep(0.001)
                t0 = last[0]
                if time.perf_counter() - t0 > over and t0 not in seen:
                    f = _sys._current_frames().get(tid)
                    parts = []
                    while f is not None and len(parts) < 4:
                        if not f.f_code.co_filename.startswith("<frozen"):
                            parts.append(f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}:"
                                         f"{f.f_code.co_name}")
                        f = f.f_back
                    seen[t0] = " < ".join(parts)
        th = threading.Thread(target=sample, name="stall-sampler", daemon=True)
        th.start()
        t, c = time.perf_counter(), time.thread_time()
        _r, w = sched()
        while not stop.is_set():
            # 1 ms: uvloop runs a shorter sleep as none (its timers are whole ms), and that
            # spin, on a loop boosted to real-time priority for a downtime, held a core the
            # boosted tap writer then waited for (the source's tail held 100 ms, in 3 of ~40
            # traced two-process runs: both loops spun and the writer, runnable, never ran).
            await asyncio.sleep(TICK_S)
            n, nc = time.perf_counter(), time.thread_time()
            _r, nw = sched()
            last[0] = n
            if n - t > over + TICK_S:
                out.append((t, n - t, nc - c, nw - w, seen.get(t, "")))
            t, c, w = n, nc, nw
        th.join()


SECRET = b"bench-secret-0123456789"


REALTIME = True             # --no-realtime: the stop-and-copy at normal priority (A/B)


async def live_one(engine: str, mib: int, dirty: int) -> dict[str, float]:
    from aiovmm.migration import live
    async with Hypervisor(memory_mib=mib + 64, engine=engine) as src, \
            Hypervisor(memory_mib=mib + 64, engine=engine) as dst:
        arrived = []
        rx = await live.serve(dst, "127.0.0.1", 0, SECRET, arrived.append, realtime=REALTIME)
        try:
            dom = await src.create(GUEST, memory_mib=mib, cmdline=f"pages=256 every=10 dirty={dirty}")
            await dom.wait_for_line(r"uptime: ticks=20 ", 30)
            t0 = time.perf_counter()
            st = await live.migrate(dom, "127.0.0.1", rx.port, SECRET, downtime_ms=30, realtime=REALTIME)
            total = time.perf_counter() - t0
            rx_marks = dict(rx.marks)
            await arrived[0].wait_for_line(r"suspend: resumed rc=0", 10)
            rx_marks["rx_guest_resumed"] = time.perf_counter()
            arrived[0].shutdown()
            await asyncio.wait([arrived[0].task])
        finally:
            await rx.aclose()
    return {"total_ms": total * 1e3, "rounds": st.rounds, "ratio": st.pages_sent / (mib << 8),
            "downtime_ms": st.downtime_ms, "mib_sent": st.bytes_sent / (1 << 20),
            "downtime_cpu_ms": st.downtime_cpu_ms,
            "last_pages": st.dirty_per_round[-1], "timeline": timeline(st.marks, rx_marks)}


def timeline(tx: dict[str, float], rx: dict[str, float]) -> str:
    """Both sides' steps of the stop-and-copy (one process, one clock), in ms from the
    guest's suspend: where the downtime goes."""
    t0 = tx["suspended"]
    steps = sorted([(t, k) for k, t in tx.items()] + [(t, k) for k, t in rx.items() if t >= t0 - 1])
    return " ".join(f"{k}={(t - t0) * 1e3:+.1f}" for t, k in steps)


async def lan_one(engine: str, mib: int, procs: int = 1) -> dict[str, float]:
    """One live migration on the switched LAN under 1 ms pings. procs=2: the destination
    hypervisor runs in a process of its own (`dst_child`), as two daemons do; procs=1:
    both in this process (one loop)."""
    import contextlib
    import json
    import re
    from aiovmm.migration import live
    from aiovmm.testing import TwoHostLan
    mac, ip = "00:16:3e:4d:0b:01", "198.18.0.2"
    off = time.time() - time.perf_counter()   # ping -D's clock from perf_counter's
    Trace.ev, Trace.firsts = [], set()
    stalls: list[tuple] = []
    stop = asyncio.Event()
    async with TwoHostLan("198.18.0.1/24") as lan, contextlib.AsyncExitStack() as ex:
        src = await ex.enter_async_context(Hypervisor(memory_mib=mib + 64, engine=engine, netns=lan.host_ns["a"]))
        Trace.name(src, "A")
        started: list[int] = []
        child = None
        if procs == 1:
            dst = await ex.enter_async_context(Hypervisor(memory_mib=mib + 64, engine=engine, netns=lan.host_ns["b"]))
            Trace.name(dst, "B")
            rx = await live.serve(dst, "127.0.0.1", 0, SECRET, lambda d: started.append(time.time_ns()),
                                  realtime=REALTIME)
            ex.push_async_callback(rx.aclose)
            port = rx.port
        else:
            argv = [sys.executable, os.path.abspath(__file__), "--dst-child", f"{lan.host_ns['b']},{engine},{mib}"]
            argv += ["--timeline"] if Trace.on else []
            argv += ["--no-realtime"] if not REALTIME else []
            child = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                         stdout=asyncio.subprocess.PIPE,
                                                         limit=1 << 24)    # the dump: one line

            async def reap() -> None:
                if child.returncode is None:
                    child.kill()
                    await child.wait()
            ex.push_async_callback(reap)
            port = int((await child.stdout.readline()).decode())
        dom = await src.create(NETGUEST, memory_mib=mib, cmdline=f"ip={ip}/24 suspend=1",
                               vifs=[lan.vif("a", mac)])
        await dom.wait_for_line(r"net: serving", 30)
        await lan.run("ping", "-c", "2", "-i", "0.2", ip)
        cap = await asyncio.to_thread(lan.capture, "up-b", (0x8035,))
        ping = asyncio.ensure_future(lan.run("ping", "-D", "-n", "-i", "0.001", "-w", "4",
                                             "-W", "1", ip, timeout=15))
        await asyncio.sleep(1.0)
        ticker = asyncio.ensure_future(Trace.stalls(stalls, stop)) if Trace.on else None
        st = await live.migrate(dom, "127.0.0.1", port, SECRET, downtime_ms=30, realtime=REALTIME)
        await asyncio.sleep(0.6)
        _rc, out = await ping
        stop.set()
        if ticker is not None:
            await ticker
        if procs == 1:
            stalls = [(*x, "") for x in stalls]
        await asyncio.sleep(0.2)
        frames = cap.frames()
        cap.close()
        if child is None:
            rx_marks = dict(rx.marks)
        else:
            child.stdin.write(b"dump\n")
            got = json.loads(await child.stdout.readline())
            rx_marks, started = got["marks"], got["started"]
            Trace.ev += [tuple(e) for e in got["ev"]]
            stalls = [(*x, "A" if procs == 2 else "") for x in stalls] + [(*x, "B") for x in got["stalls"]]
            await child.wait()
    stamps = [float(t) for t in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", out, re.M)]
    gaps = [(b - a, a, b) for a, b in zip(stamps, stamps[1:])]
    # The hand-over's gap: the one around the guest's suspend (its downtime as the client
    # sees it); the longest one may be elsewhere (a loop stall in pre-copy on a busy host).
    sus = st.marks["suspended"] + off
    around = [g for g in gaps if g[1] <= sus <= g[2]] or [(float("nan"), 0.0, 0.0)]
    gap, g0, g1 = around[0]
    gmax = max(gaps)[0] if gaps else float("nan")
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    lost = int(m.group(1)) - int(m.group(2)) if m else -1
    first = frames[0][0] if frames else 0
    sus_ns = (st.marks["suspended"] + off) * 1e9           # ping -D's clock: CLOCK_REALTIME
    tl = timeline(st.marks, rx_marks)
    if Trace.on:
        tl = lan_timeline(st.marks, rx_marks, g0 - off, g1 - off, stalls)
    return {"ping_gap_ms": gap * 1e3, "ping_gap_max_ms": gmax * 1e3, "lost": lost,
            "announce_ms": (first - sus_ns) / 1e6 if frames else float("nan"),
            "announce_lead_ms": (started[0] - first) / 1e6 if frames else float("nan"),
            "downtime_ms": st.downtime_ms, "timeline": tl}


def lan_timeline(tx: dict[str, float], rx: dict[str, float], gap0: float, gap1: float,
                 stalls: list[tuple]) -> str:
    """Every traced step from the last ping reply before the gap to the first after it,
    in ms from the suspend, one per line; the loops' stalls over 3 ms among them."""
    t0 = tx["suspended"]
    ev = [(t, k) for k, t in tx.items()] + [(t, "rx:" + k) for k, t in rx.items()] + list(Trace.ev)
    ev += [(gap0, "PING last reply before the gap"), (gap1, "PING first reply after the gap")]
    ev += [(t, f"{h} loop stall {n * 1e3:.1f} ms ({c * 1e3:.1f} CPU, {w * 1e3:.1f} run queue)"
               + (f" in {where}" if where else "")) for t, n, c, w, where, h in stalls]
    lines = [f"    {(t - t0) * 1e3:+8.1f} {k}" for t, k in sorted(ev) if gap0 - 0.005 <= t <= gap1 + 0.005]
    return "\n" + "\n".join(lines)


async def dst_child(spec: str) -> None:
    """--dst-child NETNS,ENGINE,MIB: the destination host of `lan_one(procs=2)` as a
    process of its own. Prints its port; on "dump" from stdin prints its marks, start
    time and trace as one JSON line, and exits."""
    import json
    from aiovmm.migration import live
    ns, engine, mib = spec.split(",")
    started: list[int] = []
    stalls: list[tuple] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    Trace.here = "B"
    async with Hypervisor(memory_mib=int(mib) + 64, engine=engine, netns=ns) as dst:
        rx = await live.serve(dst, "127.0.0.1", 0, SECRET, lambda d: started.append(time.time_ns()),
                              realtime=REALTIME)
        ticker = asyncio.ensure_future(Trace.stalls(stalls, stop)) if Trace.on else None
        print(rx.port, flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        stop.set()
        if ticker is not None:
            await ticker
        marks = dict(rx.marks)
        await rx.aclose()
        for d in list(dst.domains.values()):
            d.shutdown()
        print(json.dumps({"marks": marks, "started": started, "ev": Trace.ev, "stalls": stalls}), flush=True)


async def fuzz_run(n: int, d: str) -> tuple[int, int, float]:
    from hypothesis import HealthCheck, given, settings
    path = os.path.join(d, "fuzz.save")
    async with Hypervisor(memory_mib=256) as hv:
        dom = await hv.create(GUEST, memory_mib=4, cmdline="pages=8 every=10")
        await dom.wait_for_line(r"uptime: ticks=10 ", 20)
        await dom.save(path)
    data = open(path, "rb").read()
    hot = fuzz.hot_offsets(data)
    counts = {"refused": 0, "accepted": 0}
    loop = asyncio.get_running_loop()
    hv = Hypervisor(memory_mib=256)
    await hv.__aenter__()
    try:
        nb = await hv.create(GUEST, memory_mib=4, cmdline="pages=8 every=10")
        await nb.wait_for_line(r"uptime: ticks=10 ", 20)
        cases = []

        @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(fuzz.mutations(data, hot))
        def collect(m: bytes) -> None:
            cases.append(m)
        collect()
        t0 = time.perf_counter()
        for m in cases:
            counts[await fuzz.run_case(hv, m)] += 1
            assert not nb.dying
        dt = time.perf_counter() - t0
    finally:
        await hv.__aexit__(None, None, None)
    return counts["refused"], counts["accepted"], dt


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64,256")
    ap.add_argument("--fuzz", type=int, default=0, help="receiver fuzzer cases (0: none)")
    ap.add_argument("--parts", default="file,live,lan", help="which of file,live,lan to run")
    ap.add_argument("--engines", default="unicorn,kvm")
    ap.add_argument("--runs", type=int, default=3, help="live migrations per case (median)")
    ap.add_argument("--timeline", action="store_true", help="print each live run's stop-and-copy steps")
    ap.add_argument("--no-realtime", action="store_true", help="stop-and-copy at normal priority")
    ap.add_argument("--procs", default="1,2", help="LAN part: 1 (both hosts in this process), "
                    "2 (the destination in a process of its own), or both")
    ap.add_argument("--dst-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    global REALTIME
    REALTIME = not a.no_realtime
    if a.timeline and (a.dst_child or "lan" in a.parts):
        Trace.install()
        Trace.on = True
    if a.dst_child:
        return await dst_child(a.dst_child)
    engines = [e for e in a.engines.split(",") if e == "unicorn" or unavailable_reason() is None]
    parts = set(a.parts.split(","))
    keys: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        for engine in engines:
            for mib in (int(x) for x in a.sizes.split(",")) if "file" in parts else ():
                r = await one(engine, mib, d)
                print(f"{engine:8s} {mib:4d} MiB: suspend {r['suspend_ms']:.1f} ms, save {r['save_ms']:.1f} ms "
                      f"({r['file_mib']:.1f} MiB), restore {r['restore_ms']:.1f} ms (plain {r['plain_ms']:.1f} ms), "
                      f"restore->resumed {r['resume_ms']:.1f} ms, longest loop stall in the restore "
                      f"{r['stall_ms']:.1f} ms CPU", flush=True)
                if mib == 64:
                    pre = "" if engine == "unicorn" else "kvm_"
                    keys[f"{pre}save_ms"] = f"{r['save_ms']:.1f}"
                    keys[f"{pre}restore_ms"] = f"{r['restore_ms']:.1f}"
                    keys[f"{pre}restore_plain_ms"] = f"{r['plain_ms']:.1f}"
                    keys[f"{pre}restore_stall_ms"] = f"{r['stall_ms']:.1f}"
                    keys[f"{pre}suspend_ms"] = f"{r['suspend_ms']:.1f}"
            for mib in (int(x) for x in a.sizes.split(",")) if "live" in parts else ():
                for label, dirty in (("idle", 0), ("busy", 64)):
                    runs = [await live_one(engine, mib, dirty) for _ in range(a.runs)]
                    if a.timeline:
                        for x in runs:
                            print(f"  timeline ms ({x['last_pages']} last pages, {x['downtime_cpu_ms']:.1f} ms CPU): "
                                  f"{x['timeline']}", flush=True)
                    r = {k: statistics.median(x[k] for x in runs) for k in runs[0] if k != "timeline"}
                    print(f"{engine:8s} {mib:4d} MiB live {label} (dirty {dirty} pages/10 ms): total "
                          f"{r['total_ms']:.0f} ms, {r['rounds']:.0f} rounds, {r['ratio']:.2f} pages sent per "
                          f"page ({r['mib_sent']:.1f} MiB), downtime {r['downtime_ms']:.1f} ms "
                          "(runs: " + ", ".join(f"{x['downtime_ms']:.1f}" for x in runs) + ")", flush=True)
                    if mib == 64:
                        pre = "" if engine == "unicorn" else "kvm_"
                        keys[f"{pre}downtime_{label}_ms"] = f"{r['downtime_ms']:.1f}"
                        if label == "idle":
                            keys[f"{pre}pages_ratio_idle"] = f"{r['ratio']:.2f}"
            for procs in (int(x) for x in a.procs.split(",")) if "lan" in parts else ():
                runs = [await lan_one(engine, 64, procs) for _ in range(a.runs)]
                if a.timeline:
                    for x in runs:
                        print(f"  timeline ms (gap {x['ping_gap_ms']:.1f} ms, {x['lost']} lost): {x['timeline']}",
                              flush=True)
                r = {k: statistics.median(x[k] for x in runs) for k in runs[0] if k != "timeline"}
                where = "one process" if procs == 1 else "two processes"
                print(f"{engine:8s}   64 MiB live on a switched LAN ({where}, 1 ms pings): gap between "
                      f"replies around the suspend {r['ping_gap_ms']:.1f} ms (longest anywhere "
                      f"{r['ping_gap_max_ms']:.1f} ms), {r['lost']:.0f} pings lost, first announce "
                      f"frame {r['announce_ms']:.1f} ms after the suspend ({r['announce_lead_ms']:.1f} ms "
                      f"before the guest's start on the destination), downtime "
                      f"{r['downtime_ms']:.1f} ms (gaps: " + ", ".join(f"{x['ping_gap_ms']:.1f}" for x in runs)
                      + ")", flush=True)
                pre = "" if engine == "unicorn" else "kvm_"
                two = "" if procs == 1 else "_2proc"
                keys[f"{pre}downtime_ping{two}_ms"] = f"{r['ping_gap_ms']:.1f}"
                keys[f"{pre}ping_gap_max{two}_ms"] = f"{r['ping_gap_max_ms']:.1f}"
                if procs == 1:
                    keys[f"{pre}announce_ms"] = f"{r['announce_ms']:.1f}"
        if a.fuzz:
            ref, acc, dt = await fuzz_run(a.fuzz, d)
            print(f"fuzzer: {a.fuzz} cases, {ref} refused, {acc} accepted (and destroyed), "
                  f"{dt:.1f} s, receiver never crashed", flush=True)
            keys["fuzz_cases"] = str(a.fuzz)
    print(" ".join(f"{k}={v}" for k, v in keys.items()))


if __name__ == "__main__":
    import uvloop
    uvloop.run(main())
