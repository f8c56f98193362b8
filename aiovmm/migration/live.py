"""Live migration between two hypervisors (daemon to daemon) over TCP.

Authentication comes before any byte of the stream is parsed: both sides prove knowledge of
a shared secret with HMAC-SHA256 over fresh nonces from both (the receiver reads exactly
one fixed-size message before that, and drops the connection on a wrong proof). Then the
sender writes Xen's migration stream v2 (the same records as a save file):

  head (xl/libxl/libxc headers, X86_PV_INFO, X86_PV_P2M_FRAMES)
  round 0: every page (never-written frames as XALLOC)
  round 1..n: the pages whose contents changed since they were sent, until the rest fits
              the downtime target at the measured bandwidth, or no progress, or max_rounds
              (each round ends with PRECOPY_ROUND_END, an optional record like
              STOP_AND_COPY: the receiver waits for what follows boosted, see receive)
  cooperative suspend, STOP_AND_COPY (an optional record, which libxc's restore would
              skip: the receiver boosts itself then, see receive), the last changed
              pages, tail (TSC, shared_info, vCPU, END)

Dirty pages are found by content: every page is copied into a shadow as it is sent (and
sent from the copy), and compared with it after each round (dirty.py). That works on both
vCPU engines and also sees writes made by the hypervisor and backends into guest frames
(KVM's dirty log sees only the vCPUs' writes; Unicorn has no dirty log:
shared/research/unicorn/NOTES.md). Cost: a memcmp per data page per round, whole runs at a
time (never-written frames are skipped via SEEK_DATA). Pages that changed in two rounds in
a row wait for the last copy. Page tables go in pre-copy
when they canonicalise; one that still maps a frame outside the P2M (shared_info, until
the guest unmaps it to suspend) waits for the last round.

Hand-over, so that a guest never runs on both hosts: the receiver builds the domain without
starting it and answers READY; the sender answers GO and stops treating the source as
live; the receiver starts the domain and answers DONE; the sender destroys the source.
A receiver that refuses the stream (after the handshake) answers REFUSED and why in
READY's place, at any point of the stream, and the sender fails with that reason.
Any failure before GO (connection dropped, refused stream, timeout) resumes the source as a
cancelled suspend (or it never stopped running). A failure after GO leaves the source
suspended and paused (logged): the operator decides, as with xl's "--migratedaway".
After DONE the sender sends the frames for the guest its vifs held while it was down
(HELD: the receiver gives them to the guest's vifs there, ahead of the new taps' own; put
back into the source's bridge they would teach the switches their senders' MACs on the old
host). The receiver keeps the connection until the guest's frontends have reconnected its
vifs (at most REALTIME_LIMIT_S); the sender destroys the source when it closes, not at
DONE: the dead domain's teardown (tens of ms of work, the taps' closes) then does not
compete with the guest's reconnect when both hosts share a loop or cores, and frames that
reached the source's taps after DONE are sent on (through its bridge) before they close.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..abi import PAGE_SIZE, ShutdownReason
from ..errors import BuildError
from . import devices, restore as _restore, save as _save, stream as S
from .dirty import Shadow
from . import priority
from .priority import RealTime
from .suspend import SuspendError, resume_cancelled, suspend

if TYPE_CHECKING:
    from ..domain import Domain
    from ..hypervisor import Hypervisor

log = logging.getLogger("aiovmm.migration")

MAGIC = b"aiovmm-migrate-2"
NONCE = 32
MAC = 32
READY, GO, DONE = b"READY\0\0\0", b"GO\0\0\0\0\0\0", b"DONE"
# Instead of READY: the receiver refused the stream; a u16 length and the reason (UTF-8)
# follow, and the receiver reads on (discarding) until the sender closes, so that the
# reason is not lost to a reset.
REFUSED = b"REFUSED\0"
REASON_MAX = 512
REFUSED_LINGER_S = 5.0
HELD = struct.Struct("<4sI")              # b"HELD", frame count; then per frame:
HELD_FRAME = struct.Struct("<II")         # devid, length, the frame (virtio_net_hdr first)
AUTH_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0
MAX_INCOMING = 8                          # connections a Receiver serves at once (Receiver._handle)


class MigrationError(Exception):
    """The migration failed; the source domain is running (unless `source_suspended`)."""

    def __init__(self, msg: str, source_suspended: bool = False) -> None:
        super().__init__(msg)
        self.source_suspended = source_suspended


class AuthError(MigrationError):
    pass


def _mac(secret: bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(secret, MAGIC + label + a + b, hashlib.sha256).digest()


@dataclass
class MigrateStats:
    rounds: int = 0
    pages_sent: int = 0
    bytes_sent: int = 0
    dirty_per_round: list[int] = field(default_factory=list)
    downtime_ms: float = 0.0            # guest suspended -> running on the destination
    downtime_cpu_ms: float = 0.0        # this process's CPU time in it (the rest: waiting)
    realtime: bool = False              # the stop-and-copy ran at real-time priority
    total_s: float = 0.0
    domid: int = -1                     # on the destination
    phases_ms: dict[str, float] = field(default_factory=dict)   # where the downtime went
    # Absolute time.perf_counter() of each step of the stop-and-copy on this side (the
    # receiver keeps its own in Receiver.marks; on one host the two clocks are the same).
    marks: dict[str, float] = field(default_factory=dict)
    forwarded: int = 0                  # frames held at the source, sent on after DONE
    round_pages: int = 0                # pages of the pre-copy round in progress (or the last)
    round_sent: int = 0                 # ... of which sent


Progress = Callable[[str, MigrateStats], None]
PROGRESS_PAGES = 256                    # pre-copy pages between two progress reports (1 MiB)


class _SocketSource(S.Source):
    def __init__(self, reader: asyncio.StreamReader, timeout: float) -> None:
        self.r, self.timeout = reader, timeout

    async def read_into(self, view: memoryview) -> int:
        async with asyncio.timeout(self.timeout):
            data = await self.r.read(min(len(view), 1 << 20))
        view[:len(data)] = data
        return len(data)


IN_FLIGHT = 256 << 10
def _bound_in_flight(writer: asyncio.StreamWriter) -> None:
    """Small socket buffers on both ends (and the transport's): the sender's writes then
    wait for the receiver, so what pre-copy measures is the rate the receiver takes pages
    at, and when the guest is suspended the receiver is at most this far behind (with the
    kernel's default buffers it could be megabytes behind, all of it downtime)."""
    import socket
    sock = writer.get_extra_info("socket")
    if sock is not None:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, IN_FLIGHT)
    writer.transport.set_write_buffer_limits(high=IN_FLIGHT)


async def _drain(writer: asyncio.StreamWriter) -> None:
    """Wait until the peer has taken what was written, at most IDLE_TIMEOUT (TimeoutError):
    a peer that stops reading but keeps its socket open (its kernel acknowledges with a zero
    window, so TCP never gives up) must not hold a migration, and the guest suspended for
    its stop-and-copy, for ever. The receiver's reads have the same bound."""
    async with asyncio.timeout(IDLE_TIMEOUT):
        await writer.drain()


def _boost(rt: RealTime, dom: "Domain") -> None:
    """The loop and the domain's tap writer threads at real-time priority (RealTime.also):
    the guest's frames go through those threads, the last ones on the source and the first
    ones on the destination."""
    rt.start()
    rt.also(devices.writer_threads(dom))


# ----------------------------------------------------------------------------- receiver
async def receive(hv: "Hypervisor", reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  secret: bytes, on_domain: Callable[["Domain"], None] | None = None,
                  marks: dict[str, float] | None = None, realtime: bool = True) -> "Domain | None":
    """One incoming migration. Returns the running domain, or None when the sender was
    refused or the migration failed (nothing is left behind either way). `marks` gets the
    time.perf_counter() of each step of the end of the stream (where the downtime goes).
    `realtime`: from the sender's STOP_AND_COPY record (its guest suspended) to DONE the
    loop thread runs at real-time priority (RealTime): the guest is down on both hosts
    then."""
    mk: dict[str, float] = {} if marks is None else marks
    rt = RealTime(realtime)

    def mark(name: str) -> None:
        mk[name] = time.perf_counter()

    def on_record(r: S.Rec) -> None:
        # STOP_AND_COPY: the sender's guest is suspending; from here to DONE the guest is
        # down on both hosts, and a receiver at normal priority waited 10-30 ms for a core
        # for the last pages (two daemons on 2 loaded cores), so the boost starts now, not
        # at the end of the stream (at most once). Even then the boost came late when the
        # loop thread waited tens of ms for a core to read that record (load ~14), so it
        # starts already at each PRECOPY_ROUND_END: the receiver then waits, boosted but
        # blocked (no CPU), for the sender's next round or its stop-and-copy, and a
        # PAGE_DATA record before any STOP_AND_COPY (another round) ends it. Not when a
        # sender runs in this process (one loop thread: the boost would cover the
        # sender's dirty scan and its guest's suspend handshake, which has a shorter one).
        if r == S.Rec.stop_and_copy:
            if "rx_stop_copy" not in mk:
                mark("rx_stop_copy")
                rt.start()
        elif "rx_stop_copy" in mk:
            return
        elif r == S.Rec.precopy_round_end:
            if not _sending:
                rt.start()
        elif r == S.Rec.page_data:
            rt.stop()

    def on_end(d: "Domain") -> None:
        mark("rx_stream_in")
        _boost(rt, d)
        devices.announce_now(d)
        mark("rx_announced")
    peer = writer.get_extra_info("peername")
    _bound_in_flight(writer)
    nr = os.urandom(NONCE)
    try:
        writer.write(MAGIC + nr)
        await writer.drain()
        async with asyncio.timeout(AUTH_TIMEOUT):
            msg = await reader.readexactly(len(MAGIC) + NONCE + MAC)
        ns, proof = msg[len(MAGIC):len(MAGIC) + NONCE], msg[len(MAGIC) + NONCE:]
        if msg[:len(MAGIC)] != MAGIC or not hmac.compare_digest(proof, _mac(secret, b"sender", nr, ns)):
            log.warning("migration from %s refused: authentication failed", peer)
            writer.close()
            return None
        writer.write(_mac(secret, b"receiver", ns, nr))
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
        log.warning("migration from %s: handshake failed: %s", peer, str(e) or type(e).__name__)
        writer.close()
        return None
    dom = None
    try:
        dom, st = await _restore.read_stream(hv, S.BufferedSource(_SocketSource(reader, IDLE_TIMEOUT)),
                                             start=False, claim=False, prepare=True,
                                             progress=lambda _d, _n: mark("rx_pages"),
                                             on_end=on_end, on_record=on_record)
        mark("rx_finished")
        writer.write(READY)
        await _drain(writer)
        async with asyncio.timeout(IDLE_TIMEOUT):
            go = await reader.readexactly(len(GO))
        if go != GO:
            raise S.StreamError("sender did not say GO")
        mark("rx_go")
        await devices.claim(hv, dom)          # the sender let go of the disks before GO
        mark("rx_claimed")
        hv.start_domain(dom)
        started, dom = dom, None
        if on_domain is not None:
            on_domain(started)
        writer.write(DONE + struct.pack("<I", started.domid))
        await _drain(writer)
        mark("rx_done")
        await _carried_frames(reader, started)
        mark("rx_held_frames")
        await _vifs_connected(started)      # the sender waits for the close after it
        mark("rx_vifs_connected")
        log.info("d%d (%s): migrated in from %s (%d pages)", started.domid, started.name, peer, st.pages)
        return started
    except (S.StreamError, BuildError) as e:
        log.warning("migration from %s refused: %s", peer, e)
        if "rx_finished" not in mk:           # the sender waits for READY: tell it why not
            await _refuse(reader, writer, str(e))
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
        log.warning("migration from %s failed: %s", peer, str(e) or type(e).__name__)
    finally:
        rt.stop()
        if dom is not None:
            _restore.discard(hv, dom)
        writer.close()
    return None


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reason: str) -> None:
    """Tell a sender why its stream was refused (REFUSED, in READY's place), then read and
    drop what it still sends until it closes (at most REFUSED_LINGER_S): a close with its
    data unread would reset the connection, and the sender would see the reset, not why."""
    why = reason.encode(errors="replace")[:REASON_MAX]
    try:
        writer.write(REFUSED + struct.pack("<H", len(why)) + why)
        async with asyncio.timeout(REFUSED_LINGER_S):
            await writer.drain()
            while await reader.read(1 << 16):
                pass
    except (OSError, TimeoutError):
        pass


