"""xl-style verbs against the daemon, plus `aiovmm serve`. Names, arguments and output
columns follow xl (xl_list.c, xl_vcpu.c, xl_info.c ...) wherever xl has the verb. Every
error is one line on stderr and a non-zero exit (1; usage errors 64 as elsewhere)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any, Callable

from ..console import watch_host_input
from .client import Client, ClientError, dom_path, split_host_port

EXIT_ERR = 1


class ServeOptionsDefaults:
    SAVE_DIR = "/var/lib/aiovmm/save"      # daemon.DEFAULT_SAVE_DIR (not imported: CLI start-up)


def _client(args: argparse.Namespace) -> Client:
    return Client(args.socket)


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


# ------------------------------------------------------------------------------ verbs
def v_create(a: argparse.Namespace) -> int:
    c = _client(a)
    from ..config import ConfigError, read_text
    path = os.path.abspath(a.config)
    try:
        text = read_text(a.config)
    except ConfigError as e:
        raise ClientError(str(e)) from None
    print(f"Parsing config from {a.config}", file=sys.stderr)
    d = c.post("/api/v1/domains", {"config": text, "config_path": path})
    if a.console:
        return _console(c, str(d["id"]), a.console_output)
    return 0


def _fmt_list_row(d: dict) -> str:
    return "%-40s %5d %5d %5d     %s  %8.1f" % (d["name"], d["id"], d["memory_kib"] // 1024, d["vcpus"],
                                               d["state"], d["cpu_time_s"])


def v_list(a: argparse.Namespace) -> int:
    c = _client(a)
    if a.domains:
        doms = [c.get(dom_path(r) + ("?long=true" if a.long else "")) for r in a.domains]
    else:
        doms = c.get("/api/v1/domains" + ("?long=true" if a.long else ""))
    if a.long:
        _out(json.dumps(doms, indent=4))
        return 0
    _out("Name                                        ID   Mem VCPUs\tState\tTime(s)")
    for d in doms:
        _out(_fmt_list_row(d))
    return 0


def _simple(verb: str) -> Callable[[argparse.Namespace], int]:
    def run(a: argparse.Namespace) -> int:
        _client(a).post(dom_path(a.domain, verb))
        return 0
    return run


def v_shutdown(a: argparse.Namespace) -> int:
    c = _client(a)
    d = c.get(dom_path(a.domain))
    print(f"Shutting down domain {d['id']}", file=sys.stderr)
    c.post(dom_path(a.domain, "shutdown"), {"wait": a.wait, "timeout": a.timeout})
    if a.wait:
        print(f"Domain {d['id']} has been shut down", file=sys.stderr)
    return 0


def v_reboot(a: argparse.Namespace) -> int:
    c = _client(a)
    d = c.post(dom_path(a.domain, "reboot"))
    print(f"Rebooting domain {d['id']}", file=sys.stderr)
    return 0


def v_destroy(a: argparse.Namespace) -> int:
    _client(a).delete(dom_path(a.domain))
    return 0


def _parse_mem(text: str) -> int:
    """xl's memory sizes: a number with an optional unit b/k/m/g (default m), as MiB."""
    t = text.strip().lower()
    mult = {"b": 1 / (1 << 20), "k": 1 / 1024, "m": 1, "g": 1024, "t": 1 << 20}
    unit = t[-1] if t and t[-1] in mult else "m"
    num = t[:-1] if t and t[-1] in mult else t
    try:
        v = float(num) * mult[unit]
    except ValueError:
        raise ClientError(f"invalid memory size {text!r}") from None
    if v < 1 or v != v:
        raise ClientError(f"memory size {text!r} is less than 1 MiB")
    return int(v)


def v_mem_set(a: argparse.Namespace) -> int:
    _client(a).put(dom_path(a.domain, "memory", "target"), {"mib": _parse_mem(a.memory)})
    return 0


def v_mem_max(a: argparse.Namespace) -> int:
    _client(a).put(dom_path(a.domain, "memory", "max"), {"mib": _parse_mem(a.memory)})
    return 0


