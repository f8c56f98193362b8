"""The control plane (`aiovmm serve`), measured from an API client over its unix socket.

  - create_ms:   POST /api/v1/domains (guests/build/kernel.elf, 16 MiB) until the first
                 console byte arrives on the console WebSocket (connected right after the
                 create answer; the daemon replays what the guest printed meanwhile). Median
                 of --creates runs, each domain destroyed before the next.
  - list100_ms:  GET /api/v1/domains with 100 running guests (kernel.elf ticking once a
                 second, 4 MiB each); median of 30. Also `aiovmm list` (the CLI process,
                 start to exit) as cli_list100_ms.
  - read_rps:    GET /api/v1/info requests/s, 16 concurrent keep-alive clients for 3 s, the
                 100 guests still running.
Reference in the same run: a bare aiohttp server on a unix socket in a child process
answering GET with a fixed small JSON body (ref_rps), same client, same concurrency.

Last line: create_ms=<..> list100_ms=<..> read_rps=<..> cli_list100_ms=<..> ref_rps=<..>
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp
import uvloop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = os.path.join(ROOT, "guests/build/kernel.elf")
AIOVMM = os.path.join(os.path.dirname(sys.executable), "aiovmm")
N_GUESTS = 100

REF_SERVER = r"""
import sys, asyncio
from aiohttp import web
async def h(req): return web.json_response({"host": "ref", "nr_cpus": 2, "free_memory": 1})
app = web.Application(); app.router.add_get("/api/v1/info", h)
web.run_app(app, path=sys.argv[1], print=None, access_log=None)
"""


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def stats(label: str, xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=10) if len(xs) >= 2 else xs * 9
    return f"{label:34s} median {statistics.median(xs):8.2f} ms  p10 {q[0]:8.2f}  p90 {q[-1]:8.2f}  (n={len(xs)})"


async def wait_socket(path: str, proc: subprocess.Popen) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            fail(f"server exited {proc.returncode}")
        if os.path.exists(path):
            try:
                _, w = await asyncio.open_unix_connection(path)
                w.close()
                return
            except OSError:
                pass
        await asyncio.sleep(0.05)
    fail(f"no server on {path}")


async def create_to_first_byte(s: aiohttp.ClientSession, i: int) -> float:
    t0 = time.perf_counter()
    async with s.post("http://x/api/v1/domains", json={"kernel": KERNEL, "memory": 16, "name": f"b{i}",
                                                          "cmdline": "ticks=1000000 period_ms=1000"}) as r:
        if r.status != 201:
            fail(f"create: {r.status} {await r.text()}")
        domid = (await r.json())["id"]
    async with s.ws_connect(f"http://x/api/v1/domains/{domid}/console/ws") as ws:
        msg = await ws.receive(timeout=60)
        t1 = time.perf_counter()
        if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
            fail(f"console: {msg}")
    async with s.delete(f"http://x/api/v1/domains/{domid}") as r:
        if r.status != 200:
            fail(f"destroy: {r.status} {await r.text()}")
    return (t1 - t0) * 1000


async def rps(sock: str, seconds: float = 3.0, conc: int = 16) -> float:
    conn = aiohttp.UnixConnector(path=sock, limit=conc)
    done = 0
    async with aiohttp.ClientSession(connector=conn) as s:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < end:
                async with s.get("http://x/api/v1/info") as r:
                    await r.read()
                    if r.status != 200:
                        fail(f"info: {r.status}")
                done += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return done / (time.perf_counter() - t0)


async def main(creates: int) -> None:
    tmp = tempfile.mkdtemp(prefix="avbench")
    sock = os.path.join(tmp, "api.sock")
    ref_sock = os.path.join(tmp, "ref.sock")
    log = open(os.path.join(tmp, "serve.log"), "wb")
    daemon = subprocess.Popen([AIOVMM, "serve", "--socket", sock, "--machine-memory", "1024"],
                              stdout=log, stderr=subprocess.STDOUT)
    ref = subprocess.Popen([sys.executable, "-c", REF_SERVER, ref_sock])
    try:
        await wait_socket(sock, daemon)
        await wait_socket(ref_sock, ref)
        conn = aiohttp.UnixConnector(path=sock, limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as s:
            create = [await create_to_first_byte(s, i) for i in range(creates)]

            async def mk(i: int) -> None:
                body = {"kernel": KERNEL, "memory": 4, "name": f"g{i}", "cmdline": "ticks=1000000 period_ms=1000"}
                async with s.post("http://x/api/v1/domains", json=body) as r:
                    if r.status != 201:
                        fail(f"create g{i}: {r.status} {await r.text()}")
            await asyncio.gather(*(mk(i) for i in range(N_GUESTS)))
            await asyncio.sleep(1.0)
            lst = []
            for _ in range(30):
                t0 = time.perf_counter()
                async with s.get("http://x/api/v1/domains") as r:
                    doms = await r.json()
                lst.append((time.perf_counter() - t0) * 1000)
                if len(doms) != N_GUESTS:
                    fail(f"list: {len(doms)} domains")
            cli = []
            for _ in range(5):
                t0 = time.perf_counter()
                out = await asyncio.create_subprocess_exec(AIOVMM, "list", "--socket", sock,
                                                           stdout=asyncio.subprocess.PIPE)
                text, _ = await out.communicate()
                cli.append((time.perf_counter() - t0) * 1000)
                if out.returncode != 0 or len(text.splitlines()) != N_GUESTS + 1:
                    fail("aiovmm list")
            read = await rps(sock)
            refr = await rps(ref_sock)
            await asyncio.gather(*(s.delete(f"http://x/api/v1/domains/g{i}") for i in range(N_GUESTS)))
    finally:
        for p in (daemon, ref):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"aiovmm serve on a unix socket; {creates} creates of kernel.elf, then {N_GUESTS} running guests")
    print(stats("create -> first console byte", create))
    print(stats(f"GET /domains ({N_GUESTS} guests)", lst))
    print(stats(f"aiovmm list ({N_GUESTS} guests, CLI)", cli))
    print(f"{'GET /info, 16 clients':34s} {read:8.0f} req/s   reference aiohttp server {refr:8.0f} req/s "
          f"({read / refr:.2f}x)")
    print(f"create_ms={statistics.median(create):.2f} list100_ms={statistics.median(lst):.2f} "
          f"read_rps={read:.0f} cli_list100_ms={statistics.median(cli):.1f} ref_rps={refr:.0f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--creates", type=int, default=10)
    uvloop.run(main(ap.parse_args().creates))
