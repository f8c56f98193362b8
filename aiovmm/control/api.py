"""The REST API (aiohttp) over the Controller. Every answer is JSON; every refusal is a 4xx
with {"error": "<one clear message>"} (ControlError), and input is validated here before
the Controller sees it. Routes are listed once, in ROUTES, which openapi.py documents."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
from typing import Any, Awaitable, Callable

from aiohttp import WSMsgType, web

from ..console import text as console_text_of
from ..vcpu_op import MAX_VCPUS
from .daemon import CONSOLE_REPLAY_BYTES, ControlError, Controller, DomainSpec
from . import metrics, openapi

log = logging.getLogger("aiovmm.control.api")

CTL = web.AppKey("ctl", Controller)
API = "/api/v1"
WEB_DIR = os.path.join(os.path.dirname(__file__), "web")
MAX_BODY = 1 << 20
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, separators=(",", ":")))


def _err(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


async def _body(req: web.Request) -> dict:
    if not req.can_read_body:
        return {}
    try:
        data = await req.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise ControlError(400, "request body is not valid JSON") from None
    except RecursionError:               # [[[[... nested deeper than the parser recurses
        raise ControlError(400, "request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ControlError(400, "request body must be a JSON object")
    return data


def _field(data: dict, key: str, typ: type | tuple, required: bool = False, default: Any = None) -> Any:
    if key not in data or data[key] is None:
        if required:
            raise ControlError(400, f"missing field {key!r}")
        return default
    v = data[key]
    if isinstance(v, bool) and typ is not bool:
        raise ControlError(400, f"field {key!r} has the wrong type")
    if not isinstance(v, typ):
        raise ControlError(400, f"field {key!r} has the wrong type")
    if isinstance(v, str):
        _check_text(key, v)
    return v


def _check_text(key: str, v: str) -> None:
    """Strings go to file names, xenstore and guests as UTF-8: a lone surrogate (valid JSON,
    not encodable) or a NUL is refused here, once, for every field."""
    try:
        v.encode()
    except UnicodeEncodeError:
        raise ControlError(400, f"field {key!r} is not valid UTF-8 text") from None
    if "\0" in v:
        raise ControlError(400, f"field {key!r} contains a NUL byte")


def _int_field(data: dict, key: str, lo: int, hi: int, required: bool = False) -> int | None:
    v = _field(data, key, int, required)
    if v is not None and not lo <= v <= hi:
        raise ControlError(400, f"{key} must be {lo}..{hi}")
    return v


def _strings(data: dict, key: str) -> list[str]:
    v = _field(data, key, list, default=[])
    if not all(isinstance(x, str) for x in v):
        raise ControlError(400, f"{key} must be a list of strings")
    for x in v:
        _check_text(key, x)
    return list(v)


def _query_bool(req: web.Request, key: str) -> bool:
    v = req.query.get(key, "false").lower()
    if v not in ("true", "false", "1", "0"):
        raise ControlError(400, f"query parameter {key} must be true or false")
    return v in ("true", "1")


# ----------------------------------------------------------------------------- middleware
def _is_unix(req: web.Request) -> bool:
    sock = req.transport.get_extra_info("socket") if req.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


def _public(path: str) -> bool:
    """The web page's own files hold no data: served without the token (the page then
    sends the token the user gave it with every API call)."""
    return path == "/" or path.startswith("/web/")


def _middlewares(token: str | None) -> list:
    @web.middleware
    async def errors(req: web.Request, handler: Handler) -> web.StreamResponse:
        if token is not None and not _is_unix(req) and not _public(req.path):
            got = req.headers.get("Authorization", "").encode()
            ok = hmac.compare_digest(got, f"Bearer {token}".encode())
            # A browser cannot set headers on a WebSocket: the console takes it as a parameter.
            qt = req.query.get("access_token") if req.path.endswith("/console/ws") else None
            if qt is not None:
                ok = ok or hmac.compare_digest(qt.encode(), token.encode())
            if not ok:
                return _err(401, "missing or wrong bearer token")
        try:
            return await handler(req)
        except ControlError as e:
            return _err(e.status, e.message)
        except web.HTTPException as e:
            if e.status >= 400 and e.content_type != "application/json":
                return _err(e.status, e.reason)
            raise
    return [errors]


# -------------------------------------------------------------------------------- handlers
def _ctl(req: web.Request) -> Controller:
    return req.app[CTL]


async def info(req: web.Request) -> web.Response:
    return _json(_ctl(req).info())


async def list_domains(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    long = _query_bool(req, "long")
    return _json([ctl.describe(r, long) for _, r in sorted(ctl.records.items())])


async def create_domain(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    data = await _body(req)
    if "config" in data:
        text = _field(data, "config", str, required=True)
        path = _field(data, "config_path", str)
        if path is not None and not os.path.isabs(path):
            raise ControlError(400, "config_path must be absolute")
        spec = ctl.spec_from_config(text, path)
        if "name" in data:
            spec.name = _field(data, "name", str)
    else:
        kernel = _field(data, "kernel", str, required=True)
        if not kernel:
            raise ControlError(400, "kernel must name the guest kernel")
        spec = DomainSpec(kernel=kernel, memory=_int_field(data, "memory", 1, 1 << 20) or 32,
                          name=_field(data, "name", str), cmdline=_field(data, "cmdline", str, default=""),
                          ramdisk=_field(data, "ramdisk", str) or None,
                          maxmem=_int_field(data, "maxmem", 1, 1 << 20), vif=_strings(data, "vif"), disk=_strings(data, "disk"),
                          vcpus=_int_field(data, "vcpus", 1, MAX_VCPUS) or 1)
    for key, v in (("kernel", spec.kernel), ("cmdline", spec.cmdline), ("name", spec.name or ""),
                   ("ramdisk", spec.ramdisk or "")):
        _check_text(key, v)                  # also what came out of a config file
    for key, vs in (("vif", spec.vif), ("disk", spec.disk)):
        for v in vs:
            _check_text(key, v)
    rec = await ctl.create(spec)
    return _json(ctl.describe(rec), 201)


async def get_domain(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    return _json(ctl.describe(ctl.lookup(req.match_info["dom"]), _query_bool(req, "long")))


async def destroy_domain(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    rec = await ctl.destroy(req.match_info["dom"])
    return _json({"id": rec.dom.domid, "name": rec.dom.name, "status": "destroyed"})


async def pause(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    return _json(ctl.describe(ctl.pause(req.match_info["dom"])))


async def unpause(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    return _json(ctl.describe(ctl.unpause(req.match_info["dom"])))


async def shutdown(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    data = await _body(req)
    wait = _field(data, "wait", bool, default=False)
    timeout = _field(data, "timeout", (int, float), default=60)
    if not 0 < timeout <= 600:
        raise ControlError(400, "timeout must be 0..600 seconds")
    rec = await ctl.shutdown(req.match_info["dom"], wait, float(timeout))
    return _json({"id": rec.dom.domid, "name": rec.dom.name,
                  "status": "gone" if wait else "shutting down"})


async def reboot(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    rec = ctl.reboot(req.match_info["dom"])
    return _json({"id": rec.dom.domid, "name": rec.dom.name, "status": "rebooting"})


async def mem_target(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    mib = _int_field(await _body(req), "mib", 1, 1 << 20, required=True)
    return _json(ctl.describe(ctl.mem_set(req.match_info["dom"], mib)))


async def mem_max(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    mib = _int_field(await _body(req), "mib", 1, 1 << 20, required=True)
    return _json(ctl.describe(ctl.mem_max(req.match_info["dom"], mib)))


async def vcpus(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    rec = ctl.lookup(req.match_info["dom"])
    return _json({"id": rec.dom.domid, "name": rec.dom.name, "vcpus": ctl.vcpu_list(rec)})


async def get_sched(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    rec = ctl.lookup(req.match_info["dom"])
    return _json({"id": rec.dom.domid, "name": rec.dom.name, "weight": rec.weight, "cap": rec.cap})


async def set_sched(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    data = await _body(req)
    rec = ctl.sched_credit(req.match_info["dom"], _int_field(data, "weight", 1, 65535),
                           _int_field(data, "cap", 0, 6400))
    return _json({"id": rec.dom.domid, "name": rec.dom.name, "weight": rec.weight, "cap": rec.cap})


async def set_io_limit(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    data = await _body(req)
    return _json(ctl.io_limit(req.match_info["dom"], req.match_info["dev"], _field(data, "rate", str),
                              _int_field(data, "iops", 1, 1 << 40), _int_field(data, "bps", 1, 1 << 40),
                              _int_field(data, "burst_ms", 1, 10_000)))


async def list_vifs(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    rec = ctl.lookup(req.match_info["dom"])
    return _json([ctl.describe_vif(b) for b in ctl.vifs(rec.dom)])


async def attach_vif(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    spec = _field(await _body(req), "spec", str, default="")
    nb = await ctl.network_attach(req.match_info["dom"], spec)
    return _json(ctl.describe_vif(nb), 201)


async def detach_vif(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    dev = await ctl.detach(req.match_info["dom"], "vif", req.match_info["dev"])
    return _json({"devid": dev.devid, "status": "detached"})


async def list_vbds(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    rec = ctl.lookup(req.match_info["dom"])
    return _json([ctl.describe_vbd(b) for b in ctl.vbds(rec.dom)])


async def attach_vbd(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    spec = _field(await _body(req), "spec", str, required=True)
    bb = await ctl.block_attach(req.match_info["dom"], spec)
    return _json(ctl.describe_vbd(bb), 201)


async def detach_vbd(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    dev = await ctl.detach(req.match_info["dom"], "vbd", req.match_info["dev"])
    return _json({"devid": dev.devid, "status": "detached"})


async def save_domain(req: web.Request) -> web.Response:
    data = await _body(req)
    path = _field(data, "file", str, required=True)
    checkpoint = _field(data, "checkpoint", bool, default=False)
    async with _abort_when_client_gone(req) as abort:
        return _json(await _ctl(req).save(req.match_info["dom"], path, checkpoint, abort=abort))


async def migrate_domain(req: web.Request) -> web.Response:
    data = await _body(req)
    dest = _field(data, "destination", str, required=True)
    downtime = _field(data, "downtime_ms", (int, float), default=30)
    bandwidth = _field(data, "bandwidth", (int, float), default=0)
    if not 0 < downtime <= 10_000 or bandwidth < 0:
        raise ControlError(400, "downtime_ms must be 0..10000 and bandwidth >= 0")
    # The client gone (`aiovmm migrate` interrupted) cancels a migration still in pre-copy
    # (live.migrate's `abort`), as xl's migrate ends with its process.
    async with _abort_when_client_gone(req) as abort:
        return _json(await _ctl(req).migrate(req.match_info["dom"], dest, float(downtime),
                                             float(bandwidth), abort=abort))


@contextlib.asynccontextmanager
async def _abort_when_client_gone(req: web.Request):
    """An event set when the request's client goes (`aiovmm save`/`migrate` interrupted):
    the operation calls itself off at its next safe point."""
    abort = asyncio.Event()
    watch = asyncio.ensure_future(_client_gone(req))
    watch.add_done_callback(lambda t: t.cancelled() or abort.set())
    try:
        yield abort
    finally:
        watch.cancel()


async def _client_gone(req: web.Request, every_s: float = 0.2) -> None:
    """Return when the request's client has closed its connection (aiohttp no longer
    cancels the handler then: its transport goes, polled here)."""
    while req.transport is not None and not req.transport.is_closing():
        await asyncio.sleep(every_s)


async def get_progress(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    rec = ctl.lookup(req.match_info["dom"])
    p = ctl.progress.get(rec.dom.domid)
    if p is None:
        raise ControlError(404, f"d{rec.dom.domid}: no save or migration in progress")
    return _json(dict(p, id=rec.dom.domid))


async def restore_domain(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    data = await _body(req)
    path = _field(data, "file", str, required=True)
    rec = await ctl.restore(path, _field(data, "name", str))
    return _json(ctl.describe(rec), 201)


async def console_text(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    rec = ctl.lookup(req.match_info["dom"])
    data = bytes(rec.dom.console[-CONSOLE_REPLAY_BYTES:])
    return web.Response(body=data, content_type="text/plain", charset="utf-8")


async def console_input(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    rec = ctl.live(req.match_info["dom"])
    data = _field(await _body(req), "data", str, required=True)
    return _json({"queued": ctl.console_input(rec, data.encode())})


async def console_ws(req: web.Request) -> web.StreamResponse:
    """The interactive console: output bytes as binary messages (first the recent history),
    input from binary/text messages. Closes when the domain is gone. Output is text
    (console.text: control bytes replaced), or with ?raw=true the guest's bytes as it wrote
    them, for a client that filters them for its terminal (`aiovmm console`:
    console.TerminalFilter); the history is text either way."""
    ctl = _ctl(req)
    rec = ctl.lookup(req.match_info["dom"])
    raw = _query_bool(req, "raw")
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=1 << 16)
    await ws.prepare(req)
    q: asyncio.Queue[bytes | None] = asyncio.Queue()
    rec.subscribers.add(q)
    if rec.dom.console:
        q.put_nowait(bytes(rec.dom.console[-CONSOLE_REPLAY_BYTES:]))

    async def pump_out() -> None:
        while True:
            data = await q.get()
            if data is None:
                break
            while not q.empty():               # coalesce bursts into one message
                more = q.get_nowait()
                if more is None:
                    q.put_nowait(None)
                    break
                data += more
            await ws.send_bytes(data if raw else console_text_of(data))
        await ws.close()

    async def pump_in() -> None:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                data = msg.data
            elif msg.type == WSMsgType.TEXT:
                data = msg.data.encode()
            else:
                break
            if not rec.dom.dying:
                ctl.console_input(rec, data)

    try:
        async with asyncio.TaskGroup() as tg:
            out = tg.create_task(pump_out())
            inp = tg.create_task(pump_in())
            out.add_done_callback(lambda _: inp.cancel())      # either side ending ends both
            inp.add_done_callback(lambda _: out.cancel())
    except* ConnectionResetError as eg:
        log.debug("d%d: console client gone: %s", rec.dom.domid, eg.exceptions[0])
    finally:
        rec.subscribers.discard(q)
        if not ws.closed:
            await ws.close()
    return ws


async def dmesg(req: web.Request) -> web.Response:
    ctl = _ctl(req)
    lines = list(ctl.dmesg.lines)
    if _query_bool(req, "clear"):
        ctl.dmesg.lines.clear()
    return _json({"lines": lines})


async def openapi_doc(req: web.Request) -> web.Response:
    return _json(openapi.document())


async def metrics_page(req: web.Request) -> web.Response:
    body = metrics.exposition(req.app[REG])
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def index(req: web.Request) -> web.FileResponse:
    return web.FileResponse(os.path.join(WEB_DIR, "index.html"))


REG = web.AppKey("registry", object)

# (method, path, handler, operationId): the one list of routes; openapi.py documents each.
ROUTES: list[tuple[str, str, Handler, str]] = [
    ("GET", f"{API}/info", info, "info"),
    ("GET", f"{API}/domains", list_domains, "listDomains"),
    ("POST", f"{API}/domains", create_domain, "createDomain"),
    ("GET", f"{API}/domains/{{dom}}", get_domain, "getDomain"),
    ("DELETE", f"{API}/domains/{{dom}}", destroy_domain, "destroyDomain"),
    ("POST", f"{API}/domains/{{dom}}/pause", pause, "pauseDomain"),
    ("POST", f"{API}/domains/{{dom}}/unpause", unpause, "unpauseDomain"),
    ("POST", f"{API}/domains/{{dom}}/shutdown", shutdown, "shutdownDomain"),
    ("POST", f"{API}/domains/{{dom}}/reboot", reboot, "rebootDomain"),
    ("PUT", f"{API}/domains/{{dom}}/memory/target", mem_target, "setMemoryTarget"),
    ("PUT", f"{API}/domains/{{dom}}/memory/max", mem_max, "setMemoryMax"),
    ("GET", f"{API}/domains/{{dom}}/vcpus", vcpus, "listVcpus"),
    ("GET", f"{API}/domains/{{dom}}/sched-credit", get_sched, "getSchedCredit"),
    ("PUT", f"{API}/domains/{{dom}}/sched-credit", set_sched, "setSchedCredit"),
    ("PUT", f"{API}/domains/{{dom}}/io-limit/{{dev}}", set_io_limit, "setIoLimit"),
    ("GET", f"{API}/domains/{{dom}}/vifs", list_vifs, "listVifs"),
    ("POST", f"{API}/domains/{{dom}}/vifs", attach_vif, "attachVif"),
    ("DELETE", f"{API}/domains/{{dom}}/vifs/{{dev}}", detach_vif, "detachVif"),
    ("GET", f"{API}/domains/{{dom}}/vbds", list_vbds, "listVbds"),
    ("POST", f"{API}/domains/{{dom}}/vbds", attach_vbd, "attachVbd"),
    ("DELETE", f"{API}/domains/{{dom}}/vbds/{{dev}}", detach_vbd, "detachVbd"),
    ("POST", f"{API}/domains/{{dom}}/save", save_domain, "saveDomain"),
    ("POST", f"{API}/restore", restore_domain, "restoreDomain"),
    ("POST", f"{API}/domains/{{dom}}/migrate", migrate_domain, "migrateDomain"),
    ("GET", f"{API}/domains/{{dom}}/progress", get_progress, "getProgress"),
    ("GET", f"{API}/domains/{{dom}}/console", console_text, "getConsole"),
    ("POST", f"{API}/domains/{{dom}}/console", console_input, "sendConsoleInput"),
    ("GET", f"{API}/domains/{{dom}}/console/ws", console_ws, "consoleWebSocket"),
    ("GET", f"{API}/dmesg", dmesg, "dmesg"),
    ("GET", "/openapi.json", openapi_doc, "openapi"),
    ("GET", "/metrics", metrics_page, "metrics"),
]


def make_app(ctl: Controller, token: str | None = None) -> web.Application:
    app = web.Application(middlewares=_middlewares(token), client_max_size=MAX_BODY)
    app[CTL] = ctl
    app[REG] = metrics.registry(ctl)
    for method, path, handler, _ in ROUTES:
        app.router.add_route(method, path, handler)
    app.router.add_get("/", index)
    app.router.add_static("/web/", WEB_DIR, show_index=False)
    return app
