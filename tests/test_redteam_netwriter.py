"""Red-team: netback's TapWriter thread (backends/net/writer.py) against a guest that
changes what it granted after the OKAY response, floods the tx ring, and has its vif torn
down while frames are still queued.

The real Netback on a parked domain's ring and grants (test_mutation_kills_net's Vif); the
tap is the host end of a SOCK_SEQPACKET pair, blocking with small buffers where the writer
must really stall (test_net_writer's harness)."""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

from backends.net.device import NETIF_RSP_OKAY, VNET_HDR_LEN
from backends.net.writer import BACKLOG_MAX, TapWriter
from test_net_writer import SIZE, _recv_all, _run, _wait


def _tapw_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("tapw-"))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_frames_are_what_was_granted_at_the_response():
    """The guest rewrites every granted page and ends its grants right after the OKAY
    responses, while the writer is still stalled: the frames that reach the tap are the
    bytes copied before the response (netback copied them; the thread never reads guest
    memory)."""
    async def body(v):
        loop = asyncio.get_running_loop()
        w = TapWriter(v.host.fileno(), "rt0", loop, lambda: None, lambda refused: None)
        v.nb._writer = w
        n = 60                                    # 240 KB: more than the socket buffers
        try:
            reqs = [(50 + i % 20, i % 64, 0, i, SIZE - i) for i in range(n)]
            want = [v.hv.mem.read((v.d.spare[2 + i % 20] << 12) + off, size)
                    for i, (_g, off, _f, _id, size) in enumerate(reqs)]
            v.push(*reqs)
            v.nb._process_tx()
            assert [s for _i, s in v.responses(n)] == [NETIF_RSP_OKAY] * n
            assert w.backlog() > 0                # the thread is stuck: nothing read yet
            for i in range(20):                   # the guest changes its mind
                v.hv.mem.write(v.d.spare[2 + i] << 12, b"\xee" * 4096)
                v.d.write_grant(50 + i, 0, 0, 0)
            got: list[bytes] = []
            await _wait(lambda: got.extend(_recv_all(v.out)) or len(got) == n)
            assert [f[VNET_HDR_LEN:] for f in got] == want
        finally:
            v.nb._writer = None
            await w.aclose()
    _run(body)


def test_a_flood_keeps_the_backlog_bounded():
    """Ring after ring of full-size requests while nobody reads the tap: netback stops
    taking requests at the default limit, so the host holds at most BACKLOG_MAX plus one
    frame, whatever the guest queues."""
    async def body(v):
        loop = asyncio.get_running_loop()
        w = TapWriter(v.host.fileno(), "rt1", loop, lambda: None, lambda refused: None)
        v.nb._writer = w
        try:
            worst = 0
            for _round in range(12):              # 12 rings x 256 x 4000 B = 12 MB offered
                free = 256 - (v.prod - v.nb.tx.req_cons)
                v.push(*[(50 + i % 20, 0, 0, i, SIZE) for i in range(free)])
                v.nb._process_tx()
                worst = max(worst, w.backlog())
            assert v.nb._tx_backlogged
            assert worst <= BACKLOG_MAX + SIZE + VNET_HDR_LEN, worst
            assert v.nb.tx.req_cons < v.prod      # the rest waits on the ring
        finally:
            v.nb._writer = None
            _recv_all(v.out)
            v.out.setblocking(True)
            v.out.settimeout(0.05)
            stop = threading.Event()
            drain = threading.Thread(target=_drain, args=(v.out, stop))
            drain.start()
            await w.aclose()
            stop.set()
            drain.join()
    _run(body)


def _drain(sock: socket.socket, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            sock.recv(70000)
        except (TimeoutError, OSError):
            pass


def test_teardown_with_frames_queued_on_a_nonblocking_tap():
    """A tap does not block a write (tap.py opens it O_NONBLOCK): the vif is torn down with
    frames queued and nobody reading. close() returns at once (the loop is not held), the
    frames that did not fit are counted as drops, the thread and its fd are gone, and
    nothing is written after close."""
    async def body(v):
        loop = asyncio.get_running_loop()
        threads0, fds0 = _tapw_threads(), _fds()
        drops: list[bool] = []
        v.host.setblocking(False)
        w = TapWriter(v.host.fileno(), "rt2", loop, lambda: None, drops.append)
        v.nb._writer = w
        try:
            v.push(*[(50 + i % 20, 0, 0, i, SIZE) for i in range(200)])
            v.nb._process_tx()
            t0 = time.monotonic()
            v.nb._writer = None
            await w.aclose()
            took = time.monotonic() - t0
            assert took < 0.5, took
            assert _tapw_threads() == threads0 and _fds() == fds0
            await asyncio.sleep(0.05)             # the drop reports arrive by call_soon
            got = _recv_all(v.out)
            assert len(got) + len(drops) == v.nb.tx.req_cons, (len(got), len(drops))
            assert drops and not any(drops)       # EAGAIN drops, no refused frames
            await asyncio.sleep(0.1)
            assert _recv_all(v.out) == []         # nothing after close
        finally:
            v.nb._writer = None
    _run(body)


def test_closing_the_tap_fd_under_a_stalled_writer_never_reaches_a_reused_number():
    """The writer is stalled with frames queued; the vif's own tap fd is closed and its
    number reused by a new socket before the writer drains. The frames go to the tap they
    were queued for (the writer's duplicate), never into the new socket."""
    async def body(v):
        loop = asyncio.get_running_loop()
        w = TapWriter(v.host.fileno(), "rt3", loop, lambda: None, lambda refused: None)
        v.nb._writer = w
        n = 60
        v.push(*[(50 + i % 20, 0, 0, i, SIZE) for i in range(n)])
        v.nb._process_tx()
        assert w.backlog() > 0
        num = v.host.fileno()
        v.host.close()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            assert num in (a.fileno(), b.fileno())       # the number is in use again
            got: list[bytes] = []
            await _wait(lambda: got.extend(_recv_all(v.out)) or len(got) == n)
            v.nb._writer = None
            await w.aclose()
            for s in (a, b):
                s.setblocking(False)
                assert _recv_all(s) == []
        finally:
            a.close()
            b.close()
    _run(body)
