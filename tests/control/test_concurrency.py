"""Issue 12: 100 concurrent API create requests and then 100 concurrent destroys against a
real daemon: every domain is either fully created (its vif connected, a real tap on the
test's bridge) or refused with a 4xx; afterwards no tap, frame, xenstore node or task is
left over."""
from __future__ import annotations

import asyncio
import subprocess
import time

import aiohttp
import pytest

from aiovmm.testing import VirtualLan
from .ctlhelp import Daemon, guest

N = 100


@pytest.fixture
def lan():
    v = VirtualLan()
    asyncio.run(v.__aenter__())
    try:
        yield v
    finally:
        asyncio.run(v.aclose())


def _taps(ns: str) -> list[str]:
    out = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True).stdout
    return [l.split(":")[1].strip().split("@")[0] for l in out.splitlines() if ": vif" in l]


async def _storm(sock: str, lan_ns: str) -> tuple[list, list]:
    conn = aiohttp.UnixConnector(path=sock, limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as s:
        async def create(i: int):
            body = {"kernel": guest("net"), "memory": 4, "name": f"c{i}",
                    "cmdline": f"ip=198.18.1.{i + 1}/16",
                    "vif": [f"mac=00:16:3e:33:00:{i:02x},bridge=br0,netns={lan_ns}"]}
            async with s.post("http://x/api/v1/domains", json=body) as r:
                return i, r.status, await r.json()

        async def destroy(ref: str):
            async with s.delete(f"http://x/api/v1/domains/{ref}") as r:
                return ref, r.status, await r.json()

        created = await asyncio.gather(*(create(i) for i in range(N)))
        ok = [d["id"] for _, st, d in created if st == 201]
        # wait until every created guest's frontend has connected (fully created)
        deadline = time.monotonic() + 180
        while True:
            async with s.get("http://x/api/v1/domains") as r:
                doms = await r.json()
            connected = [d for d in doms if d["vifs"] and d["vifs"][0]["state"] == 4]
            if len(connected) == len(ok) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        destroyed = await asyncio.gather(*(destroy(f"c{i}") for i in range(N)))
        return created, destroyed, doms


def test_100_concurrent_create_destroy(lan):
    d = Daemon(machine_memory=192)
    try:
        start = d.api("GET", "/api/v1/info")
        try:
            created, destroyed, doms = asyncio.run(_storm(d.socket, lan.lan_ns))
        except aiohttp.ClientError as e:
            pytest.fail(f"{e!r}; daemon log: {d.log()[-3000:]}")
        statuses = [st for _, st, _ in created]
        assert set(statuses) <= {201, 409}, statuses
        ok = {i for i, st, _ in created if st == 201}
        refused = {i for i, st, _ in created if st == 409}
        assert len(ok) >= 10 and len(refused) >= 10, (len(ok), len(refused))   # 192 MiB: some of each
        for i, st, body in created:
            if st == 409:
                assert list(body) == ["error"] and "memory" in body["error"], body
        # fully created: each listed with its vif connected and a tap on the bridge
        listed = {x["name"]: x for x in doms}
        # On an overloaded machine a guest's netfront may give up waiting for its backend
        # (net.elf's own timeouts) and the guest panics; the daemon then destroys it
        # (on_crash=destroy). That, and nothing else, may remove a created domain early.
        gone = {f"c{i}" for i in ok} - set(listed)
        log = d.log()
        why = [g for g in gone if f"({g}) console: panic: net: netfront init failed" not in log]
        assert not why, [l for l in log.splitlines() if any(f"({g})" in l for g in sorted(why)[:2])]
        assert len(gone) <= len(ok) // 10, sorted(gone)
        assert set(listed) | gone == {f"c{i}" for i in ok}
        assert all(x["vifs"][0]["state"] == 4 for x in doms), [x["vifs"] for x in doms if x["vifs"][0]["state"] != 4]
        for ref, st, body in destroyed:
            i = int(ref[1:])
            # (the daemon's lines about that domain, should it have ended on its own)
            panicked = f"({ref}) console: panic: net: netfront init failed" in d.log()
            want = {200} if i in ok and ref in listed else {404}
            if i in ok and panicked:
                want = {200, 404}
            assert st in want, (ref, st, body, [l for l in d.log().splitlines()
                                                                    if f"({ref})" in l][-6:])
        end = d.api("GET", "/api/v1/info")
        assert end["nr_domains"] == 0
        assert end["free_frames"] == start["free_frames"]
        assert end["xenstore_nodes"] == start["xenstore_nodes"]
        assert end["tasks"] == start["tasks"]
        assert _taps(lan.lan_ns) == []
        assert "Traceback" not in d.log()
    finally:
        d.stop()