def v_vcpu_list(a: argparse.Namespace) -> int:
    c = _client(a)
    refs = a.domains or [str(d["id"]) for d in c.get("/api/v1/domains")]
    _out("Name                                ID  VCPU   CPU State   Time(s) Affinity (Hard / Soft)")
    for r in refs:
        v = c.get(dom_path(r, "vcpus"))
        for cpu in v["vcpus"]:
            st = cpu["state"] + ("-" if cpu["state"] != "p" else "") + ("-" if cpu["online"] else "")
            _out("%-32s %5d %5d %5d %5s %9.1f  %s" % (v["name"], v["id"], cpu["vcpu"], cpu["cpu"],
                                                     st, cpu["time_s"], cpu["affinity"]))
    return 0


def v_network_attach(a: argparse.Namespace) -> int:
    _client(a).post(dom_path(a.domain, "vifs"), {"spec": ",".join(a.spec)})
    return 0


def v_network_detach(a: argparse.Namespace) -> int:
    _client(a).delete(dom_path(a.domain, "vifs", a.device))
    return 0


def v_network_list(a: argparse.Namespace) -> int:
    c = _client(a)
    _out("Idx BE Mac Addr.         handle state evt-ch   tx-/rx-ring-ref BE-path")
    for r in a.domains:
        for v in c.get(dom_path(r, "vifs")):
            _out("%-3d %-2d %-17s %-6d %-5d %-6d %8d/%-8d %-30s" % (
                v["devid"], 0, v["mac"], v["devid"], v["frontend_state"], v["event_channel"],
                v["tx_ring_ref"], v["rx_ring_ref"], v["backend"]))
    return 0


def v_block_attach(a: argparse.Namespace) -> int:
    _client(a).post(dom_path(a.domain, "vbds"), {"spec": ",".join(a.spec)})
    return 0


def v_block_detach(a: argparse.Namespace) -> int:
    _client(a).delete(dom_path(a.domain, "vbds", a.device))
    return 0


def v_block_list(a: argparse.Namespace) -> int:
    c = _client(a)
    _out("Vdev  BE  handle state evt-ch ring-ref BE-path")
    for r in a.domains:
        for v in c.get(dom_path(r, "vbds")):
            _out("%-5d %-3d %-6d %-5d %-6d %-8d %-30s" % (
                v["devid"], 0, v["devid"], v["frontend_state"], v["event_channel"], v["ring_ref"],
                v["backend"]))
    return 0


def v_sched_credit(a: argparse.Namespace) -> int:
    c = _client(a)
    if a.weight is not None or a.cap is not None:
        if not a.domain:
            raise ClientError("sched-credit: -w/-c need -d DOMAIN")
        body = {k: v for k, v in (("weight", a.weight), ("cap", a.cap)) if v is not None}
        c.put(dom_path(a.domain, "sched-credit"), body)
        return 0
    refs = [a.domain] if a.domain else [str(d["id"]) for d in c.get("/api/v1/domains")]
    _out("Cpupool Pool-0: tslice=30ms ratelimit=1000us migration-delay=0us")
    _out("Name                                ID Weight  Cap")
    for r in refs:
        s = c.get(dom_path(r, "sched-credit"))
        _out("%-33s %4d %6d %4d" % (s["name"], s["id"], s["weight"], s["cap"]))
    return 0


def v_dmesg(a: argparse.Namespace) -> int:
    for line in _client(a).get("/api/v1/dmesg" + ("?clear=true" if a.clear else ""))["lines"]:
        _out(line)
    return 0


def v_info(a: argparse.Namespace) -> int:
    i = _client(a).get("/api/v1/info")
    keys = ["host", "release", "version", "machine", "nr_cpus", "nr_nodes", "total_memory",
            "free_memory", "xen_major", "xen_minor", "xen_extra", "xen_version", "xen_caps",
            "xen_scheduler", "xen_commandline", "xend_config_format"]
    for k in keys:
        if k in i:
            _out("%-23s: %s" % (k, i[k]))
    return 0


def _uptime(sec: float) -> str:
    s = int(sec)
    days, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    hms = f"{h}:{m:02d}:{s:02d}"
    return f"{days} day{'s' if days != 1 else ''}, {hms}" if days else hms


def v_uptime(a: argparse.Namespace) -> int:
    c = _client(a)
    doms = [c.get(dom_path(r)) for r in a.domains] if a.domains else c.get("/api/v1/domains")
    _out("Name                                ID Uptime")
    for d in doms:
        _out("%-33s %4d %s" % (d["name"], d["id"], _uptime(d["uptime_s"])))
    return 0