async def _answer(reader: asyncio.StreamReader) -> bytes:
    """The receiver's answer to the stream: READY, or MigrationError with its reason."""
    first = await reader.readexactly(len(READY))
    if first == REFUSED:
        n = struct.unpack("<H", await reader.readexactly(2))[0]
        raise MigrationError(f"the receiver refused the migration: "
                             f"{(await reader.readexactly(min(n, REASON_MAX))).decode(errors='replace')}")
    return first


FIRST_FRAME_WAIT_S = 0.1


async def _carried_frames(reader: asyncio.StreamReader, dom: "Domain") -> None:
    """After DONE: the frames for the guest its old host held while it was down (the
    sender's HELD message), given to its vifs here (devices.put_rx). Written back into
    the old host's bridge instead, they would reach it too, but teach the switches each
    sender's MAC on the old host until that sender's next frame (the guest's answers
    then go there). The guest is this host's already: a message that does not come
    within REALTIME_LIMIT_S or is malformed only loses those frames (logged)."""
    from ..backends.net import Netback
    from ..backends.net.device import HELD_BYTES, HELD_MAX, RX_BUF
    # What the guest's vifs can keep (Netback.put_rx) is all that is read: a peer's
    # message beyond that is refused before it is held here.
    vifs = sum(isinstance(b, Netback) for b in dom.backends)
    size = 0
    try:
        async with asyncio.timeout(priority.REALTIME_LIMIT_S):
            tag, count = HELD.unpack(await reader.readexactly(HELD.size))
            if tag != b"HELD" or count > HELD_MAX * vifs:
                raise ValueError(f"bad HELD header ({tag!r}, {count} frames)")
            held = []
            for _ in range(count):
                devid, length = HELD_FRAME.unpack(await reader.readexactly(HELD_FRAME.size))
                size += length
                if length > RX_BUF or size > HELD_BYTES * vifs:
                    raise ValueError(f"a held frame of {length} bytes ({size} in all)")
                held.append((devid, await reader.readexactly(length)))
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as e:
        log.warning("d%d: the frames held on the old host are lost: %s", dom.domid,
                    str(e) or type(e).__name__)
        return
    kept = devices.put_rx(dom, held)
    if held:
        log.info("d%d: %d of %d frames held on the old host given to the guest here",
                 dom.domid, kept, len(held))


