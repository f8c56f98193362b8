"""aiovmm.testing: fixtures for tests and scripts that put guests on real Linux networking.

`VirtualLan` builds, in network namespaces it owns (unique names, removed on exit even on
failure), a bridge for guest taps and a "host" namespace wired to it by a veth pair:

    async with VirtualLan("198.18.0.1/24") as lan:
        dom = await hv.create(kernel, vifs=[lan.vif("00:16:3e:00:00:02")], cmdline="ip=198.18.0.2/24")
        await lan.run("ping", "-c", "1", "198.18.0.2")      # from the host namespace

Traffic stays inside the namespaces it creates (the project's network rule).
"""
from __future__ import annotations

import asyncio
import ctypes
import itertools
import os
import sys
import threading
import time
import traceback
from typing import Self

from pyroute2 import IPRoute, netns

from .backends.net import VifConfig
from .backends.net.tap import in_netns

_counter = itertools.count()



async def loop_cpu_ticker(gaps: list[float], stop: asyncio.Event, period: float = 0.001) -> None:
    """Appends to `gaps` the event-loop thread's CPU time between two wake-ups of a `period`
    sleep, until `stop` is set. The largest is the longest the loop spent on other work
    (every guest on it stalled that long); thread CPU time, so a busy host does not count."""
    c = time.thread_time()
    while not stop.is_set():
        await asyncio.sleep(period)
        n = time.thread_time()
        gaps.append(n - c)
        c = n

def unique_prefix(tag: str = "av") -> str:
    """A short name unique to this process and call (fits interface-name limits)."""
    return f"{tag}{os.getpid() % 100000}x{next(_counter)}"


def _bridge_uplink(ns: str, bridge: str) -> None:
    """In namespace `ns`: a bridge with the namespace's "uplink" veth end on it, both up."""
    with in_netns(ns), IPRoute() as ipr:
        ipr.link("add", ifname=bridge, kind="bridge")
        br = ipr.link_lookup(ifname=bridge)[0]
        ipr.link("set", index=ipr.link_lookup(ifname="uplink")[0], master=br, state="up")
        ipr.link("set", index=br, state="up")