TOP_HEAD = ("      NAME  STATE   CPU(sec) CPU(%)     MEM(k) MEM(%)  MAXMEM(k) MAXMEM(%) VCPUS NETS "
            "NETTX(k) NETRX(k) VBDS   VBD_OO   VBD_RD   VBD_WR")


def v_top(a: argparse.Namespace) -> int:
    """xentop's columns; batch mode (-b) prints -i iterations every -d seconds."""
    c = _client(a)
    prev: dict[int, tuple[float, float]] = {}
    total_kib = c.get("/api/v1/info")["total_memory"] * 1024
    for it in range(a.iterations):
        if it:
            time.sleep(a.delay)
        now = time.monotonic()
        doms = c.get("/api/v1/domains")
        if not a.batch:
            sys.stdout.write("\x1b[H\x1b[2J")
        _out(TOP_HEAD)
        for d in doms:
            p = prev.get(d["id"])
            pct = 100.0 * (d["cpu_time_s"] - p[1]) / (now - p[0]) if p and now > p[0] else 0.0
            prev[d["id"]] = (now, d["cpu_time_s"])
            tx = sum(v["tx_bytes"] for v in d["vifs"]) // 1024
            rx = sum(v["rx_bytes"] for v in d["vifs"]) // 1024
            rd = sum(v["rd_reqs"] for v in d["vbds"])
            wr = sum(v["wr_reqs"] for v in d["vbds"])
            _out("%10.10s %6s %10d %6.1f %10d %6.1f %10d %9.1f %5d %4d %8d %8d %4d %8d %8d %8d" % (
                d["name"], d["state"], int(d["cpu_time_s"]), pct, d["memory_kib"],
                100.0 * d["memory_kib"] / total_kib, d["max_pages_kib"],     # xentop: the hypervisor's max
                100.0 * d["max_pages_kib"] / total_kib, d["vcpus"], len(d["vifs"]), tx, rx,
                len(d["vbds"]), 0, rd, wr))
        sys.stdout.flush()
    return 0


# ------------------------------------------------------------------------------ console
def v_console(a: argparse.Namespace) -> int:
    c = _client(a)
    d = c.get(dom_path(a.domain))          # a clear error for an unknown domain first
    return _console(c, str(d["id"]), a.console_output)


def _console(c: Client, ref: str, output: str = "auto") -> int:
    try:
        return asyncio.run(_console_async(c, ref, output))
    except KeyboardInterrupt:
        return 0


async def _console_async(c: Client, ref: str, output: str) -> int:
    """Guest output to stdout, stdin to the guest; Ctrl-] leaves. Output as `aiovmm run`
    gives it (--console-output): at a terminal the guest's terminal controls pass and the
    control strings do not (console.TerminalFilter), with the terminal in raw mode
    (console.HostTerminal) and restored; to a file or a pipe, text."""
    import aiohttp
    from ..cli import console_mode
    from ..console import DETACH_KEY, HostTerminal, TerminalFilter, text, write_all
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    sys.stdout.flush()
    out_fd = sys.stdout.fileno()
    mode = console_mode(output, fd, out_fd)
    shown = {"terminal": TerminalFilter().feed, "raw": bytes, "text": text}[mode]
    terminal = HostTerminal(fd) if mode != "text" and os.isatty(fd) else None
    session, base = c.ws_session()
    leave = asyncio.Event()
    outq: asyncio.Queue[bytes] = asyncio.Queue()      # stdin bytes for the guest
    if terminal is not None:
        terminal.__enter__()
    try:
        async with session:
            try:
                ws = await session.ws_connect(base + dom_path(ref, "console", "ws") + "?raw=true")
            except aiohttp.ClientError as e:
                raise ClientError(f"console: {e}") from None
            async with ws:
                def feed(data: bytes) -> bool:
                    cut = data.find(DETACH_KEY)
                    if cut >= 0:
                        data = data[:cut]
                        leave.set()
                    if data:
                        outq.put_nowait(data)
                    return cut < 0
                os.set_blocking(fd, False)
                watch_host_input(loop, fd, feed)
                try:
                    async def receive() -> None:
                        async for msg in ws:
                            if msg.type == aiohttp.WSMsgType.BINARY:
                                write_all(out_fd, shown(msg.data))
                            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                                break
                        leave.set()
                    async def send() -> None:
                        while True:
                            await ws.send_bytes(await outq.get())
                            outq.task_done()
                    async with asyncio.TaskGroup() as tg:
                        rx = tg.create_task(receive())
                        tx = tg.create_task(send())
                        await leave.wait()
                        if not ws.closed:
                            await asyncio.wait_for(outq.join(), 5)   # what was typed before Ctrl-]
                        rx.cancel()
                        tx.cancel()
                finally:
                    loop.remove_reader(fd)
                    os.set_blocking(fd, True)
    finally:
        if terminal is not None:
            terminal.restore()
    return 0