async def _vifs_connected(dom: "Domain") -> None:
    """Wait (at most REALTIME_LIMIT_S) until the migrated guest is back on its networks:
    on each vif the backend Connected, the frontend's state Connected and the guest's first
    frame out after that (its peers' frames that waited in the tap are answered then). What
    its peers see as downtime lasts until then: the guest's resume (xenbus handshakes with
    this loop's xenstore) measured 300-700 ms at normal priority under load, and ending the
    boost at the backend's Connected, a few round trips before the frontend is done, left
    the guest's last steps 50-100 ms behind other processes' for a core (measured on 2
    loaded cores). The boost covers it and ends with it; the first frame is waited for at
    most FIRST_FRAME_WAIT_S after the connect (a guest with nothing to say), and until the
    vif's tap writer has written it."""
    from ..backends.net import Netback
    from ..xenbus import Watch, XenbusState, read_state
    st = dom.hypervisor.xenstore.store

    async def up(b: "Netback") -> None:
        sent = b.stats.tx_packets
        watch = Watch(st, f"{b.front}/state", token=f"migrated.d{dom.domid}.{b.devid}")
        try:
            while read_state(st, b.front) != XenbusState.Connected:
                await watch.next()
        finally:
            watch.close()
        await b.connected.wait()
        try:
            async with asyncio.timeout(FIRST_FRAME_WAIT_S):
                while b.stats.tx_packets == sent:
                    await asyncio.sleep(0.001)
        except TimeoutError:
            return
        # ... and in the tap: its writer thread loses the boost with the loop (a reply
        # taken from the ring waited 30-50 ms in the writer's queue at load ~16).
        await b.tx_written(FIRST_FRAME_WAIT_S)
    vifs = [b for b in dom.backends if isinstance(b, Netback)]
    if not vifs:
        return
    try:
        async with asyncio.timeout(priority.REALTIME_LIMIT_S):
            await asyncio.gather(*(up(b) for b in vifs))
    except TimeoutError:
        log.info("d%d: vifs not back within %.1f s of the hand-over", dom.domid,
                 priority.REALTIME_LIMIT_S)


