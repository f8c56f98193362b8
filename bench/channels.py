"""Device channels: event round trips, grant maps, xenstore operations.

Figures (all medians; the guest and reference batches are interleaved, --reps of each):
  - evt_rtt_us:    host -> guest -> host through an interdomain event channel and a granted
                   page. guests/build/tests/grant_pair.elf runs `role=offer peer=0`: it grants
                   a page to domid 0 and offers it a port; the host maps the grant (host_map),
                   binds the port (HostPort) and plays the mapper: write seq=2i + pattern A,
                   notify, await the guest's seq=2i+1 + pattern B (checked). Timed on the host
                   (perf_counter) per round. No existing guest starts a round trip towards a
                   host backend and times it, so the host starts it; the path is the same
                   (guest -> host backend -> guest, seen from the other end).
  - guest_rtt_us:  guest <-> guest, the same protocol between two grant_pair guests; the
                   mapper's own pvclock mean (`result rtt_ns`), one value per run.
  - grant_map_us:  host_map() + close() of the page that grant_pair granted to domid 0, on the
                   running guest, --maps times in batches (per-op median over batches).
  - xs_read_ops, xs_write_ops: xenstore requests per second over the daemon's unix socket
                   (Hypervisor(xenstore_path=...)), a Python client speaking xsd_sockmsg, one
                   request in flight, against /local/domain/<id>/data/bench of a running
                   kernel.elf.
  - xs_util_read_ops: Debian's xenstore-read, one process per call (spawn + connect + read),
                   the way scripts use it (skipped with 0 if xenstore-utils is missing).
  - xs_ring_read_ops, xs_ring_write_ops: xenstore requests per second over a guest's store
                   ring: guests/build/tests/xenbus.elf `bench=<--ring-ops>` does n xenbus_write
                   of a 16-byte value to its data/bench, then n xenbus_read of it (one request
                   in flight), each phase timed with its pvclock (`xenbus: bench writes=<n>
                   ns=<t>`, `... reads=<n> ns=<t>`); one figure per boot, --ring-boots boots.
Reference in the same run: pipe_rtt_us, a host round trip through an os.pipe pair on the same
event loop: write a byte to pipe A; an echo reader (loop.add_reader) reads it and writes it to
pipe B; the timed side awaits it on B. Same wake-up machinery as a HostPort, no guest.

Last line: evt_rtt_us=<x> pipe_rtt_us=<y> ratio=<x/y> guest_rtt_us=<g> grant_map_us=<m>
           xs_read_ops=<r> xs_write_ops=<w> xs_ring_read_ops=<rr> xs_ring_write_ops=<rw>
           xs_util_read_ops=<u>
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import struct
import sys
import tempfile
import time

import uvloop

from aiovmm import Hypervisor
from aiovmm.abi import ShutdownReason
from aiovmm.grants import host_map

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRANT_PAIR = os.path.join(ROOT, "guests/build/tests/grant_pair.elf")
KERNEL = os.path.join(ROOT, "guests/build/kernel.elf")
XENBUS = os.path.join(ROOT, "guests/build/tests/xenbus.elf")
XS_BENCH_RE = re.compile(r"xenbus: bench (writes|reads)=(\d+) ns=(\d+)")
OFFER_RE = re.compile(r"result offer ref=(\d+) port=(\d+)")
MASK64 = (1 << 64) - 1
HDR = struct.Struct("<IIII")
XS_READ, XS_WRITE, XS_ERROR = 2, 11, 16


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def pat_a(seq: int, k: int) -> int:
    return ((seq * 0x9E3779B97F4A7C15) & MASK64) ^ k


def pat_b(seq: int, k: int) -> int:
    return ((~(seq * 0xC2B2AE3D27D4EB4F)) + k) & MASK64


def spread(name: str, xs: list[float], unit: str) -> str:
    xs = sorted(xs)
    return (f"{name:<34} median {statistics.median(xs):10.2f} {unit}  min {xs[0]:10.2f}  "
            f"max {xs[-1]:10.2f}  (n={len(xs)})")


async def offer(hv: Hypervisor, peer: int, rounds: int):
    dom = await hv.create(GRANT_PAIR, memory_mib=8, cmdline=f"role=offer peer={peer} rounds={rounds}")
    m = OFFER_RE.fullmatch(await dom.wait_for_line(r"^result offer ", timeout=30))
    return dom, int(m[1]), int(m[2])


async def end_ok(dom, timeout: float = 60) -> dict[str, str]:
    async with asyncio.timeout(timeout):
        reason = await dom.wait()
    if reason != ShutdownReason.poweroff:
        fail(f"d{dom.domid}: {dom.describe_end()}; console {dom.console_lines}")
    return {m[1]: m[2] for l in dom.console_lines if (m := re.fullmatch(r"result (\S+) (.*)", l))}


# ----------------------------------------------------------------------------- reference
class PipeEcho:
    def __init__(self) -> None:
        self.a_r, self.a_w = os.pipe()
        self.b_r, self.b_w = os.pipe()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.a_r, self._echo)
        self._fut: asyncio.Future | None = None
        self.loop.add_reader(self.b_r, self._back)

    def _echo(self) -> None:
        os.write(self.b_w, os.read(self.a_r, 1))

    def _back(self) -> None:
        os.read(self.b_r, 1)
        if self._fut is not None and not self._fut.done():
            self._fut.set_result(None)

    async def round(self) -> float:
        self._fut = self.loop.create_future()
        t0 = time.perf_counter()
        os.write(self.a_w, b"x")
        await self._fut
        return time.perf_counter() - t0

    def close(self) -> None:
        self.loop.remove_reader(self.a_r)
        self.loop.remove_reader(self.b_r)
        for fd in (self.a_r, self.a_w, self.b_r, self.b_w):
            os.close(fd)


# ---------------------------------------------------------------------- host as the mapper
class HostMapper:
    def __init__(self, dom, ref: int, port: int) -> None:
        hv = dom.hypervisor
        self.dom, self.ref = dom, ref
        self.ep = hv.host.endpoint_bind(dom.domid, port)
        self.map = host_map(dom, ref)
        self.i = 0
        self.errors = 0

    async def round(self) -> float:
        seq = 2 * self.i
        data = struct.pack("<64Q", *(pat_a(seq, k) for k in range(64)))
        want = [pat_b(seq + 1, k) for k in range(64)]
        v = self.map.view
        t0 = time.perf_counter()
        v[8:8 + 512] = data
        struct.pack_into("<Q", v, 0, seq)
        self.ep.notify()
        while struct.unpack_from("<Q", v, 0)[0] != seq + 1:
            await self.ep.wait()
        t = time.perf_counter() - t0
        if list(struct.unpack_from("<64Q", v, 8)) != want:
            self.errors += 1
        self.i += 1
        return t

    def finish(self) -> None:
        self.map.close()
        self.ep.notify()


def grant_map_batch(dom, ref: int, n: int) -> float:
    """Seconds per host_map()+close() (writable), averaged over n."""
    t0 = time.perf_counter()
    for _ in range(n):
        host_map(dom, ref).close()
    return (time.perf_counter() - t0) / n


# ---------------------------------------------------------------------------------- xenstore
class XsClient:
    def __init__(self, reader, writer) -> None:
        self.reader, self.writer, self.req = reader, writer, 0

    async def call(self, type_: int, payload: bytes) -> bytes:
        self.req += 1
        self.writer.write(HDR.pack(type_, self.req, 0, len(payload)) + payload)
        t, r, _tx, n = HDR.unpack(await self.reader.readexactly(16))
        body = await self.reader.readexactly(n)
        if t == XS_ERROR or r != self.req:
            fail(f"xenstore request {type_}: reply {t} {body!r}")
        return body


async def xs_batch(c: XsClient, path: str, n: int, write: bool) -> float:
    """Operations per second for n sequential requests."""
    rd = path.encode() + b"\0"
    wr = rd + b"value-0123456789"
    t0 = time.perf_counter()
    if write:
        for _ in range(n):
            await c.call(XS_WRITE, wr)
    else:
        for _ in range(n):
            await c.call(XS_READ, rd)
    return n / (time.perf_counter() - t0)


async def xs_util_read(env, path: str) -> float:
    t0 = time.perf_counter()
    p = await asyncio.create_subprocess_exec("xenstore-read", path, env=env,
                                             stdout=asyncio.subprocess.PIPE)
    out, _ = await p.communicate()
    if p.returncode != 0 or out != b"value-0123456789\n":
        fail(f"xenstore-read {path}: rc {p.returncode} {out!r}")
    return time.perf_counter() - t0


async def xs_ring_boot(hv: Hypervisor, n: int) -> tuple[float, float]:
    """One boot of xenbus.elf bench=n: (read ops/s, write ops/s) by the guest's pvclock."""
    dom = await hv.create(XENBUS, memory_mib=8, cmdline=f"bench={n}", name="xsring")
    await end_ok(dom)
    got = {m[1]: (int(m[2]), int(m[3]))
           for l in dom.console_lines if (m := XS_BENCH_RE.fullmatch(l))}
    if set(got) != {"writes", "reads"} or any(c != n or t <= 0 for c, t in got.values()):
        fail(f"xenbus.elf bench={n}: console {dom.console_lines}")
    return n / (got["reads"][1] / 1e9), n / (got["writes"][1] / 1e9)