# ------------------------------------------------------------------------------ serve
def _with_spinner(what: str, call: Callable[[], Any]) -> Any:
    """Run a blocking API call under a rich status line with the elapsed time (stderr)."""
    from rich.console import Console
    con = Console(stderr=True)
    if not con.is_terminal:
        return call()
    with con.status(what):
        return call()


def _with_progress(what: str, c: Client, ref: str, call: Callable[[], Any]) -> Any:
    """Run a blocking API call in a thread and show the daemon's progress for the domain
    (GET .../progress) as a rich progress bar on stderr while it runs."""
    import threading
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    con = Console(stderr=True)
    if not con.is_terminal:
        return call()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["r"] = call()
        except BaseException as e:          # re-raised on the caller's thread
            box["e"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    poll = c                                 # a new connection per request: thread-safe
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=con, transient=True) as bar:
        task = bar.add_task(what, total=None, info="")
        while t.is_alive():
            try:
                p = poll.get(dom_path(ref, "progress"))
                done, total = p["done"], p["total"]
                info = f"{p['phase']} {done}/{total} pages"
                if p.get("operation") == "migrate" and p["phase"] != "connect":
                    # the bar: this round's pages (a round re-sends what the guest dirtied)
                    done, total = p.get("round_done", 0), p.get("round_total", 0)
                    n = p.get("rounds", 0) + (p["phase"] == "precopy")
                    what_round = "last copy" if p["phase"] == "final" else f"round {n}"
                    info = f"{what_round}: {done}/{total} pages, {p['done']} sent"
                bar.update(task, total=max(total, 1), completed=min(done, total), info=info)
            except ClientError:
                pass
            t.join(0.1)
    if "e" in box:
        raise box["e"]
    return box["r"]


def v_save(a: argparse.Namespace) -> int:
    c = _client(a)
    path = os.path.abspath(a.file)
    try:
        r = _with_progress(f"saving {a.domain}", c, a.domain,
                           lambda: c.post(dom_path(a.domain, "save"), {"file": path, "checkpoint": a.checkpoint}))
    except KeyboardInterrupt:
        # The daemon sees the connection close and calls the save off at its next write:
        # the partial file goes and the guest runs on (a save already complete stands).
        print(f"aiovmm: interrupted: the save of {a.domain} is called off unless it had "
              "completed (aiovmm list shows whether it runs)", file=sys.stderr)
        return 130
    print(f"Saved d{r['id']} ({r['name']}) to {a.file}: {r['pages']} pages, "
          f"{r['bytes'] / (1 << 20):.1f} MiB in {r['seconds'] * 1e3:.0f} ms"
          + (" (still running)" if a.checkpoint else ""), file=sys.stderr)
    return 0


def v_restore(a: argparse.Namespace) -> int:
    c = _client(a)
    body = {"file": os.path.abspath(a.file)}
    if a.name:
        body["name"] = a.name
    d = _with_spinner(f"restoring {a.file}", lambda: c.post("/api/v1/restore", body))
    print(f"Restored {a.file} as d{d['id']} ({d['name']})", file=sys.stderr)
    return 0