class _OwnNamespaces:
    """Network namespaces a fixture owns: `_setup` builds them in a worker thread (blocking
    netlink); every one of `_namespaces()` is removed on exit, also when `_setup` failed
    half-way. `run` executes a command in `_run_ns`."""
    _run_ns: str

    def _namespaces(self) -> list[str]:
        raise NotImplementedError

    def _setup(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await asyncio.to_thread(self._setup)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Remove the namespaces (and every interface in them). Idempotent."""
        for ns in self._namespaces():
            try:
                netns.remove(ns)
            except OSError:
                pass

    async def run(self, *argv: str, timeout: float = 30) -> tuple[int, str]:
        """Run a command in the namespace `_run_ns`; returns (exit status, stdout+stderr)."""
        return await _run_in(self._run_ns, argv, timeout)


class VirtualLan(_OwnNamespaces):
    def __init__(self, host_cidr: str = "198.18.0.1/24", prefix: str | None = None) -> None:
        self.prefix = prefix or unique_prefix()
        self.lan_ns = f"{self.prefix}-lan"      # holds the bridge and the guests' taps
        self.host_ns = f"{self.prefix}-host"    # the "host" the user pings from
        self.bridge = "br0"
        self.host_if = "eth0"
        addr, _, plen = host_cidr.partition("/")
        self.host_ip, self.prefixlen = addr, int(plen or 24)

    def vif(self, mac: str = "", ifname: str | None = None, mtu: int = 1500) -> VifConfig:
        return VifConfig(mac=mac, bridge=self.bridge, netns=self.lan_ns, ifname=ifname, mtu=mtu)

    @property
    def _run_ns(self) -> str:
        return self.host_ns                     # `run`: from the host namespace

    def _namespaces(self) -> list[str]:
        return [self.host_ns, self.lan_ns]

    def _setup(self) -> None:
        # Synchronous pyroute2 in a worker thread that enters the namespace itself (setns):
        # AsyncIPRoute does not run on uvloop, and IPRoute(netns=...) forks a helper child.
        netns.create(self.lan_ns)
        netns.create(self.host_ns)
        with in_netns(self.lan_ns), IPRoute() as ipr:
            ipr.link("add", ifname="uplink", kind="veth",
                     peer={"ifname": self.host_if, "net_ns_fd": self.host_ns})
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
        self._create_bridge()
        with in_netns(self.host_ns), IPRoute() as ipr:
            eth = ipr.link_lookup(ifname=self.host_if)[0]
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.addr("add", index=eth, address=self.host_ip, prefixlen=self.prefixlen)
            ipr.link("set", index=eth, state="up")
            ipr.link("set", index=lo, state="up")

    def _create_bridge(self) -> None:
        _bridge_uplink(self.lan_ns, self.bridge)

    def _delete_bridge(self) -> None:
        with in_netns(self.lan_ns), IPRoute() as ipr:
            ipr.link("del", index=ipr.link_lookup(ifname=self.bridge)[0])

    async def create_bridge(self) -> None:
        """(Re)create the bridge and put the host's uplink on it (guest taps are not touched:
        re-attaching them is the hypervisor's job)."""
        await asyncio.to_thread(self._create_bridge)

    async def delete_bridge(self) -> None:
        """Delete the bridge, as an admin's `ip link del br0` would (its ports are released)."""
        await asyncio.to_thread(self._delete_bridge)


class TwoHostLan(_OwnNamespaces):
    """Two "hosts" on one switch, and a client on it, each in a network namespace of its
    own (unique names, all removed on exit, also on failure):

        client (eth0, client_cidr) ── sw0 (switch ns: a learning bridge) ── up-a / up-b
        host A: br0 + uplink (veth to up-a)      host B: br0 + uplink (veth to up-b)

    A hypervisor per host: `Hypervisor(netns=lan.host_ns["a"])`, its guests' vifs on that
    host's br0 (`lan.vif("a", mac)`). The switch learns where a MAC is from the frames it
    sees, as a physical switch: after a migration from A to B the guest's MAC must move to
    port up-b (`fdb_port`). `capture` records every frame that enters the switch on one
    port (kernel timestamps) for dissection with scapy."""

    def __init__(self, client_cidr: str = "198.18.0.1/24", prefix: str | None = None) -> None:
        self.prefix = prefix or unique_prefix("th")
        self.switch_ns = f"{self.prefix}-sw"
        self.client_ns = f"{self.prefix}-cl"
        self.host_ns = {"a": f"{self.prefix}-a", "b": f"{self.prefix}-b"}
        self.switch = "sw0"
        self.bridge = "br0"
        self.port = {"a": "up-a", "b": "up-b"}
        addr, _, plen = client_cidr.partition("/")
        self.client_ip, self.prefixlen = addr, int(plen or 24)

    def vif(self, host: str, mac: str = "", mtu: int = 1500) -> VifConfig:
        return VifConfig(mac=mac, bridge=self.bridge, netns=self.host_ns[host], mtu=mtu)

    def _namespaces(self) -> list[str]:
        return [self.client_ns, *self.host_ns.values(), self.switch_ns]

    @property
    def _run_ns(self) -> str:
        return self.client_ns                   # `run`: from the client namespace

    def _setup(self) -> None:
        for ns in self._namespaces():
            netns.create(ns)
        with in_netns(self.switch_ns), IPRoute() as ipr:
            ipr.link("add", ifname=self.switch, kind="bridge")
            sw = ipr.link_lookup(ifname=self.switch)[0]
            ipr.link("add", ifname="cl", kind="veth", peer={"ifname": "eth0", "net_ns_fd": self.client_ns})
            for h, port in self.port.items():
                ipr.link("add", ifname=port, kind="veth", peer={"ifname": "uplink", "net_ns_fd": self.host_ns[h]})
            for name in ("cl", *self.port.values()):
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], master=sw, state="up")
            ipr.link("set", index=sw, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        for ns in self.host_ns.values():
            _bridge_uplink(ns, self.bridge)
            with in_netns(ns), IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        with in_netns(self.client_ns), IPRoute() as ipr:
            eth = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth, address=self.client_ip, prefixlen=self.prefixlen)
            ipr.link("set", index=eth, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    def fdb_port(self, mac: str) -> str | None:
        """The switch port its forwarding database has for `mac` (None: not learnt).
        Blocking (netlink in the switch namespace): asyncio.to_thread."""
        mac = mac.lower()
        with in_netns(self.switch_ns), IPRoute() as ipr:
            names = {l["index"]: l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
            for e in ipr.fdb("dump"):
                if (e.get_attr("NDA_LLADDR") or "").lower() == mac and e["ifindex"] in names \
                        and names[e["ifindex"]] in self.port.values():
                    return names[e["ifindex"]]
        return None

    def capture(self, port: str, ethertypes: tuple[int, ...] = ()) -> "Capture":
        """Frames entering the switch through `port` (e.g. "up-b"), from now on; only
        those of `ethertypes` if given (a kernel filter: bulk traffic does not crowd the
        socket's buffer). Blocking: asyncio.to_thread."""
        return Capture(self.switch_ns, port, ethertypes)

    def capture_client(self, ethertypes: tuple[int, ...] = ()) -> "Capture":
        """Frames the client receives on its eth0 (see `capture`)."""
        return Capture(self.client_ns, "eth0", ethertypes)


SO_TIMESTAMPNS = 35            # asm-generic/socket.h (Python's socket module lacks them)
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33


class Capture:
    """An AF_PACKET socket on one interface of a namespace; `frames()` returns what it
    received so far as (kernel timestamp in ns, CLOCK_REALTIME; frame bytes). Incoming
    frames only (PACKET_OUTGOING ones are skipped)."""

    def __init__(self, ns: str, ifname: str, ethertypes: tuple[int, ...] = ()) -> None:
        import socket
        import struct
        with in_netns(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            if ethertypes:
                # Classic BPF: ldh [12]; jeq type_i -> accept ...; ret 0; ret 0xffff.
                n = len(ethertypes)
                prog = [(0x28, 0, 0, 12)]
                prog += [(0x15, n - i, 0, t) for i, t in enumerate(ethertypes)]
                prog += [(0x06, 0, 0, 0), (0x06, 0, 0, 0xFFFF)]
                raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
                self._prog = ctypes.create_string_buffer(raw)
                fprog = struct.pack("HL", len(prog), ctypes.addressof(self._prog))
                self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
            self.sock.bind((ifname, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.sock.setblocking(False)
        self._got: list[tuple[int, bytes]] = []

    def frames(self) -> list[tuple[int, bytes]]:
        import socket
        import struct
        while True:
            try:
                data, anc, _flags, addr = self.sock.recvmsg(65536, 64)
            except BlockingIOError:
                break
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            ts = 0
            for level, typ, raw in anc:
                if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", raw[:16])
                    ts = sec * 1_000_000_000 + nsec
            self._got.append((ts, data))
        return list(self._got)

    def close(self) -> None:
        self.sock.close()


async def _run_in(ns: str, argv, timeout: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        preexec_fn=lambda: netns.setns(ns))
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return -1, out.decode(errors="replace") + "\n(timeout)"
    return proc.returncode, out.decode(errors="replace")


# ------------------------------------------------------------------------------ hang diagnostics
class BootTimeout(TimeoutError):
    """A guest did not print its line in time; the message carries the console's tail and
    every vCPU's state (vcpu_state), so a hang in CI says where each vCPU was."""


def vcpu_state(dom) -> str:
    """One line per vCPU of `dom`: online/blocked/polling, runstate, mode, RIP, the event
    state in its vcpu_info (upcall pending/masked), its pending unmasked ports, its timer,
    and what the engine knows (exits, kicks, the last KVM exit reason, last error).

    Reads only (no await, nothing changed), so it may be called from another thread while
    the loop thread is stuck (LoopWatchdog): the values are then the last ones the loop
    wrote, e.g. the registers at the vCPU's last exit."""
    lines = [f"d{dom.domid} ({dom.name}): paused={dom.paused} dying={dom.dying} "
             f"end={dom.describe_end()!r}"]
    m = dom.mem.map
    try:
        pending = [p for p in sorted(dom.evtchn.ports) if dom.evtchn.is_pending(p)]
        masked = {p for p in pending if dom.evtchn.is_masked(p)}
    except (AttributeError, RuntimeError, IndexError) as e:     # the table changed meanwhile
        pending, masked = [], set()
        lines.append(f"  ports: unreadable ({e!r})")
    for v in list(dom.vcpus):
        try:
            eng = v.engine
            rip = eng.get("rip")
            a = v.info_maddr
            upcall, mask = m[a], m[a + 1]
            mine = [p for p in pending if dom.evtchn.ports[p].vcpu == v.id]
            ports = ",".join(f"{p}{'(m)' if p in masked else ''}" for p in mine) or "-"
            t = v.singleshot_handle
            # Loop time is time.monotonic() (asyncio's and uvloop's loops).
            timer = f"{t.when() - time.monotonic():+.3f}s" if t is not None and not t.cancelled() else "none"
            line = (f"  vcpu{v.id}: online={v.online} blocked={v.blocked} "
                    f"polling={sorted(v.polling) if v.polling is not None else None} "
                    f"runstate={getattr(v.runstate, 'name', v.runstate)} "
                    f"{'kernel' if v.kernel_mode else 'user'} rip={rip:#x} upcall_pending={upcall} "
                    f"upcall_mask={mask} pending_ports={ports} singleshot={timer} "
                    f"hypercalls={v.hypercalls} ptwr={v.ptwr_updates} "
                    f"pending_ptwr={v.pending_ptwr is not None}")
            extra = []
            sched = dom.hypervisor.scheduler.accounting(v)
            extra.append(f"sched={sched['pri']}{'/parked' if sched['parked'] else ''} "
                         f"slices={sched['slices']} cpu={sched['cpu_ns'] / 1e9:.1f}s")
            for name in ("exits", "kicks", "step_kicks", "settles", "zaps", "invalidations"):
                val = getattr(eng, name, None)
                if isinstance(val, int):
                    extra.append(f"{name}={val}")
            run_map = getattr(eng, "_run_map", None)
            if run_map is not None:                 # KVM: kvm_run.exit_reason of the last exit
                extra.append(f"last_exit={int.from_bytes(run_map[8:12], 'little')} "
                             f"immediate_exit={run_map[1]}")
            if getattr(eng, "last_error", ""):
                extra.append(f"last_error={eng.last_error!r}")
            lines.append(line + (" " + " ".join(extra) if extra else ""))
        except (AttributeError, ValueError, KeyError, IndexError, TypeError, RuntimeError) as e:
            lines.append(f"  vcpu{getattr(v, 'id', '?')}: unreadable ({e!r})")
    return "\n".join(lines)


async def wait_for_boot(dom, pattern: str, timeout: float, stall: float | None = None,
                        tail: int = 40) -> str:
    """Wait for a console line matching `pattern` (dom.wait_for_line), but give up after
    `timeout` s in all, or after `stall` s without any new console output (a booting Linux
    prints steadily; a hung one does not), with BootTimeout carrying the console's last
    `tail` lines and vcpu_state(dom) instead of a bare TimeoutError."""
    waiter = asyncio.ensure_future(dom.wait_for_line(pattern, timeout=timeout))
    t0 = time.monotonic()
    seen = (len(dom.console_lines), dom.console_lines[-1] if dom.console_lines else None)
    last = t0
    why = ""
    try:
        while True:
            done, _ = await asyncio.wait([waiter], timeout=1.0)
            if done:
                try:
                    return waiter.result()
                except TimeoutError:
                    why = f"no line matching {pattern!r} within {timeout:.0f} s"
                    break
            now = time.monotonic()
            cur = (len(dom.console_lines), dom.console_lines[-1] if dom.console_lines else None)
            if cur != seen:
                seen, last = cur, now
            elif stall is not None and now - last >= stall:
                why = (f"no console output for {now - last:.0f} s ({now - t0:.0f} s after the "
                       f"start) and no line matching {pattern!r}")
                break
    finally:
        if not waiter.done():
            waiter.cancel()
            try:
                await waiter
            except (asyncio.CancelledError, TimeoutError):
                pass
    # Twice, a second apart: whether the vCPUs still run (RIPs, exits, hypercalls change:
    # a livelock or a guest waiting for something) or nothing moves (blocked, lost wakeup).
    first = vcpu_state(dom)
    await asyncio.sleep(1.0)
    tail_lines = "\n".join(dom.console_lines[-tail:])
    raise BootTimeout(f"d{dom.domid} ({dom.name}): {why}\n--- vCPUs ---\n{first}\n"
                      f"--- vCPUs 1 s later ---\n{vcpu_state(dom)}\n--- console tail ---\n{tail_lines}")


class LoopWatchdog:
    """A thread that watches an event loop's heartbeat (a callback it schedules every
    `period` s) and, when the loop has not run it for `stall` s, writes the loop thread's
    Python stack (and `describe()`, e.g. vcpu_state of the guests) to stderr and to
    `reports`: a loop stuck inside a C call (KVM_RUN that is never kicked) cannot time
    anything out by itself, so without this a hang shows only as the caller's bare timeout.
    One report per stall; another after the loop has run again."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                 stall: float = 30.0, period: float = 1.0, describe=None) -> None:
        self.loop, self.thread = loop, thread
        self.stall, self.period = stall, period
        self.describe = describe
        self.reports: list[str] = []
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)
        self._t.start()

    def stalled_for(self) -> float:
        """Seconds since the loop last ran the heartbeat (about `period` when it is well)."""
        return time.monotonic() - self._beat

    def _heartbeat(self) -> None:
        self._beat = time.monotonic()

    def _watch(self) -> None:
        reported = False
        while not self._stop.wait(self.period):
            try:
                self.loop.call_soon_threadsafe(self._heartbeat)
            except RuntimeError:                  # the loop is closed
                return
            late = time.monotonic() - self._beat
            if late < self.stall:
                reported = False
                continue
            if reported:
                continue
            reported = True
            frame = sys._current_frames().get(self.thread.ident)
            stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)\n"
            text = f"LoopWatchdog: the event loop has not run for {late:.0f} s; its thread's stack:\n{stack}"
            if self.describe is not None:
                try:
                    text += self.describe()
                except (AttributeError, ValueError, KeyError, IndexError, TypeError, RuntimeError) as e:
                    text += f"(describe failed: {e!r})"
            self.reports.append(text)
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)


# ------------------------------------------------------------------------------ pytest plugin
# Registered as a pytest11 entry point (pyproject.toml): a suite that has aiovmm installed
# gets these fixtures without a conftest. Async fixtures need pytest-asyncio.
try:
    import pytest as _pytest
    import pytest_asyncio as _pytest_asyncio
except ImportError:                    # used as a library without pytest: no fixtures
    _pytest = None

if _pytest is not None:
    @_pytest_asyncio.fixture
    async def aiovmm_hypervisor():
        """A Hypervisor with 256 MiB of machine memory; every guest is destroyed after
        the test."""
        from .hypervisor import Hypervisor
        async with Hypervisor(memory_mib=256) as hv:
            yield hv

    @_pytest_asyncio.fixture
    async def aiovmm_two_hosts():
        """A TwoHostLan (client 198.18.0.1/24 on a learning switch, hosts "a" and "b"),
        removed after the test."""
        async with TwoHostLan("198.18.0.1/24") as lan:
            yield lan

    @_pytest_asyncio.fixture
    async def aiovmm_lan():
        """A VirtualLan (bridge + "host" namespace, 198.18.0.1/24), removed after the test."""
        async with VirtualLan("198.18.0.1/24") as lan:
            yield lan