# ------------------------------------------------------------------------------------- main
async def main(reps: int, batch: int, maps: int, guest_runs: int, xs_ops: int,
               ring_boots: int, ring_ops: int) -> None:
    sdir = tempfile.mkdtemp(prefix="chb", dir="/tmp")
    sock = os.path.join(sdir, "xs.sock")
    pipe_us, evt_us, map_us, guest_us = [], [], [], []
    xs_r, xs_w, util, ring_r, ring_w = [], [], [], [], []
    try:
        async with Hypervisor(memory_mib=512, xenstore_path=sock) as hv:
            pipe = PipeEcho()
            # --- host <-> guest event round trips, grant maps, pipe reference (interleaved)
            dom, ref, port = await offer(hv, 0, reps * batch + 100)
            mapper = HostMapper(dom, ref, port)
            for _ in range(100):                             # warm-up (translation, caches)
                await mapper.round()
                await pipe.round()
            grant_map_batch(dom, ref, 200)
            for _ in range(reps):
                pipe_us += [await pipe.round() * 1e6 for _ in range(batch)]
                evt_us += [await mapper.round() * 1e6 for _ in range(batch)]
                map_us.append(grant_map_batch(dom, ref, maps // reps) * 1e6)
            mapper.finish()
            r = await end_ok(dom)
            if (r.get("rounds"), r.get("errors"), r.get("end_access")) != (str(reps * batch + 100), "0", "1") \
                    or mapper.errors:
                fail(f"host mapper: guest says {r}, host saw {mapper.errors} bad replies")
            # --- guest <-> guest
            for _ in range(guest_runs):
                off, gref, gport = await offer(hv, hv._next_domid + 1, 5000)
                mp = await hv.create(GRANT_PAIR, memory_mib=8,
                                     cmdline=f"role=map peer={off.domid} ref={gref} port={gport} rounds=5000")
                rm, ro = await end_ok(mp), await end_ok(off)
                if rm.get("errors") != "0" or ro.get("errors") != "0" or rm.get("unmap") != "0":
                    fail(f"grant_pair: mapper {rm}, offerer {ro}")
                guest_us.append(int(rm["rtt_ns"]) / 1e3)
                pipe_us += [await pipe.round() * 1e6 for _ in range(batch)]
            # --- xenstore over the socket, against a running guest's home
            k = await hv.create(KERNEL, memory_mib=8, cmdline="spin=0", name="xsbench")
            await k.wait_for_line(r"^spin 1$", timeout=30)
            path = f"/local/domain/{k.domid}/data/bench"
            reader, writer = await asyncio.open_unix_connection(sock)
            c = XsClient(reader, writer)
            await c.call(XS_WRITE, path.encode() + b"\0value-0123456789")
            env = dict(os.environ, XENSTORED_PATH=sock) if shutil.which("xenstore-read") else None
            for _ in range(reps):
                xs_r.append(await xs_batch(c, path, xs_ops, write=False))
                xs_w.append(await xs_batch(c, path, xs_ops, write=True))
                if env:
                    util += [await xs_util_read(env, path) for _ in range(10)]
                pipe_us += [await pipe.round() * 1e6 for _ in range(batch // 4)]
            writer.close()
            if k.dying:
                fail(f"kernel.elf: {k.describe_end()}")
            # --- xenstore over a guest's ring (xenbus.elf bench mode), one figure per boot
            for _ in range(ring_boots):
                rr, rw = await xs_ring_boot(hv, ring_ops)
                ring_r.append(rr)
                ring_w.append(rw)
                pipe_us += [await pipe.round() * 1e6 for _ in range(batch // 4)]
            pipe.close()
    finally:
        shutil.rmtree(sdir, ignore_errors=True)

    evt, pip = statistics.median(evt_us), statistics.median(pipe_us)
    gst, gmap = statistics.median(guest_us), statistics.median(map_us)
    rd, wr = statistics.median(xs_r), statistics.median(xs_w)
    rrd, rwr = statistics.median(ring_r), statistics.median(ring_w)
    ut = 1 / statistics.median(util) if util else 0.0
    print(f"{reps} x {batch} host<->guest round trips (grant_pair peer=0), interleaved with "
          f"pipe round trips; {guest_runs} guest<->guest runs of 5000; {maps} grant maps; "
          f"{ring_boots} xenbus.elf boots of bench={ring_ops}")
    print(spread("event round trip host->guest->host", evt_us, "us"))
    print(spread("pipe round trip (reference)", pipe_us, "us"))
    print(spread("guest<->guest rtt (guest pvclock)", guest_us, "us"))
    print(spread("host_map+close per batch", map_us, "us"))
    print(spread("xenstore read over socket", xs_r, "ops/s"))
    print(spread("xenstore write over socket", xs_w, "ops/s"))
    print(spread("xenstore read over guest ring", ring_r, "ops/s"))
    print(spread("xenstore write over guest ring", ring_w, "ops/s"))
    if util:
        print(spread("xenstore-read process per call", [u * 1e3 for u in util], "ms"))
    else:
        print("xenstore-read: xenstore-utils not installed, skipped")
    print(f"event round trip / pipe round trip = {evt / pip:.1f}x")
    print(f"evt_rtt_us={evt:.1f} pipe_rtt_us={pip:.2f} ratio={evt / pip:.1f} guest_rtt_us={gst:.1f} "
          f"grant_map_us={gmap:.2f} xs_read_ops={rd:.0f} xs_write_ops={wr:.0f} "
          f"xs_ring_read_ops={rrd:.0f} xs_ring_write_ops={rwr:.0f} xs_util_read_ops={ut:.0f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1000, help="event round trips per rep")
    ap.add_argument("--maps", type=int, default=10000, help="grant map+unmap in total")
    ap.add_argument("--guest-runs", type=int, default=3)
    ap.add_argument("--xs-ops", type=int, default=2000, help="xenstore requests per rep and kind")
    ap.add_argument("--ring-boots", type=int, default=3, help="xenbus.elf bench boots")
    ap.add_argument("--ring-ops", type=int, default=2000,
                    help="xenstore requests per kind in each xenbus.elf bench boot")
    a = ap.parse_args()
    if a.ring_boots < 1 or a.ring_ops < 1:
        ap.error("--ring-boots and --ring-ops must be >= 1")
    uvloop.run(main(a.reps, a.batch, a.maps, a.guest_runs, a.xs_ops, a.ring_boots, a.ring_ops))