def _destination(text: str) -> str:
    """argparse's check of migrate's HOST:PORT (a usage error, 64, as the daemon's 400)."""
    try:
        split_host_port(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def v_migrate(a: argparse.Namespace) -> int:
    c = _client(a)
    body = {"destination": a.destination, "downtime_ms": a.downtime_ms, "bandwidth": a.bandwidth}
    try:
        r = _with_progress(f"migrating {a.domain} to {a.destination}", c, a.domain,
                           lambda: c.post(dom_path(a.domain, "migrate"), body))
    except KeyboardInterrupt:
        # The daemon sees the connection close: in pre-copy it cancels (the guest runs on
        # here); a guest already suspended for the last copy goes on to the destination.
        print(f"aiovmm: interrupted: the migration of {a.domain} is cancelled unless its last "
              "copy had begun (aiovmm list here shows where it runs)", file=sys.stderr)
        return 130
    print(f"Migrated d{r['id']} ({r['name']}) to {r['destination']} as d{r['remote_id']}: "
          f"{r['rounds']} rounds, {r['pages_sent']} pages ({r['pages_ratio']:.2f} per guest page), "
          f"downtime {r['downtime_ms']:.1f} ms, total {r['total_s']:.2f} s", file=sys.stderr)
    return 0


def v_serve(a: argparse.Namespace) -> int:
    from .daemon import ServeOptions, check_tcp_options, serve
    o = ServeOptions(socket_path=a.socket or os.environ.get("AIOVMM_SOCKET") or ServeOptions.socket_path,
                     machine_memory=a.machine_memory, listen=a.listen, tls_cert=a.tls_cert,
                     tls_key=a.tls_key, token_file=a.token_file, xenstore_socket=a.xenstore_socket,
                     log_dir=a.log_dir, save_dir=a.save_dir, migration_listen=a.migration_listen,
                     migration_secret_file=a.migration_secret_file)
    try:
        check_tcp_options(o)
        if o.migration_listen and not o.migration_secret_file:
            raise ValueError("--migration-listen needs --migration-secret-file")
    except (ValueError, OSError) as e:
        raise ClientError(str(e)) from None
    try:
        import uvloop
        uvloop.run(serve(o))
    except OSError as e:
        raise ClientError(f"serve: {e}") from None
    except KeyboardInterrupt:
        pass
    return 0


# ------------------------------------------------------------------------------ register
def register(sub: Any) -> None:
    """Add the verbs to the CLI's subparsers; each sets args.verb_func."""
    def add(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--socket", default=None, metavar="PATH",
                       help="the daemon's API socket (default $AIOVMM_SOCKET or /run/aiovmm/aiovmm.sock)")
        p.set_defaults(verb_func=func)
        return p

    def console_output(p: argparse.ArgumentParser) -> None:
        from ..cli import CONSOLE_OUTPUT_HELP
        p.add_argument("--console-output", choices=("auto", "terminal", "raw", "text"), default="auto",
                       help=CONSOLE_OUTPUT_HELP)

    def domain(p: argparse.ArgumentParser) -> None:
        p.add_argument("domain", metavar="DOMAIN", help="domain id or name")

    p = add("serve", v_serve, "run the hypervisor as a daemon with the control API")
    p.add_argument("--machine-memory", type=int, default=2048, metavar="MIB",
                   help="host memory reserved for all guests (lazily backed; default %(default)s)")
    p.add_argument("--listen", default=None, metavar="HOST:PORT", help="also TCP (needs TLS and a token)")
    p.add_argument("--tls-cert", default=None, metavar="FILE", help="TLS certificate (PEM) for --listen")
    p.add_argument("--tls-key", default=None, metavar="FILE", help="its private key (PEM)")
    p.add_argument("--token-file", default=None, metavar="FILE", help="bearer token for TCP clients")
    p.add_argument("--xenstore-socket", default=None, metavar="PATH",
                   help="serve xenstore to host tools here (XENSTORED_PATH=PATH xenstore-ls)")
    p.add_argument("--log-dir", default=None, metavar="DIR",
                   help="also write each guest's console to DIR/<name>-d<id>.log")
    p.add_argument("--migration-listen", default=None, metavar="HOST:PORT",
                   help="accept live migrations (senders prove --migration-secret-file)")
    p.add_argument("--migration-secret-file", default=None, metavar="FILE",
                   help="shared secret (>= 16 bytes) proven by HMAC in both directions")
    p.add_argument("--save-dir", default=ServeOptionsDefaults.SAVE_DIR, metavar="DIR",
                   help="save/restore files only under this directory (default %(default)s)")
    p = add("create", v_create, "create a domain from an xl.cfg file")
    p.add_argument("config", metavar="CFG", help="domain configuration in xl.cfg syntax (examples/*.cfg)")
    p.add_argument("-c", dest="console", action="store_true", help="attach to the console")
    console_output(p)
    p = add("save", v_save, "suspend a domain and write it to a file (xl save)")
    p.add_argument("-c", dest="checkpoint", action="store_true", help="leave the domain running")
    domain(p)
    p.add_argument("file", metavar="FILE", help="save file (under the daemon's --save-dir)")
    p = add("migrate", v_migrate, "live-migrate a domain to another daemon (xl migrate)")
    domain(p)
    p.add_argument("destination", metavar="HOST:PORT", type=_destination,
                   help="the receiving daemon's --migration-listen")
    p.add_argument("--downtime-ms", type=float, default=30.0, metavar="MS",
                   help="downtime target: pre-copy stops when the dirty pages left would go in this time (default %(default)s)")
    p.add_argument("--bandwidth", type=float, default=0.0, metavar="BYTES_PER_S", help="bytes/s for pre-copy (0: unlimited)")
    p = add("restore", v_restore, "a domain from a save file (xl restore)")
    p.add_argument("file", metavar="FILE", help="save file (under the daemon's --save-dir)")
    p.add_argument("--name", default=None, help="the restored domain's name (default: the saved one)")
    p = add("list", v_list, "list domains")
    p.add_argument("-l", "--long", action="store_true", help="detailed (JSON) output")
    p.add_argument("domains", nargs="*", metavar="DOMAIN", help="domain ids or names (default: all)")
    p = add("console", v_console, "attach to a domain's console (Ctrl-] leaves)")
    console_output(p)
    domain(p)
    p = add("shutdown", v_shutdown, "ask a domain to shut down")
    p.add_argument("-w", "--wait", action="store_true", help="wait for the domain to be gone")
    p.add_argument("--timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    domain(p)
    domain(add("reboot", v_reboot, "ask a domain to reboot"))
    domain(add("destroy", v_destroy, "terminate a domain at once"))
    domain(add("pause", _simple("pause"), "pause a domain"))
    domain(add("unpause", _simple("unpause"), "unpause a domain"))
    for name, f, h in (("mem-set", v_mem_set, "balloon target (xenstore memory/target) and the hypervisor's limit"),
                       ("mem-max", v_mem_max, "maximum memory")):
        p = add(name, f, h)
        domain(p)
        p.add_argument("memory", metavar="MEM", help="size, default unit MiB (k, m, g suffixes)")
    p = add("vcpu-list", v_vcpu_list, "list vCPUs")
    p.add_argument("domains", nargs="*", metavar="DOMAIN")
    for kind, attach, detach, lst, devhelp in (
            ("network", v_network_attach, v_network_detach, v_network_list, "devid or MAC"),
            ("block", v_block_attach, v_block_detach, v_block_list, "devid or vdev")):
        p = add(f"{kind}-attach", attach, f"hot-plug a {kind} device into a running domain")
        domain(p)
        p.add_argument("spec", nargs="*", metavar="KEY=VALUE", help="xl device syntax")
        p = add(f"{kind}-detach", detach, f"unplug a {kind} device")
        domain(p)
        p.add_argument("device", metavar="DEVICE", help=devhelp)
        p = add(f"{kind}-list", lst, f"list {kind} devices")
        p.add_argument("domains", nargs="+", metavar="DOMAIN")
    p = add("sched-credit", v_sched_credit, "credit scheduler weight and cap")
    p.add_argument("-d", "--domain", default=None)
    p.add_argument("-w", "--weight", type=int, default=None)
    p.add_argument("-c", "--cap", type=int, default=None)
    p = add("dmesg", v_dmesg, "the hypervisor's log")
    p.add_argument("-c", "--clear", action="store_true")
    add("info", v_info, "host and hypervisor information")
    p = add("uptime", v_uptime, "domain uptimes")
    p.add_argument("domains", nargs="*", metavar="DOMAIN")
    p = add("top", v_top, "domains' resource use (xentop)")
    p.add_argument("-b", "--batch", action="store_true")
    p.add_argument("-i", "--iterations", type=int, default=1 << 30)
    p.add_argument("-d", "--delay", type=float, default=3.0)


def dispatch(args: argparse.Namespace) -> int:
    try:
        return args.verb_func(args)
    except ClientError as e:
        print(f"aiovmm: {e}", file=sys.stderr)
        return EXIT_ERR
    except BrokenPipeError:
        return EXIT_ERR