class Receiver:
    """Accepts migrations on host:port (`aiovmm serve --migration-listen`). `aclose()`
    stops listening and waits for the migrations in progress (each one either completes
    or leaves nothing behind) before the hypervisor may go."""

    def __init__(self, hv: "Hypervisor", secret: bytes,
                 on_domain: Callable[["Domain"], None] | None = None, realtime: bool = True) -> None:
        if len(secret) < 16:
            raise ValueError("the migration secret must be at least 16 bytes")
        self.hv, self.secret, self.on_domain = hv, secret, on_domain
        self.realtime = realtime
        self.server: asyncio.Server | None = None
        self._active: set[asyncio.Future] = set()
        self.marks: dict[str, float] = {}   # the last migration's steps (receive's `marks`)

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def start(self, host: str, port: int) -> "Receiver":
        self.server = await asyncio.start_server(self._handle, host, port)
        return self

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if len(self._active) >= MAX_INCOMING:
            # Each connection holds a socket (and, authenticated, a domain being built)
            # for up to AUTH_TIMEOUT before the peer has proved anything: without a bound
            # anyone who can reach the port could take every descriptor of the process.
            log.warning("migration from %s refused: %d migrations in progress",
                        w.get_extra_info("peername"), len(self._active))
            w.transport.abort()
            return
        fut = asyncio.get_running_loop().create_future()
        self._active.add(fut)
        try:
            self.marks = {}
            await receive(self.hv, r, w, self.secret, self.on_domain, self.marks, self.realtime)
        except Exception:                   # per-connection boundary: never kill the server
            log.exception("migration receiver: unexpected error")
        finally:
            fut.set_result(None)
            self._active.discard(fut)

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        if self._active:
            await asyncio.wait(list(self._active))


async def serve(hv: "Hypervisor", host: str, port: int, secret: bytes,
                on_domain: Callable[["Domain"], None] | None = None, realtime: bool = True) -> Receiver:
    return await Receiver(hv, secret, on_domain, realtime).start(host, port)


# ----------------------------------------------------------------------------- sender
HANDSHAKE_BOOST_S = 0.05
_sending = 0                              # migrate() calls in progress in this process
CLOSE_WAIT_S = priority.REALTIME_LIMIT_S + 0.5


async def _receiver_closed(reader: asyncio.StreamReader) -> None:
    """After DONE: wait (at most CLOSE_WAIT_S) until the receiver closes the connection,
    which it does once the guest's vifs have reconnected there (receive). Anything else
    it sends is ignored; an error is as good as the close (the guest is the receiver's)."""
    try:
        async with asyncio.timeout(CLOSE_WAIT_S):
            while await reader.read(4096):
                pass
    except (OSError, TimeoutError):
        pass


async def migrate(dom: "Domain", host: str, port: int, secret: bytes, *,
                  downtime_ms: float = 30.0, max_rounds: int = 10,
                  bandwidth: float = 0.0, progress: Progress | None = None,
                  realtime: bool = True, abort: asyncio.Event | None = None) -> MigrateStats:
    """Move a running domain to the receiver at host:port. `bandwidth` (bytes/s, 0 =
    unlimited) caps the pre-copy rate. `realtime`: the stop-and-copy runs at real-time
    priority (RealTime). `abort` set during the pre-copy (the user's Ctrl-C, as xl's migrate
    dies with its process) ends it at the next write with MigrationError; once the guest is
    asked to suspend, the migration goes on to its end. Raises MigrationError; the source
    then runs on."""
    stats = MigrateStats()
    t_start = time.perf_counter()
    try:
        _save.check_saveable(dom)
    except _save.SaveError as e:
        raise MigrationError(str(e)) from None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), AUTH_TIMEOUT)
    except (OSError, TimeoutError) as e:
        raise MigrationError(f"cannot connect to {host}:{port}: {e}") from None
    _bound_in_flight(writer)
    susp = None
    written: asyncio.Future | None = None
    answer: asyncio.Future | None = None
    go_sent = False
    shadow = Shadow(dom.nr_pages)             # what the receiver has (dirty.py)
    rt = RealTime(realtime)

    def run_on_here() -> None:
        """Called off before GO, after the suspend: the guest resumes here."""
        resume_cancelled(dom)
        devices.hold(dom, False)
        devices.reannounce(dom)               # the receiver may have announced it already
    global _sending
    _sending += 1
    try:
        try:
            async with asyncio.timeout(AUTH_TIMEOUT):
                hello = await reader.readexactly(len(MAGIC) + NONCE)
                if hello[:len(MAGIC)] != MAGIC:
                    raise AuthError(f"{host}:{port} is not an aiovmm migration receiver")
                nr, ns = hello[len(MAGIC):], os.urandom(NONCE)
                writer.write(MAGIC + ns + _mac(secret, b"sender", nr, ns))
                await writer.drain()
                proof = await reader.readexactly(MAC)
        except (asyncio.IncompleteReadError, ConnectionError):
            raise AuthError(f"{host}:{port} closed the connection during authentication "
                            "(wrong secret?)") from None
        if not hmac.compare_digest(proof, _mac(secret, b"receiver", ns, nr)):
            raise AuthError(f"{host}:{port} did not prove the shared secret")

        t_rate = [time.perf_counter(), 0]
        # The receiver answers once (READY, or REFUSED with why, which can come during the
        # pre-copy: the header's devices): watched from here on.
        answer = asyncio.ensure_future(_answer(reader))

        async def write(data: bytes | memoryview) -> None:
            if abort is not None and abort.is_set() and "suspend_asked" not in stats.marks:
                raise MigrationError(f"migration to {host}:{port} cancelled during pre-copy")
            if answer.done():
                answer.result()               # REFUSED: raises MigrationError with the reason
                raise MigrationError("the receiver answered before the end of the stream")
            writer.write(data)
            stats.bytes_sent += len(data)
            await _drain(writer)
            if bandwidth:
                t_rate[1] += len(data)
                ahead = t_rate[1] / bandwidth - (time.perf_counter() - t_rate[0])
                if ahead > 0:
                    await asyncio.sleep(ahead)

        await write(_save.head(dom))
        todo: list[int] | range = range(dom.nr_pages)
        prev: list[int] | None = None
        while True:
            has_data = _save.data_map(dom)
            t0 = time.perf_counter()
            b0 = stats.bytes_sent
            stats.round_pages, stats.round_sent = len(todo), 0
            for i in range(0, len(todo), PROGRESS_PAGES):   # progress within a round too
                chunk = todo[i:i + PROGRESS_PAGES]
                await _save.pages(dom, chunk, write, has_data, skip_tables=True, shadow=shadow)
                stats.pages_sent += len(chunk)
                stats.round_sent += len(chunk)
                if progress is not None:
                    progress("precopy", stats)
            await write(S.record(S.Rec.precopy_round_end))   # the receiver waits boosted
            stats.rounds += 1
            stats.dirty_per_round.append(len(todo))
            rate = (stats.bytes_sent - b0) / max(time.perf_counter() - t0, 1e-6)
            await asyncio.sleep(0)
            changed = await shadow.changed_yielding(dom, _save.data_map(dom))
            fits = len(changed) * PAGE_SIZE / max(rate, 1.0) * 1e3 <= downtime_ms
            if fits or stats.rounds >= max_rounds or (prev is not None and len(changed) >= len(prev)):
                break
            # Pages that changed in this round and the one before are written all the time:
            # they wait for the last copy instead of going out in every round.
            again = set(prev or ()).intersection(changed)
            todo = [p for p in changed if p not in again] if again else changed
            prev = changed
        # Stop and copy the rest.
        stats.marks["suspend_asked"] = time.perf_counter()
        # The boost covers the guest's suspend handshake too: at normal priority its two
        # xenstore round trips and the guest's own steps waited for a core (24-53 ms of
        # the ping gap at load ~10; 4-7 ms boosted). The guest runs on the loop then: a
        # busy one would hold a core at real-time priority, and whatever it waits for at
        # normal priority (its disk's I/O threads, its TCP peer) with it, so this boost
        # ends after HANDSHAKE_BOOST_S; a guest that takes longer suspends at normal
        # priority. The stop-and-copy's own boost starts at the suspend.
        hs = RealTime(realtime, limit_s=HANDSHAKE_BOOST_S)
        hs.start()
        try:
            susp = await suspend(dom)
        finally:
            hs.stop()
        _boost(rt, dom)
        stats.realtime = rt.active
        t_down, c_down = time.perf_counter(), time.process_time()
        await write(S.record(S.Rec.stop_and_copy))   # the receiver boosts itself now
        devices.hold(dom, True)               # frames for the guest wait in its taps
        devices.take_tx(dom)                  # its last frames out, before the last copy
        written = asyncio.ensure_future(devices.tx_written(dom))
        ph = stats.phases_ms

        stats.marks["suspended"] = t_down

        def mark(name: str, t=[t_down]) -> None:
            now = time.perf_counter()
            ph[name] = (now - t[0]) * 1e3
            stats.marks[name] = t[0] = now
        await devices.quiesce(dom)            # block requests in flight answered first
        mark("quiesce")
        has_data = _save.data_map(dom)
        last = shadow.changed(dom, has_data)
        mark("scan")
        await _save.pages(dom, last, write, has_data, shadow=shadow) if last else None
        mark("last_pages")
        stats.pages_sent += len(last)
        stats.round_pages = stats.round_sent = len(last)
        stats.dirty_per_round.append(len(last))
        # The receiver announces the guest when it has the tail: the guest's last frames
        # must be on the wire from here before that (Netback.tx_written).
        await written
        await write(_save.tail(dom, susp))
        mark("tail")
        if progress is not None:
            progress("final", stats)
        async with asyncio.timeout(IDLE_TIMEOUT):
            ready = await asyncio.shield(answer)
        if ready != READY:
            raise MigrationError("the receiver did not confirm the stream")
        mark("ready")
        go_sent = True                        # from here on the guest belongs to the receiver
        devices.release(dom.hypervisor, dom)  # disks: the receiver claims them after GO
        writer.write(GO)
        await _drain(writer)
        async with asyncio.timeout(IDLE_TIMEOUT):
            done = await reader.readexactly(len(DONE) + 4)
        if done[:len(DONE)] != DONE:
            raise MigrationError("no DONE from the receiver")
        stats.domid = struct.unpack("<I", done[len(DONE):])[0]
        mark("done")
        # The frames for the guest that waited here go to its new host on this connection
        # (_carried_frames there); the guest is the receiver's now, so a failure to send
        # them loses only them.
        held = devices.take_held(dom)
        try:
            writer.write(HELD.pack(b"HELD", len(held)) + b"".join(
                HELD_FRAME.pack(devid, len(f)) + f for devid, f in held))
            await _drain(writer)
            stats.forwarded = len(held)
        except (OSError, TimeoutError) as e:
            log.warning("d%d: %d held frames not sent on: %s", dom.domid, len(held), e)
        stats.downtime_ms = (time.perf_counter() - t_down) * 1e3
        stats.downtime_cpu_ms = (time.process_time() - c_down) * 1e3
        rt.stop()
        await _receiver_closed(reader)
        stats.marks["receiver_closed"] = time.perf_counter()
        stats.forwarded += devices.forward(dom)   # what reached the taps since DONE
    except (OSError, asyncio.IncompleteReadError, TimeoutError, SuspendError, _save.SaveError,
            MigrationError) as e:
        if answer is not None and answer.done() and not answer.cancelled() \
                and isinstance(answer.exception(), MigrationError):
            e = answer.exception()            # the receiver said why it closed
        why = str(e) or type(e).__name__
        # The connection and what the peer has not taken go now: a close would keep both
        # (the socket, up to IN_FLIGHT queued bytes) for as long as a peer that never
        # reads keeps its end open.
        writer.transport.abort()
        if go_sent:
            log.error("d%d: migration to %s:%d failed after GO (%s): the domain stays suspended "
                      "here; check the destination before resuming or destroying it", dom.domid,
                      host, port, why)
            raise MigrationError(f"failed after hand-over: {why}", source_suspended=True) from None
        if susp is not None:
            run_on_here()
        log.warning("d%d: migration to %s:%d failed, the domain runs on here: %s", dom.domid,
                    host, port, why)
        if isinstance(e, MigrationError):
            raise e from None
        raise MigrationError(f"migration to {host}:{port} failed: {why}") from None
    except asyncio.CancelledError:
        # Cancelled (the caller's task, a daemon going down): before GO the guest is still
        # this side's and runs on, as on any failure; after GO it is the receiver's.
        writer.transport.abort()
        if susp is not None and not go_sent:
            run_on_here()
            log.warning("d%d: migration to %s:%d cancelled, the domain runs on here", dom.domid,
                        host, port)
        elif stats.domid >= 0:                # after DONE (waiting for the receiver's close):
            dom.suspended = None              # the guest runs there, the source goes anyway
            dom.shutdown(ShutdownReason.suspend)
        raise
    finally:
        _sending -= 1
        if written is not None and not written.done():
            written.cancel()
            await asyncio.gather(written, return_exceptions=True)
        if answer is not None:
            answer.cancel()
            await asyncio.gather(answer, return_exceptions=True)
        rt.stop()
        writer.close()
        shadow.close()
    stats.total_s = time.perf_counter() - t_start
    dom.suspended = None
    dom.shutdown(ShutdownReason.suspend)       # gone from here, as after xl migrate
    log.info("d%d (%s): migrated to %s:%d as d%d: %d rounds, %d pages sent (%.2f per page), "
             "downtime %.1f ms", dom.domid, dom.name, host, port, stats.domid, stats.rounds,
             stats.pages_sent, stats.pages_sent / dom.nr_pages, stats.downtime_ms)
    return stats
